/**
 * materializeGrouped (the fused experts' 'materialize' mode) against a float64 W + Σ s·B_e·A_e
 * and its gradients w.r.t. A and B by central finite differences, on both weight layouts.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { materializeGrouped } from '../../src/ops/experts/materialize_grouped.js';
import type { LoRAFactors } from '../../src/ops/types.js';
import { Rng, asF32, expectClose, expectNoLeak, finiteDifferences, tensorOf } from '../helpers/numeric.js';

interface Adapter64 { A: Float64Array; B: Float64Array; r: number; s: number }

/** float64 W_eff in W's layout; A [r·E, in] expert-major rows, B [out, r·E] rank-major columns. */
function weff64(W: Float64Array, e: number, out: number, inSize: number, adapters: Adapter64[], transposed: boolean): Float64Array {
  const res = Float64Array.from(W);
  for (const { A, B, r, s } of adapters) {
    for (let x = 0; x < e; x++) {
      for (let o = 0; o < out; o++) {
        for (let i = 0; i < inSize; i++) {
          let d = 0;
          for (let j = 0; j < r; j++) d += B[o * r * e + j * e + x] * A[(x * r + j) * inSize + i];
          const at = transposed ? x * inSize * out + i * out + o : x * out * inSize + o * inSize + i;
          res[at] += s * d;
        }
      }
    }
  }
  return res;
}

describe('materializeGrouped', () => {
  for (const transposed of [false, true]) {
    it(`W + Σ s·B_e·A_e and dA, dB (finite differences)${transposed ? ', transposed layout' : ''}; W gets no gradient`, () => {
      const rng = new Rng(transposed ? 7 : 3);
      const e = 3, out = 5, inSize = 4;
      const shape = transposed ? [e, inSize, out] : [e, out, inSize];
      const W = asF32(rng.array(e * out * inSize));
      const adapters: Adapter64[] = [2, 1].map((r, k) => ({
        A: asF32(rng.array(r * e * inSize)), B: asF32(rng.array(out * r * e)), r, s: 0.75 + k,
      }));
      const G = asF32(rng.array(e * out * inSize));
      const expected = weff64(W, e, out, inSize, adapters, transposed);
      const lossOf = (list: Adapter64[]) => weff64(W, e, out, inSize, list, transposed).reduce((s, v, i) => s + v * G[i], 0);
      const expectedGrads = adapters.flatMap((f, k) => {
        const swap = (part: 'A' | 'B') => (v: Float64Array) => lossOf(adapters.map((g, j) => (j === k ? { ...g, [part]: v } : g)));
        return [finiteDifferences(swap('A'), f.A), finiteDifferences(swap('B'), f.B)];
      });
      expectNoLeak(() => {
        tf.tidy(() => {
          const Wt = tensorOf(W, shape) as tf.Tensor3D;
          const factors: LoRAFactors[] = adapters.map(f => ({
            A: tensorOf(f.A, [f.r * e, inSize]) as tf.Tensor2D, B: tensorOf(f.B, [out, f.r * e]) as tf.Tensor2D, scaling: f.s,
          }));
          expectClose(materializeGrouped(Wt, factors, transposed), expected, 1e-6, 'W_eff');
          const inputs = factors.flatMap(f => [f.A, f.B]);
          const grads = tf.grads((...ts: tf.Tensor[]) => tf.sum(tf.mul(materializeGrouped(Wt,
              factors.map((f, k) => ({ ...f, A: ts[2 * k] as tf.Tensor2D, B: ts[2 * k + 1] as tf.Tensor2D })), transposed),
          tensorOf(G, shape))))(inputs);
          grads.forEach((g, i) => {
            expect(g.shape, `grad ${i}`).to.deep.equal(inputs[i].shape);
            expectClose(g, expectedGrads[i], 1e-5, `grad ${i}`);
          });
        });
      });
      // W is captured, not an input: asking for its gradient finds no path to it (tfjs itself
      // leaves the forward's output behind when it throws this, hence outside expectNoLeak)
      tf.tidy(() => {
        const Wt = tensorOf(W, shape) as tf.Tensor3D;
        const factors: LoRAFactors[] = adapters.map(f => ({
          A: tensorOf(f.A, [f.r * e, inSize]) as tf.Tensor2D, B: tensorOf(f.B, [out, f.r * e]) as tf.Tensor2D, scaling: f.s,
        }));
        expect(() => tf.grad(() => tf.sum(materializeGrouped(Wt, factors, transposed)))(Wt)).to.throw(/Cannot compute gradient/);
      });
    });
  }
});
