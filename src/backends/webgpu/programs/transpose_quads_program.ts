/**
 * TransposeQuadsProgram: a float32 transpose that keeps the last axis in place, out[c0, c1, c2, q]
 * = x[Σ c_i·inStride_i + q·1] in vec4s of that axis (issue 15: attention's heads moved between
 * [B, S, heads, D] and [B, heads, S, D], four calls a layer each way). tfjs-backend-webgpu's
 * TransposeProgram maps each element through the generic coordinate math: 52 µs a call for
 * OLMoE's [4, 512, 16, 128] (4 MB) on the H100 (run U2, 6.6 GPU ms a step), where reading and
 * writing it once takes ~3 µs. Here one invocation copies a vec4 whose source is four contiguous
 * floats of the input's own last axis.
 *
 * Rank ≤ 4 (shorter shapes padded with leading 1s); the caller checks the last axis stays last and
 * is a multiple of 4.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { FLAT_THREADS, flatDispatch, type ProgramUniformEntry } from './shared.js';

/** The most axes the program takes. */
export const TRANSPOSE_QUADS_MAX_RANK = 4;

export class TransposeQuadsProgram implements WebGPUProgram {
  variableNames = ['x'];
  variableComponents = [4];
  outputComponent = 4;
  outputShape: number[];
  shaderKey = 'moeTransposeQuads';
  dispatchLayout: { x: number[] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  size = true;
  uniforms = 'outDims : vec4<i32>, inStrides : vec4<i32>, ';
  private readonly xShape: number[];
  private readonly perm: number[];

  /** `xShape` the input's, `perm` as tf.transpose's (perm's last entry the last axis) */
  constructor(xShape: readonly number[], perm: readonly number[]) {
    const rank = xShape.length;
    if (rank < 1 || rank > TRANSPOSE_QUADS_MAX_RANK || perm.length !== rank || perm[rank - 1] !== rank - 1 ||
        xShape[rank - 1] % 4 !== 0) {
      throw new Error(`TransposeQuadsProgram: a shape of rank 1–${TRANSPOSE_QUADS_MAX_RANK} whose last axis stays last and is a ` +
          `multiple of 4, but got shape [${xShape}] and perm [${perm}]`);
    }
    this.xShape = [...xShape];
    this.perm = [...perm];
    this.outputShape = perm.map(p => xShape[p]);
    this.dispatchLayout = { x: this.outputShape.map((_, i) => i) };
    this.dispatch = flatDispatch(xShape.reduce((a, b) => a * b, 1) / 4);
  }

  /** The output's dims (the last in vec4s) and, per output axis, its stride in the input (in vec4s), padded to 4 axes. */
  uniformsFor(): ProgramUniformEntry[] {
    const rank = this.xShape.length;
    const inStrides = new Array<number>(rank);
    let stride = 1;
    for (let axis = rank - 1; axis >= 0; axis--) {
      inStrides[axis] = stride;
      stride *= axis === rank - 1 ? this.xShape[axis] / 4 : this.xShape[axis];
    }
    const pad = TRANSPOSE_QUADS_MAX_RANK - rank;
    const outDims = this.outputShape.map((d, i) => (i === rank - 1 ? d / 4 : d));
    return [
      { type: 'int32', data: [...new Array<number>(pad).fill(1), ...outDims] },
      { type: 'int32', data: [...new Array<number>(pad).fill(0), ...this.perm.map(p => inStrides[p])] },
    ];
  }

  getUserCode(): string {
    return `
      fn main(index : i32) {
        if (index >= uniforms.size) { return; }
        var rest = index;
        let c3 = rest % uniforms.outDims.w;
        rest = rest / uniforms.outDims.w;
        let c2 = rest % uniforms.outDims.z;
        rest = rest / uniforms.outDims.z;
        let c1 = rest % uniforms.outDims.y;
        let c0 = rest / uniforms.outDims.y;
        let s = uniforms.inStrides;
        result[index] = x[c0 * s.x + c1 * s.y + c2 * s.z + c3 * s.w];
      }
    `;
  }
}
