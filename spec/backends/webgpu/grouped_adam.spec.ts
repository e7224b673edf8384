/**
 * The grouped in-place Adam on webgpu (src/backends/webgpu/grouped_adam.ts): K variables per
 * dispatch, writing the variables' and moments' own buffers. Checked bit for bit against the
 * per-variable MoEAdamUpdate kernel (ADAM_GROUPED_FLAG false; that kernel is checked against torch
 * in adam_update.spec.ts), for aliasing (a clone keeps its value), stale cached reads, leaks and
 * buffer growth, and by its dispatch count. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { StepCounter } from '../../../bench/e2e/step_profile.js';
import { releaseFreeWebGPUBuffers } from '../../../src/backends/webgpu/buffer_pool.js';
import { GROUPED_ADAM_PROGRAM, groupedAdamCapacity, webgpuGroupedAdamUpdate } from '../../../src/backends/webgpu/grouped_adam.js';
import { SeededRandom } from '../../../src/data/random.js';
import { OpArgumentError } from '../../../src/ops/validate.js';
import { ADAM_GROUPED_FLAG } from '../../../src/train/adam_update.js';
import { Adam } from '../../../src/train/optimizer.js';
import { withTinyMoETraining } from '../../helpers/tiny_moe_adam.js';
import { allowingNoTimestampWarning } from './helpers.js';

const device = () => (tf.backend() as unknown as { device: GPUDevice }).device;

/** Runs `fn` with Adam per variable (the MoEAdamUpdate kernel), then grouped again. */
async function perVariable<T>(fn: () => Promise<T>): Promise<T> {
  tf.env().set(ADAM_GROUPED_FLAG, false);
  try {
    return await fn();
  } finally {
    tf.env().set(ADAM_GROUPED_FLAG, true);
  }
}

/** The float32 values as bytes: equal means bit for bit. */
async function bytesOf(t: tf.Tensor): Promise<Buffer> {
  const values = await t.data() as Float32Array;
  return Buffer.from(values.buffer, values.byteOffset, values.byteLength);
}

function randomValues(rng: SeededRandom, n: number, scale: number): Float32Array {
  return Float32Array.from({ length: n }, () => (rng.next() * 2 - 1) * scale);
}

interface Run {
  params: Buffer[];
  m: Buffer[];
  v: Buffer[];
  counts: Record<string, number>;
}

/**
 * `steps` Adam steps of fresh variables of `sizes` with seeded gradients; reads the state after each
 * step, saves and restores it before step 2. `scales`: step t's gradScale (a scalar tensor).
 */
async function train(sizes: number[], steps: number, seed: number, scales?: number[]): Promise<Run> {
  const rng = new SeededRandom(seed);
  const variables = sizes.map((n, i) => tf.tidy(() => tf.variable(tf.tensor1d(randomValues(rng, n, 1)), true, `grouped_adam_${seed}_${i}`)));
  let adam = new Adam(variables);
  const counter = new StepCounter();
  for (let t = 0; t < steps; t++) {
    if (t === 1) {
      // a checkpoint's round trip: the restored moments start on the cpu (uploaded by the step)
      const saved = await adam.snapshot();
      adam.dispose();
      adam = new Adam(variables);
      adam.restore(saved);
    }
    const grads = sizes.map(n => tf.tensor1d(randomValues(rng, n, 2)));
    const scale = scales === undefined ? undefined : tf.scalar(scales[t]);
    counter.install();
    try {
      adam.apply(grads, [1e-2, 3e-2, 5e-3][t % 3], scale);
    } finally {
      counter.uninstall();
    }
    tf.dispose([...grads, ...(scale !== undefined ? [scale] : [])]);
    // a read caches the values on the cpu (variables, moments): the next in-place step must not leave them stale
    await Promise.all(variables.map(x => x.data()));
    await adam.snapshot();
  }
  const snapshot = await adam.snapshot();
  const run = {
    params: await Promise.all(variables.map(bytesOf)),
    m: snapshot.m.map(x => Buffer.from(x.buffer)),
    v: snapshot.v.map(x => Buffer.from(x.buffer)),
    counts: counter.programCounts,
  };
  adam.dispose();
  tf.dispose(variables);
  return run;
}

describe('webgpu: Adam over K variables per dispatch, in place', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  it('K from the storage buffers per stage (3 per variable), within the bind group, at most 64', () => {
    expect(groupedAdamCapacity({ maxStorageBuffersPerShaderStage: 16, maxBindingsPerBindGroup: 1000 })).to.equal(5);
    expect(groupedAdamCapacity({ maxStorageBuffersPerShaderStage: 8, maxBindingsPerBindGroup: 1000 })).to.equal(2);
    expect(groupedAdamCapacity({ maxStorageBuffersPerShaderStage: 1000, maxBindingsPerBindGroup: 31 })).to.equal(10);
    expect(groupedAdamCapacity({ maxStorageBuffersPerShaderStage: 1 << 20, maxBindingsPerBindGroup: 1 << 20 })).to.equal(64);
    // with a gradScale, one storage buffer and one binding for it
    expect(groupedAdamCapacity({ maxStorageBuffersPerShaderStage: 16, maxBindingsPerBindGroup: 1000 }, true)).to.equal(5);
    expect(groupedAdamCapacity({ maxStorageBuffersPerShaderStage: 12, maxBindingsPerBindGroup: 1000 }, true)).to.equal(3);
    expect(groupedAdamCapacity({ maxStorageBuffersPerShaderStage: 1000, maxBindingsPerBindGroup: 31 }, true)).to.equal(9);
  });

  it('a gradScale (clipping\'s coefficient, 0: a skipped step): bit for bit the per-variable kernel\'s; a 0 step changes no value', async () => {
    const k = groupedAdamCapacity(device().limits, true);
    const sizes = [1, 3, 63, 64, 65, 130, 35, 1000, 4097, 1, 17, 200];
    while (sizes.length < 2 * k + 1) sizes.push(2 * sizes.length + 1);
    const scales = [0.37, 0, 1];
    const before = tf.memory().numTensors;
    const grouped = await train(sizes, 3, 12, scales);
    const single = await perVariable(() => train(sizes, 3, 12, scales));
    expect(grouped.counts, 'grouped dispatches only').to.deep.equal({ [GROUPED_ADAM_PROGRAM]: 3 * Math.ceil(sizes.length / k) });
    expect(single.counts).to.deep.equal({ AdamUpdateProgram: 3 * 2 * sizes.length });
    // the first step alone: the 0 step after it leaves every value where it was
    const first = await train(sizes, 1, 12, scales);
    const firstTwo = await train(sizes, 2, 12, scales);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    sizes.forEach((_, i) => {
      for (const part of ['params', 'm', 'v'] as const) {
        expect(grouped[part][i].equals(single[part][i]), `${part} ${i} (${sizes[i]} values)`).to.equal(true);
        expect(firstTwo[part][i].equals(first[part][i]), `${part} ${i} after the 0 step`).to.equal(true);
      }
    });
    const unscaled = await train(sizes, 1, 12);
    expect(unscaled.params[8].equals(first.params[8]), 'the 0.37 scale changed the step').to.equal(false);
  });

  it('mixed sizes over several groups, 3 steps with a save and restore: values and moments bit for bit the per-variable kernel\'s, ceil(n / K) dispatches a step', async () => {
    // 1, odd, one workgroup ± 1, several workgroups; more variables than K
    const k = groupedAdamCapacity(device().limits);
    expect(k, 'K on this device').to.be.at.least(1);
    const sizes = [1, 3, 63, 64, 65, 130, 35, 1000, 4097, 1, 17, 200];
    const count = Math.max(sizes.length, 2 * k + 1);
    while (sizes.length < count) sizes.push(2 * sizes.length + 1);
    const before = tf.memory().numTensors;
    const grouped = await train(sizes, 3, 11);
    const single = await perVariable(() => train(sizes, 3, 11));
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    expect(grouped.counts, 'grouped dispatches only').to.deep.equal({ [GROUPED_ADAM_PROGRAM]: 3 * Math.ceil(sizes.length / k) });
    expect(single.counts).to.deep.equal({ AdamUpdateProgram: 3 * 2 * sizes.length });
    sizes.forEach((_, i) => {
      expect(grouped.params[i].equals(single.params[i]), `param ${i} (${sizes[i]} values)`).to.equal(true);
      expect(grouped.m[i].equals(single.m[i]), `m ${i}`).to.equal(true);
      expect(grouped.v[i].equals(single.v[i]), `v ${i}`).to.equal(true);
    });
    // the update did something
    expect(grouped.m[8].equals(Buffer.alloc(grouped.m[8].length)), 'm moved').to.equal(false);
  });

  it('a variable over 65535 workgroups (a 2-D dispatch) is bit for bit the per-variable kernel\'s', async function () {
    this.timeout(60_000);
    const size = 65535 * 64 + 129;
    const run = async () => {
      const x = tf.tidy(() => tf.variable(tf.randomUniform([size], -1, 1, 'float32', 5)));
      const small = tf.tidy(() => tf.variable(tf.randomUniform([7], -1, 1, 'float32', 6)));
      const adam = new Adam([x, small]);
      for (let t = 0; t < 2; t++) {
        const grads = [tf.randomUniform([size], -2, 2, 'float32', 7 + t), tf.randomUniform([7], -2, 2, 'float32', 9 + t)];
        adam.apply(grads, 1e-2);
        tf.dispose(grads);
      }
      const snapshot = await adam.snapshot();
      const out = { x: await bytesOf(x), small: await bytesOf(small), v: Buffer.from(snapshot.v[0].buffer) };
      adam.dispose();
      tf.dispose([x, small]);
      return out;
    };
    const grouped = await run();
    const single = await perVariable(run);
    // tfjs's pool keeps freed buffers for good: on Mesa they are host memory that later specs' RSS bounds would count
    releaseFreeWebGPUBuffers();
    expect(grouped.x.equals(single.x), 'the large variable').to.equal(true);
    expect(grouped.v.equals(single.v), 'its v').to.equal(true);
    expect(grouped.small.equals(single.small), 'the small one after it').to.equal(true);
  });

  it('a variable shared with a clone (or tf.variable\'s tensor) is not written in place: the clone keeps its value', async () => {
    const before = tf.memory().numTensors;
    const initial = tf.tensor1d([0.5, -1, 2]);
    const x = tf.variable(initial);      // shares initial's buffer
    const y = tf.tidy(() => tf.variable(tf.tensor1d([1, 2, 3, 4])));
    const clone = tf.clone(y);           // shares y's buffer
    const adam = new Adam([x, y]);
    const counter = new StepCounter();
    const step = () => {
      const grads = [tf.tensor1d([1, 1, 1]), tf.tensor1d([1, -1, 1, -1])];
      counter.install();
      try {
        adam.apply(grads, 0.1);
      } finally {
        counter.uninstall();
      }
      tf.dispose(grads);
    };
    step();
    expect(counter.programCounts, 'step 1: both per variable').to.deep.equal({ AdamUpdateProgram: 4 });
    expect(Array.from(await initial.data())).to.deep.equal([0.5, -1, 2]);
    expect(Array.from(await clone.data())).to.deep.equal([1, 2, 3, 4]);
    const afterFirst = Array.from(await y.data());
    expect(afterFirst[0], 'y moved').to.be.closeTo(0.9, 1e-6);
    counter.reset();
    step();
    expect(counter.programCounts, 'step 2: their own buffers now, in place').to.deep.equal({ [GROUPED_ADAM_PROGRAM]: 1 });
    expect(Array.from(await clone.data()), 'the clone still').to.deep.equal([1, 2, 3, 4]);
    expect(Array.from(await initial.data())).to.deep.equal([0.5, -1, 2]);
    expect((await y.data())[0], 'y moved again').to.be.below(afterFirst[0] - 0.05);
    adam.dispose();
    tf.dispose([initial, x, y, clone]);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('a gradient that is a variable (a buffer written in the step) sends the step per variable, in order: the per-variable results', async () => {
    const run = async () => {
      const a = tf.tidy(() => tf.variable(tf.tensor1d([0.5, -1, 2])));
      const b = tf.tidy(() => tf.variable(tf.tensor1d([3, -2, 1])));
      const c = tf.tidy(() => tf.variable(tf.tensor1d([1, 1, -1])));
      const adam = new Adam([a, b, c]);
      const counter = new StepCounter();
      const gb = tf.tensor1d([1, 2, 3]);
      counter.install();
      try {
        adam.apply([b, gb, b], 0.1);   // a's and c's gradient is b itself, which the step writes (c reads b's new value)
      } finally {
        counter.uninstall();
      }
      gb.dispose();
      const out = { a: await bytesOf(a), b: await bytesOf(b), c: await bytesOf(c), counts: counter.programCounts };
      adam.dispose();
      tf.dispose([a, b, c]);
      return out;
    };
    const grouped = await run();
    const single = await perVariable(run);
    expect(grouped.counts).to.deep.equal({ AdamUpdateProgram: 6 });
    expect(grouped.a.equals(single.a), 'a (read b before b\'s update)').to.equal(true);
    expect(grouped.b.equals(single.b)).to.equal(true);
    expect(grouped.c.equals(single.c), 'c (read b after it)').to.equal(true);
  });

  it('no tensors left and no GPU buffer growth across steps; a bad gradient still gets adamUpdate\'s error', async () => {
    const rng = new SeededRandom(2);
    const sizes = [5, 300, 64, 1, 77, 9, 1024];
    const variables = sizes.map(n => tf.tidy(() => tf.variable(tf.tensor1d(randomValues(rng, n, 1)))));
    const adam = new Adam(variables);
    const step = async () => {
      const grads = sizes.map(n => tf.tensor1d(randomValues(rng, n, 1)));
      adam.apply(grads, 1e-2);
      tf.dispose(grads);
      await variables[0].data();   // submits the step
    };
    await step();
    await step();
    const tensors = tf.memory().numTensors;
    const allocated = (tf.memory() as tf.MemoryInfo & { numBytesAllocatedInGPU: number }).numBytesAllocatedInGPU;
    for (let i = 0; i < 4; i++) await step();
    expect(tf.memory().numTensors, 'tensors').to.equal(tensors);
    expect((tf.memory() as tf.MemoryInfo & { numBytesAllocatedInGPU: number }).numBytesAllocatedInGPU, 'GPU bytes allocated').to.equal(allocated);
    const grads = sizes.map((n, i) => tf.zeros([i === 3 ? 2 : n]));
    expect(() => adam.apply(grads, 1e-2)).to.throw(OpArgumentError, /'grad' must have the shape of 'param' \[1\] but has \[2\]/);
    tf.dispose(grads);
    adam.dispose();
    tf.dispose(variables);
    expect(tf.memory().numTensors, 'after dispose').to.equal(tensors - 2 * sizes.length);
  });

  it('LoRA training of a tiny MoE model: the per-variable kernel\'s losses and parameters exactly, ceil(n / K) dispatches a step', async () => {
    await withTinyMoETraining(async ({ variables, run }) => {
      // step 1 goes per variable (assign shares the first values' buffers), the next ones in place
      const before = tf.memory().numTensors;
      const grouped = await run(bytesOf);
      const single = await perVariable(() => run(bytesOf));
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
      expect(Math.abs(grouped.losses[3] - grouped.losses[0]), 'training moved the loss').to.be.above(1e-4);
      expect(grouped.losses, 'losses').to.deep.equal(single.losses);
      grouped.params.forEach((p, i) => expect(p.equals(single.params[i]), `variable ${variables[i].name}`).to.equal(true));
      const n = variables.length;
      expect(grouped.counter.programCounts).to.deep.equal(
          { AdamUpdateProgram: 2 * n, [GROUPED_ADAM_PROGRAM]: 3 * Math.ceil(n / groupedAdamCapacity(device().limits)) });
      expect(single.counter.programCounts).to.deep.equal({ AdamUpdateProgram: 2 * n * 4 });
    });
  });

  it('inside tf.time: one timer per grouped dispatch (its own pass, as tfjs times its programs), the same values', async () => {
    const sizes = [3, 130, 64, 1, 65, 9, 300];
    const run = async () => {
      const rng = new SeededRandom(4);
      const variables = sizes.map(n => tf.tidy(() => tf.variable(tf.tensor1d(randomValues(rng, n, 1)))));
      const grads = sizes.map(n => tf.tensor1d(randomValues(rng, n, 2)));
      const adam = new Adam(variables);
      const timing = await tf.time(() => adam.apply(grads, 1e-2)) as unknown as { getExtraProfileInfo(): string };
      const params = await Promise.all(variables.map(bytesOf));
      adam.dispose();
      tf.dispose([...variables, ...grads]);
      return { params, names: timing.getExtraProfileInfo().split(', ').map(entry => entry.split(':')[0]) };
    };
    const { grouped, single } = await allowingNoTimestampWarning(async () => ({ grouped: await run(), single: await perVariable(run) }));
    const groups = Math.ceil(sizes.length / groupedAdamCapacity(device().limits));
    expect(grouped.names).to.deep.equal(new Array<string>(groups).fill(GROUPED_ADAM_PROGRAM));
    expect(single.names).to.deep.equal(new Array<string>(2 * sizes.length).fill('AdamUpdateProgram'));
    grouped.params.forEach((p, i) => expect(p.equals(single.params[i]), `param ${i}`).to.equal(true));
  });

  it('refuses clearly where the backend lacks the internals it records into', () => {
    const backend = tf.backend() as unknown as { commandQueueOwnedIds: unknown };
    const own = backend.commandQueueOwnedIds;
    backend.commandQueueOwnedIds = undefined;
    try {
      expect(() => webgpuGroupedAdamUpdate([], { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, correction2Sqrt: 1, stepSize: 1 }, () => {}))
          .to.throw(OpArgumentError, /groupedAdamUpdate\(\)`: needs tfjs-backend-webgpu 4\.22's WebGPUBackend internals .* MOE_ADAM_GROUPED to false/);
    } finally {
      backend.commandQueueOwnedIds = own;
    }
  });
});
