/**
 * The keys and values a generation has computed so far, per attention layer, so that each step
 * feeds the model only its new tokens (cost linear in them) instead of the whole text again.
 *
 * RotaryAttention reads the cache from the sequence context (`kvCache`): it rotates the new keys at
 * the positions after the cached ones, appends them, and attends over cache + new. A layer with a
 * sliding window keeps only the last `window − 1` keys (no later query can reach further back), so
 * memory is bounded by what the attention really references.
 */
import * as tf from '@tensorflow/tfjs-core';
import { fail } from '../ops/validate.js';

/** One layer's cache: keys and values [B·nkv, L, D] (rotated, before the KV-head repeat). */
interface LayerCache {
  keys: tf.Tensor3D;
  values: tf.Tensor3D;
  /** absolute position of the first kept key (> 0 once a sliding window dropped older ones) */
  start: number;
  /** tokens this layer has seen: the position of the next new token */
  seen: number;
}

/** What a layer attends over after `append`: every kept key and value, and where they start. */
export interface CachedKeys {
  keys: tf.Tensor3D;
  values: tf.Tensor3D;
  /** absolute position of keys[:, 0] */
  start: number;
}

export class KVCache {
  private readonly layers = new Map<string, LayerCache>();
  /** recurrent layers' states (GatedDeltaNet: its conv inputs and delta-rule state), by name */
  private readonly states = new Map<string, tf.Tensor>();

  /**
   * A recurrent layer's state after the tokens seen so far under `key`, or null before its first
   * step. The tensor belongs to the cache.
   */
  state(key: string): tf.Tensor | null {
    return this.states.get(key) ?? null;
  }

  /** Replaces the state under `key` (kept out of the caller's tidy; the old one is released). */
  setState(key: string, value: tf.Tensor): void {
    const old = this.states.get(key);
    this.states.set(key, tf.keep(value));
    if (old !== undefined && old !== value) old.dispose();
  }

  /**
   * The position of the next token for `layer` (0 before its first step): the rotary offset of the
   * new tokens.
   *
   * ```js
   * const cache = new KVCache();
   * withSequenceContext({kvCache: cache}, () => model.apply(promptIds));  // cache.seen('model.layers.0.self_attn') = prompt length
   * ```
   */
  seen(layer: string): number {
    return this.layers.get(layer)?.seen ?? 0;
  }

  /**
   * Appends the rotated keys and values of `newTokens` new positions [B·nkv, S, D] to `layer`'s
   * cache and returns what the new queries attend over. The returned tensors belong to the cache
   * (kept out of the caller's tidy); with `window`, keys no later query can see are dropped.
   */
  append(layer: string, keys: tf.Tensor3D, values: tf.Tensor3D, window: number | null): CachedKeys {
    const old = this.layers.get(layer);
    if (old !== undefined && old.keys.shape[0] !== keys.shape[0]) {
      fail('KVCache.append', `layer '${layer}' cached ${old.keys.shape[0]} batch·head rows but got ${keys.shape[0]}: ` +
          'a cache serves one batch; start a new one for another');
    }
    const s = keys.shape[1];
    const allKeys = old === undefined ? keys : tf.concat([old.keys, keys], 1) as tf.Tensor3D;         // [B·nkv, L+S, D]
    const allValues = old === undefined ? values : tf.concat([old.values, values], 1) as tf.Tensor3D;
    const start = old?.start ?? 0;
    const seen = (old?.seen ?? 0) + s;
    const attended: CachedKeys = { keys: allKeys, values: allValues, start };
    // the next query (position `seen`) reaches keys at positions > seen − window
    const keep = window === null ? allKeys.shape[1] : Math.min(allKeys.shape[1], window - 1);
    let kept = attended;
    if (keep < allKeys.shape[1]) {
      const drop = allKeys.shape[1] - keep;
      const [n, , d] = allKeys.shape;
      kept = {
        keys: tf.slice(allKeys, [0, drop, 0], [n, keep, d]), values: tf.slice(allValues, [0, drop, 0], [n, keep, d]),
        start: start + drop,
      };
    }
    tf.keep(kept.keys);
    tf.keep(kept.values);
    if (old !== undefined) tf.dispose([old.keys, old.values]);
    this.layers.set(layer, { keys: kept.keys, values: kept.values, start: kept.start, seen });
    return attended;
  }

  /** Releases every cached tensor; the cache is empty (and usable) after. */
  dispose(): void {
    for (const c of this.layers.values()) tf.dispose([c.keys, c.values]);
    this.layers.clear();
    tf.dispose([...this.states.values()]);
    this.states.clear();
  }
}
