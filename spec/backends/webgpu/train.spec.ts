/**
 * The training loop on webgpu with the plugin registered (full fine-tuning): trainLoop reads each step's loss
 * asynchronously (webgpu has no dataSync), the first loss is the model's loss on the first
 * windows, training lowers it, and nothing is left behind. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { buildMoECausalLM, trainableVariables } from '../../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../../src/models/families.js';
import { register } from '../../../src/plugin.js';
import { windowStream } from '../../../src/train/batches.js';
import { TRAIN_READ_AHEAD_FLAG, trainLoop, type StepReport } from '../../../src/train/loop.js';
import { seedAdapterInit, seedModelInit } from '../../../src/train/seeded_init.js';
import { IGNORE_INDEX, nextTokenLoss, type TrainingBatch } from '../../../src/train/loss.js';
import { ADAM_UPDATE_KERNEL_FLAG } from '../../../src/train/adam_update.js';
import { Adam, globalNorm } from '../../../src/train/optimizer.js';
import { addNInputsPerProgram } from '../../../src/backends/webgpu/add_n.js';
import { maxRelativeError } from '../../../src/util/numeric.js';
import { withEnvFlag, withShaderKeys } from './helpers.js';

const TINY: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: 7, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};

/** A micro-batch of `rows` (each row's tokens; labels are the next tokens), with the labels at `ignored` not predicted. */
function batchOf(rows: number[][], ignored: Array<[number, number]> = []): TrainingBatch {
  const s = rows[0].length - 1;
  const labels = rows.map(r => r.slice(1));
  for (const [i, j] of ignored) labels[i][j] = IGNORE_INDEX;
  return {
    inputIds: tf.tensor2d(rows.map(r => r.slice(0, s)), [rows.length, s], 'int32'),
    labels: tf.tensor2d(labels, [rows.length, s], 'int32'),
    segmentIds: null, positionIds: null, targetCount: rows.length * s - ignored.length,
  };
}

/**
 * Runs `fn` with the webgpu backend's reads counted: for each read, the programs run between its start and the
 * moment its values reach the host (0 where the host waits for them at once), in the order the reads resolve.
 */
async function withProgramsWhileReading<T>(fn: () => Promise<T>): Promise<{ result: T; programsWhileReading: number[] }> {
  const backend = tf.backend() as unknown as { read: (dataId: object) => Promise<unknown> };
  const read = backend.read;
  const programsWhileReading: number[] = [];
  try {
    return await withShaderKeys(async keys => {
      backend.read = function (this: unknown, dataId: object) {
        const at = keys.length;
        return read.call(this, dataId).then(values => {
          programsWhileReading.push(keys.length - at);
          return values;
        });
      };
      return { result: await fn(), programsWhileReading };
    });
  } finally {
    backend.read = read;
  }
}

describe('webgpu: trainLoop with the plugin registered', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('globalNorm: Σ g² in a dispatch per group of gradients and one more (MoESumOfSquares), then √: 224 gradients (OLMoE\'s LoRA count)', async () => {
    const values = Array.from({ length: 224 }, (_, i) => Float32Array.from({ length: i % 3 === 0 ? 600 : 48 }, (_, k) => Math.sin(i * 31 + k)));
    const grads = values.map(v => tf.tensor1d(v));
    const want = Math.sqrt(values.reduce((s, v) => s + v.reduce((t, x) => t + x * x, 0), 0));
    const { programs, norm } = await withShaderKeys(async keys => {
      const t = globalNorm(grads);
      const programs = keys.length;
      const value = (await t.data())[0];
      t.dispose();
      return { programs, norm: value };
    });
    expect(norm).to.be.closeTo(want, 1e-6 * want);
    // Mesa's 16 storage buffers: 15 gradients a dispatch, their 15 partial sums in one more, and the square root (the
    // composed ops took 37: a concatenation or more, a square and a one-workgroup sum per chunk of 32; 465 per gradient)
    const perDispatch = addNInputsPerProgram((tf.backend() as unknown as { device: GPUDevice }).device.limits);
    expect(perDispatch).to.equal(15);
    expect(programs).to.equal(Math.ceil(224 / perDispatch) + 2);
    tf.dispose(grads);
  });

  it('trains on the fused kernels, reading each loss asynchronously', async () => {
    const model = buildMoECausalLM(TINY);
    // full fine-tuning: every weight trains, so the tiny model learns the text within 30 steps
    const handle = register({ models: [model] });
    try {
      // a periodic text: a model that learns it gets a much lower loss than at the start
      const tokens = Int32Array.from({ length: 200 }, (_, i) => [1, 4, 2, 6, 3][i % 5]);
      const options = { steps: 30, lr: 0.02, batch: 4, seq: 10, seed: 3 };
      const first = windowStream(tokens, options.batch, options.seq, options.seed).next();
      const loss0 = nextTokenLoss(model, first);
      const expected = (await loss0.data())[0];
      tf.dispose([first, loss0]);
      const before = tf.memory().numTensors;
      const { losses } = await trainLoop(model, tokens, options);
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
      expect(losses).to.have.length(30);
      // the first step's loss is computed before its update: the model's loss on those windows
      expect(losses[0]).to.be.closeTo(expected, 1e-5 * Math.abs(expected));
      const mean = (v: number[]) => v.reduce((s, x) => s + x, 0) / v.length;
      expect(mean(losses.slice(-5)), 'loss of the last steps').to.be.below(0.5 * mean(losses.slice(0, 5)));
    } finally {
      handle.unregister();
      model.dispose();
    }
  });

  it('reads once a step: the loss and the gradients\' norm as one [2] tensor (one copy and one map wait)', async () => {
    const model = buildMoECausalLM(TINY);
    const handle = register({ models: [model], lora: { r: 2, alpha: 4 } });
    try {
      const tokens = Int32Array.from({ length: 200 }, (_, i) => [1, 4, 2, 6, 3][i % 5]);
      const { result: { losses }, programsWhileReading } = await withProgramsWhileReading(
          () => trainLoop(model, tokens, { steps: 3, lr: 0.02, batch: 2, seq: 8, seed: 1, maxGradNorm: 1 }));
      expect(losses).to.have.length(3);
      expect(programsWhileReading, 'reads in 3 steps').to.have.length(3);
    } finally {
      handle.unregister();
      model.dispose();
    }
  });

  it('reads ahead: the next step recorded while a step\'s loss and norm are read, the step-by-step values bit for bit', async () => {
    const tokens = Int32Array.from({ length: 200 }, (_, i) => [1, 4, 2, 6, 3][i % 5]);
    const train = (readAhead: boolean) => withEnvFlag(TRAIN_READ_AHEAD_FLAG, readAhead, async () => {
      const model = buildMoECausalLM(TINY);
      await seedModelInit(model, 1, 0.5);
      const handle = register({ models: [model], lora: { r: 2, alpha: 4 } });
      seedAdapterInit(model, 'default', 2);  // B not zero: every adapter weight has a gradient from step 1
      try {
        const norms: number[] = [];
        const evaluated: number[] = [];
        // two micro-batches a step, every step clipped, an evaluation after step 3: the loop's every path
        const { result: { losses }, programsWhileReading } = await withProgramsWhileReading(() => trainLoop(model, tokens, {
          steps: 5, lr: 0.02, batch: 2, seq: 8, seed: 1, gradAccum: 2, maxGradNorm: 0.05, evalEvery: 3,
          evaluate: () => 0, onEval: r => evaluated.push(r.step), onStep: r => norms.push(r.gradNorm),
        }));
        const weights = await Promise.all(trainableVariables(model).map(async v => Array.from(await v.data())));
        return { losses, norms, weights, programsWhileReading, evaluated };
      } finally {
        handle.unregister();
        model.dispose();
      }
    });
    const before = tf.memory().numTensors;
    const ahead = await train(true);
    const stepByStep = await train(false);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    // step 3 evaluates, so step 4 waits for it; step 5 is the last: their reads have nothing recorded behind them
    const recordedWhileReading = ahead.programsWhileReading.map(n => n > 0);
    expect(recordedWhileReading, `programs while reading: ${ahead.programsWhileReading}`).to.deep.equal([true, true, false, true, false]);
    expect(stepByStep.programsWhileReading).to.deep.equal([0, 0, 0, 0, 0]);
    expect(Math.min(...ahead.programsWhileReading.filter(n => n > 0)), 'a step\'s forward and backward')
        .to.be.above(stepByStep.programsWhileReading.length);
    expect(ahead.evaluated).to.deep.equal([3]);
    expect(Math.min(...ahead.norms), 'every step clipped').to.be.above(0.05);
    expect(ahead.losses).to.deep.equal(stepByStep.losses);
    expect(ahead.norms).to.deep.equal(stepByStep.norms);
    expect(ahead.weights).to.deep.equal(stepByStep.weights);
    expect(Math.abs(ahead.losses[4] - ahead.losses[0]), 'training moved the loss').to.be.above(1e-3);
  });

  it('reads ahead and stops: the step read ahead is discarded, its error comes after the step before is reported', async () => {
    const model = buildMoECausalLM(TINY);
    const handle = register({ models: [model], lora: { r: 2, alpha: 4 } });
    try {
      const row = [1, 4, 2, 6, 3, 1, 4, 2, 6];
      // the third micro-batch predicts nothing: recorded ahead of step 2's read, its error is step 3's
      const given: TrainingBatch[] = [];
      const source = { next: () => given[given.push(batchOf([row], given.length === 2 ? row.slice(1).map((_, j) => [0, j]) : [])) - 1] };
      const before = tf.memory().numTensors;
      const reports: StepReport[] = [];
      let message = '';
      await trainLoop(model, source, { steps: 4, lr: 0.02, batch: 1, seq: 8, seed: 1, onStep: r => reports.push(r) })
          .catch((err: Error) => { message = err.message; });
      expect(message).to.equal('step 3 has no label to predict in its 1 micro-batch(es)');
      expect(reports.map(r => r.step), 'steps reported').to.deep.equal([1, 2]);
      expect(given).to.have.length(3);
      expect(given.every(b => b.inputIds.isDisposed && b.labels.isDisposed), 'batches disposed').to.equal(true);
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);

      // stopped after step 2 (a Ctrl-C): step 3, recorded ahead, is discarded before the stopped run's checkpoint
      given.length = 0;
      const stopping = { next: () => given[given.push(batchOf([row])) - 1] };
      const saves: Array<{ step: number; batchesDisposed: boolean }> = [];
      const result = await trainLoop(model, stopping, {
        steps: 5, lr: 0.02, batch: 1, seq: 8, seed: 1, shouldStop: () => given.length >= 3, saveEvery: 4,
        onSave: async state => { saves.push({ step: state.step, batchesDisposed: given.every(b => b.inputIds.isDisposed) }); },
      });
      expect([result.step, result.stopped, result.losses.length]).to.deep.equal([2, true, 2]);
      expect(saves).to.deep.equal([{ step: 2, batchesDisposed: true }]);
      expect(given).to.have.length(3);
      expect(given.every(b => b.inputIds.isDisposed), 'batches disposed').to.equal(true);
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    } finally {
      handle.unregister();
      model.dispose();
    }
  });

  it('clips and skips on the device (Adam\'s gradScale): the read-first loop\'s losses, a non-finite step not applied', async () => {
    const tokens = Int32Array.from({ length: 200 }, (_, i) => [1, 4, 2, 6, 3][i % 5]);
    // maxGradNorm small enough that every step clips
    const options = { steps: 8, lr: 0.02, batch: 4, seq: 10, seed: 3, maxGradNorm: 0.05 };
    const train = async (deviceScale: boolean) => {
      tf.env().set(ADAM_UPDATE_KERNEL_FLAG, deviceScale);
      const model = buildMoECausalLM(TINY);
      await seedModelInit(model, 1, 0.5);  // both runs from the same weights
      const handle = register({ models: [model] });
      try {
        expect(new Adam([]).scalesOnDevice, 'Adam scales on the device').to.equal(deviceScale);
        const norms: number[] = [];
        const { losses } = await trainLoop(model, tokens, { ...options, onStep: r => norms.push(r.gradNorm) });
        return { losses, norms };
      } finally {
        handle.unregister();
        model.dispose();
        tf.env().set(ADAM_UPDATE_KERNEL_FLAG, true);
      }
    };
    const before = tf.memory().numTensors;
    const device = await train(true);
    const host = await train(false);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    expect(Math.min(...device.norms), 'every step clipped').to.be.above(options.maxGradNorm);
    // the same rule; Adam's kernel and the composed ops agree within float32 rounding (adam_update.spec.ts)
    expect(maxRelativeError(device.losses, host.losses), `${device.losses} vs ${host.losses}`).to.be.below(1e-5);
    expect(Math.abs(device.losses[7] - device.losses[0]), 'training moved the loss').to.be.above(1e-3);

    // a NaN in the embedding: the loss is NaN at step 1, Adam's kernel writes nothing, the error names it
    const model = buildMoECausalLM(TINY);
    const handle = register({ models: [model] });
    try {
      const embed = model.weights.find(w => /embed/.test(w.originalName))!;
      const nans = tf.fill(embed.shape as number[], NaN);
      embed.write(nans);
      nans.dispose();
      const others = model.weights.filter(w => w !== embed && w.trainable);
      const values = await Promise.all(others.map(w => w.read().data()));
      let message = '';
      const tensors = tf.memory().numTensors;
      // step 2, recorded ahead of step 1's read, is discarded with the error
      await trainLoop(model, tokens, { ...options, steps: 2 }).catch((err: Error) => { message = err.message; });
      expect(message).to.equal('the loss became NaN at step 1; try a smaller learning rate (it is 0.02)');
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(tensors);
      const after = await Promise.all(others.map(w => w.read().data()));
      others.forEach((w, i) => expect(Array.from(after[i]), w.name).to.deep.equal(Array.from(values[i])));
    } finally {
      handle.unregister();
      model.dispose();
    }
  });
});
