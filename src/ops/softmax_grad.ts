/**
 * The gradient of a softmax over the last axis from its output p and the gradient dP of its
 * output: dS = p ⊙ (dP − Σ_j dP ⊙ p), as one op. Composed, it is four kernels over the whole
 * [..., L] tensor (a product, a sum over L, a difference, a product), each reading or writing a
 * tensor as large as p: in the composed attention at OLMoE's batch 4 × S 512 that is 67 MB each,
 * 4.4 GPU ms a training step on the H100 (run X6). A backend may register MoESoftmaxGrad to read p
 * and dP once and write dS once (webgpu); elsewhere the composed ops run.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor } from '@tensorflow/tfjs-core';

/**
 * MoESoftmaxGrad: inputs p and dP, float32, the same shape (rank ≥ 1, last axis L); output
 * p ⊙ (dP − Σ_j dP ⊙ p) over the last axis.
 */
export const SOFTMAX_GRAD = 'MoESoftmaxGrad';

/**
 * softmax's input gradient over the last axis, given its output `p` and the gradient `dP` of that
 * output. Internal (no argument checks beyond tfjs's): the caller passes two tensors of one shape.
 *
 * ```js
 * const dS = softmaxGrad(p, dP);  // both [Nkv, rep·S, L]
 * ```
 */
export function softmaxGrad<T extends Tensor>(p: T, dP: T): T {
  if (tf.getKernel(SOFTMAX_GRAD, tf.getBackend()) != null) {
    return tf.engine().runKernel(SOFTMAX_GRAD, { p, dP }, {}) as T;
  }
  return tf.tidy(() => tf.mul(p, tf.sub(dP, tf.sum(tf.mul(dP, p), -1, true))) as T);
}
