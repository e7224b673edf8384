/**
 * Gemma 4's routed branch as moeBlock computes it (router input norm and scale, softmax top-k
 * renormalised, per-expert scale, tanh-GELU GLU experts) against a float64 transcription of
 * transformers' Gemma4TextRouter + Gemma4TextExperts and finite differences.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { moeBlock } from '../../src/ops/moe_block.js';
import type { MoEBlockConfig, MoEBlockWeights } from '../../src/ops/types.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { Rng, asF32, expectClose, expectNoLeak, finiteDifferences, tensorOf } from '../helpers/numeric.js';
import { EPS, E, H, I, K, T, type Gemma64, NAMES, gemma64 } from './gemma4_reference64.js';

const CONFIG: MoEBlockConfig = { routing: { kind: 'softmaxTopK', topK: K, renormalize: true }, activation: { kind: 'gegluTanh' } };

function weightsOf(ts: tf.Tensor[]): MoEBlockWeights {
  const [, proj, scale, pes, W1, W2] = ts;
  return {
    router: { weight: proj as tf.Tensor2D, inputScale: scale as tf.Tensor1D, inputNormEpsilon: EPS, expertScale: pes as tf.Tensor1D },
    experts: { gateUp: W1 as tf.Tensor3D, down: W2 as tf.Tensor3D },
  };
}

describe("moeBlock on Gemma 4's routed branch (router norm and scales, tanh-GELU experts)", () => {
  for (const expertKernel of ['fused', 'reference']) {
    it(`${expertKernel}: output, routing and every gradient vs float64 and finite differences`, () => {
      const rng = new Rng(23);
      let p: Gemma64;
      do {
        p = { x: asF32(rng.array(T * H)), proj: asF32(rng.array(E * H, 3)), scale: asF32(rng.array(H, 0.2).map(v => 1 + v)),
          pes: asF32(rng.array(E, 0.2).map(v => 1 + v)), W1: asF32(rng.array(E * 2 * I * H, 0.5)), W2: asF32(rng.array(E * H * I, 0.5)) };
      } while (gemma64(p).margin < 1e-2);
      const g64 = asF32(rng.array(T * H));
      const ref = gemma64(p);
      const shapes = [[T, H], [E, H], [H], [E], [E, 2 * I, H], [E, H, I]];
      const ts = NAMES.map((n, i) => tensorOf(p[n], shapes[i]));
      const g = tensorOf(g64, [T, H]);
      expectNoLeak(() => {
        const { out, routing } = moeBlock(ts[0] as tf.Tensor2D, weightsOf(ts), CONFIG, { expertKernel, trainExpertWeights: true });
        expect(Array.from(routing.experts.dataSync())).to.deep.equal(Array.from(ref.experts));
        expectClose(out, ref.out, 1e-5, 'out');
        const grads = tf.grads((...inputs: tf.Tensor[]) => {
          const r = moeBlock(inputs[0] as tf.Tensor2D, weightsOf(inputs), CONFIG, { expertKernel, trainExpertWeights: true });
          tf.dispose([r.routing.weights, r.routing.experts, r.routing.logits]);
          return tf.sum(tf.mul(r.out, g));
        })(ts);
        NAMES.forEach((name, i) => {
          const f = (v: Float64Array) => gemma64({ ...p, [name]: v }).out.reduce((s, o, j) => s + o * g64[j], 0);
          expectClose(grads[i], finiteDifferences(f, Float64Array.from(p[name])), 1e-4, `d${name}`);
        });
        tf.dispose([out, routing.weights, routing.experts, routing.logits, ...grads]);
      });
      tf.dispose([...ts, g]);
    });
  }

  it('refuses a router input norm or an expert scale that does not fit', () => {
    const x = tf.zeros([2, 4]) as tf.Tensor2D;
    const w: MoEBlockWeights = { router: { weight: tf.zeros([3, 4]) }, experts: { gateUp: tf.zeros([3, 4, 4]), down: tf.zeros([3, 4, 2]) } };
    const bad = [tf.zeros([4]), tf.zeros([3])];
    const run = (router: Partial<MoEBlockWeights['router']>) => () => moeBlock(x, { ...w, router: { ...w.router, ...router } }, CONFIG);
    expectNoLeak(() => {
      expect(run({ expertScale: bad[0] as tf.Tensor1D })).to.throw(OpArgumentError,
          "`moeBlock()`: 'weights.router.expertScale' must have shape [3] but got [4] (E from router.weight [3,4])");
      expect(run({ inputScale: bad[1] as tf.Tensor1D, inputNormEpsilon: 1e-6 })).to.throw(OpArgumentError,
          "`routerLogits()`: 'router.inputScale' must have shape [4] but got [3] (H = 4 from router.weight [3,4])");
      expect(run({ inputScale: bad[0] as tf.Tensor1D })).to.throw(OpArgumentError,
          "`routerLogits()`: 'router.inputNormEpsilon' must be a finite number but got undefined");
    });
    tf.dispose([x, w.router.weight, w.experts.gateUp as tf.Tensor, w.experts.down as tf.Tensor, ...bad]);
  });
});
