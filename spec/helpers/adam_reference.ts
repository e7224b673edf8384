/**
 * torch.optim.Adam's own steps (spec/fixtures/train/loop_reference.json, made on the GPU machine by
 * tools/train/make_loop_reference.py) replayed through this package's Adam on the active backend.
 */
import * as tf from '@tensorflow/tfjs-core';
import { Adam } from '../../src/train/optimizer.js';
import { maxRelativeError } from '../../src/util/numeric.js';

/** The fixture's Adam case: a 1-D parameter, its gradients and learning rate per step, torch's parameters after each. */
export interface AdamReference { initial: number[]; grads: number[][]; lrs: number[]; params: number[][] }

/**
 * Max relative error of the parameters after each step against torch's, reading asynchronously
 * (webgpu); disposes everything it made.
 */
export async function adamStepErrors(ref: AdamReference): Promise<number[]> {
  const variable = tf.tidy(() => tf.variable(tf.tensor1d(ref.initial)));
  const adam = new Adam([variable]);
  const errors: number[] = [];
  try {
    for (let step = 0; step < ref.grads.length; step++) {
      const grad = tf.tensor1d(ref.grads[step]);
      adam.apply([grad], ref.lrs[step]);
      grad.dispose();
      errors.push(maxRelativeError(await variable.data(), ref.params[step]));
    }
  } finally {
    adam.dispose();
    variable.dispose();
  }
  return errors;
}
