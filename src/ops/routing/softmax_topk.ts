/** Softmax → top-k routing: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE. */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor2D } from '@tensorflow/tfjs-core';
import type { Routing } from '../types.js';
import {
  checkBoolean, checkLogits, checkOptions, checkTopK, selectExperts, selectedScoreWeights,
  tidyRouting, topKIndices,
} from './common.js';

export interface SoftmaxTopKOptions {
  /** divide the K probabilities by their sum (Mixtral, Qwen3-MoE); false for Qwen2-MoE's
   * norm_topk_prob false and OLMoE. Default true. */
  renormalize?: boolean;
}

/**
 * Routes each token to the K experts with the largest softmax probability:
 * p = softmax(logits), experts = top-k of p, weights = p at those experts, divided by their sum
 * when `renormalize` (no epsilon, as in transformers' Mixtral and Qwen3-MoE routers).
 *
 * Gradients reach the logits through the K chosen probabilities only; the selection gets none.
 * `experts` are in descending order of p. `logits` in the result is the input tensor itself: the
 * result takes it over, and disposing its three tensors frees everything.
 *
 * ```js
 * const logits = tf.tensor2d([[2, 0, 1, -1]]);
 * const {weights, experts} = routeSoftmaxTopK(logits, 2);
 * experts.print();  // [[0, 2]]
 * weights.print();  // [[0.731, 0.269]]
 * ```
 *
 * @param logits router logits [T, E] float32
 * @param k experts per token, 1..E
 */
export function routeSoftmaxTopK(
    logits: Tensor2D, k: number, options: SoftmaxTopKOptions = {}): Routing {
  const op = 'routeSoftmaxTopK';
  checkLogits(op, logits);
  checkOptions(op, options);
  checkTopK(op, k, logits.shape[1]);
  const renormalize = checkBoolean(op, 'renormalize', options.renormalize, true);
  return tidyRouting(logits, () => {
    const experts = selectExperts(logits, x => topKIndices(tf.softmax(x) as Tensor2D, k));    // [T, K]
    const weights = selectedScoreWeights(
        logits, experts, 'softmax', { renormalize, epsilon: 0, scalingFactor: 1 });            // [T, K]
    return { weights, experts };
  });
}
