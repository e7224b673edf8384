/**
 * The package's SIMD module (src/backends/wasm/moe_simd.ts, source tools/wasm_simd/moe_simd.wat)
 * on a memory of its own, so on any TFJS_BACKEND: each function against its reference (float64
 * JS, or moe_math's JS loop where the result must be the same bit for bit), at sizes that are not
 * multiples of its steps, with the memory around every output checked untouched. The kernels'
 * use of it on the wasm heap is covered by spec/backends/moe_kernels.spec.ts.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import { combineRows, gatherRowsInto, gatherTransposeInto } from '../../src/backends/cpu/moe_math.js';
import { SIMD_KERNELS_FLAG, moeSimd, moeSimdSettled, type MoESimd } from '../../src/backends/wasm/moe_simd.js';
import { BYTES_PATH, WAT_PATH, renderBytesModule } from '../../tools/wasm_simd/build.js';
import { Rng } from '../helpers/numeric.js';

/** float32 unit roundoff */
const U = 2 ** -24;
/** a canary around outputs: the module must not write outside them */
const CANARY = 12345.5;

/**
 * Float regions on one wasm memory, each with 8 canary floats after it (and before the first).
 * `at` is a float index; the module takes byte addresses (`at · 4`).
 */
class Heap {
  readonly memory = new WebAssembly.Memory({ initial: 16 });
  readonly f32 = new Float32Array(this.memory.buffer);
  readonly i32 = new Int32Array(this.memory.buffer);
  private next = 8;
  private regions: Array<[number, number]> = [];
  constructor() { this.f32.fill(CANARY); }
  alloc(size: number, values?: ArrayLike<number>, int = false): number {
    const at = this.next;
    this.next += size + 8;
    this.regions.push([at, size]);
    if (values) (int ? this.i32 : this.f32).set(values, at);
    return at;
  }
  expectCanaries(label: string): void {
    for (const [at, size] of this.regions) {
      for (const i of [at - 1, at - 8, at + size, at + size + 7]) {
        expect(this.f32[i], `${label}: written next to a region`).to.equal(CANARY);
      }
    }
  }
}

function simdOn(heap: Heap): MoESimd {
  const simd = moeSimd({ asm: { memory: heap.memory } });
  expect(simd, 'the module loads on a plain WebAssembly.Memory').to.not.equal(null);
  return simd!;
}

const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));

/** Gate values over the whole range: normal ones, and the exp's clamps and silu′'s zero (g ≈ −1.278). */
function gateValues(rng: Rng, n: number): Float32Array {
  const special = [-100, -88, -87.3, -87, -30, -1.2785, -1e-3, 0, 1e-3, 16, 30, 88.3, 100];
  return Float32Array.from({ length: n }, (_, i) => i < special.length ? special[i] : rng.normal() * 4);
}

describe('wasm SIMD module (moe_simd)', () => {
  it(`${BYTES_PATH} is what tools/wasm_simd/build.ts assembles from ${WAT_PATH} now`, () => {
    expect(readFileSync(BYTES_PATH, 'utf8')).to.equal(renderBytesModule(readFileSync(WAT_PATH, 'utf8')));
  });

  it('loads on a plain memory and on the threaded build\'s shared one; null (the JS loops run) with the flag off or without a memory', () => {
    const memory = new WebAssembly.Memory({ initial: 1 });
    expect(moeSimd({ asm: { memory } })).to.not.equal(null);
    expect(moeSimd({})).to.equal(null);
    // the threaded build keeps its shared memory as wasmMemory: the twin importing it as shared runs on it
    const sharedMemory = new WebAssembly.Memory({ initial: 1, maximum: 65536, shared: true });
    const onShared = moeSimd({ wasmMemory: sharedMemory });
    expect(onShared).to.not.equal(null);
    const f32 = new Float32Array(sharedMemory.buffer);
    f32.set([1, 2, 3, 4, 5, 6], 0);
    onShared!.gatherRows(2, 3, 0, 0, 0, 1, 64);   // rows 1, 2 of a [·, 3]: only row 1 exists, then zeros
    expect(Array.from(f32.subarray(16, 22))).to.deep.equal([4, 5, 6, 0, 0, 0]);
    const saved = tf.env().getBool(SIMD_KERNELS_FLAG);
    try {
      tf.env().set(SIMD_KERNELS_FLAG, false);
      expect(moeSimd({ asm: { memory } })).to.equal(null);
    } finally {
      tf.env().set(SIMD_KERNELS_FLAG, saved);
    }
  });

  it('compiles asynchronously where a synchronous compile is refused (Chrome\'s main thread above 4 KB): JS loops until then', async () => {
    const memory = new WebAssembly.Memory({ initial: 1 });
    const wasm = { asm: { memory } };
    const SyncModule = WebAssembly.Module;
    (WebAssembly as { Module: unknown }).Module = function refused() {
      throw new RangeError('WebAssembly.Compile is disallowed on the main thread, if the buffer size is larger than 4KB');
    };
    try {
      expect(moeSimd(wasm), 'while the compile runs').to.equal(null);
    } finally {
      (WebAssembly as { Module: unknown }).Module = SyncModule;
    }
    expect(await moeSimdSettled(wasm)).to.equal(true);
    const simd = moeSimd(wasm);
    expect(simd).to.not.equal(null);
    const f32 = new Float32Array(memory.buffer);
    f32.set([1, 2, 3, 4, 5, 6], 0);
    simd!.gatherRows(2, 3, 0, 0, 0, 1, 64);   // rows 1, 2 of a [·, 3]: only row 1 exists, then zeros
    expect(Array.from(f32.subarray(16, 19))).to.deep.equal([4, 5, 6]);
  });

  // Bounds, per element, in units of U against the float64 formula on the same float32 inputs.
  // a = (g·u)·σ(g) rounds 2 products, and σ = 1/(1 + e^−g) carries the exp's error (range reduction
  // and polynomial, ≤ 1.5 U), the sum's and the division's: ≤ 5.5 U of |a|, asserted as 6 (du =
  // (d·g)·σ the same, with d = da·s one more rounding: 6.5 → 7). dg = ((d·u)·σ)·(1 + g·(1 − σ))
  // cancels where silu′ crosses 0, so its bound is relative to M = |d·u·σ|·(1 + |g|), what the terms
  // before the cancellation weigh: 1 − σ, g·(…), 1 + … add three roundings: 8 U of M. Below
  // g = −87.3 the exp's input is clamped (2^k stays a normal float): σ is then off by at most
  // σ(−87.3) < 2^−125 absolute, which each bound admits times the factor σ multiplies.
  for (const [n, inter] of [[1, 8], [3, 13], [4, 16], [2, 27], [5, 40]]) {
    it(`swigluForward / swigluBackward, n = ${n}, I = ${inter}: within 6 U (a), 7 U (du), 8 U of M (dg)`, () => {
      const rng = new Rng(7 + inter);
      const heap = new Heap();
      const simd = simdOn(heap);
      const hv = gateValues(rng, n * 2 * inter);
      const scaleV = Float32Array.from({ length: n }, () => 0.3 + rng.uniform());
      const daV = Float32Array.from({ length: n * inter }, () => rng.normal());
      const [h, scale, da] = [heap.alloc(n * 2 * inter, hv), heap.alloc(n, scaleV), heap.alloc(n * inter, daV)];
      const [a, aScaled, a2, dh, dh2] = [heap.alloc(n * inter), heap.alloc(n * inter), heap.alloc(n * inter),
        heap.alloc(n * 2 * inter), heap.alloc(n * 2 * inter)];
      simd.swigluForward(n, inter, h * 4, a * 4, 1, scale * 4, aScaled * 4);
      simd.swigluForward(n, inter, h * 4, a2 * 4, 0, 0, 0);
      simd.swigluBackward(n, inter, h * 4, da * 4, 1, scale * 4, dh * 4);
      simd.swigluBackward(n, inter, h * 4, da * 4, 0, 0, dh2 * 4);
      heap.expectCanaries('swiglu');
      const f = heap.f32;
      const tiny = 2 ** -125;
      for (let r = 0; r < n; r++) {
        for (let j = 0; j < inter; j++) {
          const g = hv[r * 2 * inter + j];
          const u = hv[r * 2 * inter + inter + j];
          const s = sigmoid(g);
          const at = `row ${r} column ${j} (g = ${g}, u = ${u})`;
          const ref = g * u * s;
          const boundA = 6 * U * Math.abs(ref) + Math.abs(g * u) * tiny;
          expect(Math.abs(f[a + r * inter + j] - ref), `a, ${at}`).to.be.at.most(boundA);
          expect(f[a2 + r * inter + j], `a without a scale, ${at}`).to.equal(f[a + r * inter + j]);
          expect(f[aScaled + r * inter + j], `a·scale, ${at}`).to.equal(Math.fround(f[a + r * inter + j] * scaleV[r]));
          for (const [out, sc] of [[dh, scaleV[r]], [dh2, 1]]) {
            const d = daV[r * inter + j] * sc;
            const dg = d * u * s * (1 + g * (1 - s));
            const du = d * g * s;
            const m = Math.abs(d * u * s) * (1 + Math.abs(g));
            expect(Math.abs(f[out + r * 2 * inter + j] - dg), `dg, ${at}, scale ${sc}`)
                .to.be.at.most(8 * U * m + Math.abs(d * u) * (1 + Math.abs(g)) * tiny);
            expect(Math.abs(f[out + r * 2 * inter + inter + j] - du), `du, ${at}, scale ${sc}`)
                .to.be.at.most(7 * U * Math.abs(du) + Math.abs(d * g) * tiny);
          }
        }
      }
    });
  }

  it('combineRows: bit for bit moe_math\'s combineRows (float64 sums in the same order), K = 1, 2, 3, weighted or not', () => {
    const rng = new Rng(5);
    for (const k of [1, 2, 3]) {
      for (const cols of [1, 5, 8, 13]) {
        const t = 5;
        const heap = new Heap();
        const simd = simdOn(heap);
        const rowOfPair = Array.from({ length: t * k }, (_, i) => (i * 7 + 3) % (t * k));
        const yV = Float32Array.from({ length: t * k * cols }, () => rng.normal());
        const wV = Float32Array.from({ length: t * k }, () => rng.normal());
        const [y, rows, w, out, out1] = [heap.alloc(t * k * cols, yV), heap.alloc(t * k, rowOfPair, true),
          heap.alloc(t * k, wV), heap.alloc(t * cols), heap.alloc(t * cols)];
        simd.combineRows(t, k, cols, y * 4, rows * 4, 1, w * 4, out * 4);
        simd.combineRows(t, k, cols, y * 4, rows * 4, 0, 0, out1 * 4);
        heap.expectCanaries(`K = ${k}, cols = ${cols}`);
        const ref = new Float32Array(t * cols);
        const ref1 = new Float32Array(t * cols);
        combineRows(t, k, cols, yV, 0, Int32Array.from(rowOfPair), 0, wV, 0, ref, 0);
        combineRows(t, k, cols, yV, 0, Int32Array.from(rowOfPair), 0, null, 0, ref1, 0);
        expect(Array.from(heap.f32.subarray(out, out + t * cols)), `K = ${k}, cols = ${cols}`).to.deep.equal(Array.from(ref));
        expect(Array.from(heap.f32.subarray(out1, out1 + t * cols)), `K = ${k}, cols = ${cols}, unweighted`).to.deep.equal(Array.from(ref1));
      }
    }
  });

  it('pairRowDot: float64 sums, rounded once to float32 (within U of the float64 dot, + 1e-15 of Σ|a·b|)', () => {
    const rng = new Rng(9);
    for (const cols of [1, 3, 4, 7, 9, 130]) {
      const pairs = 6;
      const heap = new Heap();
      const simd = simdOn(heap);
      const rowOfPair = [4, 1, 0, 5, 3, 2];
      const aV = Float32Array.from({ length: pairs * cols }, () => rng.normal());
      const bV = Float32Array.from({ length: pairs * cols }, () => rng.normal());
      const [a, b, rows, out] = [heap.alloc(pairs * cols, aV), heap.alloc(pairs * cols, bV), heap.alloc(pairs, rowOfPair, true), heap.alloc(pairs)];
      simd.pairRowDot(pairs, cols, a * 4, b * 4, rows * 4, out * 4);
      heap.expectCanaries(`cols = ${cols}`);
      rowOfPair.forEach((row, p) => {
        let dot = 0;
        let abs = 0;
        for (let c = 0; c < cols; c++) {
          dot += aV[row * cols + c] * bV[row * cols + c];
          abs += Math.abs(aV[row * cols + c] * bV[row * cols + c]);
        }
        expect(Math.abs(heap.f32[out + p] - dot), `cols = ${cols}, pair ${p}`).to.be.at.most(U * Math.abs(dot) + 1e-15 * abs);
      });
    }
  });

  it('weightGrad: Σ aᵀ·b over the rows within float32 summation\'s bound (n + 1)·U·Σ|a·b|; zeros for no rows', () => {
    const rng = new Rng(13);
    for (const n of [0, 1, 2, 5]) {
      for (const [p, q] of [[1, 7], [3, 4], [8, 9], [5, 1]]) {
        for (const [aIdx, bIdx] of [[false, false], [true, false], [false, true]]) {
          const srcRows = 9;
          const start = 1;
          const heap = new Heap();
          const simd = simdOn(heap);
          const aV = Float32Array.from({ length: srcRows * p }, () => rng.normal());
          const bV = Float32Array.from({ length: srcRows * q }, () => rng.normal());
          const idxV = Int32Array.from({ length: start + n }, () => rng.int(srcRows));
          const [a, b, idx, out] = [heap.alloc(srcRows * p, aV), heap.alloc(srcRows * q, bV), heap.alloc(start + n, idxV, true), heap.alloc(p * q)];
          heap.f32.fill(7, out, out + p * q);   // what a reused heap block may hold
          simd.weightGrad(n, p, q, a * 4, aIdx ? 1 : 0, idx * 4, b * 4, bIdx ? 1 : 0, idx * 4, start, out * 4);
          const label = `n = ${n}, [${p}, ${q}]${aIdx ? ', a indexed' : ''}${bIdx ? ', b indexed' : ''}`;
          heap.expectCanaries(label);
          for (let i = 0; i < p; i++) {
            for (let j = 0; j < q; j++) {
              let sum = 0;
              let abs = 0;
              for (let r = 0; r < n; r++) {
                const ra = aIdx ? idxV[start + r] : start + r;
                const rb = bIdx ? idxV[start + r] : start + r;
                sum += aV[ra * p + i] * bV[rb * q + j];
                abs += Math.abs(aV[ra * p + i] * bV[rb * q + j]);
              }
              expect(Math.abs(heap.f32[out + i * q + j] - sum), `${label}, [${i}, ${j}]`).to.be.at.most((n + 1) * U * abs);
            }
          }
        }
      }
    }
  });

  it('productNarrowK: add + Σ_j (α·x_j)·w_j within (k + 2)·U of the summed magnitudes (k + 1 sums, α·x rounded), through an index or not', () => {
    const rng = new Rng(17);
    for (const n of [0, 1, 3]) {
      for (const [k, m] of [[1, 5], [4, 8], [7, 11], [13, 1]]) {
        for (const [indexed, added, alpha] of [[false, false, 1], [true, true, -1.75], [false, true, 1], [true, false, 0.5]] as const) {
          const srcRows = 6;
          const start = 2;
          const heap = new Heap();
          const simd = simdOn(heap);
          const xV = Float32Array.from({ length: srcRows * k }, () => rng.normal());
          const wV = Float32Array.from({ length: k * m }, () => rng.normal());
          const addV = Float32Array.from({ length: n * m }, () => rng.normal());
          const idxV = Int32Array.from({ length: start + n }, () => rng.int(srcRows));
          const [x, w, add, idx, out] = [heap.alloc(srcRows * k, xV), heap.alloc(k * m, wV), heap.alloc(n * m, addV),
            heap.alloc(start + n, idxV, true), heap.alloc(n * m)];
          heap.f32.fill(7, out, out + n * m);   // what a reused heap block may hold
          simd.productNarrowK(n, k, m, x * 4, indexed ? 1 : 0, idx * 4, start, w * 4, alpha, added ? 1 : 0, add * 4, out * 4);
          const label = `n = ${n}, k = ${k}, m = ${m}${indexed ? ', indexed' : ''}${added ? ', added' : ''}, α = ${alpha}`;
          heap.expectCanaries(label);
          for (let r = 0; r < n; r++) {
            const row = indexed ? idxV[start + r] : start + r;
            for (let c = 0; c < m; c++) {
              let sum = added ? addV[r * m + c] : 0;
              let abs = Math.abs(sum);
              for (let j = 0; j < k; j++) {
                sum += alpha * xV[row * k + j] * wV[j * m + c];
                abs += Math.abs(alpha * xV[row * k + j] * wV[j * m + c]);
              }
              expect(Math.abs(heap.f32[out + r * m + c] - sum), `${label}, [${r}, ${c}]`).to.be.at.most((k + 2) * U * abs);
            }
          }
        }
      }
    }
  });

  it('productNarrowM: α·⟨x, wt_j⟩ within (k + 3)·U of α·Σ|x·w| (four partial sums, their sum, α), through an index or not', () => {
    const rng = new Rng(19);
    for (const n of [0, 1, 3]) {
      for (const [k, m] of [[1, 1], [5, 4], [9, 7], [17, 8], [33, 13]]) {
        for (const [indexed, alpha] of [[false, 1], [true, -1.75]] as const) {
          const srcRows = 6;
          const start = 2;
          const heap = new Heap();
          const simd = simdOn(heap);
          const xV = Float32Array.from({ length: srcRows * k }, () => rng.normal());
          const wV = Float32Array.from({ length: m * k }, () => rng.normal());
          const idxV = Int32Array.from({ length: start + n }, () => rng.int(srcRows));
          const [x, wt, idx, out] = [heap.alloc(srcRows * k, xV), heap.alloc(m * k, wV), heap.alloc(start + n, idxV, true), heap.alloc(n * m)];
          simd.productNarrowM(n, k, m, x * 4, indexed ? 1 : 0, idx * 4, start, wt * 4, alpha, out * 4);
          const label = `n = ${n}, k = ${k}, m = ${m}${indexed ? ', indexed' : ''}, α = ${alpha}`;
          heap.expectCanaries(label);
          for (let r = 0; r < n; r++) {
            const row = indexed ? idxV[start + r] : start + r;
            for (let j = 0; j < m; j++) {
              let dot = 0;
              let abs = 0;
              for (let c = 0; c < k; c++) {
                dot += xV[row * k + c] * wV[j * k + c];
                abs += Math.abs(xV[row * k + c] * wV[j * k + c]);
              }
              expect(Math.abs(heap.f32[out + r * m + j] - alpha * dot), `${label}, [${r}, ${j}]`).to.be.at.most((k + 3) * U * Math.abs(alpha) * abs);
            }
          }
        }
      }
    }
  });

  it('gatherRows and gatherTranspose: bit for bit moe_math\'s, through an index or not, sizes around the 8- and 4-row blocks', () => {
    const rng = new Rng(3);
    for (const n of [1, 3, 4, 5, 9, 12, 13]) {
      for (const cols of [1, 3, 4, 7, 9]) {
        for (const indexed of [false, true]) {
          const srcRows = 16;   // >= start + n: unindexed rows are start … start + n − 1
          const start = 2;
          const heap = new Heap();
          const simd = simdOn(heap);
          const srcV = Float32Array.from({ length: srcRows * cols }, () => rng.normal());
          const idxV = Int32Array.from({ length: start + n }, () => rng.int(srcRows));
          const [src, idx, rowsOut, tOut] = [heap.alloc(srcRows * cols, srcV), heap.alloc(start + n, idxV, true),
            heap.alloc(n * cols), heap.alloc(n * cols)];
          simd.gatherRows(n, cols, src * 4, indexed ? 1 : 0, idx * 4, start, rowsOut * 4);
          simd.gatherTranspose(n, cols, src * 4, indexed ? 1 : 0, idx * 4, start, tOut * 4);
          const label = `n = ${n}, cols = ${cols}${indexed ? ', indexed' : ''}`;
          heap.expectCanaries(label);
          const refRows = new Float32Array(n * cols);
          const refT = new Float32Array(n * cols);
          gatherRowsInto(n, cols, srcV, 0, indexed ? idxV : null, 0, start, refRows, 0);
          gatherTransposeInto(n, cols, srcV, 0, indexed ? idxV : null, 0, start, refT, 0);
          expect(Array.from(heap.f32.subarray(rowsOut, rowsOut + n * cols)), `${label}: rows`).to.deep.equal(Array.from(refRows));
          expect(Array.from(heap.f32.subarray(tOut, tOut + n * cols)), `${label}: transposed`).to.deep.equal(Array.from(refT));
        }
      }
    }
  });
});
