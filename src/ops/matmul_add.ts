/**
 * a·b + c as one kernel where a backend has one: the sum that follows a product (a LoRA branch
 * added to the base projection, a gradient added to another) is otherwise a program of its own,
 * and on webgpu each program costs the host more than the GPU (issue 15). Elsewhere matMul then add.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor2D } from '@tensorflow/tfjs-core';

/**
 * MoEMatMulAdd: inputs a [M, K] (or [K, M] with transposeA), b [K, N] (or [N, K] with transposeB)
 * and addend [M, N], float32; attrs transposeA, transposeB; output a·b + addend, the product
 * rounded as tf.matMul rounds it and then the one sum.
 */
export const MATMUL_ADD = 'MoEMatMulAdd';

/**
 * matMul(a, b, transposeA, transposeB) + addend, in one kernel where MoEMatMulAdd is registered.
 * Internal (no argument checks beyond tfjs's): the callers pass shapes they built.
 *
 * ```js
 * const y = matMulAdd(down, B, false, true, base);  // down [N, r], B [out, r], base [N, out]
 * ```
 */
export function matMulAdd(a: Tensor2D, b: Tensor2D, transposeA: boolean, transposeB: boolean, addend: Tensor2D): Tensor2D {
  if (tf.getKernel(MATMUL_ADD, tf.getBackend()) != null) {
    return tf.engine().runKernel(MATMUL_ADD, { a, b, addend }, { transposeA, transposeB }) as Tensor2D;
  }
  return tf.tidy(() => tf.add(tf.matMul(a, b, transposeA, transposeB), addend));
}
