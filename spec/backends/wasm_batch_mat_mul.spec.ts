/**
 * tf.matMul with transposed operands on the active backend, against a float64 JS product: on
 * wasm the products go through src/backends/wasm/batch_mat_mul.ts (the transposed operand is
 * transposed first and the product runs on XNNPACK), on cpu through tfjs's own kernel. Batched
 * products (batch > 1) keep tfjs-wasm's kernel and are checked too.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { registerMoEKernels } from '../../src/backends/register_all_kernels.js';
import { useFastTransposedBatchMatMul } from '../../src/backends/wasm/batch_mat_mul.js';
import { Rng, asF32, expectClose, expectNoLeak, tensorOf } from '../helpers/numeric.js';

/** float64 C[b] = op(A[b])·op(B[b]), A and B given in their stored layouts, batch `batch`. */
function productRef(a: Float64Array, b: Float64Array, batch: number, m: number, k: number, n: number,
                    transposeA: boolean, transposeB: boolean): Float64Array {
  const out = new Float64Array(batch * m * n);
  for (let s = 0; s < batch; s++) {
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let sum = 0;
        for (let t = 0; t < k; t++) {
          const av = a[s * m * k + (transposeA ? t * m + i : i * k + t)];
          const bv = b[s * k * n + (transposeB ? j * k + t : t * n + j)];
          sum += av * bv;
        }
        out[s * m * n + i * n + j] = sum;
      }
    }
  }
  return out;
}

describe('BatchMatMul with transposed operands', () => {
  it('is the wrapped kernel on wasm, registered once', () => {
    if (tf.getBackend() !== 'wasm') {
      expect(tf.getKernel('BatchMatMul', 'wasm'), 'tfjs-wasm is loaded by spec/setup.ts').to.not.equal(undefined);
    }
    registerMoEKernels('wasm');
    const kernel = tf.getKernel('BatchMatMul', 'wasm')!.kernelFunc;
    // a second registration neither wraps the wrapper nor replaces it
    expect(useFastTransposedBatchMatMul()).to.equal(false);
    registerMoEKernels('wasm');
    expect(tf.getKernel('BatchMatMul', 'wasm')!.kernelFunc).to.equal(kernel);
  });

  // The router's shapes at small size (x [T, H], W_r [E, H]) and one with odd sizes.
  for (const [m, k, n] of [[37, 24, 8], [5, 3, 19]]) {
    for (const [transposeA, transposeB] of [[false, true], [true, false], [true, true], [false, false]]) {
      for (const rank3 of [false, true]) {
        const label = `[${m},${k}]${transposeA ? 'ᵀ' : ''}·[${k},${n}]${transposeB ? 'ᵀ' : ''}` +
            `${rank3 ? ', rank 3 with batch 1' : ''}`;
        it(label, () => {
          const rng = new Rng(m * 7 + n + (transposeA ? 1 : 0) + (transposeB ? 2 : 0) + (rank3 ? 4 : 0));
          const a = asF32(rng.array(m * k));
          const b = asF32(rng.array(k * n));
          const aShape = transposeA ? [k, m] : [m, k];
          const bShape = transposeB ? [n, k] : [k, n];
          const lead = rank3 ? [1] : [];
          expectNoLeak(() => {
            const out = tf.tidy(() => tf.matMul(tensorOf(a, [...lead, ...aShape]) as tf.Tensor2D,
                tensorOf(b, [...lead, ...bShape]) as tf.Tensor2D, transposeA, transposeB));
            expect(out.shape).to.deep.equal([...lead, m, n]);
            expectClose(out, productRef(a, b, 1, m, k, n, transposeA, transposeB), 1e-5, label);
            out.dispose();
          });
        });
      }
    }
  }

  it('no inner dimension (k = 0, transposed or not): zeros, also where the output\'s heap block held values', () => {
    for (const [transposeA, transposeB] of [[true, false], [false, false], [false, true]]) {
      const [m, n] = [5, 3];
      expectNoLeak(() => {
        tf.dispose(tf.fill([m, n], 7));   // leaves an [m, n] block with 7s on the heap, for the product to reuse
        const out = tf.tidy(() => tf.matMul(tf.zeros(transposeA ? [0, m] : [m, 0]) as tf.Tensor2D,
            tf.zeros(transposeB ? [n, 0] : [0, n]) as tf.Tensor2D, transposeA, transposeB));
        expect(out.shape).to.deep.equal([m, n]);
        expect(Array.from(out.dataSync()), `transposeA ${transposeA}, transposeB ${transposeB}`).to.deep.equal(Array(m * n).fill(0));
        out.dispose();
      });
    }
  });

  it('leaves batched products (batch 3) to tfjs-wasm\'s kernel, with the same results', () => {
    const [batch, m, k, n] = [3, 6, 5, 4];
    const rng = new Rng(5);
    const a = asF32(rng.array(batch * m * k));
    const b = asF32(rng.array(batch * k * n));
    expectNoLeak(() => {
      const out = tf.tidy(() => tf.matMul(tensorOf(a, [batch, k, m]) as tf.Tensor3D,
          tensorOf(b, [batch, n, k]) as tf.Tensor3D, true, true));
      expectClose(out, productRef(a, b, batch, m, k, n, true, true), 1e-5, 'batched');
      out.dispose();
    });
  });

  it('gives matMul\'s gradients (both transposed products) against a float64 reference', () => {
    const [m, k, n] = [33, 20, 8];
    const rng = new Rng(9);
    const x = asF32(rng.array(m * k));
    const w = asF32(rng.array(n * k));    // stored [n, k], used transposed: the router's layout
    const dy = asF32(rng.array(m * n));
    expectNoLeak(() => {
      const [dx, dw] = tf.tidy(() => tf.grads((xt: tf.Tensor, wt: tf.Tensor) =>
          tf.matMul(xt as tf.Tensor2D, wt as tf.Tensor2D, false, true))(
          [tensorOf(x, [m, k]), tensorOf(w, [n, k])], tensorOf(dy, [m, n])));
      expectClose(dx, productRef(dy, w, 1, m, n, k, false, false), 1e-5, 'dx = dy·W');
      expectClose(dw, productRef(dy, x, 1, n, m, k, true, false), 1e-5, 'dW = dyᵀ·x');
      tf.dispose([dx, dw]);
    });
  });
});
