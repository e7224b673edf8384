/**
 * The grouped products of split LoRA's rank r (≤ 16) at memory speed: NarrowGroupedMatMulProgram
 * for the products r wide, NarrowWeightGradProgram and NarrowWeightGradSumProgram for the LoRA
 * factors' gradients (chunks of rows, then each expert's chunks added; see their comment below).
 *
 * NarrowGroupedMatMulProgram: GroupedMatMulProgram's product for outputs at most NARROW_MAX_COLS
 * wide, out[r, n] = alpha·Σ_k A(r, k)·W_e(k, n) with the same row sources, plan and weight strides
 * (no bias, no addend, float32 W): split LoRA's u = x·A_eᵀ and s·dy·B_e, [capacity, r].
 *
 * Such a product reads `inner` values per row and writes r, so it is bound by reading A once; the
 * 16×16-thread output tile of the generic program leaves 16 − r of its columns idle and reads A
 * through a bk-deep transposing slab built for wide outputs (issue 15: ~0.5 ms a call at OLMoE's
 * shape where reading the rows once takes ~0.07 ms at 3 TB/s). Here a workgroup owns a block of
 * 16·rowsPerThread rows of one expert and reads each row's inner dimension once: thread (lane,
 * ty) of 16×16 reads columns k = k0 + lane + 16·t of rows ty + 16·i (16 lanes read 64 contiguous
 * bytes of a row per load), against W_e's r × BK slab staged in workgroup memory once per
 * workgroup and chunk, so every staged weight value serves 16·rowsPerThread rows. The r partial
 * sums of each row are then reduced across its 16 lanes in workgroup memory, four outputs a
 * round. Workgroup memory rather than subgroup shuffles: the device tfjs gets on Mesa's software
 * GL has no 'subgroups' feature (device.features is empty there), and the reduction is rowsPerThread·⌈r/4⌉ rounds after inner/BK chunks of loading (4 rounds
 * after 32 chunks at r 8, inner 2048), too little to be worth a second specialisation.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import {
  type GroupedWeightGradSpec, rowLoadSnippet, singleGroupRowsSnippet, tileRowsSnippet, usesPairOfRow, weightGradLoadSnippets,
} from './grouped_matmul_program.js';
import {
  ACTIVATION_UNIFORMS, type ActivationSpec, activationKey, activationSnippet, EXPERT_OF_ROW, GROUPED_MATMUL_UNIFORMS, type RowSource, TILE_THREADS,
} from './shared.js';

/** The widest output the narrow program takes: r ≤ 16 covers LoRA ranks 1–16 (see narrowProductFits). */
export const NARROW_MAX_COLS = 16;

/** Reduction depth staged per chunk: 16 lanes × 4 columns each. */
const BK = 64;
const LANES = TILE_THREADS;
/** Threads of a workgroup of the narrow programs: NarrowWeightGradProgram's column block is this wide. */
export const NARROW_THREADS = TILE_THREADS * TILE_THREADS;
const THREADS = NARROW_THREADS;

export interface NarrowGroupedMatMulSpec {
  source: RowSource;
  /** the activation, when source is 'act' */
  activation?: ActivationSpec;
  /** W's reduction stride is 1: the slab is staged along k (coalesced), else along n */
  kContiguous: boolean;
  /** rows per thread, 1 or 2: the block (16·rowsPerThread rows) must divide the plan's row tile */
  rowsPerThread: 1 | 2;
  /**
   * One group over plain rows (a dense LoRA product, s·x·Aᵀ or s·dy·B): no plan inputs (seg, pr),
   * so nothing is uploaded per call; every block's expert is 0 (sE 0) and row r is A's row r for
   * r < numRows (any row count); source must be 'rows'. As GroupedMatMulSpec's singleGroup.
   */
  singleGroup?: boolean;
}

/** The rows per thread for a plan's row tile: 2 (32-row blocks) where they divide it. */
export function narrowRowsPerThread(rowTile: number): 1 | 2 {
  return rowTile % (2 * TILE_THREADS) === 0 ? 2 : 1;
}

export class NarrowGroupedMatMulProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  // not a flat layout (which tfjs would call as main(index)): one workgroup per row block along x
  dispatchLayout = { x: [1], y: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [THREADS, 1, 1];
  uniforms = GROUPED_MATMUL_UNIFORMS;
  private readonly spec: NarrowGroupedMatMulSpec;
  private readonly outCols: number;

  /**
   * out [capacity, outCols], outCols ≤ NARROW_MAX_COLS; capacity a multiple of 16·rowsPerThread
   * (single group: any row count, the rows of A)
   */
  constructor(capacity: number, outCols: number, spec: NarrowGroupedMatMulSpec) {
    if (outCols < 1 || outCols > NARROW_MAX_COLS) {
      throw new Error(`NarrowGroupedMatMulProgram: outCols must be in [1, ${NARROW_MAX_COLS}] but got ${outCols}`);
    }
    if (spec.singleGroup && spec.source !== 'rows') {
      throw new Error(`NarrowGroupedMatMulProgram: singleGroup reads plain rows, so source must be 'rows' but got '${spec.source}'`);
    }
    this.spec = spec;
    this.outCols = outCols;
    this.outputShape = [capacity, outCols];
    this.dispatch = [Math.ceil(capacity / (TILE_THREADS * spec.rowsPerThread)), 1, 1];
    this.variableNames = ['A', 'W', ...(spec.singleGroup ? [] : ['seg', 'pr'])];
    // outCols sizes the register arrays: part of the specialisation, not a uniform
    this.shaderKey = `moeNarrowGroupedMatMul_${spec.source}_${activationKey(spec.source === 'act' ? spec.activation : undefined)}_` +
        `${spec.kContiguous ? 'k' : 'n'}_${outCols}_${spec.rowsPerThread}` + (spec.singleGroup ? '_single' : '');
  }

  getUserCode(): string {
    const rpt = this.spec.rowsPerThread;
    const blockRows = TILE_THREADS * rpt;
    const cols = this.outCols;
    const quads = Math.ceil(cols / 4);
    const stage = this.spec.kContiguous
      ? `let kk = i % ${BK}; let n = i / ${BK};`
      : `let n = i % ${cols}; let kk = i / ${cols};`;
    const fmas: string[] = [];
    for (let i = 0; i < rpt; i++) {
      fmas.push(`var a${i} = 0.0;`, `if (k < uniforms.inner) { a${i} = loadA(ty + ${TILE_THREADS * i}, k); }`);
    }
    for (let j = 0; j < cols; j++) {
      fmas.push(`{ let w = Ws[${j * BK} + kk];`);
      for (let i = 0; i < rpt; i++) fmas.push(`  acc[${i * 4 * quads + j}] = fma(a${i}, w, acc[${i * 4 * quads + j}]);`);
      fmas.push('}');
    }
    return `
      var<workgroup> Ws : array<f32, ${cols * BK}>;
      var<workgroup> partial : array<vec4<f32>, ${THREADS}>;
      var<workgroup> rowSrc : array<i32, ${blockRows}>;
      var<workgroup> tileExpert : i32;
      ${this.spec.singleGroup ? '' : EXPERT_OF_ROW}
      ${rowLoadSnippet(this.spec.source, this.spec.activation)}

      fn main() {
        let lid = i32(localIndex);
        let lane = lid % ${LANES};
        let ty = lid / ${LANES};
        let row0 = i32(workgroupId.x) * ${blockRows};
        ${this.spec.singleGroup ? singleGroupRowsSnippet(blockRows, THREADS) : tileRowsSnippet(this.spec.source, blockRows, THREADS)}
        // also the barrier that publishes rowSrc
        let e = workgroupUniformLoad(&tileExpert);
        // rows i of this thread, outputs j at i·${4 * quads} + j (padded to whole vec4s for the reduction)
        var acc : array<f32, ${rpt * 4 * quads}>;
        if (e >= 0) {
          let wBase = e * uniforms.sE;
          for (var k0 = 0; k0 < uniforms.inner; k0 += ${BK}) {
            for (var i = lid; i < ${cols * BK}; i += ${THREADS}) {
              ${stage}
              let k = k0 + kk;
              var v = 0.0;
              if (k < uniforms.inner) { v = W[wBase + n * uniforms.sN + k * uniforms.sK]; }
              Ws[n * ${BK} + kk] = v;
            }
            workgroupBarrier();
            for (var t = 0; t < ${BK / LANES}; t++) {
              let kk = lane + ${LANES} * t;
              let k = k0 + kk;
              ${fmas.join('\n              ')}
            }
            workgroupBarrier();
          }
        }
        // uniform control flow from here: e is workgroup-uniform, and every round has its barriers
        for (var i = 0; i < ${rpt}; i++) {
          let m = ty + ${TILE_THREADS} * i;
          let r = row0 + m;
          for (var q = 0; q < ${quads}; q++) {
            let base = i * ${4 * quads} + 4 * q;
            partial[lid] = vec4<f32>(acc[base], acc[base + 1], acc[base + 2], acc[base + 3]);
            workgroupBarrier();
            let c = 4 * q + lane;
            if (lane < 4 && c < ${cols} && r < uniforms.numRows) {
              var s = 0.0;
              for (var l = 0; l < ${LANES}; l++) { s += partial[ty * ${LANES} + l][lane]; }
              // padding rows and tiles past the rows in use read 0 and write 0
              result[r * ${cols} + c] = select(0.0, uniforms.alpha * s, e >= 0 && rowSrc[m] >= 0);
            }
            workgroupBarrier();
          }
        }
      }
    `;
  }
}

/** Rows of the narrow operand staged per step of NarrowWeightGradProgram. */
const GRAD_ROWS = 32;
/** Rows of the wide operand a thread loads before summing them (divides GRAD_ROWS). */
const GRAD_UNROLL = 8;

/**
 * The rows one workgroup of NarrowWeightGradProgram sums, near `targetRows`: a chunk must not cross
 * an expert's segment, whose start and padded length are multiples of the plan's row tile, so it
 * is a multiple of the row tile (the fewest tiles that make targetRows) or, below one tile, the
 * largest divisor of the row tile up to targetRows.
 */
export function narrowGradChunkRows(rowTile: number, targetRows: number): number {
  if (targetRows >= rowTile) return rowTile * Math.ceil(targetRows / rowTile);
  let rows = Math.max(1, Math.floor(targetRows));
  while (rowTile % rows !== 0) rows--;
  return rows;
}

/**
 * The rows of one step of NarrowWeightGradProgram's grid: the row tile, or the chunk where that is
 * smaller; either divides every segment's start and every chunk's.
 */
export function narrowGradUnitRows(rowTile: number, chunkRows: number): number {
  return Math.min(rowTile, chunkRows);
}

/**
 * NarrowWeightGradProgram and NarrowWeightGradSumProgram: GroupedWeightGradProgram's
 * dW[e](p, q) = alpha·Σ_{real rows r of e} L(r, p)·R(r, q) (same operands, loaders and output
 * strides) when P or Q is at most NARROW_MAX_COLS: split LoRA's dA_e = Σ (s·dy·B_e)ᵀ·x (P = r) and
 * dB_e = Σ (w·dy)ᵀ·u (Q = r), in two dispatches.
 *
 * NarrowWeightGradProgram sums chunks of rows: the wide operand (x, act(h), dy: thousands of
 * columns) is the bytes that matter; each of a workgroup's 256 threads owns one of its columns and
 * reads that column of every row of the chunk straight from memory (256 threads read 1 KB of a row
 * together), while the narrow operand's rows (r ≤ 16 values each, r/inner of the bytes) are staged
 * GRAD_ROWS at a time in workgroup memory and read as broadcasts; the thread keeps the narrow
 * side's r sums in registers. A chunk is `chunkRows` rows of one expert (narrowGradChunkRows),
 * starting at its segment's start or a multiple of chunkRows past it: the grid is (wide / 256) ×
 * (capacity / unitRows) workgroups, one per unit of rows (narrowGradUnitRows), of which only the
 * units that start a chunk do work, writing the chunk's partial sums at partial[unit, narrow, wide].
 * One workgroup per expert instead (the first version) made the time follow the busiest expert:
 * real text's routing sends several times the mean rows to a few experts, and the grid's tail was
 * those experts' workgroups alone (0.70 ms a call in the OLMoE step against 0.12–0.21 ms at
 * uniform routing, bench/webgpu_lora_products.ts --skew). Chunks make the work follow the rows.
 *
 * NarrowWeightGradSumProgram adds each expert's chunk partials in chunk order (deterministic) into
 * the gradient's own layout, times alpha: one thread per output element, (wide / 256) × narrow × E
 * workgroups, reading partial along the wide side (coalesced). An expert with no rows has no chunks
 * and gets exact zeros.
 *
 * With `singleGroup` (dense LoRA's dA = gᵀ·x and dB = dyᵀ·u, one "expert" of plain rows) neither
 * program reads a plan: the rows 0..numRows−1 are cut every chunkRows (chunk c: rows c·chunkRows ..
 * min((c+1)·chunkRows, numRows)), a unit is a chunk, and the sum adds the ⌈numRows / chunkRows⌉
 * chunks in order. Their uniforms then say so (numRows, chunkRows instead of topK, numExperts,
 * unitRows): nothing is uploaded per call, where a one-group plan was (a buffer created mapped and
 * copied per call, ~1.7 ms of host a call on the H100, run S).
 */
export interface NarrowWeightGradSpec extends GroupedWeightGradSpec {
  /** which of P, Q is narrow (≤ NARROW_MAX_COLS): its operand is staged, the other is read by column */
  narrow: 'P' | 'Q';
  /** one group of plain rows, no plan inputs: left and right 'rows', not scaleLeft (what dense LoRA needs) */
  singleGroup?: boolean;
}

/** NarrowWeightGradProgram's uniforms (in the kernel's order) with a plan and with one group. */
const NARROW_GRAD_UNIFORMS = 'P : i32, Q : i32, topK : i32, numExperts : i32, unitRows : i32, chunkRows : i32, ' + ACTIVATION_UNIFORMS;
const NARROW_GRAD_SINGLE_UNIFORMS = 'P : i32, Q : i32, numRows : i32, chunkRows : i32, ' + ACTIVATION_UNIFORMS;
/** NarrowWeightGradSumProgram's, likewise. */
const NARROW_GRAD_SUM_UNIFORMS = 'P : i32, Q : i32, numExperts : i32, unitRows : i32, chunkRows : i32, oE : i32, oP : i32, oQ : i32, alpha : f32, ';
const NARROW_GRAD_SUM_SINGLE_UNIFORMS = 'P : i32, Q : i32, numRows : i32, chunkRows : i32, oP : i32, oQ : i32, alpha : f32, ';

function checkNarrow(program: string, P: number, Q: number, narrow: 'P' | 'Q'): number {
  const width = narrow === 'P' ? P : Q;
  if (width < 1 || width > NARROW_MAX_COLS) {
    throw new Error(`${program}: ${narrow} must be in [1, ${NARROW_MAX_COLS}] but got ${width}`);
  }
  return width;
}

export class NarrowWeightGradProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  // not a flat layout (which tfjs would call as main(index)): wide column blocks along x, units of rows along y
  dispatchLayout = { x: [2], y: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [THREADS, 1, 1];
  uniforms: string;
  private readonly spec: NarrowWeightGradSpec;
  private readonly width: number;

  /**
   * partial sums [capacity / unitRows, narrow, wide]; only the units that start a chunk are written.
   * Single group: capacity is the rows (any count) and unitRows the chunk's, [⌈rows / chunk⌉, narrow, wide].
   */
  constructor(capacity: number, unitRows: number, P: number, Q: number, spec: NarrowWeightGradSpec) {
    this.width = checkNarrow('NarrowWeightGradProgram', P, Q, spec.narrow);
    if (spec.singleGroup && (spec.left !== 'rows' || spec.right !== 'rows' || spec.scaleLeft)) {
      throw new Error('NarrowWeightGradProgram: singleGroup reads plain rows, so left and right must be \'rows\' and scaleLeft false ' +
          `but got left '${spec.left}', right '${spec.right}', scaleLeft ${spec.scaleLeft}`);
    }
    this.spec = spec;
    const wide = spec.narrow === 'P' ? Q : P;
    const units = Math.ceil(capacity / unitRows);
    this.outputShape = [units, this.width, wide];
    this.dispatch = [Math.ceil(wide / THREADS), units, 1];
    this.uniforms = spec.singleGroup ? NARROW_GRAD_SINGLE_UNIFORMS : NARROW_GRAD_UNIFORMS;
    this.variableNames = ['L', 'R', ...(spec.singleGroup ? [] : ['seg']), ...(usesPairOfRow(spec) ? ['pr'] : []),
      ...(spec.scaleLeft ? ['rw'] : [])];
    this.shaderKey = `moeNarrowWeightGrad_${spec.left}_${spec.right}_${activationKey(spec.right === 'act' ? spec.activation : undefined)}_` +
        `${spec.scaleLeft ? 's' : ''}_${spec.narrow}${this.width}` + (spec.singleGroup ? '_single' : '');
  }

  getUserCode(): string {
    const product = narrowProductSnippets(this.spec, this.width, '');
    return `
      var<workgroup> Ns : array<f32, ${GRAD_ROWS * this.width}>;
      ${product.staged ? STAGED_WIDE_ROWS : ''}
      var<workgroup> chunkStart : i32;
      var<workgroup> chunkCount : i32;
      ${this.spec.singleGroup ? '' : EXPERT_OF_ROW}
      ${product.functions}

      fn main() {
        let lid = i32(localIndex);
        let unit = i32(workgroupId.y);
        if (lid == 0) {
          ${chunkRowsSnippet(this.spec.singleGroup === true)}
          chunkStart = row0;
          chunkCount = rowsOfChunk;
        }
        let start = workgroupUniformLoad(&chunkStart);
        let count = workgroupUniformLoad(&chunkCount);
        ${product.sums(`i32(workgroupId.x) * ${THREADS} + lid`, j => `result[(unit * ${this.width} + ${j}) * ${product.wideSize} + c]`)}
      }
    `;
  }
}

/** The workgroup arrays of the staged wide rows' starts and scales (narrowProductSnippets' `staged`). */
const STAGED_WIDE_ROWS = `var<workgroup> wideRows : array<i32, ${GRAD_ROWS}>;
      var<workgroup> wideScales : array<f32, ${GRAD_ROWS}>;`;

/**
 * WGSL (lid == 0): the unit's first row into row0 and its chunk's rows into rowsOfChunk, 0 where
 * it starts none. One group: unit u is chunk u; with a plan (seg, EXPERT_OF_ROW), a unit of
 * unitRows starts a chunk every chunkRows rows of its expert's segment.
 */
function chunkRowsSnippet(singleGroup: boolean): string {
  if (singleGroup) {
    return `// unit u is chunk u: rows row0 .. min(row0 + chunkRows, numRows)
          let row0 = unit * uniforms.chunkRows;
          let rowsOfChunk = max(0, min(uniforms.chunkRows, uniforms.numRows - row0));`;
  }
  return `// the chunk's real rows when this unit starts one; 0 inside a chunk and past the rows in use
          let row0 = unit * uniforms.unitRows;
          var rowsOfChunk = 0;
          if (row0 < seg[uniforms.numExperts]) {
            let e = expertOfRow(row0);
            let offset = row0 - seg[e];
            if (offset % uniforms.chunkRows == 0) {
              rowsOfChunk = max(0, min(uniforms.chunkRows, seg[uniforms.numExperts + 1 + e] - offset));
            }
          }`;
}

/** How a narrow weight gradient reads its rows: NarrowWeightGradSpec less the tile, which it does not read. */
export type NarrowProductSpec = Pick<NarrowWeightGradSpec, 'left' | 'right' | 'activation' | 'scaleLeft' | 'narrow'>;

/**
 * WGSL of one narrow product aᵀ·b in a program (`suffix` names it among several: its inputs
 * L{suffix}, R{suffix}, its sizes uniforms.P{suffix}, uniforms.Q{suffix}; pr, rw and the chunk
 * are the program's): `functions`, its loaders, once at module scope; `sums(column, store)`, the
 * statements of a workgroup's part (chunkSumsSnippet) for the wide column `column`, storing sum j
 * at `store(j)`; `staged`: it stages its wide rows' starts and scales (STAGED_WIDE_ROWS).
 *
 * The wide operand's row is resolved once per staged row where it is gathered or scaled (its
 * gather through pr and its routing weight are a dependent load each, which every element's load
 * waited on: run Z13's gathered gradients took 130–144 µs a call against 75 for plain rows, Z14's
 * with them staged 76–77); a plain row's start is computed in place (staging those cost Z14's
 * dense gradients 35 → 44 µs a call). `fn wideBase(row) -> i32`: where the row's elements start;
 * `fn wideScale(row) -> f32`: the routing weight with scaleLeft on L, else 1; `fn wideAt(base, c)
 * -> f32`: element c unscaled (act(h) computed for 'act').
 */
function narrowProductSnippets(spec: NarrowProductSpec, width: number, suffix: string):
    { functions: string; staged: boolean; wideSize: string; sums: (column: string, store: (j: string) => string) => string } {
  const narrowP = spec.narrow === 'P';
  const [P, Q] = [`uniforms.P${suffix}`, `uniforms.Q${suffix}`];
  // the narrow operand's loader (the wide one is below)
  const { loadL, loadR } = weightGradLoadSnippets({ ...spec, ...(narrowP ? { right: 'rows' } : { left: 'rows', scaleLeft: false }) }, suffix);
  const source = narrowP ? spec.right : spec.left;
  const [array, wideSize] = narrowP ? [`R${suffix}`, Q] : [`L${suffix}`, P];
  const row = source === 'gather' ? '(pr[row] / uniforms.topK)' : 'row';
  const scale = !narrowP && spec.scaleLeft ? 'rw[pr[row]]' : '1.0';
  const at = source === 'act'
    ? `actForward(${array}[base + gateIndex(c, ${wideSize})], ${array}[base + upIndex(c, ${wideSize})])`
    : `${array}[base + c]`;
  const staged = narrowP ? spec.right === 'gather' : spec.left === 'gather' || spec.scaleLeft;
  const functions = `
      ${narrowP ? loadL : loadR}
      ${source === 'act' ? activationSnippet(spec.activation!) : ''}
      fn wideBase${suffix}(row : i32) -> i32 { return ${row} * ${source === 'act' ? '2 * ' : ''}${wideSize}; }
      fn wideScale${suffix}(row : i32) -> f32 { return ${scale}; }
      fn wideAt${suffix}(base : i32, c : i32) -> f32 { return ${at}; }`;
  return {
    functions, staged, wideSize,
    sums: (column, store) => chunkSumsSnippet({
      width, wideSize, column, store, suffix, stageWideRows: staged,
      loadNarrow: narrowP ? `loadL${suffix}(row, j)` : `loadR${suffix}(row, j)`,
      // rows past `rows` load 0 (and their staged narrow values are 0 too)
      wide: u => (staged ? `wideAt${suffix}(wideRows[rr0 + ${u}], c) * wideScales[rr0 + ${u}]`
        : `wideAt${suffix}(wideBase${suffix}(start + r0 + rr0 + ${u}), c)`),
    }),
  };
}

/** One product's part of a chunk's partial sums (chunkSumsSnippet), in WGSL expressions. */
interface ChunkSums {
  /** the narrow operand's columns: the sums a thread keeps */
  width: number;
  /** the wide operand's columns */
  wideSize: string;
  /** the thread's wide column c (lid and the workgroup in scope) */
  column: string;
  /** the narrow operand's element j of row `row` */
  loadNarrow: string;
  /** the wide operand's column c of the staged row rr0 + u (start, r0, rr0, c in scope) */
  wide: (u: number) => string;
  /** the wide rows' starts and scales are staged in wideRows and wideScales (wideBase{suffix}, wideScale{suffix} in scope) */
  stageWideRows: boolean;
  /** the product's name among several (narrowProductSnippets') */
  suffix: string;
  /** where sum j of this unit goes (unit, c in scope) */
  store: (j: string) => string;
}

/**
 * WGSL statements: the sums over the chunk's `count` rows from `start` of one wide column c with
 * each of the narrow operand's `width` columns, staged GRAD_ROWS rows at a time in Ns, stored where
 * `store` says (lid, unit, start and count in scope, all but lid workgroup-uniform).
 */
function chunkSumsSnippet(sums: ChunkSums): string {
  const { width } = sums;
  const loads = Array.from({ length: GRAD_UNROLL }, (_, u) =>
    `var v${u} = 0.0;\n              if (rr0 + ${u} < rows) { v${u} = ${sums.wide(u)}; }`);
  const fmas = Array.from({ length: GRAD_UNROLL }, (_, u) => Array.from({ length: width }, (_, j) =>
    `acc[${j}] = fma(v${u}, Ns[(rr0 + ${u}) * ${width} + ${j}], acc[${j}]);`).join('\n              '));
  return `let c = ${sums.column};
        let live = c < ${sums.wideSize};
        var acc : array<f32, ${width}>;
        for (var r0 = 0; r0 < count; r0 += ${GRAD_ROWS}) {
          for (var i = lid; i < ${GRAD_ROWS * width}; i += ${THREADS}) {
            let rr = i / ${width};
            let j = i % ${width};
            let row = start + r0 + rr;
            var v = 0.0;
            if (r0 + rr < count) { v = ${sums.loadNarrow}; }
            Ns[i] = v;
          }
          ${sums.stageWideRows ? `if (lid < ${GRAD_ROWS}) {
            let row = start + r0 + min(lid, count - r0 - 1);
            wideRows[lid] = wideBase${sums.suffix}(row);
            wideScales[lid] = wideScale${sums.suffix}(row);
          }` : ''}
          workgroupBarrier();
          let rows = min(${GRAD_ROWS}, count - r0);
          if (live) {
            // ${GRAD_UNROLL} rows' loads issued before their sums, so that each thread keeps that many
            // reads in flight (a plain loop over rows would wait on each load in turn)
            for (var rr0 = 0; rr0 < rows; rr0 += ${GRAD_UNROLL}) {
              ${loads.join('\n              ')}
              ${fmas.join('\n              ')}
            }
          }
          workgroupBarrier();
        }
        // units that start no chunk write nothing: the sum reads only the chunks' units
        if (live && count > 0) {
          for (var j = 0; j < ${width}; j++) {
            ${sums.store('j')} = acc[j];
          }
        }`;
}

export class NarrowWeightGradSumProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  // not a flat layout (which tfjs would call as main(index)): wide column blocks along x, narrow along y, experts along z
  dispatchLayout = { x: [1], y: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [THREADS, 1, 1];
  uniforms: string;
  private readonly narrow: 'P' | 'Q';
  private readonly singleGroup: boolean;

  /**
   * outputShape is the gradient's own shape (e.g. PEFT's A [r·E, in] or B [out, r·E]); singleGroup:
   * the partial sums of NarrowWeightGradProgram's single-group form (one expert, no seg input)
   */
  constructor(outputShape: number[], numExperts: number, P: number, Q: number, narrow: 'P' | 'Q', singleGroup = false) {
    const width = checkNarrow('NarrowWeightGradSumProgram', P, Q, narrow);
    if (singleGroup && numExperts !== 1) {
      throw new Error(`NarrowWeightGradSumProgram: singleGroup sums one group, so numExperts must be 1 but got ${numExperts}`);
    }
    this.narrow = narrow;
    this.singleGroup = singleGroup;
    this.outputShape = outputShape;
    this.dispatch = [Math.ceil((narrow === 'P' ? Q : P) / THREADS), width, numExperts];
    this.variableNames = singleGroup ? ['partial'] : ['partial', 'seg'];
    this.uniforms = singleGroup ? NARROW_GRAD_SUM_SINGLE_UNIFORMS : NARROW_GRAD_SUM_UNIFORMS;
    this.shaderKey = `moeNarrowWeightGradSum_${narrow}_${outputShape.length}` + (singleGroup ? '_single' : '');
  }

  getUserCode(): string {
    const narrowP = this.narrow === 'P';
    const [narrowSize, wideSize] = narrowP ? ['uniforms.P', 'uniforms.Q'] : ['uniforms.Q', 'uniforms.P'];
    if (this.singleGroup) {
      const outIndex = narrowP ? 'j * uniforms.oP + c * uniforms.oQ' : 'c * uniforms.oP + j * uniforms.oQ';
      return `
      fn main() {
        let c = i32(workgroupId.x) * ${THREADS} + i32(localIndex);
        let j = i32(workgroupId.y);
        if (c >= ${wideSize}) { return; }
        // the one group's chunks are units 0, 1, ...: every chunkRows rows
        let chunks = (uniforms.numRows + uniforms.chunkRows - 1) / uniforms.chunkRows;
        var s = 0.0;
        for (var k = 0; k < chunks; k++) {
          s += partial[(k * ${narrowSize} + j) * ${wideSize} + c];
        }
        result[${outIndex}] = uniforms.alpha * s;
      }
    `;
    }
    const outIndex = narrowP ? 'e * uniforms.oE + j * uniforms.oP + c * uniforms.oQ' : 'e * uniforms.oE + c * uniforms.oP + j * uniforms.oQ';
    return `
      fn main() {
        let c = i32(workgroupId.x) * ${THREADS} + i32(localIndex);
        let j = i32(workgroupId.y);
        let e = i32(workgroupId.z);
        if (c >= ${wideSize}) { return; }
        // expert e's chunks start at its first unit, one every chunkRows / unitRows units
        let firstUnit = seg[e] / uniforms.unitRows;
        let unitStep = uniforms.chunkRows / uniforms.unitRows;
        let chunks = (seg[uniforms.numExperts + 1 + e] + uniforms.chunkRows - 1) / uniforms.chunkRows;
        var s = 0.0;
        for (var k = 0; k < chunks; k++) {
          s += partial[((firstUnit + k * unitStep) * ${narrowSize} + j) * ${wideSize} + c];
        }
        result[${outIndex}] = uniforms.alpha * s;
      }
    `;
  }
}

/** One product aᵀ·b of a NarrowWeightGradPairProgram: a [rows, P], b [rows, Q], P or Q ≤ NARROW_MAX_COLS. */
export interface NarrowGradProduct {
  P: number;
  Q: number;
  /** how its rows are read, as NarrowWeightGradSpec's (with a plan); absent: plain rows */
  rows?: Pick<NarrowWeightGradSpec, 'left' | 'right' | 'activation' | 'scaleLeft'>;
}

/** Where a NarrowWeightGradPairProgram puts a product's partial sums, and how it reads its rows. */
export interface NarrowGradPart extends NarrowGradProduct {
  spec: NarrowProductSpec;
  /** the narrow side's columns */
  width: number;
  /** the wide side's columns */
  wide: number;
  /** the workgroups along x over the wide side, and the first of them */
  blocks: number;
  firstBlock: number;
  /** where its [width, wide] partial sums start in each unit's row of the output */
  offset: number;
}

/** The layout of two products' partial sums in one unit's row (NarrowWeightGradPairProgram's output [units, perUnit]). */
export function narrowGradPairLayout(products: readonly [NarrowGradProduct, NarrowGradProduct]): { parts: [NarrowGradPart, NarrowGradPart]; perUnit: number } {
  let offset = 0;
  let firstBlock = 0;
  const parts = products.map((product, i) => {
    const { P, Q } = product;
    const narrow = P <= Q ? 'P' : 'Q';
    const width = checkNarrow(`NarrowWeightGradPairProgram product ${i}`, P, Q, narrow);
    const wide = narrow === 'P' ? Q : P;
    const spec: NarrowProductSpec = { left: 'rows', right: 'rows', scaleLeft: false, ...product.rows, narrow };
    const part: NarrowGradPart = { ...product, spec, width, wide, blocks: Math.ceil(wide / THREADS), firstBlock, offset };
    offset += width * wide;
    firstBlock += part.blocks;
    return part;
  }) as [NarrowGradPart, NarrowGradPart];
  return { parts, perUnit: offset };
}

/** NarrowWeightGradPairProgram's uniforms, in the kernels' order (single group: numRows; with a plan: topK, numExperts, unitRows). */
export const NARROW_GRAD_PAIR_UNIFORMS = 'P0 : i32, Q0 : i32, P1 : i32, Q1 : i32, numRows : i32, topK : i32, numExperts : i32, ' +
    'unitRows : i32, chunkRows : i32, perUnit : i32, firstBlock1 : i32, offset1 : i32, ' + ACTIVATION_UNIFORMS;

/**
 * NarrowWeightGradProgram for two products over the same rows and chunks in one dispatch (a LoRA
 * factor pair's dA = gᵀ·x and dB = dyᵀ·u: one program where there were two): the first product's
 * column blocks, then the second's, along x, the units of rows along y, each workgroup summing its
 * chunk for one product as NarrowWeightGradProgram does (narrowProductSnippets: the same loads and
 * multiply-adds in the same order, so the same partial sums bit for bit). Output [units, perUnit]:
 * each unit's row holds the first product's [narrow, wide] partial sums, then the second's
 * (narrowGradPairLayout). Inputs L0, R0, L1, R1 (product i is Liᵀ·Ri), and with a plan seg, pr and
 * rw as the products read them; the uniforms are NARROW_GRAD_PAIR_UNIFORMS (firstBlock1 and
 * offset1 the layout's).
 */
export class NarrowWeightGradPairProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  // not a flat layout (which tfjs would call as main(index)): column blocks along x, units along y
  dispatchLayout = { x: [1], y: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [THREADS, 1, 1];
  uniforms = NARROW_GRAD_PAIR_UNIFORMS;
  /** where each product's partial sums go in a unit's row, and its length (narrowGradPairLayout's) */
  readonly parts: [NarrowGradPart, NarrowGradPart];
  readonly perUnit: number;
  private readonly singleGroup: boolean;

  /** as NarrowWeightGradProgram's: capacity rows in units of unitRows; single group: the rows, in chunks */
  constructor(capacity: number, unitRows: number, products: readonly [NarrowGradProduct, NarrowGradProduct], singleGroup: boolean) {
    const { parts, perUnit } = narrowGradPairLayout(products);
    if (singleGroup && parts.some(p => p.spec.left !== 'rows' || p.spec.right !== 'rows' || p.spec.scaleLeft)) {
      throw new Error('NarrowWeightGradPairProgram: singleGroup reads plain rows, so both products must read rows unscaled');
    }
    // one activation snippet per program: its functions and uniforms are the program's
    if (parts.every(p => p.spec.right === 'act')) {
      throw new Error('NarrowWeightGradPairProgram: at most one product may read act(h), but both do');
    }
    this.parts = parts;
    this.perUnit = perUnit;
    this.singleGroup = singleGroup;
    const units = Math.ceil(capacity / unitRows);
    this.outputShape = [units, perUnit];
    this.dispatch = [parts[0].blocks + parts[1].blocks, units, 1];
    this.variableNames = ['L0', 'R0', 'L1', 'R1', ...(singleGroup ? [] : ['seg']), ...(parts.some(p => usesPairOfRow(p.spec)) ? ['pr'] : []),
      ...(parts.some(p => p.spec.scaleLeft) ? ['rw'] : [])];
    const act = parts.find(p => p.spec.right === 'act')?.spec.activation;
    // the narrow widths size the register arrays: part of the specialisation, not uniforms
    this.shaderKey = `moeNarrowWeightGradPair_${parts.map(({ spec, width }) => `${spec.left}_${spec.right}_${spec.scaleLeft ? 's' : ''}_` +
        `${spec.narrow}${width}`).join('_')}_${activationKey(act)}` + (singleGroup ? '_single' : '');
  }

  getUserCode(): string {
    const products = this.parts.map((p, i) => narrowProductSnippets(p.spec, p.width, String(i)));
    const [firstBlock, offset] = [['0', 'uniforms.firstBlock1'], ['0', 'uniforms.offset1']];
    const part = (i: number) => products[i].sums(`(i32(workgroupId.x) - ${firstBlock[i]}) * ${THREADS} + lid`,
        j => `result[unit * uniforms.perUnit + ${offset[i]} + ${j} * ${products[i].wideSize} + c]`);
    return `
      var<workgroup> Ns : array<f32, ${GRAD_ROWS * Math.max(this.parts[0].width, this.parts[1].width)}>;
      ${products.some(p => p.staged) ? STAGED_WIDE_ROWS : ''}
      var<workgroup> chunkStart : i32;
      var<workgroup> chunkCount : i32;
      var<workgroup> chunkPart : i32;
      ${this.singleGroup ? '' : EXPERT_OF_ROW}
      ${products.map(p => p.functions).join('\n')}

      fn main() {
        let lid = i32(localIndex);
        let unit = i32(workgroupId.y);
        if (lid == 0) {
          ${chunkRowsSnippet(this.singleGroup)}
          chunkStart = row0;
          chunkCount = rowsOfChunk;
          // product 0 or 1, by the column block
          chunkPart = select(1, 0, i32(workgroupId.x) < uniforms.firstBlock1);
        }
        let start = workgroupUniformLoad(&chunkStart);
        let count = workgroupUniformLoad(&chunkCount);
        if (workgroupUniformLoad(&chunkPart) == 0) {
          ${part(0)}
        } else {
          ${part(1)}
        }
      }
    `;
  }
}
