/**
 * The LM head and the language-modelling loss as one op ("fused linear cross-entropy", as
 * Liger-Kernel's FusedLinearCrossEntropy and Apple's Cut Cross-Entropy): the logits
 * hidden · Wᵀ [N, V] are never held whole. The forward pass computes them chunk by chunk of rows
 * and keeps only each row's log-sum-exp; the backward pass computes each chunk's logits again and
 * turns them at once into that chunk's dHidden (and dW when the head trains). A frozen head under a
 * gradient tape (LoRA training) takes dHidden in the forward pass instead, from the logits it has
 * then (Liger-Kernel's way): the loss is a scalar, so backward only scales that [N, H] by dy, and no
 * chunk's logits are computed twice. With Qwen3's
 * vocabulary (151,936) and 512 tokens the logits are 311 MB, and composing the head and
 * tokenCrossEntropy keeps several of them alive at a step's peak; here the peak is a couple of
 * [chunk, V] buffers.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Scalar, Tensor, Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import { assertInteger, assertShape, assertTensor, fail } from './validate.js';
import { describeValue } from '../util/describe.js';
import {
  assertDenseWeight, denseWeightMatMul, gatherDenseRows, PACKED_DENSE_MATMUL, PackedDenseWeight, unpackDenseWeight,
  type DenseWeightTensor,
} from './packed.js';

/** The most bytes one chunk's float32 logits [chunk, V] take with the default chunk size: 64 MiB. */
export const LOGITS_CHUNK_BYTES = 64 * 2 ** 20;

/**
 * tf.env() flag: the most bytes of one chunk's float32 logits where chunkRows is not given (default
 * LOGITS_CHUNK_BYTES). Larger chunks take fewer, larger products (the head's dHidden = dLogits·W
 * reduces over the vocabulary, and a chunk of few rows leaves most of a big GPU idle) for a higher
 * peak: a couple of chunks' logits are alive at once, and the memory estimate counts them.
 */
export const LOGITS_CHUNK_BYTES_FLAG = 'MOE_LOGITS_CHUNK_BYTES';
tf.env().registerFlag(LOGITS_CHUNK_BYTES_FLAG, () => LOGITS_CHUNK_BYTES);

/** The default chunk: as many rows as keep a chunk's float32 logits within LOGITS_CHUNK_BYTES_FLAG's bytes, at least 1. */
export function defaultChunkRows(vocabSize: number): number {
  const bytes = tf.env().get(LOGITS_CHUNK_BYTES_FLAG);
  if (typeof bytes !== 'number' || !(bytes > 0)) {
    fail('defaultChunkRows', `the tf.env() flag ${LOGITS_CHUNK_BYTES_FLAG} must be a number of bytes > 0 but is ${describeValue(bytes)}`);
  }
  return Math.max(1, Math.floor(bytes / (4 * vocabSize)));
}

/**
 * tf.env() flag: a frozen head under a gradient tape takes dHidden in the forward pass (default
 * true); false recomputes each chunk's logits in the backward pass as a trained head does (A/B runs).
 */
export const GRADIENT_IN_FORWARD_FLAG = 'MOE_LOSS_GRADIENT_IN_FORWARD';
tf.env().registerFlag(GRADIENT_IN_FORWARD_FLAG, () => true);

export interface LinearCrossEntropyOptions {
  /** rows of `hidden` per chunk; default defaultChunkRows(V) (Qwen3's vocabulary: 110 rows) */
  chunkRows?: number;
  /**
   * whether `headWeight` gets a gradient; default: it is a trainable tf.Variable. A frozen head
   * (LoRA training) is a constant of the op: no [V, H] gradient is computed. A packed head
   * (PackedDenseWeight) is always frozen.
   */
  trainHead?: boolean;
}

/**
 * Σ_n −log softmax(hidden[n] · headWeightᵀ)[labels[n]] over the rows whose label is ≥ 0,
 * divided by `normalizer`: `tokenCrossEntropy(matMul(hidden, headWeight, false, true), labels,
 * normalizer)` without the [N, V] logits. A negative label (PyTorch's ignore_index, −100)
 * predicts nothing; labels must be < V (checked by the caller on host backends, as for
 * tokenCrossEntropy). Gradients: hidden, and headWeight when it trains; labels get none.
 * `headWeight` may be a frozen PackedDenseWeight (bf16/f16 halves, denseDtype 'stored'): each
 * chunk reads it in its product where MoEPackedDenseMatMul is registered (webgpu), elsewhere it
 * is decoded once for the forward pass and once for the backward pass, never held between them.
 *
 * ```js
 * const hidden = tf.randomNormal([6, 16]);                  // [N, H]: the final normed hidden states
 * const head = tf.randomNormal([100, 16]);                  // [V, H]: lm_head.weight
 * const labels = tf.tensor1d([3, 7, -100, 0, 99, 5], 'int32');
 * const loss = linearCrossEntropy(hidden, head, labels, 5, {chunkRows: 4});  // the mean over 5 labels
 * ```
 */
export function linearCrossEntropy(
    hidden: Tensor2D, headWeight: DenseWeightTensor, labels: Tensor1D, normalizer: number,
    options: LinearCrossEntropyOptions = {}): Scalar {
  const op = 'linearCrossEntropy';
  assertTensor(op, 'hidden', hidden, 2, 'float32');
  assertDenseWeight(op, 'headWeight', headWeight);
  const [n, h] = hidden.shape;
  const v = headWeight.shape[0];
  if (n === 0) fail(op, `'hidden' must have at least one row but got shape [${hidden.shape}]`);
  assertShape(op, 'headWeight', headWeight as Tensor2D, [null, h], `hidden [N,H] = [${hidden.shape}]`);
  assertTensor(op, 'labels', labels, 1, 'int32');
  assertShape(op, 'labels', labels, [n], `hidden [N,H] = [${hidden.shape}], headWeight [V,H] = [${headWeight.shape}]`);
  assertInteger(op, 'normalizer', normalizer, 1);
  const chunkRows = options.chunkRows ?? defaultChunkRows(v);
  assertInteger(op, 'chunkRows', chunkRows, 1);
  const trainHead = options.trainHead ?? (headWeight instanceof tf.Variable && headWeight.trainable);
  if (typeof trainHead !== 'boolean') fail(op, `'trainHead' must be a boolean but got ${String(trainHead)} (${typeof trainHead})`);
  if (trainHead && headWeight instanceof PackedDenseWeight) {
    fail(op, `'trainHead' must be false for a packed (${headWeight.kind}) 'headWeight': packed weights are frozen`);
  }
  const chunks: Array<[start: number, rows: number]> = [];
  for (let start = 0; start < n; start += chunkRows) chunks.push([start, Math.min(chunkRows, n - start)]);

  // dHidden in the forward pass: only where a gradient is being recorded (evaluation pays nothing)
  // and the head is frozen (a trained head's [V, H] dW would be held from forward to backward)
  const gradientInForward = !trainHead && tf.engine().isTapeOn() && tf.env().getBool(GRADIENT_IN_FORWARD_FLAG);

  // labels are data, not a trainable input: captured here, they get no gradient; a frozen head too
  const loss = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const x = args[0] as Tensor2D;
    const w = trainHead ? args[1] as Tensor2D : headWeight;  // a packed head is never trained
    const save = args[trainHead ? 2 : 1] as GradSaveFunc;
    const counted = tf.cast(tf.greaterEqual(labels, 0), 'float32') as Tensor1D;  // [N]
    const safe = tf.maximum(labels, tf.scalar(0, 'int32')) as Tensor1D;          // [N]
    const { lse, value, dHidden } = linearCrossEntropyForward(x, w, counted, safe, normalizer, chunks, gradientInForward);
    if (dHidden !== undefined) {
      save([dHidden]);
      tf.dispose([lse, counted, safe]);
      return { value, gradFunc: (dy: Tensor, saved: Tensor[]) => [tf.mul(saved[0], dy)] };
    }
    // a frozen head is not saved: a saved clone would be counted as another [V, H] tensor
    save(trainHead ? [x, lse, counted, safe, w as Tensor2D] : [x, lse, counted, safe]);
    return {
      value,
      gradFunc: (dy: Tensor, saved: Tensor[]) => {
        const [xs, lses, counts, targets] = saved as [Tensor2D, Tensor1D, Tensor1D, Tensor1D];
        const ws: DenseWeightTensor = trainHead ? saved[4] as Tensor2D : headWeight;
        const { dHidden, dWeight } = linearCrossEntropyBackward(
            dy, xs, ws, lses, counts, targets, normalizer, chunks, trainHead);
        return trainHead ? [dHidden, dWeight!] : [dHidden];
      },
    };
  });
  return trainHead ? loss(hidden, headWeight as Tensor2D) : loss(hidden);
}

/** The logits of rows start .. start + rows − 1: hidden[rows] · Wᵀ. */
function chunkLogits(hidden: Tensor2D, weight: DenseWeightTensor, start: number, rows: number): Tensor2D {
  return tf.tidy(() => denseWeightMatMul(tf.slice(hidden, [start, 0], [rows, hidden.shape[1]]), weight, true, null));  // [C, V]
}

/**
 * The head as one pass's chunks read it: a packed head decoded once here where no backend kernel
 * reads the halves in the product (else every chunk would decode all of it); `owned` when it is
 * that decoded copy, to be freed at the end of the pass.
 */
function headForPass(weight: DenseWeightTensor): { head: DenseWeightTensor; owned: boolean } {
  if (!(weight instanceof PackedDenseWeight) || tf.getKernel(PACKED_DENSE_MATMUL, tf.getBackend()) != null) {
    return { head: weight, owned: false };
  }
  return { head: unpackDenseWeight(weight), owned: true };
}

/**
 * Per chunk: its logits, their log-sum-exp (max-subtracted) and the target logit; keeps lse [N]
 * only. With `withHiddenGradient`: also dHidden [N, H] of the loss (dy = 1), each chunk's from its
 * softmax exp(shifted) / Σ exp(shifted) while the chunk is at hand.
 */
function linearCrossEntropyForward(
    hidden: Tensor2D, packedOrFloat: DenseWeightTensor, counted: Tensor1D, safe: Tensor1D, normalizer: number,
    chunks: Array<[number, number]>, withHiddenGradient = false): { lse: Tensor1D; value: Scalar; dHidden?: Tensor2D } {
  const v = packedOrFloat.shape[0];
  const { head: weight, owned } = headForPass(packedOrFloat);
  const lses: Tensor1D[] = [];
  const sums: Scalar[] = [];
  const dHiddens: Tensor2D[] = [];
  for (const [start, rows] of chunks) {
    // [C, V] tensors freed as soon as the next exists: at most two at a time
    const logits = chunkLogits(hidden, weight, start, rows);                      // [C, V]
    const max = tf.max(logits, 1, true);                                        // [C, 1]
    const picked = tf.tidy(() => {
      // the target logits by a flat gather: no [C, V] one-hot
      const flat = tf.add(tf.mul(tf.range(0, rows, 1, 'int32'), tf.scalar(v, 'int32')), tf.slice(safe, [start], [rows]));
      return tf.gather(tf.reshape(logits, [rows * v]), flat);                    // [C]
    });
    const shifted = tf.sub(logits, max);                                        // [C, V]
    logits.dispose();
    const exps = tf.exp(shifted);                                               // [C, V]
    shifted.dispose();
    const sumExp = tf.sum(exps, 1, true);                                       // [C, 1]
    const lse = tf.tidy(() => tf.add(tf.log(tf.reshape(sumExp, [rows])), tf.reshape(max, [rows])) as Tensor1D);  // [C]
    if (withHiddenGradient) {
      const scale = chunkGradientScale(counted, null, normalizer, start, rows);
      const scaled = tf.tidy(() => tf.mul(exps, tf.div(scale, sumExp)) as Tensor2D);  // [C, V]: softmax · scale
      dHiddens.push(chunkHiddenGradient(scaled, weight, safe, scale, start, rows));
      tf.dispose([scaled, scale]);
    }
    tf.dispose([exps, sumExp]);
    sums.push(tf.tidy(() => tf.sum(tf.mul(tf.sub(lse, picked), tf.slice(counted, [start], [rows]))) as Scalar));
    tf.dispose([max, picked]);
    lses.push(lse);
  }
  if (owned) (weight as Tensor2D).dispose();
  const lse = (lses.length === 1 ? lses[0] : tf.concat(lses)) as Tensor1D;       // [N]
  const value = tf.tidy(() => tf.div(sums.length === 1 ? sums[0] : tf.addN(sums), normalizer) as Scalar);
  if (lses.length > 1) tf.dispose(lses);
  tf.dispose(sums);
  if (!withHiddenGradient) return { lse, value };
  const dHidden = (dHiddens.length === 1 ? dHiddens[0] : tf.concat(dHiddens)) as Tensor2D;  // [N, H]
  if (dHiddens.length > 1) tf.dispose(dHiddens);
  return { lse, value, dHidden };
}

/**
 * The rows' factor of dLogits = (softmax − onehot) · scale: counted / normalizer · dy, [C, 1]
 * (no dy in the forward pass, where the loss's own gradient, 1, is meant).
 */
function chunkGradientScale(counted: Tensor1D, dy: Tensor | null, normalizer: number, start: number, rows: number): Tensor2D {
  return tf.tidy(() => {
    const perRow = tf.div(tf.slice(counted, [start], [rows]), normalizer);
    return tf.reshape(dy === null ? perRow : tf.mul(perRow, dy), [rows, 1]);
  });
}

/**
 * A chunk's dHidden = dLogits · W from `scaled` = softmax · scale [C, V]: the one-hot term
 * −scale·onehot goes straight into the product as −scale·W[label], with no [C, V] one-hot.
 */
function chunkHiddenGradient(
    scaled: Tensor2D, weight: DenseWeightTensor, safe: Tensor1D, scale: Tensor2D, start: number, rows: number): Tensor2D {
  return tf.tidy(() => tf.sub(denseWeightMatMul(scaled, weight, false, null, 'gradient'),
      tf.mul(gatherDenseRows(weight, tf.slice(safe, [start], [rows])), scale)));  // [C, H]
}

/**
 * Per chunk: its logits again, dLogits = (softmax − onehot) · dy / normalizer on counted rows
 * (0 on ignored ones), then dHidden[chunk] = dLogits · W and dW += dLogitsᵀ · hidden[chunk].
 * At most two [C, V] tensors exist at a time; the one-hot term needs none.
 */
function linearCrossEntropyBackward(
    dy: Tensor, hidden: Tensor2D, packedOrFloat: DenseWeightTensor, lse: Tensor1D, counted: Tensor1D, safe: Tensor1D,
    normalizer: number, chunks: Array<[number, number]>, trainHead: boolean): { dHidden: Tensor2D; dWeight: Tensor2D | null } {
  const [v, h] = packedOrFloat.shape;
  const { head: weight, owned } = headForPass(packedOrFloat);
  const dHiddens: Tensor2D[] = [];
  let dWeight: Tensor2D | null = null;
  for (const [start, rows] of chunks) {
    const scale = chunkGradientScale(counted, dy, normalizer, start, rows);      // [C, 1]
    const logits = chunkLogits(hidden, weight, start, rows);                      // [C, V]
    const shifted = tf.tidy(() => tf.sub(logits, tf.reshape(tf.slice(lse, [start], [rows]), [rows, 1])));
    logits.dispose();
    const probs = tf.exp(shifted);                                              // [C, V]
    shifted.dispose();
    const scaled = tf.mul(probs, scale) as Tensor2D;                             // [C, V]: softmax · scale
    probs.dispose();
    dHiddens.push(chunkHiddenGradient(scaled, weight, safe, scale, start, rows));
    if (trainHead) {
      // the one-hot term −scale·hidden scattered (summed) into the label rows: no [C, V] one-hot
      const part = tf.tidy(() => {
        const target = tf.slice(safe, [start], [rows]);                         // [C]
        const x = tf.slice(hidden, [start, 0], [rows, h]);                        // [C, H]
        const oneHotTerm = tf.scatterND(tf.reshape(target, [rows, 1]), tf.mul(x, scale), [v, h]);  // [V, H]
        // trainHead: `weight` is the float32 variable (a packed head was refused above)
        return tf.sub(tf.matMul(scaled, x, true, false), oneHotTerm) as Tensor2D;  // [V, H]
      });
      if (dWeight === null) {
        dWeight = part;
      } else {
        const sum: Tensor2D = tf.add(dWeight, part);
        tf.dispose([dWeight, part]);
        dWeight = sum;
      }
    }
    tf.dispose([scaled, scale]);
  }
  if (owned) (weight as Tensor2D).dispose();
  const dHidden = (dHiddens.length === 1 ? dHiddens[0] : tf.concat(dHiddens)) as Tensor2D;  // [N, H]
  if (dHiddens.length > 1) tf.dispose(dHiddens);
  return { dHidden, dWeight };
}
