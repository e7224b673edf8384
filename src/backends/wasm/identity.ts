/**
 * tfjs-backend-wasm's 'Identity', sharing the input's heap block instead of copying it.
 *
 * tfjs runs Identity for every tf.clone, and customGrad's `save` clones each tensor it keeps for
 * backward: on wasm that is a copy (tfjs-wasm's Identity allocates and copies), 3–6 MB a fused
 * block step at config S (x, h, the trained weights), about 1 ms. Tensors never change their
 * values, and tfjs-wasm already shares one heap block between tensors for Reshape (its per-buffer
 * refCount, freed when the last sharer is disposed), so the clone shares it the same way, as
 * tfjs-cpu's Identity does. Code that writes into a tensor's heap block in place must check that
 * its refCount is 1 first (src/io/device_tensor.ts does).
 */
import * as tf from '@tensorflow/tfjs-core';

/** What is used of tfjs-backend-wasm's BackendWasm. */
interface WasmBackendLike {
  incRef(dataId: tf.DataId): void;
}

type KernelArgs = Parameters<tf.KernelFunc>[0];

/** Marks the replacement, so that registering the package's kernels twice does not wrap it twice. */
const SHARED = Symbol('moe-lora shared Identity');

/**
 * An 'Identity' config for wasm whose output shares the input's heap block; string tensors (held
 * outside the heap) still go to `original`.
 *
 * ```js
 * tf.registerKernel(sharedIdentity(tf.getKernel('Identity', 'wasm')));
 * ```
 */
export function sharedIdentity(original: tf.KernelConfig): tf.KernelConfig {
  const kernelFunc = (args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] => {
    const { x } = args.inputs as { x: tf.TensorInfo };
    if (x.dtype === 'string') return original.kernelFunc(args);
    (args.backend as unknown as WasmBackendLike).incRef(x.dataId);
    return { dataId: x.dataId, shape: [...x.shape], dtype: x.dtype };
  };
  return { ...original, kernelFunc: Object.assign(kernelFunc, { [SHARED]: true }) as unknown as tf.KernelFunc };
}

/**
 * Replaces wasm's registered 'Identity' with sharedIdentity of it (once; true when it did). False
 * when tfjs-backend-wasm is not loaded or the kernel is already the replacement.
 */
export function useSharedIdentity(): boolean {
  const original = tf.getKernel(tf.Identity, 'wasm');
  if (original == null || (original.kernelFunc as unknown as Record<symbol, unknown>)[SHARED]) return false;
  tf.unregisterKernel(tf.Identity, 'wasm');
  tf.registerKernel(sharedIdentity(original));
  return true;
}
