/**
 * Which errors are the user's (a bad fixture, checkpoint, config, argument or install): every
 * error this package throws for its input is a MoELoraError, and the CLI prints its message alone.
 * Any other error is a bug: the CLI says "internal error" and how to report it.
 */
import { MoELoraError } from '../errors.js';

/** Bad command-line arguments: exit code 2. */
export class UsageError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'UsageError';
    Object.setPrototypeOf(this, UsageError.prototype);
  }
}

/** Ends the command with this exit code after it printed its own report (e.g. parity failed). */
export class ExitCode extends Error {
  constructor(readonly code: number) {
    super(`exit ${code}`);
    this.name = 'ExitCode';
    Object.setPrototypeOf(this, ExitCode.prototype);
  }
}

export function isUserError(err: unknown): err is Error {
  if (err instanceof MoELoraError) return true;
  // Node's file-system errors (ENOENT, EACCES, ...) name the path and the cause already.
  const e = err as NodeJS.ErrnoException;
  return err instanceof Error && typeof e.syscall === 'string' && typeof e.code === 'string';
}
