/**
 * bench/e2e/native_timing.ts on the webgpu backend: inside withNativeTiming every dispatch tfjs
 * records shows up as one createBindGroup, setPipeline, setBindGroup and dispatchWorkgroups, the
 * read's submit as a queue.submit; after it (and after work that throws) the device's and queue's
 * methods are the ones they were, and calls are no longer counted. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { withNativeTiming } from '../../../bench/e2e/native_timing.js';
import { registerMoEKernels } from '../../../src/backends/register_all_kernels.js';

type Backend = { device: GPUDevice; queue: GPUQueue };

describe('webgpu: native call timing (bench/e2e/native_timing.ts)', () => {
  let backend: Backend;
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    registerMoEKernels('webgpu');
    backend = tf.backend() as unknown as Backend;
  });

  it('counts one bind group, pipeline, bind and dispatch per program, and the submit of a read', async () => {
    // above tfjs-webgpu's CPU hand-off size (1000), so that the programs run on the GPU
    const n = 2048;
    const av = Float32Array.from({ length: n }, (_, i) => (i % 7) - 3);
    const bv = Float32Array.from({ length: n }, (_, i) => 0.25 * (i % 5));
    const a = tf.tensor1d(av);
    const b = tf.tensor1d(bv);
    // work an earlier spec recorded and never read stays in tfjs's open pass, whose methods the
    // timing would not see: a read submits it first
    const flush = tf.add(a, b);
    await flush.data();
    flush.dispose();
    const { value, calls } = await withNativeTiming(backend, async () => {
      const y = tf.tidy(() => tf.mul(tf.add(a, b), b));  // two programs
      const out = Array.from(await y.data());
      y.dispose();
      return out;
    });
    expect(value).to.deep.equal(Array.from(av, (x, i) => Math.fround((x + bv[i]) * bv[i])));
    for (const name of ['device.createBindGroup', 'pass.setPipeline', 'pass.setBindGroup', 'pass.dispatchWorkgroups']) {
      expect(calls[name]?.count, name).to.equal(2);
    }
    expect(calls['queue.submit']?.count, 'queue.submit').to.be.at.least(1);
    expect(calls['encoder.finish']?.count, 'encoder.finish').to.equal(calls['queue.submit']!.count);
    tf.dispose([a, b]);
  });

  it('puts every method back, also when the work throws, and counts nothing after', async () => {
    const before = { bind: backend.device.createBindGroup, encoder: backend.device.createCommandEncoder, submit: backend.queue.submit };
    const { calls } = await withNativeTiming(backend, async () => {
      expect(backend.device.createBindGroup).to.not.equal(before.bind);
    });
    expect(backend.device.createBindGroup).to.equal(before.bind);
    let thrown: unknown;
    try {
      await withNativeTiming(backend, async () => { throw new Error('work failed'); });
    } catch (e) {
      thrown = e;
    }
    expect((thrown as Error).message).to.equal('work failed');
    expect([backend.device.createBindGroup, backend.device.createCommandEncoder, backend.queue.submit])
        .to.deep.equal([before.bind, before.encoder, before.submit]);
    const x = tf.fill([2048], 2);
    const y = tf.neg(x);
    expect((await y.data())[0]).to.equal(-2);
    tf.dispose([x, y]);
    expect(calls['device.createBindGroup']).to.equal(undefined);
  });
});
