/**
 * The uniform arena (src/backends/webgpu/uniform_arena.ts): every program's uniforms placed in a
 * few long-lived buffers, written once per submit. Checked by values that only the uniforms carry
 * (clipByValue's bounds, a different pair per dispatch) against float32 JS, over more dispatches
 * than a chunk holds in one submit and again after it (chunks reused), bit for bit against tfjs's
 * own makeUniforms (the flag off), and by its writeBuffer count. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { installUniformArena, UNIFORM_ARENA_FLAG } from '../../../src/backends/webgpu/uniform_arena.js';

const BATCH_FLAG = 'WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE';
/** more than a 64 KiB chunk holds at 256-byte alignment (256) */
const DISPATCHES = 600;

/** clip(x, −(i+1)/8, (i+1)/16 + 0.01) for every i, recorded with no submit between, and read. */
async function clips(x: tf.Tensor1D): Promise<Float32Array[]> {
  const outs = Array.from({ length: DISPATCHES }, (_, i) => tf.clipByValue(x, -(i + 1) / 8, (i + 1) / 16 + 0.01));
  const values = await Promise.all(outs.map(o => o.data() as Promise<Float32Array>));
  tf.dispose(outs);
  return values;
}

/** What the shader computes, in float32: the bounds as the uniforms hold them. */
function expected(x: Float32Array, i: number): Float32Array {
  const lo = Math.fround(-(i + 1) / 8);
  const hi = Math.fround((i + 1) / 16 + 0.01);
  return x.map(v => Math.min(Math.max(v, lo), hi));
}

/** The writeBuffer calls on the backend's queue while `fn` runs. */
async function countWrites<T>(fn: () => Promise<T>): Promise<{ value: T; writes: number }> {
  const queue = (tf.backend() as unknown as { queue: GPUQueue }).queue;
  const write = queue.writeBuffer;
  let writes = 0;
  queue.writeBuffer = function (this: GPUQueue, ...args: Parameters<GPUQueue['writeBuffer']>) {
    writes++;
    return write.apply(this, args);
  } as GPUQueue['writeBuffer'];
  try {
    return { value: await fn(), writes };
  } finally {
    queue.writeBuffer = write;
  }
}

describe('webgpu uniform arena', () => {
  let batch: number;
  before(() => {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    expect(installUniformArena(tf.backend())).to.equal(true);
    batch = tf.env().getNumber(BATCH_FLAG);
    tf.env().set(BATCH_FLAG, 2 * DISPATCHES);  // one submit for all of them: 3 chunks in one command buffer
  });
  after(() => {
    tf.env().set(BATCH_FLAG, batch);
    tf.env().set(UNIFORM_ARENA_FLAG, true);
  });

  const input = Float32Array.from({ length: 97 }, (_, j) => Math.fround((j - 48) * 1.37));

  it('gives each dispatch its own uniforms across chunks, and again once the chunks are reused', async () => {
    const x = tf.tensor1d(input);
    const before = tf.memory().numTensors;
    for (let round = 0; round < 2; round++) {
      const { value, writes } = await countWrites(() => clips(x));
      value.forEach((v, i) => expect(Buffer.from(v.buffer).equals(Buffer.from(expected(input, i).buffer)), `dispatch ${i}, round ${round}`).to.equal(true));
      // a chunk's bytes go out once (3 chunks) plus the reads' own submits, not once per dispatch
      expect(writes).to.be.at.most(Math.ceil(DISPATCHES / 256) + 2);
    }
    expect(tf.memory().numTensors).to.equal(before);
    x.dispose();
  });

  it('writes the bytes tfjs-webgpu writes: the same results with the flag off, one writeBuffer a dispatch', async () => {
    const x = tf.tensor1d(input);
    const arena = await clips(x);
    tf.env().set(UNIFORM_ARENA_FLAG, false);
    const { value: own, writes } = await countWrites(() => clips(x));
    tf.env().set(UNIFORM_ARENA_FLAG, true);
    expect(writes).to.be.at.least(DISPATCHES);
    own.forEach((v, i) => expect(Buffer.from(v.buffer).equals(Buffer.from(arena[i].buffer)), `dispatch ${i}`).to.equal(true));
    x.dispose();
  });

  it("still writes its chunks after a wrapper put on the backend's submitQueue is deleted again", async () => {
    const backend = tf.backend() as unknown as { submitQueue(): void };
    const submit = backend.submitQueue;
    let submits = 0;
    backend.submitQueue = function (this: unknown) { submits++; return submit.call(this); };
    const x = tf.tensor1d(input);
    try {
      await clips(x);
    } finally {
      delete (backend as Partial<typeof backend>).submitQueue;
    }
    expect(submits).to.be.greaterThan(0);
    const value = await clips(x);
    value.forEach((v, i) => expect(Buffer.from(v.buffer).equals(Buffer.from(expected(input, i).buffer)), `dispatch ${i}`).to.equal(true));
    x.dispose();
  });

  it('is installed once per backend and leaves an object without the backend methods alone', () => {
    expect(installUniformArena(tf.backend())).to.equal(true);
    expect(installUniformArena({})).to.equal(false);
    expect(installUniformArena(null)).to.equal(false);
  });
});
