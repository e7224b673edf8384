/**
 * tfjs-moe-lora for Node: everything of the browser entry (ops, layers, plugin, checkpoints from
 * bytes or fetch) plus what needs the file system or Node itself — checkpoint, adapter and model
 * files, the file:// IO handler, training, Dawn WebGPU setup. Import it after a tfjs backend; call
 * registerMoEKernels() once the backend is set so per-backend kernels are in place.
 */
import { registerFileIOHandler as registerFileIO } from './io/file_io_handler.js';

export * from './browser.js';
export {
  readSafetensorsFile, writeSafetensorsFile, writeSafetensorsStream, encodeBFloat16, encodeFloat16,
  WRITABLE_DTYPES, type WritableDtype, type SafetensorsStreamTensor,
} from './io/safetensors.js';
export {
  FileError, confinedPath, openRegularFile, readJSONFile, openArtifactFolder,
} from './util/files.js';
export { writeArtifactFolder, writeFileAtomically, type ArtifactFolderOptions } from './util/atomic.js';
export { runBlockParity, FixtureError, type BlockParityResult, type BlockParityOptions } from './models/parity.js';
export { loadHFCheckpoint } from './io/hf_checkpoint.js';
export { loadPeftAdapter, savePeftAdapter } from './io/peft_files.js';
export { registerFileIOHandler, fileIO, FileIOError } from './io/file_io_handler.js';
export {
  loadModelDir, modelDirFormat, modelDirFormats, ModelDirError, MODEL_DIR_FORMATS, type ModelDirFormat,
} from './io/model_dir.js';
export { inspectModel, type ModelReport, type MoELayerReport, type AdapterReport } from './models/inspect.js';
export {
  saveHFCheckpoint, hfCheckpointTensors, parseShardSize, CHECKPOINT_COMPANION_FILES, HF_SAVE_DTYPES,
  DEFAULT_MAX_SHARD_SIZE, type SaveHFCheckpointOptions, type SavedHFCheckpoint, type HFSaveDtype,
} from './io/hf_save.js';
export { sourceDtypeOf } from './io/checkpoint_source.js';
export { mergeAdapterIntoCheckpoint, type MergeAdapterOptions, type MergeResult } from './io/merge.js';
export {
  CharTokenizer, TokenizerError, readTokenizer, writeTokenizer, tokenizerFiles, generateCorpus,
  HFTokenizer, ChatTemplate, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE,
  type CharTokenizerJSON, type Corpus, type CorpusOptions, type CorpusStyle,
  type TextTokenizer, type EncodeOptions, type DecodeOptions, type ChatMessage, type ChatTemplateOptions,
  type HFTokenizerFiles, type HFTokenizerOptions,
  loadDatasets, datasetBatches, evaluationBatches, epochBatchCount, DatasetError, DATASET_TYPES,
  type DatasetSpec, type DatasetType, type LoadDatasetsOptions, type TokenizedDataset, type TokenizedSample,
  type DatasetBatchSource,
} from './data/index.js';
export {
  runTraining, trainLoop, nextTokenLoss, evaluateLoss, generateGreedy, TrainError,
  type TrainRunOptions, type TrainRunResult, type TrainMode, type TrainLoopOptions, type TrainLoopResult,
  learningRateAt, LR_SCHEDULERS, clipByGlobalNorm, saveTrainCheckpoint, loadTrainCheckpoint, readRunConfig, RunConfigError,
  type LRScheduler, type TrainState, type StepReport, type EvalReport, type TrainWarning,
} from './train/index.js';
export {
  generate, KVCache, processLogits, drawToken, generationConfigFromJSON, readGenerationConfig, GenerationConfigError,
  GENERATION_CONFIG_FILE, type GenerationOptions, type GenerationPrompt, type GenerationResult, type FinishReason,
  type CachedKeys, type SamplingSettings, type GenerationConfig,
} from './generate/index.js';
// what the examples' training scripts use besides the loop (examples/finetune.ts: a copy of it runs from the installed package)
export {
  createProgress, onInterrupt, seedAdapterInit, withAdaptersDisabled,
  type Progress, type ProgressOptions, type InterruptFlag,
} from './train/index.js';
export { setupDawnWebGPU, releaseDawnWebGPU, type DawnSetupOptions, type DawnAdapterReport } from './backends/webgpu/dawn.js';
export { useThreadedWasm, MAX_WASM_THREADS, type ThreadedWasmOptions } from './backends/wasm/threads_node.js';
export { registerWebGPUMoE } from './backends/webgpu/register.js';

// Like tfjs-node, this (Node) entry makes 'file://' paths work for model.save and
// tf.loadLayersModel; it steps aside when tfjs-node already handles them.
registerFileIO();
