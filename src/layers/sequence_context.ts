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
import type * as tfl from '@tensorflow/tfjs-layers';
import type { KVCache } from '../generate/kv_cache.js';
import { insidePass, withPassConstants } from '../ops/pass_constants.js';
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

/** the models passPerCall has hooked */
const hooked = new WeakSet<tfl.LayersModel>();

/**
 * Makes each top-level call of `model` one pass, as `withSequenceContext` makes batchLoss's: its
 * layers then share the causal mask, the rotary tables and the scalars (pass_constants.ts) also in
 * a user's own loop over `model.apply(ids)` or `model.predict(ids)`, which would otherwise build
 * them again in every layer (14 host tensors a pass at 2 layers, an upload each on webgpu). The
 * pass closes when the call returns, as batchLoss's does: a backward pass holds what it needs of
 * the constants by its own references (the tape's, a customGrad's save). Inside an open pass (a
 * context) a call joins it. Per instance, so a model never built here is untouched; idempotent.
 * buildMoECausalLM and loadModelDir do it; a model from `tf.loadLayersModel` itself needs it done.
 *
 * ```js
 * passPerCall(model);
 * const {value, grads} = tf.variableGrads(() => myLoss(model.apply(ids)));  // one mask, one set of tables
 * ```
 */
export function passPerCall(model: tfl.LayersModel): void {
  if (hooked.has(model)) return;
  hooked.add(model);
  const once = <T>(fn: () => T): T => insidePass() ? fn() : withPassConstants(fn);
  // apply() on tensors runs call(); predict() and predictOnBatch() run the layers one by one (tfjs-layers' execute)
  const { call, predict, predictOnBatch } = model;
  model.call = (inputs, kwargs) => once(() => call.call(model, inputs, kwargs));
  model.predict = (x, args) => once(() => predict.call(model, x, args));
  model.predictOnBatch = x => once(() => predictOnBatch.call(model, x));
}

/** The innermost context `withSequenceContext` set, or null outside of it. */
export function currentSequenceContext(): SequenceContext | null {
  return active.length === 0 ? null : active[active.length - 1];
}
