/**
 * The MoE model families as data: one descriptor per Hugging Face `model_type` says how to read
 * its config.json, which decoder layers carry an MoE block, where the block's tensors sit in a
 * Hub checkpoint, and which transformers-v5 parameter name maps to which field of
 * `MoEBlockWeights`. Adding a family is adding a row, not a class.
 */
import { assertFiniteNumber, assertInteger, fail } from '../ops/validate.js';
import type { ExpertActivation, MoEBlockConfig, RoutingConfig, RoutingKind } from '../ops/types.js';
import type { WeightField } from './weight_fields.js';
import { describeValue } from '../util/describe.js';

/** A parsed HF config.json; only the keys a descriptor names are read. */
export type HFConfig = Record<string, unknown>;

export const MODEL_TYPES = [
  'mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'glm4_moe', 'gpt_oss',
  'ernie4_5_moe', 'hunyuan_v1_moe', 'minimax_m2',
  'llama4_text', 'mistral4', 'gemma4_text',
  'qwen3_5_moe_text', 'glm_moe_dsa', 'qwen3_next',
] as const;
export type ModelType = typeof MODEL_TYPES[number];

/**
 * Per-expert tensors as the Hub stores them ('perExpert', `{e}` is the expert index),
 * gpt-oss's fused tensors kept as stored ('fusedInterleaved'), or fused tensors as transformers 5
 * holds them, gate half then up half ('fused'): Llama 4's [E, in, out] (layout 'inOut': gate_up
 * [E, H, 2I], down [E, I, H]), Gemma 4's [E, out, in] ('outIn': [E, 2I, H], [E, H, I]).
 * Names are relative to the block.
 */
export type ExpertCheckpoint =
  | { kind: 'perExpert'; gate: string; up: string; down: string }
  | { kind: 'fusedInterleaved'; gateUp: string; gateUpBias: string; down: string; downBias: string }
  | { kind: 'fused'; layout: 'inOut' | 'outIn'; gateUp: string; down: string };

/**
 * Tensor names of one MoE block in a Hub checkpoint, relative to `model.layers.N.<block>.`
 * (`model.layers.N.` when block is '': Gemma 4's router and experts sit on the decoder layer).
 */
export interface CheckpointLayout {
  block: string;
  /**
   * Gemma 4 adds the router's input scale [H] and per-expert scale [E]; correctionBiasRow: the
   * bias is stored [1, E] (ERNIE's moe_statics), not [E]
   */
  router: {
    weight: string; bias?: string; correctionBias?: string; correctionBiasRow?: boolean;
    inputScale?: string; expertScale?: string;
  };
  experts: ExpertCheckpoint;
  shared?: { gate: string; up: string; down: string; sigmoidGate?: string };
}

/** How the shared expert's intermediate size I_s is read: `key` (times `multiplierKey`). */
export interface SharedSize {
  key: string;
  multiplierKey?: string;
}

export interface MoEFamily {
  modelType: ModelType;
  /** keys that may hold E, the first one present wins (configs renamed them over time) */
  expertCountKeys: readonly string[];
  /** key of the routed experts' intermediate size I */
  expertIntermediateKey: string;
  /** key of K, the experts per token; default 'num_experts_per_tok' (ERNIE: moe_k, Hunyuan: moe_topk, Gemma 4: top_k_experts) */
  topKKey?: string;
  /**
   * config settings the graph does not implement, with the one value it computes: a config.json
   * that sets another is refused, never ignored (ERNIE's use_bias)
   */
  requiredValues?: Readonly<Record<string, unknown>>;
  /** the HF config class defaults, used for keys a config.json leaves out */
  defaults: Readonly<Record<string, unknown>>;
  routing: {
    kind: RoutingKind;
    /** a constant, or the config key that holds it (norm_topk_prob) */
    renormalize?: boolean | { key: string };
    /** reads n_group / topk_group */
    grouped?: boolean;
    /** key of routed_scaling_factor */
    scalingFactorKey?: string;
    /** key of the floor of the weights' divisor (softmaxBiasedTopK: ERNIE's moe_norm_min) */
    normMinKey?: string;
    /** the routing weight scales the expert's input, not its output (Llama 4; MoEBlockConfig.weightedInput) */
    weightedInput?: boolean;
  };
  activation: 'swiglu' | 'clampedSwiglu' | 'gegluTanh';
  /** the config key of the activation's name; default 'hidden_act' (Gemma 4: hidden_activation) */
  hiddenActKey?: string;
  /**
   * The config.hidden_act values (transformers' ACT2FN names) whose function the experts and the
   * dense MLPs compute, default first; null when the family's experts do not read hidden_act
   * (gpt-oss hard-codes its clamped SwiGLU).
   */
  hiddenActs: readonly string[] | null;
  /**
   * 'all': every decoder layer; 'firstKDense': layers >= first_k_dense_replace;
   * 'sparseStep': (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers;
   * 'mlpLayerTypes': mlp_layer_types[i] == 'sparse', or, without that list, 'firstKDense';
   * 'interval': (i + 1) % moe_layer_interval == 0 and moe_layer_start_index <= i <= moe_layer_end_index
   * (-1: the last layer), ERNIE-4.5's rule;
   * 'interleaveStep' (Llama 4): the layers listed in moe_layers, or when it is not set
   * i = step − 1, 2·step − 1, ... with step = interleave_moe_layer_step;
   * 'enableMoEBlock' (Gemma 4): every layer when enable_moe_block, else none.
   */
  moeLayers: 'all' | 'firstKDense' | 'sparseStep' | 'mlpLayerTypes' | 'interval' | 'interleaveStep' | 'enableMoEBlock';
  checkpoint: CheckpointLayout;
  /** present when the block has shared experts */
  sharedSize?: SharedSize;
  /** the block's parameter names in transformers v5 (as in golden `block.grad.<name>`) → field */
  parameters: Readonly<Record<string, WeightField>>;
  /** what the decoder's RotaryAttention adds for this family; absent: nothing beyond the defaults */
  attention?: AttentionTraits;
  /**
   * transformers' causal-LM class when it is not the model type in Pascal case
   * ('ernie4_5_moe' → Ernie4_5_MoeForCausalLM), as PEFT records it in auto_mapping
   */
  causalLMClass?: string;
  /**
   * transformers' models/<module> when it is not the model type (PEFT's auto_mapping parent_library):
   * llama4_text lives in models/llama4, qwen3_5_moe_text in models/qwen3_5_moe
   */
  transformersModule?: string;
  /**
   * How PEFT 0.21 rewrites a LoRA config for this model type (transformers-v5 fused experts): the
   * base type transformers' `_MODEL_TO_CONVERSION_PATTERN` maps it to, 'mixtral' (w1/w3/w2/gate)
   * or 'qwen2_moe' (gate_proj/up_proj/down_proj/gate); absent: no rewrite. It decides 'all-linear'
   * and how PEFT reads MLP target_modules (src/patch/linear_targets.ts). Qwen2-MoE itself is in
   * that mapping but PEFT 0.21 + transformers 5.17 left its configs as written (measured by
   * tools/peft_check/check_linear.py), so its row has none.
   */
  peftConversion?: 'mixtral' | 'qwen2_moe';
}

/** Decoder attention settings a family adds (read by moeCausalLMConfigFromHF). */
export interface AttentionTraits {
  /** a learned sink logit per head in every softmax ('self_attn.sinks', gpt-oss) */
  sinks?: boolean;
  /** rope_type values implemented beyond 'default' (YaRN for gpt-oss) */
  scaledRopes?: readonly string[];
  /**
   * config.json must state its rope: the config class's default is a scaled rope this graph
   * would not apply from an absent key
   */
  ropeRequired?: boolean;
  /** 'sliding_attention' / 'full_attention' per layer from layer_types (default alternating, sliding first) */
  layerTypes?: boolean;
  /** rope_theta, sliding_window and attention_bias when config.json leaves them out */
  ropeTheta?: number;
  slidingWindow?: number;
  attentionBias?: boolean;
  /** rms_norm_eps and tie_word_embeddings when config.json leaves them out (the config class's defaults) */
  rmsNormEps?: number;
  tieWordEmbeddings?: boolean;
  /** rope pairs adjacent (2i, 2i+1) in each head, GPT-J style (ERNIE-4.5) */
  ropeInterleave?: boolean;
  /** head_dim when config.json leaves it out, for a config class that sets one (else hidden / heads) */
  headDim?: number;
}

const PER_EXPERT_PROJ: ExpertCheckpoint = {
  kind: 'perExpert',
  gate: 'experts.{e}.gate_proj.weight',
  up: 'experts.{e}.up_proj.weight',
  down: 'experts.{e}.down_proj.weight',
};

const ROUTED_PARAMETERS: Readonly<Record<string, WeightField>> = {
  'gate.weight': 'router.weight',
  'experts.gate_up_proj': 'experts.gateUp',
  'experts.down_proj': 'experts.down',
};

const SHARED_EXPERTS = {
  gate: 'shared_experts.gate_proj.weight',
  up: 'shared_experts.up_proj.weight',
  down: 'shared_experts.down_proj.weight',
};

const SHARED_EXPERTS_PARAMETERS: Readonly<Record<string, WeightField>> = {
  ...ROUTED_PARAMETERS,
  'shared_experts.gate_proj.weight': 'shared.gate',
  'shared_experts.up_proj.weight': 'shared.up',
  'shared_experts.down_proj.weight': 'shared.down',
};

/** transformers' ACT2FN maps both names to nn.SiLU, the gate activation of SwiGLU */
const SILU_NAMES = ['silu', 'swish'] as const;

const QWEN_LIKE = {
  expertIntermediateKey: 'moe_intermediate_size',
  routing: { kind: 'softmaxTopK', renormalize: { key: 'norm_topk_prob' } },
  activation: 'swiglu',
  hiddenActs: SILU_NAMES,
  moeLayers: 'sparseStep',
} as const;

const DEEPSEEK_LIKE = {
  expertCountKeys: ['n_routed_experts'],
  expertIntermediateKey: 'moe_intermediate_size',
  routing: {
    kind: 'sigmoidGroupTopK', renormalize: { key: 'norm_topk_prob' }, grouped: true,
    scalingFactorKey: 'routed_scaling_factor',
  },
  activation: 'swiglu',
  hiddenActs: SILU_NAMES,
  moeLayers: 'firstKDense',
  checkpoint: {
    block: 'mlp',
    router: { weight: 'gate.weight', correctionBias: 'gate.e_score_correction_bias' },
    experts: PER_EXPERT_PROJ,
    shared: SHARED_EXPERTS,
  },
  sharedSize: { key: 'moe_intermediate_size', multiplierKey: 'n_shared_experts' },
  parameters: SHARED_EXPERTS_PARAMETERS,
} as const;

/**
 * Qwen2-MoE's block: softmax top-k routing plus one shared expert scaled by
 * sigmoid(shared_expert_gate(x)); Qwen3-Next and Qwen3.5-MoE keep it unchanged.
 */
const SIGMOID_GATED_SHARED_EXPERT = {
  checkpoint: {
    block: 'mlp',
    router: { weight: 'gate.weight' },
    experts: PER_EXPERT_PROJ,
    shared: {
      gate: 'shared_expert.gate_proj.weight',
      up: 'shared_expert.up_proj.weight',
      down: 'shared_expert.down_proj.weight',
      sigmoidGate: 'shared_expert_gate.weight',
    },
  },
  sharedSize: { key: 'shared_expert_intermediate_size' },
  parameters: {
    ...ROUTED_PARAMETERS,
    'shared_expert.gate_proj.weight': 'shared.gate',
    'shared_expert.up_proj.weight': 'shared.up',
    'shared_expert.down_proj.weight': 'shared.down',
    'shared_expert_gate.weight': 'shared.sigmoidGate',
  },
} as const;

/**
 * ERNIE-4.5-MoE (transformers' Ernie4_5_MoeSparseMoeBlock): softmax router whose selection adds
 * moe_statics.e_score_correction_bias ([1, E] on disk), shared experts of
 * moe_intermediate_size · moe_num_shared_experts, MoE layers by moe_layer_start_index/interval.
 */
const ERNIE4_5_MOE: MoEFamily = {
  modelType: 'ernie4_5_moe',
  peftConversion: 'qwen2_moe',
  expertCountKeys: ['moe_num_experts', 'num_experts'],
  expertIntermediateKey: 'moe_intermediate_size',
  topKKey: 'moe_k',
  requiredValues: { use_bias: false },
  defaults: {
    moe_num_experts: 64, moe_k: 6, moe_num_shared_experts: 2, moe_layer_start_index: 1,
    moe_layer_end_index: -1, moe_layer_interval: 1, moe_norm_min: 1e-12, use_bias: false,
  },
  routing: { kind: 'softmaxBiasedTopK', normMinKey: 'moe_norm_min' },
  activation: 'swiglu',
  hiddenActs: SILU_NAMES,
  moeLayers: 'interval',
  checkpoint: {
    block: 'mlp',
    router: { weight: 'gate.weight', correctionBias: 'moe_statics.e_score_correction_bias', correctionBiasRow: true },
    experts: PER_EXPERT_PROJ,
    shared: SHARED_EXPERTS,
  },
  sharedSize: { key: 'moe_intermediate_size', multiplierKey: 'moe_num_shared_experts' },
  // the selection bias is an nn.Parameter (requires_grad False) in transformers, [1, E]: no gradient
  parameters: { ...SHARED_EXPERTS_PARAMETERS, 'gate.moe_statics.e_score_correction_bias': 'router.correctionBias' },
  attention: { ropeTheta: 500000, rmsNormEps: 1e-5, tieWordEmbeddings: true, ropeInterleave: true },
  causalLMClass: 'Ernie4_5_MoeForCausalLM',
};

/**
 * Hunyuan-A13B (transformers' HunYuanMoEV1Moe): softmax → top-k → renormalise on gate.wg, routed
 * experts and one always-on shared MLP, both of intermediate_size; every layer is MoE.
 */
const HUNYUAN_V1_MOE: MoEFamily = {
  modelType: 'hunyuan_v1_moe',
  peftConversion: 'qwen2_moe',
  expertCountKeys: ['num_experts'],
  expertIntermediateKey: 'intermediate_size',
  topKKey: 'moe_topk',
  defaults: { num_experts: 1, moe_topk: 1 },
  routing: { kind: 'softmaxTopK', renormalize: true },
  activation: 'swiglu',
  hiddenActs: SILU_NAMES,
  moeLayers: 'all',
  checkpoint: {
    block: 'mlp',
    router: { weight: 'gate.wg.weight' },
    experts: PER_EXPERT_PROJ,
    shared: {
      gate: 'shared_mlp.gate_proj.weight', up: 'shared_mlp.up_proj.weight', down: 'shared_mlp.down_proj.weight',
    },
  },
  sharedSize: { key: 'intermediate_size' },
  parameters: {
    'gate.wg.weight': 'router.weight',
    'experts.gate_up_proj': 'experts.gateUp',
    'experts.down_proj': 'experts.down',
    'shared_mlp.gate_proj.weight': 'shared.gate',
    'shared_mlp.up_proj.weight': 'shared.up',
    'shared_mlp.down_proj.weight': 'shared.down',
  },
  attention: { ropeTheta: 10000, rmsNormEps: 1e-5 },
  causalLMClass: 'HunYuanMoEV1ForCausalLM',
};

/**
 * MiniMax-M2 (transformers' MiniMaxM2SparseMoeBlock): sigmoid scores, e_score_correction_bias for
 * the selection, weights renormalised; Mixtral's checkpoint names; no shared expert.
 */
const MINIMAX_M2: MoEFamily = {
  modelType: 'minimax_m2',
  peftConversion: 'mixtral',
  expertCountKeys: ['num_local_experts', 'num_experts'],
  expertIntermediateKey: 'intermediate_size',
  defaults: { num_local_experts: 256, num_experts_per_tok: 8 },
  // no groups: one group kept whole; transformers divides by the bare sum, this kind by sum + 1e-20,
  // which float32 cannot tell apart for any sum of K sigmoids
  routing: { kind: 'sigmoidGroupTopK', renormalize: true },
  activation: 'swiglu',
  hiddenActs: SILU_NAMES,
  moeLayers: 'all',
  checkpoint: {
    block: 'block_sparse_moe',
    router: { weight: 'gate.weight', correctionBias: 'e_score_correction_bias' },
    experts: {
      kind: 'perExpert', gate: 'experts.{e}.w1.weight', up: 'experts.{e}.w3.weight', down: 'experts.{e}.w2.weight',
    },
  },
  parameters: ROUTED_PARAMETERS,
  attention: { ropeTheta: 5000000, rmsNormEps: 1e-6, headDim: 128 },
  causalLMClass: 'MiniMaxM2ForCausalLM',
};

/**
 * Llama 4's text model (Llama4ForCausalLM, model_type 'llama4_text'): top-k sigmoid routing that
 * scales the expert's input, a shared expert of intermediate_size, fused [E, in, out] experts
 * under `feed_forward`, MoE every interleave_moe_layer_step-th layer (dense ones use
 * intermediate_size_mlp).
 */
const LLAMA4_TEXT: MoEFamily = {
  modelType: 'llama4_text',
  expertCountKeys: ['num_local_experts'],
  expertIntermediateKey: 'intermediate_size',
  defaults: { num_local_experts: 16, num_experts_per_tok: 1, interleave_moe_layer_step: 1, intermediate_size: 8192 },
  routing: { kind: 'topKSigmoid', weightedInput: true },
  activation: 'swiglu',
  hiddenActs: SILU_NAMES,
  moeLayers: 'interleaveStep',
  checkpoint: {
    block: 'feed_forward',
    router: { weight: 'router.weight' },
    experts: { kind: 'fused', layout: 'inOut', gateUp: 'experts.gate_up_proj', down: 'experts.down_proj' },
    shared: {
      gate: 'shared_expert.gate_proj.weight',
      up: 'shared_expert.up_proj.weight',
      down: 'shared_expert.down_proj.weight',
    },
  },
  sharedSize: { key: 'intermediate_size' },
  // the Hub's Llama 4 configs scale their rope the llama3 way
  attention: { scaledRopes: ['llama3'] },
  parameters: {
    'router.weight': 'router.weight',
    'experts.gate_up_proj': 'experts.gateUp',
    'experts.down_proj': 'experts.down',
    'shared_expert.gate_proj.weight': 'shared.gate',
    'shared_expert.up_proj.weight': 'shared.up',
    'shared_expert.down_proj.weight': 'shared.down',
  },
  // the text model lives in transformers' llama4 module under the multimodal model's name
  causalLMClass: 'Llama4ForCausalLM',
  transformersModule: 'llama4',
};

/**
 * Mistral 4 (Mistral4ForCausalLM): DeepSeek-V3's block and layout without the correction bias,
 * softmax scores with group-limited top-k (Mistral4TopkRouter), shared experts.
 */
const MISTRAL4: MoEFamily = {
  ...DEEPSEEK_LIKE,
  modelType: 'mistral4',
  routing: {
    kind: 'softmaxGroupTopK', renormalize: { key: 'norm_topk_prob' }, grouped: true,
    scalingFactorKey: 'routed_scaling_factor',
  },
  // transformers 5.17 has no checkpoint conversion for mistral4: save_pretrained writes the fused experts
  checkpoint: {
    ...DEEPSEEK_LIKE.checkpoint, router: { weight: 'gate.weight' },
    experts: { kind: 'fused', layout: 'outIn', gateUp: 'experts.gate_up_proj', down: 'experts.down_proj' },
  },
  defaults: {
    n_routed_experts: 128, num_experts_per_tok: 4, n_group: 1, topk_group: 1,
    norm_topk_prob: true, routed_scaling_factor: 1, first_k_dense_replace: 0, n_shared_experts: 1,
  },
};

/**
 * Gemma 4's text model (Gemma4ForCausalLM, model_type 'gemma4_text', enable_moe_block): the
 * router and experts sit on the decoder layer beside its dense MLP. The router reads
 * rms(x)·scale·H^-½, routes softmax → top-k → renormalised, times per_expert_scale; the experts
 * are fused [E, 2I, H] / [E, H, I] with a tanh-GELU GLU (hidden_activation).
 */
const GEMMA4_TEXT: MoEFamily = {
  modelType: 'gemma4_text',
  expertCountKeys: ['num_experts'],
  expertIntermediateKey: 'moe_intermediate_size',
  topKKey: 'top_k_experts',
  hiddenActKey: 'hidden_activation',
  defaults: { enable_moe_block: false, rms_norm_eps: 1e-6 },
  routing: { kind: 'softmaxTopK', renormalize: true },
  activation: 'gegluTanh',
  // ACT2FN: both are the tanh approximation of GELU
  hiddenActs: ['gelu_pytorch_tanh', 'gelu_new'],
  moeLayers: 'enableMoEBlock',
  checkpoint: {
    block: '',
    router: { weight: 'router.proj.weight', inputScale: 'router.scale', expertScale: 'router.per_expert_scale' },
    experts: { kind: 'fused', layout: 'outIn', gateUp: 'experts.gate_up_proj', down: 'experts.down_proj' },
  },
  parameters: {
    'router.proj.weight': 'router.weight',
    'router.scale': 'router.inputScale',
    'router.per_expert_scale': 'router.expertScale',
    'experts.gate_up_proj': 'experts.gateUp',
    'experts.down_proj': 'experts.down',
  },
};

/** The table. Defaults are those of the transformers 5 config classes. */
export const FAMILIES: Readonly<Record<ModelType, MoEFamily>> = {
  mixtral: {
    modelType: 'mixtral',
    peftConversion: 'mixtral',
    expertCountKeys: ['num_local_experts'],
    expertIntermediateKey: 'intermediate_size',
    defaults: { num_local_experts: 8, num_experts_per_tok: 2 },
    routing: { kind: 'softmaxTopK', renormalize: true },
    activation: 'swiglu',
    hiddenActs: SILU_NAMES,
    moeLayers: 'all',
    checkpoint: {
      block: 'block_sparse_moe',
      router: { weight: 'gate.weight' },
      experts: {
        kind: 'perExpert', gate: 'experts.{e}.w1.weight', up: 'experts.{e}.w3.weight',
        down: 'experts.{e}.w2.weight',
      },
    },
    parameters: ROUTED_PARAMETERS,
  },
  qwen2_moe: {
    modelType: 'qwen2_moe',
    ...QWEN_LIKE,
    expertCountKeys: ['num_experts', 'num_local_experts'],
    defaults: {
      num_experts: 60, num_experts_per_tok: 4, norm_topk_prob: false, decoder_sparse_step: 1,
      mlp_only_layers: [],
    },
    ...SIGMOID_GATED_SHARED_EXPERT,
  },
  qwen3_moe: {
    modelType: 'qwen3_moe',
    peftConversion: 'qwen2_moe',
    ...QWEN_LIKE,
    // transformers 5 writes num_local_experts, the Hub's Qwen3 configs say num_experts
    expertCountKeys: ['num_experts', 'num_local_experts'],
    defaults: {
      num_experts: 128, num_experts_per_tok: 8, norm_topk_prob: false, decoder_sparse_step: 1,
      mlp_only_layers: [],
    },
    checkpoint: { block: 'mlp', router: { weight: 'gate.weight' }, experts: PER_EXPERT_PROJ },
    parameters: ROUTED_PARAMETERS,
  },
  olmoe: {
    modelType: 'olmoe',
    peftConversion: 'qwen2_moe',
    expertCountKeys: ['num_experts', 'num_local_experts'],
    expertIntermediateKey: 'intermediate_size',
    defaults: { num_experts: 64, num_experts_per_tok: 8, norm_topk_prob: false },
    routing: { kind: 'softmaxTopK', renormalize: { key: 'norm_topk_prob' } },
    activation: 'swiglu',
    hiddenActs: SILU_NAMES,
    moeLayers: 'all',
    checkpoint: { block: 'mlp', router: { weight: 'gate.weight' }, experts: PER_EXPERT_PROJ },
    parameters: ROUTED_PARAMETERS,
  },
  deepseek_v3: {
    modelType: 'deepseek_v3',
    peftConversion: 'qwen2_moe',
    ...DEEPSEEK_LIKE,
    defaults: {
      n_routed_experts: 256, num_experts_per_tok: 8, n_group: 8, topk_group: 4,
      norm_topk_prob: true, routed_scaling_factor: 2.5, first_k_dense_replace: 3,
      n_shared_experts: 1,
    },
  },
  glm4_moe: {
    modelType: 'glm4_moe',
    peftConversion: 'qwen2_moe',
    ...DEEPSEEK_LIKE,
    defaults: {
      n_routed_experts: 128, num_experts_per_tok: 8, n_group: 1, topk_group: 1,
      norm_topk_prob: true, routed_scaling_factor: 1, first_k_dense_replace: 1,
      n_shared_experts: 1,
    },
  },
  gpt_oss: {
    modelType: 'gpt_oss',
    expertCountKeys: ['num_local_experts', 'num_experts'],
    expertIntermediateKey: 'intermediate_size',
    defaults: { num_local_experts: 128, num_experts_per_tok: 4, swiglu_alpha: 1.702, swiglu_limit: 7 },
    routing: { kind: 'topKSoftmax' },
    activation: 'clampedSwiglu',
    hiddenActs: null,
    moeLayers: 'all',
    checkpoint: {
      block: 'mlp',
      router: { weight: 'router.weight', bias: 'router.bias' },
      experts: {
        kind: 'fusedInterleaved',
        gateUp: 'experts.gate_up_proj',
        gateUpBias: 'experts.gate_up_proj_bias',
        down: 'experts.down_proj',
        downBias: 'experts.down_proj_bias',
      },
    },
    attention: {
      sinks: true, scaledRopes: ['yarn'], ropeRequired: true, layerTypes: true,
      ropeTheta: 150000, slidingWindow: 128, attentionBias: true,
    },
    parameters: {
      'router.weight': 'router.weight',
      'router.bias': 'router.bias',
      'experts.gate_up_proj': 'experts.gateUp',
      'experts.gate_up_proj_bias': 'experts.gateUpBias',
      'experts.down_proj': 'experts.down',
      'experts.down_proj_bias': 'experts.downBias',
    },
  },
  ernie4_5_moe: ERNIE4_5_MOE,
  hunyuan_v1_moe: HUNYUAN_V1_MOE,
  minimax_m2: MINIMAX_M2,
  llama4_text: LLAMA4_TEXT,
  mistral4: MISTRAL4,
  gemma4_text: GEMMA4_TEXT,
  // Qwen3.5-MoE's text model (Qwen3_5MoeTextConfig; the Hub's 'qwen3_5_moe' wraps it in text_config):
  // its router always renormalizes the top-k softmax (no norm_topk_prob), every layer is MoE
  qwen3_5_moe_text: {
    modelType: 'qwen3_5_moe_text',
    expertCountKeys: ['num_experts'],
    expertIntermediateKey: 'moe_intermediate_size',
    defaults: { num_experts: 256, num_experts_per_tok: 8, shared_expert_intermediate_size: 512 },
    routing: { kind: 'softmaxTopK', renormalize: true },
    activation: 'swiglu',
    hiddenActs: SILU_NAMES,
    moeLayers: 'all',
    ...SIGMOID_GATED_SHARED_EXPERT,
    causalLMClass: 'Qwen3_5MoeForCausalLM',
    transformersModule: 'qwen3_5_moe',
  },
  // GLM-5 (GLM with DeepSeek sparse attention): DeepSeek-V3's block and routing; the MoE layers
  // are those mlp_layer_types marks 'sparse'
  glm_moe_dsa: {
    modelType: 'glm_moe_dsa',
    ...DEEPSEEK_LIKE,
    moeLayers: 'mlpLayerTypes',
    defaults: {
      n_routed_experts: 256, num_experts_per_tok: 8, n_group: 1, topk_group: 1,
      norm_topk_prob: true, routed_scaling_factor: 2.5, first_k_dense_replace: 3,
      n_shared_experts: 1,
    },
  },
  // Qwen3-Next: Qwen2-MoE's block (sigmoid-gated shared expert), norm_topk_prob on by default
  qwen3_next: {
    modelType: 'qwen3_next',
    peftConversion: 'qwen2_moe',
    ...QWEN_LIKE,
    expertCountKeys: ['num_experts'],
    defaults: {
      num_experts: 512, num_experts_per_tok: 10, norm_topk_prob: true, decoder_sparse_step: 1,
      mlp_only_layers: [], shared_expert_intermediate_size: 512,
    },
    ...SIGMOID_GATED_SHARED_EXPERT,
  },
};

/**
 * The family descriptor of an HF config.
 *
 * ```js
 * const family = familyOf(JSON.parse(fs.readFileSync('config.json', 'utf8')));
 * family.checkpoint.router.weight;  // 'gate.weight'
 * ```
 */
export function familyOf(config: HFConfig): MoEFamily {
  const op = 'familyOf';
  if (config == null || typeof config !== 'object' || Array.isArray(config)) {
    fail(op, `'config' must be a parsed config.json object but got ${config === null ? 'null' : typeof config}`);
  }
  const modelType = config['model_type'];
  if (typeof modelType !== 'string' || !(MODEL_TYPES as readonly string[]).includes(modelType)) {
    const got = typeof modelType === 'string' ? `'${modelType}'` : 'no model_type';
    fail(op, `config 'model_type' must be one of ${MODEL_TYPES.map(t => `'${t}'`).join(', ')} ` +
        `(the supported MoE families) but got ${got}`);
  }
  return FAMILIES[modelType as ModelType];
}

/** A config value, or the family default when config.json leaves it out (or sets null). */
function configValue(family: MoEFamily, config: HFConfig, key: string): unknown {
  const value = config[key];
  return value === undefined || value === null ? family.defaults[key] : value;
}

/** A required integer config value >= min. */
export function configInteger(
    op: string, family: MoEFamily, config: HFConfig, key: string, min = 1): number {
  const value = configValue(family, config, key);
  if (value === undefined) fail(op, `config.json of '${family.modelType}' must set '${key}'`);
  assertInteger(op, `config.${key}`, value, min);
  return value;
}

function configBoolean(op: string, family: MoEFamily, config: HFConfig, key: string): boolean {
  const value = configValue(family, config, key);
  if (typeof value !== 'boolean') {
    fail(op, `'config.${key}' must be a boolean but got ${JSON.stringify(value) ?? 'undefined'}`);
  }
  return value;
}

function configNumber(op: string, family: MoEFamily, config: HFConfig, key: string): number {
  const value = configValue(family, config, key);
  if (value === undefined) fail(op, `config.json of '${family.modelType}' must set '${key}'`);
  assertFiniteNumber(op, `config.${key}`, value);
  return value;
}

/** The config key of K (experts per token). */
function topKKey(family: MoEFamily): string {
  return family.topKKey ?? 'num_experts_per_tok';
}

/** A config setting the graph does not implement (family.requiredValues) is an error, never ignored. */
function refuseUnimplementedValues(op: string, family: MoEFamily, config: HFConfig): void {
  for (const [key, value] of Object.entries(family.requiredValues ?? {})) {
    const actual = configValue(family, config, key);
    if (actual !== value) {
      fail(op, `'config.${key}' must be ${JSON.stringify(value)} for '${family.modelType}' ` +
          `(the only setting implemented) but got ${describeValue(actual)}`);
    }
  }
}

/** E, the number of routed experts. */
export function expertCount(config: HFConfig): number {
  const family = familyOf(config);
  const key = family.expertCountKeys.find(k => config[k] != null) ?? family.expertCountKeys[0];
  return configInteger('expertCount', family, config, key);
}

/** The block's sizes: H, I, E, K and the shared experts' I_s (absent without shared experts). */
export interface MoEBlockDims {
  hidden: number;
  intermediate: number;
  experts: number;
  topK: number;
  sharedIntermediate?: number;
}

export function moeBlockDims(config: HFConfig): MoEBlockDims {
  const op = 'moeBlockDims';
  const family = familyOf(config);
  const dims: MoEBlockDims = {
    hidden: configInteger(op, family, config, 'hidden_size'),
    intermediate: configInteger(op, family, config, family.expertIntermediateKey),
    experts: expertCount(config),
    topK: configInteger(op, family, config, topKKey(family)),
  };
  refuseUnimplementedValues(op, family, config);
  const shared = family.sharedSize;
  if (shared) {
    let size = configInteger(op, family, config, shared.key, 0);
    if (shared.multiplierKey) size *= configInteger(op, family, config, shared.multiplierKey, 0);
    if (size > 0) dims.sharedIntermediate = size;
  }
  return dims;
}

/**
 * The MoEBlockConfig (routing and expert activation) of a family's MoE block.
 *
 * ```js
 * moeBlockConfigFromHF({model_type: 'mixtral', num_local_experts: 8, num_experts_per_tok: 2});
 * // {routing: {kind: 'softmaxTopK', topK: 2, renormalize: true}, activation: {kind: 'swiglu'}}
 * ```
 */
export function moeBlockConfigFromHF(config: HFConfig): MoEBlockConfig {
  const op = 'moeBlockConfigFromHF';
  const family = familyOf(config);
  const experts = expertCount(config);
  const spec = family.routing;
  const routing: RoutingConfig = {
    kind: spec.kind,
    topK: configInteger(op, family, config, topKKey(family)),
  };
  if (routing.topK > experts) {
    fail(op, `'config.${topKKey(family)}' must be <= num experts (${experts}) but got ${routing.topK}`);
  }
  refuseUnimplementedValues(op, family, config);
  if (spec.renormalize !== undefined) {
    routing.renormalize = typeof spec.renormalize === 'boolean' ?
        spec.renormalize : configBoolean(op, family, config, spec.renormalize.key);
  }
  if (spec.grouped) {
    routing.nGroup = configInteger(op, family, config, 'n_group');
    routing.topkGroup = configInteger(op, family, config, 'topk_group');
  }
  if (spec.scalingFactorKey) {
    routing.scalingFactor = configNumber(op, family, config, spec.scalingFactorKey);
  }
  if (spec.normMinKey) {
    routing.normMin = configNumber(op, family, config, spec.normMinKey);
    if (!(routing.normMin > 0)) fail(op, `'config.${spec.normMinKey}' must be > 0 but got ${routing.normMin}`);
  }
  if (family.hiddenActs !== null) {
    const key = family.hiddenActKey ?? 'hidden_act';
    const act = config[key] ?? family.hiddenActs[0];
    if (typeof act !== 'string' || !family.hiddenActs.includes(act)) {
      fail(op, `'config.${key}' must be ${family.hiddenActs.map(a => `'${a}'`).join(' or ')} ` +
          `(the ${family.activation === 'gegluTanh' ? 'GeGLU' : 'SwiGLU'} gate activation '${family.modelType}' computes) but got ${describeValue(act)}`);
    }
  }
  const activation: ExpertActivation = family.activation !== 'clampedSwiglu' ? { kind: family.activation } : {
    kind: 'clampedSwiglu',
    alpha: configNumber(op, family, config, 'swiglu_alpha'),
    limit: configNumber(op, family, config, 'swiglu_limit'),
  };
  return spec.weightedInput ? { routing, activation, weightedInput: true } : { routing, activation };
}

/** Whether decoder layer `layer` holds an MoE block (the others are dense MLPs). */
export function isMoELayer(config: HFConfig, layer: number): boolean {
  const op = 'isMoELayer';
  const family = familyOf(config);
  const layers = configInteger(op, family, config, 'num_hidden_layers');
  assertInteger(op, 'layer', layer, 0, layers - 1);
  switch (family.moeLayers) {
    case 'all':
      return true;
    case 'firstKDense':
      return layer >= configInteger(op, family, config, 'first_k_dense_replace', 0);
    case 'sparseStep': {
      const step = configInteger(op, family, config, 'decoder_sparse_step');
      const mlpOnly = configValue(family, config, 'mlp_only_layers');
      if (!Array.isArray(mlpOnly) || !mlpOnly.every(i => Number.isInteger(i))) {
        fail(op, `'config.mlp_only_layers' must be a list of layer indices but got ${JSON.stringify(mlpOnly)}`);
      }
      return !mlpOnly.includes(layer) && (layer + 1) % step === 0;
    }
    case 'mlpLayerTypes': {
      const types = config['mlp_layer_types'];
      if (types === undefined || types === null) {
        return layer >= Math.min(configInteger(op, family, config, 'first_k_dense_replace', 0), layers);
      }
      if (!Array.isArray(types) || types.length !== layers || !types.every(t => t === 'dense' || t === 'sparse')) {
        fail(op, `'config.mlp_layer_types' must list 'dense' or 'sparse' for each of the ${layers} layers ` +
            `but got ${JSON.stringify(types)}`);
      }
      return types[layer] === 'sparse';
    }
    case 'interval': {
      const interval = configInteger(op, family, config, 'moe_layer_interval');
      const start = configInteger(op, family, config, 'moe_layer_start_index', 0);
      const endValue = configValue(family, config, 'moe_layer_end_index');
      // the config class turns -1 into the last layer
      const end = endValue === -1 ? layers - 1 : configInteger(op, family, config, 'moe_layer_end_index', 0);
      return (layer + 1) % interval === 0 && layer >= start && layer <= end;
    }
    case 'enableMoEBlock':
      return configBoolean(op, family, config, 'enable_moe_block');
    case 'interleaveStep': {
      // Llama4TextConfig: an explicit moe_layers list wins over interleave_moe_layer_step
      const listed = config['moe_layers'];
      if (listed != null) {
        if (!Array.isArray(listed) || !listed.every(i => Number.isInteger(i) && i >= 0 && i < layers)) {
          fail(op, `'config.moe_layers' must be a list of layer indices in [0, ${layers}) but got ${JSON.stringify(listed)}`);
        }
        return listed.includes(layer);
      }
      const step = configInteger(op, family, config, 'interleave_moe_layer_step');
      return (layer + 1) % step === 0;
    }
  }
}

/**
 * The indices of the decoder layers that hold an MoE block.
 *
 * ```js
 * moeLayerIndices({model_type: 'deepseek_v3', num_hidden_layers: 4, first_k_dense_replace: 1, ...});
 * // [1, 2, 3]
 * ```
 */
export function moeLayerIndices(config: HFConfig): number[] {
  const family = familyOf(config);
  const layers = configInteger('moeLayerIndices', family, config, 'num_hidden_layers');
  return Array.from({ length: layers }, (_, i) => i).filter(i => isMoELayer(config, i));
}
