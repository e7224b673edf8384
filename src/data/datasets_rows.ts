/**
 * Samples → rows of a batch: shifted labels, packing several samples into one row, padding, and
 * the TrainingBatch tensors (segment and position ids as the SequenceContext reads them).
 */
import * as tf from '@tensorflow/tfjs-core';
import { IGNORE_INDEX, type TrainingBatch } from '../train/loss.js';
import type { SampleTokens } from './datasets_formats.js';

/** One sample ready for a row: its ids and its shifted labels (labels[t] is what ids[..t] predicts). */
export interface TokenizedSample {
  ids: Int32Array;
  /** IGNORE_INDEX where nothing is predicted, the last position always (nothing follows the sample) */
  labels: Int32Array;
  /** how many labels are not IGNORE_INDEX */
  targetCount: number;
}

/** Unpacked rows are padded to the longest of their batch rounded up to this (fewer shapes, fewer kernel compiles). */
export const PAD_TO_MULTIPLE = 8;

/**
 * The sample cut to its first `sequenceLen` tokens, with labels shifted: position t predicts
 * token t + 1 when that token is trained; the last position predicts nothing.
 */
export function toSample(tokens: SampleTokens, sequenceLen: number): TokenizedSample {
  const n = Math.min(tokens.ids.length, sequenceLen);
  const ids = tokens.ids.slice(0, n);
  const labels = new Int32Array(n).fill(IGNORE_INDEX);
  let targetCount = 0;
  for (let t = 0; t + 1 < n; t++) {
    if (tokens.trained[t + 1] === 1) { labels[t] = ids[t + 1]; targetCount++; }
  }
  return { ids, labels, targetCount };
}

/**
 * Rows of sample indices: one sample a row, or with `packing` the samples in `order` put one after
 * the other into rows of at most `sequenceLen` tokens (a sample that does not fit starts a new row;
 * the order is kept, so a seeded order gives the same rows).
 */
export function planRows(samples: readonly TokenizedSample[], order: readonly number[], sequenceLen: number, packing: boolean): number[][] {
  if (!packing) return order.map(i => [i]);
  const rows: number[][] = [];
  let row: number[] = [];
  let used = 0;
  for (const i of order) {
    const n = samples[i].ids.length;
    if (used + n > sequenceLen && row.length > 0) { rows.push(row); row = []; used = 0; }
    row.push(i);
    used += n;
  }
  if (row.length > 0) rows.push(row);
  return rows;
}

/**
 * The batch of `rows`: int32 [rows, width] tensors. Packed rows are `sequenceLen` wide with
 * segment ids 1..n per sample and positions restarting at 0 for each; unpacked rows are as wide
 * as the longest (rounded up to PAD_TO_MULTIPLE, at most sequenceLen), with segment ids only when
 * a row is padded, and no position ids (0, 1, ... is right for one sample a row). Padding is
 * `padTokenId` with segment 0 and label IGNORE_INDEX.
 */
export function rowsBatch(
    samples: readonly TokenizedSample[], rows: readonly number[][],
    options: { sequenceLen: number; packing: boolean; padTokenId: number }): TrainingBatch {
  const { sequenceLen, packing, padTokenId } = options;
  const lengths = rows.map(r => r.reduce((s, i) => s + samples[i].ids.length, 0));
  const longest = Math.max(...lengths);
  const width = packing ? sequenceLen : Math.min(sequenceLen, Math.ceil(longest / PAD_TO_MULTIPLE) * PAD_TO_MULTIPLE);
  const b = rows.length;
  const ids = new Int32Array(b * width).fill(padTokenId);
  const labels = new Int32Array(b * width).fill(IGNORE_INDEX);
  const segments = new Int32Array(b * width);
  const positions = new Int32Array(b * width);
  let targetCount = 0;
  rows.forEach((row, r) => {
    let at = r * width;
    row.forEach((i, k) => {
      const s = samples[i];
      ids.set(s.ids, at);
      labels.set(s.labels, at);
      segments.fill(k + 1, at, at + s.ids.length);
      for (let p = 0; p < s.ids.length; p++) positions[at + p] = p;
      targetCount += s.targetCount;
      at += s.ids.length;
    });
  });
  const padded = lengths.some(n => n < width);
  return {
    inputIds: tf.tensor2d(ids, [b, width], 'int32'),
    labels: tf.tensor2d(labels, [b, width], 'int32'),
    segmentIds: packing || padded ? tf.tensor2d(segments, [b, width], 'int32') : null,
    positionIds: packing ? tf.tensor2d(positions, [b, width], 'int32') : null,
    targetCount,
  };
}
