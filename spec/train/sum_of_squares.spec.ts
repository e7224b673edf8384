/**
 * sumOfSquares on the active backend's path (cpu and wasm: the composed chunks; no kernel is
 * registered there): Σ x² against float64 over tensors of many shapes, NaN and Infinity kept, the
 * arguments' errors, nothing left behind. The webgpu kernel has its own spec
 * (spec/backends/webgpu/sum_of_squares.spec.ts).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { SUM_OF_SQUARES, sumOfSquares } from '../../src/train/sum_of_squares.js';
import { Rng } from '../helpers/numeric.js';

describe('sumOfSquares', () => {
  it('runs the composed ops here: against float64 over 40 tensors of ranks 0–3, empty ones among them; 0 for none', async () => {
    expect(tf.getKernel(SUM_OF_SQUARES, tf.getBackend()), 'no kernel on this backend').to.equal(undefined);
    const rng = new Rng(3);
    const shapes = [...Array.from({ length: 37 }, (_, i) => [[], [9], [3, 5], [2, 1, 7]][i % 4].map(d => d + (i % 5))), [0], [5, 0], [3000]];
    const values = shapes.map(shape => Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rng.normal()));
    const tensors = values.map((v, i) => tf.tensor(v, shapes[i]));
    const want = values.reduce((s, v) => s + v.reduce((t, x) => t + x * x, 0), 0);
    const before = tf.memory().numTensors;
    const sum = sumOfSquares(tensors);
    expect(tf.memory().numTensors, 'one tensor made').to.equal(before + 1);
    expect(sum.shape).to.deep.equal([]);
    // a float32 running sum of 3000 positive terms (wasm's Sum) is within 3000·2^-24 of float64
    expect((await sum.data())[0]).to.be.closeTo(want, 3000 * 2 ** -24 * want);
    const none = sumOfSquares([]);
    expect(Array.from(await none.data())).to.deep.equal([0]);
    tf.dispose([sum, none, ...tensors]);
  });

  it('keeps NaN and Infinity', async () => {
    const finite = tf.tensor1d([1, 2]);
    for (const bad of [NaN, Infinity, -Infinity]) {
      const t = tf.tensor1d([0.5, bad]);
      const sum = sumOfSquares([finite, t]);
      const value = (await sum.data())[0];
      if (Number.isNaN(bad)) expect(value).to.be.NaN;
      else expect(value).to.equal(Infinity);
      tf.dispose([t, sum]);
    }
    finite.dispose();
  });

  it('names the bad argument, expected and actual, and makes nothing', () => {
    const ints = tf.tensor1d([1, 2], 'int32');
    const one = tf.scalar(1);
    const gone = tf.tensor1d([1]);
    gone.dispose();
    const before = tf.memory().numTensors;
    expect(() => sumOfSquares(ints as unknown as tf.Tensor[])).to.throw("`sumOfSquares()`: 'tensors' must be an array of float32 tensors but got a int32 tensor of shape [2]");
    expect(() => sumOfSquares([one, ints])).to.throw("`sumOfSquares()`: 'tensors[1]' must be a float32 tensor but got a int32 tensor of shape [2]");
    expect(() => sumOfSquares([gone])).to.throw("`sumOfSquares()`: 'tensors[0]' must be a live float32 tensor but got a disposed one");
    expect(tf.memory().numTensors).to.equal(before);
    tf.dispose([ints, one]);
  });
});
