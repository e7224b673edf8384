/** Special files for the loader specs: FIFOs, and a guard that fails a call that blocks on one. */
import { execFileSync } from 'node:child_process';
import { closeSync, constants, openSync } from 'node:fs';
import { join } from 'node:path';

/** A FIFO (named pipe) `name` in `dir`, made with mkfifo; its path. */
export function makeFifo(dir: string, name: string): string {
  const path = join(dir, name);
  execFileSync('mkfifo', [path]);
  return path;
}

/**
 * The error `promise` rejects with, which must come within `ms`. A reader that blocked on the
 * FIFO at `fifo` (the regression this guards against) fails the spec instead of hanging it: the
 * FIFO is then opened for writing and closed, which gives the blocked reader end-of-file and
 * frees its thread.
 */
export async function expectSettlesQuickly(promise: Promise<unknown>, fifo: string, ms = 2000): Promise<Error> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<'blocked'>(resolve => { timer = setTimeout(() => resolve('blocked'), ms); });
  const outcome = await Promise.race([
    promise.then(() => 'resolved' as const, (e: unknown) => e as Error),
    timeout,
  ]);
  clearTimeout(timer);
  if (outcome === 'blocked') {
    try {
      closeSync(openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK));
    } catch {
      // no reader was waiting
    }
    await promise.catch(() => undefined);
    throw new Error(`the call blocked for more than ${ms} ms on the FIFO '${fifo}'`);
  }
  if (outcome === 'resolved') throw new Error(`the call accepted the FIFO '${fifo}'`);
  return outcome;
}
