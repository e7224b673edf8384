/**
 * What a forward pass needs beyond the token ids, given around `model.apply()`.
 *
 * The model is a tfjs-layers graph with one input (the ids), and tfjs-layers passes no per-call
 * arguments to the layers inside a graph. Padding, packed samples and a generation cache are
 * per-call facts of the batch, not weights of the model, so they travel beside the ids: set for
 * the duration of one forward pass with `withSequenceContext`, read by the layers that need them
 * (RotaryAttention) with `currentSequenceContext`. Backward passes need nothing from here (the
 * tape keeps what the forward pass computed).
 */
import type * as tf from '@tensorflow/tfjs-core';
import type { KVCache } from '../generate/kv_cache.js';
import { withPassConstants } from '../ops/pass_constants.js';
import { fail } from '../ops/validate.js';

export interface SequenceContext {
  /**
   * int32 [batch, seq]: 0 for a padding position, k ≥ 1 for a position of the k-th sample of its
   * row (packing puts several samples in one row). A query attends only keys of its own segment
   * (causally, as always); padding attends padding. null/absent: one sample per row, no padding.
   */
  segmentIds?: tf.Tensor2D | null;
  /**
   * int32 [batch, seq]: each token's rotary position (packing restarts it at 0 for every sample).
   * null/absent: 0, 1, ..., seq − 1 in every row.
   */
  positionIds?: tf.Tensor2D | null;
  /** a training pass (dropout on); absent: inference */
  training?: boolean;
  /**
   * The seed of this pass's dropout masks (each layer derives its own from it and its name), so a
   * resumed run draws the masks the uninterrupted run drew. Absent: unseeded.
   */
  dropoutSeed?: number;
  /**
   * Generation: the keys and values of the tokens seen so far, per attention layer. The ids are
   * then only the new tokens (positions continue after the cached ones); each RotaryAttention
   * appends its new keys and values. Owned and disposed by the caller (`generate` does both).
   */
  kvCache?: KVCache | null;
}

const active: SequenceContext[] = [];

/**
 * Runs `fn` (one forward pass) with `context` visible to the model's layers; contexts nest, the
 * innermost wins. The context's tensors stay the caller's: they are not disposed here.
 *
 * ```js
 * const logits = withSequenceContext({segmentIds, positionIds}, () => model.apply(inputIds));
 * ```
 */
export function withSequenceContext<T>(context: SequenceContext, fn: () => T): T {
  if (context === null || typeof context !== 'object') {
    fail('withSequenceContext', `'context' must be an object but got ${context === null ? 'null' : typeof context}`);
  }
  active.push(context);
  try {
    // a pass: its layers share the constants they build alike (pass_constants.ts)
    return withPassConstants(fn);
  } finally {
    active.pop();
  }
}

/** The innermost context `withSequenceContext` set, or null outside of it. */
export function currentSequenceContext(): SequenceContext | null {
  return active.length === 0 ? null : active[active.length - 1];
}
