/**
 * RotaryProgram: MoERotary (src/ops/rotary.ts), rotate-half rope or its transpose in one pass over
 * x [N, S, D], one thread per element: the composed op's Reverse, two products and a sum (4
 * programs per call, 2 calls per layer and pass) in one. The tables are read in their own layout,
 * [S, D] shared by every row or [B, S, D] per sample (row n reads sample n / (N / B)).
 *   forward:   out_i = x_i·cos_i + rotateHalf(x)_i·sin_i,  rotateHalf(x) = (−x₂, x₁)
 *   transpose: out_i = x_i·cos_i − rotateHalf(x·sin)_i      (the gradient: dy·cos − rotateHalf(dy·sin))
 * Float32, each product rounded as the composed op rounds it. Where D is a multiple of 8 (each half
 * whole quads) a thread takes 4 elements: x, the tables and the result bound as vec4<f32>, the
 * index math once per 4 (run Y2 on the H100: 52 µs a call at OLMoE's [64, 512, 128] one element a
 * thread, 3.3 GPU ms a step, where its 32 MB need ~11 µs).
 * With `heads` (h > 0) the pass also moves the heads out of the projection's layout: the forward
 * reads x [B, S, h, D] and writes [B·h, S, D], the transpose reads dy [B·h, S, D] and writes
 * [B, S, h, D] (applyRotaryToHeads: the attention's transpose of q and k and its gradient in the
 * same program as the rotation). The halves of D are contiguous in both layouts.
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
  uniforms = 'seqLen : i32, width : i32, rowsPerTable : i32, heads : i32, ';
  variableComponents: number[] | undefined;
  outputComponent: number | undefined;
  private readonly transposed: boolean;
  private readonly quads: boolean;
  private readonly movesHeads: boolean;

  /**
   * `shape`: the rotation's [N, S, D] (N = B·h); `transposed`: the gradient's rotation (x is then
   * dy); `heads`: h to move the heads between [B, S, h, D] and [B·h, S, D] in the same pass, 0 not to.
   */
  constructor(shape: readonly number[], transposed: boolean, heads = 0) {
    const [n, s, d] = shape;
    this.transposed = transposed;
    this.movesHeads = heads > 0;
    // the forward writes the heads' layout, the gradient the projection's
    this.outputShape = this.movesHeads && transposed ? [n / heads, s, heads, d] : [n, s, d];
    this.dispatchLayout = { x: this.outputShape.map((_, i) => i) };
    this.quads = d % 8 === 0;
    this.variableComponents = this.quads ? [4, 4, 4] : undefined;
    this.outputComponent = this.quads ? 4 : undefined;
    this.dispatch = flatDispatch(n * s * d / (this.quads ? 4 : 1));
    this.shaderKey = `moeRotary_${transposed ? 'T' : 'F'}${this.quads ? '_v4' : ''}${this.movesHeads ? '_heads' : ''}`;
  }

  /**
   * `shape`: the rotation's [N, S, D]; `tableRows`: B of [B, S, D] tables, 0 for shared [S, D] ones;
   * `heads` as the constructor's. `width` counts loads (quads where D allows).
   */
  static uniformsFor(shape: readonly number[], tableRows: number, heads = 0): ProgramUniformEntry[] {
    const [n, s, d] = shape;
    return intUniforms(s, d % 8 === 0 ? d / 4 : d, tableRows === 0 ? n : n / tableRows, heads);
  }

  /** WGSL: the element's rotation row bh (b·h + head) and position, and x's row, from the output's row `outRow` */
  private rowsSnippet(): string {
    if (!this.movesHeads) {
      return `let bh = outRow / uniforms.seqLen;
        let pos = outRow % uniforms.seqLen;
        let xRow = outRow;`;
    }
    if (!this.transposed) {
      // out [B·h, S, D] from x [B, S, h, D]
      return `let bh = outRow / uniforms.seqLen;
        let pos = outRow % uniforms.seqLen;
        let xRow = ((bh / uniforms.heads) * uniforms.seqLen + pos) * uniforms.heads + bh % uniforms.heads;`;
    }
    // out [B, S, h, D] from dy [B·h, S, D]
    return `let bs = outRow / uniforms.heads;
        let pos = bs % uniforms.seqLen;
        let bh = (bs / uniforms.seqLen) * uniforms.heads + outRow % uniforms.heads;
        let xRow = bh * uniforms.seqLen + pos;`;
  }

  getUserCode(): string {
    // the partner element (or quad) across the halves; its sin for the transpose. Both indices stay
    // in range (select evaluates both sides), the sign picks the half: forward (−x₂·sin₁, x₁·sin₂),
    // transpose (x₂·sin₂, −x₁·sin₁). width and index count loads: elements, or quads
    const sinAt = this.transposed ? 'select(t - half, t + half, lower)' : 't';
    const signed = this.transposed ? 'select(-rot, rot, lower)' : 'select(rot, -rot, lower)';
    return `
      fn main(index : i32) {
        if (index >= uniforms.size) { return; }
        let width = uniforms.width;
        let half = width / 2;
        let i = index % width;
        let outRow = index / width;
        ${this.rowsSnippet()}
        let tableRow = bh / uniforms.rowsPerTable;
        let t = (tableRow * uniforms.seqLen + pos) * width + i;
        let lower = i < half;
        let at = xRow * width + i;
        let rot = x[select(at - half, at + half, lower)] * sinTable[${sinAt}];
        result[index] = x[at] * cosTable[t] + ${signed};
      }
    `;
  }
}
