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
 * deepseek_v3 and mistral4 (MLAAttention; Mistral 4's with YaRN, its mscale and Llama 4's
 * position scaling), ernie4_5_moe (interleaved rope pairs), hunyuan_v1_moe (q/k norms per head
 * after rope), minimax_m2 (q/k norms over the whole projection, partial rotary), llama4_text
 * (RotaryAttention with Llama 4's per-layer settings: rope or NoPE, chunked attention, L2 q/k
 * norm, temperature tuning; its MLPs under 'feed_forward'), glm_moe_dsa (MLAAttention with the DSA
 * indexer), qwen3_next and qwen3_5_moe_text (GatedDeltaNet linear-attention layers between gated
 * RotaryAttention layers).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import {
  familyOf, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices, type HFConfig, type ModelType,
} from '../models/families.js';
import type { ExpertActivation, LoRAMode, RoutingConfig } from '../ops/types.js';
import { fail } from '../ops/validate.js';
import { describeValue } from '../util/describe.js';
import { RotaryAttention, type QKNorm, type RotaryAttentionArgs } from './attention.js';
import type { Llama3Rope, RopeScaling, YarnRope } from './rotary.js';
import { LMHead, TokenEmbedding } from './embedding.js';
import type { DenseStorage } from './dense_storage.js';
import type { DSAIndexerArgs } from './dsa_indexer.js';
import { GatedDeltaNet, type GatedDeltaNetShapeArgs } from './gated_delta_net.js';
import { gradientCheckpointingEnabled, setGradientCheckpointing } from './gradient_checkpointing.js';
import { MLAAttention, type PositionScaling } from './mla_attention.js';
import { RMSNorm } from './rms_norm.js';
import { passPerCall } from './sequence_context.js';
import { SparseMoE, type ExpertStorage, type LoRAAdapterConfig } from './sparse_moe.js';
import { SwiGLUMLP } from './swiglu_mlp.js';

/** A decoder MoE LM: a functional LayersModel built by `buildMoECausalLM` (see the file comment). */
export type MoECausalLM = tfl.LayersModel;

/** The model types that load as whole models; the others of MODEL_TYPES are block-only (BLOCK_ONLY_REASON). */
export const WHOLE_MODEL_TYPES: readonly ModelType[] = [
  'mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'gpt_oss', 'glm4_moe', 'deepseek_v3',
  'ernie4_5_moe', 'hunyuan_v1_moe', 'minimax_m2', 'llama4_text', 'mistral4',
  'glm_moe_dsa', 'qwen3_next', 'qwen3_5_moe_text',
];

/** Why a block-only family has no whole model. */
const BLOCK_ONLY_REASON: Partial<Record<ModelType, string>> = {
  gemma4_text: "Gemma 4's decoder layer (router and experts beside a dense MLP with their own norms, attention with " +
      'v_norm, scaling 1, k_eq_v and KV-shared layers, per-layer rope and head sizes, per-layer inputs, logit ' +
      'softcapping) is not built',
};

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
  /**
   * qwen3_next: the decoder layers whose token mixer is a GatedDeltaNet ('linear_attention' in
   * layer_types) and its sizes; the others are gated RotaryAttention. Absent for other families.
   */
  deltaNet?: { layers: boolean[]; shape: GatedDeltaNetShapeArgs };
  /** qwen3_next: every RMSNorm (and q/k norm) scales by (1 + weight) */
  zeroCenteredNorms?: boolean;
  /** qwen3_next: the attention output is gated by sigmoid of a second half of q_proj */
  outputGate?: boolean;
  /** per decoder layer, Llama 4's attention settings (rope or NoPE, chunks, L2 q/k norm, temperature); else null */
  llama4Layers: Llama4LayerAttention[] | null;
  /** the module name of each layer's MLP / MoE block: 'mlp', Llama 4's 'feed_forward' */
  mlpModule: string;
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
    /** Llama 4: experts stored [E, in, out] (layout 'inOut') */
    fusedInOut: boolean;
    /** Llama 4: the routing weight scales the expert's input (MoEBlockConfig.weightedInput) */
    weightedInput: boolean;
  };
}

/** What RotaryAttention takes per Llama 4 decoder layer (src/layers/attention.ts). */
export type Llama4LayerAttention =
  Required<Pick<RotaryAttentionArgs, 'rope' | 'ropeInterleave' | 'qkNorm' | 'temperatureTuning' | 'attentionChunkSize'>>;

/** The sizes of deepseek_v3's and mistral4's multi-head latent attention, as MLAAttention takes them. */
export interface MLAConfig {
  qLoraRank: number | null;
  kvLoraRank: number;
  qkNopeHeadDim: number;
  qkRopeHeadDim: number;
  vHeadDim: number;
  ropeInterleave: boolean;
  attentionBias: boolean;
  /** glm_moe_dsa's DeepSeek sparse attention indexer; absent for deepseek_v3 */
  indexer?: DSAIndexerArgs;
  /** YaRN on the rope part, softmax scale and Llama 4 position scaling (mlaYarnRope: Mistral 4, DeepSeek-V3's YaRN) */
  ropeScaling?: RopeScaling;
  softmaxScale?: number;
  positionScaling?: PositionScaling | null;
}

/** The config classes' defaults for the MLA keys a config.json leaves out (DeepseekV3Config, Mistral4Config, GlmMoeDsaConfig). */
const MLA_DEFAULTS: Partial<Record<ModelType, Record<'q_lora_rank' | 'kv_lora_rank' | 'qk_nope_head_dim' | 'qk_rope_head_dim' | 'v_head_dim', number>>> = {
  deepseek_v3: { q_lora_rank: 1536, kv_lora_rank: 512, qk_nope_head_dim: 128, qk_rope_head_dim: 64, v_head_dim: 128 },
  mistral4: { q_lora_rank: 1024, kv_lora_rank: 256, qk_nope_head_dim: 64, qk_rope_head_dim: 64, v_head_dim: 128 },
  glm_moe_dsa: { q_lora_rank: 2048, kv_lora_rank: 512, qk_nope_head_dim: 192, qk_rope_head_dim: 64, v_head_dim: 256 },
};

/** GlmMoeDsaConfig's defaults for its indexer keys. */
const DSA_INDEXER_DEFAULTS = { index_n_heads: 32, index_head_dim: 128, index_topk: 2048 };

/** Model types whose attention rotates only part of each head (partial_rotary_factor), with its default. */
const PARTIAL_ROTARY_DEFAULT: Partial<Record<ModelType, number>> = {
  glm4_moe: 0.5, minimax_m2: 1, qwen3_next: 0.25, qwen3_5_moe_text: 0.25,
};

/** Qwen3NextConfig's (and Qwen3_5MoeTextConfig's) defaults for the gated DeltaNet keys. */
const DELTA_NET_DEFAULTS = {
  linear_num_key_heads: 16, linear_num_value_heads: 32, linear_key_head_dim: 128, linear_value_head_dim: 128,
  linear_conv_kernel_dim: 4,
};

/**
 * qwen3_next's layer_types: 'linear_attention' (GatedDeltaNet) or 'full_attention' per layer;
 * without the key, Qwen3NextConfig's pattern (every full_attention_interval-th layer full, default 4).
 */
function deltaNetSettings(config: HFConfig, numLayers: number, modelType: ModelType): NonNullable<MoECausalLMConfig['deltaNet']> {
  const interval = int(config, 'full_attention_interval', 4);
  const given = config['layer_types'];
  const types = given ?? Array.from({ length: numLayers }, (_, i) => ((i + 1) % interval === 0 ? 'full_attention' : 'linear_attention'));
  if (!Array.isArray(types) || types.length !== numLayers || types.some(t => t !== 'linear_attention' && t !== 'full_attention')) {
    fail(OP, `'config.layer_types' must list 'linear_attention' or 'full_attention' for each of the ${numLayers} layers ` +
        `but got ${JSON.stringify(given)}`);
  }
  const size = (key: keyof typeof DELTA_NET_DEFAULTS) => int(config, key, DELTA_NET_DEFAULTS[key]);
  const shape = {
    numKeyHeads: size('linear_num_key_heads'), numValueHeads: size('linear_num_value_heads'),
    keyHeadDim: size('linear_key_head_dim'), valueHeadDim: size('linear_value_head_dim'), convKernel: size('linear_conv_kernel_dim'),
    // Qwen3.5 split Qwen3-Next's two fused input projections into four
    projections: modelType === 'qwen3_5_moe_text' ? 'separate' as const : 'qkvz' as const,
  };
  if (shape.numValueHeads % shape.numKeyHeads !== 0) {
    fail(OP, `'config.linear_num_value_heads' (${shape.numValueHeads}) must be a multiple of 'linear_num_key_heads' (${shape.numKeyHeads})`);
  }
  return { layers: types.map(t => t === 'linear_attention'), shape };
}

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
function yarnScaling(rope: Record<string, unknown>, key: string): YarnRope {
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

/** The keys the llama3 rope reads (transformers' _compute_llama3_parameters). */
const LLAMA3_ROPE_KEYS = [...DEFAULT_ROPE_KEYS, 'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings'];

/** Llama 3's rope scaling as transformers reads it: all four keys required. */
function llama3Scaling(rope: Record<string, unknown>, key: string): Llama3Rope {
  const required = (name: string) => {
    if (rope[name] == null) fail(OP, `a llama3 rope needs '${key}.${name}' but config.json does not set it`);
    return num(rope, name);
  };
  const scaling: Llama3Rope = {
    kind: 'llama3', factor: required('factor'), lowFreqFactor: required('low_freq_factor'),
    highFreqFactor: required('high_freq_factor'), originalMaxPositionEmbeddings: required('original_max_position_embeddings'),
  };
  if (!(scaling.lowFreqFactor > 0 && scaling.highFreqFactor >= scaling.lowFreqFactor)) {
    fail(OP, `'config.${key}' needs high_freq_factor >= low_freq_factor > 0 but sets ${scaling.lowFreqFactor} and ${scaling.highFreqFactor}`);
  }
  return scaling;
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
  const llama3 = scaled && rope[types[0]] === 'llama3';
  const known = llama3 ? LLAMA3_ROPE_KEYS : scaled ? YARN_ROPE_KEYS : DEFAULT_ROPE_KEYS;
  const ignored = Object.keys(rope).filter(k => !known.includes(k));
  if (ignored.length > 0 && llama3) {
    fail(OP, `'config.${key}' sets ${ignored.map(k => `'${k}'`).join(', ')}, which the llama3 rope does not read ` +
        `(only ${LLAMA3_ROPE_KEYS.map(k => `'${k}'`).join(', ')})`);
  }
  if (ignored.length > 0) {
    fail(OP, scaled ?
      `'config.${key}' sets ${ignored.map(k => `'${k}'`).join(', ')}, which YaRN as implemented here does not read ` +
          `(only ${YARN_ROPE_KEYS.map(k => `'${k}'`).join(', ')})` :
      `'config.${key}' sets ${ignored.map(k => `'${k}'`).join(', ')}, which the default rope does not use ` +
          `(only ${DEFAULT_ROPE_KEYS.map(k => `'${k}'`).join(', ')}); a scaled rope is not implemented`);
  }
  const scaling = llama3 ? llama3Scaling(rope, key) : scaled ? yarnScaling(rope, key) : null;
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
    slidingWindow: number | null, perLayerTypes: boolean, layerType: string | null = null): void {
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
    // glm_moe_dsa names its every layer 'deepseek_sparse_attention' (MLA with the indexer)
    const applied = layerType ?? (slidingWindow === null ? 'full_attention' : 'sliding_attention');
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
      case 'qwen3_next':
      case 'qwen3_5_moe_text':
        return { qkvBias: attentionBias, outputBias: attentionBias, qkNorm: 'perHead', clipQKV: null, slidingWindow: null };
      case 'glm4_moe':
        return {
          qkvBias: attentionBias, outputBias: false, qkNorm: bool(config, 'use_qk_norm', false) ? 'perHead' : 'none',
          clipQKV: null, slidingWindow: null,
        };
      case 'deepseek_v3':  // MLAAttention reads attention_bias itself (mla below)
      case 'glm_moe_dsa':
      case 'mistral4':
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
      case 'llama4_text':  // the q/k norm is per layer (llama4Layers below)
        return { qkvBias: attentionBias, outputBias: attentionBias, qkNorm: 'none', clipQKV: null, slidingWindow: null };
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
  // Qwen3-Next and Qwen3.5-MoE: gated DeltaNet and gated attention layers, (1 + w) norms
  const qwen3Next = modelType === 'qwen3_next' || modelType === 'qwen3_5_moe_text';
  const perLayerTypes = traits.layerTypes ?? false;
  const llama4Layers = modelType === 'llama4_text' ? llama4LayerAttention(config, numLayers) : null;
  // Llama 4's layer_types (chunked or full) are read by llama4LayerAttention, qwen3_next's (linear
  // or full attention) by deltaNetSettings
  refuseUnappliedSettings(llama4Layers ? { ...config, layer_types: undefined } : config, modelType, numLayers,
      attention.slidingWindow, perLayerTypes || qwen3Next, modelType === 'glm_moe_dsa' ? 'deepseek_sparse_attention' : null);
  const layerWindows = perLayerTypes ? windowsByLayerType(config, numLayers, attention.slidingWindow!) :
    Array.from({ length: numLayers }, () => attention.slidingWindow);
  if (traits.ropeRequired && config['rope_parameters'] == null && config['rope_scaling'] == null) {
    // transformers would apply the config class's default scaled rope; this graph applies only what config.json says
    fail(OP, `config.json of '${modelType}' must set 'rope_parameters' (or 'rope_scaling'): its config class's default is a ` +
        `${(traits.scaledRopes ?? []).join('/')} rope`);
  }
  const mla = modelType === 'glm_moe_dsa' ? dsaConfig(config, attentionBias, numLayers) :
    MLA_DEFAULTS[modelType] ? mlaConfig(config, attentionBias, MLA_DEFAULTS[modelType]!) : null;
  // MLA's YaRN acts on the rope part only (mlaYarnRope): Mistral 4's always, DeepSeek-V3's when its config
  // sets it (the Hub's does); the other families' rope on whole heads
  const rope = modelType === 'mistral4' || (modelType === 'deepseek_v3' && isYarnRope(config)) ?
    mlaYarnRope(config, mla!, modelType) :
    ropeSettings(modelType === 'qwen3_5_moe_text' ? withoutTextMRope(config) : config,
        traits.ropeTheta ?? ROPE_THETA_DEFAULT[modelType] ?? 1e4, modelType);
  const rotaryDim = Math.floor(headDim * rope.partialRotaryFactor);
  if (rope.partialRotaryFactor !== 1 && (rotaryDim < 2 || rotaryDim % 2 !== 0)) {
    fail(OP, `head_dim · partial_rotary_factor (${headDim} · ${rope.partialRotaryFactor}) must give an even rotary width >= 2 but gives ${rotaryDim}`);
  }
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
    ropeScaling: modelType === 'mistral4' ? null : rope.scaling,
    rmsNormEps: num(config, 'rms_norm_eps',
        traits.rmsNormEps ?? (['qwen2_moe', 'qwen3_moe', 'mistral4'].includes(modelType) || qwen3Next ? 1e-6 : 1e-5)),
    ...attention,
    layerWindows,
    sinks,
    llama4Layers,
    mlpModule: modelType === 'llama4_text' ? 'feed_forward' : 'mlp',
    ...(qwen3Next ? { deltaNet: deltaNetSettings(config, numLayers, modelType), zeroCenteredNorms: true, outputGate: true } : {}),
    tieWordEmbeddings: bool(config, 'tie_word_embeddings', traits.tieWordEmbeddings ?? false),
    initializerRange: num(config, 'initializer_range', 0.02),
    denseIntermediateSize: !needsDense ? null :
      modelType === 'llama4_text' ? int(config, 'intermediate_size_mlp', 16384) : int(config, 'intermediate_size'),
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
      fusedInOut: family.checkpoint.experts.kind === 'fused' && family.checkpoint.experts.layout === 'inOut',
      weightedInput: blockConfig.weightedInput ?? false,
    },
  };
}

/** rope_theta of the config classes that do not use 10000 (Llama4TextConfig.default_theta). */
const ROPE_THETA_DEFAULT: Partial<Record<ModelType, number>> = { mixtral: 1e6, llama4_text: 500000 };

/**
 * Llama 4's attention per decoder layer, as Llama4TextAttention reads its config: rope where
 * no_rope_layers[i] is 1 (default: every no_rope_layer_interval-th layer is NoPE), with the L2
 * q/k norm there when use_qk_norm; the NoPE layers' queries temperature-tuned when
 * attn_temperature_tuning; chunked attention on the layers layer_types calls 'chunked_attention'
 * (default: the rope layers).
 */
function llama4LayerAttention(config: HFConfig, numLayers: number): Llama4LayerAttention[] {
  const interval = int(config, 'no_rope_layer_interval', 4);
  const given = config['no_rope_layers'];
  // Llama4TextConfig: `no_rope_layers if no_rope_layers else default`, so an empty list means the default
  const useRope = Array.isArray(given) && given.length > 0 ? given :
    Array.from({ length: numLayers }, (_, i) => ((i + 1) % interval !== 0 ? 1 : 0));
  if (useRope.length < numLayers || useRope.some(v => v !== 0 && v !== 1 && typeof v !== 'boolean')) {
    fail(OP, `'config.no_rope_layers' must hold 1 (rope) or 0 (NoPE) for each of the ${numLayers} layers but got ${JSON.stringify(given)}`);
  }
  const types = config['layer_types'] ?? useRope.slice(0, numLayers).map(r => (r ? 'chunked_attention' : 'full_attention'));
  const known = ['chunked_attention', 'full_attention'];
  if (!Array.isArray(types) || types.length !== numLayers || types.some(t => !known.includes(t))) {
    fail(OP, `'config.layer_types' must list 'chunked_attention' or 'full_attention' for each of the ${numLayers} layers ` +
        `but got ${JSON.stringify(config['layer_types'])}`);
  }
  const chunk = config['attention_chunk_size'] ?? 8192;
  if (types.includes('chunked_attention') && (typeof chunk !== 'number' || !Number.isInteger(chunk) || chunk < 1)) {
    fail(OP, `'config.attention_chunk_size' must be an integer >= 1 for the chunked_attention layers but got ${describeValue(chunk)}`);
  }
  const qkNorm = bool(config, 'use_qk_norm', true);
  const tuning = bool(config, 'attn_temperature_tuning', true) ?
    { attnScale: num(config, 'attn_scale', 0.1), floorScale: num(config, 'floor_scale', 8192) } : null;
  if (tuning !== null && !(tuning.floorScale > 0)) fail(OP, `'config.floor_scale' must be > 0 but got ${tuning.floorScale}`);
  return types.map((type, i) => {
    const rope = Boolean(useRope[i]);
    return {
      rope, ropeInterleave: true, qkNorm: rope && qkNorm ? 'l2' : 'none',
      temperatureTuning: rope ? null : tuning,
      attentionChunkSize: type === 'chunked_attention' ? chunk as number : null,
    };
  });
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

/** The MLA sizes; a missing key takes the config class's default, q_lora_rank null means a plain q_proj. */
function mlaConfig(config: HFConfig, attentionBias: boolean, defaults: NonNullable<typeof MLA_DEFAULTS['deepseek_v3']>): MLAConfig {
  const size = (key: keyof typeof defaults) => int(config, key, defaults[key]);
  const qLoraRank = config['q_lora_rank'] === null ? null : size('q_lora_rank');
  const qkRopeHeadDim = size('qk_rope_head_dim');
  if (qkRopeHeadDim % 2 !== 0) fail(OP, `'config.qk_rope_head_dim' must be even (rotary pairs) but got ${qkRopeHeadDim}`);
  return {
    qLoraRank, kvLoraRank: size('kv_lora_rank'), qkNopeHeadDim: size('qk_nope_head_dim'), qkRopeHeadDim,
    vHeadDim: size('v_head_dim'), ropeInterleave: bool(config, 'rope_interleave', true), attentionBias,
  };
}

/** The rope keys Mistral 4's YaRN reads (ignored ones included: HF validates without them). */
const MISTRAL4_ROPE_KEYS = [
  'rope_type', 'type', 'rope_theta', 'factor', 'original_max_position_embeddings', 'max_position_embeddings',
  'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim', 'llama_4_scaling_beta', 'partial_rotary_factor', 'truncate',
  'attention_factor',
];

/** YaRN's get_mscale: 1 for scale <= 1, else 0.1·m·ln(scale) + 1. */
const yarnMscale = (scale: number, m = 1) => (scale <= 1 ? 1 : 0.1 * m * Math.log(scale) + 1);

/** Whether config.json's rope settings are YaRN's (rope_type, or the older type). */
function isYarnRope(config: HFConfig): boolean {
  const rope = config['rope_parameters'] ?? config['rope_scaling'];
  if (rope === null || typeof rope !== 'object') return false;
  const r = rope as Record<string, unknown>;
  return (r['rope_type'] ?? r['type']) === 'yarn';
}

/**
 * Mistral 4's rope, as transformers 5 reads Mistral4Config, and DeepSeek-V3's YaRN (the attention
 * Mistral 4's is modelled on: DeepseekV3Attention scales its softmax by get_mscale(factor,
 * mscale_all_dim)² and its rotary embedding spans qk_rope_head_dim): YaRN over the rope part of each head
 * (qk_rope_head_dim = head_dim · partial_rotary_factor), its attention factor from mscale and
 * mscale_all_dim, the softmax scale (nope + rope)^-½ times get_mscale(factor, mscale_all_dim)²
 * (yarn_apply_mscale), and Llama 4's query scaling by position (llama_4_scaling_beta). Without
 * rope settings the config class's default applies (YaRN factor 128 over 8192 positions).
 */
function mlaYarnRope(config: HFConfig, mla: MLAConfig, modelType: string): { theta: number; scaling: RopeScaling; partialRotaryFactor: number } {
  const qk = mla.qkNopeHeadDim + mla.qkRopeHeadDim;
  const given = config['rope_parameters'] ?? config['rope_scaling'];
  const rope = (given ?? {
    rope_type: 'yarn', rope_theta: 10000, factor: 128, original_max_position_embeddings: 8192, beta_fast: 32, beta_slow: 1,
    mscale_all_dim: 1, mscale: 1, llama_4_scaling_beta: 0.1, partial_rotary_factor: mla.qkRopeHeadDim / qk,
  }) as Record<string, unknown>;
  if (typeof rope !== 'object' || Array.isArray(rope)) fail(OP, `'config.rope_parameters' must be an object but got ${describeValue(rope)}`);
  const type = rope['rope_type'] ?? rope['type'];
  if (type !== 'yarn') {
    fail(OP, `'${modelType}' is implemented with its YaRN rope (rope_type 'yarn') but config.json sets rope_type ${describeValue(type)}`);
  }
  const ignored = Object.keys(rope).filter(k => !MISTRAL4_ROPE_KEYS.includes(k));
  if (ignored.length > 0) {
    fail(OP, `'config.rope_parameters' sets ${ignored.map(k => `'${k}'`).join(', ')}, which MLA's YaRN as implemented here does not read`);
  }
  const partial = rope['partial_rotary_factor'];
  if (partial != null && (typeof partial !== 'number' || Math.floor(qk * partial) !== mla.qkRopeHeadDim)) {
    fail(OP, `'config.rope_parameters.partial_rotary_factor' must make (qk_nope_head_dim + qk_rope_head_dim) · factor = ` +
        `qk_rope_head_dim (${mla.qkRopeHeadDim} of ${qk}) but got ${describeValue(partial)}`);
  }
  const scaling = yarnScaling(rope, 'rope_parameters');
  // transformers: `if mscale and mscale_all_dim`, so 0 and null both mean unset
  const mscale = rope['mscale'] == null ? 0 : num(rope, 'mscale');
  const mscaleAllDim = rope['mscale_all_dim'] == null ? 0 : num(rope, 'mscale_all_dim');
  if (rope['attention_factor'] == null && mscale && mscaleAllDim) {
    scaling.attentionFactor = yarnMscale(scaling.factor, mscale) / yarnMscale(scaling.factor, mscaleAllDim);
  }
  mla.ropeScaling = scaling;
  mla.softmaxScale = qk ** -0.5 * (mscaleAllDim ? yarnMscale(scaling.factor, mscaleAllDim) ** 2 : 1);
  const beta = rope['llama_4_scaling_beta'];
  mla.positionScaling = beta == null ? null :
    { beta: num(rope, 'llama_4_scaling_beta'), originalMaxPositionEmbeddings: scaling.originalMaxPositionEmbeddings };
  // older configs (DeepSeek-V3's on the Hub) keep rope_theta beside rope_scaling, at the top level
  return { theta: num(rope, 'rope_theta', num(config, 'rope_theta', 10000)), scaling, partialRotaryFactor: 1 };
}

/**
 * Qwen3.5's rope settings without its multimodal rope keys (mrope_section, mrope_interleaved): a
 * text-only model gives its three position grids the same ids, so the interleaved multimodal rope
 * is the plain one.
 */
function withoutTextMRope(config: HFConfig): HFConfig {
  const strip = (params: unknown) => {
    if (params === null || typeof params !== 'object' || Array.isArray(params)) return params;
    const { mrope_section: _s, mrope_interleaved: _i, ...rest } = params as Record<string, unknown>;
    return rest;
  };
  const out: HFConfig = { ...config };
  if (config['rope_parameters'] != null) out['rope_parameters'] = strip(config['rope_parameters']);
  if (config['rope_scaling'] != null) out['rope_scaling'] = strip(config['rope_scaling']);
  return out;
}

/**
 * glm_moe_dsa's MLA sizes and indexer (GlmMoeDsaConfig's defaults for missing keys). Its rope is
 * interleaved in the attention and the indexer alike (transformers 5.17's
 * apply_rotary_pos_emb_interleave; it has no rope_interleave key); every layer must run its own indexer:
 * 'shared' indexer_types (reusing the previous layer's choice) are refused.
 */
function dsaConfig(config: HFConfig, attentionBias: boolean, numLayers: number): MLAConfig {
  const mla = mlaConfig(config, attentionBias, MLA_DEFAULTS.glm_moe_dsa!);
  const size = (key: keyof typeof DSA_INDEXER_DEFAULTS) => int(config, key, DSA_INDEXER_DEFAULTS[key]);
  const types = config['indexer_types'] ?? derivedIndexerTypes(config, numLayers);
  if (!Array.isArray(types) || types.length !== numLayers || types.some(t => t !== 'full')) {
    fail(OP, `'config.indexer_types' must be 'full' for each of the ${numLayers} layers (layers sharing the previous ` +
        `layer's indexer choice are not implemented) but got ${JSON.stringify(types)}`);
  }
  return {
    ...mla, ropeInterleave: true,
    indexer: { numHeads: size('index_n_heads'), headDim: size('index_head_dim'), topK: size('index_topk') },
  };
}

/**
 * GlmMoeDsaConfig's indexer_types when config.json has none: from index_topk_pattern ('F' full,
 * 'S' shared, per layer), else layer i is full when max(i − index_skip_topk_offset + 1, 0) is a
 * multiple of index_topk_freq (defaults 2 and 1: every layer full).
 */
function derivedIndexerTypes(config: HFConfig, numLayers: number): unknown {
  const pattern = config['index_topk_pattern'];
  if (pattern != null) {
    return typeof pattern === 'string' ? [...pattern].map(c => ({ F: 'full', S: 'shared' } as Record<string, string>)[c] ?? c) : pattern;
  }
  const freq = Math.max(num(config, 'index_topk_freq', 1), 1);
  const offset = num(config, 'index_skip_topk_offset', 2);
  return Array.from({ length: numLayers }, (_, i) => (Math.max(i - offset + 1, 0) % freq === 0 ? 'full' : 'shared'));
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
   * how the frozen attention projections (RotaryAttention's q/k/v/o), an untied token embedding
   * and an untied LM head are held: 'float32' (default), or packed 'bf16' / 'f16'
   * (src/layers/dense_storage.ts); a tied embedding (it is the head) and every other weight stay
   * float32
   */
  denseStorage?: DenseStorage;
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
    ...(options.denseStorage !== undefined && !c.tieWordEmbeddings ? { denseStorage: options.denseStorage } : {}),
  }));
  let h = embed.apply(ids) as tfl.SymbolicTensor;
  for (let i = 0; i < c.numLayers; i++) {
    const prefix = `model.layers.${i}`;
    const zeroCentered = c.zeroCenteredNorms ?? false;
    const attnIn = layer(new RMSNorm({ name: `${prefix}.input_layernorm`, epsilon: c.rmsNormEps, zeroCentered })).apply(h);
    const attn = layer(c.deltaNet?.layers[i] ?
      new GatedDeltaNet({ name: `${prefix}.linear_attn`, ...c.deltaNet.shape, normEpsilon: c.rmsNormEps, initializerRange: init }) :
      c.mla !== null ?
      new MLAAttention({
        name: `${prefix}.self_attn`, numHeads: c.numHeads, ropeTheta: c.ropeTheta, initializerRange: init, ...c.mla,
      }) :
      new RotaryAttention({
        name: `${prefix}.self_attn`, numHeads: c.numHeads, numKeyValueHeads: c.numKeyValueHeads,
        headDim: c.headDim, ropeTheta: c.ropeTheta, rotaryDim: c.rotaryDim, qkvBias: c.qkvBias, outputBias: c.outputBias,
        qkNorm: c.qkNorm, normEpsilon: c.rmsNormEps, clipQKV: c.clipQKV, slidingWindow: c.layerWindows[i],
        ropeScaling: c.ropeScaling, sinks: c.sinks, ropeInterleave: c.ropeInterleave,
        outputGate: c.outputGate, qkNormZeroCentered: zeroCentered,
        ...(c.llama4Layers?.[i] ?? {}),
        ...(options.denseStorage !== undefined ? { denseStorage: options.denseStorage } : {}),
        initializerRange: init,
      })).apply(attnIn) as tfl.SymbolicTensor;
    h = tfl.layers.add({ name: `${prefix}.attn_residual` }).apply([h, attn]) as tfl.SymbolicTensor;
    const mlpIn = layer(new RMSNorm({ name: `${prefix}.post_attention_layernorm`, epsilon: c.rmsNormEps, zeroCentered })).apply(h);
    const mlp = layer(c.moeLayers.includes(i) ?
      new SparseMoE({
        name: `${prefix}.${c.mlpModule}`, numExperts: c.moe.numExperts, intermediateSize: c.moe.intermediateSize,
        routing: c.moe.routing, activation: c.moe.activation, sharedExpert: c.moe.sharedExpert,
        correctionBias: c.moe.correctionBias,
        initializerRange: init, expertKernel: options.expertKernel, loraMode: options.loraMode,
        expertStorage: options.expertStorage,
        ...(options.expertGroupSize !== undefined ? { expertGroupSize: options.expertGroupSize } : {}),
        ...(c.moe.fusedInterleaved ? { expertLayout: 'inOutInterleaved', expertBias: true, routerBias: true } as const : {}),
        ...(c.moe.fusedInOut ? { expertLayout: 'inOut' } as const : {}),
        ...(c.moe.weightedInput ? { weightedInput: true } : {}),
      }) :
      new SwiGLUMLP({ name: `${prefix}.${c.mlpModule}`, intermediateSize: c.denseIntermediateSize!, initializerRange: init }));
    const out = mlp.apply(mlpIn) as tfl.SymbolicTensor;
    h = tfl.layers.add({ name: `${prefix}.mlp_residual` }).apply([h, out]) as tfl.SymbolicTensor;
  }
  h = layer(new RMSNorm({ name: 'model.norm', epsilon: c.rmsNormEps, zeroCentered: c.zeroCenteredNorms ?? false })).apply(h) as tfl.SymbolicTensor;
  const head = c.tieWordEmbeddings ? embed :
    layer(new LMHead({
      name: 'lm_head', vocabSize: c.vocabSize, hiddenSize: c.hiddenSize, initializerRange: init,
      ...(options.denseStorage !== undefined ? { denseStorage: options.denseStorage } : {}),
    }));
  const logits = head.apply(h) as tfl.SymbolicTensor;
  const model = tfl.model({ inputs: ids, outputs: logits, name: options.name ?? 'moe_causal_lm' });
  model.setUserDefinedMetadata({ [METADATA_KEY]: JSON.parse(JSON.stringify(hfConfig)) });
  // a user's own loop over model.apply shares each pass's constants as batchLoss does
  passPerCall(model);
  return model;
}

/** A causal LM cut before its LM head (`splitAtHead`). */
export interface HeadSplit {
  /** ids [B, S] → the final normed hidden states [B, S, H]: the model's own layers up to the head, shared */
  trunk: tfl.LayersModel;
  /** the head's weight [V, H]: lm_head.weight, or the embedding table when the embeddings are tied */
  headWeight: tfl.LayerVariable;
}

/** per model, its split (null: its output is not an LM head on hidden states) */
const headSplits = new WeakMap<tfl.LayersModel, HeadSplit | null>();

/**
 * @internal The model as trunk and head weight, so that a loss can apply the head itself,
 * chunk by chunk (linearCrossEntropy), instead of receiving the [B, S, V] logits; null when the
 * model's output is not an LMHead or tied TokenEmbedding applied to hidden states (any other
 * LayersModel), for which the loss takes the logits. The model itself is unchanged, so predict,
 * generation and save see the whole model. The trunk follows the model's gradient checkpointing.
 *
 * ```js
 * const split = splitAtHead(model);
 * const hidden = split.trunk.apply(ids, {training: true});  // [B, S, H]
 * ```
 */
export function splitAtHead(model: tfl.LayersModel): HeadSplit | null {
  let split = headSplits.get(model);
  if (split === undefined) {
    split = findHeadSplit(model);
    headSplits.set(model, split);
  }
  if (split !== null) setGradientCheckpointing(split.trunk, gradientCheckpointingEnabled(model));
  return split;
}

function findHeadSplit(model: tfl.LayersModel): HeadSplit | null {
  if (model.inputs.length !== 1 || model.outputs.length !== 1) return null;
  const logits = model.outputs[0];
  const head = logits.sourceLayer;
  if (!(head instanceof LMHead || head instanceof TokenEmbedding)) return null;
  if (logits.inputs.length !== 1 || logits.inputs[0].rank !== 3 || head.weights.length !== 1) return null;
  // a Container over the same layers: no weight is copied, the model's graph is not touched
  const trunk = tfl.model({ inputs: model.inputs, outputs: logits.inputs[0], name: `${model.name}_trunk` });
  return { trunk, headWeight: head.weights[0] };
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
