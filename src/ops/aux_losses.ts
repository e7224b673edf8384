/**
 * Router auxiliary losses, plain differentiable ops of the router logits (scalar outputs, so
 * plain autodiff is cheap enough). Add them, scaled by their coefficient, to the training loss.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Scalar, Tensor2D } from '@tensorflow/tfjs-core';
import { indexCounts } from './index_counts.js';
import { assertShape, assertTensor, fail } from './validate.js';

/**
 * The switch-transformer load-balancing loss, as transformers' load_balancing_loss_func without
 * an attention mask: with f[k, e] = fraction of tokens whose k-th choice is expert e and
 * P[e] = mean over tokens of softmax(logits)[e], loss = E · Σ_k Σ_e f[k, e] · P[e].
 * transformers takes its own top-k of softmax(logits); here the experts are passed in (those
 * the routing actually chose, e.g. with DeepSeek's biased selection), so pass `routing.experts`.
 * The gradient reaches the logits through P only. Expert ids outside [0, E) count for nothing.
 *
 * ```js
 * const r = route(logits, {kind: 'softmaxTopK', topK: 2});
 * const aux = loadBalancingLoss(r.logits, r.experts);  // K when perfectly balanced
 * ```
 *
 * @param logits router logits [T, E] float32, T >= 1, E >= 2
 * @param experts chosen experts [T, K] int32
 */
export function loadBalancingLoss(logits: Tensor2D, experts: Tensor2D): Scalar {
  const op = 'loadBalancingLoss';
  checkLogits(op, logits);
  // balancing one expert means nothing
  if (logits.shape[1] < 2) fail(op, `'logits' must have at least 2 experts but got shape [${logits.shape}]`);
  assertTensor(op, 'experts', experts, 2, 'int32');
  assertShape(op, 'experts', experts, [logits.shape[0], null], `logits [T,E] = [${logits.shape}]`);
  const numExperts = logits.shape[1];
  return tf.tidy(() => {
    // not tf.cast(tf.oneHot(...)): its Mean over axis 0 is all zeros on webgpu (index_counts.ts)
    const [T, K] = experts.shape;
    const expertMask = indexCounts(tf.reshape(experts, [T, K, 1]), numExperts);  // [T, K, E]
    const tokensPerExpert = tf.mean(expertMask, 0);                              // [K, E]
    const routerProbPerExpert = tf.mean(tf.softmax(logits), 0);                 // [E]
    return tf.mul(tf.sum(tf.mul(tokensPerExpert, routerProbPerExpert)), numExperts) as Scalar;
  });
}

/**
 * The router z-loss (ST-MoE): mean over tokens of logsumexp(logits)², which keeps the logits
 * small.
 *
 * ```js
 * const z = routerZLoss(logits);  // scalar
 * ```
 *
 * @param logits router logits [T, E] float32, T >= 1
 */
export function routerZLoss(logits: Tensor2D): Scalar {
  checkLogits('routerZLoss', logits);
  return tf.tidy(() => tf.mean(tf.square(tf.logSumExp(logits, 1))) as Scalar);
}

function checkLogits(op: string, logits: unknown): asserts logits is Tensor2D {
  assertTensor(op, 'logits', logits, 2);
  // a mean over no tokens (or no experts) is NaN: refuse it here instead
  if (logits.shape[0]! < 1 || logits.shape[1]! < 1) {
    fail(op, `'logits' must have at least one token and one expert but got shape [${logits.shape}]`);
  }
}
