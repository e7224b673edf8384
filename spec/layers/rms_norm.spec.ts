import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { RMSNorm, rmsNorm } from '../../src/layers/rms_norm.js';
import { asF32, countKernels, expectClose, expectNoLeak, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

/** float64 RMSNorm over rows of width d. */
function rmsNorm64(x: Float64Array, w: Float64Array, d: number, eps: number): Float64Array {
  const out = new Float64Array(x.length);
  for (let r = 0; r < x.length / d; r++) {
    let ms = 0;
    for (let j = 0; j < d; j++) ms += x[r * d + j] ** 2;
    const inv = 1 / Math.sqrt(ms / d + eps);
    for (let j = 0; j < d; j++) out[r * d + j] = x[r * d + j] * inv * w[j];
  }
  return out;
}

describe('rmsNorm / RMSNorm layer', () => {
  const rng = new Rng(11);
  const d = 6;
  const x = asF32(rng.array(3 * 2 * d));
  const w = asF32(rng.array(d, 0.5).map(v => 1 + v));
  const g = asF32(rng.array(x.length));
  const eps = 1e-5;

  it('matches a float64 reference, with gradients equal to finite differences', () => {
    const xt = tensorOf(x, [3, 2, d]);
    const wt = tensorOf(w, [d]);
    const gt = tensorOf(g, [3, 2, d]);
    expectNoLeak(() => {
      const y = rmsNorm(xt, wt, eps);
      expectClose(y, rmsNorm64(x, w, d, eps), 1e-6, 'forward');
      const [dx, dw] = tf.grads((a: tf.Tensor, b: tf.Tensor) => tf.sum(tf.mul(rmsNorm(a, b, eps), gt)))([xt, wt]);
      const loss = (xs: Float64Array, ws: Float64Array) => rmsNorm64(xs, ws, d, eps).reduce((s, v, i) => s + v * g[i], 0);
      expectClose(dx, finiteDifferences(v => loss(v, w), x), 1e-5, 'dx');
      expectClose(dw, finiteDifferences(v => loss(x, v), w), 1e-5, 'dw');
      tf.dispose([y, dx, dw]);
    });
    tf.dispose([xt, wt, gt]);
  });

  it('the layer has weight "weight" [D] at ones, keeps its epsilon in getConfig, and rebuilds from it', () => {
    const layer = new RMSNorm({ name: 'norm', epsilon: 1e-5 });
    const xt = tensorOf(x, [3, 2, d]);
    const y = layer.apply(xt) as tf.Tensor;
    expect(layer.weights.map(v => v.originalName)).to.deep.equal(['norm/weight']);
    expect(Array.from(layer.weights[0].read().dataSync())).to.deep.equal(new Array(d).fill(1));
    expectClose(y, rmsNorm64(x, new Float64Array(d).fill(1), d, 1e-5), 1e-6, 'layer');
    const config = layer.getConfig();
    expect(config['epsilon']).to.equal(1e-5);
    const again = tf.serialization.SerializationMap.getMap().classNameMap['RMSNorm'];
    expect(again).to.not.equal(undefined);
    const clone = tfl.layers.Layer.fromConfig(RMSNorm, config) as RMSNorm;
    expect(clone.epsilon).to.equal(1e-5);
    tf.dispose([xt, y]);
    layer.dispose();
  });

  it('the layer trains its zero-centred weight (1 + weight) through the op, and a frozen layer\'s weight costs no gradient work', () => {
    const layer = new RMSNorm({ epsilon: eps, zeroCentered: true });
    const xt = tensorOf(x, [3, 2, d]);
    const gt = tensorOf(g, [3, 2, d]);
    tf.dispose(layer.apply(xt) as tf.Tensor);
    const small = asF32(rng.array(d, 0.3));
    tf.tidy(() => layer.setWeights([tensorOf(small, [d])]));
    const weight = layer.weights[0].read() as tf.Variable;
    const loss = () => tf.sum(tf.mul(layer.apply(xt) as tf.Tensor, gt)) as tf.Scalar;
    const onePlus = (ws: Float64Array) => ws.map(v => 1 + v);
    const loss64 = (xs: Float64Array, ws: Float64Array) => rmsNorm64(xs, onePlus(ws), d, eps).reduce((s, v, i) => s + v * g[i], 0);
    expectNoLeak(() => {
      const { value, grads } = tf.variableGrads(loss, [weight]);
      expectClose(value, [loss64(x, small)], 1e-5, 'loss');
      expectClose(grads[weight.name], finiteDifferences(v => loss64(x, v), small), 1e-5, 'dweight');
      tf.dispose([value, grads[weight.name]]);
    });
    const sumsOfDx = () => countKernels('Sum', () => tf.dispose(tf.grads((a: tf.Tensor) => tf.sum(tf.mul(layer.apply(a) as tf.Tensor, gt)))([xt])));
    const trained = sumsOfDx();
    layer.trainable = false;
    expect(sumsOfDx()).to.equal(trained - 1);
    tf.dispose([xt, gt]);
    layer.dispose();
  });

  it('rejects a bad epsilon', () => {
    expect(() => new RMSNorm({ epsilon: Number.NaN })).to.throw("`RMSNorm()`: 'epsilon' must be a finite number but got NaN (number)");
    expect(() => new RMSNorm({ epsilon: -1 })).to.throw("`RMSNorm()`: 'epsilon' must be >= 0 but got -1");
  });
});
