/** A training run that cannot go on: bad data for the model, a loss that blew up, nothing to train. */
export class TrainError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'TrainError';
    Object.setPrototypeOf(this, TrainError.prototype);
  }
}
