/**
 * RotaryAttention's segment mask and per-token rotary positions on webgpu: a packed row gives each
 * sample the logits it has alone, and its loss and gradients run, read asynchronously. Run with
 * TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { planRows, rowsBatch, toSample } from '../../../src/data/datasets_rows.js';
import { buildMoECausalLM } from '../../../src/layers/moe_causal_lm.js';
import { withSequenceContext } from '../../../src/layers/sequence_context.js';
import type { HFConfig } from '../../../src/models/families.js';
import { register } from '../../../src/plugin.js';
import { batchLoss, disposeBatch } from '../../../src/train/loss.js';
import { seedModelInit } from '../../../src/train/seeded_init.js';
import { expectCloseAsync, expectNoLeakAsync } from './helpers.js';

const TINY: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: 11, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};
const SAMPLES = [[1, 5, 2, 9, 3], [4, 10, 7], [8, 1, 1, 6, 2, 0]];

describe('webgpu: RotaryAttention under a SequenceContext', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('packed samples keep their own logits; the packed loss has gradients', async () => {
    const model = buildMoECausalLM(TINY);
    await seedModelInit(model, 3, 0.3);
    // the fused expert kernels: the reference expert loop reads the routing synchronously
    const handle = register({ models: [model] });
    const samples = SAMPLES.map(ids => toSample({ ids: Int32Array.from(ids), trained: new Uint8Array(ids.length).fill(1) }, 16));
    const batch = rowsBatch(samples, planRows(samples, [0, 1, 2], 16, true), { sequenceLen: 16, packing: true, padTokenId: 0 });
    await expectNoLeakAsync(async () => {
      const packed = withSequenceContext(batch, () => model.predict(batch.inputIds)) as tf.Tensor3D;  // [1, 16, V]
      let at = 0;
      for (const ids of SAMPLES) {
        const alone = tf.tidy(() => model.predict(tf.tensor2d([ids], [1, ids.length], 'int32')) as tf.Tensor);
        const part = tf.slice(packed, [0, at, 0], [1, ids.length, 11]);
        await expectCloseAsync(part, await alone.data(), 1e-5, `sample at ${at}`, alone.shape);
        tf.dispose([alone, part]);
        at += ids.length;
      }
      packed.dispose();
      const { value, grads } = tf.variableGrads(() => batchLoss(model, batch));
      expect(Number.isFinite((await value.data())[0])).to.equal(true);
      expect(Object.keys(grads).length).to.be.greaterThan(5);
      tf.dispose([value, ...Object.values(grads)]);
    });
    disposeBatch(batch);
    handle.unregister();
    model.dispose();
  });
});
