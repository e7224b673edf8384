/**
 * tfjs-moe-lora for browsers (`import ... from 'tfjs-moe-lora/browser'`): the ops, layers and
 * plugin of the Node entry, checkpoints loaded with fetch instead of the file system, PEFT
 * adapters from and to bytes (loadPeftAdapterFrom, encodePeftAdapter) and HF tokenizers. Nothing
 * here (or below it) imports a Node module, so bundlers take it as is; spec/browser.spec.ts
 * bundles it for the browser platform to keep it that way. Import a tfjs backend first
 * (e.g. '@tensorflow/tfjs-backend-wasm'), and '@tensorflow/tfjs-layers' for the gradients.
 */
export { MoELoraError } from './errors.js';
export { describeValue } from './util/describe.js';
export * from './ops/index.js';
export { registerMoEKernels } from './backends/register_all_kernels.js';
export {
  parseSafetensors, encodeSafetensors, SafetensorsError, type SafetensorsFile, type SafetensorsTensorInfo,
} from './io/safetensors_bytes.js';
export { maxRelativeError } from './util/numeric.js';
export {
  HFTokenizer, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, type HFTokenizerFiles, type HFTokenizerOptions,
} from './data/hf_tokenizer.js';
export { ChatTemplate, type ChatMessage, type ChatTemplateOptions } from './data/chat_template.js';
export { CharTokenizer, TokenizerError, type CharTokenizerJSON } from './data/tokenizer.js';
export type { TextTokenizer, EncodeOptions, DecodeOptions } from './data/text_tokenizer.js';
export {
  generateCorpus, EXAMPLE_CORPORA, CORPUS_STYLES, type Corpus, type CorpusOptions, type CorpusStyle,
} from './data/synthetic.js';
export {
  FAMILIES, MODEL_TYPES, familyOf, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices, isMoELayer, expertCount,
  type HFConfig, type ModelType, type MoEFamily, type MoEBlockDims,
} from './models/families.js';
export { disposeMoEBlockWeights, trainableWeightFields, type WeightField } from './models/weight_fields.js';
export {
  loadMoEBlockWeights, moeBlockTensorPlan, blockLayerIndex, EXPERT_DTYPES,
  type TensorSource, type ExpertDtype, type LoadMoEBlockOptions,
} from './io/hf_block.js';
export { register, unregister, isRegistered, FUSED_BACKENDS, type PluginHandle, type PatchedLayer } from './plugin.js';
export { PluginArgsError, type PluginArgsProblem } from './args/errors.js';
export {
  PLUGIN_ARG_SPECS, type PluginArgs, type LoRAArgs, type ResolvedPluginArgs, type ResolvedLoRAArgs, type ArgSpec,
} from './args/schema.js';
export { validatePluginArgs } from './args/validate.js';
export {
  registerMoELayerDescriptor, type MoELayerDescriptor, type MoELayerInfo, type MoELoRAHooks,
} from './patch/index.js';
export * from './layers/index.js';
export {
  loadHFCheckpointFrom, CheckpointError, hfWeightName, type LoadHFCheckpointOptions, type HFCheckpointFiles,
  DENSE_DTYPES, type DenseDtype,
} from './io/hf_checkpoint_core.js';
export {
  loadPeftAdapterFrom, encodePeftAdapter, peftAdapterTensors, PeftAdapterError, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
  type PeftAdapterFiles, type PeftAdapterOptions, type LoadedPeftAdapter, type PeftTensor,
} from './io/peft.js';
export { fetchHFCheckpoint, type FetchHFCheckpointOptions, type FetchFunction, type FetchResponse } from './io/fetch_checkpoint.js';
export {
  estimateLoadMemory, estimateTrainingMemory, backendMemoryLimits, memoryProblem, formatBytes, WASM_HEAP_LIMIT_BYTES,
  type LoadMemoryOptions, type LoadMemoryEstimate, type TrainingMemoryEstimate, type BackendMemoryLimits,
} from './models/memory.js';
