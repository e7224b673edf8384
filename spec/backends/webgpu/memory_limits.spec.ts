/**
 * backendMemoryLimits on webgpu reads the device's own buffer limits (through the guarded
 * `backend.device`), and a load whose largest weight exceeds them is refused before it is built.
 * Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { backendMemoryLimits, estimateLoadMemory, memoryProblem } from '../../../src/models/memory.js';

describe('webgpu: backendMemoryLimits', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it("gives the smaller of the device's maxBufferSize and maxStorageBufferBindingSize as the largest tensor", () => {
    const { limits } = (tf.backend() as unknown as { device: GPUDevice }).device;
    const smaller = Math.min(limits.maxBufferSize, limits.maxStorageBufferBindingSize);
    const got = backendMemoryLimits();
    expect(got).to.deep.include({ backend: 'webgpu', totalBytes: null, usedBytes: tf.memory().numBytes });
    expect(got.maxTensor!.bytes).to.equal(smaller);
    expect(got.maxTensor!.limit).to.equal(`the device's ${smaller === limits.maxBufferSize ? 'maxBufferSize' : 'maxStorageBufferBindingSize'}`);
    // an embedding one element larger than that is refused; the model of the fixture widths is not
    const config = { model_type: 'olmoe', hidden_size: 64, intermediate_size: 48, num_experts: 8, num_experts_per_tok: 2,
      num_hidden_layers: 1, num_attention_heads: 4, num_key_value_heads: 4, vocab_size: 97 };
    expect(memoryProblem('the weights need', estimateLoadMemory(config), 'a smaller model')).to.equal(null);
    const vocab = Math.floor(smaller / 4 / 64) + 1;
    const huge = estimateLoadMemory({ ...config, vocab_size: vocab });
    expect(huge.largest.name).to.equal('model.embed_tokens.weight');
    expect(memoryProblem('the weights need', huge, 'a smaller model')).to.contain(`(model.embed_tokens.weight) but on the webgpu backend a tensor can be at most ${smaller} bytes`);
  });
});
