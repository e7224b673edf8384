/**
 * The bind group cache (src/backends/webgpu/bind_group_cache.ts): after registration the backend's
 * device answers createBindGroup with the group it made before for the same layout, buffers,
 * offsets and sizes, and makes a new one for anything else; with the flag off every call makes one;
 * descriptors binding more than buffer ranges are never cached; a repeated computation finds its
 * groups from the third run on and gives the same values. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { BIND_GROUP_CACHE_FLAG, bindGroupCacheStats, installBindGroupCache } from '../../../src/backends/webgpu/bind_group_cache.js';
import { registerMoEKernels } from '../../../src/backends/register_all_kernels.js';
import { withEnvFlag } from './helpers.js';

// GPUBufferUsage / GPUShaderStage bits (the spec's values)
const STORAGE = 0x0080;
const COMPUTE = 0x4;

describe('webgpu: one bind group per set of bound buffers (bind_group_cache.ts)', () => {
  let device: GPUDevice;

  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    registerMoEKernels('webgpu');
    device = (tf.backend() as unknown as { device: GPUDevice }).device;
  });

  it('the device is wrapped once; the same descriptor gives the same group, any other field a new one', async () => {
    const wrapper = device.createBindGroup;
    expect(installBindGroupCache(tf.backend())).to.equal(true);
    expect(device.createBindGroup, 'installed twice, wrapped once').to.equal(wrapper);
    const layout = device.createBindGroupLayout({
      entries: [0, 1].map(binding => ({ binding, visibility: COMPUTE, buffer: { type: 'storage' as const } })),
    });
    const [a, b] = [0, 1].map(() => device.createBuffer({ size: 1024, usage: STORAGE }));
    const group = (first: GPUBuffer, offset: number, size: number) => device.createBindGroup({
      layout, entries: [{ binding: 0, resource: { buffer: first, offset, size } }, { binding: 1, resource: { buffer: b } }],
    });
    const before = bindGroupCacheStats(tf.backend())!;
    const g = group(a, 0, 256);
    expect(group(a, 0, 256), 'the same descriptor again').to.equal(g);
    const others = [group(a, 256, 256), group(a, 0, 512), group(b, 0, 256)];
    for (const other of others) expect(other).to.not.equal(g);
    expect(new Set(others).size, 'offset, size and buffer each tell groups apart').to.equal(3);
    const after = bindGroupCacheStats(tf.backend())!;
    expect([after.hits - before.hits, after.misses - before.misses]).to.deep.equal([1, 4]);
    await withEnvFlag(BIND_GROUP_CACHE_FLAG, false, async () => {
      expect(group(a, 0, 256), 'flag off: made again').to.not.equal(g);
    });
    expect(bindGroupCacheStats(tf.backend())!.uncached - after.uncached).to.equal(1);
    for (const buffer of [a, b]) buffer.destroy();
  });

  it('a group binding a sampler is made every time', () => {
    const layout = device.createBindGroupLayout({ entries: [{ binding: 0, visibility: COMPUTE, sampler: {} }] });
    const sampler = device.createSampler();
    const before = bindGroupCacheStats(tf.backend())!;
    const first = device.createBindGroup({ layout, entries: [{ binding: 0, resource: sampler }] });
    const second = device.createBindGroup({ layout, entries: [{ binding: 0, resource: sampler }] });
    expect(second).to.not.equal(first);
    const after = bindGroupCacheStats(tf.backend())!;
    expect([after.uncached - before.uncached, after.hits - before.hits]).to.deep.equal([2, 0]);
  });

  it('a backend without a device is left as it is', () => {
    expect(installBindGroupCache(null)).to.equal(false);
    expect(installBindGroupCache({})).to.equal(false);
  });

  it('a computation run again finds its groups and gives the same values as with the cache off', async () => {
    const x = tf.tensor2d(Float32Array.from({ length: 24 * 16 }, (_, i) => ((i * 7) % 13) / 13 - 0.5), [24, 16]);
    const w = tf.tensor2d(Float32Array.from({ length: 16 * 8 }, (_, i) => ((i * 5) % 11) / 11 - 0.5), [16, 8]);
    const run = async () => {
      const y = tf.tidy(() => tf.softmax(tf.mul(tf.add(tf.relu(tf.matMul(x, w)), tf.scalar(0.25)), tf.sum(x, 1, true))));
      const values = await y.data();
      y.dispose();
      return Array.from(values);
    };
    const reference = await withEnvFlag(BIND_GROUP_CACHE_FLAG, false, run);
    // tfjs's pool hands same-sized buffers back last in, first out: runs alternate between two sets
    // of buffers, so the groups are all made by the end of the second run
    for (const values of [await run(), await run()]) expect(values).to.deep.equal(reference);
    const before = bindGroupCacheStats(tf.backend())!;
    for (const values of [await run(), await run()]) expect(values).to.deep.equal(reference);
    const after = bindGroupCacheStats(tf.backend())!;
    const [hits, misses] = [after.hits - before.hits, after.misses - before.misses];
    expect(hits + misses, 'the run binds through the cache').to.be.at.least(5);
    expect(hits / (hits + misses), `${hits} found, ${misses} made`).to.be.at.least(0.9);
    tf.dispose([x, w]);
  });
});
