/**
 * RotaryProgram: MoERotary (src/ops/rotary.ts), rotate-half rope or its transpose in one pass over
 * x [N, S, D], one thread per element: the composed op's Reverse, two products and a sum (4
 * programs per call, 2 calls per layer and pass) in one. The tables are read in their own layout,
 * [S, D] shared by every row or [B, S, D] per sample (row n reads sample n / (N / B)).
 *   forward:   out_i = x_i·cos_i + rotateHalf(x)_i·sin_i,  rotateHalf(x) = (−x₂, x₁)
 *   transpose: out_i = x_i·cos_i − rotateHalf(x·sin)_i      (the gradient: dy·cos − rotateHalf(dy·sin))
 * Float32, each product rounded as the composed op rounds it.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { FLAT_THREADS, flatDispatch, intUniforms, type ProgramUniformEntry } from './shared.js';

export class RotaryProgram implements WebGPUProgram {
  // not cos/sin: WGSL's builtins
  variableNames = ['x', 'cosTable', 'sinTable'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  size = true;
  uniforms = 'seqLen : i32, width : i32, rowsPerTable : i32, ';
  private readonly transposed: boolean;

  /** `shape`: x's [N, S, D]; `transposed`: the gradient's rotation (x is then dy). */
  constructor(shape: readonly number[], transposed: boolean) {
    this.transposed = transposed;
    this.outputShape = [...shape];
    this.dispatchLayout = { x: shape.map((_, i) => i) };
    this.dispatch = flatDispatch(shape.reduce((a, b) => a * b, 1));
    this.shaderKey = `moeRotary_${transposed ? 'T' : 'F'}`;
  }

  /** `tableRows`: B of [B, S, D] tables, 0 for shared [S, D] ones. */
  static uniformsFor(shape: readonly number[], tableRows: number): ProgramUniformEntry[] {
    const [n, s, d] = shape;
    return intUniforms(s, d, tableRows === 0 ? n : n / tableRows);
  }

  getUserCode(): string {
    // the partner element across the halves; its sin for the transpose. Both indices stay in range
    // (select evaluates both sides), the sign picks the half: forward (−x₂·sin₁, x₁·sin₂),
    // transpose (x₂·sin₂, −x₁·sin₁)
    const sinAt = this.transposed ? 'select(t - half, t + half, lower)' : 't';
    const signed = this.transposed ? 'select(-rot, rot, lower)' : 'select(rot, -rot, lower)';
    return `
      fn main(index : i32) {
        if (index >= uniforms.size) { return; }
        let width = uniforms.width;
        let half = width / 2;
        let i = index % width;
        let rowPos = index / width;                 // n·S + s
        let pos = rowPos % uniforms.seqLen;
        let tableRow = (rowPos / uniforms.seqLen) / uniforms.rowsPerTable;
        let t = (tableRow * uniforms.seqLen + pos) * width + i;
        let lower = i < half;
        let rot = x[select(index - half, index + half, lower)] * sinTable[${sinAt}];
        result[index] = x[index] * cosTable[t] + ${signed};
      }
    `;
  }
}
