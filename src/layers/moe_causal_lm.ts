/**
 * MoECausalLM: a decoder-only MoE language model assembled from tfjs-layers pieces as a
 * functional `tfl.LayersModel` (input int32 ids [batch, seq] → logits [batch, seq, vocab]).
 *
 * Why a functional LayersModel and not a custom Model class: `model.save()` and
 * `tf.loadLayersModel()` rebuild a functional graph from model.json by class names, so the model
 * round-trips with any IOHandler and comes back as the same thing; every SparseMoE sits in
 * `model.layers` where the plugin finds and patches it; and training needs nothing special:
 * `optimizer.minimize(() => loss(model.apply(ids)))` or `tf.variableGrads` over
 * `trainableVariables(model)`.
 *
 * Layers carry HF's module paths as names ('model.embed_tokens', 'model.layers.0.self_attn',
 * 'model.layers.0.mlp', 'model.norm', 'lm_head') and their weights HF's names relative to
 * the module, so the checkpoint tensor of a weight is `<layer name>.<weight name>`, except in
 * SparseMoE, whose fused weights come from the family table (src/models/families.ts).
 *
 * Whole models: mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss (attention sinks, YaRN rope,
 * sliding and full layers by layer_types), glm4_moe (RotaryAttention with partial rotary),
 * deepseek_v3 (MLAAttention), ernie4_5_moe (interleaved rope pairs), hunyuan_v1_moe (q/k norms
 * per head after rope) and minimax_m2 (q/k norms over the whole projection, partial rotary).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import {
  familyOf, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices, type HFConfig, type ModelType,
} from '../models/families.js';
import type { ExpertActivation, LoRAMode, RoutingConfig } from '../ops/types.js';
import { fail } from '../ops/validate.js';
import { describeValue } from '../util/describe.js';
import { RotaryAttention, type QKNorm } from './attention.js';
import type { RopeScaling } from './rotary.js';
import { LMHead, TokenEmbedding } from './embedding.js';
import { MLAAttention } from './mla_attention.js';
import { RMSNorm } from './rms_norm.js';
import { SparseMoE, type ExpertStorage, type LoRAAdapterConfig } from './sparse_moe.js';
import { SwiGLUMLP } from './swiglu_mlp.js';

/** A decoder MoE LM: a functional LayersModel built by `buildMoECausalLM` (see the file comment). */
export type MoECausalLM = tfl.LayersModel;

/** The model types that load as whole models (all of MODEL_TYPES now); any other would be block-only. */
export const WHOLE_MODEL_TYPES: readonly ModelType[] = [
  'mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'gpt_oss', 'glm4_moe', 'deepseek_v3',
  'ernie4_5_moe', 'hunyuan_v1_moe', 'minimax_m2',
];

/** Why a block-only family has no whole model (none is block-only now). */
const BLOCK_ONLY_REASON: Partial<Record<ModelType, string>> = {};

/** Everything the graph needs, read from an HF config.json. */
export interface MoECausalLMConfig {
  modelType: ModelType;
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numHeads: number;
  numKeyValueHeads: number;
  headDim: number;
  ropeTheta: number;
  /** the leading part of each head that rope rotates (headDim · partial_rotary_factor) */
  rotaryDim: number;
  /** rope pairs adjacent (2i, 2i+1) in each head (ernie4_5_moe) */
  ropeInterleave: boolean;
  /** deepseek_v3's multi-head latent attention (MLAAttention) instead of RotaryAttention; else null */
  mla: MLAConfig | null;
  /** YaRN (gpt_oss); null: the default rope */
  ropeScaling: RopeScaling;
  rmsNormEps: number;
  qkvBias: boolean;
  outputBias: boolean;
  qkNorm: QKNorm;
  clipQKV: number | null;
  slidingWindow: number | null;
  /** per decoder layer, the window its attention uses (slidingWindow, or null for a full-attention layer) */
  layerWindows: Array<number | null>;
  /** attention sinks (gpt_oss) */
  sinks: boolean;
  tieWordEmbeddings: boolean;
  initializerRange: number;
  /** I of the dense MLP in the layers that are not MoE (null when every layer is MoE) */
  denseIntermediateSize: number | null;
  moeLayers: number[];
  moe: {
    numExperts: number;
    intermediateSize: number;
    routing: RoutingConfig;
    activation: ExpertActivation;
    /** DeepSeek/GLM e_score_correction_bias (expert selection only) */
    correctionBias: boolean;
    sharedExpert: { intermediateSize: number; gated: boolean } | null;
    /** gpt_oss: experts stored [E, in, out] with gate/up interleaved, expert and router biases */
    fusedInterleaved: boolean;
  };
}

/** The sizes of deepseek_v3's multi-head latent attention, as MLAAttention takes them. */
export interface MLAConfig {
  qLoraRank: number | null;
  kvLoraRank: number;
  qkNopeHeadDim: number;
  qkRopeHeadDim: number;
  vHeadDim: number;
  ropeInterleave: boolean;
  attentionBias: boolean;
}

/** DeepseekV3Config's defaults for the MLA keys a config.json leaves out. */
const MLA_DEFAULTS = { q_lora_rank: 1536, kv_lora_rank: 512, qk_nope_head_dim: 128, qk_rope_head_dim: 64, v_head_dim: 128 };

/** Model types whose attention rotates only part of each head (partial_rotary_factor), with its default. */
const PARTIAL_ROTARY_DEFAULT: Partial<Record<ModelType, number>> = { glm4_moe: 0.5, minimax_m2: 1 };

const OP = 'moeCausalLMConfigFromHF';

function num(config: HFConfig, key: string, fallback?: number): number {
  const v = config[key] ?? fallback;
  if (typeof v !== 'number' || !Number.isFinite(v)) {
    fail(OP, `'config.${key}' must be a finite number but got ${JSON.stringify(config[key]) ?? 'undefined'}`);
  }
  return v;
}

function int(config: HFConfig, key: string, fallback?: number): number {
  const v = num(config, key, fallback);
  if (!Number.isInteger(v) || v < 1) fail(OP, `'config.${key}' must be an integer >= 1 but got ${v}`);
  return v;
}

function bool(config: HFConfig, key: string, fallback: boolean): boolean {
  const v = config[key] ?? fallback;
  if (typeof v !== 'boolean') fail(OP, `'config.${key}' must be a boolean but got ${JSON.stringify(v)}`);
  return v;
}

/** JSON with object keys sorted, so two settings compare by content. */
function canonicalJSON(value: unknown): string {
  return JSON.stringify(value, (_, v: unknown) => (v !== null && typeof v === 'object' && !Array.isArray(v) ?
    Object.fromEntries(Object.entries(v as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : 1))) : v));
}

/** The keys of a default rope's settings; any other key (factor, ...) would be ignored, so is refused. */
const DEFAULT_ROPE_KEYS = ['rope_type', 'type', 'rope_theta', 'partial_rotary_factor'];

/** The keys YaRN reads (transformers' _compute_yarn_parameters, without DeepSeek's mscale ones). */
const YARN_ROPE_KEYS = [
  ...DEFAULT_ROPE_KEYS, 'factor', 'original_max_position_embeddings', 'beta_fast', 'beta_slow', 'truncate',
  'attention_factor',
];

/** YaRN's settings as transformers reads them: factor and the original context required, the rest defaulted. */
function yarnScaling(rope: Record<string, unknown>, key: string): NonNullable<RopeScaling> {
  const at = `${key}.`;
  const required = (name: string) => {
    if (rope[name] == null) fail(OP, `a YaRN rope needs '${at}${name}' but config.json does not set it`);
    return num(rope, name);
  };
  const factor = required('factor');
  if (factor < 1) fail(OP, `'config.${at}factor' must be >= 1 but got ${factor}`);
  const context = required('original_max_position_embeddings');
  const truncate = rope['truncate'] ?? true;
  if (typeof truncate !== 'boolean') fail(OP, `'config.${at}truncate' must be a boolean but got ${describeValue(truncate)}`);
  return {
    kind: 'yarn', factor, originalMaxPositionEmbeddings: context,
    // transformers: `get("beta_fast") or 32`, so 0 or null also mean the default
    betaFast: rope['beta_fast'] ? num(rope, 'beta_fast') : 32,
    betaSlow: rope['beta_slow'] ? num(rope, 'beta_slow') : 1,
    truncate,
    attentionFactor: rope['attention_factor'] != null ? num(rope, 'attention_factor') :
      factor <= 1 ? 1 : 0.1 * Math.log(factor) + 1,
  };
}

/**
 * rope_theta and the scaling (YaRN for the families of SCALED_ROPE_TYPES, else none), from
 * rope_parameters (transformers 5), rope_scaling (older) or the top level. Every other rope
 * setting would change the math but is not implemented, so it is an error, never ignored: another
 * rope_type, a key the rope does not read (low/high_freq_factor, mscale, ...), rope_scaling that
 * disagrees with rope_parameters (older transformers read one, newer the other), or two thetas.
 */
function ropeSettings(config: HFConfig, fallback: number, modelType: ModelType):
    { theta: number; scaling: RopeScaling; partialRotaryFactor: number } {
  const partialDefault = PARTIAL_ROTARY_DEFAULT[modelType];
  if (partialDefault === undefined) return { ...ropeOf(config, fallback, modelType), partialRotaryFactor: 1 };
  // the family implements partial rotary: rope_parameters' factor wins (transformers 5), then the top level
  const params = config['rope_parameters'] ?? config['rope_scaling'];
  const nested = params !== null && typeof params === 'object' ? (params as Record<string, unknown>)['partial_rotary_factor'] : undefined;
  const factor = nested ?? config['partial_rotary_factor'] ?? partialDefault;
  if (typeof factor !== 'number' || !(factor > 0 && factor <= 1)) {
    fail(OP, `'config.partial_rotary_factor' must be a number in (0, 1] but got ${describeValue(factor)}`);
  }
  if (nested !== undefined && config['partial_rotary_factor'] != null && config['partial_rotary_factor'] !== nested) {
    fail(OP, `config.json sets partial_rotary_factor ${JSON.stringify(config['partial_rotary_factor'])} at the top level and ` +
        `${factor} in the rope settings; they must agree`);
  }
  const withoutPartial: HFConfig = { ...config, partial_rotary_factor: undefined };
  if (params !== null && typeof params === 'object' && !Array.isArray(params)) {
    const rest = { ...(params as Record<string, unknown>) };
    delete rest['partial_rotary_factor'];
    if (config['rope_parameters'] != null) withoutPartial['rope_parameters'] = rest;
    if (config['rope_scaling'] != null) {
      const legacy = { ...(config['rope_scaling'] as Record<string, unknown>) };
      delete legacy['partial_rotary_factor'];
      withoutPartial['rope_scaling'] = legacy;
    }
  }
  return { ...ropeOf(withoutPartial, fallback, modelType), partialRotaryFactor: factor };
}

function ropeOf(config: HFConfig, fallback: number, modelType: ModelType): { theta: number; scaling: RopeScaling } {
  const parameters = config['rope_parameters'] ?? null;
  const legacy = config['rope_scaling'] ?? null;
  if (parameters !== null && legacy !== null && canonicalJSON(parameters) !== canonicalJSON(legacy)) {
    fail(OP, `config.json sets both 'rope_parameters' ${canonicalJSON(parameters)} and 'rope_scaling' ` +
        `${canonicalJSON(legacy)} and they disagree (transformers 5 reads rope_parameters, older versions ` +
        'rope_scaling); keep one of them');
  }
  const topLevelPartial = config['partial_rotary_factor'];
  if (topLevelPartial != null && topLevelPartial !== 1) {
    fail(OP, `partial rotary embeddings are not supported but config.json sets partial_rotary_factor ${describeValue(topLevelPartial)}`);
  }
  const params = parameters ?? legacy;
  if (params === null) return { theta: num(config, 'rope_theta', fallback), scaling: null };
  const key = parameters !== null ? 'rope_parameters' : 'rope_scaling';
  if (typeof params !== 'object' || Array.isArray(params)) {
    fail(OP, `'config.${key}' must be an object but got ${describeValue(params)}`);
  }
  const rope = params as Record<string, unknown>;
  const scaledTypes = familyOf(config).attention?.scaledRopes ?? [];
  const types = ['rope_type', 'type'].filter(k => rope[k] != null && rope[k] !== 'default');
  for (const typeKey of types) {
    const type = rope[typeKey];
    if (!scaledTypes.includes(type as string)) {
      fail(OP, scaledTypes.length === 0 ?
        `only the default rope is supported but config.json sets ${typeKey} '${String(type)}'` :
        `'${modelType}' supports the default and ${scaledTypes.map(t => `'${t}'`).join(', ')} ropes but config.json sets ${typeKey} '${String(type)}'`);
    }
  }
  if (rope['rope_type'] != null && rope['type'] != null && rope['rope_type'] !== rope['type']) {
    // transformers reads rope_type, older versions type
    fail(OP, `'config.${key}' sets rope_type '${String(rope['rope_type'])}' and type '${String(rope['type'])}'; they must agree`);
  }
  const scaled = types.length > 0;
  const partial = rope['partial_rotary_factor'];
  if (partial !== undefined && partial !== 1) {
    fail(OP, `partial rotary embeddings are not supported but config.json sets partial_rotary_factor ${describeValue(partial)}`);
  }
  const known = scaled ? YARN_ROPE_KEYS : DEFAULT_ROPE_KEYS;
  const ignored = Object.keys(rope).filter(k => !known.includes(k));
  if (ignored.length > 0) {
    fail(OP, scaled ?
      `'config.${key}' sets ${ignored.map(k => `'${k}'`).join(', ')}, which YaRN as implemented here does not read ` +
          `(only ${YARN_ROPE_KEYS.map(k => `'${k}'`).join(', ')})` :
      `'config.${key}' sets ${ignored.map(k => `'${k}'`).join(', ')}, which the default rope does not use ` +
          `(only ${DEFAULT_ROPE_KEYS.map(k => `'${k}'`).join(', ')}); a scaled rope is not implemented`);
  }
  const scaling = scaled ? yarnScaling(rope, key) : null;
  if (rope['rope_theta'] === undefined) return { theta: num(config, 'rope_theta', fallback), scaling };
  const theta = num(rope, 'rope_theta');
  if (config['rope_theta'] != null && config['rope_theta'] !== theta) {
    fail(OP, `config.json sets rope_theta ${describeValue(config['rope_theta'])} at the top level and ` +
        `${theta} in '${key}'; they must agree`);
  }
  return { theta, scaling };
}

/**
 * Settings that change what the model computes (in training or inference) but that the graph does
 * not implement: an error each, never ignored.
 */
function refuseUnappliedSettings(config: HFConfig, modelType: ModelType, numLayers: number,
    slidingWindow: number | null, perLayerTypes: boolean): void {
  const dropout = config['attention_dropout'] ?? 0;
  if (dropout !== 0) {
    fail(OP, `attention dropout is not implemented: 'config.attention_dropout' must be 0 but got ${describeValue(dropout)}`);
  }
  const jitter = config['router_jitter_noise'] ?? 0;
  if (jitter !== 0) {
    fail(OP, `router jitter noise is not implemented: 'config.router_jitter_noise' must be 0 but got ${describeValue(jitter)}`);
  }
  const layerTypes = config['layer_types'];
  if (layerTypes != null && !perLayerTypes) {
    const applied = slidingWindow === null ? 'full_attention' : 'sliding_attention';
    if (!Array.isArray(layerTypes) || layerTypes.length !== numLayers || layerTypes.some(t => t !== applied)) {
      fail(OP, `'config.layer_types' must list '${applied}' for each of the ${numLayers} layers ` +
          `(what this '${modelType}' graph computes) but got ${JSON.stringify(layerTypes)}`);
    }
  }
}

const LAYER_TYPES = ['sliding_attention', 'full_attention'];

/**
 * Per decoder layer, the window of its attention for a family that mixes sliding and full layers
 * (gpt_oss): config.layer_types, or transformers' default (sliding, full, sliding, ...).
 */
function windowsByLayerType(config: HFConfig, numLayers: number, slidingWindow: number): Array<number | null> {
  const given = config['layer_types'];
  const types = given ?? Array.from({ length: numLayers }, (_, i) => LAYER_TYPES[i % 2]);
  if (!Array.isArray(types) || types.length !== numLayers || types.some(t => !LAYER_TYPES.includes(t))) {
    fail(OP, `'config.layer_types' must list 'sliding_attention' or 'full_attention' for each of the ${numLayers} layers ` +
        `but got ${JSON.stringify(given)}`);
  }
  return types.map(t => (t === 'sliding_attention' ? slidingWindow : null));
}

/**
 * The graph's configuration from an HF config.json; a family that is block-only, or a setting
 * the graph does not implement, is an error that says so.
 *
 * ```js
 * const cfg = moeCausalLMConfigFromHF(JSON.parse(fs.readFileSync('config.json', 'utf8')));
 * cfg.moeLayers;  // [0, 1]
 * ```
 */
export function moeCausalLMConfigFromHF(config: HFConfig): MoECausalLMConfig {
  const family = familyOf(config);
  const modelType = family.modelType;
  if (!WHOLE_MODEL_TYPES.includes(modelType)) {
    fail(OP, `'${modelType}' is supported at the MoE block level only (SparseMoE, loadMoEBlockWeights), ` +
        `not as a whole model: ${BLOCK_ONLY_REASON[modelType] ?? 'its decoder is not implemented'}; ` +
        `whole models: ${WHOLE_MODEL_TYPES.join(', ')}`);
  }
  const hiddenSize = int(config, 'hidden_size');
  const numHeads = int(config, 'num_attention_heads');
  const numKeyValueHeads = int(config, 'num_key_value_heads', numHeads);
  // a family whose config class sets head_dim (MiniMax-M2: 128) uses it when config.json does not
  const defaultHeadDim = family.attention?.headDim;
  const headDim = modelType === 'olmoe' || (config['head_dim'] == null && defaultHeadDim === undefined) ?
      hiddenSize / numHeads : int(config, 'head_dim', defaultHeadDim);
  if (!Number.isInteger(headDim)) {
    fail(OP, `'config.hidden_size' (${hiddenSize}) must be divisible by 'num_attention_heads' (${numHeads}) when head_dim is not set`);
  }
  if (modelType === 'olmoe' && config['head_dim'] != null && config['head_dim'] !== headDim) {
    // OLMoE's attention always uses hidden_size / num_attention_heads
    fail(OP, `'config.head_dim' of 'olmoe' must be hidden_size / num_attention_heads (${headDim}) or unset ` +
        `but got ${describeValue(config['head_dim'])}`);
  }
  if (bool(config, 'use_sliding_window', false)) {
    fail(OP, `sliding-window attention ('use_sliding_window': true) is not supported for '${modelType}'`);
  }
  const attentionBias = bool(config, 'attention_bias', false);
  type AttentionDetails = Pick<MoECausalLMConfig, 'qkvBias' | 'outputBias' | 'qkNorm' | 'clipQKV' | 'slidingWindow'>;
  const traits = family.attention ?? {};
  const attentionDetails = (): AttentionDetails => {
    switch (modelType) {
      case 'mixtral':
        return {
          qkvBias: false, outputBias: false, qkNorm: 'none', clipQKV: null,
          slidingWindow: config['sliding_window'] == null ? null : int(config, 'sliding_window'),
        };
      case 'qwen2_moe':
        return { qkvBias: bool(config, 'qkv_bias', true), outputBias: false, qkNorm: 'none', clipQKV: null, slidingWindow: null };
      case 'qwen3_moe':
        return { qkvBias: attentionBias, outputBias: attentionBias, qkNorm: 'perHead', clipQKV: null, slidingWindow: null };
      case 'glm4_moe':
        return {
          qkvBias: attentionBias, outputBias: false, qkNorm: bool(config, 'use_qk_norm', false) ? 'perHead' : 'none',
          clipQKV: null, slidingWindow: null,
        };
      case 'deepseek_v3':  // MLAAttention reads attention_bias itself (mla below)
        return { qkvBias: false, outputBias: false, qkNorm: 'none', clipQKV: null, slidingWindow: null };
      case 'ernie4_5_moe':  // use_bias (all projections) is refused by the family row
        return { qkvBias: false, outputBias: false, qkNorm: 'none', clipQKV: null, slidingWindow: null };
      case 'hunyuan_v1_moe':
        return { qkvBias: attentionBias, outputBias: attentionBias, qkNorm: 'perHeadAfterRope', clipQKV: null, slidingWindow: null };
      case 'minimax_m2':
        return { qkvBias: false, outputBias: false, qkNorm: 'full', clipQKV: null, slidingWindow: null };
      case 'gpt_oss':
        return {
          qkvBias: bool(config, 'attention_bias', traits.attentionBias!), outputBias: bool(config, 'attention_bias', traits.attentionBias!),
          qkNorm: 'none', clipQKV: null, slidingWindow: int(config, 'sliding_window', traits.slidingWindow),
        };
      default:  // olmoe
        return {
          qkvBias: attentionBias, outputBias: attentionBias, qkNorm: 'full', slidingWindow: null,
          clipQKV: config['clip_qkv'] == null ? null : num(config, 'clip_qkv'),
        };
    }
  };
  const dims = moeBlockDims(config);
  const blockConfig = moeBlockConfigFromHF(config);
  const moeLayers = moeLayerIndices(config);
  const numLayers = int(config, 'num_hidden_layers');
  const needsDense = moeLayers.length < numLayers;
  const sharedLayout = family.checkpoint.shared;
  const attention = attentionDetails();
  const sinks = traits.sinks ?? false;
  const perLayerTypes = traits.layerTypes ?? false;
  refuseUnappliedSettings(config, modelType, numLayers, attention.slidingWindow, perLayerTypes);
  const layerWindows = perLayerTypes ? windowsByLayerType(config, numLayers, attention.slidingWindow!) :
    Array.from({ length: numLayers }, () => attention.slidingWindow);
  if (traits.ropeRequired && config['rope_parameters'] == null && config['rope_scaling'] == null) {
    // transformers would apply the config class's default scaled rope; this graph applies only what config.json says
    fail(OP, `config.json of '${modelType}' must set 'rope_parameters' (or 'rope_scaling'): its config class's default is a ` +
        `${(traits.scaledRopes ?? []).join('/')} rope`);
  }
  const rope = ropeSettings(config, traits.ropeTheta ?? (modelType === 'mixtral' ? 1e6 : 1e4), modelType);
  const rotaryDim = Math.floor(headDim * rope.partialRotaryFactor);
  if (rope.partialRotaryFactor !== 1 && (rotaryDim < 2 || rotaryDim % 2 !== 0)) {
    fail(OP, `head_dim · partial_rotary_factor (${headDim} · ${rope.partialRotaryFactor}) must give an even rotary width >= 2 but gives ${rotaryDim}`);
  }
  const mla = modelType === 'deepseek_v3' ? mlaConfig(config, attentionBias) : null;
  refuseStaleRotaryDim(config, rotaryDim);
  return {
    modelType,
    vocabSize: int(config, 'vocab_size'),
    hiddenSize,
    numLayers,
    numHeads,
    numKeyValueHeads,
    headDim,
    ropeTheta: rope.theta,
    rotaryDim,
    ropeInterleave: traits.ropeInterleave ?? false,
    mla,
    ropeScaling: rope.scaling,
    rmsNormEps: num(config, 'rms_norm_eps', traits.rmsNormEps ?? (modelType === 'qwen2_moe' || modelType === 'qwen3_moe' ? 1e-6 : 1e-5)),
    ...attention,
    layerWindows,
    sinks,
    tieWordEmbeddings: bool(config, 'tie_word_embeddings', traits.tieWordEmbeddings ?? false),
    initializerRange: num(config, 'initializer_range', 0.02),
    denseIntermediateSize: needsDense ? int(config, 'intermediate_size') : null,
    moeLayers,
    moe: {
      numExperts: dims.experts,
      intermediateSize: dims.intermediate,
      routing: blockConfig.routing,
      activation: blockConfig.activation,
      correctionBias: family.checkpoint.router.correctionBias !== undefined,
      sharedExpert: dims.sharedIntermediate !== undefined && sharedLayout ?
          { intermediateSize: dims.sharedIntermediate, gated: sharedLayout.sigmoidGate !== undefined } : null,
      fusedInterleaved: family.checkpoint.experts.kind === 'fusedInterleaved',
    },
  };
}

/**
 * MiniMax-M2's Hub config.json says rotary_dim, which transformers 5 does not read (its rope width
 * is head_dim · partial_rotary_factor): a rotary_dim that disagrees with the width applied is refused.
 */
function refuseStaleRotaryDim(config: HFConfig, rotaryDim: number): void {
  const stated = config['rotary_dim'];
  if (stated != null && stated !== rotaryDim) {
    fail(OP, `config.json sets rotary_dim ${JSON.stringify(stated)} but transformers rotates head_dim · partial_rotary_factor = ` +
        `${rotaryDim} dims of each head (it does not read rotary_dim); set partial_rotary_factor to match`);
  }
}

/** deepseek_v3's MLA sizes; a missing key takes DeepseekV3Config's default, q_lora_rank null means a plain q_proj. */
function mlaConfig(config: HFConfig, attentionBias: boolean): MLAConfig {
  const size = (key: keyof typeof MLA_DEFAULTS) => int(config, key, MLA_DEFAULTS[key]);
  const qLoraRank = config['q_lora_rank'] === null ? null : size('q_lora_rank');
  const qkRopeHeadDim = size('qk_rope_head_dim');
  if (qkRopeHeadDim % 2 !== 0) fail(OP, `'config.qk_rope_head_dim' must be even (rotary pairs) but got ${qkRopeHeadDim}`);
  return {
    qLoraRank, kvLoraRank: size('kv_lora_rank'), qkNopeHeadDim: size('qk_nope_head_dim'), qkRopeHeadDim,
    vHeadDim: size('v_head_dim'), ropeInterleave: bool(config, 'rope_interleave', true), attentionBias,
  };
}

/**
 * The largest tensor (elements) this package reads or allocates: tfjs-core sizes tensors with
 * 32-bit indices in its kernels and a typed array of more elements cannot be made on every engine.
 */
export const MAX_TENSOR_ELEMENTS = 2 ** 31 - 1;

/** Every weight that would exceed MAX_TENSOR_ELEMENTS, in one error, before any is allocated. */
function refuseOversizedWeights(c: MoECausalLMConfig): void {
  const H = c.hiddenSize;
  const { numExperts: E, intermediateSize: I, sharedExpert } = c.moe;
  const largest: Array<[string, number[]]> = [
    ['model.embed_tokens.weight', [c.vocabSize, H]],
    ['self_attn.q_proj.weight', [c.numHeads * c.headDim, H]],
    ['mlp gate_up (fused experts)', [E, 2 * I, H]],
  ];
  if (sharedExpert) largest.push(['mlp shared expert', [sharedExpert.intermediateSize, H]]);
  if (c.denseIntermediateSize !== null) largest.push(['mlp.gate_proj.weight (dense)', [c.denseIntermediateSize, H]]);
  const over = largest.filter(([, shape]) => shape.reduce((a, b) => a * b, 1) > MAX_TENSOR_ELEMENTS);
  if (over.length > 0) {
    fail('buildMoECausalLM', `the config makes weights larger than a tensor can hold (${MAX_TENSOR_ELEMENTS} elements): ` +
        over.map(([name, shape]) => `${name} [${shape}] = ${shape.reduce((a, b) => a * b, 1)}`).join(', '));
  }
}

export interface MoECausalLMOptions {
  /** SparseMoE's block implementation: 'reference' (default) or 'fused' */
  expertKernel?: string;
  /** how SparseMoE applies expert LoRA; default 'auto' */
  loraMode?: LoRAMode;
  /** the model's name; default 'moe_causal_lm' */
  name?: string;
  /** how every SparseMoE holds its routed experts: 'float32' (default), or packed 'bf16' / 'f16' (frozen) */
  expertStorage?: ExpertStorage;
  /** int4 experts' group size along the input (32, 64 default, 128); only with expertStorage 'int4' */
  expertGroupSize?: number;
  /**
   * false: every weight starts at zero instead of HF's random init, for a model whose weights are
   * all overwritten next (checkpoint loaders: drawing the normals is half a large model's load
   * time). Default true.
   */
  initializeWeights?: boolean;
}

/** The key under which the HF config is kept in the model's userDefinedMetadata (saved with it). */
const METADATA_KEY = 'hfConfig';

/**
 * Builds the model for an HF config.json with freshly initialized weights (HF's init: normal
 * with std initializer_range, norms at 1). `loadHFCheckpoint` fills them from a checkpoint.
 *
 * ```js
 * const model = buildMoECausalLM(config, {expertKernel: 'fused'});
 * const logits = model.predict(tf.tensor2d([[1, 2, 3]], [1, 3], 'int32'));  // [1, 3, vocab]
 * ```
 */
export function buildMoECausalLM(hfConfig: HFConfig, options: MoECausalLMOptions = {}): MoECausalLM {
  const c = moeCausalLMConfigFromHF(hfConfig);
  refuseOversizedWeights(c);
  // A layer's weights exist from its first apply(); a later layer may still refuse its
  // arguments, so every layer made so far is released when building stops halfway.
  const made: tfl.layers.Layer[] = [];
  const layer = <L extends tfl.layers.Layer>(l: L): L => { made.push(l); return l; };
  try {
    return assemble(c, hfConfig, options, layer);
  } catch (e) {
    for (const l of made) for (const w of l.weights) w.dispose();
    throw e;
  }
}

function assemble(c: MoECausalLMConfig, hfConfig: HFConfig, options: MoECausalLMOptions,
    layer: <L extends tfl.layers.Layer>(l: L) => L): MoECausalLM {
  // std 0: zeros, filled without drawing random numbers (layers/initializers.ts)
  const init = options.initializeWeights === false ? 0 : c.initializerRange;
  const ids = tfl.input({ shape: [null], dtype: 'int32', name: 'input_ids' });
  const embed = layer(new TokenEmbedding({
    name: 'model.embed_tokens', vocabSize: c.vocabSize, hiddenSize: c.hiddenSize, initializerRange: init,
  }));
  let h = embed.apply(ids) as tfl.SymbolicTensor;
  for (let i = 0; i < c.numLayers; i++) {
    const prefix = `model.layers.${i}`;
    const attnIn = layer(new RMSNorm({ name: `${prefix}.input_layernorm`, epsilon: c.rmsNormEps })).apply(h);
    const attn = layer(c.mla !== null ?
      new MLAAttention({
        name: `${prefix}.self_attn`, numHeads: c.numHeads, ropeTheta: c.ropeTheta, initializerRange: init, ...c.mla,
      }) :
      new RotaryAttention({
        name: `${prefix}.self_attn`, numHeads: c.numHeads, numKeyValueHeads: c.numKeyValueHeads,
        headDim: c.headDim, ropeTheta: c.ropeTheta, rotaryDim: c.rotaryDim, qkvBias: c.qkvBias, outputBias: c.outputBias,
        qkNorm: c.qkNorm, normEpsilon: c.rmsNormEps, clipQKV: c.clipQKV, slidingWindow: c.layerWindows[i],
        ropeScaling: c.ropeScaling, sinks: c.sinks, ropeInterleave: c.ropeInterleave,
        initializerRange: init,
      })).apply(attnIn) as tfl.SymbolicTensor;
    h = tfl.layers.add({ name: `${prefix}.attn_residual` }).apply([h, attn]) as tfl.SymbolicTensor;
    const mlpIn = layer(new RMSNorm({ name: `${prefix}.post_attention_layernorm`, epsilon: c.rmsNormEps })).apply(h);
    const mlp = layer(c.moeLayers.includes(i) ?
      new SparseMoE({
        name: `${prefix}.mlp`, numExperts: c.moe.numExperts, intermediateSize: c.moe.intermediateSize,
        routing: c.moe.routing, activation: c.moe.activation, sharedExpert: c.moe.sharedExpert,
        correctionBias: c.moe.correctionBias,
        initializerRange: init, expertKernel: options.expertKernel, loraMode: options.loraMode,
        expertStorage: options.expertStorage,
        ...(options.expertGroupSize !== undefined ? { expertGroupSize: options.expertGroupSize } : {}),
        ...(c.moe.fusedInterleaved ? { expertLayout: 'inOutInterleaved', expertBias: true, routerBias: true } as const : {}),
      }) :
      new SwiGLUMLP({ name: `${prefix}.mlp`, intermediateSize: c.denseIntermediateSize!, initializerRange: init }));
    const out = mlp.apply(mlpIn) as tfl.SymbolicTensor;
    h = tfl.layers.add({ name: `${prefix}.mlp_residual` }).apply([h, out]) as tfl.SymbolicTensor;
  }
  h = layer(new RMSNorm({ name: 'model.norm', epsilon: c.rmsNormEps })).apply(h) as tfl.SymbolicTensor;
  const head = c.tieWordEmbeddings ? embed :
    layer(new LMHead({ name: 'lm_head', vocabSize: c.vocabSize, hiddenSize: c.hiddenSize, initializerRange: init }));
  const logits = head.apply(h) as tfl.SymbolicTensor;
  const model = tfl.model({ inputs: ids, outputs: logits, name: options.name ?? 'moe_causal_lm' });
  model.setUserDefinedMetadata({ [METADATA_KEY]: JSON.parse(JSON.stringify(hfConfig)) });
  return model;
}

/** The HF config a model was built from (kept in userDefinedMetadata, so also after save/load), or null. */
export function hfConfigOf(model: tfl.LayersModel): HFConfig | null {
  const meta = model.getUserDefinedMetadata() as Record<string, unknown> | undefined;
  const config = meta?.[METADATA_KEY];
  return config != null && typeof config === 'object' ? config as HFConfig : null;
}

/** The SparseMoE layers of a model, in graph order. */
export function sparseMoELayers(model: tfl.LayersModel): SparseMoE[] {
  return model.layers.filter((l): l is SparseMoE => l instanceof SparseMoE);
}

/** The decoder layer index in a layer name such as 'model.layers.3.mlp', or null. */
export function decoderLayerIndex(layerName: string): number | null {
  const m = /^model\.layers\.(\d+)\./.exec(layerName);
  return m === null ? null : Number(m[1]);
}

/** The tf.Variables an optimizer should update now (trainable layers and weights only). */
export function trainableVariables(model: tfl.LayersModel): tf.Variable[] {
  return model.trainableWeights.map(w => w.read() as tf.Variable);
}

/**
 * Adds a LoRA adapter to every SparseMoE layer and freezes every other layer, as PEFT's
 * get_peft_model does, so `trainableVariables(model)` is exactly the adapter's A and B tensors.
 *
 * ```js
 * addMoEAdapter(model, {name: 'default', r: 8, alpha: 16, targets: ['experts.gate_up', 'experts.down', 'router']});
 * ```
 */
export function addMoEAdapter(
    model: tfl.LayersModel, config: LoRAAdapterConfig, init: 'peft' | 'random' = 'peft'): void {
  const layers = sparseMoELayers(model);
  if (layers.length === 0) fail('addMoEAdapter', `the model '${model.name}' has no SparseMoE layer`);
  freezeBaseLayers(model);
  for (const layer of layers) layer.addAdapter(config, init);
}

/** Sets trainable = false on every layer that is not a SparseMoE (whose base weights its adapters freeze). */
export function freezeBaseLayers(model: tfl.LayersModel): void {
  for (const layer of model.layers) if (!(layer instanceof SparseMoE)) layer.trainable = false;
}
