/** The language-modelling loss: mean cross-entropy of each next token given the ones before it. */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { assertTokenIds } from '../layers/embedding.js';
import { assertTensor, fail } from '../ops/validate.js';

/** @internal V, the last dimension of the model's logits. */
export function vocabSizeOf(model: tfl.LayersModel): number {
  const v = model.outputs[0]?.shape[2];
  if (typeof v !== 'number') fail('vocabSizeOf', `the model '${model.name}' must output logits [batch, seq, vocab] but outputs shape ${JSON.stringify(model.outputs[0]?.shape ?? null)}`);
  return v;
}

/**
 * Mean over the batch and the positions of −log p(ids[:, t+1] | ids[:, ..t]), from one forward
 * pass of the model on ids[:, :S]. `windows` holds S + 1 tokens per row.
 *
 * ```js
 * const windows = tf.tensor2d([[5, 1, 7, 2]], [1, 4], 'int32');
 * const loss = nextTokenLoss(model, windows);  // scalar, the mean over the 3 predicted tokens
 * ```
 */
export function nextTokenLoss(model: tfl.LayersModel, windows: tf.Tensor2D, training = true): tf.Scalar {
  const op = 'nextTokenLoss';
  assertTensor(op, 'windows', windows, 2, 'int32');
  const [b, s1] = windows.shape;
  if (s1 < 2) fail(op, `'windows' must hold at least 2 tokens per row (inputs and their next tokens) but got shape [${windows.shape}]`);
  // the targets too: an out-of-range target would be a zero one-hot row, a silently wrong loss
  assertTokenIds(op, 'windows', windows, vocabSizeOf(model));
  return tf.tidy(() => {
    const s = s1 - 1;
    const inputs = tf.slice(windows, [0, 0], [b, s]);                             // [B, S]
    const targets = tf.reshape(tf.slice(windows, [0, 1], [b, s]), [b * s]);       // [B·S]
    const logits = model.apply(inputs, { training }) as tf.Tensor3D;              // [B, S, V]
    const v = logits.shape[2];
    const logp = tf.logSoftmax(tf.reshape(logits, [b * s, v]));                  // [B·S, V]
    // a one-hot product, not a gather: its gradient needs no UnsortedSegmentSum on any backend
    const picked = tf.sum(tf.mul(logp, tf.oneHot(targets as tf.Tensor1D, v)), 1);  // [B·S]
    return tf.neg(tf.mean(picked)) as tf.Scalar;
  });
}
