/** Sigmoid scores with a correction bias and group-limited top-k: DeepSeek-V3, GLM-4.5-MoE. */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import type { Routing } from '../types.js';
import {
  checkBoolean, checkCorrectionBias, checkGroups, checkLogits, checkOptions, checkScalingFactor,
  checkTopK, maskToTopGroups, selectExperts, selectedScoreWeights, tidyRouting, topKIndices,
} from './common.js';

export interface SigmoidGroupTopKOptions {
  /** e_score_correction_bias [E] float32: added to the scores for the selection only; it gets
   * no gradient (it is not an input of the op's gradient). Default: none. */
  correctionBias?: Tensor1D;
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
 * DeepSeek-V3 routing (transformers' DeepseekV3MoE.route_tokens_to_experts):
 * s = sigmoid(logits); c = s + correctionBias; a group's score is the sum of its two largest c
 * (its only c if the group has one expert); the `topkGroup` best groups are kept and c of the
 * other experts is set to exactly 0.0 (so a masked expert can beat a kept one whose c is
 * negative, as in transformers); experts = top-k of the masked c; weights = s (unbiased) at
 * those experts, divided by (sum + 1e-20) if `renormalize`, times `scalingFactor`.
 *
 * Gradients reach the logits through the K chosen s only; the selection and the bias get none.
 * `experts` are in descending order of the masked c. `logits` in the result is the input tensor
 * itself: the result takes it over, and disposing its three tensors frees everything.
 *
 * ```js
 * const logits = tf.randomNormal([4, 16]);
 * const correctionBias = tf.zeros([16]);
 * const r = routeSigmoidGroupTopK(logits, 4,
 *     {correctionBias, nGroup: 4, topkGroup: 2, scalingFactor: 2.5});
 * r.experts.print();  // 4 experts per token, all from 2 of the 4 groups
 * tf.dispose(r);
 * ```
 *
 * @param logits router logits [T, E] float32
 * @param k experts per token, at most topkGroup·E/nGroup
 */
export function routeSigmoidGroupTopK(
    logits: Tensor2D, k: number, options: SigmoidGroupTopKOptions = {}): Routing {
  const op = 'routeSigmoidGroupTopK';
  checkLogits(op, logits);
  checkOptions(op, options);
  const numExperts = logits.shape[1];
  checkTopK(op, k, numExperts);
  const { correctionBias, nGroup = 1, topkGroup = 1 } = options;
  checkGroups(op, nGroup, topkGroup, numExperts, k);
  if (correctionBias !== undefined) checkCorrectionBias(op, correctionBias, logits);
  const renormalize = checkBoolean(op, 'renormalize', options.renormalize, true);
  const scalingFactor = checkScalingFactor(op, options.scalingFactor);
  return tidyRouting(logits, () => {
    const experts = selectExperts(logits, x => tf.tidy(() => {
      const scores = tf.sigmoid(x) as Tensor2D;                                              // [T, E]
      const choice = correctionBias ? tf.add(scores, correctionBias) as Tensor2D : scores;  // [T, E]
      return topKIndices(maskToTopGroups(choice, nGroup, topkGroup, 'sumOfTop2'), k);      // [T, K]
    }));
    const weights = selectedScoreWeights(
        logits, experts, 'sigmoid', { renormalize, epsilon: 1e-20, scalingFactor });        // [T, K]
    return { weights, experts };
  });
}
