/**
 * s·(a·b) as one kernel where a backend has one: LoRA's rank-sized products are scaled by the
 * adapter's s (forward s·(x·Aᵀ), backward s·(dy·B)), and the scale is otherwise a program of its
 * own after each product; on webgpu each program costs the host more than the GPU (issue 15).
 * Elsewhere matMul then mul, as before.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Scalar, Tensor2D } from '@tensorflow/tfjs-core';

/**
 * MoEScaledMatMul: inputs a [M, K] and b [K, N] (or [N, K] with transposeB), float32; attrs
 * transposeB, scale (a finite number); output scale·(a·b), the product summed in float32 and
 * then scaled once.
 */
export const SCALED_MATMUL = 'MoEScaledMatMul';

/** MoEScaledMatMul's attributes. */
export interface ScaledMatMulAttrs {
  transposeB: boolean;
  scale: number;
}

/**
 * scale·matMul(a, b, false, transposeB), in one kernel where MoEScaledMatMul is registered.
 * `scaleOperand` is what the composed path multiplies by (a pass's shared scalar, passScalar, or
 * the number); it must hold `scale`. Internal (no argument checks beyond tfjs's): the callers pass
 * shapes they built.
 *
 * ```js
 * const down = scaledMatMul(x, A, true, 2);  // x [N, in], A [r, in] → 2·x·Aᵀ [N, r]
 * ```
 */
export function scaledMatMul(a: Tensor2D, b: Tensor2D, transposeB: boolean, scale: number,
    scaleOperand: number | Scalar = scale): Tensor2D {
  if (tf.getKernel(SCALED_MATMUL, tf.getBackend()) != null) {
    return tf.engine().runKernel(SCALED_MATMUL, { a, b }, { transposeB, scale }) as Tensor2D;
  }
  return tf.tidy(() => tf.mul(tf.matMul(a, b, false, transposeB), scaleOperand) as Tensor2D);
}
