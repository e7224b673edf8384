/**
 * ΔW[e] = s·B_e·A_e for LoRA on a fused expert weight: the one place this formula is written.
 * Merge, unmerge, export and `materializeExpertLoRA` all go through `expertDeltaSum`.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor2D, Tensor3D } from '@tensorflow/tfjs-core';
import type { LoRAFactors } from '../types.js';
import { assertInteger, assertOneOf } from '../validate.js';
import { stackExpertFactors } from './layout.js';
import { checkExpertFactors } from './validate_lora.js';

/**
 * How a fused expert weight is stored: 'outIn' W [E, out, in] (transformers v5), 'inOut'
 * W [E, in, out] (gpt-oss; its interleaved gate/up columns are just its `out` order).
 */
export type ExpertWeightLayout = 'outIn' | 'inOut';
export const EXPERT_WEIGHT_LAYOUTS: readonly ExpertWeightLayout[] = ['outIn', 'inOut'];

/**
 * The weight delta of one LoRA adapter on a fused expert parameter, in PEFT's layout
 * (A [r·E, in] expert-major rows, B [out, r·E] rank-major columns):
 * ΔW[e] = scaling·B_e·A_e, or its per-expert transpose for `layout` 'inOut'.
 *
 * Forward only (no custom gradient): for a differentiable W + ΔW use `materializeExpertLoRA`.
 *
 * ```js
 * const A = tf.randomNormal([4 * 8, 64]);   // r = 4, E = 8, in = 64
 * const B = tf.zeros([32, 4 * 8]);          // out = 32
 * expertLoRADelta(A, B, 2, 8);              // [8, 32, 64], all zeros
 * ```
 *
 * @param A [r·E, in] float32
 * @param B [out, r·E] float32
 * @param scaling alpha / r (or alpha / √r with rsLoRA)
 * @param numExperts E
 * @param layout 'outIn' (default) → [E, out, in]; 'inOut' → [E, in, out]
 */
export function expertLoRADelta(
    A: Tensor2D, B: Tensor2D, scaling: number, numExperts: number,
    layout: ExpertWeightLayout = 'outIn'): Tensor3D {
  const op = 'expertLoRADelta';
  assertInteger(op, 'numExperts', numExperts, 1);
  assertOneOf(op, 'layout', layout, EXPERT_WEIGHT_LAYOUTS);
  checkExpertFactors(op, '', { A, B, scaling }, numExperts, null, null, `numExperts = ${numExperts}`);
  return expertDeltaSum([{ A, B, scaling }], numExperts, layout);
}

/**
 * Σ_k s_k·B_k,e·A_k,e for already validated adapters (at least one), as one batched product over
 * the adapters stacked along the rank axis. Same-batch matMul, forward only, both operands
 * untransposed in the kernel call.
 */
export function expertDeltaSum(
    adapters: readonly LoRAFactors[], numExperts: number, layout: ExpertWeightLayout): Tensor3D {
  return tf.tidy(() => {
    const { a, scaledB } = stackExpertFactors(adapters, numExperts);  // [E, R, in], [E, out, R]
    if (layout === 'outIn') return tf.matMul(scaledB, a);             // [E, out, in]
    // (B_e·A_e)ᵀ = A_eᵀ·B_eᵀ: transpose the small factors, never the product.
    return tf.matMul(tf.transpose(a, [0, 2, 1]), tf.transpose(scaledB, [0, 2, 1]));  // [E, in, out]
  });
}
