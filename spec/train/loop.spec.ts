/**
 * The training loop's pieces against independent references: HF's schedule values at chosen
 * steps (closed forms worked out by hand), gradient accumulation against one big batch, clipping
 * against a float64 norm, Adam against torch's update in float64, and an exact resume (losses
 * bitwise equal on cpu) from a state kept in memory; no tensor left behind.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { SeededRandom } from '../../src/data/random.js';
import { buildMoECausalLM, trainableVariables } from '../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../src/models/families.js';
import { windowBatches, type BatchSource } from '../../src/train/batches.js';
import { TrainError } from '../../src/train/errors.js';
import { microBatchSeed, stepGradients, trainLoop, type StepReport, type TrainState } from '../../src/train/loop.js';
import { disposeBatch, IGNORE_INDEX, type TrainingBatch } from '../../src/train/loss.js';
import { Adam, clipByGlobalNorm, globalNorm, stepGradientScale } from '../../src/train/optimizer.js';
import { learningRateAt } from '../../src/train/schedule.js';
import { seedModelInit } from '../../src/train/seeded_init.js';

const VOCAB = 11;
const TINY: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: VOCAB, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};
const PATTERN = Int32Array.from({ length: 400 }, (_, i) => [1, 2, 3, 4, 5, 6, 3, 7][i % 8]);

async function tinyModel(seed = 1): Promise<tfl.LayersModel> {
  const model = buildMoECausalLM(TINY);
  await seedModelInit(model, seed, 0.3);
  return model;
}

const reject = async (p: Promise<unknown> | (() => unknown)) => {
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    return e as Error;
  }
  throw new Error('expected a rejection');
};

function float64Norm(arrays: ArrayLike<number>[]): number {
  let sum = 0;
  for (const a of arrays) for (let i = 0; i < a.length; i++) sum += a[i] * a[i];
  return Math.sqrt(sum);
}

describe('train/schedule: HF transformers get_*_schedule_with_warmup', () => {
  // total 100 steps, 10 warm-up, lr 1e-3; step k (1-based) uses lr_lambda(k − 1)
  const o = { lr: 1e-3, totalSteps: 100, warmupSteps: 10 };
  const cases: Array<[string, 'constant' | 'linear' | 'cosine', number, number]> = [
    ['warm-up starts at 0', 'linear', 1, 0],
    ['warm-up is linear: lambda(5) = 5/10', 'linear', 6, 0.5e-3],
    ['constant after warm-up', 'constant', 11, 1e-3],
    ['constant during warm-up: lambda(3) = 3/10', 'constant', 4, 0.3e-3],
    ['linear peak at the end of warm-up: (100 − 10) / 90', 'linear', 11, 1e-3],
    ['linear half-way: (100 − 55) / 90', 'linear', 56, 0.5e-3],
    ['linear last step: (100 − 99) / 90', 'linear', 100, 1e-3 / 90],
    ['cosine peak: 0.5·(1 + cos 0)', 'cosine', 11, 1e-3],
    ['cosine half-way: 0.5·(1 + cos(π/2))', 'cosine', 56, 0.5e-3],
    ['cosine at 22 of 90 steps: 0.5·(1 + cos(π·22/90))', 'cosine', 33, 0.5e-3 * (1 + Math.cos(Math.PI * 22 / 90))],
    ['cosine last step: 0.5·(1 + cos(π·89/90))', 'cosine', 100, 0.5e-3 * (1 + Math.cos(Math.PI * 89 / 90))],
  ];
  for (const [label, scheduler, step, expected] of cases) {
    it(`${scheduler}, step ${step}: ${label}`, () => {
      expect(learningRateAt(scheduler, step, o)).to.be.closeTo(expected, 1e-15);
    });
  }

  it('without warm-up the first step runs at the full rate (constant, linear: (100 − 0) / 100, cosine)', () => {
    for (const s of ['constant', 'linear', 'cosine'] as const) expect(learningRateAt(s, 1, { lr: 2, totalSteps: 100 })).to.equal(2);
  });

  it('rejects an unknown schedule and steps before the first', () => {
    expect(() => learningRateAt('exponential' as 'linear', 1, o)).to.throw("`learningRateAt()`: 'scheduler' must be one of 'constant', 'linear', 'cosine' but got \"exponential\"");
    expect(() => learningRateAt('linear', 0, o)).to.throw("`learningRateAt()`: 'step' must be >= 1 but got 0");
  });
});

/** A batch from rows of ids; labels shifted, the positions in `ignored` (row, col) IGNORE_INDEX. */
function batchOf(rows: number[][], ignored: Array<[number, number]> = []): TrainingBatch {
  const b = rows.length;
  const s = rows[0].length - 1;
  const labels = rows.map(r => r.slice(1));
  for (const [i, j] of ignored) labels[i][j] = IGNORE_INDEX;
  return {
    inputIds: tf.tensor2d(rows.map(r => r.slice(0, s)), [b, s], 'int32'),
    labels: tf.tensor2d(labels, [b, s], 'int32'),
    segmentIds: null, positionIds: null,
    targetCount: b * s - ignored.length,
  };
}

describe('train/loop: accumulation, clipping, Adam', () => {
  let model: tfl.LayersModel;
  before(async () => { model = await tinyModel(); });
  after(() => model.dispose());

  it('k micro-batches give the gradient of one batch of all their rows (normalised by the step\'s target count)', () => {
    const rng = new SeededRandom(4);
    const rows = Array.from({ length: 4 }, () => Array.from({ length: 7 }, () => rng.int(VOCAB)));
    // unequal target counts per micro-batch: a mean of micro-batch means would weigh them wrongly
    const ignored: Array<[number, number]> = [[0, 1], [0, 2], [1, 5], [3, 0]];
    const variables = trainableVariables(model);
    const before = tf.memory().numTensors;
    const whole = batchOf(rows, ignored);
    const parts = [batchOf(rows.slice(0, 2), [[0, 1], [0, 2], [1, 5]]), batchOf(rows.slice(2), [[1, 0]])];
    expect(parts[0].targetCount).to.not.equal(parts[1].targetCount);
    const one = stepGradients(model, variables, [whole], [0]);
    const acc = stepGradients(model, variables, parts, [0, 0]);
    expect(acc.loss.dataSync()[0]).to.be.closeTo(one.loss.dataSync()[0], 1e-5);
    let worst = 0;
    one.grads.forEach((g, i) => {
      const a = g.dataSync();
      const b = acc.grads[i].dataSync();
      const scale = Math.max(1e-3, ...Array.from(a).map(Math.abs));
      for (let k = 0; k < a.length; k++) worst = Math.max(worst, Math.abs(a[k] - b[k]) / scale);
    });
    expect(worst).to.be.below(1e-5);
    tf.dispose([one.loss, ...one.grads, acc.loss, ...acc.grads]);
    [whole, ...parts].forEach(disposeBatch);
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('clipByGlobalNorm: the float64 norm of all gradients, scaled by max / (norm + 1e-6) only when above max', async () => {
    const rng = new SeededRandom(9);
    const values = [Float32Array.from({ length: 30 }, () => rng.next() * 4 - 2), Float32Array.from({ length: 7 }, () => rng.next() - 0.5)];
    const grads = [tf.tensor2d(values[0], [5, 6]), tf.tensor1d(values[1])];
    const norm = float64Norm(values);
    const before = tf.memory().numTensors;
    for (const max of [1, 0.25 * norm, 2 * norm, null]) {
      const r = await clipByGlobalNorm(grads, max);
      expect(r.norm).to.be.closeTo(norm, 1e-6 * norm);
      const coefficient = max === null ? 1 : Math.min(1, max / (norm + 1e-6));
      r.grads.forEach((g, i) => {
        const got = g.dataSync();
        for (let k = 0; k < got.length; k++) expect(got[k]).to.be.closeTo(values[i][k] * coefficient, 1e-6);
      });
      if (max !== null && max < norm) expect(float64Norm(r.grads.map(g => g.dataSync()))).to.be.closeTo(max, 1e-5 * max);
      tf.dispose(r.grads);
    }
    expect(tf.memory().numTensors).to.equal(before);
    expect((await reject(clipByGlobalNorm(grads, 0))).message).to.equal("`clipByGlobalNorm()`: 'maxNorm' must be > 0 (or null: no clipping) but got 0");
    tf.dispose(grads);
  });

  it('globalNorm: every element counted once over chunks of gradients (by count, by elements, one past the element bound alone), no leak', async () => {
    const rng = new SeededRandom(10);
    // 70 small ones (chunks of 32 by count), one of 2^20 + 5 elements (past the bound, alone), then two of 3·2^18 (the
    // second starts a chunk: together past the bound), then an empty one. Values ±0.5 and ±1: every square and every
    // partial sum is exact in float32 whatever the order of the additions (wasm's Sum keeps one float32 running total)
    const shapes = [...Array.from({ length: 70 }, (_, i) => [1 + (i % 7), 3]), [(1 << 20) + 5], [3 << 18], [3 << 18], [0]];
    const values = shapes.map(shape => Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) },
        () => [-1, -0.5, 0.5, 1][Math.floor(rng.next() * 4)]));
    const grads = values.map((v, i) => tf.tensor(v, shapes[i]));
    const before = tf.memory().numTensors;
    const norm = globalNorm(grads);
    expect(tf.memory().numTensors).to.equal(before + 1);
    expect((await norm.data())[0]).to.be.closeTo(float64Norm(values), 1e-6 * float64Norm(values));
    norm.dispose();
    const empty = globalNorm([]);
    expect(Array.from(await empty.data())).to.deep.equal([0]);
    tf.dispose([empty, ...grads]);
  });

  it('stepGradientScale: clip_grad_norm_\'s float32 coefficient, 1 without clipping or below max, 0 where the loss or the norm is not finite', async () => {
    const f32 = Math.fround;
    const cases: Array<[number, number, number | null, number]> = [
      [2.5, 5, 1, f32(1 / f32(5 + f32(1e-6)))], [2.5, 37.25, 0.3, f32(f32(0.3) / f32(37.25 + f32(1e-6)))],
      [2.5, 0.5, 1, 1], [2.5, 0, 1, 1], [2.5, 5, null, 1],
      [NaN, 5, 1, 0], [Infinity, 5, null, 0], [2.5, NaN, 1, 0], [2.5, Infinity, null, 0], [2.5, -Infinity, 1, 0],
    ];
    const before = tf.memory().numTensors;
    for (const [lossValue, normValue, max, want] of cases) {
      const [loss, norm] = [tf.scalar(lossValue), tf.scalar(normValue)];
      const scale = stepGradientScale(loss, norm, max);
      expect(scale.dtype).to.equal('float32');
      expect((await scale.data())[0], `loss ${lossValue}, norm ${normValue}, max ${max}`).to.equal(want);
      tf.dispose([loss, norm, scale]);
    }
    expect(tf.memory().numTensors).to.equal(before);
    const one = tf.scalar(1);
    expect(() => stepGradientScale(one, one, 0)).to.throw("`stepGradientScale()`: 'maxNorm' must be > 0 (or null: no clipping) but got 0");
    one.dispose();
  });

  it('Adam.uncountStep: a step skipped on the device (gradScale 0) is not counted; the next step is the same as without it', async () => {
    const run = async (skip: boolean) => {
      const x = tf.variable(tf.tensor1d([0.5, -1.5, 2]));
      const adam = new Adam([x]);
      const steps = skip ? [[1, 0.1], [0, 5], [1, -0.3]] : [[1, 0.1], [1, -0.3]];
      for (const [scale, g] of steps) {
        const [grad, s] = [tf.tensor1d([g, 2 * g, -g]), tf.scalar(scale)];
        adam.apply([grad], 1e-2, s);
        if (scale === 0) adam.uncountStep();
        tf.dispose([grad, s]);
      }
      const result = { step: adam.step, x: Array.from(await x.data()), state: await adam.snapshot() };
      adam.dispose();
      x.dispose();
      return result;
    };
    const [skipped, plain] = [await run(true), await run(false)];
    expect(skipped.step).to.equal(2);
    expect(skipped.x).to.deep.equal(plain.x);
    expect(Array.from(skipped.state.v[0])).to.deep.equal(Array.from(plain.state.v[0]));
    const adam = new Adam([]);
    expect(() => adam.uncountStep()).to.throw("`Adam.uncountStep()`: no step to uncount: apply() has not run");
  });

  it('Adam follows torch.optim.Adam (float64 reference over 3 steps with changing lr) and restores exactly', async () => {
    const x = tf.variable(tf.tensor1d([0.5, -1.5, 2]));
    const adam = new Adam([x]);
    const gradsOf = [[0.1, -0.2, 0.3], [1.5, 0.5, -0.25], [-0.3, 0.01, 0.7]];
    const lrs = [1e-2, 5e-3, 2e-2];
    // torch: m = b1·m + (1−b1)·g; v = b2·v + (1−b2)·g²; p −= lr/(1−b1^t) · m / (√v/√(1−b2^t) + eps)
    const p = [0.5, -1.5, 2];
    const m = [0, 0, 0];
    const v = [0, 0, 0];
    for (let t = 1; t <= 3; t++) {
      for (let i = 0; i < 3; i++) {
        const g = Math.fround(gradsOf[t - 1][i]);
        m[i] = 0.9 * m[i] + 0.1 * g;
        v[i] = 0.999 * v[i] + 0.001 * g * g;
        p[i] -= lrs[t - 1] / (1 - 0.9 ** t) * m[i] / (Math.sqrt(v[i]) / Math.sqrt(1 - 0.999 ** t) + 1e-8);
      }
      const g = tf.tensor1d(gradsOf[t - 1]);
      adam.apply([g], lrs[t - 1]);
      g.dispose();
    }
    Array.from(x.dataSync()).forEach((got, i) => expect(got).to.be.closeTo(p[i], 1e-6));
    const saved = await adam.snapshot();
    expect(saved.step).to.equal(3);
    Array.from(saved.m[0]).forEach((got, i) => expect(got).to.be.closeTo(m[i], 1e-7));
    const copy = new Adam([x]);
    copy.restore(saved);
    expect(await copy.snapshot()).to.deep.equal(saved);
    expect(() => copy.restore({ step: 1, m: [], v: [] })).to.throw('`Adam.restore()`: the snapshot holds moments of 0 and 0 variables but the optimizer has 1');
    expect(() => copy.restore({ step: 1, m: [new Float32Array(2)], v: [new Float32Array(3)] }))
        .to.throw(`\`Adam.restore()\`: 'm[0]' must hold 3 values (variable '${x.name}' [3]) but holds 2`);
    expect(() => copy.apply([], 1)).to.throw("`Adam.apply()`: 'grads' must hold one gradient per variable (1) but holds 0");
    adam.dispose();
    copy.dispose();
    x.dispose();
  });
});

describe('train/loop: the loop with schedules, accumulation, clipping, eval and an exact resume', () => {
  const options = {
    steps: 8, lr: 2e-2, batch: 2, seq: 8, seed: 3, lrScheduler: 'cosine' as const, warmupSteps: 2, gradAccum: 2, maxGradNorm: 0.5,
  };

  it('reports each step\'s scheduled lr and its pre-clip gradient norm (float64 norm of the step\'s gradients)', async () => {
    const model = await tinyModel(2);
    const reports: StepReport[] = [];
    // the first step's gradients, before any update: the same micro-batches and dropout seeds as the loop
    const source = windowBatches(PATTERN, 2, 8, 3);
    const batches = [source.next(), source.next()];
    const first = stepGradients(model, trainableVariables(model), batches, [microBatchSeed(3, 0), microBatchSeed(3, 1)]);
    const expectedNorm = float64Norm(first.grads.map(g => g.dataSync()));
    tf.dispose([first.loss, ...first.grads]);
    batches.forEach(disposeBatch);
    const before = tf.memory().numTensors;
    await trainLoop(model, PATTERN, { ...options, steps: 3, warmupSteps: 1, onStep: r => reports.push(r) });
    expect(tf.memory().numTensors).to.equal(before);
    expect(reports.map(r => r.lr)).to.deep.equal([1, 2, 3].map(s => learningRateAt('cosine', s, { lr: 2e-2, totalSteps: 3, warmupSteps: 1 })));
    expect(reports[0].gradNorm).to.be.closeTo(expectedNorm, 1e-5 * expectedNorm);
    expect(reports[0].gradNorm, 'the norm reported is before clipping').to.be.above(0.5);
    expect(reports.map(r => r.tokens)).to.deep.equal([32, 32, 32]);
    model.dispose();
  });

  it('a run resumed from its saved state gives the uninterrupted run\'s losses bit for bit', async () => {
    const whole = await tinyModel(5);
    const states: TrainState[] = [];
    const weightsAt: Float32Array[][] = [];
    const evals: number[] = [];
    let evalCalls = 0;
    const full = await trainLoop(whole, PATTERN, {
      ...options, saveEvery: 4, evalEvery: 3, evaluate: () => ++evalCalls, onEval: r => evals.push(r.step),
      onSave: async s => {
        states.push(s);
        weightsAt.push(trainableVariables(whole).map(x => Float32Array.from(x.dataSync())));
      },
    });
    expect(states.map(s => s.step)).to.deep.equal([4, 8]);
    expect(evals).to.deep.equal([3, 6]);
    expect(full.evalLosses).to.deep.equal([{ step: 3, loss: 1 }, { step: 6, loss: 2 }]);
    expect(states[0]).to.include({ microBatches: 8 });
    expect(states[0].losses).to.deep.equal(full.losses.slice(0, 4));

    const resumed = await tinyModel(5);
    trainableVariables(resumed).forEach((x, i) => x.assign(tf.tensor(weightsAt[0][i], x.shape)));
    const before = tf.memory().numTensors;
    const rest = await trainLoop(resumed, PATTERN, { ...options, resume: states[0], evalEvery: 3, evaluate: () => 2 });
    expect(tf.memory().numTensors).to.equal(before);
    expect(rest.step).to.equal(8);
    expect(rest.losses).to.deep.equal(full.losses.slice(4));
    expect(rest.evalLosses).to.deep.equal([{ step: 6, loss: 2 }]);
    trainableVariables(resumed).forEach((x, i) => expect(Array.from(x.dataSync())).to.deep.equal(Array.from(weightsAt[1][i])));
    whole.dispose();
    resumed.dispose();
  });

  it('a run stopped between checkpoints saves its state where it stopped, and resumes from there exactly', async () => {
    const whole = await tinyModel(6);
    const full = await trainLoop(whole, PATTERN, { ...options, steps: 5 });
    const stopped = await tinyModel(6);
    const saved: TrainState[] = [];
    let weights: Float32Array[] = [];
    let calls = 0;
    const r = await trainLoop(stopped, PATTERN, {
      ...options, steps: 5, saveEvery: 2, shouldStop: () => ++calls > 3,
      onSave: async s => {
        saved.push(s);
        weights = trainableVariables(stopped).map(x => Float32Array.from(x.dataSync()));
      },
    });
    expect(r).to.include({ step: 3, stopped: true });
    expect(saved.map(s => s.step)).to.deep.equal([2, 3]);
    trainableVariables(stopped).forEach((x, i) => x.assign(tf.tensor(weights[i], x.shape)));
    const rest = await trainLoop(stopped, PATTERN, { ...options, steps: 5, resume: saved[1] });
    expect([...r.losses, ...rest.losses]).to.deep.equal(full.losses);
    whole.dispose();
    stopped.dispose();
  });

  it('takes a BatchSource: the micro-batches it gives, with their masks', async () => {
    const model = await tinyModel();
    const given: TrainingBatch[] = [];
    const source: BatchSource = {
      next() {
        const b = batchOf([[1, 2, 3, 4, 5], [6, 3, 7, 1, 2]], [[0, 0]]);
        given.push(b);
        return b;
      },
    };
    const reports: StepReport[] = [];
    const before = tf.memory().numTensors;
    await trainLoop(model, source, { steps: 2, lr: 1e-2, batch: 2, seq: 4, seed: 1, gradAccum: 3, onStep: r => reports.push(r) });
    expect(tf.memory().numTensors, 'the loop disposes the batches').to.equal(before);
    expect(given).to.have.length(6);
    expect(given.every(b => b.inputIds.isDisposed)).to.equal(true);
    expect(reports.map(r => r.tokens)).to.deep.equal([21, 21]);
    model.dispose();
  });

  it('rejects bad options and a step without labels, and leaves no tensor', async () => {
    const model = await tinyModel();
    const base = { steps: 2, lr: 1e-2, batch: 1, seq: 4, seed: 1 };
    const state: TrainState = { step: 1, microBatches: 1, losses: [1], evalLosses: [], optimizer: { step: 2, m: [], v: [] }, seconds: 0 };
    const before = tf.memory().numTensors;
    const cases: Array<[Promise<unknown>, string]> = [
      [trainLoop(model, PATTERN, { ...base, startStep: 1, resume: state }), "`trainLoop()`: give 'startStep' (a fresh optimizer) or 'resume' (a saved state), not both"],
      [trainLoop(model, PATTERN, { ...base, lrScheduler: 'step' as 'linear' }), "`trainLoop()`: 'lrScheduler' must be one of 'constant', 'linear', 'cosine' but got \"step\""],
      [trainLoop(model, PATTERN, { ...base, maxGradNorm: -1 }), "`trainLoop()`: 'maxGradNorm' must be a number > 0 (or null: no clipping) but got -1"],
      [trainLoop(model, PATTERN, { ...base, evalEvery: 2 }), "`trainLoop()`: 'evalEvery' needs 'evaluate'"],
      [trainLoop(model, PATTERN, { ...base, saveEvery: 1 }), "`trainLoop()`: 'saveEvery' needs 'onSave'"],
      [trainLoop(model, PATTERN, { ...base, resume: state }), 'the saved state is inconsistent: Adam took 2 steps but the run 1'],
      [trainLoop(model, { next: () => batchOf([[1, 2, 3]], [[0, 0], [0, 1]]) }, base), 'step 1 has no label to predict in its 1 micro-batch(es)'],
    ];
    for (const [p, message] of cases) expect((await reject(p)).message).to.equal(message);
    expect(tf.memory().numTensors).to.equal(before);
    const empty = batchOf([[1, 2]], [[0, 0]]);
    expect(() => stepGradients(model, trainableVariables(model), [empty], [0]))
        .to.throw("`stepGradients()`: the step's micro-batches have no label to predict (every targetCount is 0)");
    disposeBatch(empty);
    expect(await reject(trainLoop(model, { next: () => batchOf([[1, 2, 3]], [[0, 0], [0, 1]]) }, base))).to.be.instanceOf(TrainError);
    model.dispose();
  });

  it('microBatchSeed gives different seeds for neighbouring micro-batches and runs, the same for the same pair', () => {
    const seeds = new Set([0, 1, 2, 3].flatMap(i => [microBatchSeed(1, i), microBatchSeed(2, i)]));
    expect(seeds.size).to.equal(8);
    expect(microBatchSeed(7, 12)).to.equal(microBatchSeed(7, 12));
  });
});
