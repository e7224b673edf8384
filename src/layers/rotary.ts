/**
 * Rotary position embeddings, the default ("rope_type": "default") kind: rotate-half pairs
 * (i, i + D/2) by the angle position · theta^(−2i/D).
 */
import * as tf from '@tensorflow/tfjs-core';
import { assertFiniteNumber, assertInteger, fail } from '../ops/validate.js';

/**
 * cos and sin tables [S, D] for positions first..first+S−1 (first 0 unless given: a generation
 * step's new tokens come after the cached ones), computed in float64 and rounded once.
 *
 * ```js
 * const {cos, sin} = rotaryTables(11, 16, 10000);  // each [11, 16]
 * ```
 */
export function rotaryTables(seqLen: number, headDim: number, theta: number, first = 0): { cos: tf.Tensor2D; sin: tf.Tensor2D } {
  const op = 'rotaryTables';
  assertInteger(op, 'seqLen', seqLen, 1);
  assertInteger(op, 'headDim', headDim, 2);
  if (headDim % 2 !== 0) fail(op, `'headDim' must be even but got ${headDim}`);
  assertFiniteNumber(op, 'theta', theta);
  if (theta <= 0) fail(op, `'theta' must be > 0 but got ${theta}`);
  assertInteger(op, 'first', first, 0);
  const half = headDim / 2;
  const cos = new Float32Array(seqLen * headDim);
  const sin = new Float32Array(seqLen * headDim);
  for (let i = 0; i < half; i++) {
    const invFreq = 1 / Math.pow(theta, (2 * i) / headDim);
    for (let p = 0; p < seqLen; p++) {
      const angle = (first + p) * invFreq;
      const c = Math.cos(angle);
      const s = Math.sin(angle);
      cos[p * headDim + i] = c; cos[p * headDim + i + half] = c;
      sin[p * headDim + i] = s; sin[p * headDim + i + half] = s;
    }
  }
  return { cos: tf.tensor2d(cos, [seqLen, headDim]), sin: tf.tensor2d(sin, [seqLen, headDim]) };
}

/** (x1, x2) → (−x2, x1) on the halves of the last axis. */
function rotateHalf(x: tf.Tensor3D): tf.Tensor3D {
  const half = x.shape[2] / 2;
  const [x1, x2] = tf.split(x, [half, half], 2);
  return tf.concat([tf.neg(x2), x1], 2) as tf.Tensor3D;
}

/**
 * x · cos + rotateHalf(x) · sin for x [N, S, D] (heads folded into N) and tables [S, D].
 *
 * ```js
 * const q = applyRotary(q3d, cos, sin);  // [N, S, D]
 * ```
 */
export function applyRotary(x: tf.Tensor3D, cos: tf.Tensor2D, sin: tf.Tensor2D): tf.Tensor3D {
  return tf.tidy(() => tf.add(tf.mul(x, cos), tf.mul(rotateHalf(x), sin)) as tf.Tensor3D);
}
