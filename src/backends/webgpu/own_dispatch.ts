/**
 * Dispatches of pipelines of our own, recorded into tfjs-backend-webgpu's command encoder and
 * compute pass (issue 15: the host is bound by dispatches). A tfjs program binds its inputs
 * read-only and has one output; a pipeline of our own may bind several buffers read_write (the
 * grouped Adam updates K variables in place, a pair of weight gradients is written by one sum):
 * what would take a program per output takes one dispatch.
 *
 * recordOwnDispatch does what tfjs's runWebGPUProgram does after building its bind group: the
 * dispatch goes into tfjs's current pass (or a pass of its own, timestamped, inside tf.time), it
 * counts towards tfjs's WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE like any program, and the tensors it
 * binds are marked as owned by the command queue, so that one disposed right after keeps its buffer
 * until the work is submitted.
 */
import * as tf from '@tensorflow/tfjs-core';
import { fail } from '../../ops/validate.js';

/** What is used of tfjs-backend-webgpu's WebGPUBackend (4.22), checked before use (backendInternals). */
export interface WebGPUBackendInternals {
  device: GPUDevice;
  queue: GPUQueue;
  tensorMap: { get(dataId: object): TensorDataLike | undefined };
  bufferManager: { acquireBuffer(size: number, usage: number): GPUBuffer };
  commandEncoder: GPUCommandEncoder | null;
  computePassEncoder: GPUComputePassEncoder | null;
  dispatchCountInPass: number;
  commandQueueOwnedIds: WeakSet<object>;
  uniformPendingDisposal: GPUBuffer[];
  /** set inside tf.time: each program then gets its own pass, timestamped where supported */
  activeTimers?: Array<{ name: string; query: Promise<number> }> | null;
  supportTimestampQuery?: boolean;
  querySet?: GPUQuerySet | null;
  querySetCount: number;
  getQueryTime(): Promise<number>;
  refCount(dataId: object): number;
  makeTensorInfo(shape: number[], dtype: tf.DataType): tf.TensorInfo;
  uploadToGPU(dataId: object): void;
  ensureCommandEncoderReady(): void;
  endComputePassEncoder(): void;
  submitQueue(): void;
}

/** tfjs-backend-webgpu's TensorData, the part used. */
interface TensorDataLike {
  dtype: string;
  values?: unknown;
  resource?: unknown;
  external?: boolean;
}

/**
 * The active webgpu backend's internals that own dispatches use, or one error naming `op` and what
 * to set instead (`fallback`: the flag that avoids the own dispatch).
 */
export function backendInternals(op: string, fallback: string): WebGPUBackendInternals {
  const b = tf.backend() as unknown as Partial<WebGPUBackendInternals>;
  const methods = ['refCount', 'makeTensorInfo', 'uploadToGPU', 'ensureCommandEncoderReady', 'endComputePassEncoder', 'submitQueue',
    'getQueryTime'] as const;
  if (b.device == null || b.queue == null || typeof b.tensorMap?.get !== 'function' || typeof b.bufferManager?.acquireBuffer !== 'function' ||
      typeof b.dispatchCountInPass !== 'number' || typeof b.querySetCount !== 'number' || !(b.commandQueueOwnedIds instanceof WeakSet) ||
      !Array.isArray(b.uniformPendingDisposal) || !('computePassEncoder' in b) || !('commandEncoder' in b) ||
      methods.some(m => typeof b[m] !== 'function')) {
    fail(op, "needs tfjs-backend-webgpu 4.22's WebGPUBackend internals (tensorMap, bufferManager, commandEncoder, " +
        'computePassEncoder, dispatchCountInPass, commandQueueOwnedIds, uniformPendingDisposal, makeTensorInfo, uploadToGPU, submitQueue, ' +
        `getQueryTime) but the '${tf.getBackend()}' backend lacks some; ${fallback}`);
  }
  return b as WebGPUBackendInternals;
}

const pipelines = new WeakMap<GPUDevice, Map<string, GPUComputePipeline>>();

/** The compute pipeline of `code` (entry point main, layout auto), made once per device and key. */
export function ownPipeline(device: GPUDevice, key: string, code: () => string): GPUComputePipeline {
  let byKey = pipelines.get(device);
  if (byKey === undefined) pipelines.set(device, byKey = new Map());
  let pipeline = byKey.get(key);
  if (pipeline === undefined) {
    const module = device.createShaderModule({ code: code(), label: key });
    pipeline = device.createComputePipeline({ layout: 'auto', compute: { module, entryPoint: 'main' }, label: key });
    byKey.set(key, pipeline);
  }
  return pipeline;
}

/** The GPU buffer of tensor data `dataId`, uploaded first where it is still on the host; null if it has none. */
export function bufferOf(b: WebGPUBackendInternals, dataId: object): GPUBuffer | null {
  b.uploadToGPU(dataId);
  const resource = b.tensorMap.get(dataId)?.resource;
  return resource instanceof GPUBuffer ? resource : null;
}

/** Listeners told of each own dispatch by its program's name (bench/e2e counts them with tfjs's programs). */
export const ownDispatchListeners = new Set<(program: string) => void>();

/** One own dispatch: its pipeline and bindings, its grid, and the tensor data it binds. */
export interface OwnDispatch {
  /** the name dispatch counts and timers give it */
  program: string;
  pipeline: GPUComputePipeline;
  entries: GPUBindGroupEntry[];
  workgroups: [number, number] | [number, number, number];
  /** the data ids of the tensors bound, kept by the command queue until submitted */
  bound: object[];
}

/** Records `dispatch` into tfjs's current compute pass, by tfjs's rules (its pass, its submit rule, its timers). */
export function recordOwnDispatch(b: WebGPUBackendInternals, dispatch: OwnDispatch): void {
  dispatch.bound.forEach(id => b.commandQueueOwnedIds.add(id));
  const bindGroup = b.device.createBindGroup({ layout: dispatch.pipeline.getBindGroupLayout(0), entries: dispatch.entries });
  b.ensureCommandEncoderReady();
  const timed = b.activeTimers != null;
  if (timed) {
    b.endComputePassEncoder();
    const descriptor: GPUComputePassDescriptor = {};
    if (b.supportTimestampQuery === true) {
      b.querySet ??= b.device.createQuerySet({ type: 'timestamp', count: b.querySetCount });
      descriptor.timestampWrites = { querySet: b.querySet, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 };
    }
    b.computePassEncoder = b.commandEncoder!.beginComputePass(descriptor);
  } else if (b.computePassEncoder === null) {
    b.computePassEncoder = b.commandEncoder!.beginComputePass({});
  }
  b.computePassEncoder.setPipeline(dispatch.pipeline);
  b.computePassEncoder.setBindGroup(0, bindGroup);
  b.computePassEncoder.dispatchWorkgroups(dispatch.workgroups[0], dispatch.workgroups[1], dispatch.workgroups[2] ?? 1);
  b.dispatchCountInPass++;
  ownDispatchListeners.forEach(listener => listener(dispatch.program));
  if (timed) {
    b.endComputePassEncoder();
    b.activeTimers!.push({ name: dispatch.program, query: b.getQueryTime() });
  } else if ((tf.env().get('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE') as number) <= b.dispatchCountInPass) {
    b.endComputePassEncoder();
    b.submitQueue();
  }
}
