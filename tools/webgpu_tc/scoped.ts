/**
 * Changes for the length of one call, undone after it, shared by the device tools (check.ts,
 * contract.ts, time_attention.ts) and the webgpu specs (spec/backends/webgpu/helpers.ts): a tf.env()
 * flag set, the tensor-core flag in particular, and the shader keys of the programs a call runs.
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
