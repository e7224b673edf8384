/**
 * The training loop the CLI's `train` and examples/finetune.ts share: random windows of the
 * token stream, next-token cross-entropy, Adam on the model's trainable variables (with LoRA
 * registered, only the adapters'). It yields to the event loop after every step, so a Ctrl-C
 * handler can ask it to stop between steps.
 *
 * Divergence stops the loop with a TrainError that says so (see `divergence`): a non-finite loss
 * at once; a collapse (the loss back at ln(vocab), the uniform prediction, for DIVERGENCE_PATIENCE
 * steps after it had been clearly below it) or a blow-up (the loss above 4× the larger of its
 * first value and ln(vocab) for DIVERGENCE_PATIENCE steps). A from-scratch run starts near
 * ln(vocab) and is not below it yet, so it never raises the collapse alarm there; any text that is
 * not uniform over the vocabulary has an entropy below ln(vocab), so a loss that returns to
 * ln(vocab) means the model lost what it knew.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { trainableVariables } from '../layers/moe_causal_lm.js';
import { estimateTrainingMemory, memoryProblem } from '../models/memory.js';
import { assertFiniteNumber, assertInteger, fail } from '../ops/validate.js';
import { assertLogitsFit, windowStream } from './batches.js';
import { TrainError } from './errors.js';
import { nextTokenLoss, vocabSizeOf } from './loss.js';

export interface TrainLoopOptions {
  /** the step count to reach, counting `startStep` */
  steps: number;
  /** Adam's learning rate */
  lr: number;
  /** windows per step */
  batch: number;
  /** tokens per window (predicted positions) */
  seq: number;
  /** seed of the window order */
  seed: number;
  /** steps already done (resuming): the window order continues where it stopped; default 0 */
  startStep?: number;
  /** after every step */
  onStep?: (report: StepReport) => void;
  /** checked after every step; true stops the loop there */
  shouldStop?: () => boolean;
}

export interface StepReport {
  /** 1-based, counting `startStep` */
  step: number;
  steps: number;
  loss: number;
  /** trained tokens per second over this run's steps so far */
  tokensPerSecond: number;
  seconds: number;
}

export interface TrainLoopResult {
  /** the loss of every step this run did */
  losses: number[];
  /** the step count reached, counting `startStep` */
  step: number;
  /** true when shouldStop() ended the loop before `steps` */
  stopped: boolean;
  seconds: number;
  tokensPerSecond: number;
}

/** Steps a collapse or a blow-up must last before the loop stops. */
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
 * Trains `model` on `tokens` for `steps - startStep` Adam steps.
 *
 * ```js
 * const tokens = tokenizer.encode(text);
 * const {losses} = await trainLoop(model, tokens, {steps: 200, lr: 3e-3, batch: 8, seq: 64, seed: 1});
 * ```
 */
export async function trainLoop(
    model: tfl.LayersModel, tokens: Int32Array, options: TrainLoopOptions): Promise<TrainLoopResult> {
  const op = 'trainLoop';
  const start = options.startStep ?? 0;
  assertInteger(op, 'steps', options.steps, 1);
  assertInteger(op, 'startStep', start, 0, options.steps);
  assertFiniteNumber(op, 'lr', options.lr);
  if (options.lr <= 0) fail(op, `'lr' must be > 0 but got ${options.lr}`);
  assertInteger(op, 'batch', options.batch, 1);
  assertInteger(op, 'seq', options.seq, 1);
  assertInteger(op, 'seed', options.seed, 0, 2 ** 32 - 1);
  if (tokens.length < options.seq + 1) {
    throw new TrainError(`the training text has ${tokens.length} tokens but one window of seq ${options.seq} ` +
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

  const batches = windowStream(tokens, options.batch, options.seq, options.seed, start);
  const optimizer = tf.train.adam(options.lr);
  const losses: number[] = [];
  const tokensPerStep = options.batch * options.seq;
  const began = performance.now();
  let step = start;
  let stopped = false;
  try {
    while (step < options.steps) {
      if (options.shouldStop?.()) {
        stopped = true;
        break;
      }
      if (changed()) {
        // e.g. unregister() or removeAdapter() from onStep: the adapters being trained are gone
        throw new TrainError(`the model's trainable weights changed during training, before step ${step + 1} ` +
            `(was the plugin unregistered or an adapter removed?); the loop trains the weights it started with`);
      }
      const windows = batches.next();  // [B, S+1]
      let loss: number;
      try {
        let computed: { value: tf.Scalar; grads: tf.NamedTensorMap };
        try {
          computed = tf.variableGrads(() => nextTokenLoss(model, windows), variables);
        } catch (e) {
          disposeAbandonedTape();
          throw e;
        }
        try {
          // an asynchronous read: webgpu has no dataSync
          loss = (await computed.value.data())[0];
          // a non-finite step is not applied: the model stays at the last good step
          if (Number.isFinite(loss)) optimizer.applyGradients(Object.entries(computed.grads).map(([name, tensor]) => ({ name, tensor })));
        } finally {
          tf.dispose([computed.value, ...Object.values(computed.grads)]);
        }
      } finally {
        windows.dispose();
      }
      step++;
      if (!Number.isFinite(loss)) {
        throw new TrainError(`the loss became ${loss} at step ${step}; try a smaller learning rate (it is ${options.lr})`);
      }
      losses.push(loss);
      const diverged = divergence(losses, vocab);
      if (diverged !== null) throw new TrainError(`${diverged} at step ${step}; try a smaller learning rate (it is ${options.lr})`);
      const seconds = (performance.now() - began) / 1000;
      options.onStep?.({
        step, steps: options.steps, loss, seconds, tokensPerSecond: (losses.length * tokensPerStep) / seconds,
      });
      await yieldToEventLoop();
    }
  } finally {
    optimizer.dispose();
  }
  const seconds = (performance.now() - began) / 1000;
  return {
    losses, step, stopped, seconds, tokensPerSecond: seconds > 0 ? (losses.length * tokensPerStep) / seconds : 0,
  };
}
