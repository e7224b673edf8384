/**
 * Installs the WebGPU MoE path: the kernels (tf.registerKernel for 'webgpu'), the routed-experts
 * implementation of the 'fused' block, the softmaxTopK routing kernel and tfjs-webgpu's matMul
 * kernels wrapped around a wrong product (batch_mat_mul.ts), its AddN kept within the device's
 * storage-buffer limit (add_n.ts), the optimizer's grouped Adam, the dense
 * products' tensor-core override (packed.ts's registerDenseKernelOverride) and the uniform arena on
 * the webgpu backend made so far (uniform_arena.ts, bind_group_layouts.ts, written_uploads.ts). The routing override
 * delegates to the implementation it replaced on every other backend, and for configs it does
 * not handle (whose errors the replaced implementation reports).
 */
import * as tf from '@tensorflow/tfjs-core';
import { registerExpertsImplementation } from '../../ops/moe_block.js';
import { registerDenseKernelOverride } from '../../ops/packed.js';
import { registerRouting, type RoutingFn } from '../../ops/routing/route.js';
import { registerGroupedAdamUpdate } from '../../train/adam_update.js';
import { useChunkedAddN } from './add_n.js';
import { useQuadTranspose } from './transpose.js';
import { useSplitKSafeMatMul } from './batch_mat_mul.js';
import { webgpuFusedExperts } from './experts.js';
import { webgpuGroupedAdamUpdate } from './grouped_adam.js';
import { webgpuDenseKernelOverride, webgpuMoEKernelConfigs } from './kernels.js';
import { webgpuRouteSoftmaxTopK } from './routing.js';
import { installUniformArena } from './uniform_arena.js';
import { installBindGroupLayoutCache } from './bind_group_layouts.js';
import { installBindGroupCache } from './bind_groups.js';
import { installWrittenUploads } from './written_uploads.js';

export const WEBGPU_BACKEND = 'webgpu';

let installed = false;

/**
 * Idempotent; returns the names of the kernels it registered now. Called by
 * registerMoEKernels('webgpu').
 *
 * ```js
 * await tf.setBackend('webgpu');
 * registerWebGPUMoE();
 * ```
 */
export function registerWebGPUMoE(): string[] {
  const added: string[] = [];
  for (const config of webgpuMoEKernelConfigs) {
    if (tf.getKernel(config.kernelName, WEBGPU_BACKEND) != null) continue;
    tf.registerKernel(config);
    added.push(config.kernelName);
  }
  // tfjs-webgpu's matMul, wrapped where it computes a wrong product (LoRA's x·Aᵀ at width 2048):
  // a replacement, not an addition, so not in the names returned
  useSplitKSafeMatMul();
  // tfjs-webgpu's AddN, in programs of at most the device's storage buffers (the gradient norm sums
  // one term per trainable weight): a replacement too
  useChunkedAddN();
  // tfjs-webgpu's Transpose, float32 ones keeping the last axis in vec4 copies (attention's head moves): a replacement too
  useQuadTranspose();
  // every program's uniforms from a few buffers written once per submit (uniform_arena.ts); per
  // backend instance, so a webgpu backend made again gets it too (and the layout cache likewise)
  // (the instance only if made: findBackend would start one); our kernels install it on first use otherwise
  const backend = (tf.engine() as unknown as { registry: Record<string, unknown> }).registry[WEBGPU_BACKEND];
  if (backend != null) {
    installUniformArena(backend);
    // one bind group layout object per pipeline instead of a native call per dispatch (bind_group_layouts.ts)
    installBindGroupLayoutCache(backend);
    // one bind group per distinct binding, the pool handing out its oldest free buffer (bind_groups.ts)
    installBindGroupCache(backend);
    // host values uploaded by writeBuffer, not a staging buffer created per upload (written_uploads.ts)
    installWrittenUploads(backend);
  }
  if (installed) return added;
  installed = true;
  registerExpertsImplementation(WEBGPU_BACKEND, webgpuFusedExperts);
  // Adam in place, K variables per dispatch (grouped_adam.ts); MoEAdamUpdate stays its per-variable fallback
  registerGroupedAdamUpdate(WEBGPU_BACKEND, webgpuGroupedAdamUpdate);
  // a dense product that runs on tensor cores goes to MoEDenseMatMul whatever WEBGPU_MOE_DENSE_PROGRAM
  // says (that flag picks between f32 programs; on tensor cores ours is the fast one)
  registerDenseKernelOverride(WEBGPU_BACKEND, webgpuDenseKernelOverride);
  const previous: RoutingFn | undefined = registerRouting('softmaxTopK', (logits, config, bias) => {
    const own = tf.getBackend() === WEBGPU_BACKEND && bias === undefined && config.nGroup === undefined &&
        config.topkGroup === undefined && config.scalingFactor === undefined;
    if (!own) return previous!(logits, config, bias);
    return webgpuRouteSoftmaxTopK(logits, config.topK, { renormalize: config.renormalize });
  });
  return added;
}
