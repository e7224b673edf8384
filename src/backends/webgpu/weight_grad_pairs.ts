/**
 * The second half of a pair of narrow weight gradients (a LoRA projection's dA = gᵀ·x [r, in] and
 * dB = dyᵀ·u [out, r]; issue 15: the host is bound by dispatches): NarrowWeightGradPairProgram
 * leaves both products' partial sums per chunk of rows in one tensor, and one dispatch of our own
 * adds each product's chunks into its own gradient. That is two outputs, which a tfjs program
 * cannot write: with a program per product the pair took four dispatches (two chunked passes, two
 * sums), here two. The chunks are added in order from 0.0, as NarrowWeightGradSumProgram adds them
 * (its alpha is 1 for these): the same gradients, bit for bit.
 *
 * The sizes are constants of the shader (a model has a few projection shapes); the chunk count is
 * the partial sums' binding length over a chunk's row, so nothing is uploaded per call.
 */
import type * as tf from '@tensorflow/tfjs-core';
import { backendInternals, bufferOf, ownPipeline, recordOwnDispatch, type WebGPUBackendInternals } from './own_dispatch.js';
import { NARROW_THREADS, type NarrowGradPart } from './programs/narrow_matmul_program.js';

/** The name dispatch counts and timers give the pair's sum. */
export const NARROW_GRAD_PAIR_SUM_PROGRAM = 'NarrowWeightGradPairSum';

/** tf.env() flag that turns the pairs off: each gradient then takes runNarrowDenseWeightGrad's two programs. */
export const WEIGHT_GRAD_PAIRS_FLAG = 'WEBGPU_MOE_WEIGHT_GRAD_PAIRS';

/**
 * The WGSL of the sum: binding 0 the partial sums [chunks, perUnit], 1 and 2 the two gradients
 * [P, Q] row-major. Workgroups: the parts' column blocks along x, the narrow index j along y; each
 * thread adds one element's chunks.
 */
export function narrowGradPairSumShader(parts: readonly [NarrowGradPart, NarrowGradPart], perUnit: number): string {
  const sum = (i: number) => {
    const p = parts[i];
    const outIndex = p.narrow === 'P' ? `j * ${p.wide} + c` : `c * ${p.width} + j`;
    return `{
    let c = (i32(wid.x) - ${p.firstBlock}) * ${NARROW_THREADS} + i32(lid.x);
    if (c >= ${p.wide} || j >= ${p.width}) { return; }
    var s = 0.0;
    for (var k = 0; k < units; k++) {
      s += partial[k * ${perUnit} + ${p.offset} + j * ${p.wide} + c];
    }
    out${i}[${outIndex}] = s;
  }`;
  };
  return `
@group(0) @binding(0) var<storage, read> partial : array<f32>;
@group(0) @binding(1) var<storage, read_write> out0 : array<f32>;
@group(0) @binding(2) var<storage, read_write> out1 : array<f32>;

@compute @workgroup_size(${NARROW_THREADS}, 1, 1)
fn main(@builtin(workgroup_id) wid : vec3<u32>, @builtin(local_invocation_id) lid : vec3<u32>) {
  // the chunks: as many rows of perUnit as the binding holds
  let units = i32(arrayLength(&partial)) / ${perUnit};
  let j = i32(wid.y);
  if (i32(wid.x) < ${parts[1].firstBlock}) ${sum(0)} else ${sum(1)}
}
`;
}

/** The backend internals the sum records with, checked before the pair's first program runs. */
export function narrowGradPairSumBackend(): WebGPUBackendInternals {
  return backendInternals('weightGradProductPair', `set tf.env() flag ${WEIGHT_GRAD_PAIRS_FLAG} to false to take the gradients apart`);
}

/**
 * The two gradients [P, Q] of `parts` from their partial sums `partial` [chunks, perUnit]
 * (NarrowWeightGradPairProgram's output), in one dispatch recorded into tfjs's current pass.
 */
export function recordNarrowGradPairSum(b: WebGPUBackendInternals, partial: tf.TensorInfo, parts: readonly [NarrowGradPart, NarrowGradPart]):
    [tf.TensorInfo, tf.TensorInfo] {
  const [units, perUnit] = partial.shape;
  const key = `moeNarrowWeightGradPairSum_${parts.map(p => `${p.P}x${p.Q}`).join('_')}`;
  const pipeline = ownPipeline(b.device, key, () => narrowGradPairSumShader(parts, perUnit));
  const outputs = parts.map(p => b.makeTensorInfo([p.P, p.Q], 'float32')) as [tf.TensorInfo, tf.TensorInfo];
  const buffers = [partial, ...outputs].map(t => bufferOf(b, t.dataId)!);
  const sizes = [units * perUnit, parts[0].P * parts[0].Q, parts[1].P * parts[1].Q];
  recordOwnDispatch(b, {
    program: NARROW_GRAD_PAIR_SUM_PROGRAM,
    pipeline,
    entries: buffers.map((buffer, binding) => ({ binding, resource: { buffer, size: 4 * sizes[binding] } })),
    workgroups: [parts[0].blocks + parts[1].blocks, Math.max(parts[0].width, parts[1].width)],
    bound: [partial, ...outputs].map(t => t.dataId),
  });
  return outputs;
}
