/** Softmax scores with group-limited greedy top-k (max per group): DeepSeek-V2. */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor2D } from '@tensorflow/tfjs-core';
import type { Routing } from '../types.js';
import {
  checkGroups, checkLogits, checkOptions, checkScalingFactor, checkTopK, maskToTopGroups,
  selectExperts, selectedScoreWeights, tidyRouting, topKIndices,
} from './common.js';

export interface SoftmaxGroupLimitedGreedyOptions {
  /** expert groups (n_group), must divide E. Default 1 (with topkGroup 1: the 'greedy' method). */
  nGroup?: number;
  /** groups kept per token (topk_group), 1..nGroup. Default 1. */
  topkGroup?: number;
  /** routed_scaling_factor, multiplies the final weights. Default 1. */
  scalingFactor?: number;
}

/**
 * DeepSeek-V2 routing (transformers' DeepseekV2Moe.route_tokens_to_experts, topk_method
 * 'group_limited_greedy'; nGroup = topkGroup = 1 gives 'greedy'): p = softmax(logits); a group's
 * score is its largest p; the `topkGroup` best groups are kept and p of the other experts is set
 * to 0.0; experts = top-k of the masked p; weights = p at those experts times `scalingFactor`,
 * not renormalized. K must not exceed the experts in the kept groups (topkGroup·E/nGroup).
 *
 * Gradients reach the logits through the K chosen p only; the selection gets none. `experts`
 * are in descending order of p. `logits` in the result is the input tensor itself: the result
 * takes it over, and disposing its three tensors frees everything.
 *
 * ```js
 * const logits = tf.randomNormal([4, 16]);
 * const r = routeSoftmaxGroupLimitedGreedy(logits, 4, {nGroup: 4, topkGroup: 2, scalingFactor: 16});
 * r.experts.print();  // 4 experts per token, all from 2 of the 4 groups
 * tf.dispose(r);
 * ```
 *
 * @param logits router logits [T, E] float32
 * @param k experts per token, at most topkGroup·E/nGroup
 */
export function routeSoftmaxGroupLimitedGreedy(
    logits: Tensor2D, k: number, options: SoftmaxGroupLimitedGreedyOptions = {}): Routing {
  const op = 'routeSoftmaxGroupLimitedGreedy';
  checkLogits(op, logits);
  checkOptions(op, options);
  const numExperts = logits.shape[1];
  checkTopK(op, k, numExperts);
  const { nGroup = 1, topkGroup = 1 } = options;
  checkGroups(op, nGroup, topkGroup, numExperts, k);
  const scalingFactor = checkScalingFactor(op, options.scalingFactor);
  return tidyRouting(logits, () => {
    const experts = selectExperts(logits, x => tf.tidy(() => {
      const probs = tf.softmax(x) as Tensor2D;                                       // [T, E]
      return topKIndices(maskToTopGroups(probs, nGroup, topkGroup, 'max'), k);      // [T, K]
    }));
    const weights = selectedScoreWeights(
        logits, experts, 'softmax', { renormalize: false, epsilon: 0, scalingFactor });  // [T, K]
    return { weights, experts };
  });
}
