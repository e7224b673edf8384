/**
 * The left operand of a tensor-core product as f16 halves, two per int32 word (issue 13/15): the
 * values SubgroupMatrixMatMulProgram would otherwise convert from f32 each time it stages a slab,
 * converted once before it, so that its slabs load 8 halves per 16-byte fetch and store them as
 * they are (staging 'half8'). On the H100 at Q's up shape, with the same bf16 weight (variants
 * v7-o against v7-c): 146–148 against 115 TFLOP/s; in Q's split-LoRA block (run T) the four
 * products 36.2 → 31.7 ms for 0.96 ms of conversions.
 *
 * The weight gradient's operands likewise (SubgroupMatrixWeightGradProgram's 'half8' staging): its
 * L and R, either of them times the pair's routing weight (`rowScale`) where its rows are the plan's.
 *
 * Each value is what the product's staging would have made of it: the row itself ('rows'), or
 * act(gate, up) of an h row of 2·cols ('act'), times the pair's routing weight rw[pairOfRow[r]]
 * (`rowScale`; 0 for a padding row), times the operand scale s of a gradient operand
 * (`scaled`: operandScale of input `amax`, which the product reads too, to unscale its result).
 * pack2x16float rounds each to f16 once (needs no shader-f16, so it runs on Mesa in CI).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { ACTIVATION_UNIFORMS, type ActivationSpec, activationKey, type ProgramUniformEntry, intUniforms } from './shared.js';
import { OPERAND_SCALE, rowQuadSnippet } from './subgroup_matrix_program.js';

/** Invocations per workgroup, each converting 8 consecutive values of a row into one vec4 of words. */
const HALF_OPERAND_THREADS = 64;

/** Rows per grid column at most: a grid row loops over the rows 65535 workgroups cannot cover. */
const MAX_GRID_ROWS = 65535;

export interface HalfOperandSpec {
  /** 'act': the operand is act(h) of an h row twice as wide, as the product's 'act' source reads it */
  source: 'rows' | 'act';
  activation?: ActivationSpec;
  /** multiply by operandScale(amax) before rounding (a gradient operand) */
  scaled: boolean;
  /** multiply row r by rw[pr[r]] (inputs rw: the pairs' routing weights, pr: the plan's pairOfRow) */
  rowScale?: boolean;
}

export class HalfOperandProgram implements WebGPUProgram {
  variableNames: string[];
  variableComponents: number[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [1], y: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [HALF_OPERAND_THREADS, 1, 1];
  uniforms = `rows : i32, cols : i32, ${ACTIVATION_UNIFORMS}`;
  private readonly spec: HalfOperandSpec;

  /** out [rows, cols / 2] int32 for an operand of rows × cols (cols a multiple of 8, halfOperandFits) */
  constructor(rows: number, cols: number, spec: HalfOperandSpec) {
    if (cols < 8 || cols % 8 !== 0) throw new Error(`HalfOperandProgram: cols must be a positive multiple of 8 but got ${cols}`);
    if ((spec.source === 'act') !== (spec.activation !== undefined)) {
      throw new Error(`HalfOperandProgram: an activation goes with source 'act' and only with it, but got source '${spec.source}' ` +
          `and ${spec.activation === undefined ? 'none' : spec.activation.kind}`);
    }
    this.spec = spec;
    this.outputShape = [rows, cols / 2];
    this.dispatch = [Math.ceil(cols / 8 / HALF_OPERAND_THREADS), Math.max(1, Math.min(rows, MAX_GRID_ROWS)), 1];
    this.variableNames = ['x', ...(spec.scaled ? ['amax'] : []), ...(spec.rowScale ? ['rw', 'pr'] : [])];
    // the 'act' source's interleaved pairs are read in vec4s too (rowQuadSnippet)
    this.variableComponents = this.variableNames.map(n => (n === 'x' ? 4 : 1));
    this.shaderKey = `moeHalfOperand_${spec.source}_${activationKey(spec.activation)}_${spec.scaled ? 's' : ''}${spec.rowScale ? 'w' : ''}`;
  }

  static uniformsFor(rows: number, cols: number, activation: ProgramUniformEntry[]): ProgramUniformEntry[] {
    return [...intUniforms(rows, cols), ...activation];
  }

  getUserCode(): string {
    return `
      ${rowQuadSnippet('loadQuad', 'x', 'uniforms.cols', this.spec.activation)}
      ${this.spec.scaled ? OPERAND_SCALE : ''}

      fn main() {
        let c = (i32(workgroupId.x) * ${HALF_OPERAND_THREADS} + i32(localIndex)) * 8;
        let s = ${this.spec.scaled ? 'operandScale()' : '1.0'};
        // a grid row per row, looping where there are more rows than grid rows
        for (var r = i32(workgroupId.y); r < uniforms.rows; r += i32(numWorkgroups.y)) {
          if (c < uniforms.cols) {
            ${this.spec.rowScale ? `let pair = pr[r];
            let rowS = select(0.0, rw[max(pair, 0)], pair >= 0) * s;` : 'let rowS = s;'}
            let lo = loadQuad(r, c) * rowS;
            let hi = loadQuad(r, c + 4) * rowS;
            let at = (r * uniforms.cols + c) / 2;
            result[at] = bitcast<i32>(pack2x16float(lo.xy));
            result[at + 1] = bitcast<i32>(pack2x16float(lo.zw));
            result[at + 2] = bitcast<i32>(pack2x16float(hi.xy));
            result[at + 3] = bitcast<i32>(pack2x16float(hi.zw));
          }
        }
      }
    `;
  }
}
