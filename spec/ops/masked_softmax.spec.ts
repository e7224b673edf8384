/**
 * maskedSoftmax against float64 softmax(scores + mask) and tf.softmax(tf.add(...)), with the masks
 * the attention passes ([S, L] shared, [B, 1, S, L] per sample, -1e9 where blocked), rows narrower
 * and wider than a workgroup's lanes, in quads and not. Reads are awaited, so this runs on webgpu
 * too (spec/backends/webgpu/layer_ops.spec.ts), where MoEMaskedSoftmax is one program.
 */
import * as tf from '@tensorflow/tfjs-core';
import { maskedSoftmax } from '../../src/ops/masked_softmax.js';
import { expectCloseAsync, expectNoLeakAsync } from '../backends/webgpu/helpers.js';
import { asF32, Rng, tensorOf } from '../helpers/numeric.js';

/** float64 softmax(scores + mask) over rows of width l; score row r adds mask row maskRowOf(r). */
function maskedSoftmax64(scores: Float64Array, mask: Float64Array, l: number, maskRowOf: (r: number) => number): Float64Array {
  const out = new Float64Array(scores.length);
  for (let r = 0; r < scores.length / l; r++) {
    const v = Array.from({ length: l }, (_, j) => scores[r * l + j] + mask[maskRowOf(r) * l + j]);
    const m = Math.max(...v);
    const e = v.map(x => Math.exp(x - m));
    const sum = e.reduce((a, b) => a + b, 0);
    for (let j = 0; j < l; j++) out[r * l + j] = e[j] / sum;
  }
  return out;
}

describe('maskedSoftmax: softmax(scores + mask) over the last axis', () => {
  // [scores], [mask]: shared [S, L] masks (3-D grouped and 4-D views), a per-sample [B, 1, S, L] one; L 5, 8, 520, 301
  const cases: Array<[number[], number[]]> = [[[3, 4, 5], [4, 5]], [[2, 3, 4, 8], [4, 8]], [[2, 3, 4, 8], [2, 1, 4, 8]],
    [[2, 2, 520], [2, 520]], [[2, 1, 3, 301], [2, 1, 3, 301]]];
  for (const [shape, maskShape] of cases) {
    it(`scores [${shape}], mask [${maskShape}]: float64's values and tf.softmax(tf.add)'s, no leak`, async () => {
      const l = shape[shape.length - 1];
      const s = maskShape[maskShape.length - 2];
      const size = shape.reduce((a, b) => a * b, 1);
      const rng = new Rng(size);
      const scores = tensorOf(Array.from({ length: size }, () => rng.normal() * 4), shape);
      // causal: key j > query i + (a per-row offset) blocked
      const maskValues = Array.from({ length: maskShape.reduce((a, b) => a * b, 1) }, (_, i) => {
        const [row, j] = [Math.floor(i / l), i % l];
        return j > (row % s) + (row >= s ? 1 : 0) * 2 + l / 2 ? -1e9 : 0;
      });
      const mask = tensorOf(maskValues, maskShape);
      const rowsPerBatch = size / l / (maskShape.length === 4 ? maskShape[0] : 1);
      await expectNoLeakAsync(async () => {
        const p = maskedSoftmax(scores, mask);
        const ref = maskedSoftmax64(asF32(await scores.data()), asF32(maskValues), l, r => Math.floor(r / rowsPerBatch) * s + r % s);
        await expectCloseAsync(p, ref, 1e-5, 'against float64', shape);
        const composed = tf.tidy(() => tf.softmax(tf.add(scores, mask)));
        await expectCloseAsync(p, await composed.data(), 1e-5, 'against tf.softmax(tf.add)', shape);
        tf.dispose([p, composed]);
      });
      tf.dispose([scores, mask]);
    });
  }
});
