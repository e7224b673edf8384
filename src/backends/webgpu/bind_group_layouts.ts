/**
 * One GPUBindGroupLayout object per pipeline (issue 15: the host records an OLMoE training step
 * about as long as the GPU runs it, ~2500 dispatches a step, ~200 ms of it in the native calls of
 * npm `webgpu`). tfjs-backend-webgpu's recordAndSubmit (4.22) asks the pipeline for
 * getBindGroupLayout(0) on every dispatch, a native call that makes a new wrapper object each time
 * for the same layout; here each pipeline the backend's device creates answers it from a cache.
 * What is bound is unchanged: the layout of a pipeline made with layout 'auto' is fixed at creation.
 *
 * The tf.env() flag WEBGPU_MOE_BIND_GROUP_LAYOUT_CACHE (default true) is read per call: false asks
 * the pipeline each time, as tfjs does (the comparison in one checkout).
 */
import * as tf from '@tensorflow/tfjs-core';

export const BIND_GROUP_LAYOUT_CACHE_FLAG = 'WEBGPU_MOE_BIND_GROUP_LAYOUT_CACHE';
tf.env().registerFlag(BIND_GROUP_LAYOUT_CACHE_FLAG, () => true);

/** What is used of tfjs-backend-webgpu's WebGPUBackend. */
interface BackendInternals { device: GPUDevice }

const installed = new WeakSet<object>();

/** `pipeline` with getBindGroupLayout answered from a cache per group index, where the object takes the wrapper. */
function cachingLayouts(pipeline: GPUComputePipeline): GPUComputePipeline {
  const ask = pipeline.getBindGroupLayout.bind(pipeline);
  const layouts = new Map<number, GPUBindGroupLayout>();
  const cached = (index: number): GPUBindGroupLayout => {
    if (!tf.env().getBool(BIND_GROUP_LAYOUT_CACHE_FLAG)) return ask(index);
    let layout = layouts.get(index);
    if (layout === undefined) {
      layout = ask(index);
      layouts.set(index, layout);
    }
    return layout;
  };
  try {
    pipeline.getBindGroupLayout = cached;
  } catch {
    // a pipeline object that does not take the wrapper answers as it did
  }
  return pipeline;
}

/**
 * Makes every compute pipeline that `backend`'s device (a WebGPUBackend's) creates from now on
 * answer getBindGroupLayout from a cache. Idempotent; returns whether the device took the wrappers
 * (a backend without a device, or a device whose methods cannot be replaced, is left as it is).
 *
 * ```js
 * await tf.setBackend('webgpu');
 * installBindGroupLayoutCache(tf.backend());
 * ```
 */
export function installBindGroupLayoutCache(backend: unknown): boolean {
  const device = (backend as Partial<BackendInternals> | null)?.device;
  if (device == null || typeof device.createComputePipeline !== 'function') return false;
  if (installed.has(device)) return true;
  const create = device.createComputePipeline.bind(device);
  const wrapped = (descriptor: GPUComputePipelineDescriptor) => cachingLayouts(create(descriptor));
  try {
    device.createComputePipeline = wrapped;
    if (typeof device.createComputePipelineAsync === 'function') {
      const createAsync = device.createComputePipelineAsync.bind(device);
      device.createComputePipelineAsync = async (descriptor: GPUComputePipelineDescriptor) => cachingLayouts(await createAsync(descriptor));
    }
  } catch {
    return false;
  }
  if (device.createComputePipeline !== wrapped) return false;
  installed.add(device);
  return true;
}
