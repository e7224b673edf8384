/**
 * UnsortedSegmentSum on the active backend: tfjs's own kernel on cpu, ours on wasm. Checked
 * against float64 JS references, directly and as the gradient of tf.gather.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { registerMoEKernels } from '../../src/backends/register_all_kernels.js';
import { unsortedSegmentSumConfig } from '../../src/backends/wasm/unsorted_segment_sum.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { Rng, asF32, expectClose, expectNoLeak, tensorOf } from '../helpers/numeric.js';

/** float64 reference: out[s, j] = Σ_{i: ids[i] = s} x[i, j]; ids outside [0, numSegments) dropped. */
function segmentSumRef(
    x: Float64Array, ids: number[], numSegments: number, rowSize: number): Float64Array {
  const out = new Float64Array(numSegments * rowSize);
  ids.forEach((s, i) => {
    if (s < 0 || s >= numSegments) return;
    for (let j = 0; j < rowSize; j++) out[s * rowSize + j] += x[i * rowSize + j];
  });
  return out;
}

describe('UnsortedSegmentSum kernel', () => {
  it('is the one this package registers on wasm and tfjs\'s own on cpu', () => {
    const kernel = tf.getKernel('UnsortedSegmentSum', tf.getBackend());
    expect(kernel, `UnsortedSegmentSum on ${tf.getBackend()}`).to.not.equal(undefined);
    const ours = kernel!.kernelFunc === unsortedSegmentSumConfig.kernelFunc;
    expect(ours).to.equal(tf.getBackend() === 'wasm');
  });

  it('sums 1-D x with repeated ids and empty segments', () => {
    const rng = new Rng(1);
    const xs = asF32(rng.array(7));
    const ids = [3, 0, 3, 3, 5, 0, 3];  // segments 1, 2, 4 and 6 are empty
    expectNoLeak(() => {
      const out = tf.tidy(() => tf.unsortedSegmentSum(tensorOf(xs, [7]), tf.tensor1d(ids, 'int32'), 7));
      expect(out.shape).to.deep.equal([7]);
      expectClose(out, segmentSumRef(xs, ids, 7, 1), 1e-6, '1-D');
      for (const empty of [1, 2, 4, 6]) expect(out.dataSync()[empty]).to.equal(0);
      out.dispose();
    });
  });

  it('sums 3-D x over its first axis', () => {
    const rng = new Rng(2);
    const n = 9, a = 3, b = 4, numSegments = 5;
    const xs = asF32(rng.array(n * a * b));
    const ids = Array.from({ length: n }, () => rng.int(numSegments - 1));  // the last segment stays empty
    ids[0] = ids[1] = ids[2];  // a repeated id for sure
    expectNoLeak(() => {
      const out = tf.tidy(() =>
          tf.unsortedSegmentSum(tensorOf(xs, [n, a, b]), tf.tensor1d(ids, 'int32'), numSegments));
      expect(out.shape).to.deep.equal([numSegments, a, b]);
      expect(out.dtype).to.equal('float32');
      expectClose(out, segmentSumRef(xs, ids, numSegments, a * b), 1e-6, '3-D');
      out.dispose();
    });
  });

  it('sums int32 x exactly', () => {
    expectNoLeak(() => {
      const out = tf.tidy(() => tf.unsortedSegmentSum(
          tf.tensor2d([[1, 2], [30, 40], [500, 600]], [3, 2], 'int32'), tf.tensor1d([1, 0, 1], 'int32'), 2));
      expect(out.shape).to.deep.equal([2, 2]);
      expect(Array.from(out.dataSync())).to.deep.equal([30, 40, 501, 602]);
      out.dispose();
    });
  });

  it('drops ids outside [0, numSegments) as the cpu kernel does', () => {
    const xs = asF32([1.5, -2, 4, 8]);
    const ids = [0, -1, 2, 1];
    expectNoLeak(() => {
      const out = tf.tidy(() => tf.unsortedSegmentSum(tensorOf(xs, [4]), tf.tensor1d(ids, 'int32'), 2));
      expectClose(out, segmentSumRef(xs, ids, 2, 1), 0, 'dropped ids');
      out.dispose();
    });
  });

  it('is the gradient of tf.gather: a scatter-add of dy over repeated indices', () => {
    const rng = new Rng(3);
    const rows = 6, cols = 5;
    const params = asF32(rng.array(rows * cols));
    const indices = [4, 1, 4, 0, 4, 1, 2];  // rows 3 and 5 never gathered
    const g = asF32(rng.array(indices.length * cols));
    // d/dP sum(gather(P, idx) * G) = scatter-add of G's rows into the rows idx names.
    const expected = new Float64Array(rows * cols);
    indices.forEach((r, i) => { for (let j = 0; j < cols; j++) expected[r * cols + j] += g[i * cols + j]; });
    expectNoLeak(() => {
      const grad = tf.tidy(() => {
        const gT = tensorOf(g, [indices.length, cols]);
        const idx = tf.tensor1d(indices, 'int32');
        return tf.grad((p: tf.Tensor) => tf.sum(tf.mul(tf.gather(p, idx), gT)))(tensorOf(params, [rows, cols]));
      });
      expect(grad.shape).to.deep.equal([rows, cols]);
      expectClose(grad, expected, 1e-6, 'gather gradient');
      grad.dispose();
    });
  });

  it('is the gradient of tf.gather along axis 1', () => {
    const rng = new Rng(4);
    const rows = 3, cols = 5;
    const params = asF32(rng.array(rows * cols));
    const indices = [2, 2, 0, 4];
    const g = asF32(rng.array(rows * indices.length));
    const expected = new Float64Array(rows * cols);
    for (let r = 0; r < rows; r++) {
      indices.forEach((c, i) => { expected[r * cols + c] += g[r * indices.length + i]; });
    }
    expectNoLeak(() => {
      const grad = tf.tidy(() => {
        const gT = tensorOf(g, [rows, indices.length]);
        const idx = tf.tensor1d(indices, 'int32');
        return tf.grad((p: tf.Tensor) => tf.sum(tf.mul(tf.gather(p, idx, 1), gT)))(tensorOf(params, [rows, cols]));
      });
      expectClose(grad, expected, 1e-6, 'gather gradient, axis 1');
      grad.dispose();
    });
  });

  it('registers nothing on a second registerMoEKernels call', () => {
    // spec/setup.ts made the first call for the active backend.
    expect(registerMoEKernels(tf.getBackend())).to.deep.equal([]);
    registerMoEKernels('wasm');
    expect(registerMoEKernels('wasm')).to.deep.equal([]);
  });

  it('registers the wasm kernel once when it is missing, then nothing', () => {
    const before = tf.getKernel('UnsortedSegmentSum', 'wasm');
    tf.unregisterKernel('UnsortedSegmentSum', 'wasm');
    try {
      expect(registerMoEKernels('wasm')).to.deep.equal(['UnsortedSegmentSum']);
      expect(registerMoEKernels('wasm')).to.deep.equal([]);
      expect(tf.getKernel('UnsortedSegmentSum', 'wasm')!.kernelFunc).to.equal(unsortedSegmentSumConfig.kernelFunc);
    } finally {
      if (tf.getKernel('UnsortedSegmentSum', 'wasm') == null && before != null) tf.registerKernel(before);
    }
  });
});

describe('UnsortedSegmentSum wasm kernel, argument checks', () => {
  // Called directly, so these run on either backend; the engine never passes such shapes.
  const fakeBackend = {
    readSync: () => { throw new Error('must not be read'); },
    makeOutput: () => { throw new Error('must not be made'); },
  };
  const run = (x: tf.TensorInfo, segmentIds: tf.TensorInfo, numSegments: number) =>
    unsortedSegmentSumConfig.kernelFunc({ inputs: { x, segmentIds }, backend: fakeBackend, attrs: { numSegments } });
  const info = (shape: number[], dtype: tf.DataType = 'float32'): tf.TensorInfo => ({ dataId: {}, shape, dtype });

  it('rejects segmentIds whose length is not x.shape[0]', () => {
    expect(() => run(info([4, 2]), info([3], 'int32'), 2)).to.throw(
        OpArgumentError, "`unsortedSegmentSum()`: 'segmentIds' must have shape [4] (x.shape[0] of x [4,2]) but got [3]");
  });

  it('rejects segmentIds of rank 2', () => {
    expect(() => run(info([4, 2]), info([4, 2], 'int32'), 2)).to.throw(
        OpArgumentError, "'segmentIds' must have shape [4] (x.shape[0] of x [4,2]) but got [4,2]");
  });

  it('rejects a scalar x', () => {
    expect(() => run(info([]), info([1], 'int32'), 2)).to.throw(
        OpArgumentError, "'segmentIds' must have shape [n] (x.shape[0] of x []) but got [1]");
  });

  it('rejects bool x', () => {
    expect(() => run(info([2], 'bool'), info([2], 'int32'), 2)).to.throw(
        OpArgumentError, "'x' must be float32 or int32 on the wasm backend but got bool");
  });

  it('rejects a negative numSegments', () => {
    expect(() => run(info([2]), info([2], 'int32'), -1)).to.throw(
        OpArgumentError, "'numSegments' must be a non-negative integer but got -1");
  });
});
