/** Tiny models for the generation specs: Qwen3-MoE with GQA, Mixtral with GQA and a sliding window, gpt-oss. */
import { buildMoECausalLM, type MoECausalLM } from '../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../src/models/families.js';
import { seedModelInit } from '../../src/train/seeded_init.js';

export const QWEN3_TINY: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: 23, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 4,
  num_key_value_heads: 2, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6, initializer_range: 0.5,
};

/** a window of 3 keys: short prompts already reach past it, so the cache drops keys */
export const MIXTRAL_WINDOW: HFConfig = {
  model_type: 'mixtral', vocab_size: 23, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 4,
  num_key_value_heads: 1, head_dim: 4, num_local_experts: 4, num_experts_per_tok: 2, intermediate_size: 8,
  sliding_window: 3, rms_norm_eps: 1e-5, initializer_range: 0.5,
};

/** gpt-oss: attention sinks, YaRN, biases, a sliding layer (window 3) then a full one */
export const GPT_OSS_TINY: HFConfig = {
  model_type: 'gpt_oss', vocab_size: 23, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 4,
  num_key_value_heads: 2, head_dim: 4, num_local_experts: 4, num_experts_per_tok: 2, intermediate_size: 8,
  sliding_window: 3, layer_types: ['sliding_attention', 'full_attention'], attention_bias: true,
  rope_parameters: {
    rope_type: 'yarn', rope_theta: 50, factor: 4, beta_fast: 8, beta_slow: 1, original_max_position_embeddings: 16,
    truncate: false,
  },
  rms_norm_eps: 1e-5, initializer_range: 0.5,
};

/** The model of `config` with weights from `seed` (large enough that the logits are far from uniform). */
export async function seededModel(config: HFConfig, seed: number): Promise<MoECausalLM> {
  const model = buildMoECausalLM(config);
  await seedModelInit(model, seed, config['initializer_range'] as number);
  return model;
}
