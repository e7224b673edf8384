/**
 * One way to put a wrapper in place of one of tfjs-backend-webgpu's own kernels (BatchMatMul and
 * _FusedMatMul in batch_mat_mul.ts, AddN in add_n.ts, Transpose in transpose.ts): the original
 * config unregistered, the same config with the wrapper's kernelFunc registered, once however
 * often registration runs (a marked kernelFunc is not wrapped again).
 */
import * as tf from '@tensorflow/tfjs-core';

/** Marks a kernelFunc registered by replaceWebGPUKernel. */
const REPLACED = Symbol('moe-lora replaced webgpu kernel');

/**
 * Registers `wrap(original)` as webgpu's `name` where webgpu has `name` and it is not replaced
 * yet; returns whether it replaced it now.
 *
 * ```js
 * replaceWebGPUKernel('AddN', original => args => original.kernelFunc(args));
 * ```
 */
export function replaceWebGPUKernel(name: string, wrap: (original: tf.KernelConfig) => tf.KernelFunc): boolean {
  const original = tf.getKernel(name, 'webgpu');
  if (original == null || (original.kernelFunc as unknown as Record<symbol, unknown>)[REPLACED]) return false;
  tf.unregisterKernel(name, 'webgpu');
  tf.registerKernel({ ...original, kernelFunc: Object.assign(wrap(original), { [REPLACED]: true }) });
  return true;
}
