/**
 * The dense LoRA products of rank r ≤ 16 on webgpu (attention's q/k/v/o and the router, through
 * loraLinear): s·x·Aᵀ and s·dy·B (MoEScaledMatMul) run DenseNarrowMatMulProgram, dA = gᵀ·x and
 * dB = dyᵀ·u (MoEWeightGradProduct) NarrowWeightGradProgram over chunks of rows and
 * NarrowWeightGradSumProgram adding them, y + u·Bᵀ and dx + g·A (MoEMatMulAdd)
 * NarrowInnerGroupedMatMulProgram, the narrow ones in their single-group forms (no plan inputs), with
 * WEBGPU_MOE_NARROW_PRODUCTS and WEBGPU_MOE_DENSE_NARROW_PRODUCTS on; off, or r > 16,
 * ScaledMatMulProgram and tfjs's matMul as before. Values and gradients against float64 JS either
 * way: through loraLinear, and each product alone at odd row counts (1, 17, 333, 2053: partial
 * row blocks, one chunk, several with a ragged last one), r 1, 8, 16 and 64 (past the narrow
 * programs), both layouts of the factor, vec4 and per-column expansions; the weight gradient at
 * chunk sizes that do not divide the rows and at the chunk flag's; DenseNarrowMatMulProgram alone in
 * every layout at odd rows and depths; no leaks, and no host data sent to the GPU per call (the
 * first version uploaded a one-group plan per call). Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import {
  DENSE_GRAD_CHUNK_ROWS_FLAG, DENSE_NARROW_PRODUCTS_FLAG, denseNarrowLayoutFor, type KernelArgs, NARROW_PRODUCTS_FLAG,
  runNarrowDenseProduct, runNarrowDenseWeightGrad, runNarrowDenseWeightGradPair,
} from '../../../src/backends/webgpu/kernels.js';
import {
  DENSE_NARROW_LANES, DENSE_NARROW_ROWS_PER_THREAD, type DenseNarrowLanes, DenseNarrowMatMulProgram,
} from '../../../src/backends/webgpu/programs/dense_narrow_matmul_program.js';
import { loraLinear } from '../../../src/ops/lora/linear.js';
import { OpArgumentError } from '../../../src/ops/validate.js';
import { matMulAdd } from '../../../src/ops/matmul_add.js';
import { scaledMatMul } from '../../../src/ops/scaled_matmul.js';
import { WEIGHT_GRAD_PRODUCT, weightGradProduct, weightGradProductPair } from '../../../src/ops/weight_grad_product.js';
import { NARROW_GRAD_PAIR_SUM_PROGRAM, WEIGHT_GRAD_PAIRS_FLAG } from '../../../src/backends/webgpu/weight_grad_pairs.js';
import { asF32, Rng, tensorOf } from '../../helpers/numeric.js';
import {
  allowingNoTimestampWarning, expectCloseAsync, expectNoLeakAsync, withEnvFlag, withHostUploads, withOwnDispatches, withShaderKeys,
} from './helpers.js';

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

/**
 * the program families among shader keys: narrow (ours; `narrowPlanned`: those reading a plan;
 * `narrowProduct`: either program of the products r wide, `denseProduct`: DenseNarrowMatMulProgram),
 * the scaled program, tfjs's matMul
 */
function families(keys: string[]): { narrowProduct: number; denseProduct: number; narrowInner: number; narrowGrad: number;
    narrowGradPair: number; narrowGradSum: number; narrowPlanned: number; scaled: number; tfjsMatMul: number; tail: number } {
  return {
    narrowPlanned: keys.filter(k => k.startsWith('moeNarrow') && !k.endsWith('_single')).length,
    narrowInner: keys.filter(k => k.startsWith('moeNarrowInnerGroupedMatMul')).length,
    narrowProduct: keys.filter(k => k.startsWith('moeNarrowGroupedMatMul') || k.startsWith('moeDenseNarrowMatMul')).length,
    denseProduct: keys.filter(k => k.startsWith('moeDenseNarrowMatMul')).length,
    narrowGrad: keys.filter(k => k.startsWith('moeNarrowWeightGrad_')).length,
    narrowGradPair: keys.filter(k => k.startsWith('moeNarrowWeightGradPair_')).length,
    tail: keys.filter(k => k.startsWith('moeGroupedMatMul_') && k.endsWith('_loraTail')).length,
    narrowGradSum: keys.filter(k => k.startsWith('moeNarrowWeightGradSum')).length,
    scaled: keys.filter(k => k.startsWith('moeScaledMatMul')).length,
    tfjsMatMul: keys.filter(k => /^matMul/i.test(k)).length,
  };
}

/** Both flags the dense narrow route needs, on or off (both on by default). */
function withDenseNarrow<T>(on: boolean, fn: () => Promise<T>): Promise<T> {
  return withEnvFlag(NARROW_PRODUCTS_FLAG, on, () => withEnvFlag(DENSE_NARROW_PRODUCTS_FLAG, on, fn));
}

describe('webgpu: dense LoRA products of rank ≤ 16 run the narrow programs (issue 15)', () => {
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
          const { keys, value, grads, sums } = await withShaderKeys(recorded => withOwnDispatches(async own => {
            const result = tf.valueAndGrads((xs: tf.Tensor, a: tf.Tensor, b: tf.Tensor) =>
              loraLinear(xs as tf.Tensor2D, Wt, null, [{ A: a as tf.Tensor2D, B: b as tf.Tensor2D, scaling: s }]))([xt, At, Bt], dyt);
            return { keys: [...recorded], sums: [...own], ...result };
          }));
          const seen = families(keys);
          if (narrow) {
            // s·x·Aᵀ forward, s·dy·B backward, both DenseNarrowMatMulProgram; dA and dB as a pair: one
            // program for both chunked sums, one own dispatch adding them
            expect(seen.denseProduct, `shader keys: ${keys.join(', ')}`).to.equal(2);
            expect(seen.narrowProduct, `shader keys: ${keys.join(', ')}`).to.equal(2);
            expect(seen.narrowGradPair, `shader keys: ${keys.join(', ')}`).to.equal(1);
            expect(seen.narrowGrad + seen.narrowGradSum, `shader keys: ${keys.join(', ')}`).to.equal(0);
            expect(sums).to.deep.equal([NARROW_GRAD_PAIR_SUM_PROGRAM]);
            expect(seen.scaled, `shader keys: ${keys.join(', ')}`).to.equal(0);
            // the expansions y + u·Bᵀ (after the base product: WEBGPU_MOE_F32_LORA_TAIL is off by default) and
            // dx + g·A (after tfjs's dy·W), each with its sum in one program
            expect(seen.tail, `shader keys: ${keys.join(', ')}`).to.equal(0);
            expect(seen.narrowInner, `shader keys: ${keys.join(', ')}`).to.equal(2);
            // all in their single-group forms: no plan inputs
            expect(seen.narrowPlanned, `shader keys: ${keys.join(', ')}`).to.equal(0);
            // tfjs's matMul is left the base dy·W (x·Wᵀ is the grouped program with one group)
            expect(seen.tfjsMatMul, `shader keys: ${keys.join(', ')}`).to.be.at.most(1);
          } else {
            expect(seen.narrowProduct + seen.narrowInner + seen.narrowGrad + seen.narrowGradPair, `shader keys: ${keys.join(', ')}`).to.equal(0);
            expect(seen.scaled, `shader keys: ${keys.join(', ')}`).to.equal(2);
            expect(sums).to.deep.equal([]);
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
  // each product alone at odd row counts: partial 16-, 32- and 64-row blocks, one 128-row chunk,
  // several with a ragged last one; r 64 is past the narrow programs (ScaledMatMulProgram, tfjs's matMul)
  const rowCounts = [1, 17, 333, 2048 + 5];
  const ranks = [1, 8, 16, 64];
  const kernelArgs = () => ({ inputs: {}, backend: tf.backend(), attrs: {} }) as unknown as KernelArgs;
  for (const [index, rows] of rowCounts.entries()) {
    // the expansions' width: a multiple of 4 past one 128-column block (vec4), or not (per column)
    const wide = index % 2 === 0 ? 132 : 70;
    for (const r of ranks) {
      const narrow = r <= 16;
      for (const transposeB of [true, false]) {
        it(`${rows} rows, r ${r}, ${transposeB ? 'b [n, k] (A of s·x·Aᵀ, B of y + u·Bᵀ)' : 'b [k, n] (B of s·dy·B, A of dx + g·A)'}: ` +
            `s·a·op(b) and addend + u·op(w) as float64 gives them, ${narrow ? 'single-group narrow programs' : 'the programs before'}`, async () => {
          const rng = new Rng(rows * 131 + r * 7 + (transposeB ? 1 : 0));
          const s = 1.75;
          // the product r wide: a [rows, wide] · op(b) with b [r, wide] (transposed) or [wide, r]
          const a = asF32(rng.array(rows * wide));
          const b = asF32(rng.array(r * wide, 0.2));
          // the expansion: addend [rows, wide] + u [rows, r] · op(w), w [wide, r] (transposed) or [r, wide]
          const u = asF32(rng.array(rows * r));
          const w = asF32(rng.array(wide * r, 0.2));
          const addend = asF32(rng.array(rows * wide));
          const productWant = scaled(product64(a, b, rows, wide, r, false, transposeB), s);
          const expansionWant = sum(addend, product64(u, w, rows, r, wide, false, transposeB));
          const [at, bt, ut, wt, addt] = [tensorOf(a, [rows, wide]), tensorOf(b, transposeB ? [r, wide] : [wide, r]),
            tensorOf(u, [rows, r]), tensorOf(w, transposeB ? [wide, r] : [r, wide]), tensorOf(addend, [rows, wide])] as tf.Tensor2D[];
          await withDenseNarrow(true, () => expectNoLeakAsync(async () => {
            const { keys, product, expansion } = await withShaderKeys(async recorded => ({
              product: scaledMatMul(at, bt, transposeB, s), expansion: matMulAdd(ut, wt, false, transposeB, addt), keys: recorded,
            }));
            const seen = families(keys);
            expect(seen.narrowProduct, `shader keys: ${keys.join(', ')}`).to.equal(narrow ? 1 : 0);
            expect(seen.denseProduct, `shader keys: ${keys.join(', ')}`).to.equal(narrow ? 1 : 0);
            expect(seen.narrowInner, `shader keys: ${keys.join(', ')}`).to.equal(narrow ? 1 : 0);
            expect(seen.narrowPlanned, `shader keys: ${keys.join(', ')}`).to.equal(0);
            await expectCloseAsync(product, productWant, 1e-5, 's·a·op(b)', [rows, r]);
            await expectCloseAsync(expansion, expansionWant, 1e-5, 'addend + u·op(w)', [rows, wide]);
            tf.dispose([product, expansion]);
            if (!narrow) return;
            // the program before (NarrowGroupedMatMulProgram's single-group form, which the bench
            // times against DenseNarrowMatMulProgram) at 1 and 2 rows a thread (16- and 32-row blocks)
            for (const rowsPerThread of [1, 2] as const) {
              const grouped = tf.engine().makeTensorFromTensorInfo(
                runNarrowDenseProduct(kernelArgs(), at, bt, transposeB, s, { program: 'grouped', rowsPerThread }));
              await expectCloseAsync(grouped, productWant, 1e-5, `s·a·op(b), grouped, ${rowsPerThread} rows a thread`, [rows, r]);
              grouped.dispose();
            }
          }));
          tf.dispose([at, bt, ut, wt, addt]);
        });
      }
    }
  }

  // the weight gradient aᵀ·b, narrow on P (dA = gᵀ·x) or on Q (dB = dyᵀ·u): at the kernel's chunk
  // (128 rows: 1, 17 one ragged chunk; 333, 2053 several, the last ragged) and at 7 and 100 rows a
  // chunk through runNarrowDenseWeightGrad (neither divides the rows), the chunks summed in order
  for (const rows of rowCounts) {
    for (const r of ranks) {
      for (const side of ['P', 'Q'] as const) {
        it(`weight gradient over ${rows} rows, ${side} = r ${r}: aᵀ·b as float64 gives it at chunks of 128` +
            `${r <= 16 ? ', 7 and 100 rows, single-group narrow programs' : " (tfjs's matMul)"}`, async () => {
          const wide = 300;
          const [P, Q] = side === 'P' ? [r, wide] : [wide, r];
          const rng = new Rng(rows * 17 + r + (side === 'P' ? 0 : 1));
          const a = asF32(rng.array(rows * P));
          const b = asF32(rng.array(rows * Q));
          const want = product64(a, b, P, rows, Q, true, false);
          const [at, bt] = [tensorOf(a, [rows, P]), tensorOf(b, [rows, Q])] as tf.Tensor2D[];
          const backend = tf.backend() as unknown as { numDataIds(): number };
          const dataIds = backend.numDataIds();
          await withDenseNarrow(true, () => expectNoLeakAsync(async () => {
            const { keys, result } = await withShaderKeys(async recorded => ({ result: weightGradProduct(at, bt), keys: recorded }));
            const seen = families(keys);
            expect(seen.narrowGrad, `shader keys: ${keys.join(', ')}`).to.equal(r <= 16 ? 1 : 0);
            expect(seen.narrowGradSum, `shader keys: ${keys.join(', ')}`).to.equal(seen.narrowGrad);
            expect(seen.narrowPlanned, `shader keys: ${keys.join(', ')}`).to.equal(0);
            await expectCloseAsync(result, want, 1e-5, 'aᵀ·b', [P, Q]);
            result.dispose();
            if (r > 16) return;
            for (const chunkRows of [7, 100]) {
              const chunked = tf.engine().makeTensorFromTensorInfo(runNarrowDenseWeightGrad(kernelArgs(), at, bt, chunkRows));
              await expectCloseAsync(chunked, want, 1e-5, `aᵀ·b at ${chunkRows} rows a chunk`, [P, Q]);
              chunked.dispose();
            }
          }));
          // the chunks' partial sums are backend data, not tensors
          expect(backend.numDataIds(), 'backend data left behind').to.equal(dataIds);
          tf.dispose([at, bt]);
        });
      }
    }
  }

  it('uploads nothing: a layer\'s dense LoRA products (u, g, dA, dB, y + u·Bᵀ, dx + g·A) send no host data to the GPU', async () => {
    const [n, inSize, out, r] = [333, 70, 132, 8];
    const rng = new Rng(5);
    const t = (shape: [number, number]) => tensorOf(asF32(rng.array(shape[0] * shape[1])), shape) as tf.Tensor2D;
    const [x, A, B, dy, u, g, y, dx] = [t([n, inSize]), t([r, inSize]), t([out, r]), t([n, out]), t([n, r]), t([n, r]),
      t([n, out]), t([n, inSize])];
    const layer = () => [scaledMatMul(x, A, true, 2), scaledMatMul(dy, B, false, 2), ...weightGradProductPair(g, x, dy, u),
      matMulAdd(u, B, false, true, y), matMulAdd(g, A, false, false, dx)];
    await withDenseNarrow(true, async () => {
      // the counter sees what the first version did per call: a one-group plan made with values and uploaded
      const backend = tf.backend() as unknown as {
        makeTensorInfo(shape: number[], dtype: tf.DataType, values?: tf.BackendValues): tf.TensorInfo;
        uploadToGPU(dataId: tf.DataId): void; disposeData(dataId: tf.DataId): void;
      };
      const planned = await withHostUploads(async uploads => {
        const seg = backend.makeTensorInfo([3], 'int32', Int32Array.of(0, n, n));
        backend.uploadToGPU(seg.dataId);
        backend.disposeData(seg.dataId);
        return { ...uploads };
      });
      expect(planned, 'the counter on a plan upload').to.deep.equal({ writes: 1, copies: 1 });
      // inputs on the GPU and programs compiled first: the second layer is the steady state
      tf.dispose(layer());
      await expectNoLeakAsync(async () => {
        const { keys, counted, outs } = await withShaderKeys(recorded => withHostUploads(async uploads => {
          const results = layer();
          return { keys: recorded, counted: { ...uploads }, outs: results };
        }));
        const seen = families(keys);
        expect(seen.narrowProduct + seen.narrowInner + seen.narrowGradPair, `shader keys: ${keys.join(', ')}`).to.equal(5);
        // u and g on DenseNarrowMatMulProgram: the check covers the kernel's program
        expect(seen.denseProduct, `shader keys: ${keys.join(', ')}`).to.equal(2);
        expect(seen.narrowPlanned, `shader keys: ${keys.join(', ')}`).to.equal(0);
        expect(counted, 'host data sent to the GPU by the dense narrow products').to.deep.equal({ writes: 0, copies: 0 });
        // the results are real: read them (reads are not uploads)
        for (const o of outs) expect((await o.data()).every(Number.isFinite), 'finite results').to.equal(true);
        tf.dispose(outs);
      });
    });
    tf.dispose([x, A, B, dy, u, g, y, dx]);
  });

  it(`the weight gradient's chunk rows follow ${DENSE_GRAD_CHUNK_ROWS_FLAG} (7: 48 chunks, the last ragged); aᵀ·b as float64 gives it`, async () => {
    const [rows, P, Q] = [333, 8, 300];
    const rng = new Rng(77);
    const a = asF32(rng.array(rows * P));
    const b = asF32(rng.array(rows * Q));
    const [at, bt] = [tensorOf(a, [rows, P]), tensorOf(b, [rows, Q])] as tf.Tensor2D[];
    const partialRows = async () => {
      const { keys, result } = await withShaderKeys(async recorded => ({ result: weightGradProduct(at, bt), keys: recorded }));
      await expectCloseAsync(result, product64(a, b, P, rows, Q, true, false), 1e-5, 'aᵀ·b', [P, Q]);
      result.dispose();
      return keys;
    };
    await withDenseNarrow(true, () => expectNoLeakAsync(async () => {
      // the partial sums' first dimension is the chunk count: the flag reaches the program
      const backend = tf.backend() as unknown as { runWebGPUProgram(program: { outputShape: number[] }, ...rest: unknown[]): tf.TensorInfo };
      const run = backend.runWebGPUProgram;
      const own = Object.prototype.hasOwnProperty.call(backend, 'runWebGPUProgram');
      const partialShapes: number[][] = [];
      backend.runWebGPUProgram = function (program, ...rest) {
        if ((program as { shaderKey?: string }).shaderKey?.startsWith('moeNarrowWeightGrad_')) partialShapes.push(program.outputShape);
        return run.call(this, program, ...rest);
      };
      try {
        await withEnvFlag(DENSE_GRAD_CHUNK_ROWS_FLAG, 7, partialRows);
        await partialRows();
      } finally {
        if (own) backend.runWebGPUProgram = run;
        else delete (backend as { runWebGPUProgram?: unknown }).runWebGPUProgram;
      }
      expect(partialShapes).to.deep.equal([[Math.ceil(rows / 7), P, Q], [Math.ceil(rows / 128), P, Q]]);
    }));
    tf.dispose([at, bt]);
  });

  // a projection's two factor gradients together (dA = gᵀ·x narrow on P, dB = dyᵀ·u narrow on Q, as
  // loraLinear pairs them; or both on P), at equal and unequal ranks (the staged rows sized by the
  // wider), the second product's column blocks after the first's two (wide 300, then 70 or 300)
  const pairs: Array<{ name: string; shapes: [[number, number], [number, number]] }> = [
    { name: 'dA r 8 · dB r 8', shapes: [[8, 300], [70, 8]] },
    { name: 'dA r 1 · dB r 16', shapes: [[1, 300], [300, 16]] },
    { name: 'both narrow on P, r 16 and 4', shapes: [[16, 300], [4, 70]] },
  ];
  for (const rows of rowCounts) {
    for (const { name, shapes } of pairs) {
      it(`weight gradient pair over ${rows} rows, ${name}: the two weightGradProducts' results bit for bit (float64 within ` +
          '1e-5), in NarrowWeightGradPairProgram and one own sum, at chunks of 128, 7 and 100 rows', async () => {
        const rng = new Rng(rows * 19 + shapes[0][0] + shapes[1][1]);
        const [[P0, Q0], [P1, Q1]] = shapes;
        const [a0, b0, a1, b1] = [rows * P0, rows * Q0, rows * P1, rows * Q1].map(size => asF32(rng.array(size)));
        const [a0t, b0t, a1t, b1t] = [tensorOf(a0, [rows, P0]), tensorOf(b0, [rows, Q0]), tensorOf(a1, [rows, P1]),
          tensorOf(b1, [rows, Q1])] as tf.Tensor2D[];
        const backend = tf.backend() as unknown as { numDataIds(): number };
        const dataIds = backend.numDataIds();
        await withDenseNarrow(true, () => expectNoLeakAsync(async () => {
          const { keys, sums, pair } = await withShaderKeys(recorded => withOwnDispatches(async own =>
            ({ pair: weightGradProductPair(a0t, b0t, a1t, b1t), keys: [...recorded], sums: [...own] })));
          const seen = families(keys);
          expect(seen.narrowGradPair, `shader keys: ${keys.join(', ')}`).to.equal(1);
          expect(seen.narrowGrad + seen.narrowGradSum + seen.narrowPlanned, `shader keys: ${keys.join(', ')}`).to.equal(0);
          expect(sums).to.deep.equal([NARROW_GRAD_PAIR_SUM_PROGRAM]);
          const apart = [weightGradProduct(a0t, b0t), weightGradProduct(a1t, b1t)];
          for (const [i, [P, Q]] of shapes.entries()) {
            expect(pair[i].shape).to.deep.equal([P, Q]);
            expect(Array.from(await pair[i].data()), `product ${i}: bit for bit apart`).to.deep.equal(Array.from(await apart[i].data()));
            await expectCloseAsync(pair[i], product64([a0, a1][i], [b0, b1][i], P, rows, Q, true, false), 1e-5, `product ${i}`, [P, Q]);
          }
          tf.dispose([...pair, ...apart]);
          for (const chunkRows of [7, 100]) {
            const args = kernelArgs();
            const chunked = runNarrowDenseWeightGradPair(args, a0t, b0t, a1t, b1t, chunkRows).map(t => tf.engine().makeTensorFromTensorInfo(t));
            const single = [runNarrowDenseWeightGrad(args, a0t, b0t, chunkRows), runNarrowDenseWeightGrad(args, a1t, b1t, chunkRows)]
                .map(t => tf.engine().makeTensorFromTensorInfo(t));
            for (let i = 0; i < 2; i++) {
              expect(Array.from(await chunked[i].data()), `product ${i} at ${chunkRows} rows a chunk: bit for bit apart`)
                  .to.deep.equal(Array.from(await single[i].data()));
            }
            tf.dispose([...chunked, ...single]);
          }
        }));
        // the partial sums are backend data, not tensors
        expect(backend.numDataIds(), 'backend data left behind').to.equal(dataIds);
        tf.dispose([a0t, b0t, a1t, b1t]);
      });
    }
  }

  it(`the pair apart: ${WEIGHT_GRAD_PAIRS_FLAG} off, a product past r 16, unequal rows or no rows take the products one at a ` +
      'time; as float64 gives them', async () => {
    const rng = new Rng(91);
    const cases: Array<{ name: string; flag: boolean; shapes: Array<[number, number, number]>; programs: Partial<ReturnType<typeof families>> }> = [
      { name: 'flag off', flag: false, shapes: [[333, 8, 300], [333, 70, 8]], programs: { narrowGrad: 2, narrowGradSum: 2 } },
      { name: 'r 20', flag: true, shapes: [[40, 20, 300], [40, 70, 8]], programs: { narrowGrad: 1, narrowGradSum: 1, tfjsMatMul: 1 } },
      { name: 'unequal rows', flag: true, shapes: [[17, 8, 300], [33, 70, 8]], programs: { narrowGrad: 2, narrowGradSum: 2 } },
      { name: 'no rows', flag: true, shapes: [[0, 8, 300], [0, 70, 8]], programs: { narrowGrad: 0, narrowGradSum: 0 } },
    ];
    for (const { name, flag, shapes, programs } of cases) {
      const values = shapes.flatMap(([n, P, Q]) => [asF32(rng.array(n * P)), asF32(rng.array(n * Q))]);
      const tensors = shapes.flatMap(([n, P, Q], i) => [tensorOf(values[2 * i], [n, P]), tensorOf(values[2 * i + 1], [n, Q])]) as tf.Tensor2D[];
      await withDenseNarrow(true, () => withEnvFlag(WEIGHT_GRAD_PAIRS_FLAG, flag, () => expectNoLeakAsync(async () => {
        const { keys, sums, pair } = await withShaderKeys(recorded => withOwnDispatches(async own =>
          ({ pair: weightGradProductPair(tensors[0], tensors[1], tensors[2], tensors[3]), keys: [...recorded], sums: [...own] })));
        const seen = families(keys);
        for (const [family, count] of Object.entries(programs)) {
          expect(seen[family as keyof typeof seen], `${name}: ${family} (shader keys: ${keys.join(', ')})`).to.equal(count);
        }
        expect(seen.narrowGradPair, `${name}: shader keys: ${keys.join(', ')}`).to.equal(0);
        expect(sums, name).to.deep.equal([]);
        for (const [i, [n, P, Q]] of shapes.entries()) {
          await expectCloseAsync(pair[i], product64(values[2 * i], values[2 * i + 1], P, n, Q, true, false), 1e-5, `${name}: product ${i}`, [P, Q]);
        }
        tf.dispose(pair);
      })));
      tf.dispose(tensors);
    }
  });

  it(`the pair refuses clearly where the backend lacks the internals its sum records into, naming ${WEIGHT_GRAD_PAIRS_FLAG}; ` +
      'nothing left behind', async () => {
    const [g, x, dy, u] = [tf.ones([33, 8]), tf.ones([33, 40]), tf.ones([33, 24]), tf.ones([33, 8])] as tf.Tensor2D[];
    const backend = tf.backend() as unknown as { commandQueueOwnedIds: unknown; numDataIds(): number };
    const own = backend.commandQueueOwnedIds;
    const dataIds = backend.numDataIds();
    backend.commandQueueOwnedIds = undefined;
    try {
      await withDenseNarrow(true, () => expectNoLeakAsync(async () => {
        expect(() => weightGradProductPair(g, x, dy, u)).to.throw(OpArgumentError,
            new RegExp(`weightGradProductPair\\(\\)\`: needs tfjs-backend-webgpu 4\\.22's WebGPUBackend internals .* ${WEIGHT_GRAD_PAIRS_FLAG} to false`));
      }));
    } finally {
      backend.commandQueueOwnedIds = own;
    }
    expect(backend.numDataIds(), 'backend data left behind').to.equal(dataIds);
    tf.dispose([g, x, dy, u]);
  });

  it('the pair inside tf.time: its sum in a pass of its own, named in the profile, the results as outside', async () => {
    const [rows, r, inSize, out] = [333, 8, 300, 70];
    const rng = new Rng(93);
    const [g, x, dy, u] = [[rows, r], [rows, inSize], [rows, out], [rows, r]].map(shape =>
      tensorOf(asF32(rng.array(shape[0] * shape[1])), shape)) as tf.Tensor2D[];
    await withDenseNarrow(true, () => expectNoLeakAsync(async () => {
      const outside = weightGradProductPair(g, x, dy, u);
      let timed: tf.Tensor2D[] = [];
      const info = await allowingNoTimestampWarning(() => tf.time(() => { timed = weightGradProductPair(g, x, dy, u); })) as unknown as
          { getExtraProfileInfo?: () => string };
      expect(info.getExtraProfileInfo?.() ?? '', 'the profile names the sum').to.include(NARROW_GRAD_PAIR_SUM_PROGRAM);
      for (let i = 0; i < 2; i++) expect(Array.from(await timed[i].data())).to.deep.equal(Array.from(await outside[i].data()));
      tf.dispose([...outside, ...timed]);
    }));
    tf.dispose([g, x, dy, u]);
  });

  it(`rejects a ${DENSE_GRAD_CHUNK_ROWS_FLAG} that is not an integer in [1, 2^24], naming the op and the flag`, async () => {
    const [g, x] = [tf.zeros([33, 8]), tf.zeros([33, 40])] as tf.Tensor2D[];
    for (const bad of [0, 2.5, -3, 2 ** 24 + 1, NaN]) {
      await withDenseNarrow(true, () => expectNoLeakAsync(async () => {
        await withEnvFlag(DENSE_GRAD_CHUNK_ROWS_FLAG, bad, async () => {
          expect(() => weightGradProduct(g, x)).to.throw(
            `\`weightGradProduct()\`: the flag ${DENSE_GRAD_CHUNK_ROWS_FLAG} must be an integer in [1, ${2 ** 24}] but got ${bad} (number)`);
        });
      }));
    }
    tf.dispose([g, x]);
  });
});

/**
 * DenseNarrowMatMulProgram alone (through runNarrowDenseProduct's layouts): out = alpha·a·op(b) at
 * row counts that fill no workgroup (1, 3), end inside one (17, 333, 2053 at every layout's 2–32
 * rows), depths below one lane round (1, 5), with a ragged unrolled round (63, 1000) and whole ones
 * (2048), widths 1, 5 (a partial vec4 in the reduction), 8 and 16, b [n, k] (A of s·x·Aᵀ) and
 * [k, n] (B of s·dy·B), each lanes × rows-per-thread layout.
 */
describe('webgpu: DenseNarrowMatMulProgram (dense products r wide, lanes splitting k)', () => {
  const kernelArgs = () => ({ inputs: {}, backend: tf.backend(), attrs: {} }) as unknown as KernelArgs;
  const layouts = DENSE_NARROW_LANES.flatMap(lanes => DENSE_NARROW_ROWS_PER_THREAD.map(rowsPerThread => ({ lanes, rowsPerThread })));
  for (const rows of [1, 3, 17, 333, 2053]) {
    for (const inner of [1, 5, 63, 1000, 2048]) {
      it(`a [${rows}, ${inner}]: alpha·a·op(b) as float64 gives it for n 1, 5, 8, 16, both layouts of b, every layout ` +
          `(lanes ${DENSE_NARROW_LANES.join('/')} × rows a thread ${DENSE_NARROW_ROWS_PER_THREAD.join('/')})`, async () => {
        const rng = new Rng(rows * 31 + inner);
        const alpha = -1.75;
        const a = asF32(rng.array(rows * inner));
        const at = tensorOf(a, [rows, inner]) as tf.Tensor2D;
        for (const n of [1, 5, 8, 16]) {
          for (const transposeB of [true, false]) {
            const b = asF32(rng.array(n * inner, 0.2));
            const want = scaled(product64(a, b, rows, inner, n, false, transposeB), alpha);
            const bt = tensorOf(b, transposeB ? [n, inner] : [inner, n]) as tf.Tensor2D;
            await expectNoLeakAsync(async () => {
              for (const layout of layouts) {
                const { keys, out } = await withShaderKeys(async recorded => ({
                  out: tf.engine().makeTensorFromTensorInfo(runNarrowDenseProduct(kernelArgs(), at, bt, transposeB, alpha,
                    { program: 'dense', layout })),
                  keys: recorded,
                }));
                expect(keys).to.deep.equal([`moeDenseNarrowMatMul_${n}_${layout.lanes}_${layout.rowsPerThread}`]);
                await expectCloseAsync(out, want, 1e-5,
                  `n ${n}, b ${transposeB ? '[n, k]' : '[k, n]'}, lanes ${layout.lanes}, ${layout.rowsPerThread} rows a thread`, [rows, n]);
                out.dispose();
              }
            });
            bt.dispose();
          }
        }
        at.dispose();
      });
    }
  }

  it('the kernel\'s layout: 64 lanes, 1 row a thread below 2048 rows, 2 from there', () => {
    expect(denseNarrowLayoutFor(1)).to.deep.equal({ lanes: 64, rowsPerThread: 1 });
    expect(denseNarrowLayoutFor(2047)).to.deep.equal({ lanes: 64, rowsPerThread: 1 });
    expect(denseNarrowLayoutFor(2048)).to.deep.equal({ lanes: 64, rowsPerThread: 2 });
  });

  it('rejects widths past 16, unknown layouts and no rows, naming the argument, expected and actual', () => {
    const layout = { lanes: 64, rowsPerThread: 1 } as const;
    expect(() => new DenseNarrowMatMulProgram(8, 17, layout)).to.throw('DenseNarrowMatMulProgram: outCols must be an integer in [1, 16] but got 17');
    expect(() => new DenseNarrowMatMulProgram(8, 0, layout)).to.throw('DenseNarrowMatMulProgram: outCols must be an integer in [1, 16] but got 0');
    expect(() => new DenseNarrowMatMulProgram(8, 8, { lanes: 16 as DenseNarrowLanes, rowsPerThread: 1 }))
      .to.throw('DenseNarrowMatMulProgram: lanes must be one of 32, 64, 128 but got 16');
    expect(() => new DenseNarrowMatMulProgram(8, 8, { lanes: 64, rowsPerThread: 3 as 1 }))
      .to.throw('DenseNarrowMatMulProgram: rowsPerThread must be one of 1, 2, 4 but got 3');
    expect(() => new DenseNarrowMatMulProgram(0, 8, layout)).to.throw('DenseNarrowMatMulProgram: rows must be a positive integer but got 0');
    // the dispatch: one workgroup per (256 / lanes)·rowsPerThread rows
    expect(new DenseNarrowMatMulProgram(2053, 8, { lanes: 32, rowsPerThread: 4 }).dispatch).to.deep.equal([Math.ceil(2053 / 32), 1, 1]);
    expect(new DenseNarrowMatMulProgram(2053, 8, { lanes: 128, rowsPerThread: 1 }).dispatch).to.deep.equal([Math.ceil(2053 / 2), 1, 1]);
  });
});
