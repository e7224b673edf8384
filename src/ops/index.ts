/** The public ops (see src/ops/README.md for the dimension letters and layouts). */
export * from './routing/index.js';
export { referenceRoute } from './reference/routing.js';
export { loadBalancingLoss, routerZLoss } from './aux_losses.js';
export { tokenCrossEntropy } from './token_cross_entropy.js';
export {
  linearCrossEntropy, defaultChunkRows, GRADIENT_IN_FORWARD_FLAG, LOGITS_CHUNK_BYTES, LOGITS_CHUNK_BYTES_FLAG, type LinearCrossEntropyOptions,
} from './linear_cross_entropy.js';
export { scaledDotProductAttention } from './attention_core.js';
export { recompute, type RecomputeScope } from './recompute.js';
export * from './lora/index.js';
export { fusedExperts, chooseLoRAMode, type FusedExpertsOptions } from './experts/fused_experts.js';
export { buildDispatchPlan, buildDispatchPlanAsync, type DispatchPlan } from './experts/dispatch_plan.js';
export { referenceExperts, referenceMoEBlock, type ReferenceOptions } from './reference/moe_block.js';
export { sharedExpert } from './shared_expert.js';
export {
  moeBlock, registerMoEBlockKernel, moeBlockKernelNames, registerExpertsImplementation,
  type ExpertsImplementation, type MoEBlockKernel, type MoEBlockOptions, type MoEBlockResult,
} from './moe_block.js';
export { OpArgumentError } from './validate.js';
export {
  PackedExpertWeight, packExpertWeight, unpackExpertWeight, packedExpertWeightFromBits, isPackedExpertWeight,
  PACKED_KINDS, type PackedKind, type ExpertWeightTensor,
  HALF_KINDS, type HalfKind, isQuantizedKind, type PackedOptions,
  PackedDenseWeight, packDenseWeight, packedDenseWeightFromBits, unpackDenseWeight, gatherDenseRows, isPackedDenseWeight,
  type DenseWeightTensor,
} from './packed.js';
export {
  QUANTIZED_KINDS, type QuantizedKind, quantizedLayout, type QuantizedLayout, quantizeExpertValues,
  NF4_CODE_BOOK, E2M1_VALUES, INT4_GROUP_SIZES,
} from './quantized.js';
export type * from './types.js';
