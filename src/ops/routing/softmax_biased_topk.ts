/** Softmax scores with a correction bias for the selection only: ERNIE-4.5-MoE. */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Tensor, Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import type { Routing } from '../types.js';
import { assertFiniteNumber, fail } from '../validate.js';
import {
  checkCorrectionBias, checkLogits, checkOptions, checkTopK, gatherSelected, gatherSelectedBackward,
  selectExperts, softmaxBackward, tidyRouting, topKIndices,
} from './common.js';

export interface SoftmaxBiasedTopKOptions {
  /** e_score_correction_bias [E] float32 (ERNIE's moe_statics): added to the probabilities for the
   * selection only; it gets no gradient. Default: none. */
  correctionBias?: Tensor1D;
  /** the floor of the weights' divisor (moe_norm_min), > 0. Default 1e-12, ERNIE's. */
  normMin?: number;
}

/**
 * ERNIE-4.5-MoE routing (transformers' Ernie4_5_MoeTopKRouter): p = softmax(logits);
 * experts = top-k of p + correctionBias; weights = p (unbiased) at those experts divided by
 * max(their sum, normMin). Unlike DeepSeek's routing the scores are a softmax and there are no
 * groups and no scaling factor.
 *
 * Gradients reach the logits through the K chosen p only; the selection and the bias get none.
 * Below the floor the divisor is the constant normMin, as torch.clamp's gradient says. `experts`
 * are in descending order of p + correctionBias. `logits` in the result is the input tensor
 * itself: the result takes it over, and disposing its three tensors frees everything.
 *
 * ```js
 * const logits = tf.tensor2d([[2, 0, 1, -1]]);
 * const correctionBias = tf.tensor1d([0, 0, 0, 1]);
 * const r = routeSoftmaxBiasedTopK(logits, 2, {correctionBias});
 * r.experts.print();  // [[3, 0]]: 0.032 + 1 beats 0.644, then 0.644
 * r.weights.print();  // [[0.047, 0.953]]
 * tf.dispose(r);
 * ```
 *
 * @param logits router logits [T, E] float32
 * @param k experts per token, 1..E
 */
export function routeSoftmaxBiasedTopK(
    logits: Tensor2D, k: number, options: SoftmaxBiasedTopKOptions = {}): Routing {
  const op = 'routeSoftmaxBiasedTopK';
  checkLogits(op, logits);
  checkOptions(op, options);
  checkTopK(op, k, logits.shape[1]);
  const { correctionBias, normMin = 1e-12 } = options;
  if (correctionBias !== undefined) checkCorrectionBias(op, correctionBias, logits);
  assertFiniteNumber(op, 'normMin', normMin);
  if (!(normMin > 0)) fail(op, `'normMin' must be > 0 but got ${normMin}`);
  return tidyRouting(logits, () => {
    const experts = selectExperts(logits, x => tf.tidy(() => {
      const p = tf.softmax(x) as Tensor2D;                                                    // [T, E]
      return topKIndices(correctionBias ? tf.add(p, correctionBias) as Tensor2D : p, k);     // [T, K]
    }));
    return { weights: clampedSoftmaxWeights(logits, experts, normMin), experts };             // [T, K]
  });
}

/**
 * w = q / max(Σq, m) with q = softmax(logits) at the chosen experts, as one customGrad:
 * dq = (dy − Σ(dy·w)) / Σq where Σq >= m (torch.clamp passes the gradient there), else dy / m.
 */
function clampedSoftmaxWeights(logits: Tensor2D, experts: Tensor2D, normMin: number): Tensor2D {
  const numExperts = logits.shape[1];
  const weigh = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const [x, save] = args as [Tensor, GradSaveFunc];
    const p = tf.softmax(x) as Tensor2D;                                                      // [T, E]
    const selected = gatherSelected(p, experts);                                              // [T, K]
    save([p, selected, experts]);
    return {
      value: tf.div(selected, tf.maximum(tf.sum(selected, 1, true), normMin)),              // [T, K]
      gradFunc: (dy: Tensor, saved: Tensor[]) => {
        const [probs, sel, chosen] = saved as Tensor2D[];
        const dSel = tf.tidy(() => {
          const sum = tf.sum(sel, 1, true);                                                   // [T, 1]
          const clamped = tf.less(sum, normMin);                                              // [T, 1]
          const denom = tf.maximum(sum, normMin);                                             // [T, 1]
          const w = tf.div(sel, denom);                                                       // [T, K]
          const dyDotW = tf.where(clamped, tf.zerosLike(sum), tf.sum(tf.mul(dy, w), 1, true));
          return tf.div(tf.sub(dy, dyDotW), denom) as Tensor2D;                               // [T, K]
        });
        const dScores = gatherSelectedBackward(dSel, chosen, numExperts);                    // [T, E]
        return softmaxBackward(probs, dScores);
      },
    };
  });
  return weigh(logits) as Tensor2D;
}
