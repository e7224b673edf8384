/**
 * Gradient checkpointing on webgpu (setGradientCheckpointing): a training pass of a two-layer
 * model with LoRA on the experts, the router and attention gives the plain pass's loss and
 * gradients, and leaves no tensor behind. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { setGradientCheckpointing } from '../../../src/layers/gradient_checkpointing.js';
import { buildMoECausalLM, trainableVariables } from '../../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../../src/models/families.js';
import { register } from '../../../src/plugin.js';
import { batchLoss } from '../../../src/train/loss.js';
import { seedAdapterInit, seedModelInit } from '../../../src/train/seeded_init.js';

const TINY: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: 11, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};

describe('webgpu: gradient checkpointing', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('the loss and every LoRA gradient equal the plain pass\'s; no tensor left', async () => {
    const model = buildMoECausalLM(TINY);
    await seedModelInit(model, 4, 0.3);
    const handle = register({ models: [model], lora: { r: 2, alpha: 4, targets: ['experts.gate_up', 'experts.down', 'router', 'q_proj', 'o_proj'] } });
    seedAdapterInit(model, 'default', 6);
    const ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3];
    const batch = {
      inputIds: tf.tensor2d(ids, [2, 8], 'int32'), labels: tf.tensor2d(ids.map(i => (i + 1) % 11), [2, 8], 'int32'),
      segmentIds: null, positionIds: null, targetCount: 16,
    };
    try {
      const vars = trainableVariables(model);
      // B starts at 0: move every factor off it so each gradient is non-trivial
      for (const v of vars) v.assign(tf.tidy(() => tf.add(v, tf.mul(tf.randomNormal(v.shape, 0, 1, 'float32', 17), 0.1))));
      const pass = async () => {
        const { value, grads } = tf.variableGrads(() => batchLoss(model, batch), vars);
        const out = { loss: (await value.data())[0], grads: await Promise.all(vars.map(async v => Array.from(await grads[v.name].data()))) };
        tf.dispose([value, ...Object.values(grads)]);
        return out;
      };
      const plain = await pass();
      const again = await pass();
      setGradientCheckpointing(model, true);
      const before = tf.memory().numTensors;
      const checkpointed = await pass();
      expect(tf.memory().numTensors, 'tensors left by a checkpointed pass').to.equal(before);
      // the plain pass repeats itself bit for bit here, so the checkpointed one is held to that too
      expect(again).to.deep.equal(plain);
      expect(checkpointed.loss).to.equal(plain.loss);
      vars.forEach((v, k) => {
        expect(plain.grads[k].some(g => g !== 0), `${v.name}: a non-zero gradient`).to.equal(true);
        expect(checkpointed.grads[k], `${v.name}: the same gradient`).to.deep.equal(plain.grads[k]);
      });
    } finally {
      tf.dispose([batch.inputIds, batch.labels]);
      handle.unregister();
      model.dispose();
    }
  });
});
