/** Top-k → sigmoid routing: Llama 4. */
import type { Tensor2D } from '@tensorflow/tfjs-core';
import type { Routing } from '../types.js';
import { checkLogits, checkTopK, selectExperts, selectedScoreWeights, tidyRouting, topKIndices } from './common.js';

/**
 * Routes each token to the K experts with the largest logits, each weighted by the sigmoid of
 * its own logit: no softmax, no renormalization, no scaling (transformers' Llama4Router: top-k of
 * the logits, sigmoid of the kept ones, the others -inf → 0). Llama 4 multiplies the expert's
 * input by this weight, not its output: see `MoEBlockConfig.weightedInput`.
 *
 * Gradients reach the logits of the K chosen experts only (σ'(z) = σ(1 − σ)); the selection
 * gets none. `experts` are in descending order of the logits. `logits` in the result is the
 * input tensor itself: the result takes it over, and disposing its three tensors frees everything.
 *
 * ```js
 * const logits = tf.tensor2d([[2, 0, 1, -1]]);
 * const {weights, experts} = routeTopKSigmoid(logits, 1);
 * experts.print();  // [[0]]
 * weights.print();  // [[0.881]]
 * ```
 *
 * @param logits router logits [T, E] float32
 * @param k experts per token, 1..E
 */
export function routeTopKSigmoid(logits: Tensor2D, k: number): Routing {
  const op = 'routeTopKSigmoid';
  checkLogits(op, logits);
  checkTopK(op, k, logits.shape[1]);
  return tidyRouting(logits, () => {
    const experts = selectExperts(logits, x => topKIndices(x, k));                                 // [T, K]
    const weights = selectedScoreWeights(
        logits, experts, 'sigmoid', { renormalize: false, epsilon: 0, scalingFactor: 1 });         // [T, K]
    return { weights, experts };
  });
}
