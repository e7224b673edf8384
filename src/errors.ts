/**
 * The one error hierarchy: every error this package throws because of what it was given (a file,
 * a folder, a config, an argument, a model that does not fit) is a `MoELoraError`; subclasses say
 * which area (SafetensorsError, CheckpointError, PeftAdapterError, ...). Anything else that
 * escapes the package is a bug. The CLI decides exit codes by `instanceof MoELoraError`, never by
 * a list of classes.
 *
 * ```js
 * try {
 *   await loadHFCheckpoint('./my-model');
 * } catch (e) {
 *   if (e instanceof MoELoraError) console.error(e.message);  // the input's fault: one clear line or list
 *   else throw e;
 * }
 * ```
 */
export class MoELoraError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MoELoraError';
    Object.setPrototypeOf(this, new.target.prototype);
  }
}

/** Where an internal error (a bug) should be reported; the CLI prints it with the error. */
export const REPORT_BUGS = 'please report it with the command and the output of a run with TFJS_MOE_LORA_DEBUG=1';
