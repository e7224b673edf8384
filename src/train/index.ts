/** Training: the loop the CLI's `train` and the examples share, evaluation, generation, presets. */
export { nextTokenLoss } from './loss.js';
export { sampleWindows, evaluationWindows, windowStream, windowBatches, type BatchSource } from './batches.js';
export {
  trainLoop, stepGradients, microBatchSeed,
  type TrainLoopOptions, type TrainLoopResult, type StepReport, type EvalReport, type TrainState, type TrainWarning,
} from './loop.js';
export { learningRateAt, LR_SCHEDULERS, type LRScheduler, type LRScheduleOptions } from './schedule.js';
export { Adam, clipByGlobalNorm, type AdamSnapshot, type AdamOptions } from './optimizer.js';
export { saveTrainCheckpoint, loadTrainCheckpoint, pruneCheckpoints, checkpointFolder } from './checkpoint.js';
export { openMetricsLog, type MetricsLog } from './metrics.js';
export { readRunConfig, runConfigFlags, RunConfigError, RUN_CONFIG_KEYS } from './run_config.js';
export {
  evaluateLoss, withAdaptersDisabled, generateGreedy, type EvaluateOptions, type GenerateOptions,
} from './evaluate.js';
export { INIT_PRESETS, INIT_PRESET_NAMES, presetConfig, type InitPreset } from './presets.js';
export { createProgress, type Progress, type ProgressOptions } from './progress.js';
export { onInterrupt, type InterruptFlag } from './interrupt.js';
export { runTraining, type TrainRunOptions, type TrainRunResult, type TrainMode } from './run.js';
export { seedModelInit, seedAdapterInit } from './seeded_init.js';
export { TrainError } from './errors.js';
