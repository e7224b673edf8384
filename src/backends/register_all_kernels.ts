/**
 * Registers this package's kernels for one backend. Idempotent: a kernel that is already
 * registered (by tfjs itself or an earlier call) is left alone.
 */
import * as tf from '@tensorflow/tfjs-core';
import { unsortedSegmentSumConfig } from './wasm/unsorted_segment_sum.js';

/** Per backend, the kernels this package adds; filled by src/backends/<backend>/. */
const kernelsByBackend: Record<string, tf.KernelConfig[]> = {
  wasm: [unsortedSegmentSumConfig],
};

/** Returns the names of the kernels it registered now. */
export function registerMoEKernels(backendName: string = tf.getBackend()): string[] {
  const added: string[] = [];
  for (const config of kernelsByBackend[backendName] ?? []) {
    if (tf.getKernel(config.kernelName, backendName) != null) continue;
    tf.registerKernel(config);
    added.push(config.kernelName);
  }
  return added;
}

/** The names of the kernels this package provides for a backend, registered yet or not. */
export function moeKernelNames(backendName: string = tf.getBackend()): string[] {
  return (kernelsByBackend[backendName] ?? []).map(config => config.kernelName);
}
