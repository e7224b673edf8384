/**
 * NarrowInnerGroupedMatMulProgram: GroupedMatMulProgram's product when the reduction is at most
 * NARROW_MAX_COLS deep and the output wide, out[r, n] = alpha·Σ_{j<inner} A(r, j)·W_e(j, n)
 * (+ addend[r, n]), with the same row sources, plan and weight strides (float32 W, no bias): split
 * LoRA's expansions y += s·u·B_eᵀ (forward, PEFT's B [out, r·E] read with sN = r·E, sK = E) and
 * dx += gr·A_e (backward, A [r·E, in] read with sN = 1, sK = in), inner = r. The companion of
 * NarrowGroupedMatMulProgram (narrow_matmul_program.ts), which takes the products r wide.
 *
 * Such a product reads the addend and writes the output, [capacity, out] each, and does r FMAs per
 * output: it is bound by those bytes (~0.09 ms for two [16384, 2048] f32 tensors at 3 TB/s), yet
 * the generic program's 16·tm × 16·tn register tile over bk-deep slabs, built for deep reductions,
 * took 0.54 ms a call at OLMoE's shape on the H100 (run R: 34.7 ms over 64 calls). Here a
 * workgroup owns `blockRows` rows of one expert × 128 columns: its 32 column lanes × 8 row groups
 * each own 4 columns (one vec4 of adjacent columns where out is a multiple of 4, else columns
 * lane + 32·q, so that every load and store of a warp is one contiguous run of a row) and write
 * them for rows group + 8·i. W_e's inner × 128 slab is staged once per workgroup (and then held
 * in registers, inner vec4s a thread), and the block's rows of A (inner values each) once into
 * workgroup memory, read as broadcasts: per workgroup 2·blockRows·128·4 bytes of addend and
 * output against inner·128·4 of W. A thread issues its blockRows / 8 addend reads (up to 8 vec4s)
 * first, each after only its row's pairOfRow read, so that they are in flight across the plan
 * lookup (the expert's binary search over seg), the staging and their barriers. At most 8 KB + 4 KB of workgroup memory (inner 16, 64 rows),
 * under WebGPU's default 16 KB limit.
 *
 * Padding rows and tiles past the rows in use write 0 and read no addend, as GroupedMatMulProgram
 * does; the sum is the same fma chain over j, then alpha·sum + addend, as there.
 *
 * With `singleGroup` (dense LoRA's expansions y + u·Bᵀ and dx + g·A) there is no plan: no seg or
 * pr input, expert 0, row r of A for every r < numRows (any row count), so a call uploads nothing.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { rowLoadSnippet, singleGroupRowsSnippet, tileRowsSnippet } from './grouped_matmul_program.js';
import { NARROW_MAX_COLS } from './narrow_matmul_program.js';
import { type ActivationSpec, activationKey, EXPERT_OF_ROW, GROUPED_MATMUL_UNIFORMS, type RowSource } from './shared.js';

/** Column lanes of a workgroup: one warp's worth, each owning 4 columns of a row. */
const COLUMN_LANES = 32;
/** Row groups of a workgroup: a group's lanes write one row at a time. */
const ROW_GROUPS = 8;
const THREADS = COLUMN_LANES * ROW_GROUPS;
/** Columns of a workgroup. */
const BLOCK_COLS = 4 * COLUMN_LANES;

/** Rows of a workgroup: each row group writes blockRows / 8 of them. */
export type NarrowInnerBlockRows = 16 | 32 | 64;

/**
 * The rows per workgroup for a plan's row tile: the largest of 64, 32, 16 that divides it (so a
 * block never spans two experts), or undefined (the generic program).
 */
export function narrowInnerBlockRowsFor(rowTile: number): NarrowInnerBlockRows | undefined {
  return ([64, 32, 16] as const).find(rows => rowTile % rows === 0);
}

export interface NarrowInnerGroupedMatMulSpec {
  source: RowSource;
  /** the activation, when source is 'act' */
  activation?: ActivationSpec;
  hasAddend: boolean;
  /** out's width is a multiple of 4: the addend and the output are read and written as vec4s */
  vec4: boolean;
  blockRows: NarrowInnerBlockRows;
  /**
   * One group over plain rows (a dense product): no plan inputs (seg, pr); the expert is 0 (sE 0)
   * and row r is A's row r for r < numRows; source must be 'rows'. As GroupedMatMulSpec's singleGroup.
   */
  singleGroup?: boolean;
}

export class NarrowInnerGroupedMatMulProgram implements WebGPUProgram {
  variableNames: string[];
  variableComponents: number[];
  outputComponent: number;
  outputShape: number[];
  shaderKey: string;
  // not a flat layout (which tfjs would call as main(index)): column blocks along x, row blocks along y
  dispatchLayout = { x: [1], y: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [THREADS, 1, 1];
  uniforms = GROUPED_MATMUL_UNIFORMS;
  private readonly spec: NarrowInnerGroupedMatMulSpec;
  private readonly inner: number;

  /**
   * out [capacity, outCols], inner ≤ NARROW_MAX_COLS; capacity a multiple of blockRows (single
   * group: any row count, the rows of A)
   */
  constructor(capacity: number, outCols: number, inner: number, spec: NarrowInnerGroupedMatMulSpec) {
    if (inner < 1 || inner > NARROW_MAX_COLS) {
      throw new Error(`NarrowInnerGroupedMatMulProgram: inner must be in [1, ${NARROW_MAX_COLS}] but got ${inner}`);
    }
    if (spec.vec4 && outCols % 4 !== 0) {
      throw new Error(`NarrowInnerGroupedMatMulProgram: vec4 needs outCols a multiple of 4 but got ${outCols}`);
    }
    if (spec.singleGroup && spec.source !== 'rows') {
      throw new Error(`NarrowInnerGroupedMatMulProgram: singleGroup reads plain rows, so source must be 'rows' but got '${spec.source}'`);
    }
    this.spec = spec;
    this.inner = inner;
    this.outputShape = [capacity, outCols];
    this.dispatch = [Math.ceil(outCols / BLOCK_COLS), Math.ceil(capacity / spec.blockRows), 1];
    const plan = spec.singleGroup ? [] : ['seg', 'pr'];
    this.variableNames = ['A', 'W', ...plan, ...(spec.hasAddend ? ['addend'] : [])];
    const quad = spec.vec4 ? 4 : 1;
    this.variableComponents = [1, 1, ...plan.map(() => 1), ...(spec.hasAddend ? [quad] : [])];
    this.outputComponent = quad;
    // inner sizes the register slab: part of the specialisation, not only a uniform
    this.shaderKey = `moeNarrowInnerGroupedMatMul_${spec.source}_${activationKey(spec.source === 'act' ? spec.activation : undefined)}_` +
        `${spec.hasAddend ? 'a' : ''}${spec.vec4 ? 'v' : 's'}_${inner}_${spec.blockRows}` + (spec.singleGroup ? '_single' : '');
  }

  getUserCode(): string {
    const { blockRows, vec4, hasAddend, singleGroup } = this.spec;
    const inner = this.inner;
    const rowsPerThread = blockRows / ROW_GROUPS;
    // where the workgroup's column c (0 ≤ c < 128) sits in the slab: the vec4 of its owner lane, and the lane's component
    const slot = vec4 ? { lane: 'c / 4', component: 'c % 4' } : { lane: `c % ${COLUMN_LANES}`, component: `c / ${COLUMN_LANES}` };
    // this thread's 4 columns: adjacent (vec4) or 32 apart
    const column = (q: number) => (vec4 ? `col0 + 4 * lane + ${q}` : `col0 + lane + ${COLUMN_LANES * q}`);
    const load = (i: number) => {
      if (!hasAddend) return '';
      if (vec4) return `if (live${i} && colLive) { a${i} = addend[r${i} * quadsPerRow + quad]; }`;
      return `if (live${i}) {\n${[0, 1, 2, 3].map(q =>
        `          if (${column(q)} < uniforms.outCols) { a${i}[${q}] = addend[r${i} * uniforms.outCols + ${column(q)}]; }`).join('\n')}\n        }`;
    };
    const store = (i: number) => {
      const value = `select(vec4<f32>(0.0), uniforms.alpha * s${i} + a${i}, live${i})`;
      if (vec4) return `if (colLive && r${i} < uniforms.numRows) { result[r${i} * quadsPerRow + quad] = ${value}; }`;
      return `if (r${i} < uniforms.numRows) {\n          let v${i} = ${value};\n${[0, 1, 2, 3].map(q =>
        `          if (${column(q)} < uniforms.outCols) { result[r${i} * uniforms.outCols + ${column(q)}] = v${i}[${q}]; }`).join('\n')}\n        }`;
    };
    const rows = Array.from({ length: rowsPerThread }, (_, i) => i);
    const loads = rows.map(i => `
        let m${i} = group + ${ROW_GROUPS * i};
        let r${i} = row0 + m${i};
        let live${i} = r${i} < uniforms.numRows${singleGroup ? '' : ` && pr[r${i}] >= 0`};
        var a${i} = vec4<f32>(0.0);
        ${load(i)}`).join('');
    const sums = rows.map(i => `
        var s${i} = vec4<f32>(0.0);
        ${Array.from({ length: inner }, (_, j) => `s${i} = fma(vec4<f32>(As[m${i} * ${inner} + ${j}]), w${j}, s${i});`).join('\n        ')}
        ${store(i)}`).join('');
    return `
      var<workgroup> Ws : array<vec4<f32>, ${inner * COLUMN_LANES}>;
      var<workgroup> As : array<f32, ${blockRows * inner}>;
      var<workgroup> rowSrc : array<i32, ${blockRows}>;
      var<workgroup> tileExpert : i32;
      ${singleGroup ? '' : EXPERT_OF_ROW}
      ${rowLoadSnippet(this.spec.source, this.spec.activation)}

      fn main() {
        let lid = i32(localIndex);
        let lane = lid % ${COLUMN_LANES};
        let group = lid / ${COLUMN_LANES};
        let col0 = i32(workgroupId.x) * ${BLOCK_COLS};
        let row0 = i32(workgroupId.y) * ${blockRows};
        ${vec4 ? `let quadsPerRow = uniforms.outCols / 4;
        let quad = col0 / 4 + lane;
        let colLive = quad < quadsPerRow;` : ''}
        // every addend read of this thread (${rowsPerThread} rows) first, in flight across the plan
        // lookup, the staging and their barriers (which do not order storage reads): a row is real
        // where its pair is (pr >= 0; every row in use with one group), and a real row lies in the
        // rows in use, so its tile has an expert
        ${loads}
        ${singleGroup ? singleGroupRowsSnippet(blockRows, THREADS) : tileRowsSnippet(this.spec.source, blockRows, THREADS)}
        // also the barrier that publishes rowSrc
        let e = workgroupUniformLoad(&tileExpert);
        // W_e's slab, column c of the block read by consecutive threads (contiguous where sN is 1)
        for (var i = lid; i < ${inner * BLOCK_COLS}; i += ${THREADS}) {
          let c = i % ${BLOCK_COLS};
          let j = i / ${BLOCK_COLS};
          let n = col0 + c;
          var v = 0.0;
          if (e >= 0 && n < uniforms.outCols) { v = W[e * uniforms.sE + n * uniforms.sN + j * uniforms.sK]; }
          Ws[j * ${COLUMN_LANES} + ${slot.lane}][${slot.component}] = v;
        }
        // the block's rows of A (loadA gives 0 on padding rows)
        for (var i = lid; i < ${blockRows * inner}; i += ${THREADS}) {
          var v = 0.0;
          if (e >= 0) { v = loadA(i / ${inner}, i % ${inner}); }
          As[i] = v;
        }
        workgroupBarrier();
        ${Array.from({ length: inner }, (_, j) => `let w${j} = Ws[${j * COLUMN_LANES} + lane];`).join('\n        ')}
        ${sums}
      }
    `;
  }
}
