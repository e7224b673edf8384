/**
 * Qwen3-Next's gated DeltaNet linear attention (transformers' Qwen3NextGatedDeltaNet), the token
 * mixer of its 'linear_attention' layers, and Qwen3.5's (Qwen3_5GatedDeltaNet: the same with four
 * separate input projections, `projections: 'separate'`):
 *
 *   [q, k, v, z] = x·W_qkvzᵀ, [b, a] = x·W_baᵀ   grouped per key head: [q_h, k_h, v_{h·r..}, z_{h·r..}]
 *     ('separate': [q, k, v] = x·W_qkvᵀ, z = x·W_zᵀ, b = x·W_bᵀ, a = x·W_aᵀ, each head after head)
 *   [q, k, v]    = silu(causal depthwise conv1d of width K over [q, k, v])
 *   β = sigmoid(b), g = −exp(A_log)·softplus(a + dt_bias)               per value head
 *   q, k         = l2norm(q), l2norm(k) (eps 1e-6), q /= √d_k, each key head serving r = nv/nk value heads
 *   S_t = e^{g_t}·S_{t−1};  S_t += k_t ⊗ β_t·(v_t − S_tᵀk_t);  o_t = S_tᵀq_t        S: [d_k, d_v] per head
 *   out = W_o · (RMSNorm(o)·w ⊙ silu(z))
 *
 * The recurrence runs token by token in tf ops (transformers' chunked form computes the same
 * values), so its gradient is tfjs's autodiff through the loop: the tape keeps one state per token,
 * [B·nv, d_k, d_v] each. With packed samples (the context's segmentIds) each sample starts from a
 * zero state and its conv sees none of the previous sample's tokens: each sample gives what it gives
 * alone. With a generation cache (the context's kvCache) the layer continues from the state and the
 * last K−1 conv inputs of the tokens before (KVCache.state), as transformers' cache does.
 *
 * Weights keep PyTorch's layout and HF's names relative to the module ('in_proj_qkvz.weight',
 * 'conv1d.weight' [C, 1, K], 'A_log', ...).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type { LayerArgs } from '@tensorflow/tfjs-layers/dist/engine/topology.js';
import { assertFiniteNumber, assertInteger, assertOneOf, fail } from '../ops/validate.js';
import { normalInitializer } from './initializers.js';
import { rmsNorm } from './rms_norm.js';
import { contextIds } from './attention.js';
import { currentSequenceContext } from './sequence_context.js';

export interface GatedDeltaNetArgs extends LayerArgs {
  /** HF linear_num_key_heads */
  numKeyHeads: number;
  /** HF linear_num_value_heads, a multiple of numKeyHeads */
  numValueHeads: number;
  /** HF linear_key_head_dim */
  keyHeadDim: number;
  /** HF linear_value_head_dim */
  valueHeadDim: number;
  /** width of the causal conv1d (HF linear_conv_kernel_dim) */
  convKernel: number;
  /** epsilon of the gated output norm (HF rms_norm_eps); default 1e-6 */
  normEpsilon?: number;
  /** std of the normal initializer (HF initializer_range); default 0.02 */
  initializerRange?: number;
  /**
   * 'qkvz' (default, Qwen3-Next): in_proj_qkvz and in_proj_ba, grouped per key head;
   * 'separate' (Qwen3.5): in_proj_qkv, in_proj_z, in_proj_b, in_proj_a
   */
  projections?: DeltaNetProjections;
}

export type DeltaNetProjections = 'qkvz' | 'separate';
const DELTA_NET_PROJECTIONS: readonly DeltaNetProjections[] = ['qkvz', 'separate'];

/** The sizes that decide the module's weights. */
export type GatedDeltaNetShapeArgs = Pick<GatedDeltaNetArgs, 'numKeyHeads' | 'numValueHeads' | 'keyHeadDim' | 'valueHeadDim' | 'convKernel' | 'projections'>;

/**
 * Every weight of the module on hidden size `hidden`, by HF name with shape and init.
 *
 * ```js
 * gatedDeltaNetWeightShapes({numKeyHeads: 2, numValueHeads: 4, keyHeadDim: 8, valueHeadDim: 8, convKernel: 4}, 64)[0];
 * // {name: 'in_proj_qkvz.weight', shape: [96, 64], init: 'normal'}
 * ```
 */
export function gatedDeltaNetWeightShapes(a: GatedDeltaNetShapeArgs, hidden: number):
    Array<{ name: string; shape: number[]; init: 'normal' | 'zeros' | 'ones' }> {
  const keyDim = a.numKeyHeads * a.keyHeadDim;
  const valueDim = a.numValueHeads * a.valueHeadDim;
  const projections: Array<{ name: string; shape: number[]; init: 'normal' }> = (a.projections ?? 'qkvz') === 'qkvz' ? [
    { name: 'in_proj_qkvz.weight', shape: [2 * keyDim + 2 * valueDim, hidden], init: 'normal' },
    { name: 'in_proj_ba.weight', shape: [2 * a.numValueHeads, hidden], init: 'normal' },
  ] : [
    { name: 'in_proj_qkv.weight', shape: [2 * keyDim + valueDim, hidden], init: 'normal' },
    { name: 'in_proj_z.weight', shape: [valueDim, hidden], init: 'normal' },
    { name: 'in_proj_b.weight', shape: [a.numValueHeads, hidden], init: 'normal' },
    { name: 'in_proj_a.weight', shape: [a.numValueHeads, hidden], init: 'normal' },
  ];
  return [
    ...projections,
    { name: 'conv1d.weight', shape: [2 * keyDim + valueDim, 1, a.convKernel], init: 'normal' },
    { name: 'dt_bias', shape: [a.numValueHeads], init: 'ones' },
    // transformers draws A uniform in (0, 16) and stores its log; zeros (A = 1) is a plain stand-in
    { name: 'A_log', shape: [a.numValueHeads], init: 'zeros' },
    { name: 'norm.weight', shape: [a.valueHeadDim], init: 'ones' },
    { name: 'out_proj.weight', shape: [hidden, valueDim], init: 'normal' },
  ];
}

/** x · rsqrt(Σx² + eps) over the last axis (the l2norm of flash-linear-attention, eps 1e-6). */
function l2norm(x: tf.Tensor): tf.Tensor {
  return tf.mul(x, tf.rsqrt(tf.add(tf.sum(tf.square(x), -1, true), 1e-6)));
}

export class GatedDeltaNet extends tfl.layers.Layer {
  static className = 'GatedDeltaNet';
  readonly numKeyHeads: number;
  readonly numValueHeads: number;
  readonly keyHeadDim: number;
  readonly valueHeadDim: number;
  readonly convKernel: number;
  readonly normEpsilon: number;
  readonly initializerRange: number;
  readonly projections: DeltaNetProjections;
  private readonly vars = new Map<string, tfl.LayerVariable>();

  constructor(args: GatedDeltaNetArgs) {
    super(args);
    const op = 'GatedDeltaNet';
    assertInteger(op, 'numKeyHeads', args.numKeyHeads, 1);
    assertInteger(op, 'numValueHeads', args.numValueHeads, 1);
    if (args.numValueHeads % args.numKeyHeads !== 0) {
      fail(op, `'numValueHeads' must be a multiple of numKeyHeads (${args.numKeyHeads}) but got ${args.numValueHeads}`);
    }
    assertInteger(op, 'keyHeadDim', args.keyHeadDim, 1);
    assertInteger(op, 'valueHeadDim', args.valueHeadDim, 1);
    assertInteger(op, 'convKernel', args.convKernel, 1);
    this.normEpsilon = args.normEpsilon ?? 1e-6;
    assertFiniteNumber(op, 'normEpsilon', this.normEpsilon);
    this.numKeyHeads = args.numKeyHeads;
    this.numValueHeads = args.numValueHeads;
    this.keyHeadDim = args.keyHeadDim;
    this.valueHeadDim = args.valueHeadDim;
    this.convKernel = args.convKernel;
    this.initializerRange = args.initializerRange ?? 0.02;
    this.projections = args.projections ?? 'qkvz';
    assertOneOf(op, 'projections', this.projections, DELTA_NET_PROJECTIONS);
  }

  override build(inputShape: tfl.Shape | tfl.Shape[]): void {
    if (this.vars.size > 0) return;
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    const h = shape[shape.length - 1];
    if (h == null) fail('GatedDeltaNet.build', `the input's last dimension must be known but got shape [${shape}]`);
    const inits = {
      normal: normalInitializer(this.initializerRange), zeros: tfl.initializers.zeros(), ones: tfl.initializers.ones(),
    };
    for (const { name, shape: dims, init } of gatedDeltaNetWeightShapes(this, h)) {
      this.vars.set(name, this.addWeight(name, dims, 'float32', inits[init]));
    }
    this.built = true;
  }

  private w(name: string): tf.Tensor {
    return this.vars.get(name)!.read();
  }

  override computeOutputShape(inputShape: tfl.Shape | tfl.Shape[]): tfl.Shape | tfl.Shape[] {
    return inputShape;
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const op = 'GatedDeltaNet.call';
      const x = (Array.isArray(inputs) ? inputs[0] : inputs) as tf.Tensor3D;
      if (x.rank !== 3) fail(op, `the input must be [batch, seq, hidden] but got shape [${x.shape}]`);
      const cache = currentSequenceContext()?.kvCache ?? null;
      const [b, s, h] = x.shape;
      const { segmentIds, positionIds } = contextIds(b, s, op);
      if (cache !== null && (segmentIds !== null || positionIds !== null)) {
        fail(op, "a sequence context with a 'kvCache' takes no 'segmentIds' or 'positionIds'");
      }
      // sameSegment(o) [B, S, 1]: 1 where token t and token t − o belong to one sample (0 before the row)
      const sameSegment = (o: number): tf.Tensor | null => {
        if (segmentIds === null || o === 0) return null;
        const earlier = tf.pad(tf.slice(segmentIds, [0, 0], [b, Math.max(s - o, 0)]), [[0, 0], [Math.min(o, s), 0]], -1);
        return tf.expandDims(tf.cast(tf.equal(segmentIds, earlier), 'float32'), 2);
      };
      const { numKeyHeads: nk, numValueHeads: nv, keyHeadDim: dk, valueHeadDim: dv, convKernel: kw } = this;
      const r = nv / nk;
      const x2 = tf.reshape(x, [b * s, h]);
      const project = (name: string, width: number) => tf.reshape(tf.matMul(x2, this.w(name), false, true), [b, s, width]);
      let mixed: tf.Tensor; let z: tf.Tensor; let beta0: tf.Tensor; let a: tf.Tensor;
      if (this.projections === 'qkvz') {
        // fix_query_key_value_ordering: per key head [q dk, k dk, v r·dv, z r·dv] and [b r, a r]
        const qkvz = tf.reshape(project('in_proj_qkvz.weight', nk * (2 * dk + 2 * r * dv)), [b, s, nk, 2 * dk + 2 * r * dv]);
        const [q0, k0, v0, z0] = tf.split(qkvz, [dk, dk, r * dv, r * dv], 3);
        const ba = tf.reshape(project('in_proj_ba.weight', 2 * nv), [b, s, nk, 2 * r]);
        [beta0, a] = tf.split(ba, [r, r], 3).map(t => tf.reshape(t, [b, s, nv]));
        mixed = tf.concat([tf.reshape(q0, [b, s, nk * dk]), tf.reshape(k0, [b, s, nk * dk]), tf.reshape(v0, [b, s, nv * dv])], 2);
        z = z0;
      } else {
        mixed = project('in_proj_qkv.weight', 2 * nk * dk + nv * dv);
        z = project('in_proj_z.weight', nv * dv);
        beta0 = project('in_proj_b.weight', nv);
        a = project('in_proj_a.weight', nv);
      }
      // causal depthwise conv1d: out[t] = Σ_j w[:, j]·x[t − (K−1) + j], x zero before the sequence
      const channels = 2 * nk * dk + nv * dv;
      // the K−1 inputs before this call's first token: the cache's, else zeros
      const convKey = `${this.name}/conv`;
      const before = cache?.state(convKey) ?? tf.zeros([b, kw - 1, channels]);
      if (before.shape[0] !== b) {
        fail(op, `the cache holds ${before.shape[0]} rows for '${this.name}' but got ${b}: a cache serves one batch; start a new one for another`);
      }
      const padded = tf.concat([before, mixed], 1);                                // [B, K−1+S, C]
      if (cache !== null) cache.setState(convKey, tf.slice(padded, [0, s, 0], [b, kw - 1, channels]));
      const taps = tf.reshape(this.w('conv1d.weight'), [channels, kw]);
      let conv: tf.Tensor = tf.zeros([b, s, channels]);
      for (let j = 0; j < kw; j++) {
        let shifted = tf.slice(padded, [0, j, 0], [b, s, channels]);              // x[t − (K−1−j)]
        const same = sameSegment(kw - 1 - j);
        if (same !== null) shifted = tf.mul(shifted, same);
        conv = tf.add(conv, tf.mul(shifted, tf.reshape(tf.slice(taps, [0, j], [channels, 1]), [channels])));
      }
      const activated = tf.mul(conv, tf.sigmoid(conv));
      const [qc, kc, vc] = tf.split(activated, [nk * dk, nk * dk, nv * dv], 2);
      // [B, S, n·d] → [B·nv, S, d], each key head repeated for its r value heads
      const valueHeads = (t: tf.Tensor, n: number, d: number) => {
        let heads = tf.reshape(t, [b, s, n, d]);
        // rank 4 (tfjs's Tile gradient stops at rank 4)
        if (n !== nv) heads = tf.reshape(tf.tile(tf.reshape(heads, [b * s, n, 1, d]), [1, 1, r, 1]), [b, s, nv, d]);
        return tf.reshape(tf.transpose(heads, [0, 2, 1, 3]), [b * nv, s, d]);
      };
      const query = tf.mul(l2norm(valueHeads(qc, nk, dk)), 1 / Math.sqrt(dk));
      const key = l2norm(valueHeads(kc, nk, dk));
      const value = valueHeads(vc, nv, dv);
      const perHead = (t: tf.Tensor) => tf.reshape(tf.transpose(t, [0, 2, 1]), [b * nv, s, 1]);   // [B, S, nv] → [B·nv, S, 1]
      const beta = perHead(tf.sigmoid(beta0));
      let decay = perHead(tf.exp(tf.mul(tf.neg(tf.exp(this.w('A_log'))), tf.softplus(tf.add(a, this.w('dt_bias'))))));
      const continues = sameSegment(1);                                            // a sample's first token: state reset
      if (continues !== null) decay = tf.mul(decay, perHead(tf.tile(continues, [1, 1, nv])));
      const n = b * nv;
      const stateKey = `${this.name}/recurrent`;
      let state: tf.Tensor = cache?.state(stateKey) ?? tf.zeros([n, dk, dv]);
      const outputs: tf.Tensor[] = [];
      const at = (t: tf.Tensor, i: number) => tf.slice(t, [0, i, 0], [n, 1, t.shape[2]!]);
      for (let i = 0; i < s; i++) {
        const kt = at(key, i);                                                      // [N, 1, dk]
        state = tf.mul(state, tf.reshape(at(decay, i), [n, 1, 1]));
        const delta = tf.mul(tf.sub(at(value, i), tf.matMul(kt, state)), at(beta, i));   // [N, 1, dv]
        state = tf.add(state, tf.matMul(kt, delta, true, false));                   // + k ⊗ delta
        outputs.push(tf.matMul(at(query, i), state));                                // [N, 1, dv]
      }
      if (cache !== null) cache.setState(stateKey, state);
      const core = tf.transpose(tf.reshape(tf.concat(outputs, 1), [b, nv, s, dv]), [0, 2, 1, 3]);   // [B, S, nv, dv]
      const gate = tf.reshape(z, [b, s, nv, dv]);
      const normed = tf.mul(rmsNorm(core, this.w('norm.weight'), this.normEpsilon), tf.mul(gate, tf.sigmoid(gate)));
      const y = tf.matMul(tf.reshape(normed, [b * s, nv * dv]), this.w('out_proj.weight'), false, true);
      return tf.reshape(y, [b, s, h]);
    });
  }

  override getConfig(): tf.serialization.ConfigDict {
    return {
      ...super.getConfig(),
      numKeyHeads: this.numKeyHeads,
      numValueHeads: this.numValueHeads,
      keyHeadDim: this.keyHeadDim,
      valueHeadDim: this.valueHeadDim,
      convKernel: this.convKernel,
      ...(this.projections === 'separate' ? { projections: 'separate' } : {}),
      normEpsilon: this.normEpsilon,
      initializerRange: this.initializerRange,
    };
  }
}
tf.serialization.registerClass(GatedDeltaNet);
