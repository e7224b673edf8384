/**
 * DenseNarrowMatMulProgram: the dense LoRA products r wide at memory speed, out[m, n] =
 * alpha·Σ_k A[m, k]·W(k, n) with n ≤ NARROW_MAX_COLS and W(k, n) = W[n·sN + k·sK] (sK 1: LoRA's
 * A [r, K] of s·x·Aᵀ; sN 1: B [K, r] of s·dy·B), any m and any K.
 *
 * Such a product reads A once (m·K·4 bytes) and writes m·n values: at OLMoE's [2048, 2048] about
 * 6 us at the H100's ~3 TB/s. NarrowGroupedMatMulProgram's single-group form took 80–96 us a call
 * there (run U2): its 256-thread workgroup owns 16 rows (16 lanes a row) and stages W's r × 64
 * slab in workgroup memory between two barriers per 64-deep chunk, so at 2048 rows its 128
 * workgroups (about one per SM) each wait through 32 barrier-separated chunks: latency-bound.
 *
 * Here the rows are few and deep, so the lanes split K: a workgroup is `rowGroups` rows × `lanes`
 * lanes (256 threads), and lane l of a row reads k = l, l + lanes, … (a warp's loads of a row are
 * one contiguous run), UNROLL of them issued before their sums so that each thread keeps that
 * many reads in flight. W is read straight from memory, no staging and no barrier in the loop:
 * r·K·4 bytes (64 KB at OLMoE) that stay in L1/L2 for every workgroup. With `rowsPerThread` 2 or 4
 * a thread owns rows ty, ty + rowGroups, …, and each W value it loads serves all of them (W's
 * loads are n per A load at 1 row a thread, the L1 traffic that rows per thread divide).
 * The lanes' partial sums are then added in workgroup memory, a tree of vec4s (one vec4 per 4
 * outputs, at most 4 × 256 vec4s = 16 KB, WebGPU's default limit), one row of the thread at a
 * time, alpha applied once at the write. Workgroup memory rather than subgroup shuffles: Mesa's
 * software GL has no 'subgroups' feature, and the tree is log2(lanes) steps per row of a thread
 * against K / lanes loads of a row.
 *
 * A single group of plain rows (no plan, nothing uploaded per call): row i is A's row i for
 * i < numRows; rows past it (the last workgroup's) load nothing and write nothing.
 *
 * `planned` (the experts' u = x·A_eᵀ and act(h)·A_eᵀ, which the kernel sends here where W is along
 * k: groupedNarrowLayoutFor): the plan's padded rows with GroupedMatMulProgram's row sources,
 * inputs (seg, pr) and uniforms. A workgroup's rows must lie in one expert (its rows divide the plan's row tile), whose
 * factor W_e starts at e·sE; a padding row, or a block past the rows in use, writes 0 and a thread
 * none of whose rows is real loads nothing. NarrowGroupedMatMulProgram's 16 lanes a row against a
 * staged slab took 103 and 133 µs a call for these at OLMoE's step (run Z11's profile), where
 * reading the 16384 rows once takes ~45 µs; this program 82 and 89 (run Z13).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { NARROW_MAX_COLS } from './narrow_matmul_program.js';
import { type ActivationSpec, activationKey, activationSnippet, EXPERT_OF_ROW, GROUPED_MATMUL_UNIFORMS, type RowSource } from './shared.js';

const THREADS = 256;
/** Loads of A (and their W values) a lane issues before its sums. */
const UNROLL = 4;

/** Lanes splitting a row's K: 256 / lanes rows per workgroup (8, 4 or 2 rows). */
export type DenseNarrowLanes = 32 | 64 | 128;
export const DENSE_NARROW_LANES: readonly DenseNarrowLanes[] = [32, 64, 128];
/** Rows a thread owns, sharing each W load. */
export type DenseNarrowRowsPerThread = 1 | 2 | 4;
export const DENSE_NARROW_ROWS_PER_THREAD: readonly DenseNarrowRowsPerThread[] = [1, 2, 4];

export interface DenseNarrowMatMulLayout {
  lanes: DenseNarrowLanes;
  rowsPerThread: DenseNarrowRowsPerThread;
}

/** The uniforms, in the kernel's order (runNarrowDenseProduct); a planned product takes GROUPED_MATMUL_UNIFORMS. */
export const DENSE_NARROW_MATMUL_UNIFORMS = 'numRows : i32, outCols : i32, inner : i32, sN : i32, sK : i32, alpha : f32, ';

/** The rows of a planned product: the plan's row sources, as GroupedMatMulProgram's. */
export interface DenseNarrowPlannedRows {
  source: RowSource;
  /** the activation, when source is 'act' */
  activation?: ActivationSpec;
}

export class DenseNarrowMatMulProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  // not a flat layout (which tfjs would call as main(index)): one workgroup per block of rows along x
  dispatchLayout = { x: [1], y: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [THREADS, 1, 1];
  uniforms: string;
  private readonly outCols: number;
  private readonly layout: DenseNarrowMatMulLayout;
  private readonly planned?: DenseNarrowPlannedRows;

  /**
   * out [rows, outCols], outCols ≤ NARROW_MAX_COLS; any row count (≥ 1). `planned`: rows is the
   * plan's capacity, a multiple of denseNarrowBlockRows(layout), as its row tile must be.
   */
  constructor(rows: number, outCols: number, layout: DenseNarrowMatMulLayout, planned?: DenseNarrowPlannedRows) {
    if (!Number.isInteger(outCols) || outCols < 1 || outCols > NARROW_MAX_COLS) {
      throw new Error(`DenseNarrowMatMulProgram: outCols must be an integer in [1, ${NARROW_MAX_COLS}] but got ${outCols}`);
    }
    if (!DENSE_NARROW_LANES.includes(layout.lanes)) {
      throw new Error(`DenseNarrowMatMulProgram: lanes must be one of ${DENSE_NARROW_LANES.join(', ')} but got ${layout.lanes}`);
    }
    if (!DENSE_NARROW_ROWS_PER_THREAD.includes(layout.rowsPerThread)) {
      throw new Error(`DenseNarrowMatMulProgram: rowsPerThread must be one of ${DENSE_NARROW_ROWS_PER_THREAD.join(', ')} ` +
          `but got ${layout.rowsPerThread}`);
    }
    if (!Number.isInteger(rows) || rows < 1) {
      throw new Error(`DenseNarrowMatMulProgram: rows must be a positive integer but got ${rows}`);
    }
    if (planned !== undefined && rows % denseNarrowBlockRows(layout) !== 0) {
      throw new Error(`DenseNarrowMatMulProgram: a planned product's rows must be whole blocks of ${denseNarrowBlockRows(layout)} ` +
          `but got ${rows}`);
    }
    if (planned !== undefined && (planned.source === 'act') !== (planned.activation !== undefined)) {
      throw new Error(`DenseNarrowMatMulProgram: an activation goes with source 'act' only, but got source '${planned.source}' ` +
          `and ${planned.activation === undefined ? 'none' : `'${planned.activation.kind}'`}`);
    }
    this.outCols = outCols;
    this.layout = layout;
    this.planned = planned;
    this.outputShape = [rows, outCols];
    this.dispatch = [Math.ceil(rows / denseNarrowBlockRows(layout)), 1, 1];
    this.variableNames = planned === undefined ? ['A', 'W'] : ['A', 'W', 'seg', 'pr'];
    this.uniforms = planned === undefined ? DENSE_NARROW_MATMUL_UNIFORMS : GROUPED_MATMUL_UNIFORMS;
    // outCols sizes the register arrays and lanes, rowsPerThread the loops: all specialisations;
    // the strides (either layout of W), rows, K and alpha are uniforms
    this.shaderKey = `moeDenseNarrowMatMul_${outCols}_${layout.lanes}_${layout.rowsPerThread}` +
        (planned === undefined ? '' : `_planned_${planned.source}_${activationKey(planned.activation)}`);
  }

  /**
   * WGSL (planned): `fn rowSource(r : i32, e : i32) -> i32`, the A row of padded row r in a block
   * of expert e (−1: padding, a block past the rows in use, or past the capacity).
   */
  private rowSourceSnippet(): string {
    return `
      fn rowSource(r : i32, e : i32) -> i32 {
        if (e < 0 || r >= uniforms.numRows) { return -1; }
        let p = pr[r];
        if (p < 0) { return -1; }
        return ${this.planned!.source === 'gather' ? 'p / uniforms.topK' : 'r'};
      }`;
  }

  getUserCode(): string {
    const { lanes, rowsPerThread: rpt } = this.layout;
    const rowGroups = THREADS / lanes;
    const cols = this.outCols;
    const quads = Math.ceil(cols / 4);
    // acc[i·4·quads + j]: row i of the thread, output j (padded to whole vec4s for the reduction)
    const accAt = (i: number, j: number) => `acc[${i * 4 * quads + j}]`;
    /** WGSL: the loads of round u's k (A's rows of the thread, W's n values) and their sums */
    const planned = this.planned;
    // A's element k of the thread's row i: as stored, or (planned) 0 on padding and act(h) for 'act'
    const aAt = (i: number, k: string) => {
      if (planned === undefined) return `A[rowBase${i} + ${k}]`;
      const value = planned.source === 'act'
        ? `actForward(A[rowBase${i} + gateIndex(${k}, uniforms.inner)], A[rowBase${i} + upIndex(${k}, uniforms.inner)])`
        : `A[rowBase${i} + ${k}]`;
      return `select(0.0, ${value}, live${i})`;
    };
    const step = (u: number): { loads: string[]; sums: string[] } => {
      const k = u === 0 ? 'k' : `(k + ${u * lanes})`;
      const loads: string[] = [];
      for (let i = 0; i < rpt; i++) loads.push(`let a${u}_${i} = ${aAt(i, k)};`);
      for (let j = 0; j < cols; j++) loads.push(`let w${u}_${j} = W[${planned === undefined ? '' : 'wBase + '}${j} * uniforms.sN + ${k} * uniforms.sK];`);
      const sums: string[] = [];
      for (let i = 0; i < rpt; i++) {
        for (let j = 0; j < cols; j++) sums.push(`${accAt(i, j)} = fma(a${u}_${i}, w${u}_${j}, ${accAt(i, j)});`);
      }
      return { loads, sums };
    };
    const unrolled = Array.from({ length: UNROLL }, (_, u) => step(u));
    const rest = step(0);
    const rowBases = planned === undefined
      ? Array.from({ length: rpt }, (_, i) =>
        // rows past numRows read row numRows − 1 (in bounds) and are not written
        `let rowBase${i} = min(row0 + ty + ${rowGroups * i}, uniforms.numRows - 1) * uniforms.inner;`)
      : [
        `if (lid == 0) {
          var e = -1;
          if (row0 < seg[uniforms.numExperts]) { e = expertOfRow(row0); }
          blockExpert = e;
        }
        let e = workgroupUniformLoad(&blockExpert);
        let wBase = max(e, 0) * uniforms.sE;`,
        ...Array.from({ length: rpt }, (_, i) => `let src${i} = rowSource(row0 + ty + ${rowGroups * i}, e);
        let live${i} = src${i} >= 0;
        let rowBase${i} = max(src${i}, 0) * ${planned.source === 'act' ? '2 * ' : ''}uniforms.inner;`),
        // a thread none of whose rows is real runs no step (no barrier inside the loops)
        `let kEnd = select(0, uniforms.inner, ${Array.from({ length: rpt }, (_, i) => `live${i}`).join(' || ')});`,
      ];
    const kEnd = planned === undefined ? 'uniforms.inner' : 'kEnd';
    const treeAdds = Array.from({ length: quads }, (_, q) =>
      `partial[${q * THREADS} + lid] += partial[${q * THREADS} + lid + half];`);
    // one reduction per row of the thread, unrolled here: acc indexed only by constants stays in
    // registers (an index computed at run time can put the whole array in local memory)
    const reductions = Array.from({ length: rpt }, (_, i) => `
        // row ${i} of the thread
        ${Array.from({ length: quads }, (_, q) => `partial[${q * THREADS} + lid] = vec4<f32>(` +
            `${[0, 1, 2, 3].map(c => accAt(i, 4 * q + c)).join(', ')});`).join('\n        ')}
        workgroupBarrier();
        // a tree over the row's lanes: lane l adds lane l + half, until lane 0 holds the sums
        for (var half = ${lanes / 2}; half > 0; half /= 2) {
          if (lane < half) {
            ${treeAdds.join('\n            ')}
          }
          workgroupBarrier();
        }
        {
          let r = row0 + ty + ${rowGroups * i};
          if (lane < ${cols} && r < uniforms.numRows) {
            ${planned === undefined
              ? `result[r * ${cols} + lane] = uniforms.alpha * partial[(lane / 4) * ${THREADS} + ty * ${lanes}][lane % 4];`
              // padding rows and blocks past the rows in use write 0
              : `result[r * ${cols} + lane] = select(0.0, uniforms.alpha * partial[(lane / 4) * ${THREADS} + ty * ${lanes}][lane % 4], live${i});`}
          }
        }
        ${i + 1 < rpt ? '// the next row\'s partials overwrite these\n        workgroupBarrier();' : ''}`);
    return `
      var<workgroup> partial : array<vec4<f32>, ${quads * THREADS}>;
      ${planned === undefined ? '' : `var<workgroup> blockExpert : i32;
      ${EXPERT_OF_ROW}
      ${this.rowSourceSnippet()}
      ${planned.activation !== undefined ? activationSnippet(planned.activation) : ''}`}

      fn main() {
        let lid = i32(localIndex);
        let lane = lid % ${lanes};
        let ty = lid / ${lanes};
        let row0 = i32(workgroupId.x) * ${rowGroups * rpt};
        ${rowBases.join('\n        ')}
        var acc : array<f32, ${rpt * 4 * quads}>;
        // ${UNROLL} k a lane per round (${UNROLL}·${rpt} loads of A and ${UNROLL}·${cols} of W in flight), then the rest one at a time
        var k = lane;
        for (; k + ${(UNROLL - 1) * lanes} < ${kEnd}; k += ${UNROLL * lanes}) {
          ${unrolled.flatMap(s => s.loads).join('\n          ')}
          ${unrolled.flatMap(s => s.sums).join('\n          ')}
        }
        for (; k < ${kEnd}; k += ${lanes}) {
          ${[...rest.loads, ...rest.sums].join('\n          ')}
        }
        // uniform control flow from here: every thread runs every reduction and its barriers
        ${reductions.join('\n')}
      }
    `;
  }
}

/** Rows of one workgroup of DenseNarrowMatMulProgram. */
export function denseNarrowBlockRows(layout: DenseNarrowMatMulLayout): number {
  return (THREADS / layout.lanes) * layout.rowsPerThread;
}
