/**
 * PEFT's layout of LoRA factors on a fused expert parameter W [E, out, in] (PEFT >= 0.19.1), and the
 * per-expert view the products need. The index maps live here and nowhere else:
 *   A [r·E, in]  expert-major rows:   A_e = rows e·r … e·r+r−1      ⇔ [E, r, in]
 *   B [out, r·E] rank-major columns:  B_e[:, j] = column j·E + e    ⇔ [out, r, E] ⇔ [E, out, r]
 * Callers validate; these helpers only reshape and transpose.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor2D, Tensor3D } from '@tensorflow/tfjs-core';
import type { LoRAFactors } from '../types.js';

/** PEFT's A [r·E, in] as per-expert factors [E, r, in]: row e·r + j is expert e, rank j. */
export function expertFactorA(A: Tensor2D, numExperts: number): Tensor3D {
  const [rows, inDim] = A.shape;
  return tf.reshape(A, [numExperts, rows / numExperts, inDim]);  // [E, r, in]
}

/** Inverse of {@link expertFactorA}: [E, r, in] back to PEFT's [r·E, in]. */
export function peftLayoutA(a: Tensor3D): Tensor2D {
  const [E, r, inDim] = a.shape;
  return tf.reshape(a, [E * r, inDim]);  // [r·E, in]
}

/** PEFT's B [out, r·E] as per-expert factors [E, out, r]: column j·E + e is rank j of expert e. */
export function expertFactorB(B: Tensor2D, numExperts: number): Tensor3D {
  const [outDim, cols] = B.shape;
  const b = tf.reshape(B, [outDim, cols / numExperts, numExperts]);  // [out, r, E]
  return tf.transpose(b, [2, 0, 1]) as Tensor3D;                      // [E, out, r]
}

/** Inverse of {@link expertFactorB}: [E, out, r] back to PEFT's [out, r·E]. */
export function peftLayoutB(b: Tensor3D): Tensor2D {
  const [E, outDim, r] = b.shape;
  return tf.reshape(tf.transpose(b, [1, 2, 0]), [outDim, r * E]);  // [out, r·E]
}

/** Several adapters' per-expert factors stacked along the rank axis (R = Σ r_k). */
export interface StackedExpertFactors {
  /** [E, R, in] */
  a: Tensor3D;
  /** [E, out, R], each adapter's block already multiplied by its scaling */
  scaledB: Tensor3D;
  /** r_k per adapter, in order, for splitting per-adapter gradients back out */
  ranks: number[];
}

/**
 * Σ_k s_k·B_k,e·A_k,e = [s_1·B_1,e | s_2·B_2,e | …]·[A_1,e; A_2,e; …], so stacking the factors
 * along the rank axis turns any number of adapters into one product; the scaling goes onto the
 * small B factor, never onto a product of W's size.
 */
export function stackExpertFactors(
    adapters: readonly LoRAFactors[], numExperts: number): StackedExpertFactors {
  const a = tf.concat(adapters.map(f => expertFactorA(f.A, numExperts)), 1);  // [E, R, in]
  const scaledB = tf.concat(
      adapters.map(f => tf.mul(expertFactorB(f.B, numExperts), f.scaling)), 2);  // [E, out, R]
  const ranks = adapters.map(f => f.A.shape[0] / numExperts);
  return { a: a as Tensor3D, scaledB: scaledB as Tensor3D, ranks };
}
