/** Validation loss, the base model's view (adapters off) and greedy generation. */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { assertTokenIds } from '../layers/embedding.js';
import { sparseMoELayers } from '../layers/moe_causal_lm.js';
import { assertInteger, fail } from '../ops/validate.js';
import { evaluationBatches, type TokenizedDataset } from '../data/datasets.js';
import { evaluationWindows } from './batches.js';
import { batchLoss, disposeBatch, vocabSizeOf } from './loss.js';

export interface EvaluateOptions {
  /** tokens per window (the context the model sees) */
  seq: number;
  /** windows per forward pass; default 16 */
  batch?: number;
}

/**
 * The mean next-token cross-entropy (nats per token) over the whole text: every token after the
 * first is predicted once, from the tokens before it in its window. Reads each batch's loss
 * asynchronously, so it runs on webgpu too.
 *
 * ```js
 * await evaluateLoss(model, tokenizer.encode(validationText), {seq: 64});  // e.g. 0.71
 * ```
 */
export async function evaluateLoss(model: tfl.LayersModel, tokens: Int32Array, options: EvaluateOptions): Promise<number> {
  const op = 'evaluateLoss';
  assertInteger(op, 'seq', options.seq, 1);
  const batch = options.batch ?? 16;
  assertInteger(op, 'batch', batch, 1);
  assertTokenIds(op, 'tokens', tokens, vocabSizeOf(model));
  if (tokens.length < 2) fail(op, `the text must have at least 2 tokens but has ${tokens.length}`);
  const windows = evaluationWindows(tokens, options.seq);
  // windows of one length go through together (the last one may be shorter)
  const byLength = new Map<number, Int32Array[]>();
  for (const w of windows) byLength.set(w.length, [...(byLength.get(w.length) ?? []), w]);
  let total = 0;
  let count = 0;
  for (const [length, group] of byLength) {
    for (let i = 0; i < group.length; i += batch) {
      const rows = group.slice(i, i + batch);
      const data = new Int32Array(rows.length * length);
      rows.forEach((r, k) => data.set(r, k * length));
      // batchLoss, not nextTokenLoss: the head and the loss in chunks, never the logits [rows·(length − 1), V]
      const windowsOf = tf.tensor2d(data, [rows.length, length], 'int32');
      const micro = {
        inputIds: tf.slice(windowsOf, [0, 0], [rows.length, length - 1]) as tf.Tensor2D,
        labels: tf.slice(windowsOf, [0, 1], [rows.length, length - 1]) as tf.Tensor2D,
        segmentIds: null, positionIds: null, targetCount: rows.length * (length - 1),
      };
      windowsOf.dispose();
      let mean: number;
      try {
        const loss = batchLoss(model, micro, { training: false });
        mean = (await loss.data())[0];
        loss.dispose();
      } finally {
        disposeBatch(micro);
      }
      total += mean * rows.length * (length - 1);
      count += rows.length * (length - 1);
    }
  }
  return total / count;
}

/**
 * The mean cross-entropy (nats per predicted token) over every label of a dataset (a validation
 * split of loadDatasets): each sample once, with its loss mask, padding and packing. Reads
 * asynchronously, so it runs on webgpu too.
 *
 * ```js
 * const {val} = await loadDatasets(specs, tokenizer, {sequenceLen: 512, valSetSize: 0.05, seed: 42});
 * await evaluateDatasetLoss(model, val, 8);  // e.g. 1.93
 * ```
 */
export async function evaluateDatasetLoss(model: tfl.LayersModel, dataset: TokenizedDataset, batch: number): Promise<number> {
  let total = 0;
  for (const micro of evaluationBatches(dataset, batch)) {
    try {
      // each batch's sum over the whole set's count: the parts add up to the mean
      const loss = batchLoss(model, micro, { training: false, normalizer: dataset.targetCount });
      total += (await loss.data())[0];
      loss.dispose();
    } finally {
      disposeBatch(micro);
    }
  }
  return total;
}

/**
 * Runs `fn` with every LoRA adapter of the model's MoE layers switched off (the base model),
 * restoring each layer's state after; when `fn` returns a Promise (evaluateLoss), after it settles.
 *
 * ```js
 * const baseLoss = await withAdaptersDisabled(model, () => evaluateLoss(model, tokens, {seq: 64}));
 * ```
 */
export function withAdaptersDisabled<T>(model: tfl.LayersModel, fn: () => T): T {
  const layers = sparseMoELayers(model);
  const before = layers.map(l => l.adaptersDisabled);
  layers.forEach(l => l.disableAdapters());
  const restore = () => layers.forEach((l, k) => { if (!before[k]) l.enableAdapters(); });
  let result: T;
  try {
    result = fn();
  } catch (e) {
    restore();
    throw e;
  }
  // an asynchronous fn still runs its forward passes after this returns: restore once it settles
  if (result instanceof Promise) return result.finally(restore) as T;
  restore();
  return result;
}

export interface GenerateOptions {
  /** tokens to add */
  maxNewTokens: number;
  /** the most recent tokens the model sees; default all */
  context?: number;
  /** stop after producing this token (e.g. the newline's id) */
  stopToken?: number;
}

/**
 * Greedy decoding: appends the most likely next token, `maxNewTokens` times (or until
 * `stopToken`). Returns the new tokens only. Recomputes the whole window each step (there is no
 * KV cache), which is fine for the small models this is for. Reads each token asynchronously, so
 * it runs on webgpu too.
 *
 * ```js
 * const ids = await generateGreedy(model, tokenizer.encode('miro '), {maxNewTokens: 40});
 * tokenizer.decode(ids);
 * ```
 */
export async function generateGreedy(model: tfl.LayersModel, prompt: Int32Array, options: GenerateOptions): Promise<Int32Array> {
  const op = 'generateGreedy';
  assertInteger(op, 'maxNewTokens', options.maxNewTokens, 0);
  assertTokenIds(op, 'prompt', prompt, vocabSizeOf(model));
  if (prompt.length === 0) fail(op, "'prompt' must hold at least one token");
  const context = options.context ?? Infinity;
  const ids = Array.from(prompt);
  const out: number[] = [];
  for (let i = 0; i < options.maxNewTokens; i++) {
    const window = ids.slice(Math.max(0, ids.length - context));
    const best = tf.tidy(() => {
      const logits = model.apply(tf.tensor2d(window, [1, window.length], 'int32'), { training: false }) as tf.Tensor3D;
      const v = logits.shape[2];
      return tf.argMax(tf.reshape(tf.slice(logits, [0, window.length - 1, 0], [1, 1, v]), [v]));
    });
    const next = (await best.data())[0];
    best.dispose();
    ids.push(next);
    out.push(next);
    if (next === options.stopToken) break;
  }
  return Int32Array.from(out);
}
