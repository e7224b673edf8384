/**
 * DeepSeek-V3's multi-head latent attention (MLA), as transformers' DeepseekV3Attention computes it:
 *
 *   q        = x·W_qᵀ, or x·W_qaᵀ → RMSNorm → ·W_qbᵀ (q_lora_rank)   [T, nh·(nope + rope)]
 *   [c, k_r] = x·W_kvaᵀ (kv_a_proj_with_mqa)                        [T, kv_lora_rank + rope]
 *   [k_n, v] = RMSNorm(c)·W_kvbᵀ                                     [T, nh·(nope + v)]
 *   k        = [k_n, rope(k_r)]  (k_r one head, shared by all)      q = [q_n, rope(q_r)]
 *   out      = softmax(q·kᵀ · scale + mask)·v ·W_oᵀ
 *
 * Mistral 4 adds YaRN frequencies on the rope part (`ropeScaling`), a softmax scale other than
 * 1/√(nope + rope) (YaRN's mscale², `softmaxScale`), and Llama 4's position scaling of the queries
 * (`positionScaling`: q ·= 1 + β·ln(1 + floor(position / original context))).
 *
 * Rope acts on the rope part only; with rope_interleave (the Hub checkpoints' layout) its pairs
 * are adjacent (2i, 2i+1), so they are first de-interleaved (evens then odds) and then rotated
 * half-by-half, as transformers does: the same permutation on q and k leaves q·k unchanged.
 * Packing and padding (segmentIds, positionIds) and the generation KV cache come from the
 * sequence context, as in RotaryAttention; the cache holds the per-head keys and values.
 * With `indexer` (glm_moe_dsa's DeepSeek sparse attention, src/layers/dsa_indexer.ts), each query
 * attends only the `indexer.topK` keys its indexer scores best (the cache then also holds the
 * indexer's keys).
 *
 * Weights keep PyTorch's [out, in] layout and HF's names relative to the module
 * ('kv_b_proj.weight', ...), so a checkpoint tensor `<layer name>.<weight name>` is written as it is.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type { LayerArgs } from '@tensorflow/tfjs-layers/dist/engine/topology.js';
import { scaledDotProductAttention } from '../ops/attention_core.js';
import { assertFiniteNumber, assertInteger, fail } from '../ops/validate.js';
import { describeValue } from '../util/describe.js';
import { causalMask, contextIds, sharedAttentionMask, sharedRotaryTables } from './attention.js';
import { checkDSAIndexerArgs, dsaIndexerKeys, dsaIndexerWeightShapes, dsaKeepMask, type DSAIndexerArgs } from './dsa_indexer.js';
import { normalInitializer } from './initializers.js';
import { rmsNorm } from './rms_norm.js';
import { applyRotary, deinterleavePairs as deinterleave, rotaryTables, rotaryTablesAt, type RopeScaling } from './rotary.js';
import { currentSequenceContext } from './sequence_context.js';

export interface MLAAttentionArgs extends LayerArgs {
  numHeads: number;
  /** rank of the query compression (q_a_proj → q_a_layernorm → q_b_proj); null: a plain q_proj */
  qLoraRank: number | null;
  /** rank of the key/value compression (kv_lora_rank) */
  kvLoraRank: number;
  /** per-head query/key width without rope (qk_nope_head_dim) */
  qkNopeHeadDim: number;
  /** per-head query/key width with rope (qk_rope_head_dim), even */
  qkRopeHeadDim: number;
  /** per-head value width (v_head_dim) */
  vHeadDim: number;
  /** rope base (HF rope_theta) */
  ropeTheta: number;
  /** rope pairs adjacent (2i, 2i+1) in the weights (HF rope_interleave); default true */
  ropeInterleave?: boolean;
  /** biases on q_a_proj, kv_a_proj_with_mqa and o_proj (HF attention_bias); default false */
  attentionBias?: boolean;
  /** epsilon of q_a_layernorm and kv_a_layernorm (transformers builds them with its default 1e-6) */
  normEpsilon?: number;
  /** std of the normal initializer (HF initializer_range); default 0.02 */
  initializerRange?: number;
  /** DeepSeek sparse attention's token indexer (glm_moe_dsa); default null: every key attended */
  indexer?: DSAIndexerArgs | null;
  /** YaRN frequencies for the rope part (Mistral 4); null/absent: the default rope */
  ropeScaling?: RopeScaling;
  /** the factor on q·kᵀ; default 1/√(qkNopeHeadDim + qkRopeHeadDim) */
  softmaxScale?: number;
  /** Llama 4's query scaling by position (Mistral 4's llama_4_scaling_beta); null/absent: none */
  positionScaling?: PositionScaling | null;
}

/** q at position p is multiplied by 1 + beta·ln(1 + floor(p / originalMaxPositionEmbeddings)). */
export interface PositionScaling {
  beta: number;
  originalMaxPositionEmbeddings: number;
}

/** The sizes that decide MLA's weights. */
export type MLAShapeArgs = Pick<MLAAttentionArgs,
  'numHeads' | 'qLoraRank' | 'kvLoraRank' | 'qkNopeHeadDim' | 'qkRopeHeadDim' | 'vHeadDim' | 'attentionBias' | 'indexer'>;

/**
 * Every weight of an MLA layer on hidden size `hidden`, by HF name with its shape and init: the
 * one list the layer builds and the checkpoint loader expects.
 *
 * ```js
 * mlaWeightShapes({numHeads: 4, qLoraRank: null, kvLoraRank: 32, qkNopeHeadDim: 16, qkRopeHeadDim: 8, vHeadDim: 16}, 64)
 *   .find(w => w.name === 'kv_b_proj.weight').shape;  // [128, 32]
 * ```
 */
export function mlaWeightShapes(a: MLAShapeArgs, hidden: number): Array<{ name: string; shape: number[]; init: 'normal' | 'zeros' | 'ones' }> {
  const nh = a.numHeads;
  const qk = a.qkNopeHeadDim + a.qkRopeHeadDim;
  const bias = a.attentionBias ?? false;
  const out: Array<{ name: string; shape: number[]; init: 'normal' | 'zeros' | 'ones' }> = [];
  const add = (name: string, shape: number[], init: 'normal' | 'zeros' | 'ones' = 'normal') => out.push({ name, shape, init });
  if (a.qLoraRank === null) {
    add('q_proj.weight', [nh * qk, hidden]);
  } else {
    add('q_a_proj.weight', [a.qLoraRank, hidden]);
    if (bias) add('q_a_proj.bias', [a.qLoraRank], 'zeros');
    add('q_a_layernorm.weight', [a.qLoraRank], 'ones');
    add('q_b_proj.weight', [nh * qk, a.qLoraRank]);
  }
  add('kv_a_proj_with_mqa.weight', [a.kvLoraRank + a.qkRopeHeadDim, hidden]);
  if (bias) add('kv_a_proj_with_mqa.bias', [a.kvLoraRank + a.qkRopeHeadDim], 'zeros');
  add('kv_a_layernorm.weight', [a.kvLoraRank], 'ones');
  add('kv_b_proj.weight', [nh * (a.qkNopeHeadDim + a.vHeadDim), a.kvLoraRank]);
  add('o_proj.weight', [hidden, nh * a.vHeadDim]);
  if (bias) add('o_proj.bias', [hidden], 'zeros');
  if (a.indexer != null && a.qLoraRank !== null) out.push(...dsaIndexerWeightShapes(a.indexer, hidden, a.qLoraRank));
  return out;
}

export class MLAAttention extends tfl.layers.Layer {
  static className = 'MLAAttention';
  readonly numHeads: number;
  readonly qLoraRank: number | null;
  readonly kvLoraRank: number;
  readonly qkNopeHeadDim: number;
  readonly qkRopeHeadDim: number;
  readonly vHeadDim: number;
  readonly ropeTheta: number;
  readonly ropeInterleave: boolean;
  readonly attentionBias: boolean;
  readonly normEpsilon: number;
  readonly initializerRange: number;
  readonly indexer: DSAIndexerArgs | null;
  readonly ropeScaling: RopeScaling;
  readonly softmaxScale: number | null;
  readonly positionScaling: PositionScaling | null;
  private readonly vars = new Map<string, tfl.LayerVariable>();

  constructor(args: MLAAttentionArgs) {
    super(args);
    const op = 'MLAAttention';
    assertInteger(op, 'numHeads', args.numHeads, 1);
    if (args.qLoraRank !== null) assertInteger(op, 'qLoraRank', args.qLoraRank, 1);
    assertInteger(op, 'kvLoraRank', args.kvLoraRank, 1);
    assertInteger(op, 'qkNopeHeadDim', args.qkNopeHeadDim, 1);
    assertInteger(op, 'qkRopeHeadDim', args.qkRopeHeadDim, 2);
    if (args.qkRopeHeadDim % 2 !== 0) fail(op, `'qkRopeHeadDim' must be even (rotary pairs) but got ${args.qkRopeHeadDim}`);
    assertInteger(op, 'vHeadDim', args.vHeadDim, 1);
    assertFiniteNumber(op, 'ropeTheta', args.ropeTheta);
    if (args.ropeTheta <= 0) fail(op, `'ropeTheta' must be > 0 but got ${args.ropeTheta}`);
    this.normEpsilon = args.normEpsilon ?? 1e-6;
    assertFiniteNumber(op, 'normEpsilon', this.normEpsilon);
    this.numHeads = args.numHeads;
    this.qLoraRank = args.qLoraRank;
    this.kvLoraRank = args.kvLoraRank;
    this.qkNopeHeadDim = args.qkNopeHeadDim;
    this.qkRopeHeadDim = args.qkRopeHeadDim;
    this.vHeadDim = args.vHeadDim;
    this.ropeTheta = args.ropeTheta;
    this.ropeInterleave = args.ropeInterleave ?? true;
    this.attentionBias = args.attentionBias ?? false;
    this.initializerRange = args.initializerRange ?? 0.02;
    this.indexer = args.indexer ?? null;
    if (this.indexer !== null) checkDSAIndexerArgs(op, this.indexer, args.qkRopeHeadDim, args.qLoraRank);
    this.ropeScaling = args.ropeScaling ?? null;
    if (this.ropeScaling !== null && (typeof this.ropeScaling !== 'object' || this.ropeScaling.kind !== 'yarn')) {
      fail(op, `'ropeScaling' must be null or {kind: 'yarn', ...} but got ${describeValue(this.ropeScaling)}`);
    }
    this.softmaxScale = args.softmaxScale ?? null;
    if (this.softmaxScale !== null) {
      assertFiniteNumber(op, 'softmaxScale', this.softmaxScale);
      if (!(this.softmaxScale > 0)) fail(op, `'softmaxScale' must be > 0 but got ${this.softmaxScale}`);
    }
    this.positionScaling = args.positionScaling ?? null;
    if (this.positionScaling !== null) {
      assertFiniteNumber(op, 'positionScaling.beta', this.positionScaling.beta);
      assertInteger(op, 'positionScaling.originalMaxPositionEmbeddings', this.positionScaling.originalMaxPositionEmbeddings, 1);
    }
  }

  override build(inputShape: tfl.Shape | tfl.Shape[]): void {
    if (this.vars.size > 0) return;
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    const h = shape[shape.length - 1];
    if (h == null) fail('MLAAttention.build', `the input's last dimension must be known but got shape [${shape}]`);
    const inits = {
      normal: normalInitializer(this.initializerRange), zeros: tfl.initializers.zeros(), ones: tfl.initializers.ones(),
    };
    for (const { name, shape: dims, init } of mlaWeightShapes(this, h)) {
      this.vars.set(name, this.addWeight(name, dims, 'float32', inits[init]));
    }
    this.built = true;
  }

  private w(name: string): tf.Tensor {
    return this.vars.get(name)!.read();
  }

  /** x [N, in] · Wᵀ (+ b) */
  private linear(x: tf.Tensor2D, proj: string): tf.Tensor2D {
    const y = tf.matMul(x, this.w(`${proj}.weight`), false, true);
    const bias = this.vars.get(`${proj}.bias`);
    return (bias === undefined ? y : tf.add(y, bias.read())) as tf.Tensor2D;
  }

  override computeOutputShape(inputShape: tfl.Shape | tfl.Shape[]): tfl.Shape | tfl.Shape[] {
    return inputShape;
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const op = 'MLAAttention.call';
      const x = (Array.isArray(inputs) ? inputs[0] : inputs) as tf.Tensor3D;
      if (x.rank !== 3) fail(op, `the input must be [batch, seq, hidden] but got shape [${x.shape}]`);
      const [b, s, h] = x.shape;
      const nh = this.numHeads;
      const nope = this.qkNopeHeadDim;
      const rd = this.qkRopeHeadDim;
      const vd = this.vHeadDim;
      const qk = nope + rd;
      const x2 = tf.reshape(x, [b * s, h]) as tf.Tensor2D;
      const qLatent = this.qLoraRank === null ? null :
        rmsNorm(this.linear(x2, 'q_a_proj'), this.w('q_a_layernorm.weight'), this.normEpsilon) as tf.Tensor2D;
      const q = qLatent === null ? this.linear(x2, 'q_proj') : this.linear(qLatent, 'q_b_proj');
      // [B*S, n*D] → [B*n, S, D]
      const heads = (t: tf.Tensor, n: number, d: number) =>
        tf.reshape(tf.transpose(tf.reshape(t, [b, s, n, d]), [0, 2, 1, 3]), [b * n, s, d]) as tf.Tensor3D;
      const [qNope, qRope] = tf.split(heads(q, nh, qk), [nope, rd], 2) as [tf.Tensor3D, tf.Tensor3D];
      const [latent, kRopeFlat] = tf.split(this.linear(x2, 'kv_a_proj_with_mqa'), [this.kvLoraRank, rd], 1) as [tf.Tensor2D, tf.Tensor2D];
      const kv = this.linear(rmsNorm(latent, this.w('kv_a_layernorm.weight'), this.normEpsilon) as tf.Tensor2D, 'kv_b_proj');
      const [kNope, v3] = tf.split(heads(kv, nh, nope + vd), [nope, vd], 2) as [tf.Tensor3D, tf.Tensor3D];  // [B*nh, S, ·]
      let kRope = tf.reshape(kRopeFlat, [b, s, rd]) as tf.Tensor3D;                 // one key rope head per token
      let qRot = qRope;
      if (this.ropeInterleave) {
        qRot = deinterleave(qRot);
        kRope = deinterleave(kRope);
      }
      const { segmentIds, positionIds } = contextIds(b, s, op);
      const cache = currentSequenceContext()?.kvCache ?? null;
      if (cache !== null && (segmentIds !== null || positionIds !== null)) {
        fail(op, "a sequence context with a 'kvCache' takes no 'segmentIds' or 'positionIds'");
      }
      const past = cache?.seen(this.name) ?? 0;
      const { cos, sin } = positionIds === null ?
        (past === 0 ? sharedRotaryTables(s, rd, this.ropeTheta, this.ropeScaling) : rotaryTables(s, rd, this.ropeTheta, past, this.ropeScaling)) :
        rotaryTablesAt(positionIds, rd, this.ropeTheta, s, this.ropeScaling);
      qRot = applyRotary(qRot, cos, sin);
      kRope = applyRotary(kRope, cos, sin);                                        // [B, S, rd]
      // every head reads the one rope key: repeated by a broadcasting add, whose gradient is one sum
      // over the heads (Tile's is a slice and an add per head: 2·nh kernels a layer, 256 on DeepSeek-V3)
      const kRopeHeads = tf.reshape(tf.add(tf.reshape(kRope, [b, 1, s * rd]), tf.zeros([1, nh, 1])), [b * nh, s, rd]);
      let q3 = tf.concat([qNope, qRot], 2) as tf.Tensor3D;                         // [B*nh, S, qk]
      if (this.positionScaling !== null) q3 = tf.mul(q3, this.queryScales(b, s, past, positionIds)) as tf.Tensor3D;
      let k3 = tf.concat([kNope, kRopeHeads], 2) as tf.Tensor3D;                   // [B*nh, S, qk]
      let values = v3;
      let mask: tf.Tensor2D | tf.Tensor4D;
      if (cache !== null) {
        const kept = cache.append(this.name, k3, v3, null);
        [k3, values] = [kept.keys, kept.values];
        mask = causalMask(s, null, k3.shape[1], past, kept.start);
      } else {
        mask = sharedAttentionMask(s, null, segmentIds);
      }
      if (this.indexer !== null) {
        const w = (name: string) => this.w(name);
        const rope = { ropeDim: rd, interleave: this.ropeInterleave, cos, sin };
        let indexKeys = dsaIndexerKeys(x2, w, b, s, rope);                          // [B, S, d]
        // the cache keeps the indexer's keys beside the layer's own ones; they have no values
        if (cache !== null) indexKeys = cache.append(`${this.name}/indexer`, indexKeys, tf.zeros([b, s, 0]), null).keys;
        const keep = dsaKeepMask(this.indexer, x2, qLatent!, indexKeys, w, b, s, rope, mask);
        if (keep !== null) mask = tf.add(mask, keep) as tf.Tensor4D;                 // [B, 1, S, L]
      }
      // the core as one op with its own gradient
      const o = scaledDotProductAttention(q3, k3, values, mask, this.softmaxScale ?? 1 / Math.sqrt(qk));  // [B*nh, S, vd]
      const merged = tf.reshape(tf.transpose(tf.reshape(o, [b, nh, s, vd]), [0, 2, 1, 3]), [b * s, nh * vd]) as tf.Tensor2D;
      return tf.reshape(this.linear(merged, 'o_proj'), [b, s, h]);
    });
  }

  /**
   * Llama 4's query scales [B·nh, S, 1] at each token's position: past + p without position ids,
   * else the ids (packed samples restart at 0, as HF's position_ids do).
   */
  private queryScales(b: number, s: number, past: number, positionIds: tf.Tensor2D | null): tf.Tensor3D {
    const { beta, originalMaxPositionEmbeddings: context } = this.positionScaling!;
    const positions = positionIds === null ?
      tf.tile(tf.reshape(tf.range(past, past + s, 1, 'float32'), [1, s]), [b, 1]) : tf.cast(positionIds, 'float32');  // [B, S]
    const scale = tf.add(1, tf.mul(beta, tf.log1p(tf.floor(tf.div(positions, context)))));                         // [B, S]
    return tf.reshape(tf.tile(tf.reshape(scale, [b, 1, s, 1]), [1, this.numHeads, 1, 1]), [b * this.numHeads, s, 1]) as tf.Tensor3D;
  }

  override getConfig(): tf.serialization.ConfigDict {
    return {
      ...super.getConfig(),
      // Mistral 4's settings, written only when used, so deepseek_v3's config stays as it was
      ...(this.ropeScaling !== null ? { ropeScaling: { ...this.ropeScaling } } : {}),
      ...(this.softmaxScale !== null ? { softmaxScale: this.softmaxScale } : {}),
      ...(this.positionScaling !== null ? { positionScaling: { ...this.positionScaling } } : {}),
      numHeads: this.numHeads,
      qLoraRank: this.qLoraRank,
      kvLoraRank: this.kvLoraRank,
      qkNopeHeadDim: this.qkNopeHeadDim,
      qkRopeHeadDim: this.qkRopeHeadDim,
      vHeadDim: this.vHeadDim,
      ropeTheta: this.ropeTheta,
      ropeInterleave: this.ropeInterleave,
      attentionBias: this.attentionBias,
      normEpsilon: this.normEpsilon,
      initializerRange: this.initializerRange,
      indexer: this.indexer === null ? null : { ...this.indexer },
    };
  }
}
tf.serialization.registerClass(MLAAttention);
