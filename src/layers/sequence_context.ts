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
import * as tf from '@tensorflow/tfjs-core';
import type { KVCache } from '../generate/kv_cache.js';
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
/** per active context, the constants its pass shares (passConstant), disposed when the pass ends */
const constants: Map<string, { value: unknown; tensors: tf.Tensor[] }>[] = [];

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
  constants.push(new Map());
  try {
    return fn();
  } finally {
    active.pop();
    for (const { tensors } of constants.pop()!.values()) tf.dispose(tensors);
  }
}

/**
 * A constant of the current pass that every layer of it would build alike (the causal mask and
 * the rotary tables of its length: each a host computation and an upload, 16 times a pass at
 * OLMoE's depth): `build` runs on the first request for `key` in the innermost withSequenceContext,
 * later requests get the same tensors, and they are disposed when that pass returns. What the
 * backward pass needs of them the tape or a customGrad's save keeps (their own references). Outside
 * withSequenceContext, `build` runs every time and the caller owns what it returns, as without this.
 * `key` must name everything the tensors depend on.
 *
 * ```js
 * const mask = passConstant(`causalMask/${s}`, () => causalMask(s, null));
 * ```
 */
export function passConstant<T extends tf.Tensor | Record<string, tf.Tensor>>(key: string, build: () => T): T {
  const shared = constants.at(-1);
  if (shared === undefined) return build();
  const held = shared.get(key);
  if (held !== undefined) return held.value as T;
  const value = build();
  const tensors = value instanceof tf.Tensor ? [value] : Object.values(value);
  for (const t of tensors) tf.keep(t);
  shared.set(key, { value, tensors });
  return value;
}

/** The innermost context `withSequenceContext` set, or null outside of it. */
export function currentSequenceContext(): SequenceContext | null {
  return active.length === 0 ? null : active[active.length - 1];
}
