/**
 * tfjs-webgpu's buffer pool (src/backends/webgpu/buffer_pool.ts): its stats add up to tf.memory();
 * a load leaves nothing free (weights are written into their own buffers); a pool bound destroys
 * free buffers before creating one, keeps exact-size reuse, and keeps the peak allocated within
 * the peak in use plus the bound; releaseFreeWebGPUBuffers leaves allocated = in use and the pool
 * still working. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import {
  limitWebGPUBufferPool, releaseFreeWebGPUBuffers, webgpuBufferPoolStats,
} from '../../../src/backends/webgpu/buffer_pool.js';
import { loadHFCheckpoint } from '../../../src/io/hf_checkpoint.js';
import { OpArgumentError } from '../../../src/ops/validate.js';
import { fixtureDir } from '../../io/checkpoint_helpers.js';

type GPUMemory = tf.MemoryInfo & { numBytesInGPU: number; numBytesAllocatedInGPU: number };
const gpu = () => tf.memory() as GPUMemory;
const freeTotal = () => Object.values(webgpuBufferPoolStats().freeBytes).reduce((a, b) => a + b, 0);

/** A float32 tensor of n elements computed on the device (its own storage buffer), read once so the queue is submitted. */
async function onGPU(n: number): Promise<tf.Tensor> {
  const t = tf.fill([n], 1.5);
  await t.data();
  return t;
}

describe('webgpu: the buffer pool', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });
  beforeEach(() => { releaseFreeWebGPUBuffers(); });

  it('stats add up to tf.memory(); release leaves allocated = in use, and the pool still reuses and releases', async () => {
    const a = await onGPU(1000);
    const b = await onGPU(3000);
    tf.dispose([a, b]);
    const s = webgpuBufferPoolStats();
    expect(s.usedBytes).to.equal(gpu().numBytesInGPU);
    expect(s.allocatedBytes).to.equal(gpu().numBytesAllocatedInGPU);
    expect(s.allocatedBytes - s.usedBytes).to.equal(freeTotal());
    expect(s.freeBytes.storage).to.be.at.least(16000);
    expect(s.freeKeys).to.be.at.least(2);
    const free = freeTotal();
    expect(releaseFreeWebGPUBuffers()).to.equal(free);
    expect(gpu().numBytesAllocatedInGPU).to.equal(gpu().numBytesInGPU);
    expect(webgpuBufferPoolStats()).to.deep.include({ freeBuffers: 0, freeKeys: 0 });
    // the emptied free lists still take buffers back and hand them out again
    const used = gpu().numBytesInGPU;
    const c = await onGPU(1000);
    expect(gpu().numBytesInGPU).to.equal(used + 4000);
    c.dispose();
    expect(gpu().numBytesInGPU).to.equal(used);
    expect(webgpuBufferPoolStats().freeBytes.storage).to.equal(4000);
    const allocated = gpu().numBytesAllocatedInGPU;
    const d = await onGPU(1000);
    expect(gpu().numBytesAllocatedInGPU, 'reused, not created').to.equal(allocated);
    d.dispose();
  });

  it('a load writes every weight into its own buffer: nothing is left free', async () => {
    for (const expertDtype of ['stored', 'nf4'] as const) {
      releaseFreeWebGPUBuffers();
      const model = await loadHFCheckpoint(fixtureDir('qwen3_moe'), { expertDtype });
      expect(freeTotal(), expertDtype).to.equal(0);
      expect(gpu().numBytesAllocatedInGPU, expertDtype).to.equal(gpu().numBytesInGPU);
      model.dispose();
    }
  });

  it('a bound destroys free buffers before creating one, keeps exact-size reuse, and holds peak allocated <= peak in use + bound', async () => {
    const before = tf.memory().numTensors;
    const limit = limitWebGPUBufferPool(0);
    try {
      const a = await onGPU(5000);
      a.dispose();
      // the tensor's buffer, and the staging buffer its read mapped (tfjs-webgpu pools those too)
      expect(webgpuBufferPoolStats().freeBytes).to.deep.include({ storage: 20000, mapRead: 20000 });
      const again = await onGPU(5000);   // the same sizes: the free buffers are reused
      expect(limit.destroyedBytes()).to.equal(0);
      again.dispose();
      const free = freeTotal();
      const other = await onGPU(7000);   // a new size: every free buffer goes first
      expect(limit.destroyedBytes()).to.equal(free);
      // what is free now is only what `other` itself used and gave back: its read's staging buffer and uniforms
      expect(webgpuBufferPoolStats().freeBytes).to.deep.include({ storage: 0, mapRead: 28000 });
      other.dispose();
    } finally {
      limit.restore();
    }
    // temporaries of many sizes, with a bound of 64 KiB and without one
    const churn = async () => {
      for (let i = 1; i <= 12; i++) {
        const y = tf.tidy(() => tf.sum(tf.mul(tf.fill([i * 1000 + 7], 2), tf.fill([i * 1000 + 7], 3))));
        expect(await y.data()).to.deep.equal(new Float32Array([6 * (i * 1000 + 7)]));
        y.dispose();
      }
    };
    releaseFreeWebGPUBuffers();
    const bound = 64 * 1024;
    const bounded = limitWebGPUBufferPool(bound);
    await churn();
    bounded.restore();
    expect(bounded.peakAllocatedBytes()).to.be.at.most(bounded.peakUsedBytes() + bound);
    expect(bounded.destroyedBytes()).to.be.greaterThan(0);
    releaseFreeWebGPUBuffers();
    const unbounded = limitWebGPUBufferPool(Infinity);
    await churn();
    unbounded.restore();
    expect(unbounded.destroyedBytes()).to.equal(0);
    expect(unbounded.peakUsedBytes()).to.equal(bounded.peakUsedBytes());
    expect(unbounded.peakAllocatedBytes(), 'the bound is not vacuous').to.be.greaterThan(bounded.peakUsedBytes() + bound);
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('restore puts the backend method back; one limit at a time; the bound must be an integer >= 0', async () => {
    const manager = (tf.backend() as unknown as { bufferManager: object }).bufferManager;
    const limit = limitWebGPUBufferPool(1024);
    expect(Object.prototype.hasOwnProperty.call(manager, 'acquireBuffer')).to.equal(true);
    expect(() => limitWebGPUBufferPool(0)).to.throw(OpArgumentError,
        '`limitWebGPUBufferPool()`: the pool is limited already: restore() the earlier limit first');
    limit.restore();
    expect(Object.prototype.hasOwnProperty.call(manager, 'acquireBuffer')).to.equal(false);
    expect(() => limitWebGPUBufferPool(-1)).to.throw(OpArgumentError, "`limitWebGPUBufferPool()`: 'maxFreeBytes' must be >= 0 but got -1");
    expect(() => limitWebGPUBufferPool(1.5)).to.throw(OpArgumentError, "`limitWebGPUBufferPool()`: 'maxFreeBytes' must be an integer");
  });

  it('needs the webgpu backend and its BufferManager', async () => {
    const backend = tf.backend() as unknown as { bufferManager: unknown };
    const manager = backend.bufferManager;
    backend.bufferManager = {};
    try {
      expect(() => webgpuBufferPoolStats()).to.throw(OpArgumentError,
          "`webgpuBufferPool()`: needs tfjs-backend-webgpu's BufferManager (freeBuffers, acquireBuffer, numBytesUsed, numBytesAllocated) but this backend has none");
    } finally {
      backend.bufferManager = manager;
    }
    await import('@tensorflow/tfjs-backend-cpu');
    await tf.setBackend('cpu');
    try {
      expect(() => releaseFreeWebGPUBuffers()).to.throw(OpArgumentError, "`releaseFreeWebGPUBuffers()`: needs the webgpu backend but the backend is 'cpu'");
    } finally {
      await tf.setBackend('webgpu');
    }
  });
});
