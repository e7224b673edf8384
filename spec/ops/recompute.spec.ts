/**
 * recompute(fn, x, trainables): the value and the gradients of x and of each trainable are plain
 * autodiff's of fn, bit for bit; fn runs once more in the backward pass, under the given scope,
 * and nothing it made is kept between the passes; a captured tensor gets no gradient; a
 * trainable fn does not reach gets zeros; every argument check.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { recompute } from '../../src/ops/recompute.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { Rng } from '../helpers/numeric.js';

const rng = new Rng(11);
const tensor = (shape: number[]) => tf.tensor(Array.from(rng.array(shape.reduce((a, b) => a * b, 1), 0.5)), shape);

describe('ops: recompute', () => {
  it('gives plain autodiff\'s value and gradients bit for bit, running fn again under the scope in backward', () => {
    const w = tf.variable(tensor([6, 6]), true, 'recompute_w');
    const b = tf.variable(tensor([6]), true, 'recompute_b');
    const unused = tf.variable(tensor([3]), true, 'recompute_unused');
    const frozen = tensor([6, 6]);
    const x = tensor([4, 6]);
    const dy = tensor([4, 6]);
    // two layers' worth of intermediate tensors: tanh, products, a softmax
    const fn = (v: tf.Tensor) => tf.softmax(tf.add(tf.matMul(tf.tanh(tf.matMul(v, w)), frozen), b));
    const plain = tf.grads((v: tf.Tensor, wv: tf.Tensor, bv: tf.Tensor) => {
      void wv; void bv;  // fn reads the variables themselves, as a layer does
      return fn(v);
    });
    const [pdx, pdw, pdb] = plain([x, w, b], dy);
    const expected = fn(x);
    let calls = 0;
    let scoped = 0;
    const counted = (v: tf.Tensor) => { calls++; return fn(v); };
    const before = tf.memory().numTensors;
    const { value, grads } = tf.valueAndGrads((v: tf.Tensor) => {
      const y = recompute(counted, v, [w, b, unused], run => { scoped++; return run(); });
      // the forward kept only x's copy: fn's intermediates are gone before the backward runs
      expect(tf.memory().numTensors - before, 'tensors alive after the forward').to.equal(2);  // y, the saved copy of x
      return y;
    })([x], dy);
    expect(calls, 'fn runs in the forward and once more in the backward').to.equal(2);
    expect(scoped, 'the backward runs under the scope').to.equal(1);
    const bits = (t: tf.Tensor) => Buffer.from((t.dataSync() as Float32Array).buffer);
    expect(bits(value).equals(bits(expected)), 'value').to.equal(true);
    expect(bits(grads[0]).equals(bits(pdx)), 'dx').to.equal(true);
    // the trainables' gradients: through tf.variableGrads, as training takes them
    const vg = tf.variableGrads(() => tf.sum(tf.mul(recompute(fn, x, [w, b, unused]), dy)), [w, b, unused]);
    expect(bits(vg.grads[w.name]).equals(bits(pdw)), 'dw').to.equal(true);
    expect(bits(vg.grads[b.name]).equals(bits(pdb)), 'db').to.equal(true);
    expect(Array.from(vg.grads[unused.name].dataSync()), 'a trainable fn does not read: zeros').to.deep.equal([0, 0, 0]);
    // a tensor fn captures is no input of the op: no gradient reaches it
    const toFrozen = tf.engine().gradients(() => tf.sum(recompute(fn, x, [w, b])), [frozen], undefined, true);
    expect(toFrozen.grads[0]).to.equal(undefined);
    toFrozen.value.dispose();
    tf.dispose([value, ...grads, vg.value, ...Object.values(vg.grads)]);
    expect(tf.memory().numTensors, 'tensors left').to.equal(before);
    tf.dispose([w, b, unused, frozen, x, dy, pdx, pdw, pdb, expected]);
  });

  it('refuses bad arguments with one message naming the argument', () => {
    const x = tf.zeros([2, 2]);
    const w = tf.variable(tf.ones([2, 2]), true, 'recompute_args_w');
    const f = (v: tf.Tensor) => tf.matMul(v, w);
    const call = (...args: unknown[]) => () => (recompute as (...a: unknown[]) => tf.Tensor)(...args);
    expect(call(null, x, [w])).to.throw(OpArgumentError, /`recompute\(\)`: 'fn' must be a function \(x\) => tensor but got null/);
    expect(call(f, [1, 2], [w])).to.throw(OpArgumentError, /'x' must be a float32 tensor but got an array of length 2/);
    expect(call(f, tf.tensor1d([1], 'int32'), [w])).to.throw(/'x' must be float32 but got int32 \(shape \[1\]\)/);
    const gone = tf.zeros([2, 2]);
    gone.dispose();
    expect(call(f, gone, [w])).to.throw(/'x' was already disposed/);
    expect(call(f, x, w)).to.throw(/'trainables' must be an array of float32 tensors but got a float32 tensor of shape \[2, 2\]/);
    expect(call(f, x, [w, 'b'])).to.throw(/'trainables\[1\]' must be a float32 tensor but got "b" \(string\)/);
    expect(call(f, x, [w, w])).to.throw(/'trainables\[1\]' is given twice \(or is 'x'\): each input gets one gradient/);
    expect(call(f, x, [x])).to.throw(/'trainables\[0\]' is given twice/);
    expect(call(f, x, [w], 3)).to.throw(/'scope' must be a function \(run\) => run\(\) but got 3 \(number\)/);
    expect(call(() => 5, x, [w])).to.throw(/'fn' must return a tensor but returned 5 \(number\)/);
    // the engine state the backward pass relies on, checked before anything runs
    const state = tf.engine().state as unknown as { gradientDepth: unknown };
    const depth = state.gradientDepth;
    state.gradientDepth = undefined;
    try {
      expect(call(f, x, [w])).to.throw(/must keep its gradient tape in state.gradientDepth and state.activeTape \(as 4.22 does\) but its state has gradientDepth undefined/);
    } finally {
      state.gradientDepth = depth;
    }
    tf.dispose([x, w]);
  });
});
