/**
 * rmsNorm (one customGrad, closed-form backward) against float64 and finite differences and
 * against the composed rmsNormReference's tfjs gradients, in every layout the layers use; a
 * frozen weight gets no gradient work. Reads are awaited, so this runs on webgpu too
 * (spec/backends/webgpu/layer_ops.spec.ts).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { rmsNorm, rmsNormReference } from '../../src/ops/rms_norm.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { expectCloseAsync, expectNoLeakAsync } from '../backends/webgpu/helpers.js';
import { asF32, countKernels, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

/** float64 RMSNorm over rows of width d, scaled by w (by 1 + w when zeroCentered). */
function rmsNorm64(x: Float64Array, w: Float64Array, d: number, eps: number, zeroCentered: boolean): Float64Array {
  const out = new Float64Array(x.length);
  for (let r = 0; r < x.length / d; r++) {
    let ms = 0;
    for (let j = 0; j < d; j++) ms += x[r * d + j] ** 2;
    const inv = 1 / Math.sqrt(ms / d + eps);
    for (let j = 0; j < d; j++) out[r * d + j] = x[r * d + j] * inv * (zeroCentered ? 1 + w[j] : w[j]);
  }
  return out;
}

interface NormCase { name: string; shape: number[]; weight: 'random' | 'ones' | 'small'; zeroCentered?: boolean }

// the layouts of src/layers: RMSNorm layer [B, S, H], attention's 'full' q/k norm [B·S, nh·D],
// 'perHead' [B, S, n, D], 'perHeadAfterRope' [B·n, S, D], 'l2' (a ones weight), Qwen3-Next's
// zero-centred norms, and a single row
const CASES: NormCase[] = [
  { name: 'layer [B, S, H]', shape: [2, 3, 8], weight: 'random' },
  { name: "attention 'full' [B·S, nh·D]", shape: [5, 12], weight: 'random' },
  { name: "attention 'perHead' [B, S, n, D]", shape: [2, 3, 2, 4], weight: 'random' },
  { name: "attention 'perHeadAfterRope' [B·n, S, D]", shape: [4, 3, 4], weight: 'random' },
  { name: "attention 'l2' (ones) [B·n, S, D]", shape: [4, 3, 4], weight: 'ones' },
  { name: 'zero-centred (1 + weight) [B, S, H]', shape: [2, 3, 6], weight: 'small', zeroCentered: true },
  { name: 'one row [D]', shape: [6], weight: 'random' },
  // rows wider than a workgroup's 64 lanes take, in quads (webgpu) and in elements
  { name: 'wide rows [N, D], D a multiple of 4', shape: [2, 520], weight: 'random' },
  { name: 'wide rows [N, D], D odd', shape: [2, 301], weight: 'random' },
];

describe('ops/rmsNorm', () => {
  const eps = 1e-5;
  for (const c of CASES) {
    for (const trainWeight of [true, false]) {
      it(`${c.name}, weight ${trainWeight ? 'trained' : 'frozen'}: float64, finite differences and the composed reference`, async () => {
        const rng = new Rng(17 + c.shape.length);
        const d = c.shape[c.shape.length - 1];
        const size = c.shape.reduce((a, b) => a * b, 1);
        const x = asF32(rng.array(size));
        const w = asF32(c.weight === 'ones' ? new Float64Array(d).fill(1) :
          c.weight === 'small' ? rng.array(d, 0.3) : rng.array(d, 0.5).map(v => 1 + v));
        const g = asF32(rng.array(size));
        const zeroCentered = c.zeroCentered ?? false;
        const [xt, wt, gt] = [tensorOf(x, c.shape), tensorOf(w, [d]), tensorOf(g, c.shape)];
        const loss64 = (xs: Float64Array, ws: Float64Array) =>
          rmsNorm64(xs, ws, d, eps, zeroCentered).reduce((s, v, i) => s + v * g[i], 0);
        const referenceOf = (a: tf.Tensor, b: tf.Tensor) =>
          rmsNormReference(a, zeroCentered ? tf.add(b, 1) : b, eps);
        await expectNoLeakAsync(async () => {
          const y = rmsNorm(xt, wt, eps, { zeroCentered, trainWeight });
          await expectCloseAsync(y, rmsNorm64(x, w, d, eps, zeroCentered), 1e-6, 'forward', c.shape);
          const fused = trainWeight ?
            tf.grads((a: tf.Tensor, b: tf.Tensor) => tf.sum(tf.mul(rmsNorm(a, b, eps, { zeroCentered }), gt)))([xt, wt]) :
            tf.grads((a: tf.Tensor) => tf.sum(tf.mul(rmsNorm(a, wt, eps, { zeroCentered, trainWeight: false }), gt)))([xt]);
          const composed = tf.grads((a: tf.Tensor, b: tf.Tensor) => tf.sum(tf.mul(referenceOf(a, b), gt)))([xt, wt]);
          expect(fused.length).to.equal(trainWeight ? 2 : 1);
          await expectCloseAsync(fused[0], finiteDifferences(v => loss64(v, w), x), 1e-5, 'dx against finite differences', c.shape);
          await expectCloseAsync(fused[0], await composed[0].data(), 1e-5, 'dx against the composed reference', c.shape);
          if (trainWeight) {
            await expectCloseAsync(fused[1], finiteDifferences(v => loss64(x, v), w), 1e-5, 'dw against finite differences', [d]);
            await expectCloseAsync(fused[1], await composed[1].data(), 1e-5, 'dw against the composed reference', [d]);
          }
          tf.dispose([y, ...fused, ...composed]);
        });
        tf.dispose([xt, wt, gt]);
      });
    }
  }

  it('by default a frozen tf.Variable gets no gradient work and a trainable one its gradient', async () => {
    const rng = new Rng(5);
    const [rows, d] = [6, 8];
    const x = asF32(rng.array(rows * d));
    const w = asF32(rng.array(d, 0.5).map(v => 1 + v));
    const g = asF32(rng.array(rows * d));
    const [xt, gt] = [tensorOf(x, [rows, d]), tensorOf(g, [rows, d])];
    const frozen = tf.variable(tensorOf(w, [d]), false);
    const trained = tf.variable(tensorOf(w, [d]), true);
    const loss64 = (xs: Float64Array, ws: Float64Array) => rmsNorm64(xs, ws, d, eps, false).reduce((s, v, i) => s + v * g[i], 0);
    // the Sum kernels of one gradient of x, with the weight frozen or trained: the weight's gradient is one
    const sums = (weight: tf.Variable) => countKernels('Sum', () => {
      tf.dispose(tf.grads((a: tf.Tensor) => tf.sum(tf.mul(rmsNorm(a, weight, eps), gt)))([xt]));
    });
    expect(sums(frozen)).to.equal(sums(trained) - 1);
    await expectNoLeakAsync(async () => {
      const { value, grads } = tf.variableGrads(() => tf.sum(tf.mul(rmsNorm(xt, trained, eps), gt)) as tf.Scalar, [trained]);
      await expectCloseAsync(grads[trained.name], finiteDifferences(v => loss64(x, v), w), 1e-5, 'dw of a trainable variable', [d]);
      const [dx] = tf.grads((a: tf.Tensor) => tf.sum(tf.mul(rmsNorm(a, frozen, eps), gt)))([xt]);
      await expectCloseAsync(dx, finiteDifferences(v => loss64(v, w), x), 1e-5, 'dx with a frozen variable', [rows, d]);
      tf.dispose([value, grads[trained.name], dx]);
    });
    tf.dispose([xt, gt, frozen, trained]);
  });

  it('stays exact where mean(x²) nears float32\'s range (tfjs\'s Rsqrt gradient, pow(v, 1.5), overflows there)', async () => {
    const d = 8;
    const x = asF32(Array.from({ length: d }, (_, i) => (i % 3 - 1.2) * 3e18 * (1 + i / 7)));  // mean(x²) ≈ 1e37
    const w = asF32(Array.from({ length: d }, (_, i) => 1000 * (1 + 0.1 * i)));
    const g = asF32(Array.from({ length: d }, (_, i) => Math.sin(i + 1)));
    const [xt, wt, gt] = [tensorOf(x, [1, d]), tensorOf(w, [d]), tensorOf(g, [1, d])];
    // float64 closed form (finite differences cannot step at this scale): dx = r·(g·w − x̂·mean(g·w·x̂))
    const r = 1 / Math.sqrt(x.reduce((s, v) => s + v * v, 0) / d + eps);
    const projection = x.reduce((s, v, j) => s + g[j] * w[j] * v * r, 0) / d;
    const dx64 = x.map((v, j) => r * (g[j] * w[j] - v * r * projection));
    await expectNoLeakAsync(async () => {
      const [fused] = tf.grads((a: tf.Tensor) => tf.sum(tf.mul(rmsNorm(a, wt, eps, { trainWeight: false }), gt)))([xt]);
      const [composed] = tf.grads((a: tf.Tensor) => tf.sum(tf.mul(rmsNormReference(a, wt, eps), gt)))([xt]);
      await expectCloseAsync(fused, dx64, 1e-6, 'dx', [1, d]);
      const composedError = maxRelativeError(await composed.data(), dx64);
      expect(composedError, 'the composed gradient drops the mean term').to.be.above(0.1);
      tf.dispose([fused, composed]);
    });
    tf.dispose([xt, wt, gt]);
  });

  it('refuses bad arguments with one message naming the argument', () => {
    const [x, w, scalar, ints, three, gone] =
      [tf.zeros([2, 4]), tf.ones([4]), tf.scalar(1), tf.zeros([2, 4], 'int32'), tf.ones([3]), tf.ones([4])];
    gone.dispose();
    expect(() => rmsNorm(scalar, w, 1e-6)).to.throw("`rmsNorm()`: 'x' must be a float32 tensor of rank >= 1 but got a float32 tensor of shape []");
    expect(() => rmsNorm(ints, w, 1e-6)).to.throw("`rmsNorm()`: 'x' must be a float32 tensor of rank >= 1 but got a int32 tensor of shape [2, 4]");
    expect(() => rmsNorm(gone, w, 1e-6)).to.throw("`rmsNorm()`: 'x' was already disposed");
    expect(() => rmsNorm(x, [1, 1, 1, 1] as unknown as tf.Tensor, 1e-6)).to.throw("`rmsNorm()`: 'weight' must be a float32 tensor of shape [4] but got an array of length 4");
    expect(() => rmsNorm(x, gone, 1e-6)).to.throw("`rmsNorm()`: 'weight' was already disposed");
    expect(() => rmsNorm(x, three, 1e-6)).to.throw("`rmsNorm()`: 'weight' must have shape [4] but got [3] (x [2,4])");
    expect(() => rmsNorm(x, w, Number.NaN)).to.throw("`rmsNorm()`: 'epsilon' must be a finite number but got NaN (number)");
    expect(() => rmsNorm(x, w, -1)).to.throw("`rmsNorm()`: 'epsilon' must be >= 0 but got -1");
    tf.dispose([x, w, scalar, ints, three]);
  });
});
