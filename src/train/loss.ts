/** The language-modelling loss: mean cross-entropy of each next token given the ones before it. */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { assertTokenIds, HOST_BACKENDS } from '../layers/embedding.js';
import { splitAtHead } from '../layers/moe_causal_lm.js';
import { withSequenceContext } from '../layers/sequence_context.js';
import { linearCrossEntropy } from '../ops/linear_cross_entropy.js';
import { denseWeightOf } from '../layers/dense_storage.js';
import { tokenCrossEntropy } from '../ops/token_cross_entropy.js';
import { assertInteger, assertTensor, fail } from '../ops/validate.js';

/** A label that predicts nothing (padding, prompts under a completion-only loss): PyTorch's ignore_index. */
export const IGNORE_INDEX = -100;

/**
 * One micro-batch of a training or evaluation step. Every tensor is int32 [batch, seq] and owned
 * by whoever made the batch (`disposeBatch`).
 */
export interface TrainingBatch {
  inputIds: tf.Tensor2D;
  /**
   * The token each position must predict, already shifted (labels[b, t] follows inputIds[b, ..t]),
   * or IGNORE_INDEX where nothing is predicted.
   */
  labels: tf.Tensor2D;
  /** see SequenceContext.segmentIds; null: one sample per row, no padding */
  segmentIds: tf.Tensor2D | null;
  /** see SequenceContext.positionIds; null: 0 .. seq − 1 in every row */
  positionIds: tf.Tensor2D | null;
  /** how many labels are not IGNORE_INDEX (known on the host: the loss divides by it without a read) */
  targetCount: number;
}

/** Disposes a batch's tensors. */
export function disposeBatch(batch: TrainingBatch): void {
  tf.dispose([batch.inputIds, batch.labels, batch.segmentIds ?? [], batch.positionIds ?? []].flat());
}

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
    // the plain path (no mask, no context): the reference the masked loss is checked against
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

/**
 * Labels are token ids or IGNORE_INDEX: any other value would be a zero one-hot row, a silently
 * wrong loss. Read back on host backends only, as assertTokenIds does.
 */
function assertLabels(op: string, labels: tf.Tensor2D, vocabSize: number): void {
  if (!HOST_BACKENDS.includes(tf.getBackend())) return;
  const values = labels.dataSync();
  for (let i = 0; i < values.length; i++) {
    const id = values[i];
    if (id !== IGNORE_INDEX && (id < 0 || id >= vocabSize)) {
      fail(op, `'labels' must hold token ids in [0, ${vocabSize - 1}] (vocab size ${vocabSize}) or IGNORE_INDEX ` +
          `(${IGNORE_INDEX}) but holds ${id} at index ${i}`);
    }
  }
}

/**
 * Σ −log p(labels[b, t] | inputIds[b, ..t]) over the positions whose label is not IGNORE_INDEX,
 * divided by `normalizer` (default the batch's targetCount: the mean; gradient accumulation
 * passes the target count of the whole step, so every target weighs the same whatever
 * micro-batch it fell in). One forward pass, with the batch's segment and position ids.
 *
 * A model whose output is its LM head (buildMoECausalLM's, loadHFCheckpoint's) runs up to its
 * final norm, and the head and the loss run as one chunked op (linearCrossEntropy): the
 * [B·S, V] logits are never held, only `chunkRows` rows of them at a time (default: as many as
 * fit in 64 MiB, defaultChunkRows). Any other model: its logits, then tokenCrossEntropy.
 *
 * ```js
 * const loss = batchLoss(model, batch);  // scalar
 * ```
 */
export function batchLoss(
    model: tfl.LayersModel, batch: TrainingBatch,
    options: { training?: boolean; normalizer?: number; dropoutSeed?: number; chunkRows?: number } = {}): tf.Scalar {
  const op = 'batchLoss';
  assertTensor(op, 'inputIds', batch.inputIds, 2, 'int32');
  const [b, s] = batch.inputIds.shape;
  const same = (name: string, t: tf.Tensor | null) => {
    if (t === null) return;
    assertTensor(op, name, t, 2, 'int32');
    if (t.shape[0] !== b || t.shape[1] !== s) fail(op, `'${name}' must have the shape of 'inputIds' [${b},${s}] but has [${t.shape}]`);
  };
  same('labels', batch.labels);
  same('segmentIds', batch.segmentIds);
  same('positionIds', batch.positionIds);
  if (options.normalizer === undefined && batch.targetCount === 0) {
    fail(op, "the batch has no label to predict (every label is IGNORE_INDEX, 'targetCount' 0)");
  }
  const normalizer = options.normalizer ?? batch.targetCount;
  assertInteger(op, 'normalizer', normalizer, 1);
  if (options.chunkRows !== undefined) assertInteger(op, 'chunkRows', options.chunkRows, 1);
  const v = vocabSizeOf(model);
  assertTokenIds(op, 'inputIds', batch.inputIds, v);
  assertLabels(op, batch.labels, v);
  const split = splitAtHead(model);
  return tf.tidy(() => {
    const labels = tf.reshape(batch.labels, [b * s]) as tf.Tensor1D;             // IGNORE_INDEX < 0: not counted
    const training = options.training ?? true;
    const context = { segmentIds: batch.segmentIds, positionIds: batch.positionIds, training, dropoutSeed: options.dropoutSeed };
    if (split === null) {
      const logits = withSequenceContext(context, () => model.apply(batch.inputIds, { training }) as tf.Tensor3D);  // [B, S, V]
      // one op with its own gradient: a few logits-sized tensors, not the composed loss's dozen
      return tokenCrossEntropy(tf.reshape(logits, [b * s, v]) as tf.Tensor2D, labels, normalizer);
    }
    const hidden = withSequenceContext(context, () => split.trunk.apply(batch.inputIds, { training }) as tf.Tensor3D);  // [B, S, H]
    // the head's variable itself: it gets a gradient exactly when it trains (a frozen head is a
    // constant); a packed head (denseDtype 'stored') is its PackedDenseWeight, always frozen
    const headWeight = denseWeightOf(split.headWeight);                          // [V, H]
    return linearCrossEntropy(tf.reshape(hidden, [b * s, hidden.shape[2]]) as tf.Tensor2D, headWeight, labels, normalizer,
        { chunkRows: options.chunkRows });
  });
}
