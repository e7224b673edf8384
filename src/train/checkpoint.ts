/**
 * Training checkpoints, as transformers' Trainer lays them out: `out/checkpoint-<step>/` holds
 * what the run's final save holds (a PEFT adapter, or an HF checkpoint with its tokenizer), the
 * optimizer state (`optimizer.safetensors`: Adam's first and second moments of every trained
 * variable, in the loop's order) and `trainer_state.json` (the step, the micro-batches taken,
 * Adam's step count, the losses and evaluations so far, and the run's options). Each checkpoint is
 * one atomic artifact (writeArtifactFolder), and only the newest `keep` stay (save_total_limit).
 */
import * as tf from '@tensorflow/tfjs-core';
import { readdir, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { readSafetensorsFile } from '../io/safetensors.js';
import { encodeSafetensors } from '../io/safetensors_bytes.js';
import { writeArtifactFolder } from '../util/atomic.js';
import { openArtifactFolder, readJSONFile } from '../util/files.js';
import { TrainError } from './errors.js';
import type { EvalReport, TrainState } from './loop.js';

export const TRAINER_STATE = 'trainer_state.json';
export const OPTIMIZER_STATE = 'optimizer.safetensors';
const CHECKPOINT_NAME = /^checkpoint-(\d+)$/;
const FORMAT = 'tfjs-moe-lora trainer state';

/** The folder of the checkpoint after `step` steps: `out/checkpoint-<step>`. */
export function checkpointFolder(out: string, step: number): string {
  return join(out, `checkpoint-${step}`);
}

/**
 * Writes `out/checkpoint-<state.step>/` atomically: `saveModel(dir)` writes the model's part
 * into it, then the optimizer and trainer state; afterwards only the newest `keep` checkpoints of
 * `out` stay (default all). Returns the folder.
 *
 * ```js
 * await saveTrainCheckpoint('runs/a', state, {lr: 1e-3, seed: 1}, dir => savePeftAdapter(model, dir), 3);
 * ```
 */
export async function saveTrainCheckpoint(
    out: string, state: TrainState, runOptions: Record<string, unknown>, saveModel: (dir: string) => Promise<void>,
    keep?: number): Promise<string> {
  const folder = checkpointFolder(out, state.step);
  await writeArtifactFolder(folder, async dir => {
    // the model's own save is atomic too: it replaces the (empty) temporary folder in place, which is fine
    await saveModel(dir);
    const tensors: Record<string, tf.Tensor> = {};
    state.optimizer.m.forEach((m, i) => { tensors[`m.${i}`] = tf.tensor1d(m, 'float32'); });
    state.optimizer.v.forEach((v, i) => { tensors[`v.${i}`] = tf.tensor1d(v, 'float32'); });
    try {
      await writeFile(join(dir, OPTIMIZER_STATE), await encodeSafetensors(tensors, { format: 'pt' }));
    } finally {
      tf.dispose(Object.values(tensors));
    }
    const trainerState = {
      format: FORMAT, step: state.step, micro_batches: state.microBatches, adam_step: state.optimizer.step,
      variables: state.optimizer.m.length, seconds: state.seconds, losses: state.losses,
      eval_losses: state.evalLosses, options: runOptions,
    };
    await writeFile(join(dir, TRAINER_STATE), `${JSON.stringify(trainerState, null, 1)}\n`);
  }, { what: '`saveTrainCheckpoint()`' });
  if (keep !== undefined) await pruneCheckpoints(out, keep);
  return folder;
}

/**
 * Removes all but the newest `keep` `checkpoint-<step>` folders of `out` (by step).
 *
 * ```js
 * await pruneCheckpoints('runs/a', 2);  // checkpoint-10, -20, -30 → -20, -30
 * ```
 */
export async function pruneCheckpoints(out: string, keep: number): Promise<void> {
  const steps: number[] = [];
  for (const name of await readdir(out)) {
    const match = CHECKPOINT_NAME.exec(name);
    if (match !== null && (await stat(join(out, name))).isDirectory()) steps.push(Number(match[1]));
  }
  steps.sort((a, b) => a - b);
  for (const step of steps.slice(0, Math.max(0, steps.length - keep))) {
    await rm(checkpointFolder(out, step), { recursive: true, force: true });
  }
}

const isCount = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v) && v >= 0;

/**
 * Reads a checkpoint folder that saveTrainCheckpoint wrote: the loop's state and the run's
 * options (the model's part is read by the caller, with the model loaders).
 *
 * ```js
 * const {state, options} = await loadTrainCheckpoint('runs/a/checkpoint-20');
 * await trainLoop(model, tokens, {...options, resume: state});
 * ```
 */
export async function loadTrainCheckpoint(dir: string): Promise<{ state: TrainState; options: Record<string, unknown> }> {
  await openArtifactFolder(dir, 'the checkpoint folder');
  const json = await readJSONFile(join(dir, TRAINER_STATE), 'the checkpoint\'s trainer state') as Record<string, unknown>;
  const problems: string[] = [];
  if (json === null || typeof json !== 'object' || json['format'] !== FORMAT) {
    problems.push(`its ${TRAINER_STATE} must have format '${FORMAT}'`);
  } else {
    for (const key of ['step', 'micro_batches', 'adam_step', 'variables']) {
      if (!isCount(json[key])) problems.push(`'${key}' must be an integer >= 0 but is ${JSON.stringify(json[key])}`);
    }
    if (!Array.isArray(json['losses']) || !json['losses'].every(l => typeof l === 'number')) problems.push("'losses' must be a list of numbers");
    if (json['options'] === null || typeof json['options'] !== 'object') problems.push("'options' must be an object");
  }
  if (problems.length > 0) {
    throw new TrainError(`'${dir}' is not a training checkpoint this package wrote: ${problems.join('; ')}`);
  }
  const file = await readSafetensorsFile(join(dir, OPTIMIZER_STATE));
  const read = async (name: string) => {
    const t = await file.tensor(name);
    try {
      return Float32Array.from(await t.data() as Float32Array);
    } finally {
      t.dispose();
    }
  };
  const count = json['variables'] as number;
  const m: Float32Array[] = [];
  const v: Float32Array[] = [];
  for (let i = 0; i < count; i++) {
    m.push(await read(`m.${i}`));
    v.push(await read(`v.${i}`));
  }
  const state: TrainState = {
    step: json['step'] as number, microBatches: json['micro_batches'] as number,
    losses: json['losses'] as number[], evalLosses: (json['eval_losses'] ?? []) as EvalReport[],
    optimizer: { step: json['adam_step'] as number, m, v }, seconds: typeof json['seconds'] === 'number' ? json['seconds'] : 0,
  };
  return { state, options: json['options'] as Record<string, unknown> };
}
