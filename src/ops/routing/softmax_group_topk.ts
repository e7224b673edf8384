/** Softmax scores with group-limited top-k (sum of the top two per group): Mistral4. */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor2D } from '@tensorflow/tfjs-core';
import type { Routing } from '../types.js';
import {
  checkBoolean, checkGroups, checkLogits, checkOptions, checkScalingFactor, checkTopK,
  maskToTopGroups, selectExperts, selectedScoreWeights, tidyRouting, topKIndices,
} from './common.js';

export interface SoftmaxGroupTopKOptions {
  /** expert groups (n_group), must divide E. Default 1. */
  nGroup?: number;
  /** groups kept per token (topk_group), 1..nGroup. Default 1. */
  topkGroup?: number;
  /** divide the K weights by (their sum + 1e-20) (norm_topk_prob). Default true. */
  renormalize?: boolean;
  /** routed_scaling_factor, multiplies the final weights. Default 1. */
  scalingFactor?: number;
}

/**
 * Mistral4 routing, after transformers' Mistral4MoE.route_tokens_to_experts
 * (models/mistral4/modular_mistral4.py): p = softmax(logits); a group's score is the sum of its
 * two largest p (its only p if the group has one expert; transformers' topk(2) would fail
 * there); the `topkGroup` best groups are kept and p of the other experts is set to 0.0;
 * experts = top-k of the masked p; weights = p at those experts, divided by (sum + 1e-20) if
 * `renormalize`, times `scalingFactor`. There is no correction bias.
 *
 * Gradients reach the logits through the K chosen p only; the selection gets none. `experts`
 * are in descending order of p (transformers leaves their order unspecified, sorted=False).
 * `logits` in the result is the input tensor itself: the result takes it over, and
 * disposing its three tensors frees everything.
 *
 * ```js
 * const logits = tf.randomNormal([4, 16]);
 * const r = routeSoftmaxGroupTopK(logits, 4, {nGroup: 4, topkGroup: 2});
 * r.weights.sum(1).print();  // [1, 1, 1, 1]
 * tf.dispose(r);
 * ```
 *
 * @param logits router logits [T, E] float32
 * @param k experts per token, at most topkGroup·E/nGroup
 */
export function routeSoftmaxGroupTopK(
    logits: Tensor2D, k: number, options: SoftmaxGroupTopKOptions = {}): Routing {
  const op = 'routeSoftmaxGroupTopK';
  checkLogits(op, logits);
  checkOptions(op, options);
  const numExperts = logits.shape[1];
  checkTopK(op, k, numExperts);
  const { nGroup = 1, topkGroup = 1 } = options;
  checkGroups(op, nGroup, topkGroup, numExperts, k);
  const renormalize = checkBoolean(op, 'renormalize', options.renormalize, true);
  const scalingFactor = checkScalingFactor(op, options.scalingFactor);
  return tidyRouting(logits, () => {
    const experts = selectExperts(logits, x => tf.tidy(() => {
      const probs = tf.softmax(x) as Tensor2D;                                             // [T, E]
      return topKIndices(maskToTopGroups(probs, nGroup, topkGroup, 'sumOfTop2'), k);     // [T, K]
    }));
    const weights = selectedScoreWeights(
        logits, experts, 'softmax', { renormalize, epsilon: 1e-20, scalingFactor });      // [T, K]
    return { weights, experts };
  });
}
