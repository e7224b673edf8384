/**
 * The language-modelling loss over a vocabulary's logits as one op with its own gradient, so that
 * a training step holds a few tensors of the logits' size, not the dozen that composing
 * logSoftmax, a one-hot product and their gradients leaves on the tape: with a real tokenizer
 * (Qwen3: 151,669 tokens) the logits [B·S, V] are the largest tensors of a step.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Scalar, Tensor, Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import { assertInteger, assertShape, assertTensor } from './validate.js';

/**
 * Σ_n −log softmax(logits[n])[labels[n]] over the rows whose label is ≥ 0, divided by
 * `normalizer`; a negative label (PyTorch's ignore_index, −100) predicts nothing. The gradient
 * w.r.t. the logits is (softmax(logits[n]) − onehot(labels[n])) · dy / normalizer on counted rows,
 * 0 on the others; labels get none. Labels must be < V (checked by the caller on host backends).
 *
 * ```js
 * const loss = tokenCrossEntropy(logits2d, labels1d, countedLabels);  // the mean over counted rows
 * ```
 */
export function tokenCrossEntropy(logits: Tensor2D, labels: Tensor1D, normalizer: number): Scalar {
  const op = 'tokenCrossEntropy';
  assertTensor(op, 'logits', logits, 2, 'float32');
  assertTensor(op, 'labels', labels, 1, 'int32');
  assertShape(op, 'labels', labels, [logits.shape[0]], `logits [N,V] = [${logits.shape}]`);
  assertInteger(op, 'normalizer', normalizer, 1);
  const [n, v] = logits.shape;
  // labels are data, not a trainable input: captured here, they get no gradient
  const loss = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const x2 = args[0] as Tensor2D;
    const save = args[1] as GradSaveFunc;
    const counted = tf.cast(tf.greaterEqual(labels, 0), 'float32') as Tensor1D;  // [N]
    const safe = tf.maximum(labels, tf.scalar(0, 'int32')) as Tensor1D;          // [N]
    const lse = tf.tidy(() => {
      const max = tf.max(x2, 1, true);                                          // [N, 1]
      return tf.add(tf.log(tf.sum(tf.exp(tf.sub(x2, max)), 1)), tf.reshape(max, [n]));  // [N]
    });
    save([x2, lse, counted, safe]);
    const value = tf.tidy(() => {
      // the picked logits by a flat gather: no [N, V] one-hot in the forward pass
      const rows = tf.mul(tf.range(0, n, 1, 'int32'), tf.scalar(v, 'int32'));
      const picked = tf.gather(tf.reshape(x2, [n * v]), tf.add(rows, safe));  // [N]
      return tf.div(tf.sum(tf.mul(tf.sub(lse, picked), counted)), normalizer) as Scalar;
    });
    return {
      value,
      gradFunc: (dy: Tensor, saved: Tensor[]) => {
        const [xs, lses, counted, safe] = saved as [Tensor2D, Tensor1D, Tensor1D, Tensor1D];
        const scale = tf.tidy(() => tf.reshape(tf.mul(tf.div(counted, normalizer), dy), [n, 1]));  // [N, 1]
        // one [N, V] temporary at a time, each freed as soon as the next exists
        const shifted = tf.sub(xs, tf.reshape(lses, [n, 1]));
        const probs = tf.exp(shifted);
        shifted.dispose();
        const scaled = tf.mul(probs, scale);
        probs.dispose();
        // the one-hot term scattered in place: no [N, V] one-hot (tfjs-wasm's OneHot writes int32
        // bits whatever its dtype, so a float one-hot is not an option there anyway)
        const targetScaled = tf.tidy(() => tf.scatterND(
            tf.stack([tf.range(0, n, 1, 'int32'), safe], 1), tf.reshape(scale, [n]), [n, v]));
        const grad = tf.sub(scaled, targetScaled);
        tf.dispose([scaled, targetScaled, scale]);
        return [grad];
      },
    };
  });
  return loss(logits);
}
