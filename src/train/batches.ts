/** Token windows for training (random, seeded) and evaluation (every token once). */
import * as tf from '@tensorflow/tfjs-core';
import { SeededRandom } from '../data/random.js';
import { fail } from '../ops/validate.js';
import type { TrainingBatch } from './loss.js';

/**
 * The micro-batches of a run, in order. Sources are deterministic: made again with the same seed
 * and told how many micro-batches were already taken, they continue exactly where the first one
 * was (that is how a resumed run sees the data the uninterrupted run saw).
 */
export interface BatchSource {
  /** the next micro-batch; the caller disposes it (disposeBatch) */
  next(): TrainingBatch;
}

/**
 * The most elements of the largest tensor a step makes, the logits [batch·seq, vocab] (float32:
 * 4 GiB; also the most a 32-bit wasm heap could hold).
 */
export const MAX_LOGITS_ELEMENTS = 2 ** 30;

/**
 * Checks, before anything is allocated, that `batch` windows of `seq` tokens give logits that fit
 * in a tensor (MAX_LOGITS_ELEMENTS), so a huge batch is one clear error, not a RangeError inside
 * a typed array.
 *
 * ```js
 * assertLogitsFit('trainLoop', 1e9, 64, 40);  // throws: 'batch' × 'seq' × vocab ... but is 2.56e+12
 * ```
 */
export function assertLogitsFit(op: string, batch: number, seq: number, vocab: number): void {
  const elements = batch * seq * vocab;
  if (elements > MAX_LOGITS_ELEMENTS) {
    fail(op, `'batch' × 'seq' × vocab (${batch} × ${seq} × ${vocab} = ${elements.toExponential(3)} logits) ` +
        `must be at most ${MAX_LOGITS_ELEMENTS} (2^30, 4 GiB of float32); use a smaller batch or seq`);
  }
}

/**
 * `batch` windows of `seq + 1` consecutive tokens at random starts: int32 [batch, seq + 1].
 *
 * ```js
 * const windows = sampleWindows(tokens, 8, 64, new SeededRandom(1));  // [8, 65]
 * ```
 */
export function sampleWindows(tokens: Int32Array, batch: number, seq: number, rng: SeededRandom): tf.Tensor2D {
  const width = seq + 1;
  if (tokens.length < width) {
    fail('sampleWindows', `the text has ${tokens.length} tokens but a window of seq ${seq} needs ${width}`);
  }
  const out = new Int32Array(batch * width);
  for (let b = 0; b < batch; b++) {
    const start = rng.int(tokens.length - width + 1);
    out.set(tokens.subarray(start, start + width), b * width);
  }
  return tf.tensor2d(out, [batch, width], 'int32');
}

/**
 * The text cut into windows of up to `seq + 1` tokens that overlap by one token, so that every
 * token after the first is predicted exactly once; the last window may be shorter.
 *
 * ```js
 * evaluationWindows(Int32Array.from([0, 1, 2, 3, 4, 5]), 2);  // [0,1,2], [2,3,4], [4,5]
 * ```
 */
export function evaluationWindows(tokens: Int32Array, seq: number): Int32Array[] {
  const out: Int32Array[] = [];
  for (let start = 0; start + 1 < tokens.length; start += seq) {
    out.push(tokens.subarray(start, Math.min(start + seq + 1, tokens.length)));
  }
  return out;
}

/**
 * The training windows of a run, step after step: `next()` gives step startStep + 1's windows,
 * then the following ones, the same for the same seed. A run resumed at step k sees the windows
 * the uninterrupted run would have seen from step k + 1 on.
 *
 * ```js
 * const batches = windowStream(tokens, 8, 64, 1);
 * const windows = batches.next();  // [8, 65]
 * ```
 */
export function windowStream(
    tokens: Int32Array, batch: number, seq: number, seed: number, startStep = 0): { next(): tf.Tensor2D } {
  const rng = new SeededRandom(seed);
  // sampleWindows draws one number per window: skip those of the steps done before
  for (let i = 0; i < startStep * batch; i++) rng.next();
  return { next: () => sampleWindows(tokens, batch, seq, rng) };
}

/**
 * The random windows of `windowStream` as a BatchSource: each micro-batch holds `batch` windows,
 * inputIds = window[:-1], labels = window[1:] (every position predicts), one sample per row.
 * Made with `startBatch` (micro-batches already taken), it continues where a source of the same
 * seed stood after that many.
 *
 * ```js
 * const source = windowBatches(tokens, 8, 64, 1);
 * const batch = source.next();  // inputIds and labels [8, 64], targetCount 512
 * disposeBatch(batch);
 * ```
 */
export function windowBatches(tokens: Int32Array, batch: number, seq: number, seed: number, startBatch = 0): BatchSource {
  // a micro-batch draws what one windowStream step draws: skip startBatch of them
  const windows = windowStream(tokens, batch, seq, seed, startBatch);
  return {
    next(): TrainingBatch {
      const w = windows.next();  // [B, S+1]
      const [inputIds, labels] = tf.tidy(() => [tf.slice(w, [0, 0], [batch, seq]), tf.slice(w, [0, 1], [batch, seq])]);
      w.dispose();
      return { inputIds: inputIds as tf.Tensor2D, labels: labels as tf.Tensor2D, segmentIds: null, positionIds: null, targetCount: batch * seq };
    },
  };
}
