/**
 * tfjs-backend-webgpu's 'AddN', kept within the device's storage-buffer limit.
 *
 * tfjs-webgpu 4.22 sums any number of tensors in one AddNPackedProgram, one storage buffer per
 * input and one for the sum, without looking at the device's maxStorageBuffersPerShaderStage
 * (WebGPU's default 8, Mesa's GL 16; a browser may give no more than the default). Past it Dawn
 * rejects the pipeline ("The number of storage buffers (26) in the Compute stage exceeds the
 * maximum per-stage limit (16)") and the result is whatever the output buffer held. The training
 * loop meets it in the global gradient norm, tf.addN over one Σg² per trainable weight
 * (train/optimizer.ts: 25 for the 2-layer from-scratch presets, hundreds for a real model), and
 * any caller of tf.addN can. This wrapper sums at most as many inputs per program as the device
 * binds, then sums those partial sums the same way; within the limit it is the original call.
 */
import * as tf from '@tensorflow/tfjs-core';
import { replaceWebGPUKernel } from './kernel_replacement.js';

type KernelArgs = Parameters<tf.KernelFunc>[0];

/** What is used of tfjs-backend-webgpu's WebGPUBackend here (public members). */
interface WebGPUBackendLike {
  device: { limits: AddNLimits };
  disposeData(dataId: object): boolean;
}

/** The device limits that bound one AddNPackedProgram. */
export interface AddNLimits {
  maxStorageBuffersPerShaderStage: number;
  maxBindingsPerBindGroup: number;
}

/**
 * Inputs one AddNPackedProgram may take on a device: a storage buffer each, besides the output's;
 * a binding each, besides the output's and the uniforms'.
 *
 * ```js
 * addNInputsPerProgram(device.limits);   // Mesa's GL: 16 storage buffers → 15
 * ```
 */
export function addNInputsPerProgram(limits: AddNLimits): number {
  // at least 2, so that each round of partial sums is shorter than the last (WebGPU guarantees 8)
  return Math.max(2, Math.min(limits.maxStorageBuffersPerShaderStage - 1, limits.maxBindingsPerBindGroup - 2));
}

/**
 * An 'AddN' kernelFunc for webgpu that calls `original` on at most addNInputsPerProgram inputs at a
 * time: consecutive groups summed, then their sums, until one program takes what is left.
 *
 * ```js
 * const chunked = chunkedAddN(tf.getKernel('AddN', 'webgpu'));
 * ```
 */
export function chunkedAddN(original: tf.KernelConfig): tf.KernelFunc {
  const kernelFunc = (args: KernelArgs): tf.TensorInfo | tf.TensorInfo[] => {
    const backend = args.backend as unknown as WebGPUBackendLike;
    const perProgram = addNInputsPerProgram(backend.device.limits);
    // AddN's inputs are the array of its tensors, not a map of names
    let terms = args.inputs as unknown as tf.TensorInfo[];
    if (terms.length <= perProgram) return original.kernelFunc(args);
    const sumOf = (group: tf.TensorInfo[]) =>
      original.kernelFunc({ ...args, inputs: group as unknown as tf.NamedTensorInfoMap }) as tf.TensorInfo;
    const partials: tf.TensorInfo[] = [];
    try {
      while (terms.length > perProgram) {
        const next: tf.TensorInfo[] = [];
        for (let i = 0; i < terms.length; i += perProgram) {
          const group = terms.slice(i, i + perProgram);
          if (group.length === 1) {
            next.push(group[0]);
            continue;
          }
          const sum = sumOf(group);
          partials.push(sum);
          next.push(sum);
        }
        terms = next;
      }
      return sumOf(terms);
    } finally {
      for (const p of partials) backend.disposeData(p.dataId);
    }
  };
  return kernelFunc as unknown as tf.KernelFunc;
}

/** Replaces webgpu's registered 'AddN' with chunkedAddN of it (once); returns the names replaced now. */
export function useChunkedAddN(): string[] {
  return replaceWebGPUKernel(tf.AddN, chunkedAddN) ? [tf.AddN] : [];
}
