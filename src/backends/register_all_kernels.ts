/**
 * Registers this package's kernels for one backend. Idempotent: a kernel that is already
 * registered (by tfjs itself or an earlier call) is left alone.
 */
import * as tf from '@tensorflow/tfjs-core';
import { cpuMoEKernelConfigs } from './cpu/moe_kernels.js';
import { useFastTransposedBatchMatMul } from './wasm/batch_mat_mul.js';
import { useSharedIdentity } from './wasm/identity.js';
import { wasmMoEKernelConfigs } from './wasm/moe_kernels.js';
import { unsortedSegmentSumConfig } from './wasm/unsorted_segment_sum.js';
import { webgpuMoEKernelConfigs } from './webgpu/kernels.js';
import { registerWebGPUMoE } from './webgpu/register.js';

/** Per backend, the kernels this package adds; filled by src/backends/<backend>/. */
const kernelsByBackend: Record<string, tf.KernelConfig[]> = {
  cpu: cpuMoEKernelConfigs,
  wasm: [unsortedSegmentSumConfig, ...wasmMoEKernelConfigs],
  webgpu: webgpuMoEKernelConfigs,
};

/** Returns the names of the kernels it registered now. */
export function registerMoEKernels(backendName: string = tf.getBackend()): string[] {
  const added: string[] = [];
  for (const config of kernelsByBackend[backendName] ?? []) {
    if (tf.getKernel(config.kernelName, backendName) != null) continue;
    tf.registerKernel(config);
    added.push(config.kernelName);
  }
  // the experts implementation of the 'fused' block and the routing kernel ride along
  if (backendName === 'webgpu') registerWebGPUMoE();
  // tfjs-wasm's own BatchMatMul, wrapped so that transposed products (gradients, the router) take
  // its XNNPACK path, and its Identity made to share the buffer instead of copying it (every clone,
  // customGrad's saves): replacements, not additions, so they are not in the names returned
  if (backendName === 'wasm') {
    useFastTransposedBatchMatMul();
    useSharedIdentity();
  }
  return added;
}

/** The names of the kernels this package provides for a backend, registered yet or not. */
export function moeKernelNames(backendName: string = tf.getBackend()): string[] {
  return (kernelsByBackend[backendName] ?? []).map(config => config.kernelName);
}
