/** Training: the loop the CLI's `train` and the examples share, evaluation, generation, presets. */
export { nextTokenLoss } from './loss.js';
export { sampleWindows, evaluationWindows, windowStream } from './batches.js';
export { trainLoop, type TrainLoopOptions, type TrainLoopResult, type StepReport } from './loop.js';
export {
  evaluateLoss, withAdaptersDisabled, generateGreedy, type EvaluateOptions, type GenerateOptions,
} from './evaluate.js';
export { INIT_PRESETS, INIT_PRESET_NAMES, presetConfig, type InitPreset } from './presets.js';
export { createProgress, type Progress, type ProgressOptions } from './progress.js';
export { onInterrupt, type InterruptFlag } from './interrupt.js';
export { runTraining, type TrainRunOptions, type TrainRunResult, type TrainMode } from './run.js';
export { seedModelInit, seedAdapterInit } from './seeded_init.js';
export { TrainError } from './errors.js';
