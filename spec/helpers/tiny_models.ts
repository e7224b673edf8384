/** Tiny HF configs for specs that need a whole model. */

/** Qwen2-MoE, 2 layers: layer 0 dense (mlp_only_layers), layer 1 MoE with a gated shared expert; q/k/v biases. */
export const TINY_QWEN2_MOE = {
  model_type: 'qwen2_moe', vocab_size: 32, hidden_size: 8, num_hidden_layers: 2, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 4, num_experts: 2, num_experts_per_tok: 1, moe_intermediate_size: 4,
  intermediate_size: 6, shared_expert_intermediate_size: 4, mlp_only_layers: [0], decoder_sparse_step: 1,
  norm_topk_prob: false, rms_norm_eps: 1e-6,
};
