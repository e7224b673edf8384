/**
 * softmax(scores + mask) over the last axis as one op, the composed attention's probabilities: the
 * sum is otherwise a program of its own writing a tensor as large as the scores (67 MB a layer at
 * OLMoE's batch 4 × S 512; with the softmax 2.4 GPU ms a training step on the H100, run X6). A
 * backend may register MoEMaskedSoftmax to read the scores once and write the probabilities once
 * (webgpu); elsewhere tf.softmax(tf.add(scores, mask)) runs. No gradient of its own: the attention
 * op's customGrad differentiates it (softmaxGrad).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor } from '@tensorflow/tfjs-core';

/**
 * MoEMaskedSoftmax: inputs scores (float32, rank ≥ 2, [..., S, L]) and mask (float32, [S, L], or
 * [B, 1, S, L] for scores [B, n, S, L]); output softmax(scores + mask) over the last axis, the
 * mask broadcast as tf.add broadcasts it.
 */
export const MASKED_SOFTMAX = 'MoEMaskedSoftmax';

/**
 * softmax(scores + mask) over the last axis. Internal (no argument checks beyond tfjs's): the caller
 * (scaledDotProductAttention) passes a mask of [S, L] or [B, 1, S, L] for scores [B, n, S, L].
 *
 * ```js
 * const p = maskedSoftmax(scores, causalMask);  // [Nkv, rep, S, L] with [S, L]
 * ```
 */
export function maskedSoftmax<T extends Tensor>(scores: T, mask: Tensor): T {
  if (tf.getKernel(MASKED_SOFTMAX, tf.getBackend()) != null) {
    return tf.engine().runKernel(MASKED_SOFTMAX, { scores, mask }, {}) as T;
  }
  return tf.tidy(() => tf.softmax(tf.add(scores, mask)) as T);
}
