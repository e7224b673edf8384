/**
 * tfjs-webgpu's AddN as this package leaves it (src/backends/webgpu/add_n.ts): sums of more
 * tensors than the device has storage buffers per shader stage against float64, with no Dawn
 * validation error; the global gradient norm over that many weights; and the training loop on a
 * model with that many trainable weights, step by step as on cpu. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { addNInputsPerProgram } from '../../../src/backends/webgpu/add_n.js';
import { registerMoEKernels } from '../../../src/backends/register_all_kernels.js';
import { buildMoECausalLM } from '../../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../../src/models/families.js';
import { register } from '../../../src/plugin.js';
import { trainLoop, type StepReport } from '../../../src/train/loop.js';
import { clipByGlobalNorm } from '../../../src/train/optimizer.js';
import { seedModelInit } from '../../../src/train/seeded_init.js';
import { Rng } from '../../helpers/numeric.js';
import { expectCloseAsync, expectNoLeakAsync, onCpu } from './helpers.js';

const device = () => (tf.backend() as unknown as { device: GPUDevice }).device;

/**
 * Runs `fn` inside a validation error scope of the webgpu device; returns the error Dawn reported,
 * if any (the cause of whatever wrong value `fn` then found), else rethrows what `fn` threw.
 */
async function validationErrorOf(fn: () => Promise<void>): Promise<string | null> {
  device().pushErrorScope('validation');
  let failure: unknown = null;
  try {
    await fn();
  } catch (e) {
    failure = e;
  }
  const error = await device().popErrorScope();
  if (error !== null) return error.message;
  if (failure !== null) throw failure;
  return null;
}

/** Two layers: 25 trainable weights, more than Mesa's 16 storage buffers (the from-scratch presets' size). */
const TWO_LAYERS: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: 7, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};

describe('webgpu: AddN past the storage-buffer limit', function () {
  this.timeout(120_000);
  before(async function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    registerMoEKernels('webgpu');
    // the cpu backend's first tensor prints a one-off "install tfjs-node" notice: take it here,
    // outside the tests (spec/setup.ts fails a test that warns)
    await onCpu(async () => tf.dispose(tf.scalar(0)));
  });
  const rng = new Rng(17);

  it('takes as many inputs per program as the device binds, besides the output (and the uniforms)', () => {
    expect(addNInputsPerProgram({ maxStorageBuffersPerShaderStage: 16, maxBindingsPerBindGroup: 1000 })).to.equal(15);
    expect(addNInputsPerProgram({ maxStorageBuffersPerShaderStage: 8, maxBindingsPerBindGroup: 1000 })).to.equal(7);
    expect(addNInputsPerProgram({ maxStorageBuffersPerShaderStage: 1000, maxBindingsPerBindGroup: 12 })).to.equal(10);
    expect(addNInputsPerProgram(device().limits)).to.equal(
        Math.min(device().limits.maxStorageBuffersPerShaderStage - 1, device().limits.maxBindingsPerBindGroup - 2));
  });

  const limit = () => addNInputsPerProgram(device().limits);
  // within one program, exactly one program full, one past it, the gradient norm's 25, several rounds
  const counts = () => [2, limit(), limit() + 1, 25, limit() * limit() + 3];
  for (const [label, pick] of [['2', 0], ['the limit', 1], ['the limit + 1', 2], ['25', 3], ['limit² + 3', 4]] as const) {
    it(`tf.addN of ${label} tensors, float32 and int32: float64's sums, no validation error`, async () => {
      const n = counts()[pick];
      const shape = [5, 7];
      const size = 35;
      const floats = Array.from({ length: n }, () => Float32Array.from(rng.array(size)));
      const ints = Array.from({ length: n }, (_, i) => Int32Array.from({ length: size }, (_, j) => (i * 31 + j * 7) % 19 - 9));
      const want = (terms: ArrayLike<number>[]) => Float64Array.from({ length: size }, (_, j) => terms.reduce((s, t) => s + t[j], 0));
      const error = await validationErrorOf(() => expectNoLeakAsync(async () => {
        const fs = floats.map(f => tf.tensor(f, shape));
        const is = ints.map(v => tf.tensor(v, shape, 'int32'));
        const sumF = tf.addN(fs);
        const sumI = tf.addN(is);
        await expectCloseAsync(sumF, want(floats), 1e-6, `sum of ${n} float32`, shape);
        expect(sumI.dtype).to.equal('int32');
        expect(Array.from(await sumI.data()), `sum of ${n} int32`).to.deep.equal(Array.from(want(ints)));
        tf.dispose([...fs, ...is, sumF, sumI]);
      }));
      expect(error, 'Dawn validation error').to.equal(null);
    });
  }

  it('clipByGlobalNorm over 40 gradients: float64\'s norm and clipped values', async () => {
    const grads = Array.from({ length: 40 }, (_, i) => Float32Array.from(rng.array(3 + (i % 4))));
    const norm64 = Math.sqrt(grads.reduce((s, g) => s + g.reduce((a, v) => a + v * v, 0), 0));
    const error = await validationErrorOf(() => expectNoLeakAsync(async () => {
      const ts = grads.map(g => tf.tensor1d(g));
      const { grads: clipped, norm } = await clipByGlobalNorm(ts, 1);
      expect(norm).to.be.closeTo(norm64, 1e-6 * norm64);
      for (let i = 0; i < grads.length; i++) {
        await expectCloseAsync(clipped[i], Float64Array.from(grads[i], v => v / (norm64 + 1e-6)), 1e-6, `clipped grad ${i}`);
      }
      tf.dispose([...ts, ...clipped]);
    }));
    expect(error, 'Dawn validation error').to.equal(null);
  });

  it('trainLoop on a model with 25 trainable weights: each step\'s loss and gradient norm as on cpu', async () => {
    const tokens = Int32Array.from({ length: 200 }, (_, i) => [1, 4, 2, 6, 3][i % 5]);
    const options = { steps: 3, lr: 0.02, batch: 4, seq: 10, seed: 3, maxGradNorm: 0.5 };
    const run = async () => {
      const model = buildMoECausalLM(TWO_LAYERS);
      await seedModelInit(model, 4, 0.2);
      const handle = register({ models: [model] });
      try {
        const reports: StepReport[] = [];
        await trainLoop(model, tokens, { ...options, onStep: r => reports.push(r) });
        return { trainable: model.trainableWeights.length, reports };
      } finally {
        handle.unregister();
        model.dispose();
      }
    };
    let gpu: Awaited<ReturnType<typeof run>> | undefined;
    const error = await validationErrorOf(async () => { gpu = await run(); });
    expect(error, 'Dawn validation error').to.equal(null);
    expect(gpu!.trainable, 'more trainable weights than one AddN program takes').to.be.above(limit());
    const cpu = await onCpu(run);
    expect(gpu!.reports).to.have.length(3);
    for (let i = 0; i < 3; i++) {
      const [g, c] = [gpu!.reports[i], cpu.reports[i]];
      expect(g.loss, `step ${i + 1} loss`).to.be.closeTo(c.loss, 1e-4 * Math.abs(c.loss));
      expect(g.gradNorm, `step ${i + 1} gradient norm`).to.be.closeTo(c.gradNorm, 1e-4 * c.gradNorm);
    }
  });
});
