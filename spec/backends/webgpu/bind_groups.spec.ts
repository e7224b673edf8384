/**
 * The bind group cache (src/backends/webgpu/bind_groups.ts): the same descriptor gives the same
 * bind group, another buffer, offset, size or layout another one, and with the flag off every call
 * makes a new one; it keeps what was used within its last generation of BIND_GROUP_CACHE_SIZE and
 * drops the rest, holding at most two generations; the pool hands out the oldest free buffer of a
 * size whatever the order they were freed in; a computation repeated on fresh tensors binds the buffers of its first run again (no new
 * bind groups) and computes what float32 JS does. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { BIND_GROUP_CACHE_FLAG, BIND_GROUP_CACHE_SIZE, bindGroupCacheCounts, emptyBindGroupCache, installBindGroupCache } from '../../../src/backends/webgpu/bind_groups.js';
import { registerMoEKernels } from '../../../src/backends/register_all_kernels.js';
import { withEnvFlag } from './helpers.js';

interface Internals {
  device: GPUDevice;
  bufferManager: { acquireBuffer(size: number, usage: number): GPUBuffer; releaseBuffer(b: GPUBuffer, reuse?: boolean): void };
}

// GPUBufferUsage's bits (the spec's values)
const STORAGE = 0x0080;
const COPY_DST = 0x0008;

describe('webgpu: one bind group per distinct binding (bind_groups.ts)', () => {
  let backend: Internals;
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    registerMoEKernels('webgpu');
    backend = tf.backend() as unknown as Internals;
    expect(installBindGroupCache(backend)).to.equal(true);
    expect(installBindGroupCache(backend), 'again').to.equal(true);
  });

  it('answers the same descriptor with the same bind group, and any other binding with another', async () => {
    const { device } = backend;
    const layout = device.createBindGroupLayout({
      entries: [{ binding: 0, visibility: 4 /* COMPUTE */, buffer: { type: 'storage' } }],
    });
    const otherLayout = device.createBindGroupLayout({
      entries: [{ binding: 0, visibility: 4, buffer: { type: 'read-only-storage' } }],
    });
    const [a, b] = [0, 1].map(() => device.createBuffer({ size: 1024, usage: STORAGE }));
    const group = (l: GPUBindGroupLayout, buffer: GPUBuffer, offset?: number, size?: number) =>
      device.createBindGroup({ layout: l, entries: [{ binding: 0, resource: { buffer, offset, size } }] });
    const first = group(layout, a);
    expect(group(layout, a), 'the same descriptor').to.equal(first);
    const others = [group(layout, b), group(layout, a, 256), group(layout, a, 0, 512), group(otherLayout, a)];
    expect(new Set([first, ...others]).size, 'buffer, offset, size and layout each make their own').to.equal(5);
    expect(group(layout, a, 256), 'an offset again').to.equal(others[1]);
    await withEnvFlag(BIND_GROUP_CACHE_FLAG, false, async () => {
      expect(group(layout, a), 'flag off: made anew').to.not.equal(first);
    });
    expect(group(layout, a), 'flag on again').to.equal(first);
    a.destroy();
    b.destroy();
  });

  it('keeps the bind groups used within its last generation, drops the rest, and holds at most two generations', () => {
    const { device } = backend;
    const n = BIND_GROUP_CACHE_SIZE;
    const layout = device.createBindGroupLayout({ entries: [{ binding: 0, visibility: 4, buffer: { type: 'storage' } }] });
    const buffer = device.createBuffer({ size: 256 * 2 * n, usage: STORAGE });
    // key i: the buffer's i-th 256-byte slice
    const group = (i: number) => device.createBindGroup({ layout, entries: [{ binding: 0, resource: { buffer, offset: 256 * i, size: 256 } }] });
    emptyBindGroupCache(backend);
    expect(bindGroupCacheCounts(backend).cached, 'emptied').to.equal(0);
    const first = group(0);
    let most = 0;
    const made = (from: number, to: number) => {
      for (let i = from; i < to; i++) {
        group(i);
        most = Math.max(most, bindGroupCacheCounts(backend).cached);
      }
    };
    made(1, n);
    expect(bindGroupCacheCounts(backend).cached, 'one generation, full').to.equal(n);
    made(n, n + 1);  // the current generation becomes the previous one
    expect(bindGroupCacheCounts(backend).cached).to.equal(n + 1);
    const madeBefore = bindGroupCacheCounts(backend).made;
    expect(group(0), 'found in the previous generation').to.equal(first);
    expect(bindGroupCacheCounts(backend).made, 'found, not made').to.equal(madeBefore);
    made(n + 1, 2 * n);  // fills the current generation (group 0 moved into it) and turns it over
    expect(most, 'at most two generations').to.be.at.most(2 * n);
    expect(group(0), 'used within the last generation: kept').to.equal(first);
    const dropped = bindGroupCacheCounts(backend).made;
    group(1);
    expect(bindGroupCacheCounts(backend).made, 'not used since two generations: dropped, made again').to.equal(dropped + 1);
    emptyBindGroupCache(backend);
    buffer.destroy();
  });

  it('hands out the oldest free buffer of a size first, whatever order they were freed in', () => {
    const pool = backend.bufferManager;
    const size = 4 * 1237;  // a size no tensor of the other specs takes
    const usage = STORAGE | COPY_DST;
    const buffers = [0, 1, 2].map(() => pool.acquireBuffer(size, usage));
    // first seen (ids) in this order: bind each once
    for (const buffer of buffers) {
      backend.device.createBindGroup({
        layout: backend.device.createBindGroupLayout({ entries: [{ binding: 0, visibility: 4, buffer: { type: 'storage' } }] }),
        entries: [{ binding: 0, resource: { buffer } }],
      });
    }
    for (const i of [2, 0, 1]) pool.releaseBuffer(buffers[i]);
    const again = [0, 1, 2].map(() => pool.acquireBuffer(size, usage));
    expect(again.map(b => buffers.indexOf(b))).to.deep.equal([0, 1, 2]);
    for (const b of again) pool.releaseBuffer(b, false);
  });

  it('binds the buffers of its first run again when a computation is repeated, with float32 JS values', async () => {
    const n = 4096;  // above tfjs-webgpu's CPU hand-off size, so that the programs run on the GPU
    const xs = Float32Array.from({ length: n }, (_, i) => ((i * 37) % 101) / 17 - 3);
    const run = async () => {
      const x = tf.tensor1d(xs);
      // temporaries freed in another order than made: tfjs's pool would hand them out reversed next time
      const y = tf.tidy(() => {
        const a = tf.mul(x, 2);
        const b = tf.add(x, 1);
        const c = tf.sub(a, b);
        return tf.mul(c, tf.relu(b));
      });
      const values = await y.data() as Float32Array;
      tf.dispose([x, y]);
      return values;
    };
    const expected = xs.map(v => {
      const b = Math.fround(v + 1);
      return Math.fround(Math.fround(Math.fround(2 * v) - b) * Math.max(b, 0));
    });
    expect(Array.from(await run())).to.deep.equal(Array.from(expected));
    const made = bindGroupCacheCounts(backend).made;
    for (let i = 0; i < 3; i++) expect(Array.from(await run()), `run ${i + 2}`).to.deep.equal(Array.from(expected));
    expect(bindGroupCacheCounts(backend).made, 'no new bind group after the first run').to.equal(made);
  });
});
