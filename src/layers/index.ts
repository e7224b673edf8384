/**
 * The tfjs-layers pieces: SparseMoE (the MoE block with its LoRA adapters) and the decoder parts
 * MoECausalLM is built from. Importing this registers every class for (de)serialization.
 */
export {
  SparseMoE, LORA_TARGETS, EXPERT_LORA_TARGETS, SHARED_LORA_TARGETS, EXPERT_STORAGES, variableFloat32, variableShape,
  type SparseMoEArgs, type LoRAAdapterConfig, type LoRATarget, type ExpertStorage,
} from './sparse_moe.js';
export { RMSNorm, rmsNorm, rmsNormReference, type RMSNormArgs, type RMSNormOptions } from './rms_norm.js';
export { rotaryTables, applyRotary, applyRotaryReference } from './rotary.js';
export { RotaryAttention, QK_NORMS, type QKNorm, type RotaryAttentionArgs } from './attention.js';
export { MLAAttention, type MLAAttentionArgs } from './mla_attention.js';
export { GatedDeltaNet, type GatedDeltaNetArgs, type DeltaNetProjections } from './gated_delta_net.js';
export type { DSAIndexerArgs } from './dsa_indexer.js';
export { TokenEmbedding, LMHead, type VocabLayerArgs, type TokenEmbeddingArgs } from './embedding.js';
export { DENSE_STORAGES, type DenseStorage } from './dense_storage.js';
export { SwiGLUMLP, type SwiGLUMLPArgs } from './swiglu_mlp.js';
export {
  LinearLoRA, ATTENTION_PROJECTIONS, MLP_PROJECTIONS, loraBranch, linearDeltaWeight, loraDropoutMask, dropoutSeedOf,
  type LinearAdapterConfig, type LinearLoRAModule,
} from './linear_lora.js';
export { protectString, restoreString } from './config_strings.js';
export { passPerCall } from './sequence_context.js';
export {
  buildMoECausalLM, moeCausalLMConfigFromHF, hfConfigOf, sparseMoELayers, decoderLayerIndex, trainableVariables,
  addMoEAdapter, freezeBaseLayers, WHOLE_MODEL_TYPES,
  type MoECausalLM, type MoECausalLMConfig, type MoECausalLMOptions,
} from './moe_causal_lm.js';
export { setGradientCheckpointing, gradientCheckpointingEnabled } from './gradient_checkpointing.js';
