/** A training run that cannot go on: bad data for the model, a loss that blew up, nothing to train. */
import { MoELoraError } from '../errors.js';
export class TrainError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'TrainError';
    Object.setPrototypeOf(this, TrainError.prototype);
  }
}
