import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
describe('smoke', () => {
  it('runs on the chosen backend', () => {
    expect(tf.getBackend()).to.equal(process.env.TFJS_BACKEND ?? 'cpu');
  });
});
