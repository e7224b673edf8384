/**
 * Training progress on a terminal: a cli-progress bar (step, loss, tokens/s, ETA) when the stream
 * is a TTY, otherwise a plain line every `every` steps (logs, CI, tests).
 */
import cliProgress from 'cli-progress';
import type { StepReport } from './loop.js';

export interface ProgressOptions {
  /** default process.stderr */
  stream?: NodeJS.WriteStream;
  /** plain-line mode: a line every this many steps (and the last); default steps / 10 */
  every?: number;
  /** show nothing */
  quiet?: boolean;
}

export interface Progress {
  update(report: StepReport): void;
  /** ends the bar (its last state stays on screen) */
  stop(): void;
}

const formatLoss = (loss: number) => loss.toFixed(4);

/**
 * ```js
 * const progress = createProgress(200, 0);
 * await trainLoop(model, tokens, {..., onStep: r => progress.update(r)});
 * progress.stop();
 * ```
 */
export function createProgress(steps: number, startStep: number, options: ProgressOptions = {}): Progress {
  const stream = options.stream ?? process.stderr;
  if (options.quiet) return { update() {}, stop() {} };
  if (!stream.isTTY) {
    const every = options.every ?? Math.max(1, Math.round((steps - startStep) / 10));
    return {
      update(r) {
        if ((r.step - startStep) % every !== 0 && r.step !== steps) return;
        const left = r.tokensPerSecond > 0 ? (r.seconds / (r.step - startStep)) * (steps - r.step) : 0;
        stream.write(`step ${r.step}/${steps}  loss ${formatLoss(r.loss)}  ${Math.round(r.tokensPerSecond)} tok/s  ` +
            `ETA ${Math.round(left)}s\n`);
      },
      stop() {},
    };
  }
  const bar = new cliProgress.SingleBar({
    stream,
    format: ' {bar} step {value}/{total} | loss {loss} | {tps} tok/s | ETA {eta_formatted}',
    barCompleteChar: '\u2588',
    barIncompleteChar: '\u2591',
    hideCursor: true,
    etaBuffer: 20,
  });
  bar.start(steps, startStep, { loss: '-', tps: '-' });
  return {
    update(r) { bar.update(r.step, { loss: formatLoss(r.loss), tps: Math.round(r.tokensPerSecond) }); },
    stop() { bar.stop(); },
  };
}
