/**
 * tokenCrossEntropy against float64: the loss over counted rows, its gradient
 * (softmax − one-hot on counted rows, 0 on ignored ones), no gradient to the labels, no tensors
 * left behind, and the peak memory of a backward pass a few logits-sized tensors, not a dozen.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { tokenCrossEntropy } from '../../src/ops/token_cross_entropy.js';
import { expectNoLeak } from '../helpers/numeric.js';

/** float64: the loss and d loss / d logits. */
function reference(logits: number[][], labels: number[], normalizer: number): { loss: number; grad: number[][] } {
  let loss = 0;
  const grad = logits.map((row, n) => {
    if (labels[n] < 0) return row.map(() => 0);
    const max = Math.max(...row);
    const sum = row.reduce((s, v) => s + Math.exp(v - max), 0);
    loss += Math.log(sum) + max - row[labels[n]];
    return row.map((v, j) => (Math.exp(v - max) / sum - (j === labels[n] ? 1 : 0)) / normalizer);
  });
  return { loss: loss / normalizer, grad };
}

describe('ops/tokenCrossEntropy', () => {
  it('equals float64 in value and gradient; ignored rows (negative labels) count for nothing', () => {
    const values = Array.from({ length: 5 }, (_, n) => Array.from({ length: 9 }, (_, j) => Math.sin(3 * n + j) * 4));
    const labels = [2, -100, 8, 0, -100];
    const want = reference(values, labels, 7);
    const logits = tf.tensor2d(values);
    const ids = tf.tensor1d(labels, 'int32');
    expectNoLeak(() => {
      const { value, grads } = tf.valueAndGrads((x: tf.Tensor) => tokenCrossEntropy(x as tf.Tensor2D, ids, 7))([logits]);
      expect(Math.abs(value.dataSync()[0] - want.loss)).to.be.below(1e-5);
      const got = grads[0].arraySync() as number[][];
      got.forEach((row, n) => row.forEach((g, j) => expect(Math.abs(g - want.grad[n][j]), `[${n}, ${j}]`).to.be.below(1e-6)));
      tf.dispose([value, ...grads]);
    });
    tf.dispose([logits, ids]);
  });

  it('a backward pass peaks at a few tensors of the logits\' size', async () => {
    const [n, v] = [64, 20000];
    const logits = tf.randomNormal([n, v], 0, 1, 'float32', 5) as tf.Tensor2D;
    const ids = tf.tensor1d(Array.from({ length: n }, (_, i) => (i * 331) % v), 'int32');
    const base = tf.memory().numBytes;
    const info = await tf.profile(() => {
      const { value, grads } = tf.valueAndGrads((x: tf.Tensor) => tokenCrossEntropy(x as tf.Tensor2D, ids, n))([logits]);
      tf.dispose([value, ...grads]);
    });
    // measured 4.0 (the saved logits, two temporaries, the gradient); the composed logSoftmax × one-hot loss: 11.0
    expect((info.peakBytes - base) / (n * v * 4)).to.be.below(4.5);
    tf.dispose([logits, ids]);
  });

  it('refuses labels of another length, float labels and a normalizer below 1', () => {
    const logits = tf.zeros([2, 3]) as tf.Tensor2D;
    const three = tf.tensor1d([0, 1, 2], 'int32');
    const floats = tf.tensor1d([0, 1]);
    expect(() => tokenCrossEntropy(logits, three, 1)).to.throw(/`tokenCrossEntropy\(\)`: 'labels' must have shape \[2\]/);
    expect(() => tokenCrossEntropy(logits, floats as tf.Tensor1D, 1)).to.throw("`tokenCrossEntropy()`: 'labels' must be int32 but got float32 (shape [2])");
    expect(() => tokenCrossEntropy(logits, tf.tensor1d([0, 1], 'int32'), 0)).to.throw("`tokenCrossEntropy()`: 'normalizer' must be >= 1 but got 0");
    tf.dispose([logits, three, floats]);
  });
});
