/**
 * softmaxGrad against float64 (p ⊙ (dP − Σ dP ⊙ p) over the last axis) and against tfjs's own
 * gradient of tf.softmax, for rows narrower and wider than a workgroup's lanes, in quads and not.
 * Reads are awaited, so this runs on webgpu too (spec/backends/webgpu/layer_ops.spec.ts), where
 * MoESoftmaxGrad is one program.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { softmaxGrad } from '../../src/ops/softmax_grad.js';
import { expectCloseAsync, expectNoLeakAsync } from '../backends/webgpu/helpers.js';
import { asF32, Rng, tensorOf } from '../helpers/numeric.js';

/** float64 p ⊙ (dP − Σ_j dP ⊙ p) over rows of width l. */
function softmaxGrad64(p: Float64Array, dP: Float64Array, l: number): Float64Array {
  const out = new Float64Array(p.length);
  for (let r = 0; r < p.length / l; r++) {
    let s = 0;
    for (let j = 0; j < l; j++) s += dP[r * l + j] * p[r * l + j];
    for (let j = 0; j < l; j++) out[r * l + j] = p[r * l + j] * (dP[r * l + j] - s);
  }
  return out;
}

describe('softmaxGrad: softmax\'s input gradient from its output', () => {
  // L 5 (elements), 8 (quads), 520 (quads, more than 64 lanes' worth), 301 (elements, wide)
  for (const shape of [[3, 5], [2, 3, 8], [2, 520], [4, 301]]) {
    it(`[${shape}]: float64's values and tf.softmax's own gradient, no leak`, async () => {
      const l = shape[shape.length - 1];
      const size = shape.reduce((a, b) => a * b, 1);
      const rng = new Rng(shape.length * 31 + l);
      const logits = tensorOf(Array.from({ length: size }, () => rng.normal() * 3), shape);
      const dP = tensorOf(Array.from({ length: size }, () => rng.normal()), shape);
      const p = tf.softmax(logits);
      await expectNoLeakAsync(async () => {
        const dS = softmaxGrad(p, dP);
        const ref = softmaxGrad64(asF32(await p.data()), asF32(await dP.data()), l);
        await expectCloseAsync(dS, ref, 1e-5, 'against float64', shape);
        const viaTape = tf.grad((x: tf.Tensor) => tf.sum(tf.mul(tf.softmax(x), dP)))(logits);
        await expectCloseAsync(dS, await viaTape.data(), 1e-4, 'against tf.softmax\'s gradient', shape);
        tf.dispose([dS, viaTape]);
      });
      tf.dispose([logits, dP, p]);
    });
  }
});
