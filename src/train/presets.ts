/**
 * Small from-scratch configs, one per whole-model family, for `train --init-config <family>`:
 * hidden 64, 2 layers, 4 heads (2 key/value heads), 8 experts with top-2 routing, expert
 * intermediate size 64. Each is a complete config.json of its family (transformers reads it);
 * vocab_size is filled in from the tokenizer.
 */
import type { HFConfig } from '../models/families.js';

const COMMON = {
  hidden_size: 64,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  max_position_embeddings: 256,
  initializer_range: 0.02,
  tie_word_embeddings: false,
  attention_dropout: 0.0,
  hidden_act: 'silu',
  use_cache: true,
  bos_token_id: null,
  eos_token_id: null,
  pad_token_id: null,
  output_router_logits: false,
  router_aux_loss_coef: 0.001,
  dtype: 'float32',
} as const;

export const INIT_PRESETS = {
  mixtral: {
    architectures: ['MixtralForCausalLM'], model_type: 'mixtral', ...COMMON,
    intermediate_size: 64, num_local_experts: 8, num_experts_per_tok: 2, rms_norm_eps: 1e-5,
    rope_theta: 1e6, sliding_window: null, router_jitter_noise: 0.0,
  },
  qwen2_moe: {
    architectures: ['Qwen2MoeForCausalLM'], model_type: 'qwen2_moe', ...COMMON,
    intermediate_size: 128, moe_intermediate_size: 64, shared_expert_intermediate_size: 64,
    num_experts: 8, num_experts_per_tok: 2, norm_topk_prob: true, decoder_sparse_step: 1, mlp_only_layers: [],
    qkv_bias: true, rms_norm_eps: 1e-6, rope_theta: 10000, use_sliding_window: false, sliding_window: null,
  },
  qwen3_moe: {
    architectures: ['Qwen3MoeForCausalLM'], model_type: 'qwen3_moe', ...COMMON,
    head_dim: 16, intermediate_size: 128, moe_intermediate_size: 64,
    num_experts: 8, num_experts_per_tok: 2, norm_topk_prob: true, decoder_sparse_step: 1, mlp_only_layers: [],
    attention_bias: false, rms_norm_eps: 1e-6, rope_theta: 10000, use_sliding_window: false, sliding_window: null,
  },
  olmoe: {
    architectures: ['OlmoeForCausalLM'], model_type: 'olmoe', ...COMMON,
    intermediate_size: 64, num_experts: 8, num_experts_per_tok: 2, norm_topk_prob: false,
    attention_bias: false, clip_qkv: null, rms_norm_eps: 1e-5, rope_theta: 10000,
  },
} as const satisfies Record<string, HFConfig>;

export type InitPreset = keyof typeof INIT_PRESETS;
export const INIT_PRESET_NAMES = Object.keys(INIT_PRESETS) as InitPreset[];

/** A fresh copy of a preset with `vocab_size` set. */
export function presetConfig(name: InitPreset, vocabSize: number): HFConfig {
  return { ...JSON.parse(JSON.stringify(INIT_PRESETS[name])) as HFConfig, vocab_size: vocabSize };
}
