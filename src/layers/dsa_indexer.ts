/**
 * The token indexer of DeepSeek sparse attention (DSA), as transformers' GlmMoeDsaIndexer computes
 * it for glm_moe_dsa: a cheap score of every key a query may attend, of which MLA then keeps only
 * the `topK` best per query.
 *
 *   q     = q_latent·W_qbᵀ               [T, nh·d]  (q_latent: MLA's q_a_layernorm(q_a_proj(x)))
 *   k     = LayerNorm(x·W_kᵀ)            [T, d]     one key head shared by all index heads
 *   rope on the first rope_dim of each q head and of k (pairs interleaved like MLA's when
 *   ropeInterleave, as GLM-5's: transformers 5.17 rotates (x0, x1), (x2, x3), ...), then
 *   w     = x·W_wᵀ / √nh                 [T, nh]
 *   score[s, t] = Σ_h w[s, h] · relu(q[s, h]·k[t] / √d) + mask[s, t]
 *   kept  = the min(topK, L) best keys of each query by score
 *
 * transformers runs it under no_grad: the choice is piecewise constant and gives its weights no
 * gradient, so here it is one customGrad whose gradient is zero (tfjs has no TopK gradient).
 * Weights keep HF's names under the attention module ('indexer.wq_b.weight', ...).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc } from '@tensorflow/tfjs-core';
import { indexCounts } from '../ops/index_counts.js';
import { assertInteger, fail } from '../ops/validate.js';
import { applyRotary, deinterleavePairs } from './rotary.js';

/** The indexer's sizes: HF index_n_heads, index_head_dim, index_topk. */
export interface DSAIndexerArgs {
  numHeads: number;
  headDim: number;
  topK: number;
}

/** What a blocked (not kept) key adds to its score: the value attention.ts's masks use. */
const BLOCKED = -1e9;

/** GlmMoeDsaIndexer's k_norm: nn.LayerNorm(index_head_dim, eps=1e-6). */
const K_NORM_EPSILON = 1e-6;

/** Checks the indexer's sizes against MLA's rope width and query latent (the indexer reads both). */
export function checkDSAIndexerArgs(op: string, a: DSAIndexerArgs, qkRopeHeadDim: number, qLoraRank: number | null): void {
  if (a === null || typeof a !== 'object') fail(op, `'indexer' must be {numHeads, headDim, topK} or null but got ${typeof a}`);
  assertInteger(op, 'indexer.numHeads', a.numHeads, 1);
  assertInteger(op, 'indexer.headDim', a.headDim, 1);
  assertInteger(op, 'indexer.topK', a.topK, 1);
  if (a.headDim < qkRopeHeadDim) {
    fail(op, `'indexer.headDim' must be >= qkRopeHeadDim (${qkRopeHeadDim}): its rope part is that wide, but got ${a.headDim}`);
  }
  if (qLoraRank === null) {
    fail(op, "'indexer' needs a query latent: 'qLoraRank' must be set (transformers' indexer reads q_a_layernorm's output)");
  }
}

/**
 * The indexer's weights, by HF name relative to the attention module, with shapes and init.
 *
 * ```js
 * dsaIndexerWeightShapes({numHeads: 4, headDim: 16, topK: 8}, 64, 32)[0];
 * // {name: 'indexer.wq_b.weight', shape: [64, 32], init: 'normal'}
 * ```
 */
export function dsaIndexerWeightShapes(a: DSAIndexerArgs, hidden: number, qLoraRank: number):
    Array<{ name: string; shape: number[]; init: 'normal' | 'zeros' | 'ones' }> {
  return [
    { name: 'indexer.wq_b.weight', shape: [a.numHeads * a.headDim, qLoraRank], init: 'normal' },
    { name: 'indexer.wk.weight', shape: [a.headDim, hidden], init: 'normal' },
    { name: 'indexer.k_norm.weight', shape: [a.headDim], init: 'ones' },
    { name: 'indexer.k_norm.bias', shape: [a.headDim], init: 'zeros' },
    { name: 'indexer.weights_proj.weight', shape: [a.numHeads, hidden], init: 'normal' },
  ];
}

/** MLA's rope settings the indexer shares: the rope width, its tables, interleaved pairs or not. */
export interface IndexerRope {
  ropeDim: number;
  interleave: boolean;
  cos: tf.Tensor2D | tf.Tensor3D;
  sin: tf.Tensor2D | tf.Tensor3D;
}

/**
 * Rope on the leading `ropeDim` of the last axis of [N, S, d], the rest as it is; interleaved
 * pairs are first de-interleaved (evens then odds), as transformers' apply_rotary_pos_emb_interleave
 * lays out its output (the same permutation on q and k keeps every q·k).
 */
function ropeLeading(x: tf.Tensor3D, rope: IndexerRope): tf.Tensor3D {
  const d = x.shape[2];
  const rd = rope.ropeDim;
  let [rot, pass] = rd === d ? [x, null] : tf.split(x, [rd, d - rd], 2) as [tf.Tensor3D, tf.Tensor3D];
  if (rope.interleave) rot = deinterleavePairs(rot);
  const rotated = applyRotary(rot, rope.cos, rope.sin);
  return pass === null ? rotated : tf.concat([rotated, pass], 2) as tf.Tensor3D;
}

/**
 * The indexer keys of new tokens: LayerNorm(x·W_kᵀ) with rope, [B, S, d]. `w` reads a weight by
 * HF name; cos/sin are MLA's rope tables for these positions.
 */
export function dsaIndexerKeys(x2: tf.Tensor2D, w: (name: string) => tf.Tensor, b: number, s: number, rope: IndexerRope): tf.Tensor3D {
  return tf.tidy(() => {
    const k = tf.matMul(x2, w('indexer.wk.weight'), false, true);                  // [B·S, d]
    const { mean, variance } = tf.moments(k, -1, true);
    const normed = tf.add(tf.mul(tf.div(tf.sub(k, mean), tf.sqrt(tf.add(variance, K_NORM_EPSILON))),
        w('indexer.k_norm.weight')), w('indexer.k_norm.bias'));
    return ropeLeading(tf.reshape(normed, [b, s, k.shape[1]!]) as tf.Tensor3D, rope);
  });
}

/**
 * The additive mask [B, 1, S, L] that keeps, for each of the S new queries, the min(topK, L) keys
 * of best index score among the L keys `keys` [B, L, d] (cache + new); null when topK >= L (every
 * key kept: the attention's own mask decides alone). `mask` is that attention mask ([S, L] or
 * [B, 1, S, L]), added to the scores first as transformers does, so blocked keys are chosen last.
 * No gradient reaches x2, qLatent or keys.
 */
export function dsaKeepMask(a: DSAIndexerArgs, x2: tf.Tensor2D, qLatent: tf.Tensor2D, keys: tf.Tensor3D,
    w: (name: string) => tf.Tensor, b: number, s: number, rope: IndexerRope, mask: tf.Tensor2D | tf.Tensor4D): tf.Tensor4D | null {
  const keyLen = keys.shape[1];
  if (a.topK >= keyLen) return null;
  const { numHeads: nh, headDim: d } = a;
  const keep = tf.customGrad((...args: Array<tf.Tensor | GradSaveFunc>) => {
    const [xs, latent, ks] = args as [tf.Tensor2D, tf.Tensor2D, tf.Tensor3D];
    const value = tf.tidy(() => {
      const q = tf.matMul(latent, w('indexer.wq_b.weight'), false, true);           // [B·S, nh·d]
      const qHeads = tf.reshape(tf.transpose(tf.reshape(q, [b, s, nh, d]), [0, 2, 1, 3]), [b * nh, s, d]) as tf.Tensor3D;
      const qRot = tf.reshape(ropeLeading(qHeads, rope), [b, nh * s, d]);
      const qk = tf.relu(tf.mul(tf.matMul(qRot, ks, false, true), 1 / Math.sqrt(d)));  // [B, nh·S, L]
      const weights = tf.mul(tf.matMul(xs, w('indexer.weights_proj.weight'), false, true), 1 / Math.sqrt(nh));  // [B·S, nh]
      const perHead = tf.mul(tf.reshape(qk, [b, nh, s, keyLen]),
          tf.expandDims(tf.transpose(tf.reshape(weights, [b, s, nh]), [0, 2, 1]), 3));
      const scores = tf.add(tf.sum(perHead, 1), mask.rank === 2 ? mask : tf.reshape(mask, [b, s, keyLen]));  // [B, S, L]
      const chosen = tf.topk(scores, a.topK).indices;                              // [B, S, topK]
      // not tf.sum(tf.oneHot(chosen, keyLen), 2): all zeros on webgpu (src/ops/index_counts.ts)
      const kept = indexCounts(chosen, keyLen);                                    // [B, S, L] 0/1
      return tf.reshape(tf.mul(tf.sub(1, kept), BLOCKED), [b, 1, s, keyLen]);
    });
    return { value, gradFunc: () => [tf.zerosLike(xs), tf.zerosLike(latent), tf.zerosLike(ks)] };
  });
  return keep(x2, qLatent, keys) as tf.Tensor4D;
}
