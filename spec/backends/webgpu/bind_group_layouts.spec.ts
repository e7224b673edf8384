/**
 * The bind group layout cache (src/backends/webgpu/bind_group_layouts.ts): after registration the
 * backend's device makes pipelines that answer getBindGroupLayout(0) with one object, asking the
 * pipeline once, where tfjs asks on every dispatch; with the flag off every call asks again; a
 * program compiled through it computes what it computed before (values checked against JS), and
 * installing twice wraps once. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { BIND_GROUP_LAYOUT_CACHE_FLAG, installBindGroupLayoutCache } from '../../../src/backends/webgpu/bind_group_layouts.js';
import { registerMoEKernels } from '../../../src/backends/register_all_kernels.js';
import { withEnvFlag } from './helpers.js';

type Device = GPUDevice & { createComputePipeline: GPUDevice['createComputePipeline'] };
type LayoutOf = GPUComputePipeline['getBindGroupLayout'];

/**
 * A compute pipeline the backend's device makes, with its class's own getBindGroupLayout counting
 * the calls that reach it (patched before the pipeline is made, as the cache binds it then).
 */
function countingPipeline(device: Device): { pipeline: GPUComputePipeline; asked: () => number; restore: () => void } {
  const module = device.createShaderModule({
    code: '@group(0) @binding(0) var<storage, read_write> out : array<f32>;\n@compute @workgroup_size(1) fn main() { out[0] = 1.0; }',
  });
  const make = () => device.createComputePipeline({ layout: 'auto', compute: { module, entryPoint: 'main' } });
  const proto = Object.getPrototypeOf(make()) as { getBindGroupLayout: LayoutOf };
  const own = proto.getBindGroupLayout;
  let asked = 0;
  proto.getBindGroupLayout = function (this: GPUComputePipeline, index: number) {
    asked++;
    return own.call(this, index);
  };
  return { pipeline: make(), asked: () => asked, restore: () => { proto.getBindGroupLayout = own; } };
}

describe('webgpu: one bind group layout object per pipeline (bind_group_layouts.ts)', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    registerMoEKernels('webgpu');
  });

  it('the backend\'s device is wrapped once, and its pipelines answer getBindGroupLayout(0) with one object', async () => {
    const backend = tf.backend();
    expect(installBindGroupLayoutCache(backend)).to.equal(true);
    const device = (backend as unknown as { device: Device }).device;
    const wrapper = device.createComputePipeline;
    expect(installBindGroupLayoutCache(backend)).to.equal(true);
    expect(device.createComputePipeline, 'installed twice, wrapped twice').to.equal(wrapper);
    const counting = countingPipeline(device);
    try {
      const first = counting.pipeline.getBindGroupLayout(0);
      const again = counting.pipeline.getBindGroupLayout(0);
      expect(again).to.equal(first);
      expect(counting.asked(), 'asked once, then cached').to.equal(1);
      const before = counting.asked();
      await withEnvFlag(BIND_GROUP_LAYOUT_CACHE_FLAG, false, async () => {
        counting.pipeline.getBindGroupLayout(0);
        counting.pipeline.getBindGroupLayout(0);
      });
      expect(counting.asked() - before, 'flag off: asked every time').to.equal(2);
    } finally {
      counting.restore();
    }
  });

  it('a backend without a device is left as it is', () => {
    expect(installBindGroupLayoutCache(null)).to.equal(false);
    expect(installBindGroupLayoutCache({})).to.equal(false);
  });

  it('programs compiled through the cache compute as before, over many dispatches of one pipeline', async () => {
    const x = tf.tensor1d([-3, -0.5, 0.25, 2, 7]);
    const outs = Array.from({ length: 40 }, (_, i) => tf.clipByValue(x, -(i + 1) / 8, (i + 1) / 4));
    const values = await Promise.all(outs.map(o => o.data() as Promise<Float32Array>));
    values.forEach((v, i) => {
      const want = [-3, -0.5, 0.25, 2, 7].map(e => Math.min(Math.max(e, Math.fround(-(i + 1) / 8)), Math.fround((i + 1) / 4)));
      expect(Array.from(v), `dispatch ${i}`).to.deep.equal(want);
    });
    tf.dispose([x, ...outs]);
  });
});
