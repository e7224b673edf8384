/**
 * batchProduct (the composed attention's batched products; one MoEBatchProduct kernel where
 * registered: webgpu) against float64, in all four transpose forms, on shapes with no multiple of
 * any block; its argument checks; tf.matMul with the tape on (it has no gradient of its own). Reads
 * with `await data()` so the spec runs on webgpu too (spec/backends/webgpu/attention_core.spec.ts).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { BATCH_PRODUCT, batchProduct } from '../../src/ops/batch_product.js';
import { asF32, countKernels, expectClose, Rng, tensorOf } from '../helpers/numeric.js';

/** float64 per batch op(a_b)·op(b_b) → [B, M, N], a [B, M, K] or [B, K, M], b [B, K, N] or [B, N, K]. */
export function batchProduct64(a: Float64Array, b: Float64Array, batch: number, m: number, k: number, n: number,
    transposeA: boolean, transposeB: boolean): Float64Array {
  const out = new Float64Array(batch * m * n);
  for (let g = 0; g < batch; g++) {
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < n; j++) {
        let acc = 0;
        for (let p = 0; p < k; p++) {
          const x = transposeA ? a[(g * k + p) * m + i] : a[(g * m + i) * k + p];
          const y = transposeB ? b[(g * n + j) * k + p] : b[(g * k + p) * n + j];
          acc += x * y;
        }
        out[(g * m + i) * n + j] = acc;
      }
    }
  }
  return out;
}

describe('ops/batchProduct', () => {
  // [B, M, K, N]: one batch, attention-like (3 heads of 40 rows over 24 keys, head 20), and uneven
  const shapes: Array<[number, number, number, number]> = [[1, 5, 7, 3], [3, 40, 24, 20], [2, 33, 17, 65]];
  for (const [batch, m, k, n] of shapes) {
    for (const [transposeA, transposeB] of [[false, false], [false, true], [true, false], [true, true]]) {
      it(`[${batch}] ${transposeA ? `[${k},${m}]ᵀ` : `[${m},${k}]`}·${transposeB ? `[${n},${k}]ᵀ` : `[${k},${n}]`} equals float64`, async () => {
        const rng = new Rng(batch * 10000 + m * 100 + k + n);
        const a = asF32(rng.array(batch * m * k));
        const b = asF32(rng.array(batch * k * n));
        const at = tensorOf(a, transposeA ? [batch, k, m] : [batch, m, k]) as tf.Tensor3D;
        const bt = tensorOf(b, transposeB ? [batch, n, k] : [batch, k, n]) as tf.Tensor3D;
        const before = tf.memory().numTensors;
        const y = batchProduct(at, bt, transposeA, transposeB, transposeA ? 'b' : 'a');
        expect(tf.memory().numTensors - before, 'only the product is left').to.equal(1);
        expect(y.shape).to.deep.equal([batch, m, n]);
        expectClose(Float64Array.from(await y.data()), batchProduct64(a, b, batch, m, k, n, transposeA, transposeB), 1e-5,
            'value vs float64');
        tf.dispose([y, at, bt]);
      });
    }
  }

  it('runs MoEBatchProduct where the backend registers it, tf.matMul (its BatchMatMul) elsewhere', () => {
    const [a, b] = [tf.ones([2, 3, 4]) as tf.Tensor3D, tf.ones([2, 4, 5]) as tf.Tensor3D];
    const registered = tf.getKernel(BATCH_PRODUCT, tf.getBackend()) != null;
    let y: tf.Tensor | undefined;
    expect(countKernels(BATCH_PRODUCT, () => { y = batchProduct(a, b); })).to.equal(registered ? 1 : 0);
    expect(countKernels(tf.BatchMatMul, () => tf.dispose(batchProduct(a, b)))).to.equal(registered ? 0 : 1);
    tf.dispose([a, b, y!]);
  });

  it('with the tape on it is tf.matMul, whose gradients are float64\'s', async () => {
    const rng = new Rng(7);
    const [batch, m, k, n] = [2, 3, 4, 5];
    const a = asF32(rng.array(batch * m * k));
    const b = asF32(rng.array(batch * k * n));
    const dy = asF32(rng.array(batch * m * n));
    const [at, bt, dyt] = [tensorOf(a, [batch, m, k]), tensorOf(b, [batch, k, n]), tensorOf(dy, [batch, m, n])];
    const before = tf.memory().numTensors;
    let grads: tf.Tensor[] = [];
    const kernels = countKernels(BATCH_PRODUCT, () => {
      grads = tf.grads((x: tf.Tensor, w: tf.Tensor) => tf.sum(tf.mul(batchProduct(x as tf.Tensor3D, w as tf.Tensor3D), dyt)))([at, bt]);
    });
    expect(kernels).to.equal(0);
    expect(tf.memory().numTensors - before).to.equal(2);
    // dA_b = dY_b·B_bᵀ, dB_b = A_bᵀ·dY_b
    expectClose(Float64Array.from(await grads[0].data()), batchProduct64(dy, b, batch, m, n, k, false, true), 1e-5, 'dA vs float64');
    expectClose(Float64Array.from(await grads[1].data()), batchProduct64(a, dy, batch, k, m, n, true, false), 1e-5, 'dB vs float64');
    tf.dispose([...grads, at, bt, dyt]);
  });

  it('rejects each bad argument with the op, the argument and the shapes, computing nothing', () => {
    const a = tf.zeros([2, 3, 4]) as tf.Tensor3D;
    const b = tf.zeros([2, 4, 5]) as tf.Tensor3D;
    const flat = tf.zeros([3, 4]) as unknown as tf.Tensor3D;
    const ints = tf.zeros([2, 4, 5], 'int32') as tf.Tensor3D;
    const otherBatch = tf.zeros([3, 4, 5]) as tf.Tensor3D;
    const before = tf.memory().numTensors;
    expect(() => batchProduct(flat, b)).to.throw("`batchProduct()`: 'a' must be 3-D but got shape [3,4]");
    expect(() => batchProduct(a, ints)).to.throw("`batchProduct()`: 'b' must be float32 but got int32 (shape [2,4,5])");
    expect(() => batchProduct(a, otherBatch)).to.throw("`batchProduct()`: 'b' must have a's batch 2 but got 3 (a [2,3,4], b [3,4,5])");
    expect(() => batchProduct(a, b, true)).to.throw('`batchProduct()`: the inner sizes must agree but a gives 3 and b 4 (a [2,3,4]ᵀ, b [2,4,5])');
    expect(() => batchProduct(a, b, false, true)).to.throw('`batchProduct()`: the inner sizes must agree but a gives 4 and b 5 (a [2,3,4], b [2,4,5]ᵀ)');
    expect(() => batchProduct(a, b, false, false, 'dy' as 'a')).to.throw("`batchProduct()`: 'gradient' must be one of 'none', 'a', 'b' but got 'dy'");
    expect(tf.memory().numTensors).to.equal(before);
    tf.dispose([a, b, flat, ints, otherBatch]);
  });
});
