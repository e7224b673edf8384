/**
 * tfjs-moe-lora: LoRA on fused Mixture-of-Experts weights and fused MoE routing / expert ops for
 * TensorFlow.js training. Import it after a tfjs backend; call registerMoEKernels() once the
 * backend is set so per-backend kernels (e.g. wasm's UnsortedSegmentSum) are in place.
 */
import { registerFileIOHandler as registerFileIO } from './io/file_io_handler.js';

export * from './ops/index.js';
export { registerMoEKernels } from './backends/register_all_kernels.js';
export {
  parseSafetensors, readSafetensorsFile, encodeSafetensors, writeSafetensorsFile,
  SafetensorsError, type SafetensorsFile,
} from './io/safetensors.js';
export { maxRelativeError } from './util/numeric.js';
export {
  FAMILIES, MODEL_TYPES, familyOf, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices, isMoELayer, expertCount,
  type HFConfig, type ModelType, type MoEFamily, type MoEBlockDims,
} from './models/families.js';
export { disposeMoEBlockWeights, trainableWeightFields, type WeightField } from './models/weight_fields.js';
export { loadMoEBlockWeights, moeBlockTensorPlan, blockLayerIndex, type TensorSource } from './io/hf_block.js';
export { runBlockParity, FixtureError, type BlockParityResult, type BlockParityOptions } from './models/parity.js';
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
export { loadHFCheckpoint, CheckpointError, hfWeightName, type LoadHFCheckpointOptions } from './io/hf_checkpoint.js';
export { loadHFCheckpointFrom, type HFCheckpointFiles } from './io/hf_checkpoint_core.js';
export { fetchHFCheckpoint, type FetchHFCheckpointOptions, type FetchFunction } from './io/fetch_checkpoint.js';
export {
  loadPeftAdapter, savePeftAdapter, peftAdapterTensors, PeftAdapterError,
  type PeftAdapterOptions, type LoadedPeftAdapter, type PeftTensor,
} from './io/peft.js';
export { registerFileIOHandler, fileIO, FileIOError } from './io/file_io_handler.js';
export {
  loadModelDir, modelDirFormat, modelDirFormats, ModelDirError, MODEL_DIR_FORMATS, type ModelDirFormat,
} from './io/model_dir.js';
export { inspectModel, type ModelReport, type MoELayerReport, type AdapterReport } from './models/inspect.js';

// Like tfjs-node, this (Node) entry makes 'file://' paths work for model.save and
// tf.loadLayersModel; it steps aside when tfjs-node already handles them.
registerFileIO();
export { saveHFCheckpoint, hfCheckpointTensors } from './io/hf_save.js';
export {
  CharTokenizer, TokenizerError, readTokenizer, writeTokenizer, generateCorpus,
  type CharTokenizerJSON, type Corpus, type CorpusOptions, type CorpusStyle,
} from './data/index.js';
export {
  runTraining, trainLoop, nextTokenLoss, evaluateLoss, generateGreedy, TrainError,
  type TrainRunOptions, type TrainRunResult, type TrainMode, type TrainLoopOptions, type TrainLoopResult,
} from './train/index.js';
export { setupDawnWebGPU, releaseDawnWebGPU, type DawnSetupOptions, type DawnAdapterReport } from './backends/webgpu/dawn.js';
export { registerWebGPUMoE } from './backends/webgpu/register.js';
