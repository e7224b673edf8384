/**
 * Adam over many variables in one dispatch, in place (issue 15: the host is bound by dispatches).
 * MoEAdamUpdate (kernels.ts) is a tfjs program pair per variable: tfjs programs bind their inputs
 * read-only and have one output, so param' and the moments need 2 dispatches and 2 new buffers per
 * variable, 28 per OLMoE layer. Here one pipeline of our own binds K variables' param and moments
 * buffers read_write and their gradients read-only, and writes the new values where the old were
 * (as torch's fused/foreach Adam does): ceil(variables / K) dispatches a step, K from the device's
 * maxStorageBuffersPerShaderStage (3 bindings a variable; Mesa's GL reports 16: K = 5).
 *
 * The dispatch is recorded into tfjs's own command encoder and compute pass (own_dispatch.ts), so
 * it is ordered with tfjs's queued work and adds no submit.
 *
 * In place is only right where nothing else sees the buffer: a variable whose data is shared (a
 * tf.clone, tf.variable(t)'s t, a user's reference: the backend's refCount > 1), or held on a
 * texture or an external buffer, is updated by the per-variable kernel instead (which gives it a
 * buffer of its own: the next step is in place). A step whose gradients alias its variables (or
 * that lists a variable twice) goes per variable as a whole, in order.
 *
 * The expression is AdamUpdateProgram's, in the same float32 order, with the same float32
 * scalars: the results are bit for bit the per-variable kernel's (spec/backends/webgpu/grouped_adam.spec.ts).
 * With a gradScale (adamUpdate's: the loop's clipping coefficient, 0 for a skipped step) one more
 * binding holds it, and a dispatch whose scale is 0 writes nothing.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { AdamEntry, AdamUpdateAttrs } from '../../train/adam_update.js';
import { backendInternals, bufferOf, ownPipeline, recordOwnDispatch, type WebGPUBackendInternals } from './own_dispatch.js';
import { FLAT_THREADS } from './programs/shared.js';

const OP = 'groupedAdamUpdate';

function internals(): WebGPUBackendInternals {
  return backendInternals(OP, 'set tf.env() flag MOE_ADAM_GROUPED to false to update per variable');
}

/** Storage buffers each variable binds: param (read_write), grad (read), moments (read_write). */
const BINDINGS_PER_VARIABLE = 3;
/** A cap on K, so the shader's switch and the uniform stay small whatever a driver reports. */
const MAX_GROUP = 64;

/**
 * Variables per dispatch on `device`: its storage buffers per shader stage over 3 (the scalars and
 * offsets are one uniform buffer, counted apart; `scaled`: one storage buffer for the gradScale),
 * within its bindings per bind group, at most 64.
 *
 * ```js
 * groupedAdamCapacity(device);   // Mesa's GL: 16 storage buffers → 5 (scaled too)
 * ```
 */
export function groupedAdamCapacity(limits: { maxStorageBuffersPerShaderStage: number; maxBindingsPerBindGroup: number }, scaled = false): number {
  const scaleBindings = scaled ? 1 : 0;
  const byStorage = Math.floor((limits.maxStorageBuffersPerShaderStage - scaleBindings) / BINDINGS_PER_VARIABLE);
  const byBindings = Math.floor((limits.maxBindingsPerBindGroup - 1 - scaleBindings) / BINDINGS_PER_VARIABLE);
  return Math.max(0, Math.min(byStorage, byBindings, MAX_GROUP));
}

/**
 * The WGSL of one dispatch over `k` variables (bindings 1 + 3s, 2 + 3s, 3 + 3s: slot s's param,
 * grad, moments; `scaled`: binding 1 + 3k the gradScale).
 */
export function groupedAdamShader(k: number, scaled = false): string {
  const vec4s = (n: number) => Math.max(1, Math.ceil(n / 4));
  const bindings: string[] = [];
  const cases: string[] = [];
  for (let s = 0; s < k; s++) {
    bindings.push(
        `@group(0) @binding(${1 + 3 * s}) var<storage, read_write> param${s} : array<f32>;`,
        `@group(0) @binding(${2 + 3 * s}) var<storage, read> grad${s} : array<f32>;`,
        `@group(0) @binding(${3 + 3 * s}) var<storage, read_write> moments${s} : array<f32>;`);
    // AdamUpdateProgram's expression and order (programs/adam_program.ts): bit for bit its results
    cases.push(`      case ${s}u: {
        let g = grad${s}[i]${scaled ? ' * scale' : ''};
        let m2 = moments${s}[i] * step.beta1 + g * step.oneMinusBeta1;
        let v2 = moments${s}[n + i] * step.beta2 + (g * g) * step.oneMinusBeta2;
        let denom = sqrt(v2) / step.correction2Sqrt + step.epsilon;
        let p2 = param${s}[i] - (m2 / denom) * step.stepSize;
        param${s}[i] = p2;
        moments${s}[i] = m2;
        moments${s}[n + i] = v2;
      }`);
  }
  return `
struct Step {
  beta1 : f32, oneMinusBeta1 : f32, beta2 : f32, oneMinusBeta2 : f32,
  epsilon : f32, correction2Sqrt : f32, stepSize : f32, workgroupsX : u32,
  // variable j's first workgroup (j = k: the total), and its size, 4 to a vec4 (uniform arrays' stride is 16)
  firstWorkgroup : array<vec4<u32>, ${vec4s(k + 1)}>,
  size : array<vec4<u32>, ${vec4s(k)}>,
};
@group(0) @binding(0) var<uniform> step : Step;
${bindings.join('\n')}${scaled ? `
@group(0) @binding(${1 + 3 * k}) var<storage, read> gradScale : array<f32>;` : ''}

fn firstWorkgroup(j : u32) -> u32 { return step.firstWorkgroup[j / 4u][j % 4u]; }

@compute @workgroup_size(${FLAT_THREADS}, 1, 1)
fn main(@builtin(workgroup_id) wid : vec3<u32>, @builtin(local_invocation_id) lid : vec3<u32>) {
  let wg = wid.x + wid.y * step.workgroupsX;
  if (wg >= firstWorkgroup(${k}u)) { return; }
  // each variable starts at a workgroup: j is the same for the whole workgroup
  var j = 0u;
  for (var t = 1u; t < ${k}u; t++) {
    if (firstWorkgroup(t) <= wg) { j = t; }
  }
  let i = (wg - firstWorkgroup(j)) * ${FLAT_THREADS}u + lid.x;
  let n = step.size[j / 4u][j % 4u];
  if (i >= n) { return; }${scaled ? `
  // a skipped step (gradScale 0) leaves every value where it is
  let scale = gradScale[0];
  if (scale == 0.0) { return; }` : ''}
  switch j {
${cases.join('\n')}
      default: {}
  }
}
`;
}

function pipelineFor(device: GPUDevice, k: number, scaled: boolean): GPUComputePipeline {
  return ownPipeline(device, `moeGroupedAdam_${k}${scaled ? '_scaled' : ''}`, () => groupedAdamShader(k, scaled));
}

/** A float32 GPU buffer the backend owns and nothing else references, after uploading it; else null. */
function ownBuffer(b: WebGPUBackendInternals, t: tf.Tensor): GPUBuffer | null {
  const data = b.tensorMap.get(t.dataId);
  if (data === undefined || data.dtype !== 'float32' || data.external === true || t.size === 0 || b.refCount(t.dataId) !== 1) return null;
  return bufferOf(b, t.dataId);
}

/** One variable updated in place, with its three buffers. */
interface GroupedVariable {
  entry: AdamEntry;
  param: GPUBuffer;
  grad: GPUBuffer;
  moments: GPUBuffer;
}

/** The name dispatch counts give this program. */
export const GROUPED_ADAM_PROGRAM = 'GroupedAdamProgram';

/**
 * webgpu's GroupedAdamUpdate (src/train/adam_update.ts): the entries it may update in place, K per
 * dispatch; the others through `perVariable`, first.
 *
 * ```js
 * webgpuGroupedAdamUpdate(variables.map((param, i) => ({ param, grad: grads[i], moments: moments[i] })), attrs,
 *     i => perVariableAdam(i));
 * ```
 */
export function webgpuGroupedAdamUpdate(entries: readonly AdamEntry[], attrs: AdamUpdateAttrs, perVariable: (index: number) => void,
    gradScale?: tf.Tensor): void {
  const b = internals();
  const scaled = gradScale !== undefined;
  const k = groupedAdamCapacity(b.device.limits, scaled);
  // a variable listed twice, or a gradient (or the scale) that is a variable's data: the per-variable
  // order matters (and one buffer cannot be bound read_write and read in one dispatch), so all go per variable
  const paramData = new Set<unknown>(entries.map(e => e.param?.dataId));
  if (paramData.size !== entries.length || entries.some(e => paramData.has(e.grad?.dataId)) || paramData.has(gradScale?.dataId)) {
    entries.forEach((_, index) => perVariable(index));
    return;
  }
  let scaleBuffer: GPUBuffer | undefined;
  if (gradScale !== undefined) {
    const buffer = bufferOf(b, gradScale.dataId);
    if (buffer === null) {
      entries.forEach((_, index) => perVariable(index));
      return;
    }
    scaleBuffer = buffer;
  }
  const grouped: GroupedVariable[] = [];
  const rest: number[] = [];
  entries.forEach((entry, index) => {
    const { param, grad, moments } = entry;
    const shapeOk = param instanceof tf.Variable && grad instanceof tf.Tensor && moments instanceof tf.Tensor && !grad.isDisposed &&
        !moments.isDisposed && tf.util.arraysEqual(grad.shape, param.shape) && moments.size === 2 * param.size && grad.dtype === 'float32';
    const paramBuffer = shapeOk && k > 0 ? ownBuffer(b, param) : null;
    const momentsBuffer = paramBuffer !== null ? ownBuffer(b, moments) : null;
    const gradBuffer = momentsBuffer !== null ? bufferOf(b, grad.dataId) : null;
    if (paramBuffer !== null && momentsBuffer !== null && gradBuffer !== null) {
      grouped.push({ entry, param: paramBuffer, grad: gradBuffer, moments: momentsBuffer });
    } else {
      rest.push(index);
    }
  });
  // the entries touch disjoint buffers (checked above): the per-variable ones may go first
  rest.forEach(perVariable);
  const scale = gradScale !== undefined ? { tensor: gradScale, buffer: scaleBuffer! } : undefined;
  for (let start = 0; start < grouped.length; start += k) {
    record(b, grouped.slice(start, start + k), attrs, scale);
  }
}

/** One dispatch over `group` (at most K variables), recorded into tfjs's current compute pass. */
function record(b: WebGPUBackendInternals, group: readonly GroupedVariable[], attrs: AdamUpdateAttrs,
    scale: { tensor: tf.Tensor; buffer: GPUBuffer } | undefined): void {
  const k = group.length;
  const firstWorkgroup = new Uint32Array(4 * Math.max(1, Math.ceil((k + 1) / 4)));
  const sizes = new Uint32Array(4 * Math.max(1, Math.ceil(k / 4)));
  group.forEach(({ entry }, s) => {
    sizes[s] = entry.param.size;
    firstWorkgroup[s + 1] = firstWorkgroup[s] + Math.ceil(entry.param.size / FLAT_THREADS);
  });
  const workgroups = firstWorkgroup[k];
  const maxX = b.device.limits.maxComputeWorkgroupsPerDimension;
  const workgroupsX = Math.min(workgroups, maxX);
  // within maxX: a group holds at most 64 buffers of at most 2³² bytes, 2³⁰ workgroups < 65535²
  const workgroupsY = Math.ceil(workgroups / workgroupsX);

  // the uniform: 8 words of scalars (float32 as tfjs's makeUniforms writes them), then the two arrays
  const bytes = new ArrayBuffer(32 + 4 * firstWorkgroup.length + 4 * sizes.length);
  new Float32Array(bytes, 0, 7).set([attrs.beta1, 1 - attrs.beta1, attrs.beta2, 1 - attrs.beta2, attrs.epsilon, attrs.correction2Sqrt, attrs.stepSize]);
  new Uint32Array(bytes, 28, 1)[0] = workgroupsX;
  new Uint32Array(bytes, 32, firstWorkgroup.length).set(firstWorkgroup);
  new Uint32Array(bytes, 32 + 4 * firstWorkgroup.length, sizes.length).set(sizes);
  // from tfjs's pool, back to it at the next submit, as its own uniforms (makeUniforms)
  const uniform = b.bufferManager.acquireBuffer(bytes.byteLength, GPUBufferUsage.COPY_DST | GPUBufferUsage.UNIFORM);
  b.queue.writeBuffer(uniform, 0, bytes, 0, bytes.byteLength);
  b.uniformPendingDisposal.push(uniform);

  const pipeline = pipelineFor(b.device, k, scale !== undefined);
  const entries: GPUBindGroupEntry[] = [{ binding: 0, resource: { buffer: uniform } }];
  const bound: object[] = [];
  group.forEach(({ entry, param, grad, moments }, s) => {
    const bytesOf = (n: number) => 4 * n;
    entries.push(
        { binding: 1 + 3 * s, resource: { buffer: param, size: bytesOf(entry.param.size) } },
        { binding: 2 + 3 * s, resource: { buffer: grad, size: bytesOf(entry.param.size) } },
        { binding: 3 + 3 * s, resource: { buffer: moments, size: bytesOf(2 * entry.param.size) } });
    for (const t of [entry.param, entry.grad, entry.moments]) {
      bound.push(t.dataId);
      // the new values are on the GPU only: a value cached by an earlier read is stale now
      if (t !== entry.grad) b.tensorMap.get(t.dataId)!.values = null;
    }
  });
  if (scale !== undefined) {
    entries.push({ binding: 1 + 3 * k, resource: { buffer: scale.buffer, size: 4 } });
    bound.push(scale.tensor.dataId);
  }
  recordOwnDispatch(b, { program: GROUPED_ADAM_PROGRAM, pipeline, entries, workgroups: [workgroupsX, workgroupsY], bound });
}
