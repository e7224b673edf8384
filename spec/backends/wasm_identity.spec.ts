/**
 * Identity (tf.clone, customGrad's saves) shares the input's buffer instead of copying it: on
 * wasm through src/backends/wasm/identity.ts, on cpu as tfjs-cpu does itself. The values must
 * outlive the original, and the buffer go when its last sharer does.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { registerMoEKernels } from '../../src/backends/register_all_kernels.js';
import { useSharedIdentity } from '../../src/backends/wasm/identity.js';

interface BackendWithRefs {
  refCount(dataId: tf.DataId): number;
  numDataIds(): number;
}

describe('Identity shares the buffer', () => {
  it('is the replacement on wasm, registered once', () => {
    registerMoEKernels('wasm');
    const kernel = tf.getKernel('Identity', 'wasm')!.kernelFunc;
    expect(useSharedIdentity()).to.equal(false);
    registerMoEKernels('wasm');
    expect(tf.getKernel('Identity', 'wasm')!.kernelFunc).to.equal(kernel);
  });

  it('tf.clone: one buffer, two references; the values outlive the original; the last dispose frees it', () => {
    const backend = tf.backend() as unknown as BackendWithRefs;
    const before = tf.memory().numTensors;
    const buffersBefore = backend.numDataIds();
    const x = tf.tensor2d([1.5, -2, 3.25, 4, 5, -6], [2, 3]);
    const c = tf.clone(x);
    expect(backend.numDataIds()).to.equal(buffersBefore + 1);
    expect(backend.refCount(x.dataId)).to.equal(2);
    x.dispose();
    expect(backend.refCount(c.dataId)).to.equal(1);
    expect(Array.from(c.dataSync())).to.deep.equal([1.5, -2, 3.25, 4, 5, -6]);
    expect(c.shape).to.deep.equal([2, 3]);
    c.dispose();
    expect(backend.numDataIds()).to.equal(buffersBefore);
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('int32 and string tensors clone with their values', () => {
    const before = tf.memory().numTensors;
    const i = tf.tensor1d([7, -8, 9], 'int32');
    const s = tf.tensor1d(['a', 'bc'], 'string');
    const [ci, cs] = [tf.clone(i), tf.clone(s)];
    tf.dispose([i, s]);
    expect(ci.dtype).to.equal('int32');
    expect(Array.from(ci.dataSync())).to.deep.equal([7, -8, 9]);
    expect(cs.arraySync()).to.deep.equal(['a', 'bc']);
    tf.dispose([ci, cs]);
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('customGrad keeps what it saved after the caller disposes the original', () => {
    const before = tf.memory().numTensors;
    const f = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
      const [x, save] = args as [tf.Tensor, tf.GradSaveFunc];
      save([x]);
      return { value: tf.square(x), gradFunc: (dy: tf.Tensor, [xs]: tf.Tensor[]) => [tf.mul(dy, tf.mul(xs, 2))] };
    });
    const x = tf.tensor1d([1, -2, 3]);
    const g = tf.grad((v: tf.Tensor) => f(v) as tf.Tensor)(x);
    x.dispose();
    expect(Array.from(g.dataSync())).to.deep.equal([2, -4, 6]);
    g.dispose();
    expect(tf.memory().numTensors).to.equal(before);
  });
});
