/** Top-k → softmax routing: gpt-oss. */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Tensor, Tensor2D } from '@tensorflow/tfjs-core';
import type { Routing } from '../types.js';
import {
  checkLogits, checkTopK, gatherSelected, gatherSelectedBackward, selectExperts, softmaxBackward,
  tidyRouting, topKIndices,
} from './common.js';

/**
 * Routes each token to the K experts with the largest logits, weighted by a softmax over those
 * K logits only (gpt-oss; its router bias is expected to be in the logits already).
 *
 * Gradients reach the logits of the K chosen experts only; the selection gets none. `experts`
 * are in descending order of the logits. `logits` in the result is the input tensor itself: the
 * result takes it over, and disposing its three tensors frees everything.
 *
 * ```js
 * const logits = tf.tensor2d([[2, 0, 1, -1]]);
 * const {weights, experts} = routeTopKSoftmax(logits, 2);
 * experts.print();  // [[0, 2]]
 * weights.print();  // [[0.731, 0.269]]
 * ```
 *
 * @param logits router logits [T, E] float32
 * @param k experts per token, 1..E
 */
export function routeTopKSoftmax(logits: Tensor2D, k: number): Routing {
  const op = 'routeTopKSoftmax';
  checkLogits(op, logits);
  checkTopK(op, k, logits.shape[1]);
  return tidyRouting(logits, () => {
    const experts = selectExperts(logits, x => topKIndices(x, k));     // [T, K]
    const weights = softmaxOfSelected(logits, experts);                  // [T, K]
    return { weights, experts };
  });
}

/** softmax over the chosen logits, as one customGrad of all logits. */
function softmaxOfSelected(logits: Tensor2D, experts: Tensor2D): Tensor2D {
  const numExperts = logits.shape[1];
  const weigh = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const [x, save] = args as [Tensor, GradSaveFunc];
    const w = tf.softmax(gatherSelected(x as Tensor2D, experts)) as Tensor2D;    // [T, K]
    save([w, experts]);
    return {
      value: w,
      gradFunc: (dy: Tensor, saved: Tensor[]) => {
        const [weights, chosen] = saved as Tensor2D[];
        const dSel = softmaxBackward(weights, dy as Tensor2D);                   // [T, K]
        return gatherSelectedBackward(dSel, chosen, numExperts);                 // [T, E]
      },
    };
  });
  return weigh(logits) as Tensor2D;
}
