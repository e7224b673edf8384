/**
 * The gemma4_text family row (Gemma4ForCausalLM with enable_moe_block): config reading, the router
 * and experts on the decoder layer itself (model.layers.N.router / .experts), loaded from a
 * Hub-layout checkpoint, against the float64 transcription of Gemma4TextRouter + Gemma4TextExperts.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { loadMoEBlockWeights, moeBlockTensorPlan, type TensorSource } from '../../src/io/hf_block.js';
import { type HFConfig, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices } from '../../src/models/families.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import { moeBlock } from '../../src/ops/moe_block.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { expectFixtureRouting } from './fixture_routing.js';
import { Rng, asF32, expectClose, expectNoLeak, tensorOf } from '../helpers/numeric.js';
import { E, EPS, H, I, K, T, type Gemma64, gemma64 } from '../ops/gemma4_reference64.js';

const CONFIG: HFConfig = {
  model_type: 'gemma4_text', hidden_size: H, num_hidden_layers: 2, enable_moe_block: true, num_experts: E,
  top_k_experts: K, moe_intermediate_size: I, hidden_activation: 'gelu_pytorch_tanh', rms_norm_eps: EPS,
};

function mapSource(tensors: Record<string, tf.Tensor>): TensorSource {
  return {
    has: name => name in tensors,
    info: name => ({ dtype: 'F32', shape: tensors[name].shape }),
    tensor: async name => tensors[name].clone(),
  };
}

describe('gemma4_text (Gemma4ForCausalLM, enable_moe_block)', () => {
  it('reads its config: top_k_experts, hidden_activation, enable_moe_block; the block is the decoder layer', () => {
    expect(moeBlockConfigFromHF(CONFIG)).to.deep.equal({
      routing: { kind: 'softmaxTopK', topK: K, renormalize: true }, activation: { kind: 'gegluTanh' },
    });
    expect(moeBlockDims(CONFIG)).to.deep.equal({ hidden: H, intermediate: I, experts: E, topK: K });
    expect(moeLayerIndices(CONFIG)).to.deep.equal([0, 1]);
    expect(moeLayerIndices({ ...CONFIG, enable_moe_block: undefined })).to.deep.equal([]);
    expect(() => moeBlockConfigFromHF({ ...CONFIG, hidden_activation: 'silu' })).to.throw(OpArgumentError,
        "`moeBlockConfigFromHF()`: 'config.hidden_activation' must be 'gelu_pytorch_tanh' or 'gelu_new' (the GeGLU gate " +
        "activation 'gemma4_text' computes) but got \"silu\" (string)");
    expect(() => moeBlockConfigFromHF({ ...CONFIG, top_k_experts: E + 1 })).to.throw(OpArgumentError,
        `\`moeBlockConfigFromHF()\`: 'config.top_k_experts' must be <= num experts (${E}) but got ${E + 1}`);
    const plan = moeBlockTensorPlan(CONFIG, 1);
    expect(plan.router).to.deep.equal({
      weight: { name: 'model.layers.1.router.proj.weight', shape: [E, H] },
      inputScale: { name: 'model.layers.1.router.scale', shape: [H] },
      expertScale: { name: 'model.layers.1.router.per_expert_scale', shape: [E] },
    });
    expect(plan.experts).to.deep.equal({
      kind: 'fused', layout: 'outIn',
      gateUp: { name: 'model.layers.1.experts.gate_up_proj', shape: [E, 2 * I, H] },
      down: { name: 'model.layers.1.experts.down_proj', shape: [E, H, I] },
    });
  });

  it('loads a Hub-layout layer and computes the routed branch (float64 transcription)', async () => {
    const before = tf.memory().numTensors;
    const rng = new Rng(31);
    let p: Gemma64;
    do {
      p = { x: asF32(rng.array(T * H)), proj: asF32(rng.array(E * H, 3)), scale: asF32(rng.array(H, 0.2).map(v => 1 + v)),
        pes: asF32(rng.array(E, 0.2).map(v => 1 + v)), W1: asF32(rng.array(E * 2 * I * H, 0.5)), W2: asF32(rng.array(E * H * I, 0.5)) };
    } while (gemma64(p).margin < 1e-2);
    const tensors: Record<string, tf.Tensor> = {
      'model.layers.0.router.proj.weight': tensorOf(p.proj, [E, H]),
      'model.layers.0.router.scale': tensorOf(p.scale, [H]),
      'model.layers.0.router.per_expert_scale': tensorOf(p.pes, [E]),
      'model.layers.0.experts.gate_up_proj': tensorOf(p.W1, [E, 2 * I, H]),
      'model.layers.0.experts.down_proj': tensorOf(p.W2, [E, H, I]),
    };
    const weights = await loadMoEBlockWeights(mapSource(tensors), CONFIG, 0);
    expect([weights.experts.layout, weights.router.inputNormEpsilon]).to.deep.equal(['outIn', EPS]);
    const x = tensorOf(p.x, [T, H]) as tf.Tensor2D;
    const ref = gemma64(p);
    for (const expertKernel of ['fused', 'reference']) {
      expectNoLeak(() => {
        const { out, routing } = moeBlock(x, weights, moeBlockConfigFromHF(CONFIG), { expertKernel });
        expect(Array.from(routing.experts.dataSync()), `${expertKernel}: experts`).to.deep.equal(Array.from(ref.experts));
        expectClose(out, ref.out, 1e-5, `${expertKernel}: out`);
        tf.dispose([out, routing.weights, routing.experts, routing.logits]);
      });
    }
    disposeMoEBlockWeights(weights);
    tf.dispose([x, ...Object.values(tensors)]);
    expect(tf.memory().numTensors).to.equal(before);
  });
});

describe('gemma4_text: the transformers fixture', () => {
  for (const expertKernel of ['fused', 'reference']) {
    it(`${expertKernel}: chooses the experts transformers chose on the fixture's block.x, with its weights`, async () => {
      await expectFixtureRouting('spec/fixtures/hf/gemma4_text', expertKernel);
    });
  }
});
