/**
 * The subgroup-matrix programs' index math (issue 13), checked where no subgroup matrices exist:
 * a JS emulator runs one workgroup's data movement — the staging loops of every invocation, each
 * matrix load as "16×16 block at offset with stride, row- or column-major" (Dawn's semantics, in
 * subgroup_matrix_core.ts's comment), the products, the epilogue's store to each subgroup's slot
 * and every lane's reads — with the very functions the package's programs and the GPU variants
 * generate their WGSL from, and compares the block with a float64 product. Operands are multiples
 * of 1/64 (exact in f16, every sum exact), so a right layout gives equal numbers; unwritten slab
 * elements are NaN, so a load that reads padding or a stale element shows.
 * Also: the programs' WGSL holds exactly the core's inner loop and epilogue, and every variant of
 * tools/webgpu_tc compiles on Mesa with the matrix builtins stood in for.
 * Run with TFJS_BACKEND=webgpu (the compile checks use the backend's device; the emulator is plain JS).
 */
import { expect } from 'chai';
import {
  aIndex, bIndex, checkSlabLayout, epilogueThroughSlots, integers, wgslU32, leftTile, MATRIX_EDGE, type MatrixAt, multiplySlab,
  partOrigin, resultSlot, rightTile, type SlabLayout, slabSizes, slotElement, stagedElementA, stagedElementB, stagedQuadA, stagedQuadB,
  subgroupCount,
} from '../../../src/backends/webgpu/programs/subgroup_matrix_core.js';
import {
  MATMUL_LAYOUT, matMulLayout, matMulStaging, SubgroupMatrixMatMulProgram, SubgroupMatrixWeightGradProgram, v5Structure, v6Staging, WEIGHT_GRAD_LAYOUT,
  weightGradLayout, weightGradStaging,
} from '../../../src/backends/webgpu/programs/subgroup_matrix_program.js';
import {
  type BisectOptions, bisectVariant, exactLayout, gemmLayout, type PackageShaderOptions, packageProgramShader, stagedVariant, stagedVariants, standInMatrices, storageVariant, type Problem,
  groupedGemmDispatch, groupedGemmVariant, groupedSourceRow, V6_STEPS,
  conversionPass, v7Dispatch, v7Layout, v7LeftTile, type V7Options, v7RightTile, v7RunA, v7RunB, v7SourceRow, v7Variant, v7WorkgroupBytes, V7_STEPS,
} from '../../../tools/webgpu_tc/variant_codes.js';
import { OLD_MATMUL_ROWS, OLD_WEIGHT_GRAD_ROWS } from '../../../tools/webgpu_tc/frozen/db64af4.js';
import { quantizedLayout } from '../../../src/ops/quantized.js';
import { compileErrors } from './helpers.js';

const E = MATRIX_EDGE;

/** Dawn's subgroupMatrixLoad: element (r, c) of the 16×16 matrix at `at` in `array`. */
function loadMatrix(array: Float64Array, at: MatrixAt<number>): Float64Array {
  const out = new Float64Array(E * E);
  for (let r = 0; r < E; r++) {
    for (let c = 0; c < E; c++) {
      const index = at.offset + (at.colMajor ? c * at.stride + r : r * at.stride + c);
      if (index < 0 || index >= array.length) throw new Error(`matrix load outside the array at ${index}`);
      out[r * E + c] = array[index];
    }
  }
  return out;
}

function storeMatrix(array: Float64Array, at: MatrixAt<number>, m: Float64Array): void {
  for (let r = 0; r < E; r++) {
    for (let c = 0; c < E; c++) array[at.offset + (at.colMajor ? c * at.stride + r : r * at.stride + c)] = m[r * E + c];
  }
}

interface Emulated {
  layout: SlabLayout;
  subgroupSize: number;
  /** the reduction's length (the programs' K loop runs over whole slabs, staging 0 past it) */
  inner: number;
  /** the block's left operand (m, k), right operand (k, n) */
  left(m: number, k: number): number;
  right(k: number, n: number): number;
  /** the B staging walks k fastest (a weight stored [out, in]) */
  kFastestB: boolean;
  /** a deliberate mistake, to show the check can fail */
  fault?: 'left load transposed' | 'epilogue lanes from subgroup 0' | 'quad step 1 along k' | 'right load transposed';
  /**
   * the programs' vectorized staging (stagedQuadA / stagedQuadB): each invocation writes 4
   * consecutive elements per quad, whole quads past the reduction zero (inner a multiple of 4)
   */
  quads?: boolean;
  /** elements per run of B in quads (8: the 16-byte loads of packed halves; inner a multiple of 8) */
  widthB?: 4 | 8;
  /** elements per run of A in quads (8: an f16 left operand, staging 'half8'; inner a multiple of 8) */
  widthA?: 4 | 8;
}

/** One workgroup of the generated program, as data movement: the block it writes (NaN where unwritten). */
function emulateWorkgroup(w: Emulated): Float64Array {
  const l = w.layout;
  checkSlabLayout(l);
  const x = integers;
  const threads = subgroupCount(l) * w.subgroupSize;
  const sizes = slabSizes(l);
  const acc = Array.from({ length: subgroupCount(l) }, () =>
    Array.from({ length: l.tilesM * l.tilesN }, () => new Float64Array(E * E)));
  for (let k0 = 0; k0 < w.inner; k0 += l.depth) {
    const As = new Float64Array(sizes.a).fill(NaN);
    const Bs = new Float64Array(sizes.b).fill(NaN);
    for (let lid = 0; lid < threads && w.quads; lid++) {
      // QuadStaging: quad lid + t·threads, 4 (or widthA) elements each
      const widthA = w.widthA ?? 4;
      for (let t = 0; t < l.rows * l.depth / widthA / threads; t++) {
        const { m, k, at, step } = stagedQuadA(x, l, lid + t * threads, widthA);
        for (let c = 0; c < widthA; c++) {
          const [mc, kc] = l.leftColMajor ? [m + c, k] : [m, k + c];
          if (!Number.isNaN(As[at + c * step])) throw new Error(`As[${at + c * step}] staged twice`);
          As[at + c * step] = k0 + k < w.inner ? w.left(mc, k0 + kc) : 0;
        }
      }
      const widthB = w.widthB ?? 4;
      for (let t = 0; t < l.depth * l.cols / widthB / threads; t++) {
        const { k, n, at, step } = stagedQuadB(x, l, lid + t * threads, w.kFastestB, widthB);
        const slabStep = w.fault === 'quad step 1 along k' ? 1 : step;
        for (let c = 0; c < widthB; c++) {
          const [kc, nc] = w.kFastestB ? [k + c, n] : [k, n + c];
          if (!Number.isNaN(Bs[at + c * slabStep])) throw new Error(`Bs[${at + c * slabStep}] staged twice`);
          Bs[at + c * slabStep] = k0 + kc < w.inner ? w.right(k0 + kc, nc) : 0;
        }
      }
    }
    for (let lid = 0; lid < threads && !w.quads; lid++) {
      // the programs' uniformStrideLoop: element lid + step·threads, the same steps for every invocation
      for (let step = 0; step < l.rows * l.depth / threads; step++) {
        const i = lid + step * threads;
        const { m, k } = stagedElementA(x, l, i);
        const at = aIndex(x, l, m, k);
        if (!Number.isNaN(As[at])) throw new Error(`As[${at}] staged twice`);
        As[at] = k0 + k < w.inner ? w.left(m, k0 + k) : 0;
      }
      for (let step = 0; step < l.depth * l.cols / threads; step++) {
        const i = lid + step * threads;
        const { k, n } = stagedElementB(x, l, i, w.kFastestB);
        const at = bIndex(x, l, k, n);
        if (!Number.isNaN(Bs[at])) throw new Error(`Bs[${at}] staged twice`);
        Bs[at] = k0 + k < w.inner ? w.right(k0 + k, n) : 0;
      }
    }
    for (let s = 0; s < subgroupCount(l); s++) {
      const part = partOrigin(x, l, s);
      for (let kk = 0; kk < l.depth; kk += E) {
        const a = Array.from({ length: l.tilesM }, (_, i) => {
          const at = leftTile(x, l, part.row, kk, i);
          return loadMatrix(As, w.fault === 'left load transposed' ? { ...at, colMajor: !at.colMajor } : at);
        });
        const b = Array.from({ length: l.tilesN }, (_, j) => {
          const at = rightTile(x, l, part.col, kk, j);
          return loadMatrix(Bs, w.fault === 'right load transposed' ? { ...at, colMajor: !at.colMajor } : at);
        });
        for (let i = 0; i < l.tilesM; i++) {
          for (let j = 0; j < l.tilesN; j++) {
            const c = acc[s][i * l.tilesN + j];
            for (let r = 0; r < E; r++) for (let q = 0; q < E; q++) for (let t = 0; t < E; t++) c[r * E + q] += a[i][r * E + t] * b[j][t * E + q];
          }
        }
      }
    }
  }
  const out = new Float64Array(l.rows * l.cols).fill(NaN);
  for (let i = 0; i < l.tilesM; i++) {
    for (let j = 0; j < l.tilesN; j++) {
      const Ts = new Float64Array(subgroupCount(l) * E * E).fill(NaN);
      for (let s = 0; s < subgroupCount(l); s++) storeMatrix(Ts, resultSlot(x, s), acc[s][i * l.tilesN + j]);
      for (let lid = 0; lid < threads; lid++) {
        const s = w.fault === 'epilogue lanes from subgroup 0' ? 0 : Math.trunc(lid / w.subgroupSize);
        const lane = lid % w.subgroupSize;
        const part = partOrigin(x, l, Math.trunc(lid / w.subgroupSize));
        const slot = resultSlot(x, s);
        for (let step = 0; step < E * E / w.subgroupSize; step++) {
          const t = lane + step * w.subgroupSize;
          const { m, n } = slotElement(x, part.row, part.col, i, j, t);
          if (!Number.isNaN(out[m * l.cols + n])) throw new Error(`block element (${m}, ${n}) written twice`);
          out[m * l.cols + n] = Ts[slot.offset + t];
        }
      }
    }
  }
  return out;
}

/** Multiples of 1/64 in [-1, 1] from a fixed seed. */
function values(n: number, seed: number): Float64Array {
  let s = seed >>> 0;
  return Float64Array.from({ length: n }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return Math.round((s / 2 ** 32 * 2 - 1) * 64) / 64;
  });
}

/**
 * Emulates `layout` on a product with `inner` not a multiple of the slab depth and returns the
 * largest |difference| to the float64 block. `leftTransposed`: the left operand comes as Lᵀ (the
 * weight gradients: L(r, p) with r the reduction).
 */
function blockError(layout: SlabLayout, o: { inner: number; kFastestB: boolean; fault?: Emulated['fault']; quads?: boolean; widthA?: 4 | 8; widthB?: 4 | 8 }): number {
  const { rows, cols } = layout;
  const A = values(rows * o.inner, 1); // A(m, k) at m·inner + k
  const B = values(o.inner * cols, 2); // B(k, n) at k·cols + n
  const block = emulateWorkgroup({
    layout, subgroupSize: 32, inner: o.inner, kFastestB: o.kFastestB, fault: o.fault, quads: o.quads, widthA: o.widthA, widthB: o.widthB,
    left: (m, k) => A[m * o.inner + k], right: (k, n) => B[k * cols + n],
  });
  let worst = 0;
  for (let m = 0; m < rows; m++) {
    for (let n = 0; n < cols; n++) {
      let s = 0;
      for (let k = 0; k < o.inner; k++) s += A[m * o.inner + k] * B[k * cols + n];
      const d = Math.abs(block[m * cols + n] - s);
      worst = Number.isNaN(d) ? Infinity : Math.max(worst, d);
    }
  }
  return worst;
}

describe('webgpu: subgroup-matrix index math (emulated workgroup against float64)', () => {
  it('the products\' layout (As row-major, 64 deep, rows padded): the block exactly, B staged along k or along n', () => {
    expect(MATMUL_LAYOUT).to.include({ depth: 64, pad: 8, rows: 128, cols: 128 });
    // a K tail in the second slab, one short slab, and three whole slabs
    expect(blockError(MATMUL_LAYOUT, { inner: 80, kFastestB: true })).to.equal(0);
    expect(blockError(MATMUL_LAYOUT, { inner: 48, kFastestB: false })).to.equal(0);
    expect(blockError(MATMUL_LAYOUT, { inner: 192, kFastestB: true })).to.equal(0);
  });

  it('the weight gradients\' layout (As holds Lᵀ column-major, padded): the block exactly', () => {
    expect(WEIGHT_GRAD_LAYOUT).to.include({ depth: 64, pad: 8, leftColMajor: true });
    expect(blockError(WEIGHT_GRAD_LAYOUT, { inner: 72, kFastestB: false })).to.equal(0);
    expect(blockError(WEIGHT_GRAD_LAYOUT, { inner: 200, kFastestB: false })).to.equal(0);
  });

  it('the products\' 64- and 32-row blocks (fewer rows per expert): 2×2 subgroups of 2×4 and 1×4 matrices, the block exactly', () => {
    expect(matMulLayout(128)).to.deep.equal(MATMUL_LAYOUT);
    expect(matMulLayout(64)).to.deep.include({ rows: 64, cols: 128, depth: 64, subgroupRows: 2, subgroupCols: 2, tilesM: 2, tilesN: 4 });
    expect(matMulLayout(32)).to.deep.include({ rows: 32, cols: 128, depth: 64, subgroupRows: 2, subgroupCols: 2, tilesM: 1, tilesN: 4 });
    for (const rows of [64, 32] as const) {
      const l = matMulLayout(rows);
      for (const inner of [48, 100, 192]) {
        expect(blockError(l, { inner, kFastestB: true }), `${rows} rows, elements, k ${inner}`).to.equal(0);
        expect(blockError(l, { inner, kFastestB: true, quads: true }), `${rows} rows, quads along k, k ${inner}`).to.equal(0);
        expect(blockError(l, { inner, kFastestB: false, quads: true }), `${rows} rows, quads along n, k ${inner}`).to.equal(0);
      }
      expect(blockError(l, { inner: 32, kFastestB: true, fault: 'left load transposed' })).to.be.greaterThan(0.1);
      expect(blockError(l, { inner: 32, kFastestB: true, fault: 'epilogue lanes from subgroup 0' })).to.be.greaterThan(0.1);
    }
    expect(() => matMulLayout(16 as 32)).to.throw('SubgroupMatrixMatMulProgram: block rows must be one of 128, 64, 32 but got 16');
  });

  it('the weight gradients\' 32-deep slab (32-row tiles: the reduction over each expert\'s rows in steps of 32): the block exactly', () => {
    expect(weightGradLayout(64)).to.deep.equal(WEIGHT_GRAD_LAYOUT);
    const l = weightGradLayout(32);
    expect(l).to.deep.include({ rows: 128, cols: 128, depth: 32, leftColMajor: true });
    // one short slab, one whole, a tail in the third
    for (const inner of [20, 32, 72]) {
      expect(blockError(l, { inner, kFastestB: false }), `elements ${inner}`).to.equal(0);
      expect(blockError(l, { inner, kFastestB: false, quads: true }), `quads ${inner}`).to.equal(0);
    }
    expect(blockError(l, { inner: 32, kFastestB: false, fault: 'left load transposed' })).to.be.greaterThan(0.1);
    expect(() => weightGradLayout(16 as 32)).to.throw('SubgroupMatrixWeightGradProgram: depth must be 32 or 64 but got 16');
  });

  it('v7\'s staging of a weight along k (Bs column-major; per element, runs of 4 and runs of 8): the block exactly, every block', () => {
    for (const rows of [128, 64, 32] as const) {
      const l = matMulLayout(rows, true);
      expect(l).to.deep.include({ rows, cols: 128, depth: 64, rightColMajor: true });
      // Bs [128 columns][64 + 8]: each column's k-run on consecutive halves
      expect(slabSizes(l).b).to.equal(128 * 72);
      for (const inner of [48, 104, 192]) {
        expect(blockError(l, { inner, kFastestB: true }), `${rows} rows, elements, k ${inner}`).to.equal(0);
        expect(blockError(l, { inner, kFastestB: true, quads: true }), `${rows} rows, runs of 4, k ${inner}`).to.equal(0);
        expect(blockError(l, { inner, kFastestB: true, quads: true, widthB: 8 }), `${rows} rows, runs of 8, k ${inner}`).to.equal(0);
        // an f16 left operand ('half8'): A in runs of 8 as well
        expect(blockError(l, { inner, kFastestB: true, quads: true, widthA: 8, widthB: 8 }), `${rows} rows, A and W in runs of 8, k ${inner}`).to.equal(0);
      }
    }
    const l = matMulLayout(128, true);
    // runs of 8 along k: a subgroup reads 4 columns × 64 k (whole 128-byte rows of bf16 W) and stores them to consecutive halves
    const runs = Array.from({ length: 32 }, (_, lane) => stagedQuadB(integers, l, lane, true, 8));
    expect(new Set(runs.map(r => r.n)).size).to.equal(4);
    expect(runs.slice(0, 8).map(r => [r.k, r.at, r.step])).to.deep.equal([0, 8, 16, 24, 32, 40, 48, 56].map(k => [k, k, 1]));
    expect(runs[8].at).to.equal(72);
    expect(() => stagedQuadB(integers, MATMUL_LAYOUT, 0, true, 8)).to.throw(
        'stagedQuadB: runs of 8 need k fastest into a column-major Bs or n fastest into a row-major one');
    expect(() => stagedQuadB(integers, l, 0, false, 8)).to.throw('stagedQuadB: runs of 8 need k fastest into a column-major Bs');
    // the right matrices are loaded column-major: loading them row-major is caught
    expect(blockError(l, { inner: 64, kFastestB: true, quads: true, fault: 'right load transposed' })).to.be.greaterThan(0.1);
    expect(blockError(MATMUL_LAYOUT, { inner: 64, kFastestB: true, quads: true, fault: 'right load transposed' })).to.be.greaterThan(0.1);
  });

  it('the weight gradients on f16 operands (\'half8\': Lᵀ in runs of 8 along p, R along q): the block exactly, 64 and 32 deep', () => {
    for (const depth of [64, 32] as const) {
      const l = weightGradLayout(depth);
      // one short slab, one whole, a tail in the third; L alone in runs of 8 (R's length not whole runs of 8), then both
      for (const inner of [20, depth, 72]) {
        expect(blockError(l, { inner, kFastestB: false, quads: true, widthA: 8 }), `L in runs of 8, depth ${depth}, rows ${inner}`).to.equal(0);
        expect(blockError(l, { inner, kFastestB: false, quads: true, widthA: 8, widthB: 8 }), `both, depth ${depth}, rows ${inner}`).to.equal(0);
      }
    }
    // a lane's run: 8 consecutive p of one row into 8 consecutive halves of As, 16 lanes down a column of 128 p
    const runs = Array.from({ length: 32 }, (_, lane) => stagedQuadA(integers, WEIGHT_GRAD_LAYOUT, lane, 8));
    expect(runs.slice(0, 3).map(r => [r.m, r.k, r.at, r.step])).to.deep.equal([[0, 0, 0, 1], [8, 0, 8, 1], [16, 0, 16, 1]]);
    expect([runs[16].m, runs[16].k, runs[16].at]).to.deep.equal([0, 1, 136]);
    const rRuns = Array.from({ length: 32 }, (_, lane) => stagedQuadB(integers, WEIGHT_GRAD_LAYOUT, lane, false, 8));
    expect([rRuns[1].k, rRuns[1].n, rRuns[1].at, rRuns[16].k, rRuns[16].n, rRuns[16].at]).to.deep.equal([0, 8, 8, 1, 0, 136]);
    expect(blockError(WEIGHT_GRAD_LAYOUT, { inner: 64, kFastestB: false, quads: true, widthA: 8, widthB: 8, fault: 'left load transposed' }))
      .to.be.greaterThan(0.1);
  });

  it('every matrix the programs load or store starts, and every row of it, on a 16-byte boundary', () => {
    // the hardware's matrix loads from workgroup memory read 16-byte rows; a row off that boundary
    // is a suspect for the H100's wrong numbers, so the programs' layouts keep all of them on it
    const x = integers;
    for (const l of [MATMUL_LAYOUT, WEIGHT_GRAD_LAYOUT, matMulLayout(64), matMulLayout(32), weightGradLayout(32),
      matMulLayout(128, true), matMulLayout(64, true), matMulLayout(32, true)]) {
      const { a, b } = slabSizes(l);
      expect([a * 2 % 16, b * 2 % 16], 'slab bytes').to.deep.equal([0, 0]);
      for (let s = 0; s < subgroupCount(l); s++) {
        const part = partOrigin(x, l, s);
        for (let kk = 0; kk < l.depth; kk += MATRIX_EDGE) {
          for (let i = 0; i < l.tilesM; i++) {
            const at = leftTile(x, l, part.row, kk, i);
            expect([at.offset * 2 % 16, at.stride * 2 % 16], `left ${s} ${kk} ${i}`).to.deep.equal([0, 0]);
          }
          for (let j = 0; j < l.tilesN; j++) {
            const at = rightTile(x, l, part.col, kk, j);
            expect([at.offset * 2 % 16, at.stride * 2 % 16], `right ${s} ${kk} ${j}`).to.deep.equal([0, 0]);
          }
        }
        const slot = resultSlot(x, s);
        expect([slot.offset * 4 % 16, slot.stride * 4 % 16]).to.deep.equal([0, 0]);
      }
    }
  });

  it('every staged layout the GPU variants try (8 subgroups, depth 64, padded rows, 4×8 matrices)', () => {
    for (const o of stagedVariants()) expect(blockError(o.layout, { inner: 2 * o.layout.depth, kFastestB: false }), JSON.stringify(o.layout)).to.equal(0);
  });

  it('vec4 staging (the variants\' f16 reads): 4 consecutive elements from 4 consecutive halves into 4 consecutive slab halves', () => {
    const x = integers;
    for (const o of stagedVariants().filter(v => v.vec4)) {
      const l = o.layout;
      for (let e = 0; e < l.rows * l.depth; e += 4) {
        const first = stagedElementA(x, l, e);
        for (let c = 1; c < 4; c++) {
          const next = stagedElementA(x, l, e + c);
          expect([next.m, next.k, aIndex(x, l, next.m, next.k)]).to.deep.equal([first.m, first.k + c, aIndex(x, l, first.m, first.k) + c]);
        }
      }
      for (let e = 0; e < l.depth * l.cols; e += 4) {
        const first = stagedElementB(x, l, e, false);
        for (let c = 1; c < 4; c++) {
          const next = stagedElementB(x, l, e + c, false);
          expect([next.k, next.n, bIndex(x, l, next.k, next.n)]).to.deep.equal([first.k, first.n + c, bIndex(x, l, first.k, first.n) + c]);
        }
      }
    }
  });

  it('vectorized staging (4 consecutive elements per quad, both layouts, B along k or n, K tails of whole quads): the block exactly', () => {
    for (const inner of [64, 100, 196]) {
      expect(blockError(MATMUL_LAYOUT, { inner, kFastestB: true, quads: true }), `matmul k ${inner}`).to.equal(0);
      expect(blockError(MATMUL_LAYOUT, { inner, kFastestB: false, quads: true }), `matmul n ${inner}`).to.equal(0);
      expect(blockError(WEIGHT_GRAD_LAYOUT, { inner, kFastestB: false, quads: true }), `grad ${inner}`).to.equal(0);
    }
    // quads along k land 4 slab rows apart, and the check sees it when they do not
    expect(stagedQuadB(integers, MATMUL_LAYOUT, 0, true).step).to.equal(136);
    expect(stagedQuadA(integers, WEIGHT_GRAD_LAYOUT, 33).step).to.equal(1);
    expect(() => blockError(MATMUL_LAYOUT, { inner: 64, kFastestB: true, quads: true, fault: 'quad step 1 along k' })).to.throw(/staged twice/);
  });

  it('quads along k: a subgroup reads whole 32-byte runs of 8 columns and its transposing stores meet at most 2 words per bank', () => {
    const x = integers;
    for (let first = 0; first < 2048; first += 32) {
      const quads = Array.from({ length: 32 }, (_, lane) => stagedQuadB(x, MATMUL_LAYOUT, first + lane, true));
      const columns = new Set(quads.map(q => q.n));
      expect(columns.size).to.equal(8);
      // per column, 4 quads: 16 consecutive k, 64 bytes of a row of W [out, in]
      for (const n of columns) expect(quads.filter(q => q.n === n).map(q => q.k).sort((a, b) => a - b)).to.deep.equal([0, 4, 8, 12].map(k => k + quads.find(q => q.n === n)!.k - quads.find(q => q.n === n)!.k % 16));
      for (let c = 0; c < 4; c++) {
        const wordsByBank = new Map<number, Set<number>>();
        for (const q of quads) {
          const word = Math.floor((q.at + c * q.step) / 2);
          wordsByBank.set(word % 32, (wordsByBank.get(word % 32) ?? new Set()).add(word));
        }
        expect(Math.max(...[...wordsByBank.values()].map(w => w.size)), `quads ${first}.., half ${c}`).to.be.at.most(2);
      }
    }
  });

  it('a left load with the wrong major order, or lanes reading another subgroup\'s slot, is caught', () => {
    expect(blockError(MATMUL_LAYOUT, { inner: 32, kFastestB: true, fault: 'left load transposed' })).to.be.greaterThan(0.1);
    expect(blockError(WEIGHT_GRAD_LAYOUT, { inner: 32, kFastestB: false, fault: 'left load transposed' })).to.be.greaterThan(0.1);
    expect(blockError(MATMUL_LAYOUT, { inner: 32, kFastestB: true, fault: 'epilogue lanes from subgroup 0' })).to.be.greaterThan(0.1);
  });

  it('rejects a layout whose subgroups do not tile the block', () => {
    expect(() => checkSlabLayout({ ...MATMUL_LAYOUT, cols: 96 })).to.throw(
        'subgroup-matrix layout: 2×2 subgroups of 4×4 matrices do not tile a 128×96 block at depth 64');
    expect(() => checkSlabLayout({ ...MATMUL_LAYOUT, depth: 24 })).to.throw(/at depth 24/);
  });

  it('the programs\' WGSL holds the core\'s inner loop and epilogue (what was emulated is what runs)', () => {
    const mm = new SubgroupMatrixMatMulProgram(256, 128, { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false }, 32).getUserCode();
    const wg = new SubgroupMatrixWeightGradProgram([2, 128, 128], 2, 128, 128, { left: 'rows', right: 'gather', scaleLeft: false, scaled: false }, 32).getUserCode();
    const squash = (s: string) => s.replace(/\s+/g, ' ');
    // a weight stored [out, in] (kContiguous) goes to a column-major Bs (v7)
    expect(squash(mm)).to.contain(squash(multiplySlab(matMulLayout(128, true), 'partRow', 'partCol')));
    expect(mm).to.contain('subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, (((partCol + 48u) * 72u) + 48u), true, 72u)');
    expect(squash(mm)).to.contain('Bs[((nn * 72u) + kk)] = f16(v);');
    expect(squash(wg)).to.contain(squash(multiplySlab(WEIGHT_GRAD_LAYOUT, 'partRow', 'partCol')));
    expect(squash(mm)).to.contain('As[((mm * 72u) + kk)] = f16(v);');
    expect(squash(wg)).to.contain('As[((rr * 136u) + pp)] = f16(v);');
    // the smaller blocks and the shallower slab: the same, from their layouts
    const spec = { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false } as const;
    for (const rows of [64, 32] as const) {
      const code = new SubgroupMatrixMatMulProgram(256, 128, spec, 32, undefined, rows).getUserCode();
      expect(squash(code)).to.contain(squash(multiplySlab(matMulLayout(rows, true), 'partRow', 'partCol')));
      // rows / 32 result matrices per subgroup along the rows, 4 along the columns
      const last = rows / 32 - 1;
      expect(code).to.contain(`var c${last}_3 = subgroup_matrix_result<f32, 16, 16>();`);
      expect(code).to.not.contain(`var c${last + 1}_0 `);
      expect(code).to.contain(`var<workgroup> rowSrc : array<i32, ${rows + 4}>;`);
      expect(code).to.contain(`var<workgroup> As : array<f16, ${rows * 72}>;`);
    }
    const shallow = new SubgroupMatrixWeightGradProgram([2, 128, 128], 2, 128, 128, { left: 'rows', right: 'gather', scaleLeft: false, scaled: false }, 32,
        undefined, 32).getUserCode();
    expect(squash(shallow)).to.contain(squash(multiplySlab(weightGradLayout(32), 'partRow', 'partCol')));
    expect(shallow).to.contain(`var<workgroup> As : array<f16, ${32 * 136}>;`);
    expect(squash(shallow)).to.contain('r0 += 32)');
    // no 4-byte scalar in workgroup memory beside the slabs: every workgroup array is whole 16-byte units
    for (const code of [mm, wg, new SubgroupMatrixMatMulProgram(256, 128, spec, 32, undefined, 32).getUserCode()]) {
      for (const [, type, n] of code.matchAll(/var<workgroup> \w+ : array<(f16|f32|i32), (\d+)>/g)) {
        expect(Number(n) * (type === 'f16' ? 2 : 4) % 16).to.equal(0);
      }
      expect(code).to.not.match(/var<workgroup> \w+ : (i32|u32|f32)\s*;/);
    }
    // the epilogue's lane loop and slot reads
    const slots = epilogueThroughSlots(MATMUL_LAYOUT, 'subgroup', 'lane', 32, 'partRow', 'partCol', () => '');
    expect(slots).to.contain('subgroupMatrixStore(&Ts, (subgroup * 256u), c3_3, false, 16u);');
    expect(squash(mm)).to.contain('for (var step = 0u; step < 8u; step++) { let t = lane + step * 32u;');
    expect(squash(mm)).to.contain('Ts[((subgroup * 256u) + t)]');
  });
});

describe('webgpu: tools/webgpu_tc variants compile around the matrix builtins (Mesa)', () => {
  /** the variant's WGSL with the matrix builtins stood in for (standInMatrices), and nothing of them left */
  function standIn(code: string): string {
    const body = standInMatrices(code);
    expect(body).to.not.match(/subgroup_matrix|subgroupMatrix|\bf16\b/);
    return body;
  }


  const problem: Problem = { name: 'small', batch: 2, M: 256, N: 256, K: 128 };
  const variants = [
    storageVariant(problem, { sgRows: 2, sgCols: 2, tilesM: 4, tilesN: 8 }),
    storageVariant(problem, { sgRows: 1, sgCols: 1, tilesM: 4, tilesN: 4 }),
    ...stagedVariants().map(o => stagedVariant(problem, o)),
    // variants v4's bisection, each piece alone and all together, K with and without a tail
    ...([{}, { slotEpilogue: true }, { left: 'rows' }, { left: 'act' }, { weight: 'f32' }, { weight: 'bf16' },
      { left: 'rows', grouped: true }, { runtimeK: true }, { runtimeK: true, scalarFirst: true }, { leftColMajor: true },
      { slotEpilogue: true, left: 'act', weight: 'bf16', grouped: true, runtimeK: true, scalarFirst: true, leftColMajor: true }] as BisectOptions[])
      .flatMap(o => [bisectVariant({ ...problem, M: 384, K: 192 }, o), bisectVariant({ ...problem, M: 384, K: 200 }, o)]),
  ];
  it('the programs\' layout is the exact GEMM\'s (variants v3: 97.1 TFLOP/s, max rel. error 0 on the H100)', () => {
    expect(MATMUL_LAYOUT).to.deep.equal(exactLayout(false));
    expect(WEIGHT_GRAD_LAYOUT).to.deep.equal(exactLayout(true));
    const squash = (t: string) => t.replace(/\s+/g, ' ');
    expect(squash(bisectVariant({ ...problem, M: 384, K: 192 }, {}).code)).to.contain(squash(multiplySlab(MATMUL_LAYOUT, 'partRow', 'partCol')));
    expect(bisectVariant({ ...problem, M: 384, K: 192 }, {}).code).to.not.contain('Ts[(');
    expect(bisectVariant({ ...problem, M: 384, K: 192 }, { slotEpilogue: true }).code).to.contain('subgroupMatrixStore(&Ts, (subgroup * 256u), c3_3, false, 16u);');
  });
  for (const v of variants) {
    it(`${v.name}: valid WGSL around the matrix builtins`, async () => {
      expect(await compileErrors(standIn(v.code))).to.deep.equal([]);
    });
  }

  const rowsProgram = new SubgroupMatrixMatMulProgram(2048, 1536,
      { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false }, 32);
  const gradProgram = new SubgroupMatrixWeightGradProgram([2, 1536, 2048], 2, 1536, 2048,
      { left: 'rows', right: 'rows', scaleLeft: false, scaled: false }, 32);
  const layouts: Array<[string, PackageShaderOptions]> = [
    ['as tfjs calls it (an entry point calls main)', { entry: 'wrapper' }],
    ['inline (main is the entry point)', { entry: 'inline' }],
  ];
  for (const [name, options] of layouts) {
    it(`the package's programs outside tfjs, ${name}: valid WGSL around the matrix builtins`, async () => {
      const code = packageProgramShader(rowsProgram, options);
      expect(code.startsWith('enable f16;\nenable chromium_experimental_subgroup_matrix;\n')).to.equal(true);
      expect(code.includes('main_();')).to.equal(options.entry === 'wrapper');
      expect(await compileErrors(standIn(code))).to.deep.equal([]);
      expect(await compileErrors(standIn(packageProgramShader(gradProgram, options)))).to.deep.equal([]);
    });
  }

  it('the package\'s programs outside tfjs in quads (the device batch\'s v5 cases: f32 and bf16 weights, along k and n, mixed): valid WGSL', async () => {
    const bf16 = { kind: 'bf16' as const, cols: 2048, layout: null };
    const rows = { source: 'rows', hasBias: false, hasAddend: false, scaled: false } as const;
    const programs: Array<[SubgroupMatrixMatMulProgram | SubgroupMatrixWeightGradProgram, boolean]> = [
      [new SubgroupMatrixMatMulProgram(2048, 1536, { ...rows, kContiguous: true }, 32,
          matMulStaging({}, { inner: 2048, outCols: 1536, sE: 1536 * 2048, sN: 2048, sK: 1 })), false],
      [new SubgroupMatrixMatMulProgram(2048, 1536, { ...rows, kContiguous: true, packedWeight: bf16 }, 32,
          matMulStaging({ packedWeight: bf16 }, { inner: 2048, outCols: 1536, sE: 1536 * 1024, sN: 2048, sK: 1 })), true],
      [new SubgroupMatrixMatMulProgram(2048, 1536, { ...rows, kContiguous: false }, 32,
          matMulStaging({}, { inner: 198, outCols: 1536, sE: 1536 * 198, sN: 1, sK: 1536 })), false],
      [new SubgroupMatrixWeightGradProgram([2, 1536, 2048], 2, 1536, 2048, { left: 'rows', right: 'rows', scaleLeft: false, scaled: false }, 32,
          weightGradStaging({ P: 1536, Q: 2048 })), false],
    ];
    // bf16 W along k in 16-byte runs of 8 halves (v7-c): 4 words a load
    expect(programs.map(([p]) => p.variableComponents.slice(0, 2))).to.deep.equal([[4, 4], [4, 4], [1, 4], [4, 4]]);
    for (const [program, packedW] of programs) {
      const code = packageProgramShader(program, { entry: 'wrapper', packedW });
      expect(code).to.match(packedW ? /var<storage, read> W : array<vec4<i32>>/ : /var<storage, read> [LAW] : array<vec4<f32>>/);
      expect(await compileErrors(standIn(code)), program.shaderKey).to.deep.equal([]);
    }
  });

  it('the package\'s 64- and 32-row blocks and 32-deep weight gradient outside tfjs (the device batch\'s few-rows cases): valid WGSL', async () => {
    const bf16 = { kind: 'bf16' as const, cols: 768, layout: null };
    const rows = { source: 'rows', hasBias: false, hasAddend: false, scaled: false, kContiguous: true } as const;
    const programs: Array<[SubgroupMatrixMatMulProgram | SubgroupMatrixWeightGradProgram, boolean]> = [
      ...([64, 32] as const).map((blockRows): [SubgroupMatrixMatMulProgram, boolean] => [new SubgroupMatrixMatMulProgram(4096, 2048,
          { ...rows, packedWeight: bf16 }, 32, matMulStaging({ packedWeight: bf16 }, { inner: 768, outCols: 2048, sE: 2048 * 384, sN: 768, sK: 1 }),
          blockRows), true]),
      [new SubgroupMatrixMatMulProgram(320, 320, rows, 32, matMulStaging({}, { inner: 200, outCols: 320, sE: 320 * 200, sN: 200, sK: 1 }), 32), false],
      [new SubgroupMatrixWeightGradProgram([64, 2048, 768], 64, 2048, 768, { left: 'rows', right: 'rows', scaleLeft: false, scaled: false }, 32,
          weightGradStaging({ P: 2048, Q: 768 }), 32), false],
    ];
    for (const [program, packedW] of programs) {
      expect(await compileErrors(standIn(packageProgramShader(program, { entry: 'wrapper', packedW }))), program.shaderKey).to.deep.equal([]);
    }
  });

  // variants v6: the speed bisection from the exact GEMM to the package's MatMul, at a small grouped shape
  const grouped = { E: 2, M: 256, N: 256, K: 128 };
  for (const [id, options] of V6_STEPS) {
    it(`${id} (${groupedGemmVariant(grouped, options).name}): valid WGSL around the matrix builtins`, async () => {
      expect(await compileErrors(standIn(groupedGemmVariant(grouped, options).code))).to.deep.equal([]);
    });
  }

  it('the v6 bisection changes one construct per case, and the exact GEMM\'s case is its inner loop and direct stores', () => {
    const squash = (t: string) => t.replace(/\s+/g, ' ');
    const base = groupedGemmVariant(grouped, {}).code;
    expect(squash(base)).to.contain(squash(multiplySlab(exactLayout(), 'partRow', 'partCol')));
    expect(base).to.contain('subgroupMatrixStore(&C, (rowBase + partRow + 48u) * 256u + col0 + partCol + 48u, c3_3, false, 256u);');
    expect(base).to.not.match(/rowSrc|Ts\b|A32v\[\(|select\(/);
    const only = (options: object, has: RegExp) => {
      const code = groupedGemmVariant(grouped, options).code;
      expect(code, JSON.stringify(options)).to.match(has);
      return code;
    };
    only({ expertLookup: true }, /let e = workgroupUniformLoad\(&rowSrc\[128\]\);/);
    only({ rowTable: true }, /u32\(rowSrc\[mm\]\) \* 2048u|u32\(rowSrc\[mm\]\) \* 128u/);
    only({ aF32: true }, /vec4<f16>\(A32v\[/);
    only({ b: 'bf16-nk' }, /bf16Quad\(Bv\[/);
    only({ bounds: true }, /select\(vec4<f16>\(\), /);
    only({ runtimeDims: true }, /k0 < kDim/);
    only({ slotEpilogue: true }, /subgroupMatrixStore\(&Ts, /);
    only({ workgroupExtra: true }, /var<workgroup> Ts : array<f32, 1024>;/);
    expect(only({ prefetch: false }, /for \(var k0 = 0u; k0 < 128u; k0 \+= 64u\) \{\s*\{ let q = lid \+ 0u; let mm/)).to.not.contain('let next');
    // quads along k (the package's [E, N, K] weights): 4 halves 4 slab rows (136 halves) apart
    expect(only({ b: 'f16-nk' }, /Bs\[d \+ 408u\] = rb0\.w;/)).to.contain('Bv[(bBase + (col0 + nn) * 128u + (next + kk) * 1u) / 4u]');
    expect(base).to.contain('Bv[(bBase + (col0 + nn) * 1u + (next + kk) * 256u) / 4u]');
    expect(groupedGemmDispatch(grouped, {})).to.deep.equal([2, 2, 2]);
    expect(groupedGemmDispatch(grouped, { expertLookup: true })).to.deep.equal([2, 4, 1]);
    expect([0, 255, 256, 511].map(r => groupedSourceRow(grouped, r))).to.deep.equal([255, 0, 511, 256]);
    expect(() => groupedGemmVariant({ ...grouped, K: 100 }, {})).to.throw('groupedGemmVariant: the problem must be whole blocks');
  });

  it('the package\'s v6 programs outside tfjs (whole blocks and not, bf16 and f32, the weight gradient): valid WGSL, and v5 stays selectable', async () => {
    const bf16 = { kind: 'bf16' as const, cols: 256, layout: null };
    const rows = { source: 'rows', hasBias: false, hasAddend: false, scaled: false } as const;
    const whole = matMulStaging({}, { inner: 256, outCols: 256, sE: 256 * 256, sN: 256, sK: 1 });
    const programs: Array<[SubgroupMatrixMatMulProgram | SubgroupMatrixWeightGradProgram, boolean]> = [
      [new SubgroupMatrixMatMulProgram(640, 256, { ...rows, kContiguous: true }, 32, whole), false],
      [new SubgroupMatrixMatMulProgram(640, 256, { ...rows, kContiguous: true, packedWeight: bf16 }, 32,
          matMulStaging({ packedWeight: bf16 }, { inner: 256, outCols: 256, sE: 256 * 128, sN: 256, sK: 1 })), true],
      [new SubgroupMatrixMatMulProgram(640, 320, { ...rows, kContiguous: true }, 32,
          matMulStaging({}, { inner: 200, outCols: 320, sE: 320 * 200, sN: 200, sK: 1 })), false],
      [new SubgroupMatrixWeightGradProgram([2, 256, 256], 2, 256, 256, { left: 'rows', right: 'rows', scaleLeft: false, scaled: false }, 32,
          weightGradStaging({ P: 256, Q: 256 })), false],
      // bf16 in 16-byte runs past the edges (K 264: a partial slab; 320 columns: a partial block), clamped and zeroed
      [new SubgroupMatrixMatMulProgram(640, 320, { ...rows, kContiguous: true, packedWeight: { ...bf16, cols: 264 } }, 32,
          matMulStaging({ packedWeight: { ...bf16, cols: 264 } }, { inner: 264, outCols: 320, sE: 320 * 132, sN: 264, sK: 1 })), true],
    ];
    const [, wholeBf16] = programs[1];
    expect(wholeBf16).to.equal(true);
    const eight = (programs[1][0] as SubgroupMatrixMatMulProgram).getUserCode().replace(/\s+/g, ' ');
    // one 16-byte load per 8 halves, stored to 8 consecutive halves of the column-major Bs
    expect(eight).to.contain('let w = loadW8(wBase, col0 + i32(nn), k0 + i32(kk)); rb0_0 = vec4<f16>(halves4(w.xy)); rb0_1 = vec4<f16>(halves4(w.zw));');
    expect(eight).to.contain('let d = (((q / 8u) * 72u) + ((q % 8u) * 8u)); Bs[d + 0u] = rb0_0.x;');
    expect(eight).to.contain('Bs[d + 7u] = rb0_1.w;');
    const edges = (programs[4][0] as SubgroupMatrixMatMulProgram).getUserCode().replace(/\s+/g, ' ');
    expect(edges).to.contain('loadW8(wBase, min(col0 + i32(nn), uniforms.outCols - 1), min(k0 + i32(kk), uniforms.inner - 8))');
    expect(edges).to.contain('select(vec4<f32>(0.0), halves4(w.zw), col0 + i32(nn) < uniforms.outCols && k0 + i32(kk) < uniforms.inner)');
    for (const [program, packedW] of programs) {
      const code = packageProgramShader(program, { entry: 'wrapper', packedW });
      expect(code, program.shaderKey).to.contain('subgroupMatrixStore(&result, ');
      expect(await compileErrors(standIn(code)), program.shaderKey).to.deep.equal([]);
    }
    const v6 = new SubgroupMatrixMatMulProgram(640, 256, { ...rows, kContiguous: true }, 32, whole);
    const v5 = new SubgroupMatrixMatMulProgram(640, 256, { ...rows, kContiguous: true }, 32, v5Structure(whole));
    expect(v6.shaderKey).to.not.equal(v5.shaderKey);
    const v5Code = v5.getUserCode();
    expect(v5Code).to.not.contain('subgroupMatrixStore(&result');
    expect(v5Code).to.contain('min(col0 + i32(nn), uniforms.outCols - 1)');
    const v6Code = v6.getUserCode().replace(/\s+/g, ' ');
    // whole blocks: no clamps on the quads; rows as vec4 offsets, resolved once per block
    expect(v6Code).to.not.contain('min(col0 + i32(nn)');
    expect(v6Code).to.contain('rowSrc[m] = select(-1, src * ((uniforms.inner) >> 2u), src >= 0);');
    // v7's staging: the slab's registers declared inside the K loop, loaded and stored in the same step, no prefetch
    expect(v6Code).to.contain('loadA4(max(rowSrc[mm], 0), k0 + i32(kk))');
    expect(v6Code).to.match(/for \(var k0 = 0; k0 < kEnd; k0 \+= 64\) \{ var ra0 : vec4<f16>;/);
    expect(v6Code).to.not.contain('let next');
    // v6's staging stays selectable (the variants' comparison): registers across the products, the next slab prefetched, Bs row-major
    const prefetched = new SubgroupMatrixMatMulProgram(640, 256, { ...rows, kContiguous: true }, 32, v6Staging(whole));
    expect(prefetched.shaderKey).to.not.equal(v6.shaderKey);
    const prefetchedCode = prefetched.getUserCode().replace(/\s+/g, ' ');
    expect(prefetchedCode).to.contain('loadA4(max(rowSrc[mm], 0), next + i32(kk))');
    expect(prefetchedCode).to.contain(multiplySlab(MATMUL_LAYOUT, 'partRow', 'partCol').replace(/\s+/g, ' '));
    expect(prefetchedCode.indexOf('var ra0 : vec4<f16>;')).to.be.lessThan(prefetchedCode.indexOf('for (var k0 = 0;'));
    expect(v6Code).to.contain('subgroupMatrixStore(&result, (u32(row0) + partRow + 48u) * u32(uniforms.outCols) + u32(col0) + partCol + 48u, c3_3, false, u32(uniforms.outCols));');
    // a product with a bias or an addend keeps the per-element epilogue only
    const biased = new SubgroupMatrixMatMulProgram(640, 256, { ...rows, hasBias: true, kContiguous: true }, 32, whole).getUserCode();
    expect(biased).to.not.contain('subgroupMatrixStore(&result');
  });

  it('the MatMul on f16 left operands (\'half8\': gathered and plain rows, whole slabs and a K tail, scaled, one group): valid WGSL, 8 halves a load', async () => {
    const bf16 = { kind: 'bf16' as const, cols: 256, layout: null };
    const common = { hasBias: false, hasAddend: false, kContiguous: true } as const;
    const staging = (inner: number, packed = true) => matMulStaging(packed ? { packedWeight: { ...bf16, cols: inner } } : {},
        { inner, outCols: 256, sE: 256 * (packed ? inner / 2 : inner), sN: inner, sK: 1 }, true);
    const programs = [
      new SubgroupMatrixMatMulProgram(640, 256, { ...common, source: 'gather', scaled: false, packedWeight: bf16 }, 32, staging(256)),
      new SubgroupMatrixMatMulProgram(640, 256, { ...common, source: 'rows', scaled: true, packedWeight: { ...bf16, cols: 200 } }, 32, staging(200)),
      new SubgroupMatrixMatMulProgram(333, 256, { ...common, source: 'rows', scaled: true, singleGroup: true }, 32, staging(256, false), 64),
    ];
    expect(programs.map(p => p.shaderKey.includes('_hw_') || p.shaderKey.includes('_hv_'))).to.deep.equal([true, true, true]);
    const whole = programs[0].getUserCode().replace(/\s+/g, ' ');
    // rows as offsets in vec4s of words (8 halves), one 16-byte load per 8 halves, staged as they are
    expect(whole).to.contain('rowSrc[m] = select(-1, src * ((uniforms.inner / 2) >> 2u), src >= 0);');
    expect(whole).to.contain('let a = loadA8(max(rowSrc[mm], 0), k0 + i32(kk)); ra0_0 = vec4<f16>(select(vec4<f16>(), halfQuad(a.xy), rowSrc[mm] >= 0));');
    expect(whole).to.contain('let d = (((q / 8u) * 72u) + ((q % 8u) * 8u)); As[d + 0u] = ra0_0.x;');
    expect(whole).to.not.contain('* s,');
    const tail = programs[1].getUserCode().replace(/\s+/g, ' ');
    expect(tail).to.contain('loadA8(max(rowSrc[mm], 0), min(k0 + i32(kk), uniforms.inner - 8))');
    expect(tail).to.contain('rowSrc[mm] >= 0 && k0 + i32(kk) < uniforms.inner');
    for (const program of programs) {
      const code = packageProgramShader(program, { entry: 'wrapper', packedW: program.variableNames.includes('W') && program.shaderKey.includes('bf16'), packedA: true });
      expect(code, program.shaderKey).to.contain('var<storage, read> A : array<vec4<i32>>');
      expect(await compileErrors(standIn(code)), program.shaderKey).to.deep.equal([]);
    }
    expect(() => new SubgroupMatrixMatMulProgram(640, 256, { ...common, source: 'act', activation: { kind: 'swiglu', interleaved: false }, scaled: false },
        32, staging(256, false))).to.throw(/an f16 left operand \(staging 'half8'\) is read as rows or gathered rows with v6's row offsets and no register prefetch, but got source 'act'/);
  });

  it('rejects 8-element runs of W where they cannot be: a float32 or quantized weight, W along n, the register prefetch, the weight gradient', () => {
    const rows = { source: 'rows', hasBias: false, hasAddend: false, scaled: false } as const;
    const bf16 = { kind: 'bf16' as const, cols: 256, layout: null };
    const eight = { left: 'vec4', right: 'vec8' } as const;
    expect(() => new SubgroupMatrixMatMulProgram(256, 256, { ...rows, kContiguous: true }, 32, eight)).to.throw(
        'SubgroupMatrixMatMulProgram: 8-element runs of W need a packed 16-bit weight contiguous along k and no register prefetch, ' +
        'but got float32, kContiguous true, registerPrefetch false');
    expect(() => new SubgroupMatrixMatMulProgram(256, 256, { ...rows, kContiguous: false, packedWeight: bf16 }, 32, eight)).to.throw(
        /but got bf16, kContiguous false, registerPrefetch false/);
    expect(() => new SubgroupMatrixMatMulProgram(256, 256, { ...rows, kContiguous: true, packedWeight: bf16 }, 32, { ...eight, registerPrefetch: true }))
      .to.throw(/but got bf16, kContiguous true, registerPrefetch true/);
    const int8 = { kind: 'int8' as const, cols: 256, layout: quantizedLayout('int8', [2, 256, 256], 2) };
    expect(() => new SubgroupMatrixMatMulProgram(256, 256, { ...rows, kContiguous: true, packedWeight: int8 }, 32, eight)).to.throw(
        'SubgroupMatrixMatMulProgram: int8 weights are staged per element, not in quads');
    expect(() => new SubgroupMatrixWeightGradProgram([2, 256, 256], 2, 256, 256, { left: 'rows', right: 'rows', scaleLeft: false, scaled: false }, 32,
        { left: 'vec4', right: 'vec8' })).to.throw('SubgroupMatrixWeightGradProgram: R is staged per element or in runs of 4, not 8');
    // matMulStaging picks runs of 8 only for a packed weight along k whose rows and expert start on 16 bytes; v6 and v5 go back to 4
    const pick = (sN: number, sE: number, inner = 256) => matMulStaging({ packedWeight: bf16 }, { inner, outCols: 256, sE, sN, sK: 1 }).right;
    expect([pick(256, 256 * 128), pick(260, 260 * 128, 260), pick(256, 256 * 128 + 2)]).to.deep.equal(['vec8', 'vec4', 'vec4']);
    expect(matMulStaging({}, { inner: 256, outCols: 256, sE: 256 * 256, sN: 256, sK: 1 }).right).to.equal('vec4');
    expect(v6Staging({ left: 'vec4', right: 'vec8' })).to.deep.equal({ left: 'vec4', right: 'vec4', registerPrefetch: true });
    expect(v5Structure({ left: 'vec4', right: 'vec8', v6: { whole: { depth: true, rows: true, cols: true } } }))
      .to.deep.equal({ left: 'vec4', right: 'vec4', registerPrefetch: true });
  });

    it('db64af4\'s programs (frozen) outside tfjs: valid WGSL around the matrix builtins', async () => {
    for (const [program, userCode] of [[rowsProgram, OLD_MATMUL_ROWS], [gradProgram, OLD_WEIGHT_GRAD_ROWS]] as const) {
      const code = packageProgramShader(program, { entry: 'wrapper', userCode });
      expect(code).to.contain('for (var i = localIndex; i < 4096u; i += 128u)');
      expect(await compileErrors(standIn(code))).to.deep.equal([]);
    }
  });

  it('packageProgramShader takes only the inputs it binds, and code with a main()', () => {
    const withBias = new SubgroupMatrixMatMulProgram(256, 128,
        { source: 'rows', hasBias: true, hasAddend: false, kContiguous: true, scaled: false }, 32);
    expect(() => packageProgramShader(withBias)).to.throw('packageProgramShader: no binding for input bias');
    expect(() => packageProgramShader(rowsProgram, { entry: 'inline', userCode: 'fn start() {}' }))
      .to.throw('packageProgramShader: the code has no fn main() {');
  });

  it('a variant with a mistake does not compile (the check above can fail)', async () => {
    const v = stagedVariant(problem, stagedVariants()[0]);
    expect((await compileErrors(standIn(v.code.replace('let partRow =', 'let partRows =')))).join('\n')).to.match(/partRow/);
  });

  it('rejects staged options the generator cannot build', () => {
    const layout = gemmLayout({ sgRows: 2, sgCols: 2, tilesM: 4, tilesN: 4, depth: 32, pad: 0 });
    expect(() => stagedVariant(problem, { layout: { ...layout, leftColMajor: true }, from: 'f16', vec4: false, prefetch: false }))
      .to.throw('stagedVariant: the GEMM stages A row-major');
    expect(() => stagedVariant(problem, { layout, from: 'f32', vec4: true, prefetch: false }))
      .to.throw('stagedVariant: vec4 and prefetch read f16 storage');
    // 4 subgroups of one 16×16 matrix each, 16 deep: 64 vec4 of A for 128 invocations
    const thin = gemmLayout({ sgRows: 1, sgCols: 4, tilesM: 1, tilesN: 1, depth: 16, pad: 0 });
    expect(() => stagedVariant(problem, { layout: thin, from: 'f16', vec4: true, prefetch: true }))
      .to.throw('stagedVariant: prefetch needs whole shares');
  });
});

describe('webgpu: the v7 variants (tools/webgpu_tc): index math emulated against float64, WGSL valid on Mesa', () => {
  /**
   * One workgroup of a v7 variant as data movement, with the functions its WGSL is generated from:
   * every invocation's runs staged into the slab's buffer (slab s into buffer s % 2 when double
   * buffered, that buffer emptied to NaN first, so a run that misses an element or a stale buffer
   * shows), each subgroup's tiles loaded (Dawn's semantics, loadMatrix) and multiplied. Returns the
   * largest |difference| of the rows × cols block to float64. W is stored [N, K] (k contiguous).
   */
  function v7BlockError(o: V7Options, inner: number, fault?: 'right tiles row-major'): number {
    const l = v7Layout(o);
    const threads = 32 * l.subgroupRows * l.subgroupCols;
    const x = integers;
    const A = values(l.rows * inner, 3); // A(m, k) at m·inner + k
    const W = values(l.cols * inner, 4); // B(k, n) = W(n, k) at n·inner + k
    const As = new Float64Array(l.buffers * l.sizeA);
    const Bs = new Float64Array(l.buffers * l.sizeB);
    const tiles = l.tilesM * l.tilesN;
    const acc = Array.from({ length: threads / 32 }, () => Array.from({ length: tiles }, () => new Float64Array(E * E)));
    const stage = (slab: Float64Array, start: number, size: number, at: number, value: number) => {
      if (at < 0 || at >= size) throw new Error(`run outside its buffer at ${at}`);
      if (!Number.isNaN(slab[start + at])) throw new Error(`slab element ${start + at} staged twice`);
      slab[start + at] = value;
    };
    for (let s = 0; s * l.depth < inner; s++) {
      const k0 = s * l.depth;
      const buffer = l.buffers === 2 ? s % 2 : 0;
      As.fill(NaN, buffer * l.sizeA, (buffer + 1) * l.sizeA);
      Bs.fill(NaN, buffer * l.sizeB, (buffer + 1) * l.sizeB);
      for (let lid = 0; lid < threads; lid++) {
        for (let t = 0; t < l.rows * l.depth / l.widthA / threads; t++) {
          const { m, k, at } = v7RunA(x, l, lid + t * threads);
          for (let c = 0; c < l.widthA; c++) stage(As, buffer * l.sizeA, l.sizeA, at + c, A[m * inner + k0 + k + c]);
        }
        for (let t = 0; t < l.cols * l.depth / l.widthB / threads; t++) {
          const { n, k, at, step } = v7RunB(x, l, lid + t * threads);
          for (let c = 0; c < l.widthB; c++) stage(Bs, buffer * l.sizeB, l.sizeB, at + c * step, W[n * inner + k0 + k + c]);
        }
      }
      for (let sg = 0; sg < threads / 32; sg++) {
        const partRow = Math.trunc(sg / l.subgroupCols) * E * l.tilesM, partCol = (sg % l.subgroupCols) * E * l.tilesN;
        for (let kk = 0; kk < l.depth; kk += E) {
          const a = Array.from({ length: l.tilesM }, (_, i) => loadMatrix(As, v7LeftTile(x, l, buffer * l.sizeA, partRow, kk, i)));
          const b = Array.from({ length: l.tilesN }, (_, j) => {
            const at = v7RightTile(x, l, buffer * l.sizeB, partCol, kk, j);
            return loadMatrix(Bs, fault ? { ...at, colMajor: false } : at);
          });
          for (let i = 0; i < l.tilesM; i++) {
            for (let j = 0; j < l.tilesN; j++) {
              const c = acc[sg][i * l.tilesN + j];
              for (let r = 0; r < E; r++) for (let q = 0; q < E; q++) for (let t = 0; t < E; t++) c[r * E + q] += a[i][r * E + t] * b[j][t * E + q];
            }
          }
        }
      }
    }
    let worst = 0;
    for (let sg = 0; sg < threads / 32; sg++) {
      const partRow = Math.trunc(sg / l.subgroupCols) * E * l.tilesM, partCol = (sg % l.subgroupCols) * E * l.tilesN;
      for (let t = 0; t < tiles; t++) {
        for (let r = 0; r < E; r++) {
          for (let q = 0; q < E; q++) {
            const m = partRow + E * Math.trunc(t / l.tilesN) + r, n = partCol + E * (t % l.tilesN) + q;
            let sum = 0;
            for (let k = 0; k < inner; k++) sum += A[m * inner + k] * W[n * inner + k];
            const d = Math.abs(acc[sg][t][r * E + q] - sum);
            worst = Number.isNaN(d) ? Infinity : Math.max(worst, d);
          }
        }
      }
    }
    return worst;
  }

  for (const [id, options] of V7_STEPS) {
    it(`${id}: three slabs staged and multiplied give the block exactly`, () => {
      expect(v7BlockError(options, 3 * options.depth)).to.equal(0);
    });
  }

  it('a right tile loaded with the wrong major order is caught (the check above can fail)', () => {
    const [, colMajor] = V7_STEPS.find(([id]) => id === 'v7-b-bs-col')!;
    expect(v7BlockError(colMajor, 3 * colMajor.depth, 'right tiles row-major')).to.be.greaterThan(0);
  });

  const small = { E: 2, M: 256, unused: 256, N: 256, K: 256, padding: true };
  for (const [id, options] of V7_STEPS) {
    it(`${id}: the WGSL stages and loads with the emulated functions, and is valid around the matrix builtins`, async () => {
      const l = v7Layout(options);
      const v = v7Variant(small, options);
      const x = wgslU32;
      expect(v.code).to.contain(`let d = (0u + ${v7RunA(x, l, 'q').at});`);
      expect(v.code).to.contain(`let d = (0u + ${v7RunB(x, l, 'q').at});`);
      const right = v7RightTile(x, l, '0u', 'partCol', x.lit(16), 3);
      const rightBase = l.buffers === 2 ? '(current * ' + l.sizeB + 'u)' : '0u';
      expect(v.code).to.contain(`(&Bs, ${right.offset.replace(/^\(0u \+/, `(${rightBase} +`)}, ${right.colMajor}, ${right.stride}u);`);
      expect(v7WorkgroupBytes(l)).to.be.at.most(48 * 1024);
      expect(await compileErrors(standInMatrices(v.code))).to.deep.equal([]);
    });
  }

  it('the problem\'s rows: gathered reversed per expert, padding and rows past the experts −1; one workgroup per block', () => {
    expect([0, 7, 8, 254, 256, 511, 512, 767].map(r => v7SourceRow(small, r))).to.deep.equal([255, -1, 247, 1, 511, -1, -1, -1]);
    expect(v7Dispatch(small, V7_STEPS[0][1])).to.deep.equal([2, 6, 1]);
    expect(v7Dispatch(small, V7_STEPS.find(([id]) => id === 'v7-i-256x128')![1])).to.deep.equal([2, 3, 1]);
    expect(() => v7Variant({ ...small, K: 200 }, V7_STEPS[0][1])).to.throw('v7Variant: 2×256 rows (+256), N 256, K 200 are not whole 128×128×64 blocks');
  });

  it('the conversion pass is valid WGSL (it needs no f16: pack2x16float)', async () => {
    expect(await compileErrors(conversionPass().code)).to.deep.equal([]);
  });
});
