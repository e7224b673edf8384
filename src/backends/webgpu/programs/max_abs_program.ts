/**
 * max |x| of a whole tensor for a gradient operand's scale on tensor cores (issue 13/15), as the
 * exponent code the products read (MaxAbsCodeProgram), or as partial maxima (MaxAbsProgram).
 *
 * MaxAbsProgram: `parts` partial maxima. Workgroup w takes elements w·256 + lid, then every
 * parts·256 after, and reduces its 256 lanes in workgroup memory. A maximum is exact in any order.
 * NaNs may be dropped by max(); an infinity is kept. What tfjs's Abs, Max per row and Max over the
 * rows did before took 3 dispatches and wrote and read an |x| as large as x.
 *
 * MaxAbsCodeProgram: the same reduction over each lane's |x| bits (a non-negative float's bits order
 * as the float does, so the largest is exact and NaN is kept), then the workgroup's maximum as its
 * exponent code (MAX_ABS_CODE_SNIPPET): ceil(log2 max |x|) + 150, 0 for an all-zero tensor, 511
 * with an infinity or NaN. The code is all a product needs: operandScale's power of two s with
 * s·max|x| ≤ 2^T is 2^(T − ceil(log2 max|x|)), whatever the mantissa. One workgroup (parts 1)
 * stores its code. Many add an epoch above the code's 9 bits and take atomicMax into a result that
 * holds an older epoch's value (a slot kept from one call to the next, maxAbsCodeInKernel): every
 * workgroup's value is above what was there, and the largest code of this epoch wins. So the whole
 * tensor costs one dispatch, where partial maxima cost a second over the parts: 183 dispatches of
 * an OLMoE step (2512, run Z1).
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
    return workgroupMaxShader('f32', '0.0', fold, '', 'result[workgroupId.x] = lanes[0];');
  }
}

/** The code's bits below the epoch (MaxAbsCodeProgram). */
export const MAX_ABS_CODE_BITS = 9;
/** The code of a tensor with an infinity or NaN: no scale (operandScale is then 1). */
export const MAX_ABS_CODE_NOT_FINITE = 2 ** MAX_ABS_CODE_BITS - 1;
/** The largest epoch: the value epoch·2^9 + code stays a positive i32. */
export const MAX_ABS_CODE_EPOCHS = 2 ** (31 - MAX_ABS_CODE_BITS) - 1;

/**
 * WGSL: maxAbsCode(bits), the exponent code of a non-negative f32's bits: ceil(log2 v) + 150 (1 for
 * the smallest subnormal 2^-149, 278 below f32's largest), 0 for 0, 511 for infinity and NaN.
 */
const MAX_ABS_CODE_SNIPPET = `
  fn maxAbsCode(bits : u32) -> i32 {
    if (bits == 0u) {
      return 0;
    }
    if (bits >= 0x7f800000u) {
      return ${MAX_ABS_CODE_NOT_FINITE};
    }
    let biased = i32(bits >> 23u);
    let mantissa = bits & 0x7fffffu;
    if (biased == 0) {
      // a subnormal: mantissa · 2^-149, so the code is ceil(log2 mantissa) + 1, and ceil(log2 m) of an
      // integer m > 1 is 32 − clz(m − 1)
      return select(33 - i32(countLeadingZeros(mantissa - 1u)), 1, mantissa == 1u);
    }
    // (1 + mantissa · 2^-23) · 2^(biased − 127): ceil(log2) is biased − 127, one more unless a power of two
    return biased + 23 + select(1, 0, mantissa == 0u);
  }`;

/**
 * WGSL: `fn <name>() -> f32`, the power of two s with s·max|x| <= 2^targetLog2 from input `amax`
 * (int32 [1], MaxAbsCodeProgram's value; its epoch ignored): 2^(targetLog2 − ceil(log2 max|x|)),
 * its exponent clamped to ±100; 1 when max|x| is 0 or not finite.
 */
export function operandScaleSnippet(name: string, targetLog2: number): string {
  return `
  fn ${name}() -> f32 {
    let code = amax[0] & ${MAX_ABS_CODE_NOT_FINITE};
    let usable = code > 0 && code < ${MAX_ABS_CODE_NOT_FINITE};
    return select(1.0, exp2(f32(clamp(${targetLog2 + 150} - code, -100, 100))), usable);
  }`;
}

export class MaxAbsCodeProgram implements WebGPUProgram {
  variableNames = ['x'];
  outputShape = [1];
  shaderKey: string;
  dispatchLayout = { x: [0] };
  variableComponents: number[] | undefined;
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [MAX_ABS_THREADS, 1, 1];
  uniforms = 'count : i32, parts : i32, epoch : i32, ';
  // the result is atomic<i32>: the parts' atomicMax
  atomic = true;

  private readonly quads: boolean;

  /** out int32 [1]: the code of max |x| (parts 1: stored; more: epoch·2^9 + code by atomicMax, see the file comment) */
  constructor(parts: number, quads = false) {
    if (!Number.isInteger(parts) || parts < 1 || parts > 65535) {
      throw new Error(`MaxAbsCodeProgram: parts must be an integer in [1, 65535] but got ${parts}`);
    }
    this.dispatch = [parts, 1, 1];
    this.quads = quads;
    this.variableComponents = quads ? [4] : undefined;
    this.shaderKey = quads ? 'moeMaxAbsCode_v4' : 'moeMaxAbsCode';
  }

  /** `count`: the elements of x (with `quads`, a multiple of 4); `epoch` in [1, MAX_ABS_CODE_EPOCHS] where parts > 1 */
  static uniformsFor(count: number, parts: number, epoch: number, quads = false): ProgramUniformEntry[] {
    if (quads && count % 4 !== 0) throw new Error(`MaxAbsCodeProgram: quads need a count that is a multiple of 4 but got ${count}`);
    if (!Number.isInteger(epoch) || epoch < (parts > 1 ? 1 : 0) || epoch > MAX_ABS_CODE_EPOCHS) {
      throw new Error(`MaxAbsCodeProgram: epoch must be an integer in [${parts > 1 ? 1 : 0}, ${MAX_ABS_CODE_EPOCHS}] but got ${epoch}`);
    }
    return intUniforms(quads ? count / 4 : count, parts, epoch);
  }

  getUserCode(): string {
    const fold = this.quads
      ? 'let v = bitcast<vec4<u32>>(x[i]) & vec4<u32>(0x7fffffffu); m = max(m, max(max(v.x, v.y), max(v.z, v.w)));'
      : 'm = max(m, bitcast<u32>(x[i]) & 0x7fffffffu);';
    return workgroupMaxShader('u32', '0u', fold, MAX_ABS_CODE_SNIPPET, `
          let value = (uniforms.epoch << ${MAX_ABS_CODE_BITS}u) | maxAbsCode(lanes[0]);
          if (uniforms.parts == 1) {
            atomicStore(&result[0], value);
          } else {
            atomicMax(&result[0], value);
          }`);
  }
}

/**
 * Both programs' shader: each lane folds (`fold`: m = max(m, …) of x[i]) its elements, workgroup w
 * taking w·256 + lid and every parts·256 after, the lanes' maxima reduced in workgroup memory,
 * then lane 0 runs `write` with the workgroup's maximum in lanes[0].
 */
function workgroupMaxShader(type: 'f32' | 'u32', zero: string, fold: string, helpers: string, write: string): string {
  return `
      var<workgroup> lanes : array<${type}, ${MAX_ABS_THREADS}>;
      ${helpers}

      // a one-dimensional dispatch, so tfjs passes the flat index; the workgroup and lane are what is
      // used; uniforms.count counts x's loads (quads or elements)
      fn main(index : i32) {
        let lid = i32(localIndex);
        let stride = uniforms.parts * ${MAX_ABS_THREADS};
        var m = ${zero};
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
          ${write}
        }
      }
    `;
}
