/** The error of a dataset file a run cannot use: a bad line, a missing field, an empty sample. */
import { MoELoraError } from '../errors.js';

/** A dataset line or file that cannot be used; the message names the file and the line. */
export class DatasetError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'DatasetError';
    Object.setPrototypeOf(this, DatasetError.prototype);
  }
}
