/**
 * Which errors are the user's (a bad fixture, checkpoint, config or install): the CLI prints
 * their message alone. Any other error is a bug and keeps its stack trace.
 */
import { FileIOError } from '../io/file_io_handler.js';
import { CheckpointError } from '../io/hf_checkpoint.js';
import { ModelDirError } from '../io/model_dir.js';
import { PeftAdapterError } from '../io/peft.js';
import { SafetensorsError } from '../io/safetensors.js';
import { FixtureError } from '../models/parity.js';
import { OpArgumentError } from '../ops/validate.js';
import { BackendError } from './backend.js';

/** Bad command-line arguments: exit code 2. */
export class UsageError extends Error {
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
  if (err instanceof OpArgumentError || err instanceof SafetensorsError || err instanceof FixtureError ||
      err instanceof BackendError || err instanceof CheckpointError || err instanceof PeftAdapterError ||
      err instanceof FileIOError || err instanceof ModelDirError) {
    return true;
  }
  // Node's file-system errors (ENOENT, EACCES, ...) name the path and the cause already.
  const e = err as NodeJS.ErrnoException;
  return err instanceof Error && typeof e.syscall === 'string' && typeof e.code === 'string';
}
