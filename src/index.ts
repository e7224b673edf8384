/**
 * tfjs-moe-lora: LoRA on fused Mixture-of-Experts weights and fused MoE routing / expert ops for
 * TensorFlow.js training. Import it after a tfjs backend; call registerMoEKernels() once the
 * backend is set so per-backend kernels (e.g. wasm's UnsortedSegmentSum) are in place.
 */
export * from './ops/index.js';
export { registerMoEKernels } from './backends/register_all_kernels.js';
export {
  parseSafetensors, readSafetensorsFile, encodeSafetensors, writeSafetensorsFile,
  SafetensorsError, type SafetensorsFile,
} from './io/safetensors.js';
export { maxRelativeError } from './util/numeric.js';
