/**
 * generate() on webgpu (async reads only: dataSync throws there): with the plugin's kernels, the KV
 * cache gives the tokens a full forward pass per step gives, greedy and seeded sampling, and the
 * cache is released. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { generate } from '../../../src/generate/generate.js';
import { buildMoECausalLM } from '../../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../../src/models/families.js';
import { register } from '../../../src/plugin.js';

/** GQA (4 query heads, 2 KV heads) and a sliding window of 4 the cache reaches past */
const TINY: HFConfig = {
  model_type: 'mixtral', vocab_size: 19, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 4,
  num_key_value_heads: 2, head_dim: 4, num_local_experts: 4, num_experts_per_tok: 2, intermediate_size: 8,
  sliding_window: 4, rms_norm_eps: 1e-5, initializer_range: 0.5,
};

describe('webgpu: generate with the KV cache', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('gives the tokens of a full forward pass per step, greedy and sampled, and leaves nothing behind', async () => {
    const model = buildMoECausalLM(TINY);
    const handle = register({ models: [model] });
    try {
      const prompt = [3, 11, 5, 17, 2, 8];
      const before = tf.memory().numTensors;
      const greedy = await generate(model, prompt, { maxNewTokens: 8 });
      const uncached = await generate(model, prompt, { maxNewTokens: 8, useCache: false });
      expect(greedy.ids).to.have.length(8);
      expect(Array.from(greedy.ids)).to.deep.equal(Array.from(uncached.ids));
      const sampling = { maxNewTokens: 8, temperature: 1.5, topK: 10, topP: 0.95, seed: 2 };
      const sampled = await generate(model, prompt, sampling);
      expect(Array.from(sampled.ids)).to.deep.equal(Array.from((await generate(model, prompt, { ...sampling, useCache: false })).ids));
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    } finally {
      handle.unregister();
      model.dispose();
    }
  });
});
