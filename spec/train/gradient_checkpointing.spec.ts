/**
 * The training run's gradientCheckpointing option (trainLoop; the CLI flag and the run config key
 * are in spec/cli/train.spec.ts and spec/train/run_config.spec.ts): the losses are the plain run's
 * bit for bit, it is on during the run and the model's setting is put back after; and the
 * arguments setGradientCheckpointing refuses.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { gradientCheckpointingEnabled, setGradientCheckpointing } from '../../src/layers/gradient_checkpointing.js';
import { buildMoECausalLM } from '../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../src/models/families.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { register } from '../../src/plugin.js';
import { trainLoop } from '../../src/train/loop.js';
import { seedAdapterInit, seedModelInit } from '../../src/train/seeded_init.js';

const TINY: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: 7, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};

describe('train: gradientCheckpointing', () => {
  it('trainLoop: the same losses bit for bit; on during the run, the model\'s own setting after it', async () => {
    const tokens = Int32Array.from({ length: 120 }, (_, i) => [1, 4, 2, 6, 3][i % 5]);
    const options = { steps: 3, lr: 0.02, batch: 2, seq: 8, seed: 3, gradAccum: 2, maxGradNorm: 1 };
    const losses: number[][] = [];
    for (const gradientCheckpointing of [false, true]) {
      const model = buildMoECausalLM(TINY, { expertKernel: 'fused' });
      await seedModelInit(model, 5, 0.3);
      const handle = register({ models: [model], lora: { r: 2, alpha: 4, targets: ['experts.gate_up', 'router', 'q_proj', 'o_proj'] } });
      seedAdapterInit(model, 'default', 9);
      try {
        const during: boolean[] = [];
        const before = tf.memory().numTensors;
        const result = await trainLoop(model, tokens, { ...options, gradientCheckpointing, onStep: () => during.push(gradientCheckpointingEnabled(model)) });
        expect(tf.memory().numTensors, 'tensors left by the run').to.equal(before);
        expect(during).to.deep.equal([gradientCheckpointing, gradientCheckpointing, gradientCheckpointing]);
        expect(gradientCheckpointingEnabled(model), 'off again after the run').to.equal(false);
        losses.push(result.losses);
        if (gradientCheckpointing) {
          // a model that has it on keeps it on after a run that did not ask for it
          setGradientCheckpointing(model, true);
          await trainLoop(model, tokens, { ...options, steps: 1 });
          expect(gradientCheckpointingEnabled(model)).to.equal(true);
        }
      } finally {
        handle.unregister();
        model.dispose();
      }
    }
    expect(losses[1]).to.deep.equal(losses[0]);
  });

  it('trainLoop refuses a gradientCheckpointing that is not a boolean', async () => {
    const model = buildMoECausalLM(TINY);
    try {
      let error: unknown;
      await trainLoop(model, new Int32Array(40), { steps: 1, lr: 0.01, batch: 1, seq: 4, seed: 1, gradientCheckpointing: 'yes' as unknown as boolean })
          .catch(e => { error = e; });
      expect(error).to.be.instanceOf(OpArgumentError);
      expect((error as Error).message).to.equal('`trainLoop()`: \'gradientCheckpointing\' must be a boolean but got "yes" (string)');
    } finally {
      model.dispose();
    }
  });

  it('setGradientCheckpointing refuses what is not a decoder built by buildMoECausalLM', () => {
    const model = buildMoECausalLM(TINY);
    expect(() => setGradientCheckpointing({} as tfl.LayersModel, true))
        .to.throw(OpArgumentError, /`setGradientCheckpointing\(\)`: 'model' must be a tfjs-layers LayersModel but got an object/);
    expect(() => setGradientCheckpointing(model, 1 as unknown as boolean)).to.throw(/'on' must be a boolean but got 1 \(number\)/);
    model.dispose();
    const dense = (name: string) => tfl.layers.dense({ units: 4, name });
    const input = tfl.input({ shape: [4] });
    const plain = tfl.model({ inputs: input, outputs: dense('d').apply(input) as tfl.SymbolicTensor, name: 'plain' });
    expect(() => setGradientCheckpointing(plain, true)).to.throw(
        /the model 'plain' must be a decoder built by buildMoECausalLM \(one input, one output, layers named 'model\.layers\.N\.mlp_residual'\) but has 0 such layers, 1 input\(s\) and 1 output\(s\)/);
    // decoder-shaped graphs whose layers are not a chain of segments
    const layer = (i: number, h: tfl.SymbolicTensor, into: tfl.SymbolicTensor, extra?: tfl.SymbolicTensor) => {
      const normed = dense(`model.layers.${i}.input_layernorm`).apply(into) as tfl.SymbolicTensor;
      return tfl.layers.add({ name: `model.layers.${i}.mlp_residual` }).apply([h, normed, ...(extra ? [extra] : [])]) as tfl.SymbolicTensor;
    };
    const cases: Array<[string, (x: tfl.SymbolicTensor) => tfl.SymbolicTensor, RegExp]> = [
      ['skips', x => { const h0 = layer(0, x, x); return layer(1, h0, x); }, /decoder layer 1 of 'skips' does not start where layer 0 ends/],
      ['reads', x => { const h0 = layer(0, x, x); return layer(1, h0, h0, x); }, /decoder layer 1 of 'reads' reads 'input\w*', which is computed outside it/],
      ['head', x => { const h0 = layer(0, x, x); return tfl.layers.add({ name: 'head' }).apply([h0, x]) as tfl.SymbolicTensor; },
        /the layers after the last decoder layer of 'head' read 'input\w*', which is computed before it/],
    ];
    for (const [name, build, message] of cases) {
      const x = tfl.input({ shape: [4] });
      const m = tfl.model({ inputs: x, outputs: build(x), name });
      expect(() => setGradientCheckpointing(m, true), name).to.throw(OpArgumentError, message);
      expect(gradientCheckpointingEnabled(m)).to.equal(false);
      m.dispose();
    }
    plain.dispose();
  });
});
