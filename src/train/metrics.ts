/**
 * Training metrics as JSON Lines, one object per line as transformers' Trainer logs them
 * (log_history's names: loss, learning_rate, grad_norm, eval_loss): a line per step and a line
 * per evaluation, and one per warning of the loop (a dead model). Each line is written at once (a crashed run keeps every line it reached).
 */
import { closeSync, openSync, writeSync } from 'node:fs';
import type { EvalReport, StepReport, TrainWarning } from './loop.js';
import { FileError } from '../util/files.js';

export interface MetricsLog {
  step(report: StepReport): void;
  eval(report: EvalReport): void;
  warning(warning: TrainWarning): void;
  close(): void;
}

/**
 * Opens `path` for the run's metrics: truncated, or appended to when `append` (a resumed run
 * continues the file of the run it resumes).
 *
 * ```js
 * const log = openMetricsLog('runs/a/metrics.jsonl', false);
 * // {"type":"train","step":1,"loss":2.31,"learning_rate":0.001,"grad_norm":1.7,"tokens":512,"tokens_per_second":900,"elapsed":0.6}
 * ```
 */
export function openMetricsLog(path: string, append: boolean): MetricsLog {
  let fd: number;
  try {
    fd = openSync(path, append ? 'a' : 'w');
  } catch (e) {
    throw new FileError(`the metrics file '${path}' cannot be opened for writing: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  const write = (record: Record<string, unknown>) => { writeSync(fd, `${JSON.stringify(record)}\n`); };
  return {
    step: r => write({
      type: 'train', step: r.step, loss: r.loss, learning_rate: r.lr, grad_norm: r.gradNorm, tokens: r.tokens,
      tokens_per_second: r.tokensPerSecond, elapsed: r.elapsed,
    }),
    eval: r => write({ type: 'eval', step: r.step, eval_loss: r.loss }),
    warning: w => write({ type: 'warning', step: w.step, kind: w.kind, message: w.message }),
    close: () => closeSync(fd),
  };
}
