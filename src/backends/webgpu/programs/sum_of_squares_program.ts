/**
 * Σ x² over several tensors in one dispatch (MoESumOfSquares, src/train/sum_of_squares.ts: the
 * training loop's global gradient norm, issue 15).
 *
 * What tfjs-webgpu runs for tf.sum(tf.square(g)) is a square pass that writes a copy of g, then
 * ReduceProgram, which gives a whole reduction to a scalar to one workgroup: one SM reads the
 * tensor. The loop did that per chunk of gradients (plus their concatenation): at OLMoE's 224 LoRA
 * gradients (61 M elements) 184 dispatches a step, most of them single-workgroup reductions of 4 MB
 * one after another.
 *
 * Here each of k inputs gets `parts` workgroups of its own (uniforms count{s} and first{s}: its loads
 * and its first workgroup); a workgroup finds its input (the branch is the same for all its lanes),
 * folds its elements, workgroup w of an input taking the loads w·256 + lid and every parts·256 after,
 * and reduces its 256 lanes in workgroup memory into result[w]. `square` false sums the values
 * themselves (the partial sums of a first pass); `together`: one workgroup folds every input in
 * turn into result[0] (the last pass, over a few small partial sums). An input whose size is a
 * multiple of 4 is bound as vec4<f32> (one 16-byte load for 4 elements, as MaxAbsProgram's quads).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { intUniforms, type ProgramUniformEntry } from './shared.js';

/** Invocations per workgroup (a power of two: the tree reduction halves it). */
export const SUM_OF_SQUARES_THREADS = 256;

/** One input of a dispatch: its loads (elements, or quads where `quads`) and its workgroups (1 each `together`). */
export interface SumOfSquaresInput {
  loads: number;
  parts: number;
  quads: boolean;
}

/** How a dispatch folds: squares or the values, and each input on its own workgroups or all on one. */
export interface SumOfSquaresMode {
  square: boolean;
  together: boolean;
}

export class SumOfSquaresProgram implements WebGPUProgram {
  variableNames: string[];
  variableComponents: number[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [SUM_OF_SQUARES_THREADS, 1, 1];
  uniforms: string;

  private readonly inputs: readonly SumOfSquaresInput[];
  private readonly mode: SumOfSquaresMode;

  /** out [Σ parts] ([1] `together`): each workgroup's Σ x² (or Σ x without `square`) */
  constructor(inputs: readonly SumOfSquaresInput[], mode: SumOfSquaresMode) {
    if (inputs.length === 0) throw new Error('SumOfSquaresProgram: needs at least one input');
    inputs.forEach((input, s) => {
      if (!Number.isInteger(input.parts) || input.parts < 1) throw new Error(`SumOfSquaresProgram: input ${s}'s parts must be an integer ≥ 1 but got ${input.parts}`);
      if (!Number.isInteger(input.loads) || input.loads < 1) throw new Error(`SumOfSquaresProgram: input ${s}'s loads must be an integer ≥ 1 but got ${input.loads}`);
      if (mode.together && input.parts !== 1) throw new Error(`SumOfSquaresProgram: together, input ${s} has one workgroup (parts 1) but got ${input.parts}`);
    });
    const parts = inputs.reduce((n, input) => n + input.parts, 0);
    if (parts > 65535) throw new Error(`SumOfSquaresProgram: at most 65535 workgroups in all but got ${parts}`);
    this.inputs = inputs;
    this.mode = mode;
    this.variableNames = inputs.map((_, s) => `x${s}`);
    this.variableComponents = inputs.map(input => input.quads ? 4 : 1);
    const workgroups = mode.together ? 1 : parts;
    this.outputShape = [workgroups];
    this.dispatch = [workgroups, 1, 1];
    this.uniforms = `parts : i32, ${inputs.map((_, s) => `count${s} : i32, first${s} : i32, `).join('')}`;
    this.shaderKey = `moeSumOfSquares_${mode.square ? 'sq' : 'sum'}${mode.together ? '_together' : ''}_${inputs.map(input => input.quads ? 'q' : 'e').join('')}`;
  }

  /** The uniforms: the total workgroups, then each input's loads and first workgroup. */
  uniformsFor(): ProgramUniformEntry[] {
    let first = 0;
    const perInput = this.inputs.flatMap(input => {
      const at = first;
      first += input.parts;
      return [input.loads, at];
    });
    return intUniforms(first, ...perInput);
  }

  getUserCode(): string {
    const fold = (s: number) => {
      const quads = this.inputs[s].quads;
      if (this.mode.square) return quads ? `let v = x${s}[i]; acc += dot(v, v);` : `let v = x${s}[i]; acc += v * v;`;
      return quads ? `let v = x${s}[i]; acc += (v.x + v.y) + (v.z + v.w);` : `acc += x${s}[i];`;
    };
    const k = this.inputs.length;
    if (this.mode.together) {
      return reduceShader(this.inputs.map((_, s) => `
        for (var i = lid; i < uniforms.count${s}; i += ${SUM_OF_SQUARES_THREADS}) {
          ${fold(s)}
        }`).join(''));
    }
    const branches = this.inputs.map((_, s) => {
      const end = s + 1 < k ? `uniforms.first${s + 1}` : 'uniforms.parts';
      const loop = `
          let stride = (${end} - uniforms.first${s}) * ${SUM_OF_SQUARES_THREADS};
          for (var i = (w - uniforms.first${s}) * ${SUM_OF_SQUARES_THREADS} + lid; i < uniforms.count${s}; i += stride) {
            ${fold(s)}
          }`;
      return s + 1 < k ? `if (w < ${end}) {${loop}\n        }` : `{${loop}\n        }`;
    });
    return reduceShader(`
        // the input of workgroup w: the same branch for every lane of it
        ${branches.join(' else ')}`);
  }
}

/**
 * The shader: `fold` adds the lane's terms to acc (lid, w: the lane and the workgroup), then the
 * lanes' sums reduced in workgroup memory into result[w].
 */
function reduceShader(fold: string): string {
  return `
      var<workgroup> lanes : array<f32, ${SUM_OF_SQUARES_THREADS}>;

      // a one-dimensional dispatch, so tfjs passes the flat index; the workgroup and lane are what is used
      fn main(index : i32) {
        let lid = i32(localIndex);
        let w = i32(workgroupId.x);
        var acc = 0.0;
        ${fold}
        lanes[lid] = acc;
        workgroupBarrier();
        for (var width = ${SUM_OF_SQUARES_THREADS / 2}; width > 0; width /= 2) {
          if (lid < width) {
            lanes[lid] = lanes[lid] + lanes[lid + width];
          }
          workgroupBarrier();
        }
        if (lid == 0) {
          result[w] = lanes[0];
        }
      }
    `;
}
