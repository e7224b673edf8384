/**
 * Causal self-attention with rotary position embeddings and grouped KV heads, plus the per-family
 * details the supported MoE models need: q/k/v (and o) biases, q/k RMSNorm per head (Qwen3-MoE)
 * or over the whole projection (OLMoE), OLMoE's clip_qkv, an optional sliding window, partial
 * rotary (GLM-4.5-MoE rotates only the first rotaryDim of each head's D), YaRN rope, gpt-oss's
 * attention sinks (a learned logit per head that joins every softmax denominator), interleaved
 * rope pairs (ERNIE-4.5; Llama 4's complex rope), Hunyuan's per-head q/k norms after rope, and
 * Llama 4's layers: a weightless L2 (RMS) q/k norm, NoPE layers (no rope) whose queries are scaled
 * by the temperature tuning, and chunked attention.
 *
 * Weights keep PyTorch's [out, in] layout and HF's names relative to the attention module
 * ('q_proj.weight', 'q_proj.bias', 'q_norm.weight', ...), so a checkpoint tensor
 * `<layer name>.<weight name>` is written as it is.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type { LayerArgs } from '@tensorflow/tfjs-layers/dist/engine/topology.js';
import { assertFiniteNumber, assertInteger, assertOneOf, assertTensor, fail } from '../ops/validate.js';
import { scaledDotProductAttention } from '../ops/attention_core.js';
import { applyRotaryToHeads } from '../ops/rotary.js';
import { passConstant } from '../ops/pass_constants.js';
import { describeValue } from '../util/describe.js';
import { rmsNorm } from './rms_norm.js';
import { applyRotary, deinterleavePairs, rotaryTables, rotaryTablesAt, type RopeScaling } from './rotary.js';
import { currentSequenceContext } from './sequence_context.js';
import { normalInitializer } from './initializers.js';
import { ATTENTION_PROJECTIONS, LinearLoRA, type SavedLinearAdapter } from './linear_lora.js';
import { DENSE_STORAGES, addDenseWeight, type DenseStorage } from './dense_storage.js';

export type QKNorm = 'none' | 'perHead' | 'full' | 'perHeadAfterRope' | 'l2';
export const QK_NORMS: readonly QKNorm[] = ['none', 'perHead', 'full', 'perHeadAfterRope', 'l2'];

/**
 * Llama 4's attention temperature tuning on NoPE layers: the query at position p is multiplied by
 * 1 + attnScale·ln(1 + floor((p + 1) / floorScale)) (HF attn_scale, floor_scale).
 */
export interface TemperatureTuning {
  attnScale: number;
  floorScale: number;
}

export interface RotaryAttentionArgs extends LayerArgs {
  numHeads: number;
  /** grouped KV heads; must divide numHeads */
  numKeyValueHeads: number;
  /** D, the per-head width */
  headDim: number;
  /** rope base (HF rope_theta) */
  ropeTheta: number;
  /**
   * the leading part of each head that rope rotates (HF head_dim · partial_rotary_factor), the
   * rest passes unrotated; default headDim (all of it)
   */
  rotaryDim?: number;
  /** biases on q, k and v projections (Qwen2-MoE qkv_bias, attention_bias elsewhere) */
  qkvBias?: boolean;
  /** bias on the output projection (Qwen3-MoE and OLMoE attention_bias) */
  outputBias?: boolean;
  /**
   * 'perHead': RMSNorm over D on each head (Qwen3-MoE); 'full': over the whole projection (OLMoE);
   * 'perHeadAfterRope': over D on each rotated head, weights 'query_layernorm' / 'key_layernorm' (Hunyuan);
   * 'l2': a weightless RMS norm over D on each head (Llama 4's use_qk_norm)
   */
  qkNorm?: QKNorm;
  /**
   * rope pairs adjacent dimensions (2i, 2i+1) in each head, GPT-J style (ERNIE-4.5, Llama 4's complex
   * rope); default false: (i, i + D/2)
   */
  ropeInterleave?: boolean;
  /** epsilon of the q/k norms (HF rms_norm_eps) */
  normEpsilon?: number;
  /** clamp q, k, v to [−c, c] after projection and norm (OLMoE clip_qkv) */
  clipQKV?: number | null;
  /** a query attends to keys at distance < window (Mistral-style); null = full causal */
  slidingWindow?: number | null;
  /** scaled rope frequencies (YaRN); null/absent: the default rope */
  ropeScaling?: RopeScaling;
  /** false: a NoPE layer, no rope at all (Llama 4's no_rope_layers); default true */
  rope?: boolean;
  /** Llama 4's query temperature tuning (its NoPE layers); null/absent: none */
  temperatureTuning?: TemperatureTuning | null;
  /**
   * Llama 4's chunked attention: a query attends only keys of its own chunk of this many positions
   * (chunks start at position 0); null/absent: none
   */
  attentionChunkSize?: number | null;
  /**
   * gpt-oss attention sinks: a learned logit per head ('sinks' [numHeads]) joined to each query's
   * softmax over its keys and dropped after it, so a query may give weight to no key at all
   */
  sinks?: boolean;
  /**
   * Qwen3-Next's gated attention: q_proj gives each head its queries and as many gate logits
   * ([q_h, gate_h] per head), and the attention output is multiplied by sigmoid(gate) before
   * o_proj. Default false.
   */
  outputGate?: boolean;
  /** q_norm / k_norm scale by (1 + weight), zeros at init (Qwen3-Next); default false */
  qkNormZeroCentered?: boolean;
  /** std of the normal initializer (HF initializer_range); default 0.02 */
  initializerRange?: number;
  /**
   * how q/k/v/o_proj's weights are held: 'float32' (default), or packed 'bf16' / 'f16' halves in
   * frozen int32 variables (src/layers/dense_storage.ts), decoded in each product
   */
  denseStorage?: DenseStorage;
  /** LoRA adapters on q/k/v/o_proj to create in build(), as getConfig() writes them */
  loraAdapters?: SavedLinearAdapter[];
  activeLoraAdapters?: string[];
}

/**
 * Additive mask [S, L]: 0 where query i (at position queryStart + i) may attend key j (at position
 * keyStart + j): not after it, with a window less than `window` before it, and with a `chunk` in
 * the same chunk of positions (floor(position / chunk) equal); a large negative value elsewhere.
 * Without a KV cache both starts are 0 and L = S.
 */
export function causalMask(seqLen: number, window: number | null, keyLen = seqLen, queryStart = 0, keyStart = 0,
    chunk: number | null = null): tf.Tensor2D {
  // A finite value: it vanishes in softmax exactly as −inf does, without inf − inf in any gradient.
  const blocked = -1e9;
  const data = new Float32Array(seqLen * keyLen);
  for (let i = 0; i < seqLen; i++) {
    for (let j = 0; j < keyLen; j++) {
      const distance = (queryStart + i) - (keyStart + j);
      const otherChunk = chunk !== null && Math.floor((queryStart + i) / chunk) !== Math.floor((keyStart + j) / chunk);
      if (distance < 0 || (window !== null && distance >= window) || otherChunk) data[i * keyLen + j] = blocked;
    }
  }
  return tf.tensor2d(data, [seqLen, keyLen]);
}

/**
 * The additive mask of a pass: causalMask [S, S] without segments; with `segmentIds` [B, S] (see
 * SequenceContext) [B, 1, S, S], where a query also attends only keys of its own segment (packed
 * samples do not see each other; padding sees padding only, so no row is all blocked).
 */
export function attentionMask(seqLen: number, window: number | null, segmentIds: tf.Tensor2D | null,
    chunk: number | null = null): tf.Tensor2D | tf.Tensor4D {
  const causal = causalMask(seqLen, window, seqLen, 0, 0, chunk);
  if (segmentIds === null) return causal;
  const b = segmentIds.shape[0];
  const same = tf.equal(tf.reshape(segmentIds, [b, 1, seqLen, 1]), tf.reshape(segmentIds, [b, 1, 1, seqLen]));  // [B, 1, S, S]
  return tf.add(causal, tf.mul(tf.sub(1, tf.cast(same, 'float32')), -1e9)) as tf.Tensor4D;
}

/**
 * attentionMask, built once per forward pass and shared by its layers (passConstant) where it
 * depends on the lengths only, not on segment ids.
 */
export function sharedAttentionMask(seqLen: number, window: number | null, segmentIds: tf.Tensor2D | null,
    chunk: number | null = null): tf.Tensor2D | tf.Tensor4D {
  if (segmentIds !== null) return attentionMask(seqLen, window, segmentIds, chunk);
  return passConstant(`attentionMask/${seqLen}/${window}/${chunk}`, () => attentionMask(seqLen, window, null, chunk));
}

/** rotaryTables of positions 0..seqLen−1, built once per forward pass and shared by its layers (passConstant). */
export function sharedRotaryTables(seqLen: number, headDim: number, theta: number, scaling: RopeScaling):
    { cos: tf.Tensor2D; sin: tf.Tensor2D } {
  return passConstant(`rotaryTables/${seqLen}/${headDim}/${theta}/${JSON.stringify(scaling)}`,
    () => rotaryTables(seqLen, headDim, theta, 0, scaling));
}

/**
 * The context's segment and position ids, checked against the input's [batch, seq]; null where
 * absent. `op` names the attention layer in errors.
 */
export function contextIds(b: number, s: number, op = 'RotaryAttention.call'): { segmentIds: tf.Tensor2D | null; positionIds: tf.Tensor2D | null } {
  const context = currentSequenceContext();
  const get = (name: 'segmentIds' | 'positionIds') => {
    const t = context?.[name] ?? null;
    if (t === null) return null;
    assertTensor(op, `context.${name}`, t, 2, 'int32');
    if (t.shape[0] !== b || t.shape[1] !== s) fail(op, `'context.${name}' must be [batch, seq] [${b},${s}] but is [${t.shape}]`);
    return t;
  };
  return { segmentIds: get('segmentIds'), positionIds: get('positionIds') };
}

/** A RopeScaling's numbers: each finite, factor >= 1, a positive context and attention factor. */
function checkRopeScaling(op: string, scaling: NonNullable<RopeScaling>): void {
  if (scaling !== null && typeof scaling === 'object' && scaling.kind === 'llama3') {
    for (const key of ['factor', 'lowFreqFactor', 'highFreqFactor'] as const) assertFiniteNumber(op, `ropeScaling.${key}`, scaling[key]);
    if (!(scaling.lowFreqFactor > 0 && scaling.highFreqFactor >= scaling.lowFreqFactor)) {
      fail(op, `'ropeScaling' needs highFreqFactor >= lowFreqFactor > 0 but got lowFreqFactor ${scaling.lowFreqFactor}, ` +
          `highFreqFactor ${scaling.highFreqFactor}`);
    }
    assertInteger(op, 'ropeScaling.originalMaxPositionEmbeddings', scaling.originalMaxPositionEmbeddings, 1);
    return;
  }
  if (scaling === null || typeof scaling !== 'object' || scaling.kind !== 'yarn') {
    fail(op, `'ropeScaling' must be null, {kind: 'yarn', ...} or {kind: 'llama3', ...} but got ${describeValue(scaling)}`);
  }
  for (const key of ['factor', 'betaFast', 'betaSlow', 'attentionFactor'] as const) {
    assertFiniteNumber(op, `ropeScaling.${key}`, scaling[key]);
  }
  if (scaling.factor < 1) fail(op, `'ropeScaling.factor' must be >= 1 but got ${scaling.factor}`);
  if (scaling.attentionFactor <= 0) fail(op, `'ropeScaling.attentionFactor' must be > 0 but got ${scaling.attentionFactor}`);
  if (!(scaling.betaSlow > 0 && scaling.betaFast > scaling.betaSlow)) {
    fail(op, `'ropeScaling' needs betaFast > betaSlow > 0 but got betaFast ${scaling.betaFast}, betaSlow ${scaling.betaSlow}`);
  }
  assertInteger(op, 'ropeScaling.originalMaxPositionEmbeddings', scaling.originalMaxPositionEmbeddings, 1);
  if (typeof scaling.truncate !== 'boolean') fail(op, `'ropeScaling.truncate' must be a boolean but got ${describeValue(scaling.truncate)}`);
}

export class RotaryAttention extends tfl.layers.Layer {
  static className = 'RotaryAttention';
  readonly numHeads: number;
  readonly numKeyValueHeads: number;
  readonly headDim: number;
  readonly ropeTheta: number;
  readonly rotaryDim: number;
  readonly qkvBias: boolean;
  readonly outputBias: boolean;
  readonly qkNorm: QKNorm;
  readonly ropeInterleave: boolean;
  readonly normEpsilon: number;
  readonly clipQKV: number | null;
  readonly slidingWindow: number | null;
  readonly ropeScaling: RopeScaling;
  readonly sinks: boolean;
  readonly outputGate: boolean;
  readonly qkNormZeroCentered: boolean;
  readonly rope: boolean;
  readonly temperatureTuning: TemperatureTuning | null;
  readonly attentionChunkSize: number | null;
  readonly initializerRange: number;
  readonly denseStorage: DenseStorage;
  private readonly vars = new Map<string, tfl.LayerVariable>();
  /** LoRA adapters on q_proj, k_proj, v_proj and o_proj (PEFT's lora.Linear state) */
  readonly lora: LinearLoRA;

  constructor(args: RotaryAttentionArgs) {
    super(args);
    const saved = LinearLoRA.savedAdapters(args.loraAdapters, args.activeLoraAdapters);
    this.lora = new LinearLoRA({
      layer: this, projections: ATTENTION_PROJECTIONS,
      weight: p => this.vars.get(`${p}.weight`)!,
      baseWeights: () => [...this.vars.values()],
    }, saved.adapters, saved.active);
    const op = 'RotaryAttention';
    assertInteger(op, 'numHeads', args.numHeads, 1);
    assertInteger(op, 'numKeyValueHeads', args.numKeyValueHeads, 1, args.numHeads);
    if (args.numHeads % args.numKeyValueHeads !== 0) {
      fail(op, `'numKeyValueHeads' (${args.numKeyValueHeads}) must divide 'numHeads' (${args.numHeads})`);
    }
    assertInteger(op, 'headDim', args.headDim, 2);
    if (args.headDim % 2 !== 0) fail(op, `'headDim' must be even (rotary pairs) but got ${args.headDim}`);
    assertFiniteNumber(op, 'ropeTheta', args.ropeTheta);
    if (args.ropeTheta <= 0) fail(op, `'ropeTheta' must be > 0 but got ${args.ropeTheta}`);
    this.rotaryDim = args.rotaryDim ?? args.headDim;
    assertInteger(op, 'rotaryDim', this.rotaryDim, 2, args.headDim);
    if (this.rotaryDim % 2 !== 0) fail(op, `'rotaryDim' must be even (rotary pairs) but got ${this.rotaryDim}`);
    this.qkNorm = args.qkNorm ?? 'none';
    assertOneOf(op, 'qkNorm', this.qkNorm, QK_NORMS);
    this.ropeInterleave = args.ropeInterleave ?? false;
    if (typeof this.ropeInterleave !== 'boolean') {
      fail(op, `'ropeInterleave' must be a boolean but got ${describeValue(this.ropeInterleave)}`);
    }
    this.normEpsilon = args.normEpsilon ?? 1e-6;
    assertFiniteNumber(op, 'normEpsilon', this.normEpsilon);
    this.clipQKV = args.clipQKV ?? null;
    if (this.clipQKV !== null) {
      assertFiniteNumber(op, 'clipQKV', this.clipQKV);
      if (this.clipQKV <= 0) fail(op, `'clipQKV' must be > 0 but got ${this.clipQKV}`);
    }
    this.slidingWindow = args.slidingWindow ?? null;
    if (this.slidingWindow !== null) assertInteger(op, 'slidingWindow', this.slidingWindow, 1);
    this.ropeScaling = args.ropeScaling ?? null;
    if (this.ropeScaling !== null) checkRopeScaling(op, this.ropeScaling);
    this.sinks = args.sinks ?? false;
    if (typeof this.sinks !== 'boolean') fail(op, `'sinks' must be a boolean but got ${describeValue(this.sinks)}`);
    this.outputGate = args.outputGate ?? false;
    this.qkNormZeroCentered = args.qkNormZeroCentered ?? false;
    this.rope = args.rope ?? true;
    if (typeof this.rope !== 'boolean') fail(op, `'rope' must be a boolean but got ${describeValue(this.rope)}`);
    this.temperatureTuning = args.temperatureTuning ?? null;
    if (this.temperatureTuning !== null) {
      assertFiniteNumber(op, 'temperatureTuning.attnScale', this.temperatureTuning.attnScale);
      assertFiniteNumber(op, 'temperatureTuning.floorScale', this.temperatureTuning.floorScale);
      if (!(this.temperatureTuning.floorScale > 0)) {
        fail(op, `'temperatureTuning.floorScale' must be > 0 but got ${this.temperatureTuning.floorScale}`);
      }
    }
    this.attentionChunkSize = args.attentionChunkSize ?? null;
    if (this.attentionChunkSize !== null) assertInteger(op, 'attentionChunkSize', this.attentionChunkSize, 1);
    this.numHeads = args.numHeads;
    this.numKeyValueHeads = args.numKeyValueHeads;
    this.headDim = args.headDim;
    this.ropeTheta = args.ropeTheta;
    this.qkvBias = args.qkvBias ?? false;
    this.outputBias = args.outputBias ?? false;
    this.initializerRange = args.initializerRange ?? 0.02;
    this.denseStorage = args.denseStorage ?? 'float32';
    assertOneOf(op, 'denseStorage', this.denseStorage, DENSE_STORAGES);
  }

  override build(inputShape: tfl.Shape | tfl.Shape[]): void {
    if (this.vars.size > 0) return;
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    const h = shape[shape.length - 1];
    if (h == null) fail('RotaryAttention.build', `the input's last dimension must be known but got shape [${shape}]`);
    const q = this.numHeads * this.headDim;
    const kv = this.numKeyValueHeads * this.headDim;
    const normal = normalInitializer(this.initializerRange);
    const zeros = tfl.initializers.zeros();
    const ones = tfl.initializers.ones();
    const add = (name: string, dims: number[], init: ReturnType<typeof tfl.initializers.zeros>) =>
      this.vars.set(name, this.addWeight(name, dims, 'float32', init));
    const addProjection = (name: string, dims: [number, number]) =>
      this.vars.set(name, addDenseWeight(this.addWeight.bind(this), name, dims, this.denseStorage, normal));
    addProjection('q_proj.weight', [this.outputGate ? 2 * q : q, h]);
    addProjection('k_proj.weight', [kv, h]);
    addProjection('v_proj.weight', [kv, h]);
    addProjection('o_proj.weight', [h, q]);
    if (this.qkvBias) {
      add('q_proj.bias', [this.outputGate ? 2 * q : q], zeros);
      add('k_proj.bias', [kv], zeros);
      add('v_proj.bias', [kv], zeros);
    }
    if (this.outputBias) add('o_proj.bias', [h], zeros);
    if (this.sinks) add('sinks', [this.numHeads], normal);  // transformers inits them normal(0, initializer_range)
    if (this.qkNorm === 'perHead') {
      add('q_norm.weight', [this.headDim], this.qkNormZeroCentered ? zeros : ones);
      add('k_norm.weight', [this.headDim], this.qkNormZeroCentered ? zeros : ones);
    } else if (this.qkNorm === 'full') {
      add('q_norm.weight', [q], ones);
      add('k_norm.weight', [kv], ones);
    } else if (this.qkNorm === 'perHeadAfterRope') {
      add('query_layernorm.weight', [this.headDim], ones);
      add('key_layernorm.weight', [this.headDim], ones);
    }
    this.built = true;
    this.lora.buildPending();
  }

  private w(name: string): tf.Tensor {
    return this.vars.get(name)!.read();
  }

  /** x [N, in] · Wᵀ (+ b), plus the projection's applied LoRA adapters */
  private linear(x: tf.Tensor2D, proj: string, bias: boolean): tf.Tensor2D {
    return this.lora.apply(x, proj, bias ? this.vars.get(`${proj}.bias`)! : null);
  }

  override computeOutputShape(inputShape: tfl.Shape | tfl.Shape[]): tfl.Shape | tfl.Shape[] {
    return inputShape;
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const x = (Array.isArray(inputs) ? inputs[0] : inputs) as tf.Tensor3D;
      if (x.rank !== 3) fail('RotaryAttention.call', `the input must be [batch, seq, hidden] but got shape [${x.shape}]`);
      const [b, s, h] = x.shape;
      const nh = this.numHeads;
      const nkv = this.numKeyValueHeads;
      const d = this.headDim;
      const x2 = tf.reshape(x, [b * s, h]) as tf.Tensor2D;
      let q = this.linear(x2, 'q_proj', this.qkvBias);                 // [B*S, nh*D] ([B*S, nh*2D] with outputGate)
      let gate: tf.Tensor | null = null;
      if (this.outputGate) {
        const [qh, gh] = tf.split(tf.reshape(q, [b * s, nh, 2 * d]), [d, d], 2);
        [q, gate] = [tf.reshape(qh, [b * s, nh * d]) as tf.Tensor2D, tf.reshape(gh, [b * s, nh * d])];
      }
      let k = this.linear(x2, 'k_proj', this.qkvBias);                 // [B*S, nkv*D]
      let v = this.linear(x2, 'v_proj', this.qkvBias);                 // [B*S, nkv*D]
      if (this.qkNorm === 'full') {
        q = rmsNorm(q, this.w('q_norm.weight'), this.normEpsilon) as tf.Tensor2D;
        k = rmsNorm(k, this.w('k_norm.weight'), this.normEpsilon) as tf.Tensor2D;
      }
      if (this.clipQKV !== null) {
        const c = this.clipQKV;
        [q, k, v] = [q, k, v].map(t => tf.clipByValue(t, -c, c));
      }
      const { segmentIds, positionIds } = contextIds(b, s);
      // generation: the new tokens come after the cached ones (cachedPositions)
      const cached = this.cachedPositions(s, segmentIds !== null || positionIds !== null);
      const tables = !this.rope ? null : cached.rotary ??
        (positionIds === null ? sharedRotaryTables(s, this.rotaryDim, this.ropeTheta, this.ropeScaling) :
          rotaryTablesAt(positionIds, this.rotaryDim, this.ropeTheta, s, this.ropeScaling));
      // [B*S, n*D] → [B*n, S, D], rotated for q and k; the per-head norm acts on the last axis before the transpose
      const heads = (t: tf.Tensor, n: number, rotated: boolean, norm?: string): tf.Tensor3D => {
        let t4 = tf.reshape(t, [b, s, n, d]) as tf.Tensor4D;          // [B, S, n, D]
        if (norm !== undefined) {
          t4 = rmsNorm(t4, this.w(norm), this.normEpsilon, { zeroCentered: this.qkNormZeroCentered }) as tf.Tensor4D;
        }
        // the whole head rotated by rotate-half: the transpose and the rotation in one op
        const whole = this.rotaryDim === d && !this.ropeInterleave;
        if (rotated && tables !== null && whole) return applyRotaryToHeads(t4, tables.cos, tables.sin);
        const t3 = tf.reshape(tf.transpose(t4, [0, 2, 1, 3]), [b * n, s, d]) as tf.Tensor3D;
        return rotated && tables !== null ? this.rotate(t3, tables.cos, tables.sin) : t3;
      };
      const perHead = this.qkNorm === 'perHead';
      let q3 = heads(q, nh, true, perHead ? 'q_norm.weight' : undefined);    // [B*nh, S, D]
      let k3 = heads(k, nkv, true, perHead ? 'k_norm.weight' : undefined);   // [B*nkv, S, D]
      let v3 = heads(v, nkv, false);                                         // [B*nkv, S, D]
      if (this.qkNorm === 'perHeadAfterRope') {
        q3 = rmsNorm(q3, this.w('query_layernorm.weight'), this.normEpsilon) as tf.Tensor3D;
        k3 = rmsNorm(k3, this.w('key_layernorm.weight'), this.normEpsilon) as tf.Tensor3D;
      }
      if (this.qkNorm === 'l2') {
        // a rotation keeps each head's norm, so normalizing after rope (Llama 4) equals before
        const ones = tf.ones([d]);
        q3 = rmsNorm(q3, ones, this.normEpsilon, { trainWeight: false }) as tf.Tensor3D;
        k3 = rmsNorm(k3, ones, this.normEpsilon, { trainWeight: false }) as tf.Tensor3D;
      }
      if (this.temperatureTuning !== null) q3 = tf.mul(q3, this.queryTemperature(s, cached.past ?? 0)) as tf.Tensor3D;
      let mask: tf.Tensor2D | tf.Tensor4D;
      [k3, v3, mask] = cached.attend?.(k3, v3) ?? [k3, v3, sharedAttentionMask(s, this.slidingWindow, segmentIds, this.attentionChunkSize)];
      // the core as one op with its own gradient (grouped KV heads read in place); with sinks, composed
      const o = this.sinks ? this.attendWithSinks(q3, k3, v3, mask, b) :
        scaledDotProductAttention(q3, k3, v3, mask, 1 / Math.sqrt(d));  // [B*nh, S, D]
      let merged = tf.reshape(tf.transpose(tf.reshape(o, [b, nh, s, d]), [0, 2, 1, 3]), [b * s, nh * d]) as tf.Tensor2D;
      if (gate !== null) merged = tf.mul(merged, tf.sigmoid(gate));
      return tf.reshape(this.linear(merged, 'o_proj', this.outputBias), [b, s, h]);
    });
  }

  /**
   * Llama 4's temperature tuning [S, 1] for the queries at positions past..past+S−1: HF uses the
   * row's position (cache_position), not a packed sample's own position.
   */
  private queryTemperature(s: number, past: number): tf.Tensor2D {
    const { attnScale, floorScale } = this.temperatureTuning!;
    const scales = Float32Array.from({ length: s },
        (_, p) => Math.log1p(Math.floor((past + p + 1) / floorScale)) * attnScale + 1);
    return tf.tensor2d(scales, [s, 1]);
  }

  /**
   * rope on the first rotaryDim of each head [N, S, D]; the rest passes as it is (partial rotary).
   * Interleaved pairs are de-interleaved first and left so (deinterleavePairs): q and k both are,
   * so their products are GPT-J's, and v is untouched.
   */
  private rotate(x: tf.Tensor3D, cos: tf.Tensor2D | tf.Tensor3D, sin: tf.Tensor2D | tf.Tensor3D): tf.Tensor3D {
    const rd = this.rotaryDim;
    const rope = (t: tf.Tensor3D) => applyRotary(this.ropeInterleave ? deinterleavePairs(t) : t, cos, sin);
    if (rd === this.headDim) return rope(x);
    const [rotated, passed] = tf.split(x, [rd, this.headDim - rd], 2) as [tf.Tensor3D, tf.Tensor3D];
    return tf.concat([rope(rotated), passed], 2) as tf.Tensor3D;
  }

  /**
   * gpt-oss's core, composed on the tape: each KV head repeated for its query heads, then
   * softmaxWithSinks(q·kᵀ/√D + mask)·v over q3 [B·nh, S, D] and k3, v3 [B·nkv, L, D].
   */
  private attendWithSinks(q3: tf.Tensor3D, k3: tf.Tensor3D, v3: tf.Tensor3D, mask: tf.Tensor2D | tf.Tensor4D,
      b: number): tf.Tensor3D {
    const [nh, nkv, d, s] = [this.numHeads, this.numKeyValueHeads, this.headDim, q3.shape[1]];
    const keyLen = k3.shape[1];                                      // L = S without a cache
    const rep = nh / nkv;
    if (rep > 1) {
      // query head h reads KV head floor(h / rep): repeat each KV head rep times in place
      const repeat = (t: tf.Tensor3D) =>
        tf.reshape(tf.tile(tf.reshape(t, [b * nkv, 1, keyLen * d]), [1, rep, 1]), [b * nh, keyLen, d]) as tf.Tensor3D;
      k3 = repeat(k3);                                               // [B*nh, L, D]
      v3 = repeat(v3);                                               // [B*nh, L, D]
    }
    // same-batch 3-D products only (tfjs's broadcasting batch matMul has a wrong gradient)
    const scaled = tf.mul(tf.matMul(q3, k3, false, true), 1 / Math.sqrt(d));  // [B*nh, S, L]
    // the mask: [S, L], or [B, 1, S, S] with segments
    const scores = mask.rank === 2 ? tf.add(scaled, mask) :
      tf.reshape(tf.add(tf.reshape(scaled, [b, nh, s, s]), mask), [b * nh, s, s]);  // [B*nh, S, L]
    const probs = this.softmaxWithSinks(scores as tf.Tensor3D, b);  // [B*nh, S, L]
    return tf.matMul(probs, v3);                                     // [B*nh, S, D]
  }

  /**
   * softmax over [keys..., sink] of scores [B·nh, S, L], the sink's column dropped: each head's
   * sink logit adds exp(sink) to every denominator (transformers' eager gpt-oss attention).
   */
  private softmaxWithSinks(scores: tf.Tensor3D, b: number): tf.Tensor3D {
    const [n, s, keyLen] = scores.shape;
    // broadcast by an add, not tf.tile: Tile's gradient is a slice and an add per copy (B·S of them)
    const sinks = tf.add(tf.zeros([b, this.numHeads, s, 1]), tf.reshape(this.w('sinks'), [1, this.numHeads, 1, 1]));  // [B, nh, S, 1]
    const joined = tf.concat([scores, tf.reshape(sinks, [n, s, 1])], 2);                         // [B*nh, S, L+1]
    return tf.slice(tf.softmax(joined), [0, 0, 0], [n, s, keyLen]) as tf.Tensor3D;
  }

  /**
   * With a KV cache in the sequence context (generation): the rotary tables of the S new tokens at
   * the positions after the cached ones, and `attend`, which appends their keys and values to the
   * cache and returns what they attend over (cache + new, [B·nkv, L, D]) with its causal (and
   * sliding-window) mask [S, L]. Without a cache: nothing (positions from 0, keys are the new ones).
   */
  private cachedPositions(s: number, hasSegments: boolean): {
    past?: number;
    rotary?: { cos: tf.Tensor2D; sin: tf.Tensor2D };
    attend?: (k: tf.Tensor3D, v: tf.Tensor3D) => [tf.Tensor3D, tf.Tensor3D, tf.Tensor2D];
  } {
    const cache = currentSequenceContext()?.kvCache ?? null;
    if (cache === null) return {};
    // the cache's positions run on from its length: one sample a row, no packing or padding
    if (hasSegments) fail('RotaryAttention.call', "a sequence context with a 'kvCache' takes no 'segmentIds' or 'positionIds'");
    const past = cache.seen(this.name);
    return {
      past,
      rotary: rotaryTables(s, this.rotaryDim, this.ropeTheta, past, this.ropeScaling),
      attend: (k, v) => {
        const { keys, values, start } = cache.append(this.name, k, v, this.slidingWindow);
        return [keys, values, causalMask(s, this.slidingWindow, keys.shape[1], past, start, this.attentionChunkSize)];
      },
    };
  }

  override getConfig(): tf.serialization.ConfigDict {
    return {
      ...super.getConfig(),
      numHeads: this.numHeads,
      numKeyValueHeads: this.numKeyValueHeads,
      headDim: this.headDim,
      ropeTheta: this.ropeTheta,
      rotaryDim: this.rotaryDim,
      qkvBias: this.qkvBias,
      outputBias: this.outputBias,
      qkNorm: this.qkNorm,
      ropeInterleave: this.ropeInterleave,
      normEpsilon: this.normEpsilon,
      clipQKV: this.clipQKV,
      slidingWindow: this.slidingWindow,
      ropeScaling: this.ropeScaling,
      sinks: this.sinks,
      ...(this.outputGate ? { outputGate: true } : {}),
      ...(this.denseStorage !== 'float32' ? { denseStorage: this.denseStorage } : {}),
      ...(this.qkNormZeroCentered ? { qkNormZeroCentered: true } : {}),
      // Llama 4's settings, written only when used, so the configs of the other families stay as they were
      ...(this.rope ? {} : { rope: false }),
      ...(this.temperatureTuning !== null ? { temperatureTuning: { ...this.temperatureTuning } } : {}),
      ...(this.attentionChunkSize !== null ? { attentionChunkSize: this.attentionChunkSize } : {}),
      initializerRange: this.initializerRange,
      ...this.lora.getConfig(),
    } as unknown as tf.serialization.ConfigDict;
  }
}
tf.serialization.registerClass(RotaryAttention);
