/**
 * max |x| over a whole tensor in `parts` partial maxima (issue 13/15: a gradient operand's scale on
 * tensor cores). Workgroup w takes elements w·256 + lid, then every parts·256 after, and reduces its
 * 256 lanes in workgroup memory; run twice (the tensor to a few hundred parts, then those parts to
 * one), max |x| costs 2 dispatches that read x once, where tfjs's Abs, Max per row and Max over the
 * rows took 3 and wrote and read an |x| as large as x. A maximum is exact in any order. NaNs may be
 * dropped by max(); an infinity is kept (operandScale then leaves the operand unscaled).
 *
 * With `quads` (a count that is a multiple of 4) x is bound as vec4<f32> and each load takes 4
 * elements: the first pass reads gradients of 16–200 MB, and with one f32 a load the 1024
 * workgroups keep too few bytes in flight to reach the memory's bandwidth (run X6 on the H100:
 * 7.7 GPU ms a step in 166 first passes, about a third of what the bytes need).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { intUniforms, type ProgramUniformEntry } from './shared.js';

/** Invocations per workgroup (a power of two: the tree reduction halves it). */
export const MAX_ABS_THREADS = 256;

export class MaxAbsProgram implements WebGPUProgram {
  variableNames = ['x'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0] };
  variableComponents: number[] | undefined;
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [MAX_ABS_THREADS, 1, 1];
  uniforms = 'count : i32, parts : i32, ';

  private readonly quads: boolean;

  /** out [parts]: the largest |x| of each part's elements (0 for a part with none) */
  constructor(parts: number, quads = false) {
    if (!Number.isInteger(parts) || parts < 1 || parts > 65535) {
      throw new Error(`MaxAbsProgram: parts must be an integer in [1, 65535] but got ${parts}`);
    }
    this.outputShape = [parts];
    this.dispatch = [parts, 1, 1];
    this.quads = quads;
    this.variableComponents = quads ? [4] : undefined;
    this.shaderKey = quads ? 'moeMaxAbs_v4' : 'moeMaxAbs';
  }

  /** `count`: the elements of x (with `quads`, a multiple of 4) */
  static uniformsFor(count: number, parts: number, quads = false): ProgramUniformEntry[] {
    if (quads && count % 4 !== 0) throw new Error(`MaxAbsProgram: quads need a count that is a multiple of 4 but got ${count}`);
    return intUniforms(quads ? count / 4 : count, parts);
  }

  getUserCode(): string {
    const fold = this.quads ? 'let v = abs(x[i]); m = max(m, max(max(v.x, v.y), max(v.z, v.w)));' : 'm = max(m, abs(x[i]));';
    return `
      var<workgroup> lanes : array<f32, ${MAX_ABS_THREADS}>;

      // a one-dimensional dispatch, so tfjs passes the flat index; the workgroup and lane are what is
      // used; uniforms.count counts x's loads (quads or elements)
      fn main(index : i32) {
        let lid = i32(localIndex);
        let stride = uniforms.parts * ${MAX_ABS_THREADS};
        var m = 0.0;
        for (var i = i32(workgroupId.x) * ${MAX_ABS_THREADS} + lid; i < uniforms.count; i += stride) {
          ${fold}
        }
        lanes[lid] = m;
        workgroupBarrier();
        for (var width = ${MAX_ABS_THREADS / 2}; width > 0; width /= 2) {
          if (lid < width) {
            lanes[lid] = max(lanes[lid], lanes[lid + width]);
          }
          workgroupBarrier();
        }
        if (lid == 0) {
          result[workgroupId.x] = lanes[0];
        }
      }
    `;
  }
}
