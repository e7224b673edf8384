/**
 * The attention core softmax(q·kᵀ·scale + mask)·v as one op with its own gradient. Composed on
 * tfjs's tape, each of its kernels saves its inputs (an Identity kernel each) and the grouped-KV
 * repeat's Tile has a slice and an add per repeat for gradient; on webgpu a training step is bound
 * by the host recording kernels, not by the GPU. Here the forward pass runs five kernels with the
 * tape off (plus Reshapes, no GPU work, with grouped heads or a per-sample mask) and the backward the
 * closed-form gradient in nine.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Tensor, Tensor2D, Tensor3D, Tensor4D } from '@tensorflow/tfjs-core';
import { describeValue } from '../util/describe.js';
import { assertFiniteNumber, assertTensor, fail } from './validate.js';

/**
 * softmax(q·kᵀ·scale + mask)·v per query head, with grouped KV heads read in place: query head n
 * of q [Nq, S, Dk] attends KV head floor(n / rep) of k [Nkv, L, Dk] and v [Nkv, L, Dv], rep =
 * Nq / Nkv (heads batch-major, B·nh and B·nkv: each KV head's rep query heads are adjacent, so
 * the group is one product of rep·S rows, no repeated keys). `mask` is additive: [S, L], shared
 * by every head, or [B, 1, S, L] per sample (packed segments); a blocked entry is a large negative
 * number (−1e9, see attentionMask) and gets exactly 0 probability. The mask is a constant: it gets
 * no gradient; q, k and v do (dK and dV summed over each group). Returns [Nq, S, Dv].
 *
 * ```js
 * // 4 query heads on 2 KV heads, 3 positions, causal
 * const o = scaledDotProductAttention(q, k, v, causalMask(3, null), 1 / Math.sqrt(dk));  // [4, 3, Dv]
 * ```
 */
export function scaledDotProductAttention(q: Tensor3D, k: Tensor3D, v: Tensor3D, mask: Tensor2D | Tensor4D,
    scale: number): Tensor3D {
  const op = 'scaledDotProductAttention';
  assertTensor(op, 'q', q, 3);
  assertTensor(op, 'k', k, 3);
  assertTensor(op, 'v', v, 3);
  const [nq, s, dk] = q.shape;
  const [nkv, keyLen] = k.shape;
  const dv = v.shape[2];
  const shapes = `q [${q.shape}], k [${k.shape}], v [${v.shape}]`;
  if (k.shape[2] !== dk) fail(op, `'k' must have q's head width ${dk} in its last axis but got [${k.shape}] (${shapes})`);
  if (v.shape[0] !== nkv || v.shape[1] !== keyLen) {
    fail(op, `'v' must be [${nkv},${keyLen},*] like k's heads and keys but got [${v.shape}] (${shapes})`);
  }
  if (nq % nkv !== 0) fail(op, `k's ${nkv} heads must divide q's ${nq} heads (${shapes})`);
  if (!(mask instanceof tf.Tensor) || (mask.rank !== 2 && mask.rank !== 4)) {
    fail(op, `'mask' must be a 2-D [S, L] or 4-D [B, 1, S, L] float32 tensor but got ${describeValue(mask)}`);
  }
  assertTensor(op, 'mask', mask, mask.rank);
  const batch = mask.rank === 4 ? mask.shape[0] : 1;
  const maskShape = mask.rank === 2 ? [s, keyLen] : [batch, 1, s, keyLen];
  if (mask.shape.some((d, i) => d !== maskShape[i]) || nkv % batch !== 0) {
    fail(op, `'mask' must be [S, L] = [${s},${keyLen}] or [B, 1, S, L] with B dividing k's ${nkv} heads but got [${mask.shape}] (${shapes})`);
  }
  assertFiniteNumber(op, 'scale', scale);
  if (!(scale > 0)) fail(op, `'scale' must be > 0 but got ${scale}`);
  const rep = nq / nkv;
  const rows = rep * s;                     // a KV head's query rows: its rep heads' S positions
  // the mask's view of the scores: [Nkv, rep, S, L] for a shared mask, [B, nh, S, L] per sample
  const maskedShape = mask.rank === 2 ? [nkv, rep, s, keyLen] : [batch, nq / batch, s, keyLen];
  const needsView = rep > 1 || mask.rank === 4;
  // with rep 1 the grouped shapes are the given ones: no Reshape kernels (each costs host time)
  const grouped = <T extends Tensor>(t: Tensor, shape: number[]) => (rep > 1 ? tf.reshape(t, shape) : t) as T;
  // the mask is data, not a trainable input: captured here, it gets no gradient
  const attend = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const [q3, k3, v3] = args as Tensor3D[];
    const save = args[3] as GradSaveFunc;
    const scaledQ = grouped<Tensor3D>(tf.mul(q3, scale), [nkv, rows, dk]);       // [Nkv, rep·S, Dk]
    const probs = tf.tidy(() => {
      const scores = tf.matMul(scaledQ, k3, false, true);                          // [Nkv, rep·S, L]
      if (!needsView) return tf.softmax(tf.add(scores, mask)) as Tensor3D;
      return tf.reshape(tf.softmax(tf.add(tf.reshape(scores, maskedShape), mask)), [nkv, rows, keyLen]) as Tensor3D;
    });
    save([scaledQ, k3, v3, probs]);
    const value = tf.tidy(() => grouped<Tensor3D>(tf.matMul(probs, v3), [nq, s, dv]));
    return {
      value,
      gradFunc: (dy: Tensor, saved: Tensor[]) => tf.tidy(() => {
        const [qs, ks, vs, p] = saved as Tensor3D[];
        const dO = grouped<Tensor3D>(dy, [nkv, rows, dv]);
        const dV = tf.matMul(p, dO, true, false);                                 // [Nkv, L, Dv]
        const dP = tf.matMul(dO, vs, false, true);                                // [Nkv, rep·S, L]
        // softmax's gradient: dS = P ⊙ (dP − Σ_j dP ⊙ P); blocked keys have P = 0 and get 0
        const dS = tf.mul(p, tf.sub(dP, tf.sum(tf.mul(dP, p), 2, true)));
        const dQ = grouped(tf.mul(tf.matMul(dS, ks), scale), [nq, s, dk]);        // [Nq, S, Dk]
        const dK = tf.matMul(dS, qs, true, false);                                // [Nkv, L, Dk], q already scaled
        return [dQ, dK, dV];
      }),
    };
  });
  return attend(q, k, v) as Tensor3D;
}
