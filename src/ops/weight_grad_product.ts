/**
 * aᵀ·b as one kernel where a backend has one: a LoRA factor's gradient (dA = gᵀ·x, dB = dyᵀ·u)
 * sums the outer products of N rows into an [r, in] or [out, r] result, a product that reads
 * N·(in + r) values to write r·in. tfjs's generic matMul tiles the small output and leaves most of
 * the GPU idle; webgpu's kernel can run it at memory speed (NarrowWeightGradProgram, issue 15; with
 * WEBGPU_MOE_DENSE_NARROW_PRODUCTS, off by default: see kernels.ts), else tfjs's BatchMatMul.
 * Elsewhere tf.matMul(a, b, true, false), as before.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor2D } from '@tensorflow/tfjs-core';

/**
 * MoEWeightGradProduct: inputs a [N, P] and b [N, Q], float32; no attrs; output aᵀ·b [P, Q], the
 * sum over the N rows in float32.
 */
export const WEIGHT_GRAD_PRODUCT = 'MoEWeightGradProduct';

/**
 * matMul(a, b, true, false), in one kernel where MoEWeightGradProduct is registered. Internal (no
 * argument checks beyond tfjs's): the callers pass shapes they built.
 *
 * ```js
 * const dB = weightGradProduct(dy, down);  // dy [N, out], down [N, r] → [out, r]
 * ```
 */
export function weightGradProduct(a: Tensor2D, b: Tensor2D): Tensor2D {
  if (tf.getKernel(WEIGHT_GRAD_PRODUCT, tf.getBackend()) != null) {
    return tf.engine().runKernel(WEIGHT_GRAD_PRODUCT, { a, b }, {}) as Tensor2D;
  }
  return tf.matMul(a, b, true, false);
}
