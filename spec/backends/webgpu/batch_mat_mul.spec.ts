/**
 * tfjs-webgpu's matMul as this package leaves it (src/backends/webgpu/batch_mat_mul.ts): the
 * products its split-K program got wrong (a transposed B, K ≥ 2000, few output tiles: LoRA's
 * x·Aᵀ at width 2048 on short inputs) against float64 JS, plain and fused; the choice restated
 * from tfjs-webgpu; the program flag left as it was. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { picksTransposedSplitK } from '../../../src/backends/webgpu/batch_mat_mul.js';
import { registerMoEKernels } from '../../../src/backends/register_all_kernels.js';
import { Rng } from '../../helpers/numeric.js';
import { expectCloseAsync, expectNoLeakAsync } from './helpers.js';

/** op(A)·op(B) in float64, A [m, k] or [k, m], B [k, n] or [n, k], row-major. */
function product64(a: Float32Array, b: Float32Array, m: number, k: number, n: number, transposeA: boolean, transposeB: boolean): Float64Array {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let p = 0; p < k; p++) s += a[transposeA ? p * m + i : i * k + p] * b[transposeB ? j * k + p : p * n + j];
      out[i * n + j] = s;
    }
  }
  return out;
}

describe('webgpu: matMul where tfjs-webgpu picks its split-K program', function () {
  this.timeout(120_000);
  before(() => registerMoEKernels('webgpu'));
  const rng = new Rng(7);
  const backend = () => tf.backend() as unknown as { thresholdToIncreaseWorkgroups: number };
  const fakeInfo = (shape: number[]) => ({ shape, dtype: 'float32', dataId: {} }) as unknown as tf.TensorInfo;

  // [rows, K] · [out, K]ᵀ: LoRA's x·Aᵀ (out = r) and a few neighbours, every transpose
  for (const [m, k, n] of [[32, 2048, 8], [64, 2048, 8], [7, 2048, 12], [32, 4096, 16]]) {
    for (const [transposeA, transposeB] of [[false, true], [true, true], [false, false], [true, false]]) {
      it(`[${m}, ${k}] · [${k}, ${n}] with transposeA ${transposeA}, transposeB ${transposeB}, plain and fused (bias, relu)`, async () => {
        const [a, b, bias] = [m * k, k * n, n].map(size => Float32Array.from(rng.array(size)));
        const expected = product64(a, b, m, k, n, transposeA, transposeB);
        const fused = Float64Array.from(expected, (v, i) => Math.max(0, v + bias[i % n]));
        await expectNoLeakAsync(async () => {
          const ta = tf.tensor2d(a, transposeA ? [k, m] : [m, k]);
          const tb = tf.tensor2d(b, transposeB ? [n, k] : [k, n]);
          const tbias = tf.tensor1d(bias);
          const y = tf.matMul(ta, tb, transposeA, transposeB);
          const yf = tf.fused.matMul({ a: ta, b: tb, transposeA, transposeB, bias: tbias, activation: 'relu' });
          await expectCloseAsync(y, expected, 1e-5, 'matMul', [m, n]);
          await expectCloseAsync(yf, fused, 1e-5, 'fused matMul', [m, n]);
          tf.dispose([ta, tb, tbias, y, yf]);
        });
        expect(tf.env().getNumber('WEBGPU_MATMUL_PROGRAM_TYPE'), 'the program flag is left as it was').to.equal(-1);
      });
    }
  }

  it("restates tfjs-webgpu's choice: split-K with a transposed B only for batch 1, K >= 2000, few output tiles, and an automatic program", () => {
    const picks = (aShape: number[], bShape: number[], transposeA = false) =>
      picksTransposedSplitK(fakeInfo(aShape), fakeInfo(bShape), transposeA, true, backend());
    expect(picks([32, 2048], [8, 2048])).to.equal(true);
    expect(picks([2048, 32], [8, 2048], true)).to.equal(true);
    expect(picks([32, 1999], [8, 1999]), 'K < 2000: the small-output program already').to.equal(false);
    expect(picks([8, 2048], [16, 2048]), '128 outputs or fewer: the reduce program').to.equal(false);
    expect(picks([4096, 2048], [8, 2048]), 'many tiles: the packed program').to.equal(false);
    expect(picks([2, 32, 2048], [2, 8, 2048]), 'batch 2').to.equal(false);
    expect(picksTransposedSplitK(fakeInfo([32, 2048]), fakeInfo([2048, 8]), false, false, backend())).to.equal(false);
    tf.env().set('WEBGPU_MATMUL_PROGRAM_TYPE', 3);
    try {
      expect(picks([32, 2048], [8, 2048]), 'a program the user fixed is left alone').to.equal(false);
    } finally {
      tf.env().set('WEBGPU_MATMUL_PROGRAM_TYPE', -1);
    }
  });
});
