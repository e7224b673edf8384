/**
 * SoftmaxGradProgram: MoESoftmaxGrad (src/ops/softmax_grad.ts), dS = p ⊙ (dP − Σ_j dP ⊙ p) over
 * the last axis in one program: one workgroup per row, FLAT_THREADS lanes that stride over the row
 * (4 elements a load where L is a multiple of 4), sum their dP·p in workgroup memory, then write
 * the row. p and dP are read twice per row, the second time from cache (a row is 2 KB at L 512).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { FLAT_THREADS, intUniforms, type ProgramUniformEntry } from './shared.js';

export class SoftmaxGradProgram implements WebGPUProgram {
  variableNames = ['p', 'dP'];
  variableComponents: number[] | undefined;
  outputComponent: number | undefined;
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  uniforms = 'rows : i32, loads : i32, ';
  private readonly quads: boolean;

  /** `shape`: p's and dP's, rank ≥ 1 (rows: the product of all axes but the last) */
  constructor(shape: readonly number[]) {
    this.outputShape = [...shape];
    this.dispatchLayout = { x: shape.map((_, i) => i) };
    this.dispatch = [Math.max(1, SoftmaxGradProgram.rowsOf(shape)), 1, 1];  // one workgroup per row
    this.quads = shape[shape.length - 1] % 4 === 0;
    this.variableComponents = this.quads ? [4, 4] : undefined;
    this.outputComponent = this.quads ? 4 : undefined;
    this.shaderKey = `moeSoftmaxGrad${this.quads ? '_v4' : ''}`;
  }

  private static rowsOf(shape: readonly number[]): number {
    return shape.slice(0, -1).reduce((a, b) => a * b, 1);
  }

  /** rows, and loads a row (quads or elements) */
  uniformsFor(): ProgramUniformEntry[] {
    const width = this.outputShape[this.outputShape.length - 1];
    return intUniforms(SoftmaxGradProgram.rowsOf(this.outputShape), this.quads ? width / 4 : width);
  }

  getUserCode(): string {
    const T = FLAT_THREADS;
    const dotOf = this.quads ? 'dot(dP[base + i], p[base + i])' : 'dP[base + i] * p[base + i]';
    return `
      var<workgroup> sums : array<f32, ${T}>;
      fn main(index : i32) {
        // a row per workgroup (tfjs may fold a long dispatch into x and y); rows past the end read
        // row 0 and write nothing, so every lane reaches every barrier
        let row = i32(workgroupId.x + workgroupId.y * numWorkgroups.x);
        let lane = i32(localIndex);
        let inRange = row < uniforms.rows;
        let base = select(0, row, inRange) * uniforms.loads;
        var sum = 0.0;
        for (var i = lane; i < uniforms.loads; i += ${T}) {
          sum += ${dotOf};
        }
        sums[lane] = sum;
        workgroupBarrier();
        for (var s = ${T / 2}; s > 0; s = s >> 1) {
          if (lane < s) {
            sums[lane] += sums[lane + s];
          }
          workgroupBarrier();
        }
        let total = sums[0];
        if (!inRange) { return; }
        for (var i = lane; i < uniforms.loads; i += ${T}) {
          result[base + i] = p[base + i] * (dP[base + i] - total);
        }
      }
    `;
  }
}
