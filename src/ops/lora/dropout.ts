/**
 * LoRA dropout as PEFT applies it: y = x·Wᵀ + s·(dropout(x)·Aᵀ)·Bᵀ, the base product on the
 * undropped x. One helper draws every mask (linear layers, router, shared and routed experts), so
 * the same seed gives the same mask wherever it is drawn: the fused ops and the reference block
 * draw the routed experts' masks in (token, slot) pair order, row t·K + k, and agree exactly.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { LoRADropout } from '../types.js';
import { fail } from '../validate.js';

/**
 * The seed of one module's dropout mask in a pass seeded `passSeed`: FNV-1a over the seed and the
 * module's name, so masks differ between modules and repeat for the same pass seed.
 *
 * ```js
 * dropoutSeedOf(7, 'model.layers.0.self_attn.q_proj/default');  // a 32-bit integer
 * ```
 */
export function dropoutSeedOf(passSeed: number, key: string): number {
  let h = 0x811c9dc5;
  for (const ch of `${passSeed}:${key}`) {
    h ^= ch.charCodeAt(0);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h;
}

/**
 * The keep mask PEFT's nn.Dropout(p) applies, already divided by 1 − p: 0 or 1/(1 − p) per
 * element, seeded (the same seed gives the same mask on every backend: tfjs draws it on the CPU).
 *
 * ```js
 * const mask = loraDropoutMask([4, 8], 0.1, dropoutSeedOf(7, 'q_proj'));
 * ```
 */
export function loraDropoutMask(shape: number[], p: number, seed: number | undefined): tf.Tensor {
  return tf.tidy(() => tf.div(tf.cast(tf.greaterEqual(tf.randomUniform(shape, 0, 1, 'float32', seed), p), 'float32'), 1 - p));
}

/** Whether an adapter's branch input is dropped in this call. */
export function hasDropout(f: { dropout?: LoRADropout }): boolean {
  return f.dropout != null && f.dropout.p > 0;
}

/** Checks `${prefix}dropout` of a LoRAFactors: absent, or {p in [0, 1), seed?: integer}. */
export function checkLoRADropout(op: string, prefix: string, dropout: unknown): void {
  if (dropout === undefined) return;
  const name = `${prefix}dropout`;
  if (dropout === null || typeof dropout !== 'object' || Array.isArray(dropout)) {
    fail(op, `'${name}' must be {p, seed?} but got ${dropout === null ? 'null' : Array.isArray(dropout) ? 'an array' : typeof dropout}`);
  }
  const { p, seed } = dropout as LoRADropout;
  if (typeof p !== 'number' || !(p >= 0 && p < 1)) fail(op, `'${name}.p' must be a number in [0, 1) but got ${String(p)}`);
  if (seed !== undefined && !Number.isInteger(seed)) fail(op, `'${name}.seed' must be an integer but got ${String(seed)}`);
}

/** x ⊙ mask for an adapter with dropout (the mask drawn [rows, in] from its seed), else x. */
export function droppedInput(x: tf.Tensor2D, f: { dropout?: LoRADropout }): tf.Tensor2D {
  if (!hasDropout(f)) return x;
  return tf.tidy(() => tf.mul(x, loraDropoutMask(x.shape, f.dropout!.p, f.dropout!.seed)) as tf.Tensor2D);
}
