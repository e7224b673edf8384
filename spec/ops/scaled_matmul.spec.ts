/**
 * scaledMatMul (s·(a·b), one MoEScaledMatMul kernel where registered: webgpu) against float64 on
 * shapes whose rows, columns and reduction are no multiple of the kernel's tiles (64 rows, 16
 * columns, 16-deep slabs), with B plain and transposed. Reads with `await data()` so the spec runs
 * on webgpu too (spec/backends/webgpu/layer_ops.spec.ts).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { scaledMatMul } from '../../src/ops/scaled_matmul.js';
import { asF32, expectClose, Rng, tensorOf } from '../helpers/numeric.js';

/** float64 s·Σ_k a[m,k]·b(k,n), b(k,n) = transposeB ? b[n,k] : b[k,n]. */
export function scaledMatMul64(a: Float64Array, b: Float64Array, m: number, k: number, n: number, transposeB: boolean, s: number): Float64Array {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let acc = 0;
      for (let p = 0; p < k; p++) acc += a[i * k + p] * (transposeB ? b[j * k + p] : b[p * n + j]);
      out[i * n + j] = s * acc;
    }
  }
  return out;
}

describe('ops/scaledMatMul', () => {
  // [M, K, N]: LoRA's x·Aᵀ / dy·B shapes (N = r) and ones past one tile each way
  const shapes: Array<[number, number, number]> = [[5, 7, 2], [64, 16, 16], [130, 37, 3], [70, 300, 19], [1, 1, 1]];
  for (const [m, k, n] of shapes) {
    for (const transposeB of [false, true]) {
      it(`[${m},${k}]·${transposeB ? `[${n},${k}]ᵀ` : `[${k},${n}]`} × s equals float64`, async () => {
        const rng = new Rng(m * 1000 + k * 10 + n);
        const a = asF32(rng.array(m * k));
        const b = asF32(rng.array(k * n));
        const s = -1.75;
        const at = tensorOf(a, [m, k]) as tf.Tensor2D;
        const bt = tensorOf(b, transposeB ? [n, k] : [k, n]) as tf.Tensor2D;
        const before = tf.memory().numTensors;
        const y = scaledMatMul(at, bt, transposeB, s);
        expect(tf.memory().numTensors - before, 'only the product is left').to.equal(1);
        expect(y.shape).to.deep.equal([m, n]);
        expectClose(Float64Array.from(await y.data()), scaledMatMul64(a, b, m, k, n, transposeB, s), 1e-5, 'value vs float64');
        tf.dispose([y, at, bt]);
      });
    }
  }

  it('multiplies the composed path by scaleOperand (a pass\'s shared scalar) and gives the same values', async () => {
    const rng = new Rng(3);
    const a = asF32(rng.array(6 * 5));
    const b = asF32(rng.array(4 * 5));
    const [at, bt, s] = [tensorOf(a, [6, 5]) as tf.Tensor2D, tensorOf(b, [4, 5]) as tf.Tensor2D, tf.scalar(0.5)];
    const before = tf.memory().numTensors;
    const y = scaledMatMul(at, bt, true, 0.5, s);
    expect(tf.memory().numTensors - before).to.equal(1);
    expectClose(Float64Array.from(await y.data()), scaledMatMul64(a, b, 6, 5, 4, true, 0.5), 1e-5, 'value vs float64');
    tf.dispose([y, at, bt, s]);
  });
});
