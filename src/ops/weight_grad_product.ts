/**
 * aᵀ·b as one kernel where a backend has one: a LoRA factor's gradient (dA = gᵀ·x, dB = dyᵀ·u)
 * sums the outer products of N rows into an [r, in] or [out, r] result, a product that reads
 * N·(in + r) values to write r·in. tfjs's generic matMul tiles the small output and leaves most of
 * the GPU idle; webgpu's kernel can run it at memory speed (NarrowWeightGradProgram, issue 15; with
 * WEBGPU_MOE_DENSE_NARROW_PRODUCTS, on by default: see kernels.ts), else tfjs's BatchMatMul.
 * Elsewhere tf.matMul(a, b, true, false), as before. weightGradProductPair takes a projection's two
 * factor gradients together: on webgpu in two dispatches instead of four (weight_grad_pairs.ts).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor, Tensor2D } from '@tensorflow/tfjs-core';

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

/**
 * MoEWeightGradProductPair: inputs a0 [N, P0], b0 [N, Q0], a1 [N, P1], b1 [N, Q1], float32; no
 * attrs; outputs [a0ᵀ·b0 [P0, Q0], a1ᵀ·b1 [P1, Q1]], each as MoEWeightGradProduct computes it.
 */
export const WEIGHT_GRAD_PRODUCT_PAIR = 'MoEWeightGradProductPair';

/**
 * [a0ᵀ·b0, a1ᵀ·b1] for two products over the same rows, in one kernel where
 * MoEWeightGradProductPair is registered; else weightGradProduct twice. Internal, as weightGradProduct.
 *
 * ```js
 * const [dA, dB] = weightGradProductPair(g, x, dy, down);  // [r, in], [out, r]
 * ```
 */
export function weightGradProductPair(a0: Tensor2D, b0: Tensor2D, a1: Tensor2D, b1: Tensor2D): [Tensor2D, Tensor2D] {
  if (tf.getKernel(WEIGHT_GRAD_PRODUCT_PAIR, tf.getBackend()) != null) {
    const [first, second] = tf.engine().runKernel(WEIGHT_GRAD_PRODUCT_PAIR, { a0, b0, a1, b1 }, {}) as Tensor[];
    return [first as Tensor2D, second as Tensor2D];
  }
  return [weightGradProduct(a0, b0), weightGradProduct(a1, b1)];
}
