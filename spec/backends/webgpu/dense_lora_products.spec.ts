/**
 * The dense LoRA products of rank r ≤ 16 on webgpu (attention's q/k/v/o and the router, through
 * loraLinear): s·x·Aᵀ and s·dy·B (MoEScaledMatMul) run NarrowGroupedMatMulProgram, dA = gᵀ·x and
 * dB = dyᵀ·u (MoEWeightGradProduct) NarrowWeightGradProgram over chunks of rows and
 * NarrowWeightGradSumProgram adding them, with
 * WEBGPU_MOE_NARROW_PRODUCTS on (the default); off, or r > 16, ScaledMatMulProgram and tfjs's
 * matMul as before. Values and gradients against float64 JS either way, at one group of rows and
 * at several (a ragged last one), a reduction past one 64-deep chunk with a ragged end, and output
 * columns past one 256-column block; no leaks. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { DENSE_NARROW_PRODUCTS_FLAG, NARROW_PRODUCTS_FLAG, rowGroupSegments } from '../../../src/backends/webgpu/kernels.js';
import { loraLinear } from '../../../src/ops/lora/linear.js';
import { scaledMatMul } from '../../../src/ops/scaled_matmul.js';
import { WEIGHT_GRAD_PRODUCT, weightGradProduct } from '../../../src/ops/weight_grad_product.js';
import { asF32, Rng, tensorOf } from '../../helpers/numeric.js';
import { expectCloseAsync, expectNoLeakAsync, withEnvFlag, withShaderKeys } from './helpers.js';

/** float64 a·op(b): a [m, k], b [k, n] or ([n, k], transposeB); op(a) = aᵀ with transposeA (a [k, m]) */
function product64(a: Float64Array, b: Float64Array, m: number, k: number, n: number, transposeA: boolean, transposeB: boolean): Float64Array {
  const out = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let p = 0; p < k; p++) s += (transposeA ? a[p * m + i] : a[i * k + p]) * (transposeB ? b[j * k + p] : b[p * n + j]);
      out[i * n + j] = s;
    }
  }
  return out;
}

const scaled = (v: Float64Array, s: number) => v.map(e => e * s);
const sum = (u: Float64Array, v: Float64Array) => u.map((e, i) => e + v[i]);

/** the program families among shader keys: narrow (ours), the scaled program, tfjs's matMul */
function families(keys: string[]):
    { narrowProduct: number; narrowInner: number; narrowGrad: number; narrowGradSum: number; scaled: number; tfjsMatMul: number } {
  return {
    narrowInner: keys.filter(k => k.startsWith('moeNarrowInnerGroupedMatMul')).length,
    narrowProduct: keys.filter(k => k.startsWith('moeNarrowGroupedMatMul')).length,
    narrowGrad: keys.filter(k => k.startsWith('moeNarrowWeightGrad_')).length,
    narrowGradSum: keys.filter(k => k.startsWith('moeNarrowWeightGradSum')).length,
    scaled: keys.filter(k => k.startsWith('moeScaledMatMul')).length,
    tfjsMatMul: keys.filter(k => /^matMul/i.test(k)).length,
  };
}

/** Both flags the dense narrow route needs (DENSE_NARROW_PRODUCTS_FLAG is off by default: per-call plan uploads). */
function withDenseNarrow<T>(on: boolean, fn: () => Promise<T>): Promise<T> {
  return withEnvFlag(NARROW_PRODUCTS_FLAG, on, () => withEnvFlag(DENSE_NARROW_PRODUCTS_FLAG, on, fn));
}

describe('webgpu: dense LoRA products of rank ≤ 16 run the narrow programs (issue 15)', () => {
  it('rowGroupSegments: starts then counts, the last group the rest, one empty group for no rows', () => {
    expect([...rowGroupSegments(300, 128)]).to.deep.equal([0, 128, 256, 300, 128, 128, 44]);
    expect([...rowGroupSegments(256, 128)]).to.deep.equal([0, 128, 256, 128, 128]);
    expect([...rowGroupSegments(5, 128)]).to.deep.equal([0, 5, 5]);
    expect([...rowGroupSegments(0, 128)]).to.deep.equal([0, 0, 0]);
  });

  // [N, in, out, r]: one group of rows (5) and three (300: 128, 128, 44); in 70 is past one 64-deep
  // chunk with a ragged end; out 270 past one 256-column block (dB narrow on its Q side)
  const cases: Array<[number, number, number, number]> = [[5, 70, 24, 8], [300, 70, 270, 8], [300, 20, 12, 3]];
  for (const [n, inSize, out, r] of cases) {
    for (const narrow of [true, false]) {
      it(`loraLinear x [${n},${inSize}], W [${out},${inSize}], r ${r}, narrow products ${narrow ? 'on' : 'off'}: ` +
          `${narrow ? 'the narrow programs, no scaled program or tfjs matMul for the rank-r products' : 'the programs before'}; ` +
          'y, dx, dA, dB as float64 gives them', async () => {
        const rng = new Rng(n * 7 + inSize + out + r);
        const s = 2.5;
        const x = asF32(rng.array(n * inSize));
        const W = asF32(rng.array(out * inSize, 0.2));
        const A = asF32(rng.array(r * inSize, 0.2));
        const B = asF32(rng.array(out * r, 0.2));
        const dy = asF32(rng.array(n * out));
        // float64: u = s·x·Aᵀ, y = x·Wᵀ + u·Bᵀ; g = s·dy·B, dx = dy·W + g·A, dA = gᵀ·x, dB = dyᵀ·u
        const u = scaled(product64(x, A, n, inSize, r, false, true), s);
        const y64 = sum(product64(x, W, n, inSize, out, false, true), product64(u, B, n, r, out, false, true));
        const g = scaled(product64(dy, B, n, out, r, false, false), s);
        const dx64 = sum(product64(dy, W, n, out, inSize, false, false), product64(g, A, n, r, inSize, false, false));
        const dA64 = product64(g, x, r, n, inSize, true, false);
        const dB64 = product64(dy, u, out, n, r, true, false);
        const [xt, Wt, At, Bt, dyt] = [tensorOf(x, [n, inSize]), tensorOf(W, [out, inSize]), tensorOf(A, [r, inSize]),
          tensorOf(B, [out, r]), tensorOf(dy, [n, out])] as tf.Tensor2D[];
        await withDenseNarrow(narrow, () => expectNoLeakAsync(async () => {
          const { keys, value, grads } = await withShaderKeys(async recorded => {
            const result = tf.valueAndGrads((xs: tf.Tensor, a: tf.Tensor, b: tf.Tensor) =>
              loraLinear(xs as tf.Tensor2D, Wt, null, [{ A: a as tf.Tensor2D, B: b as tf.Tensor2D, scaling: s }]))([xt, At, Bt], dyt);
            return { keys: [...recorded], ...result };
          });
          const seen = families(keys);
          if (narrow) {
            // s·x·Aᵀ forward, s·dy·B backward; dA and dB
            expect(seen.narrowProduct, `shader keys: ${keys.join(', ')}`).to.equal(2);
            expect(seen.narrowGrad, `shader keys: ${keys.join(', ')}`).to.equal(2);
            expect(seen.narrowGradSum, `shader keys: ${keys.join(', ')}`).to.equal(2);
            expect(seen.scaled, `shader keys: ${keys.join(', ')}`).to.equal(0);
            // the expansions y + u·Bᵀ and dx + g·A, their sums in the same program
            expect(seen.narrowInner, `shader keys: ${keys.join(', ')}`).to.equal(2);
            // tfjs's matMul is left the base dy·W (x·Wᵀ is the grouped program with one group)
            expect(seen.tfjsMatMul, `shader keys: ${keys.join(', ')}`).to.be.at.most(1);
          } else {
            expect(seen.narrowProduct + seen.narrowInner + seen.narrowGrad, `shader keys: ${keys.join(', ')}`).to.equal(0);
            expect(seen.scaled, `shader keys: ${keys.join(', ')}`).to.equal(2);
          }
          await expectCloseAsync(value, y64, 1e-5, 'y', [n, out]);
          await expectCloseAsync(grads[0], dx64, 1e-5, 'dx', [n, inSize]);
          await expectCloseAsync(grads[1], dA64, 1e-5, 'dA', [r, inSize]);
          await expectCloseAsync(grads[2], dB64, 1e-5, 'dB', [out, r]);
          tf.dispose([value, ...grads]);
        }));
        tf.dispose([xt, Wt, At, Bt, dyt]);
      });
    }
  }

  it('rank 20 (past 16): ScaledMatMulProgram and tfjs matMul, as before; values as float64', async () => {
    const [n, inSize, out, r] = [40, 24, 18, 20];
    const rng = new Rng(20);
    const [x, W, A, B, dy] = [rng.array(n * inSize), rng.array(out * inSize, 0.2), rng.array(r * inSize, 0.2),
      rng.array(out * r, 0.2), rng.array(n * out)].map(asF32);
    const g = product64(dy, B, n, out, r, false, false);
    const [xt, Wt, At, Bt, dyt] = [tensorOf(x, [n, inSize]), tensorOf(W, [out, inSize]), tensorOf(A, [r, inSize]),
      tensorOf(B, [out, r]), tensorOf(dy, [n, out])] as tf.Tensor2D[];
    await expectNoLeakAsync(async () => {
      const { keys, value, grads } = await withShaderKeys(async recorded => {
        const result = tf.valueAndGrads((a: tf.Tensor) =>
          loraLinear(xt, Wt, null, [{ A: a as tf.Tensor2D, B: Bt, scaling: 1 }]))([At], dyt);
        return { keys: [...recorded], ...result };
      });
      const seen = families(keys);
      expect(seen.narrowProduct + seen.narrowGrad, `shader keys: ${keys.join(', ')}`).to.equal(0);
      expect(seen.scaled, `shader keys: ${keys.join(', ')}`).to.equal(2);
      await expectCloseAsync(grads[0], product64(g, x, r, n, inSize, true, false), 1e-5, 'dA', [r, inSize]);
      tf.dispose([value, ...grads]);
    });
    tf.dispose([xt, Wt, At, Bt, dyt]);
  });

  it('no rows: s·x·Aᵀ is [0, r] and aᵀ·b zeros [P, Q], no narrow program, no validation error; no leak', async () => {
    const [x, A, dy, u] = [tf.zeros([0, 6]), tf.ones([3, 6]), tf.zeros([0, 5]), tf.zeros([0, 3])] as tf.Tensor2D[];
    const device = (tf.backend() as unknown as { device: GPUDevice }).device;
    await expectNoLeakAsync(async () => {
      // tfjs's matMul on an empty a binds a zero-sized buffer, which Dawn rejects: the kernel must not run one
      device.pushErrorScope('validation');
      const { keys, down, dB } = await withShaderKeys(async recorded =>
        ({ down: scaledMatMul(x, A, true, 2), dB: weightGradProduct(dy, u), keys: recorded }));
      const seen = families(keys);
      expect(seen.narrowProduct + seen.narrowGrad, `shader keys: ${keys.join(', ')}`).to.equal(0);
      expect(down.shape).to.deep.equal([0, 3]);
      await expectCloseAsync(dB, new Float64Array(5 * 3), 0, 'dB', [5, 3]);
      const error = await device.popErrorScope();
      expect(error?.message, 'validation error').to.equal(undefined);
      tf.dispose([down, dB]);
    });
    tf.dispose([x, A, dy, u]);
  });

  // [N, P, Q]: narrow on P (dA's shape), on Q (dB's) over 3 groups and 2 column blocks, on neither
  const shapes: Array<[number, number, number]> = [[300, 4, 270], [300, 300, 16], [33, 17, 17]];
  for (const [n, P, Q] of shapes) {
    it(`weightGradProduct a [${n},${P}], b [${n},${Q}]: aᵀ·b as float64 gives it, ` +
        `${Math.min(P, Q) <= 16 ? 'NarrowWeightGradProgram' : "tfjs's matMul"}`, async () => {
      expect(tf.getKernel(WEIGHT_GRAD_PRODUCT, 'webgpu'), 'MoEWeightGradProduct is registered on webgpu').to.not.equal(undefined);
      const rng = new Rng(n + P + Q);
      const a = asF32(rng.array(n * P));
      const b = asF32(rng.array(n * Q));
      const [at, bt] = [tensorOf(a, [n, P]), tensorOf(b, [n, Q])] as tf.Tensor2D[];
      // the kernel's own buffers (the segments, the groups' partial products) are backend data, not tensors
      const backend = tf.backend() as unknown as { numDataIds(): number };
      const dataIds = backend.numDataIds();
      await withDenseNarrow(true, () => expectNoLeakAsync(async () => {
        const { keys, result } = await withShaderKeys(async recorded => ({ result: weightGradProduct(at, bt), keys: recorded }));
        const seen = families(keys);
        expect(seen.narrowGrad, `shader keys: ${keys.join(', ')}`).to.equal(Math.min(P, Q) <= 16 ? 1 : 0);
        expect(seen.narrowGradSum, `shader keys: ${keys.join(', ')}`).to.equal(seen.narrowGrad);
        await expectCloseAsync(result, product64(a, b, P, n, Q, true, false), 1e-5, 'aᵀ·b', [P, Q]);
        result.dispose();
      }));
      expect(backend.numDataIds(), 'backend data left behind').to.equal(dataIds);
      tf.dispose([at, bt]);
    });
  }
});
