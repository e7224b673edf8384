/**
 * adamUpdate (src/train/adam_update.ts), the op Adam.apply runs per variable: on the backends that
 * register no MoEAdamUpdate (cpu, wasm) it composes tfjs ops; checked against a float64 replay of
 * torch.optim.Adam's formula on a 2-D variable, and its argument checks. The webgpu kernel:
 * spec/backends/webgpu/adam_update.spec.ts.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { SeededRandom } from '../../src/data/random.js';
import { ADAM_UPDATE, adamUpdate, type AdamUpdateAttrs } from '../../src/train/adam_update.js';
import { maxRelativeError } from '../../src/util/numeric.js';

describe('train/adam_update: one Adam update of one variable', () => {
  it('composes torch\'s update where no MoEAdamUpdate is registered (float64 replay, 2 steps)', async () => {
    expect(tf.getKernel(ADAM_UPDATE, tf.getBackend()), 'no kernel on this backend').to.equal(undefined);
    const rng = new SeededRandom(2);
    const shape: [number, number] = [4, 9];
    const n = 36;
    let p = Array.from({ length: n }, () => Math.fround(rng.next() - 0.5));
    let m = new Array<number>(n).fill(0);
    let v = new Array<number>(n).fill(0);
    const before = tf.memory().numTensors;
    let state = { param: tf.tensor2d(p, shape) as tf.Tensor, moments: tf.zeros([2, ...shape]) };
    for (const [t, lr] of [[1, 1e-2], [2, 4e-2]] as const) {
      const g = Array.from({ length: n }, () => Math.fround(rng.next() * 2 - 1));
      m = m.map((x, k) => 0.9 * x + 0.1 * g[k]);
      v = v.map((x, k) => 0.999 * x + 0.001 * g[k] * g[k]);
      p = p.map((x, k) => x - lr / (1 - 0.9 ** t) * m[k] / (Math.sqrt(v[k]) / Math.sqrt(1 - 0.999 ** t) + 1e-8));
      const grad = tf.tensor2d(g, shape);
      const attrs: AdamUpdateAttrs = { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, correction2Sqrt: Math.sqrt(1 - 0.999 ** t), stepSize: lr / (1 - 0.9 ** t) };
      const next = adamUpdate(state.param, grad, state.moments, attrs);
      tf.dispose([grad, state.param, state.moments]);
      state = next;
      expect(state.param.shape).to.deep.equal(shape);
      expect(state.moments.shape).to.deep.equal([2, ...shape]);
    }
    expect(maxRelativeError(await state.param.data(), p), 'param').to.be.below(1e-6);
    expect(maxRelativeError(await state.moments.data(), [...m, ...v]), 'm then v').to.be.below(1e-6);
    tf.dispose([state.param, state.moments]);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('gradScale multiplies the gradient (the same bits as a scaled gradient); 0 gives param and moments back unchanged', async () => {
    const rng = new SeededRandom(3);
    const values = (n: number) => Float32Array.from({ length: n }, () => rng.next() * 2 - 1);
    const param = tf.tensor2d(values(12), [3, 4]);
    const grad = tf.tensor2d(values(12), [3, 4]);
    const moments = tf.tensor3d(values(24).map(Math.abs), [2, 3, 4]);
    const attrs: AdamUpdateAttrs = { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, correction2Sqrt: Math.sqrt(1 - 0.999 ** 3), stepSize: 1e-2 / (1 - 0.9 ** 3) };
    const bits = async (t: tf.Tensor) => Array.from(new Uint32Array((await t.data() as Float32Array).buffer));
    const before = tf.memory().numTensors;
    for (const scale of [0.37, 1, 3]) {
      const s = tf.scalar(scale);
      const scaledGrad = tf.mul(grad, s);
      const got = adamUpdate(param, grad, moments, attrs, s);
      const want = adamUpdate(param, scaledGrad, moments, attrs);
      expect(await bits(got.param), `param at scale ${scale}`).to.deep.equal(await bits(want.param));
      expect(await bits(got.moments), `moments at scale ${scale}`).to.deep.equal(await bits(want.moments));
      tf.dispose([s, scaledGrad, got.param, got.moments, want.param, want.moments]);
    }
    const zero = tf.scalar(0);
    const skipped = adamUpdate(param, grad, moments, attrs, zero);
    expect(await bits(skipped.param), 'param of a skipped step').to.deep.equal(await bits(param));
    expect(await bits(skipped.moments), 'moments of a skipped step').to.deep.equal(await bits(moments));
    tf.dispose([zero, skipped.param, skipped.moments]);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    const ints = tf.scalar(1, 'int32');
    const vector = tf.ones([1]);
    expect(() => adamUpdate(param, grad, moments, attrs, ints)).to.throw("`adamUpdate()`: 'gradScale' must be a float32 scalar tensor but got");
    expect(() => adamUpdate(param, grad, moments, attrs, vector)).to.throw("`adamUpdate()`: 'gradScale' must be a float32 scalar tensor but got");
    tf.dispose([param, grad, moments, ints, vector]);
  });

  it('names the argument that is wrong', () => {
    const attrs: AdamUpdateAttrs = { beta1: 0.9, beta2: 0.999, epsilon: 1e-8, correction2Sqrt: 0.03, stepSize: 0.01 };
    const a = tf.zeros([2, 3]);
    const b = tf.zeros([3, 2]);
    const ints = tf.zeros([2, 3], 'int32');
    const flat = tf.zeros([6]);
    const moments = tf.zeros([2, 2, 3]);
    const wrongMoments = tf.zeros([2, 3, 2]);
    const before = tf.memory().numTensors;
    expect(() => adamUpdate([1, 2] as unknown as tf.Tensor, a, moments, attrs))
        .to.throw("`adamUpdate()`: 'param' must be a float32 tensor but got an array of length 2");
    expect(() => adamUpdate(ints, a, moments, attrs)).to.throw("`adamUpdate()`: 'param' must be float32 but got int32 (shape [2,3])");
    expect(() => adamUpdate(a, b, moments, attrs)).to.throw("`adamUpdate()`: 'grad' must have the shape of 'param' [2,3] but has [3,2]");
    expect(() => adamUpdate(a, flat, moments, attrs)).to.throw("`adamUpdate()`: 'grad' must be 2-D but got shape [6]");
    expect(() => adamUpdate(a, a, a, attrs)).to.throw("`adamUpdate()`: 'moments' must be 3-D but got shape [2,3]");
    expect(() => adamUpdate(a, a, wrongMoments, attrs))
        .to.throw("`adamUpdate()`: 'moments' must be [2, ...param's shape] = [2,2,3] but has [2,3,2]");
    expect(() => adamUpdate(a, a, moments, { ...attrs, stepSize: NaN })).to.throw("`adamUpdate()`: 'stepSize' must be a finite number but got NaN");
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    tf.dispose([a, b, ints, flat, moments, wrongMoments]);
  });
});
