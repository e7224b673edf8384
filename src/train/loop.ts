/**
 * The training loop the CLI's `train` and examples/finetune.ts share: micro-batches from a
 * BatchSource (or random windows of a token array), the masked cross-entropy of batchLoss, Adam
 * (torch's update, optimizer.ts) on the model's trainable variables (with LoRA registered, only the
 * adapters'), as transformers' Trainer runs it: a learning-rate schedule with warm-up
 * (schedule.ts), gradient accumulation (a step's loss is normalised by the step's whole target
 * count, as transformers >= 4.46 does), global-norm clipping, evaluation and checkpoint callbacks
 * every N steps, and a state (step, micro-batches taken, Adam's moments, the losses) from which a
 * resumed run continues exactly. It yields to the event loop after every step, so a Ctrl-C handler
 * can ask it to stop between steps.
 *
 * Divergence stops the loop with a TrainError that says so (see `divergence`): a non-finite loss
 * at once; a collapse (the loss back at ln(vocab), the uniform prediction, for DIVERGENCE_PATIENCE
 * steps after it had been clearly below it) or a blow-up (the loss above 4× the larger of its
 * first value and ln(vocab) for DIVERGENCE_PATIENCE steps). A from-scratch run starts near
 * ln(vocab) and is not below it yet, so it never raises the collapse alarm there; any text that is
 * not uniform over the vocabulary has an entropy below ln(vocab), so a loss that returns to
 * ln(vocab) means the model lost what it knew.
 *
 * A dead model is a warning, not an error (see `noGradientWarning`): the gradients' global norm
 * exactly 0 for DIVERGENCE_PATIENCE steps in a row. Too large a learning rate can leave a model
 * whose every logit is equal and whose every gradient is 0 (lr 1000 on the spec's model: the loss
 * sits at ln(vocab) with norm 0 from step 7 on), which no loss rule above can tell from a
 * from-scratch run that has not learnt yet. The norm is read from the device every step already
 * (the report needs it), with the loss, so watching it costs nothing.
 *
 * Where Adam runs as the backend's kernel (webgpu), a step is recorded whole before anything is
 * read: its clipping coefficient and whether it is applied at all (not when its loss or norm is
 * non-finite) are computed on the device (stepGradientScale) and given to Adam, and the loss and
 * the norm are read after, in one wait. Elsewhere the values are read first and the clipping and
 * the skip decided on the host, by the same rule.
 *
 * There the loop also reads ahead: the read of step n's loss and norm is started (its copy encoded
 * and submitted) and step n + 1's forward and backward are recorded before the host waits for it,
 * so the GPU runs on into step n + 1 while the host waits and decides; step n + 1's Adam update is
 * recorded after the read, with the step count and clipping step n left. Nothing reaches the
 * model or the optimizer out of order: every value is what the step-by-step loop computes. What
 * changes: the data source gives step n + 1's micro-batches before step n is reported, and a run
 * that stops after step n (shouldStop, an error, a warning that stops it) discards them unused.
 * Not before a step that evaluates or saves (those run with nothing in flight), nor past the last
 * step. The tf.env() flag MOE_TRAIN_READ_AHEAD (default true) turns it off.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { gradientCheckpointingEnabled, setGradientCheckpointing } from '../layers/gradient_checkpointing.js';
import { trainableVariables } from '../layers/moe_causal_lm.js';
import { estimateTrainingMemory, memoryProblem } from '../models/memory.js';
import { assertFiniteNumber, assertInteger, fail } from '../ops/validate.js';
import { describeValue } from '../util/describe.js';
import { assertLogitsFit, windowBatches, type BatchSource } from './batches.js';
import { TrainError } from './errors.js';
import { batchLoss, disposeBatch, vocabSizeOf, type TrainingBatch } from './loss.js';
import { Adam, type AdamSnapshot, clipToNorm, globalNorm, stepGradientScale } from './optimizer.js';
import { learningRateAt, LR_SCHEDULERS, type LRScheduler } from './schedule.js';

/**
 * tf.env() flag: false makes trainLoop wait for each step's loss and norm before it records the next
 * step, where it would otherwise record the next step's forward and backward first (see the file
 * comment); to compare the two (bench/e2e/ours.ts --train-loop-rounds with --ab-flags).
 */
export const TRAIN_READ_AHEAD_FLAG = 'MOE_TRAIN_READ_AHEAD';
tf.env().registerFlag(TRAIN_READ_AHEAD_FLAG, () => true);

export interface TrainLoopOptions {
  /** the step count to reach, counting `startStep` (the schedules' num_training_steps) */
  steps: number;
  /** the base (peak) learning rate */
  lr: number;
  /** windows (rows) per micro-batch; with a BatchSource, the most rows a micro-batch has (memory check) */
  batch: number;
  /** tokens per window (predicted positions); with a BatchSource, the longest row */
  seq: number;
  /** seed of the window order and of the dropout masks */
  seed: number;
  /** 'constant' (default), 'linear' or 'cosine', each after a linear warm-up (HF's formulas, schedule.ts) */
  lrScheduler?: LRScheduler;
  /** warm-up steps from lr 0; default 0 */
  warmupSteps?: number;
  /** micro-batches per optimizer step (gradient accumulation); default 1 */
  gradAccum?: number;
  /** clip the gradients' global L2 norm to this (torch's clip_grad_norm_); default null: no clipping */
  maxGradNorm?: number | null;
  /**
   * recompute each decoder layer in the backward pass instead of keeping its activations
   * (transformers' gradient_checkpointing, setGradientCheckpointing): one more forward per step
   * for a peak that grows by a layer's input, not its activations, per layer. Default false.
   */
  gradientCheckpointing?: boolean;
  /** steps already done without a saved state (the window order continues; Adam starts afresh); default 0 */
  startStep?: number;
  /** a saved state (`onSave`, a checkpoint) to continue from exactly: the step, Adam, the losses */
  resume?: TrainState;
  /** call `evaluate` after every this many steps (and report it with onEval); default none */
  evalEvery?: number;
  /** the evaluation loss (e.g. evaluateLoss on held-out tokens) */
  evaluate?: () => number | Promise<number>;
  onEval?: (report: EvalReport) => void;
  /** call `onSave` after every this many steps, and where shouldStop() stopped the run; default none */
  saveEvery?: number;
  /** writes a checkpoint of the state (the loop waits for it) */
  onSave?: (state: TrainState) => Promise<void>;
  /** after every step */
  onStep?: (report: StepReport) => void;
  /** checked after every step; true stops the loop there */
  shouldStop?: () => boolean;
  /** called with each warning (also listed in the result), after that step's onStep */
  onWarning?: (warning: TrainWarning) => void;
  /** stop at a 'noGradient' warning (the result's stoppedNoGradient) instead of training on; default false */
  stopOnNoGradient?: boolean;
}

/**
 * Something the user should know that does not stop the run (unless asked to): 'noGradient', the
 * gradients' global norm exactly 0 for DIVERGENCE_PATIENCE steps in a row, at the last of them.
 */
export interface TrainWarning {
  step: number;
  kind: 'noGradient';
  message: string;
}

/** Everything a resumed run needs from the loop to continue exactly (a checkpoint holds it). */
export interface TrainState {
  /** optimizer steps done */
  step: number;
  /** micro-batches taken from the source (a BatchSource for the resumed run starts there) */
  microBatches: number;
  /** the loss of every step so far (the divergence checks look back at them) */
  losses: number[];
  /** the evaluations so far */
  evalLosses: EvalReport[];
  optimizer: AdamSnapshot;
  /** training seconds so far */
  seconds: number;
}

export interface StepReport {
  /** 1-based, counting `startStep` */
  step: number;
  steps: number;
  loss: number;
  /** the learning rate this step used */
  lr: number;
  /** the gradients' global L2 norm before clipping */
  gradNorm: number;
  /** labels predicted in this step (all its micro-batches) */
  tokens: number;
  /** trained tokens per second over this run's steps so far */
  tokensPerSecond: number;
  /** seconds of this run's training so far */
  seconds: number;
  /** seconds of training since the run began (a resumed run counts the checkpoint's too) */
  elapsed: number;
}

export interface EvalReport {
  step: number;
  loss: number;
}

export interface TrainLoopResult {
  /** the loss of every step this run did */
  losses: number[];
  /** the evaluations this run did */
  evalLosses: EvalReport[];
  /** the step count reached, counting `startStep` */
  step: number;
  /** true when shouldStop() ended the loop before `steps` */
  stopped: boolean;
  /** true when stopOnNoGradient ended the loop before `steps`, after the step of a 'noGradient' warning */
  stoppedNoGradient: boolean;
  /** the warnings of this run, in order (onWarning got each) */
  warnings: TrainWarning[];
  seconds: number;
  tokensPerSecond: number;
}

/** Steps a collapse or a blow-up must last before the loop stops, and a zero gradient before it warns. */
export const DIVERGENCE_PATIENCE = 10;

/**
 * Why the run has diverged, or null: the losses of this run so far and the vocabulary size (null:
 * unknown, only the blow-up rule applies). See the file comment for the rules.
 *
 * ```js
 * divergence([1.2, 0.9, ...Array(10).fill(Math.log(40))], 40);  // 'the model collapsed: ...'
 * ```
 */
export function divergence(losses: readonly number[], vocab: number | null): string | null {
  if (losses.length < DIVERGENCE_PATIENCE) return null;
  const recent = losses.slice(-DIVERGENCE_PATIENCE);
  const uniform = vocab === null ? null : Math.log(vocab);
  if (uniform !== null) {
    const best = Math.min(...losses);
    if (best < 0.9 * uniform && recent.every(l => Math.abs(l - uniform) <= 0.02 * uniform)) {
      return `the model collapsed: the loss is stuck at ln(vocab) = ${uniform.toFixed(4)} (the same probability for ` +
          `all ${vocab} tokens) for the last ${DIVERGENCE_PATIENCE} steps, after it had reached ${best.toFixed(4)}`;
    }
  }
  const bound = 4 * Math.max(losses[0], uniform ?? 0);
  if (recent.every(l => l > bound)) {
    return `the loss diverged: it stayed above ${bound.toPrecision(4)} (4 × the larger of the first loss ` +
        `${losses[0].toFixed(4)} and ln(vocab)) for the last ${DIVERGENCE_PATIENCE} steps, and is ${recent.at(-1)!.toPrecision(4)}`;
  }
  return null;
}

/**
 * The 'noGradient' warning of a run whose gradients' global norm was exactly 0 for the
 * DIVERGENCE_PATIENCE steps up to `step` (with `loss` the last of them), or null when `zeroSteps`
 * (that streak's length) is not DIVERGENCE_PATIENCE: a streak warns once, when it gets there.
 *
 * ```js
 * noGradientWarning(10, 16, Math.log(11), 11, 1000).message;
 * // "no gradient: the gradients' global norm was exactly 0 for the last 10 steps (steps 7–16) with the loss at 2.3979 ..."
 * ```
 */
export function noGradientWarning(
    zeroSteps: number, step: number, loss: number, vocab: number | null, lr: number): TrainWarning | null {
  if (zeroSteps !== DIVERGENCE_PATIENCE) return null;
  const uniform = vocab === null ? null : Math.log(vocab);
  const atUniform = uniform !== null && Math.abs(loss - uniform) <= 0.02 * uniform;
  return {
    step, kind: 'noGradient',
    message: `no gradient: the gradients' global norm was exactly 0 for the last ${DIVERGENCE_PATIENCE} steps ` +
        `(steps ${step - DIVERGENCE_PATIENCE + 1}–${step}) with the loss at ${loss.toFixed(4)}` +
        (atUniform ? ` = ln(vocab), the same probability for all ${vocab} tokens` : '') +
        `: nothing trains any more (a dead model; too large a learning rate? it is ${lr})`,
  };
}

/**
 * Disposes what a forward pass that threw had saved for its backward pass. tfjs-core (4.22)
 * keeps those tensors on the engine's tape, outside every tidy scope, and frees them only after a
 * backward pass; a failed step would leak them. Guarded: on another engine shape it does nothing.
 */
function disposeAbandonedTape(): void {
  const state = (tf.engine() as unknown as { state?: { gradientDepth?: unknown; activeTape?: unknown } }).state;
  if (state === undefined || state.gradientDepth !== 0 || !Array.isArray(state.activeTape)) return;
  for (const node of state.activeTape as Array<{ saved?: unknown }>) {
    if (Array.isArray(node.saved)) for (const t of node.saved) if (t instanceof tf.Tensor) t.dispose();
  }
  state.activeTape = null;
}

/** Yields to the event loop, so signal handlers and timers run between steps. */
const yieldToEventLoop = () => new Promise<void>(resolve => setImmediate(resolve));

/**
 * The dropout seed of micro-batch `index` (0-based, over the whole run) of a run seeded `seed`: a
 * resumed run draws the masks the uninterrupted one drew. A 32-bit mix (murmur3's finaliser) of
 * both, so neighbouring micro-batches get unrelated seeds.
 *
 * ```js
 * microBatchSeed(1, 0) !== microBatchSeed(1, 1);  // true
 * ```
 */
export function microBatchSeed(seed: number, index: number): number {
  let h = (Math.imul(seed >>> 0, 0x9e3779b1) ^ Math.imul(index >>> 0, 0x85ebca77) ^ Math.floor(index / 2 ** 32)) >>> 0;
  h = Math.imul(h ^ (h >>> 16), 0x85ebca6b);
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35);
  return (h ^ (h >>> 16)) >>> 0;
}

/**
 * The loss and the gradients of one optimizer step over its micro-batches: each micro-batch's
 * summed cross-entropy divided by the step's total target count, so the gradients (summed over
 * the micro-batches) are those of the mean over every target of the step, as one batch of all of
 * them would give (transformers >= 4.46's num_items_in_batch). Returns new tensors in the order of
 * `variables`; the caller disposes them.
 *
 * ```js
 * const {loss, grads} = stepGradients(model, trainableVariables(model), [batchA, batchB], [seedA, seedB]);
 * ```
 */
export function stepGradients(
    model: tfl.LayersModel, variables: tf.Variable[], microBatches: readonly TrainingBatch[],
    dropoutSeeds: readonly number[]): { loss: tf.Scalar; grads: tf.Tensor[] } {
  const normalizer = microBatches.reduce((s, b) => s + b.targetCount, 0);
  if (normalizer === 0) fail('stepGradients', "the step's micro-batches have no label to predict (every targetCount is 0)");
  let loss: tf.Scalar | null = null;
  let grads: tf.Tensor[] | null = null;
  try {
    microBatches.forEach((batch, k) => {
      let computed: { value: tf.Scalar; grads: tf.NamedTensorMap };
      try {
        computed = tf.variableGrads(() => batchLoss(model, batch, { training: true, normalizer, dropoutSeed: dropoutSeeds[k] }), variables);
      } catch (e) {
        disposeAbandonedTape();
        throw e;
      }
      const g = variables.map(x => computed.grads[x.name]);
      if (loss === null || grads === null) {
        loss = computed.value;
        grads = g;
        return;
      }
      const [sumLoss, sumGrads] = tf.tidy(() => [tf.add(loss!, computed.value), grads!.map((a, i) => tf.add(a, g[i]))]);
      tf.dispose([loss, ...grads, computed.value, ...g]);
      loss = sumLoss as tf.Scalar;
      grads = sumGrads as tf.Tensor[];
    });
  } catch (e) {
    tf.dispose([loss ?? [], ...(grads ?? [])].flat());
    throw e;
  }
  return { loss: loss!, grads: grads! };
}

/** A step's forward and backward, recorded: its micro-batches, the labels they predict, the loss and the gradients. */
interface RecordedStep {
  batches: TrainingBatch[];
  tokens: number;
  loss: tf.Scalar;
  grads: tf.Tensor[];
}

function disposeRecorded(recorded: RecordedStep): void {
  tf.dispose([recorded.loss, ...recorded.grads]);
  recorded.batches.forEach(disposeBatch);
}

/**
 * A step's loss and gradients' norm, read as one [2] tensor: one copy and one wait for the GPU
 * (asynchronous: webgpu has no dataSync). The copy is encoded and submitted when this is called,
 * so what the host records after it runs behind it on the GPU while the host waits.
 */
function readLossAndNorm(loss: tf.Scalar, norm: tf.Scalar): Promise<[number, number]> {
  const both = tf.stack([loss, norm]);
  const values = both.data().then(v => [v[0], v[1]] as [number, number]).finally(() => both.dispose());
  // handled where the caller awaits it; an error that ends the step first must not leave it unhandled
  values.catch(() => undefined);
  return values;
}

/**
 * Trains `model` until step `steps`, on `data`: a token array (random windows of it, `batch` ×
 * `seq` per micro-batch, in the order `seed` gives) or a BatchSource (positioned by the caller:
 * when resuming, made with startBatch = resume.microBatches).
 *
 * ```js
 * const tokens = tokenizer.encode(text);
 * const {losses} = await trainLoop(model, tokens, {steps: 200, lr: 3e-3, batch: 8, seq: 64, seed: 1,
 *     lrScheduler: 'cosine', warmupSteps: 20, gradAccum: 2, maxGradNorm: 1});
 * ```
 */
export async function trainLoop(
    model: tfl.LayersModel, data: Int32Array | BatchSource, options: TrainLoopOptions): Promise<TrainLoopResult> {
  const op = 'trainLoop';
  const resume = options.resume;
  if (resume !== undefined && options.startStep !== undefined) {
    fail(op, "give 'startStep' (a fresh optimizer) or 'resume' (a saved state), not both");
  }
  const start = resume?.step ?? options.startStep ?? 0;
  assertInteger(op, 'steps', options.steps, 1);
  assertInteger(op, resume !== undefined ? 'resume.step' : 'startStep', start, 0, options.steps);
  assertFiniteNumber(op, 'lr', options.lr);
  if (options.lr <= 0) fail(op, `'lr' must be > 0 but got ${options.lr}`);
  assertInteger(op, 'batch', options.batch, 1);
  assertInteger(op, 'seq', options.seq, 1);
  assertInteger(op, 'seed', options.seed, 0, 2 ** 32 - 1);
  const scheduler = options.lrScheduler ?? 'constant';
  if (!(LR_SCHEDULERS as readonly string[]).includes(scheduler)) {
    fail(op, `'lrScheduler' must be one of ${LR_SCHEDULERS.map(s => `'${s}'`).join(', ')} but got ${JSON.stringify(scheduler)}`);
  }
  const warmupSteps = options.warmupSteps ?? 0;
  assertInteger(op, 'warmupSteps', warmupSteps, 0);
  const gradAccum = options.gradAccum ?? 1;
  assertInteger(op, 'gradAccum', gradAccum, 1);
  const maxGradNorm = options.maxGradNorm ?? null;
  if (maxGradNorm !== null && !(typeof maxGradNorm === 'number' && Number.isFinite(maxGradNorm) && maxGradNorm > 0)) {
    fail(op, `'maxGradNorm' must be a number > 0 (or null: no clipping) but got ${maxGradNorm}`);
  }
  for (const [name, every, callback] of [['evalEvery', options.evalEvery, 'evaluate'], ['saveEvery', options.saveEvery, 'onSave']] as const) {
    if (every === undefined) continue;
    assertInteger(op, name, every, 1);
    if (options[callback] === undefined) fail(op, `'${name}' needs '${callback}'`);
  }
  const checkpointing = options.gradientCheckpointing ?? false;
  if (typeof checkpointing !== 'boolean') fail(op, `'gradientCheckpointing' must be a boolean but got ${describeValue(checkpointing)}`);
  const isTokens = data instanceof Int32Array;
  if (isTokens && data.length < options.seq + 1) {
    throw new TrainError(`the training text has ${data.length} tokens but one window of seq ${options.seq} ` +
        `needs ${options.seq + 1}; use more text or a smaller seq`);
  }
  const vocab = vocabSizeOf(model);
  assertLogitsFit(op, options.batch, options.seq, vocab);
  const variables = trainableVariables(model);
  if (variables.length === 0) throw new TrainError(`the model '${model.name}' has no trainable weights`);
  // know before the first step: its gradients, Adam's state and activations beside the loaded weights
  const need = estimateTrainingMemory(model, options);
  const tooLarge = memoryProblem('a training step needs (gradients, Adam moments, activations; beyond the loaded weights)',
      { bytes: need.stepBytes, largest: need.largest }, 'a smaller batch or seq');
  if (tooLarge !== null) throw new TrainError(tooLarge);
  const changed = () => {
    const now = trainableVariables(model);
    return now.length !== variables.length || now.some((v, k) => v !== variables[k] || v.isDisposed);
  };

  let microBatches = resume?.microBatches ?? start * gradAccum;
  const source: BatchSource = isTokens ? windowBatches(data, options.batch, options.seq, options.seed, microBatches) : data;
  // on for this run only: what the model had before is put back when the loop ends
  const checkpointingBefore = gradientCheckpointingEnabled(model);
  setGradientCheckpointing(model, checkpointing);
  const optimizer = new Adam(variables);
  const history = [...(resume?.losses ?? [])];
  const evalLosses: EvalReport[] = [];
  const savedSeconds = resume?.seconds ?? 0;
  const losses: number[] = [];
  let tokensTrained = 0;
  const began = performance.now();
  const elapsed = () => (performance.now() - began) / 1000;
  let step = start;
  let stopped = false;
  let stoppedNoGradient = false;
  let stopForNoGradient = false;
  const warnings: TrainWarning[] = [];
  let zeroGradSteps = 0;
  /** step `index` (0-based): its micro-batches, from micro-batch `firstMicroBatch` of the run on, and its loss and gradients */
  const recordGradients = (index: number, firstMicroBatch: number): RecordedStep => {
    const batches: TrainingBatch[] = [];
    try {
      for (let k = 0; k < gradAccum; k++) batches.push(source.next());
      const tokens = batches.reduce((s, b) => s + b.targetCount, 0);
      if (tokens === 0) throw new TrainError(`step ${index + 1} has no label to predict in its ${gradAccum} micro-batch(es)`);
      const seeds = batches.map((_, k) => microBatchSeed(options.seed, firstMicroBatch + k));
      return { batches, tokens, ...stepGradients(model, variables, batches, seeds) };
    } catch (e) {
      batches.forEach(disposeBatch);
      throw e;
    }
  };
  // the next step's forward and backward, recorded before this step's read (reading ahead, see the file comment), or
  // the error recording them threw: thrown when that step comes, after this one is reported, as step by step
  let ahead: RecordedStep | { error: unknown } | null = null;
  const discardAhead = () => {
    if (ahead !== null && !('error' in ahead)) disposeRecorded(ahead);
    ahead = null;
  };
  /** whether the step after step `done` (1-based) is recorded before step `done`'s read */
  const readsAhead = (done: number) => tf.env().getBool(TRAIN_READ_AHEAD_FLAG) && done < options.steps &&
      !(options.evalEvery !== undefined && done % options.evalEvery === 0) &&
      !(options.saveEvery !== undefined && done % options.saveEvery === 0);
  const save = async () => options.onSave!({
    step, microBatches, losses: [...history], evalLosses: [...evalLosses], optimizer: await optimizer.snapshot(),
    seconds: savedSeconds + elapsed(),
  });
  try {
    if (resume !== undefined) {
      if (resume.optimizer.step !== resume.step) {
        throw new TrainError(`the saved state is inconsistent: Adam took ${resume.optimizer.step} steps but the run ${resume.step}`);
      }
      optimizer.restore(resume.optimizer);
      evalLosses.push(...(resume.evalLosses ?? []));
    }
    while (step < options.steps) {
      if (stopForNoGradient) {
        stoppedNoGradient = true;
        break;
      }
      if (options.shouldStop?.()) {
        stopped = true;
        break;
      }
      if (changed()) {
        // e.g. unregister() or removeAdapter() from onStep: the adapters being trained are gone
        throw new TrainError(`the model's trainable weights changed during training, before step ${step + 1} ` +
            `(was the plugin unregistered or an adapter removed?); the loop trains the weights it started with`);
      }
      const lr = learningRateAt(scheduler, step + 1, { lr: options.lr, totalSteps: options.steps, warmupSteps });
      const taken = ahead;
      ahead = null;
      if (taken !== null && 'error' in taken) throw taken.error;
      const recorded = taken ?? recordGradients(step, microBatches);
      const onDevice = optimizer.scalesOnDevice;
      let values: Promise<[number, number]>;
      try {
        const norm = globalNorm(recorded.grads);
        try {
          if (onDevice) {
            // the whole step recorded before the read: clipping and the skip decided on the device
            // (stepGradientScale), where reading first left the GPU idle while the host recorded
            // the clipping's multiplies and Adam
            const scale = stepGradientScale(recorded.loss, norm, maxGradNorm);
            try {
              optimizer.apply(recorded.grads, lr, scale);
              values = readLossAndNorm(recorded.loss, norm);
            } finally {
              scale.dispose();
            }
          } else {
            values = readLossAndNorm(recorded.loss, norm);
            const [lossValue, normValue] = await values;
            const clipped = clipToNorm(recorded.grads, normValue, maxGradNorm);
            try {
              // a non-finite step is not applied, so the model stays at the last good step
              if (Number.isFinite(lossValue) && Number.isFinite(normValue)) optimizer.apply(clipped, lr);
            } finally {
              tf.dispose(clipped);
            }
          }
        } finally {
          norm.dispose();
        }
      } finally {
        disposeRecorded(recorded);
      }
      // this step's gradients are gone before the next step's are made: the peak of one step, not two
      if (onDevice && readsAhead(step + 1)) {
        try {
          ahead = recordGradients(step + 1, microBatches + gradAccum);
        } catch (e) {
          ahead = { error: e };
        }
      }
      const [loss, gradNorm] = await values;
      if (onDevice && !(Number.isFinite(loss) && Number.isFinite(gradNorm))) optimizer.uncountStep();
      step++;
      microBatches += gradAccum;
      if (!Number.isFinite(loss)) {
        throw new TrainError(`the loss became ${loss} at step ${step}; try a smaller learning rate (it is ${options.lr})`);
      }
      losses.push(loss);
      history.push(loss);
      tokensTrained += recorded.tokens;
      const diverged = divergence(history, vocab);
      if (diverged !== null) throw new TrainError(`${diverged} at step ${step}; try a smaller learning rate (it is ${options.lr})`);
      const seconds = elapsed();
      options.onStep?.({
        step, steps: options.steps, loss, lr, gradNorm, tokens: recorded.tokens, seconds, elapsed: savedSeconds + seconds,
        tokensPerSecond: seconds > 0 ? tokensTrained / seconds : 0,
      });
      zeroGradSteps = gradNorm === 0 ? zeroGradSteps + 1 : 0;
      const warning = noGradientWarning(zeroGradSteps, step, loss, vocab, options.lr);
      if (warning !== null) {
        warnings.push(warning);
        options.onWarning?.(warning);
        // the loop's top ends the run, after this step's evaluation and checkpoint as any step's
        if (options.stopOnNoGradient === true) stopForNoGradient = true;
      }
      if (options.evalEvery !== undefined && step % options.evalEvery === 0) {
        const report = { step, loss: await options.evaluate!() };
        evalLosses.push(report);
        options.onEval?.(report);
      }
      if (options.saveEvery !== undefined && step % options.saveEvery === 0) await save();
      await yieldToEventLoop();
    }
    discardAhead();  // a step recorded ahead of a stop: its gradients are not kept through the save below
    // a stopped run (Ctrl-C) keeps a checkpoint of where it stopped, so --resume can go on from there
    if (stopped && options.saveEvery !== undefined && step > start && step % options.saveEvery !== 0) await save();
  } finally {
    discardAhead();
    optimizer.dispose();
    setGradientCheckpointing(model, checkpointingBefore);
  }
  const seconds = elapsed();
  return {
    losses, evalLosses: evalLosses.slice(resume?.evalLosses?.length ?? 0), step, stopped, stoppedNoGradient, warnings, seconds,
    tokensPerSecond: seconds > 0 ? tokensTrained / seconds : 0,
  };
}
