/**
 * The fused experts' kernels (src/ops/experts/kernels.ts) on the active backend, and the stock-op
 * composition the ops fall back to where no kernel is registered: both against float64 JS
 * references written here, on odd shapes, empty experts and repeated gather indices.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { moeKernelNames } from '../../src/backends/register_all_kernels.js';
import {
  MOE_KERNEL_NAMES, combineRows, expertActivation, expertActivationGrad, groupedProduct, groupedWeightGrad,
  pairRowDot,
} from '../../src/ops/experts/kernels.js';
import { packExpertWeight, unpackExpertWeight } from '../../src/ops/packed.js';
import type { ExpertActivation } from '../../src/ops/types.js';
import { WEIGHT_CACHE_BYTES_FLAG, clearWasmWeightCache, wasmWeightCacheSize } from '../../src/backends/wasm/moe_kernels.js';
import { SIMD_KERNELS_FLAG } from '../../src/backends/wasm/moe_simd.js';
import { Rng, asF32, expectClose, expectNoLeak, finiteDifferences, tensorOf } from '../helpers/numeric.js';

const BACKEND = tf.getBackend.bind(tf);

/**
 * Runs `fn` once with this package's kernels and once with them unregistered (the composition);
 * on wasm also with the kernels' JS loops instead of the SIMD module (src/backends/wasm/moe_simd.ts).
 */
function bothPaths(fn: (path: string) => void): void {
  fn('kernel');
  if (BACKEND() === 'wasm') {
    const simd = tf.env().getBool(SIMD_KERNELS_FLAG);
    tf.env().set(SIMD_KERNELS_FLAG, false);
    try {
      fn('kernel, JS loops');
    } finally {
      tf.env().set(SIMD_KERNELS_FLAG, simd);
    }
  }
  const saved = MOE_KERNEL_NAMES.map(n => tf.getKernel(n, BACKEND())).filter(k => k != null) as tf.KernelConfig[];
  saved.forEach(k => tf.unregisterKernel(k.kernelName, k.backendName));
  try {
    fn('composition');
  } finally {
    saved.forEach(k => tf.registerKernel(k));
  }
}

/** float64: per group e, X_e·W_e or X_e·W_eᵀ (+ bias[e]); X row r = x[rows[r]] or x[r]. */
function groupedProduct64(
    x: Float64Array, xCols: number, rows: number[] | null, w: Float64Array, shape: number[],
    groups: number[], transposeW: boolean, bias: Float64Array | null): Float64Array {
  const [, p, q] = shape;
  const [k, m] = transposeW ? [q, p] : [p, q];
  expect(xCols).to.equal(k);
  const n = groups.reduce((s, g) => s + g, 0);
  const out = new Float64Array(n * m);
  let r = 0;
  groups.forEach((g, e) => {
    for (let i = 0; i < g; i++, r++) {
      const src = rows ? rows[r] : r;
      for (let j = 0; j < m; j++) {
        let s = bias ? bias[e * m + j] : 0;
        for (let c = 0; c < k; c++) {
          const wv = transposeW ? w[e * p * q + j * q + c] : w[e * p * q + c * q + j];
          s += x[src * k + c] * wv;
        }
        out[r * m + j] = s;
      }
    }
  });
  return out;
}

/** float64: out[e] = Σ_{rows r of e} a_rᵀ·b_r, [E, p, q]. */
function weightGrad64(
    a: Float64Array, p: number, aRows: number[] | null, b: Float64Array, q: number, bRows: number[] | null,
    groups: number[]): Float64Array {
  const out = new Float64Array(groups.length * p * q);
  let r = 0;
  groups.forEach((g, e) => {
    for (let i = 0; i < g; i++, r++) {
      const ar = aRows ? aRows[r] : r;
      const br = bRows ? bRows[r] : r;
      for (let u = 0; u < p; u++) for (let v = 0; v < q; v++) out[e * p * q + u * q + v] += a[ar * p + u] * b[br * q + v];
    }
  });
  return out;
}

const sig = (v: number) => 1 / (1 + Math.exp(-v));
/** PyTorch's gelu(approximate='tanh'), float64 */
const gelu64 = (g: number) => 0.5 * g * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (g + 0.044715 * g ** 3)));

/** float64 activation of one row of h [2I]. */
function activate64(h: Float64Array, inter: number, act: ExpertActivation, interleaved: boolean): Float64Array {
  const n = h.length / (2 * inter);
  const out = new Float64Array(n * inter);
  for (let r = 0; r < n; r++) {
    for (let j = 0; j < inter; j++) {
      const g = h[r * 2 * inter + (interleaved ? 2 * j : j)];
      const u = h[r * 2 * inter + (interleaved ? 2 * j + 1 : inter + j)];
      if (act.kind === 'swiglu') {
        out[r * inter + j] = g * sig(g) * u;
      } else if (act.kind === 'gegluTanh') {
        out[r * inter + j] = gelu64(g) * u;
      } else {
        const gg = Math.min(g, act.limit);
        const uu = Math.min(Math.max(u, -act.limit), act.limit);
        out[r * inter + j] = (uu + 1) * gg * sig(act.alpha * gg);
      }
    }
  }
  return out;
}

function randomRows(rng: Rng, n: number, from: number): number[] {
  const rows = Array.from({ length: n }, () => rng.int(from));
  if (n > 2) rows[1] = rows[0];   // a repeated index for sure
  return rows;
}

describe('MoE kernels', () => {
  it('are registered for cpu and wasm', () => {
    for (const b of ['cpu', 'wasm']) {
      expect(moeKernelNames(b)).to.include.members([...MOE_KERNEL_NAMES]);
    }
    for (const name of MOE_KERNEL_NAMES) expect(tf.getKernel(name, BACKEND()), name).to.not.equal(undefined);
  });

  describe('groupedProduct', () => {
    const E = 4;
    const groups = [3, 0, 5, 1];   // expert 1 has no rows
    const n = 9;
    // m <= 16 and m > 16 take different cpu paths (dot products vs row updates); on wasm, without a
    // bias, k <= 16 runs moe_simd's product_narrow_k (alpha and addTo folded in), else m <= 16
    // without addTo its product_narrow_m ([6, 21] and [21, 6] reach both in one layout or the other),
    // the rest XNNPACK
    for (const [p, q] of [[7, 5], [19, 23], [6, 21], [21, 6]]) {
      for (const transposeW of [false, true]) {
        for (const gather of [false, true]) {
          for (const extras of ['none', 'alpha, bias and addTo', 'alpha and addTo', 'alpha'] as const) {
            const label = `W${transposeW ? 'ᵀ' : ''} [${E},${p},${q}]${gather ? ', rows through an index' : ''}` +
                `${extras !== 'none' ? `, ${extras}` : ''}`;
            const [withBias, withAdd, withAlpha] = [extras === 'alpha, bias and addTo', extras.includes('addTo'), extras !== 'none'];
            it(label, () => {
              const rng = new Rng(11 + p + (transposeW ? 1 : 0) + (gather ? 2 : 0) + (withBias ? 4 : 0) + (withAdd ? 8 : 0) + (withAlpha ? 16 : 0));
              const [k, m] = transposeW ? [q, p] : [p, q];
              const srcRows = gather ? 6 : n;
              const x = asF32(rng.array(srcRows * k));
              const w = asF32(rng.array(E * p * q));
              const bias = withBias ? asF32(rng.array(E * m)) : null;
              const addTo = withAdd ? asF32(rng.array(n * m)) : null;
              const alpha = withAlpha ? -1.75 : 1;
              const rows = gather ? randomRows(rng, n, srcRows) : null;
              const product = groupedProduct64(x, k, rows, w, [E, p, q], groups, transposeW, null);
              const expertOfRow = groups.flatMap((g, e) => Array<number>(g).fill(e));
              const expected = product.map((v, i) => alpha * v +
                  (bias ? bias[expertOfRow[Math.floor(i / m)] * m + (i % m)] : 0) + (addTo ? addTo[i] : 0));
              bothPaths(path => expectNoLeak(() => {
                const y = tf.tidy(() => groupedProduct(
                    { t: tensorOf(x, [srcRows, k]) as tf.Tensor2D, index: rows ? tf.tensor1d(rows, 'int32') : undefined },
                    tensorOf(w, [E, p, q]) as tf.Tensor3D, groups, transposeW, {
                      bias: bias ? tensorOf(bias, [E, m]) as tf.Tensor2D : undefined,
                      addTo: addTo ? tensorOf(addTo, [n, m]) as tf.Tensor2D : undefined,
                      alpha: withAlpha ? alpha : undefined,
                    }));
                expect(y.shape, path).to.deep.equal([n, m]);
                expectClose(y, expected, 1e-5, path);
                y.dispose();
              }, path));
            });
          }
        }
      }
    }

    it('sizes around the gemm steps and their remainders (rows 1, 2, 7, 33; k = 37; m = 13 and 29)', () => {
      const rng = new Rng(21);
      const sizes = [1, 2, 7, 33];
      const total = sizes.reduce((s, v) => s + v, 0);
      for (const q of [13, 29]) {
        const p = 37;
        const x = asF32(rng.array(total * p));
        const w = asF32(rng.array(sizes.length * p * q));
        const expected = groupedProduct64(x, p, null, w, [sizes.length, p, q], sizes, false, null);
        bothPaths(path => expectNoLeak(() => {
          const y = tf.tidy(() => groupedProduct({ t: tensorOf(x, [total, p]) as tf.Tensor2D },
              tensorOf(w, [sizes.length, p, q]) as tf.Tensor3D, sizes, false));
          expectClose(y, expected, 1e-5, `${path}, m = ${q}`);
          y.dispose();
        }, path));
      }
    });
  });

  it('frozenW: the results of an unfrozen weight call after call, both layouts, float32 and packed bf16; ' +
      'wasm keeps one operator per expert and layout, drops those of disposed weights, stays within its byte budget', () => {
    const E = 3;
    const [p, q] = [19, 23];
    const groups = [4, 0, 6];   // expert 1 has no rows: nothing kept for it
    const n = 10;
    const rng = new Rng(41);
    const wasm = BACKEND() === 'wasm';
    const budget = tf.env().getNumber(WEIGHT_CACHE_BYTES_FLAG);
    if (wasm) clearWasmWeightCache(tf.backend());
    const before = tf.memory().numTensors;
    const w = asF32(rng.array(E * p * q));
    const wF = tensorOf(w, [E, p, q]) as tf.Tensor3D;
    const packed = packExpertWeight(wF, 'bf16');
    const unpacked = unpackExpertWeight(packed);
    const bf16Values = Float64Array.from(unpacked.dataSync());
    unpacked.dispose();
    for (const [name, weight, values] of [['float32', wF, w], ['bf16', packed, bf16Values]] as const) {
      for (const transposeW of [false, true]) {
        const k = transposeW ? q : p;
        const x = asF32(rng.array(n * k));
        const expected = groupedProduct64(x, k, null, values, [E, p, q], groups, transposeW, null);
        const xt = tensorOf(x, [n, k]) as tf.Tensor2D;
        const plain = groupedProduct({ t: xt }, weight, groups, transposeW);
        for (let call = 0; call < 2; call++) {   // the second call runs on the kept operators
          const y = groupedProduct({ t: xt }, weight, groups, transposeW, { frozenW: true });
          const label = `${name}, W${transposeW ? 'ᵀ' : ''}, call ${call}`;
          expectClose(y, expected, 1e-5, label);
          expect(Array.from(y.dataSync()), label).to.deep.equal(Array.from(plain.dataSync()));
          y.dispose();
        }
        tf.dispose([xt, plain]);
      }
    }
    if (wasm) {
      // 2 experts with rows × 2 layouts, for each of the two weights
      expect(wasmWeightCacheSize(tf.backend())).to.deep.equal({ entries: 8, bytes: 8 * p * q * 4 });
    }
    tf.dispose([wF, packed.packed]);
    const other = tensorOf(rng.array(E * p * q), [E, p, q]) as tf.Tensor3D;
    const xs = tf.ones([n, q]) as tf.Tensor2D;
    const run = () => tf.dispose(groupedProduct({ t: xs }, other, groups, true, { frozenW: true }));
    try {
      run();
      if (wasm) expect(wasmWeightCacheSize(tf.backend()), 'the disposed weights\' entries dropped').to.deep.equal({ entries: 2, bytes: 2 * p * q * 4 });
      tf.env().set(WEIGHT_CACHE_BYTES_FLAG, p * q * 4);   // room for one expert's block: the least recently used goes
      run();
      if (wasm) expect(wasmWeightCacheSize(tf.backend())).to.deep.equal({ entries: 1, bytes: p * q * 4 });
      tf.env().set(WEIGHT_CACHE_BYTES_FLAG, 0);
      if (wasm) clearWasmWeightCache(tf.backend());
      run();
      if (wasm) expect(wasmWeightCacheSize(tf.backend())).to.deep.equal({ entries: 0, bytes: 0 });
    } finally {
      tf.env().set(WEIGHT_CACHE_BYTES_FLAG, budget);
      tf.dispose([other, xs]);
    }
    expect(tf.memory().numTensors).to.equal(before);
  });

  describe('groupedWeightGrad', () => {
    // p = 6: q > p runs on wasm as (bᵀ·a)ᵀ (the narrow a packed), q < p as aᵀ·b
    const cases: Array<[boolean, boolean, number]> = [
      [false, false, 9], [true, false, 9], [false, true, 9], [true, true, 9], [false, false, 21], [true, true, 21],
      [false, false, 3], [true, false, 3], [false, true, 3], [true, true, 3]];
    for (const [aIdx, bIdx, q] of cases) {
      it(`Σ aᵀ·b per expert, q = ${q}${aIdx ? ', a through an index' : ''}${bIdx ? ', b through an index' : ''}; zeros for an empty expert`, () => {
        const rng = new Rng(31 + (aIdx ? 1 : 0) + (bIdx ? 2 : 0) + q);
        const groups = [4, 0, 1, 6];
        const n = 11, p = 6, src = 5;
        const aRows = aIdx ? randomRows(rng, n, src) : null;
        const bRows = bIdx ? randomRows(rng, n, src) : null;
        const a = asF32(rng.array((aIdx ? src : n) * p));
        const b = asF32(rng.array((bIdx ? src : n) * q));
        const expected = weightGrad64(a, p, aRows, b, q, bRows, groups);
        bothPaths(path => expectNoLeak(() => {
          const g = tf.tidy(() => groupedWeightGrad(
              { t: tensorOf(a, [aIdx ? src : n, p]) as tf.Tensor2D, index: aRows ? tf.tensor1d(aRows, 'int32') : undefined },
              { t: tensorOf(b, [bIdx ? src : n, q]) as tf.Tensor2D, index: bRows ? tf.tensor1d(bRows, 'int32') : undefined },
              groups));
          expect(g.shape, path).to.deep.equal([4, p, q]);
          expectClose(g, expected, 1e-5, path);
          expect(Array.from(g.dataSync().slice(p * q, 2 * p * q)).every(v => v === 0), `${path}: empty expert`).to.equal(true);
          g.dispose();
        }, path));
      });
    }
  });

  describe('expert activation', () => {
    const acts: Array<[string, ExpertActivation, boolean]> = [
      ['swiglu, gate/up halves', { kind: 'swiglu' }, false],
      ['clamped swiglu, interleaved', { kind: 'clampedSwiglu', alpha: 1.702, limit: 1.1 }, true],
      ['Gemma 4 geglu (tanh GELU), gate/up halves', { kind: 'gegluTanh' }, false],
    ];
    // I = 13 and 16: wasm's SIMD SwiGLU (eight columns a step, I >= 8); I = 6 its JS loop
    for (const [[name, act, interleaved], inter] of acts.flatMap(a => [6, 13, 16].map(i => [a, i] as const))) {
      it(`${name}, I = ${inter}: a, a·scale and dh (finite differences of the float64 forward)`, () => {
        const rng = new Rng(41);
        const n = 5;
        // wide values so that the clamps cut in both directions
        const h = asF32(rng.array(n * 2 * inter, 1.5));
        const scale = asF32(Float64Array.from({ length: n }, () => 0.3 + rng.uniform()));
        const da = asF32(rng.array(n * inter));
        const a64 = activate64(h, inter, act, interleaved);
        const aScaled = a64.map((v, i) => Math.fround(v) * scale[Math.floor(i / inter)]);
        // dh = ∂/∂h Σ da·scale·act(h)
        const loss = (hv: Float64Array) => activate64(hv, inter, act, interleaved)
            .reduce((s, v, i) => s + v * da[i] * scale[Math.floor(i / inter)], 0);
        const dh64 = finiteDifferences(loss, h);
        bothPaths(path => expectNoLeak(() => {
          tf.tidy(() => {
            const ht = tensorOf(h, [n, 2 * inter]) as tf.Tensor2D;
            const st = tensorOf(scale, [n]) as tf.Tensor1D;
            expectClose(expertActivation(ht, act, interleaved), a64, 1e-6, `${path}: a`);
            const [a, as] = expertActivation(ht, act, interleaved, st);
            expectClose(a, a64, 1e-6, `${path}: a (with scale)`);
            expectClose(as, aScaled, 1e-6, `${path}: a·scale`);
            const dh = expertActivationGrad(ht, tensorOf(da, [n, inter]) as tf.Tensor2D, act, interleaved, st);
            expect(dh.shape).to.deep.equal([n, 2 * inter]);
            expectClose(dh, dh64, 1e-5, `${path}: dh`);
          });
        }, path));
      });
    }
  });

  it('combineRows: weighted and unweighted sums of each token\'s rows', () => {
    const rng = new Rng(51);
    const t = 4, k = 3, cols = 5;
    const rowOfPair = [5, 0, 11, 3, 8, 1, 2, 10, 7, 9, 4, 6];   // a permutation of the 12 rows
    const y = asF32(rng.array(t * k * cols));
    const w = asF32(rng.array(t * k));
    const expect64 = (weighted: boolean) => {
      const out = new Float64Array(t * cols);
      for (let p = 0; p < t * k; p++) {
        for (let c = 0; c < cols; c++) out[Math.floor(p / k) * cols + c] += (weighted ? w[p] : 1) * y[rowOfPair[p] * cols + c];
      }
      return out;
    };
    bothPaths(path => expectNoLeak(() => {
      tf.tidy(() => {
        const yt = tensorOf(y, [t * k, cols]) as tf.Tensor2D;
        const idx = tf.tensor1d(rowOfPair, 'int32');
        expectClose(combineRows(yt, idx, t, k, tensorOf(w, [t, k]) as tf.Tensor2D), expect64(true), 1e-6, `${path}: weighted`);
        expectClose(combineRows(yt, idx, t, k), expect64(false), 1e-6, `${path}: unweighted`);
      });
    }, path));
  });

  it('pairRowDot: ⟨a, b⟩ of each pair\'s row as [T, K]', () => {
    const rng = new Rng(61);
    const t = 3, k = 2, cols = 7;
    const rowOfPair = [4, 1, 0, 5, 3, 2];
    const a = asF32(rng.array(t * k * cols));
    const b = asF32(rng.array(t * k * cols));
    const expected = rowOfPair.map(r => {
      let s = 0;
      for (let c = 0; c < cols; c++) s += a[r * cols + c] * b[r * cols + c];
      return s;
    });
    bothPaths(path => expectNoLeak(() => {
      const d = tf.tidy(() => pairRowDot(tensorOf(a, [t * k, cols]) as tf.Tensor2D, tensorOf(b, [t * k, cols]) as tf.Tensor2D,
          tf.tensor1d(rowOfPair, 'int32'), t, k));
      expect(d.shape).to.deep.equal([t, k]);
      expectClose(d, expected, 1e-6, path);
      d.dispose();
    }, path));
  });
});
