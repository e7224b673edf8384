/**
 * Changes for the length of one call, undone after it, shared by the device tools (check.ts,
 * contract.ts, time_attention.ts, bench/webgpu_dense_lora_products.ts) and the webgpu specs
 * (spec/backends/webgpu/helpers.ts): a tf.env() flag set, the tensor-core flag in particular, the
 * shader keys of the programs a call runs, and the host data it sends to the GPU.
 */
import * as tf from '@tensorflow/tfjs-core';
import { TENSOR_CORES_FLAG } from '../../src/backends/webgpu/tensor_cores.js';

/** Runs `fn` with tf.env() flag `name` set to `value`, restoring the flag's previous value after. */
export async function withEnvFlag<T>(name: string, value: boolean | number | string, fn: () => Promise<T>): Promise<T> {
  const before = tf.env().get(name);
  tf.env().set(name, value);
  try {
    return await fn();
  } finally {
    tf.env().set(name, before);
  }
}

/** Runs `fn` with the tensor-core flag (WEBGPU_MOE_TENSOR_CORES) set to `on`, restoring it after. */
export function withTensorCores<T>(on: boolean, fn: () => Promise<T>): Promise<T> {
  return withEnvFlag(TENSOR_CORES_FLAG, on, fn);
}

/**
 * Runs `fn` with every webgpu program's shader key pushed to `keys` (which fn may read and clear as it
 * goes), restoring the backend's runWebGPUProgram after.
 */
export async function withShaderKeys<T>(fn: (keys: string[]) => Promise<T>): Promise<T> {
  const backend = tf.backend() as unknown as { runWebGPUProgram: (p: { shaderKey: string }, ...rest: unknown[]) => unknown };
  const run = backend.runWebGPUProgram;
  const keys: string[] = [];
  backend.runWebGPUProgram = function (this: unknown, p, ...rest) {
    keys.push(p.shaderKey);
    return run.call(this, p, ...rest);
  };
  try {
    return await fn(keys);
  } finally {
    backend.runWebGPUProgram = run;
  }
}

/** What withHostUploads counts while `fn` runs. */
export interface HostUploads {
  /** backend.write calls with values: tf.tensor(...) or makeTensorInfo(shape, dtype, values) */
  writes: number;
  /** uploadToGPU calls that found host values to copy (each a mapped staging buffer and a copy) */
  copies: number;
}

/** What withHostUploads wraps of tfjs-backend-webgpu's WebGPUBackend (4.22). */
interface UploadInternals {
  write(values: unknown, shape: number[], dtype: string): unknown;
  uploadToGPU(dataId: unknown): void;
  tensorMap: { get(dataId: unknown): { values: unknown; resource: unknown } | undefined };
}

/**
 * Runs `fn` with the host data sent to the GPU counted in `uploads` (which fn may read as it goes),
 * restoring the backend after. In tfjs-webgpu 4.22 each such upload creates a mapped staging
 * buffer and ends the compute pass to copy it: ~1.7 ms of host a call on the H100 (run S's dense
 * plan uploads), so a path meant to upload nothing is checked with this. Uniforms are not data and
 * are not counted. Throws where the backend lacks the members (another tfjs version).
 */
export async function withHostUploads<T>(fn: (uploads: HostUploads) => Promise<T>): Promise<T> {
  const backend = tf.backend() as unknown as UploadInternals;
  if (typeof backend.write !== 'function' || typeof backend.uploadToGPU !== 'function' || typeof backend.tensorMap?.get !== 'function') {
    throw new Error(`withHostUploads: backend '${tf.getBackend()}' has no write, uploadToGPU and tensorMap (tfjs-backend-webgpu 4.22's)`);
  }
  const { write, uploadToGPU } = backend;
  const uploads: HostUploads = { writes: 0, copies: 0 };
  backend.write = function (this: UploadInternals, values, shape, dtype) {
    if (values != null) uploads.writes++;
    return write.call(this, values, shape, dtype);
  };
  backend.uploadToGPU = function (this: UploadInternals, dataId) {
    const data = this.tensorMap.get(dataId);
    if (data !== undefined && data.resource == null && data.values != null) uploads.copies++;
    uploadToGPU.call(this, dataId);
  };
  try {
    return await fn(uploads);
  } finally {
    backend.write = write;
    backend.uploadToGPU = uploadToGPU;
  }
}
