/**
 * saveForBackward: a customGrad's saved tensors kept without tfjs's clone kernel. The gradient is
 * the same as with tfjs's own `save` (against the closed form), no Identity kernel runs and no
 * tape node is added for the saves, the saved data outlives what the forward frees (x·w), a tape that
 * is off keeps nothing, and tf.clone elsewhere is tfjs's own again afterwards (its Identity, its
 * gradient). Reads are awaited, so this runs on webgpu too.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { saveForBackward } from '../../src/ops/saved_tensors.js';
import { expectNoLeakAsync } from '../backends/webgpu/helpers.js';

type Saver = (save: tf.GradSaveFunc, tensors: tf.Tensor[]) => void;

/** y = Σ_j (x·w)_ij² per row i, saving what its backward reads: x·w (made and freed inside the forward) and w. */
function squaredProjection(saver: Saver) {
  return tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
    const [x, w, save] = args as [tf.Tensor2D, tf.Tensor2D, tf.GradSaveFunc];
    const xw = tf.matMul(x, w);
    saver(save, [x, xw, w]);
    return {
      value: tf.sum(tf.square(xw), 1),
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) => {
        const [xs, xws, ws] = saved as tf.Tensor2D[];
        const g = tf.mul(tf.mul(xws, 2), tf.expandDims(dy, 1)) as tf.Tensor2D;   // dL/d(xw)
        return [tf.matMul(g, ws, false, true), tf.matMul(xs, g, true, false)];
      },
    };
  });
}

/** Kernels run and tape nodes added while `fn` runs. */
function recorded<T>(fn: () => T): { value: T; kernels: string[]; tapeNodes: number } {
  const engine = tf.engine() as unknown as {
    runKernel: (name: string, ...rest: unknown[]) => unknown; addTapeNode: (...args: unknown[]) => unknown;
  };
  const [runKernel, addTapeNode] = [engine.runKernel, engine.addTapeNode];
  const kernels: string[] = [];
  let tapeNodes = 0;
  engine.runKernel = function (this: unknown, name: string, ...rest: unknown[]) { kernels.push(name); return runKernel.call(this, name, ...rest); };
  engine.addTapeNode = function (this: unknown, ...args: unknown[]) { tapeNodes++; return addTapeNode.apply(this, args); };
  try {
    return { value: fn(), kernels, tapeNodes };
  } finally {
    delete (engine as { runKernel?: unknown }).runKernel;
    delete (engine as { addTapeNode?: unknown }).addTapeNode;
  }
}

const X = [[1, -2, 0.5], [3, 0.25, -1]];
const W = [[0.5, -1], [2, 0.25], [-0.75, 1.5]];

/** float64: x·w, then the closed form dL/dx = 2·(x·w)·wᵀ and dL/dw = xᵀ·2·(x·w) for L = Σ (x·w)². */
function reference64() {
  const xw = X.map(row => [0, 1].map(j => row.reduce((s, v, k) => s + v * W[k][j], 0)));
  const dx = xw.map(r => [0, 1, 2].map(k => 2 * (r[0] * W[k][0] + r[1] * W[k][1])));
  const dw = [0, 1, 2].map(k => [0, 1].map(j => 2 * (X[0][k] * xw[0][j] + X[1][k] * xw[1][j])));
  return { y: xw.map(r => r[0] ** 2 + r[1] ** 2), dx: dx.flat(), dw: dw.flat() };
}

describe('saveForBackward: a customGrad\'s saves without tfjs\'s clone kernel', () => {
  const x = () => tf.tensor2d(X);
  const w = () => tf.tensor2d(W);
  const want = reference64();

  it('the same gradient as tfjs\'s own save, with no Identity kernel and no tape node for the saves', async () => {
    await expectNoLeakAsync(async () => {
      const [xt, wt] = [x(), w()];
      const grads = (saver: Saver) => recorded(() => tf.grads((a: tf.Tensor, b: tf.Tensor) => tf.sum(squaredProjection(saver)(a, b)))([xt, wt]));
      const own = grads((save, tensors) => save(tensors));
      const shared = grads(saveForBackward);
      // every value is exact in f32 (multiples of 1/64)
      for (const { value } of [own, shared]) {
        expect(Array.from(await value[0].data())).to.deep.equal(want.dx);
        expect(Array.from(await value[1].data())).to.deep.equal(want.dw);
      }
      // the three saves: three Identity kernels and three tape nodes fewer (tf.grads runs its own elsewhere)
      const identities = (r: { kernels: string[] }) => r.kernels.filter(k => k === 'Identity').length;
      expect(identities(own) - identities(shared)).to.equal(3);
      expect(own.tapeNodes - shared.tapeNodes).to.equal(3);
      expect(own.kernels.length - shared.kernels.length).to.equal(3);
      tf.dispose([xt, wt, ...own.value, ...shared.value]);
    });
  });

  it('keeps nothing where no tape records, and leaves tfjs\'s clone as it was', async () => {
    await expectNoLeakAsync(async () => {
      const [xt, wt] = [x(), w()];
      const before = tf.memory().numTensors;
      const y = squaredProjection(saveForBackward)(xt, wt);
      expect(tf.memory().numTensors).to.equal(before + 1);
      expect(Array.from(await y.data())).to.deep.equal(want.y);
      expect(Object.prototype.hasOwnProperty.call(tf.engine(), 'clone')).to.equal(false);
      // tf.clone is tfjs's again: an Identity kernel, a gradient through it
      const { value: g, kernels } = recorded(() => tf.grad((a: tf.Tensor) => tf.sum(tf.mul(tf.clone(a), 3)))(xt));
      expect(kernels).to.include('Identity');
      expect(Array.from(await g.data())).to.deep.equal([3, 3, 3, 3, 3, 3]);
      tf.dispose([xt, wt, y, g]);
    });
  });

  it('a trained variable saved: its gradient through tf.variableGrads, nothing left behind', async () => {
    await expectNoLeakAsync(async () => {
      const [xt, w0] = [x(), w()];
      const v = tf.variable(w0, true, 'saved_tensors_spec_w');
      w0.dispose();
      const { value, grads } = tf.variableGrads(() => tf.sum(squaredProjection(saveForBackward)(xt, v)) as tf.Scalar, [v]);
      expect(Array.from(await grads[v.name].data())).to.deep.equal(want.dw);
      expect((await value.data())[0]).to.equal(want.y[0] + want.y[1]);
      tf.dispose([xt, v, value, grads[v.name]]);
    });
  });
});
