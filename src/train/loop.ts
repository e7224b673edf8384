/**
 * The training loop the CLI's `train` and examples/finetune.ts share: random windows of the
 * token stream, next-token cross-entropy, Adam on the model's trainable variables (with LoRA
 * registered, only the adapters'). It yields to the event loop after every step, so a Ctrl-C
 * handler can ask it to stop between steps.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { trainableVariables } from '../layers/moe_causal_lm.js';
import { assertFiniteNumber, assertInteger, fail } from '../ops/validate.js';
import { windowStream } from './batches.js';
import { TrainError } from './errors.js';
import { nextTokenLoss } from './loss.js';

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
  const variables = trainableVariables(model);
  if (variables.length === 0) throw new TrainError(`the model '${model.name}' has no trainable weights`);

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
      const windows = batches.next();  // [B, S+1]
      let loss: number;
      try {
        const value = optimizer.minimize(() => nextTokenLoss(model, windows), true, variables)!;
        try {
          // an asynchronous read: webgpu has no dataSync
          loss = (await value.data())[0];
        } finally {
          value.dispose();
        }
      } finally {
        windows.dispose();
      }
      step++;
      if (!Number.isFinite(loss)) {
        throw new TrainError(`the loss became ${loss} at step ${step}; try a smaller learning rate (it is ${options.lr})`);
      }
      losses.push(loss);
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
