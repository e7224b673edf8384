/**
 * The second half of a pair of narrow weight gradients (a LoRA factor pair's dA = gᵀ·x and
 * dB = dyᵀ·u, dense or the experts'; issue 15: the host is bound by dispatches):
 * NarrowWeightGradPairProgram leaves both products' partial sums per chunk of rows in one tensor,
 * and one dispatch of our own adds each product's chunks into its own gradient. That is two
 * outputs, which a tfjs program cannot write: with a program per product the pair took four
 * dispatches (two chunked passes, two sums), here two. The chunks are added in order from 0.0 and
 * the sum multiplied by alpha, as NarrowWeightGradSumProgram does: the same gradients, bit for bit.
 *
 * The sizes, the gradients' strides and alphas are constants of the shader (a model has a few
 * projection shapes); one group's chunk count is the partial sums' binding length over a unit's
 * row, a plan's experts' come from its seg, so nothing is uploaded per call.
 */
import type * as tf from '@tensorflow/tfjs-core';
import { backendInternals, bufferOf, ownPipeline, recordOwnDispatch, type WebGPUBackendInternals } from './own_dispatch.js';
import { NARROW_THREADS, type NarrowGradPart } from './programs/narrow_matmul_program.js';

/** The name dispatch counts and timers give the pair's sum. */
export const NARROW_GRAD_PAIR_SUM_PROGRAM = 'NarrowWeightGradPairSum';

/** tf.env() flag that turns the pairs off: each gradient then takes its own two programs. */
export const WEIGHT_GRAD_PAIRS_FLAG = 'WEBGPU_MOE_WEIGHT_GRAD_PAIRS';

/** Where a pair's gradient goes: its shape, where (e, p, q) is in it, and the factor alpha its sum is multiplied by. */
export interface PairGradientOut {
  shape: number[];
  oE: number;
  oP: number;
  oQ: number;
  alpha: number;
}

/**
 * The chunks a pair's rows were summed in: chunkRows rows each, the grid's units unitRows rows; one
 * group of plain rows (unit u is chunk u), or with `plan` its experts' segments (a chunk starts
 * every chunkRows rows of a segment).
 */
export interface PairChunks {
  unitRows: number;
  chunkRows: number;
  plan?: { seg: tf.TensorInfo; numExperts: number };
}

/** f32 `value` as WGSL that is exactly it (bitcast of its bits: no decimal rounding). */
function exactF32(value: number): string {
  return `bitcast<f32>(0x${(new Uint32Array(Float32Array.of(value).buffer)[0]).toString(16)}u)`;
}

/**
 * The WGSL of the sum: binding 0 the partial sums [units, perUnit], 1 and 2 the two gradients,
 * 3 the plan's seg (with a plan). Workgroups: the parts' column blocks along x, the narrow index j
 * along y, the experts along z; each thread adds one element's chunks in order, times alpha, as
 * NarrowWeightGradSumProgram does. One group: the chunks are the units, as many as partial's
 * binding holds; with a plan: expert e's start at its segment's unit, one every chunkRows rows.
 */
export function narrowGradPairSumShader(parts: readonly [NarrowGradPart, NarrowGradPart], perUnit: number,
    outs: readonly [PairGradientOut, PairGradientOut], chunks: PairChunks): string {
  const sum = (i: number) => {
    const p = parts[i];
    const o = outs[i];
    const [oRow, oCol] = p.spec.narrow === 'P' ? [o.oP, o.oQ] : [o.oQ, o.oP];
    return `{
    let c = (i32(wid.x) - ${p.firstBlock}) * ${NARROW_THREADS} + i32(lid.x);
    if (c >= ${p.wide} || j >= ${p.width}) { return; }
    var s = 0.0;
    for (var k = 0; k < chunks; k++) {
      s += partial[(firstUnit + k * unitStep) * ${perUnit} + ${p.offset} + j * ${p.wide} + c];
    }
    out${i}[e * ${o.oE} + j * ${oRow} + c * ${oCol}] = ${exactF32(o.alpha)} * s;
  }`;
  };
  const plan = chunks.plan;
  const units = plan === undefined
    ? `// one group: the chunks are the units, as many rows of perUnit as the binding holds
  let firstUnit = 0;
  let unitStep = 1;
  let chunks = i32(arrayLength(&partial)) / ${perUnit};`
    : `// expert e's chunks start at its segment's unit, one every chunkRows / unitRows units
  let firstUnit = seg[e] / ${chunks.unitRows};
  let unitStep = ${chunks.chunkRows / chunks.unitRows};
  let chunks = (seg[${plan.numExperts + 1} + e] + ${chunks.chunkRows - 1}) / ${chunks.chunkRows};`;
  return `
@group(0) @binding(0) var<storage, read> partial : array<f32>;
@group(0) @binding(1) var<storage, read_write> out0 : array<f32>;
@group(0) @binding(2) var<storage, read_write> out1 : array<f32>;${plan === undefined ? '' : `
@group(0) @binding(3) var<storage, read> seg : array<i32>;`}

@compute @workgroup_size(${NARROW_THREADS}, 1, 1)
fn main(@builtin(workgroup_id) wid : vec3<u32>, @builtin(local_invocation_id) lid : vec3<u32>) {
  let j = i32(wid.y);
  let e = i32(wid.z);
  ${units}
  if (i32(wid.x) < ${parts[1].firstBlock}) ${sum(0)} else ${sum(1)}
}
`;
}

/** The backend internals the sum records with, checked before the pair's first program runs. */
export function narrowGradPairSumBackend(): WebGPUBackendInternals {
  return backendInternals('weightGradProductPair', `set tf.env() flag ${WEIGHT_GRAD_PAIRS_FLAG} to false to take the gradients apart`);
}

/**
 * The two gradients of `parts` from their partial sums `partial` [units, perUnit]
 * (NarrowWeightGradPairProgram's output, summed in `chunks`), in one dispatch recorded into tfjs's
 * current pass.
 */
export function recordNarrowGradPairSum(b: WebGPUBackendInternals, partial: tf.TensorInfo, parts: readonly [NarrowGradPart, NarrowGradPart],
    outs: readonly [PairGradientOut, PairGradientOut], chunks: PairChunks): [tf.TensorInfo, tf.TensorInfo] {
  const [units, perUnit] = partial.shape;
  const { plan } = chunks;
  const rows = plan === undefined ? 'single' : `${plan.numExperts}_${chunks.unitRows}_${chunks.chunkRows}`;
  const key = `moeNarrowWeightGradPairSum_${parts.map((p, i) => `${p.P}x${p.Q}_${outs[i].oE}_${outs[i].oP}_${outs[i].oQ}_` +
      `${exactF32(outs[i].alpha)}`).join('_')}_${rows}`;
  const pipeline = ownPipeline(b.device, key, () => narrowGradPairSumShader(parts, perUnit, outs, chunks));
  const outputs = outs.map(o => b.makeTensorInfo(o.shape, 'float32')) as [tf.TensorInfo, tf.TensorInfo];
  const bound = [partial, ...outputs, ...(plan === undefined ? [] : [plan.seg])];
  const sizes = bound.map(t => t === partial ? units * perUnit : t.shape.reduce((n, d) => n * d, 1));
  recordOwnDispatch(b, {
    program: NARROW_GRAD_PAIR_SUM_PROGRAM,
    pipeline,
    entries: bound.map((t, binding) => ({ binding, resource: { buffer: bufferOf(b, t.dataId)!, size: 4 * sizes[binding] } })),
    workgroups: [parts[0].blocks + parts[1].blocks, Math.max(parts[0].width, parts[1].width), plan?.numExperts ?? 1],
    bound: bound.map(t => t.dataId),
  });
  return outputs;
}
