/**
 * weightGradProduct (aᵀ·b: a LoRA factor's gradient, one MoEWeightGradProduct kernel where
 * registered: webgpu; tf.matMul(a, b, true, false) elsewhere) against float64: rows that are no
 * multiple of a chunk or tile (1, 17, 333), either side narrow (dA = gᵀ·x [r, in], dB = dyᵀ·u
 * [out, r]) and neither, and no rows (zeros). Reads with `await data()`; the webgpu kernels' own
 * cases are in spec/backends/webgpu/dense_lora_products.spec.ts.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { weightGradProduct } from '../../src/ops/weight_grad_product.js';
import { asF32, expectClose, Rng, tensorOf } from '../helpers/numeric.js';

/** float64 Σ_n a[n, p]·b[n, q] for a [N, P], b [N, Q]. */
function weightGradProduct64(a: Float64Array, b: Float64Array, n: number, p: number, q: number): Float64Array {
  const out = new Float64Array(p * q);
  for (let i = 0; i < p; i++) {
    for (let j = 0; j < q; j++) {
      let acc = 0;
      for (let r = 0; r < n; r++) acc += a[r * p + i] * b[r * q + j];
      out[i * q + j] = acc;
    }
  }
  return out;
}

describe('ops/weightGradProduct', () => {
  // [N, P, Q]: dA's shape (P = r), dB's (Q = r), neither narrow; no rows
  const shapes: Array<[number, number, number]> = [[1, 8, 70], [17, 70, 1], [333, 16, 300], [333, 300, 8], [33, 17, 19], [0, 5, 3]];
  for (const [n, p, q] of shapes) {
    it(`a [${n},${p}], b [${n},${q}]: aᵀ·b [${p},${q}] equals float64${n === 0 ? ' (zeros)' : ''}`, async () => {
      const rng = new Rng(n * 1000 + p * 10 + q);
      const a = asF32(rng.array(n * p));
      const b = asF32(rng.array(n * q));
      const [at, bt] = [tensorOf(a, [n, p]), tensorOf(b, [n, q])] as tf.Tensor2D[];
      const before = tf.memory().numTensors;
      const y = weightGradProduct(at, bt);
      expect(tf.memory().numTensors - before, 'only the product is left').to.equal(1);
      expect(y.shape).to.deep.equal([p, q]);
      expectClose(Float64Array.from(await y.data()), weightGradProduct64(a, b, n, p, q), 1e-5, 'value vs float64');
      tf.dispose([y, at, bt]);
    });
  }
});
