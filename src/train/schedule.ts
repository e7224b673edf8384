/**
 * Learning-rate schedules with linear warm-up, the formulas of Hugging Face transformers'
 * `get_constant_schedule_with_warmup`, `get_linear_schedule_with_warmup` and
 * `get_cosine_schedule_with_warmup` (src/transformers/optimization.py; cosine with num_cycles 0.5).
 * Those are LambdaLR multipliers of the base learning rate, evaluated at the number of optimizer
 * steps already taken: the first step (0 taken) uses the multiplier at 0, which is 0 during a
 * warm-up, exactly as a Trainer run does.
 */
import { assertFiniteNumber, assertInteger, fail } from '../ops/validate.js';

export const LR_SCHEDULERS = ['constant', 'linear', 'cosine'] as const;
export type LRScheduler = typeof LR_SCHEDULERS[number];

export interface LRScheduleOptions {
  /** the base learning rate (the peak, after warm-up) */
  lr: number;
  /** optimizer steps of the whole run (num_training_steps) */
  totalSteps: number;
  /** steps of the linear warm-up from 0 (num_warmup_steps); default 0 */
  warmupSteps?: number;
}

/** The multiplier of the base rate after `taken` steps (HF's lr_lambda(current_step)). */
function multiplier(scheduler: LRScheduler, taken: number, total: number, warmup: number): number {
  // every schedule: `if current_step < num_warmup_steps: return float(current_step) / float(max(1, num_warmup_steps))`
  if (taken < warmup) return taken / Math.max(1, warmup);
  switch (scheduler) {
    case 'constant':
      return 1;
    case 'linear':
      // max(0.0, float(num_training_steps - current_step) / float(max(1, num_training_steps - num_warmup_steps)))
      return Math.max(0, (total - taken) / Math.max(1, total - warmup));
    case 'cosine': {
      // progress = float(current_step - num_warmup_steps) / float(max(1, num_training_steps - num_warmup_steps))
      // max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress))), num_cycles = 0.5
      const progress = (taken - warmup) / Math.max(1, total - warmup);
      return Math.max(0, 0.5 * (1 + Math.cos(Math.PI * 0.5 * 2 * progress)));
    }
  }
}

/**
 * The learning rate of optimizer step `step` (1-based: the first step is 1), as transformers'
 * Trainer uses it.
 *
 * ```js
 * learningRateAt('linear', 1, {lr: 1e-3, totalSteps: 100, warmupSteps: 10});   // 0 (warm-up starts at 0)
 * learningRateAt('cosine', 56, {lr: 1e-3, totalSteps: 100, warmupSteps: 10});  // 5e-4 (half-way down)
 * ```
 */
export function learningRateAt(scheduler: LRScheduler, step: number, options: LRScheduleOptions): number {
  const op = 'learningRateAt';
  if (!(LR_SCHEDULERS as readonly string[]).includes(scheduler)) {
    fail(op, `'scheduler' must be one of ${LR_SCHEDULERS.map(s => `'${s}'`).join(', ')} but got ${JSON.stringify(scheduler)}`);
  }
  assertFiniteNumber(op, 'lr', options.lr);
  assertInteger(op, 'totalSteps', options.totalSteps, 1);
  assertInteger(op, 'step', step, 1);
  const warmup = options.warmupSteps ?? 0;
  assertInteger(op, 'warmupSteps', warmup, 0);
  return options.lr * multiplier(scheduler, step - 1, options.totalSteps, warmup);
}
