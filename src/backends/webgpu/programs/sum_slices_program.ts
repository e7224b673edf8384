/**
 * SumSlicesProgram: out = Σ_z x[z] for x [splits, ...shape] (the partial results of a split-K
 * product, SubgroupMatrixMatMulProgram's splitK), in vec4s where the slice's size allows: each
 * invocation adds its element (or quad) of every slice in order, so the sum is the same on every run.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { FLAT_THREADS, flatDispatch, intUniforms, type ProgramUniformEntry } from './shared.js';

export class SumSlicesProgram implements WebGPUProgram {
  variableNames = ['x'];
  variableComponents: number[] | undefined;
  outputComponent: number | undefined;
  outputShape: number[];
  shaderKey: string;
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  uniforms = 'count : i32, splits : i32, ';
  private readonly count: number;
  private readonly splits: number;

  /** `sliceShape`: one slice's (the result's) shape; x holds `splits` of them, one after the other */
  constructor(sliceShape: readonly number[], splits: number) {
    if (!Number.isInteger(splits) || splits < 1) throw new Error(`SumSlicesProgram: splits must be an integer ≥ 1 but got ${splits}`);
    this.outputShape = [...sliceShape];
    this.dispatchLayout = { x: sliceShape.map((_, i) => i) };
    const size = sliceShape.reduce((a, b) => a * b, 1);
    const quads = size % 4 === 0;
    this.count = quads ? size / 4 : size;
    this.splits = splits;
    this.variableComponents = quads ? [4] : undefined;
    this.outputComponent = quads ? 4 : undefined;
    this.dispatch = flatDispatch(this.count);
    this.shaderKey = `moeSumSlices${quads ? '_v4' : ''}`;
  }

  uniformsFor(): ProgramUniformEntry[] {
    return intUniforms(this.count, this.splits);
  }

  getUserCode(): string {
    return `
      fn main(index : i32) {
        if (index >= uniforms.count) { return; }
        var sum = x[index];
        for (var z = 1; z < uniforms.splits; z++) {
          sum += x[z * uniforms.count + index];
        }
        result[index] = sum;
      }
    `;
  }
}
