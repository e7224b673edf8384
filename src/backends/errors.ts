/** Errors of choosing and starting a tfjs backend. */
import { MoELoraError } from '../errors.js';

/** A backend that cannot be loaded, set or configured; a user error (an install, a name, a setting), not a bug. */
export class BackendError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'BackendError';
    Object.setPrototypeOf(this, BackendError.prototype);
  }
}
