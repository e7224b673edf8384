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
import { experts64 } from './expert_reference64.js';

interface Gemma64 { x: Float64Array; proj: Float64Array; scale: Float64Array; pes: Float64Array; W1: Float64Array; W2: Float64Array }
const NAMES = ['x', 'proj', 'scale', 'pes', 'W1', 'W2'] as const;
const [T, H, I, E, K, EPS] = [6, 8, 3, 6, 2, 1e-6];

/** Gemma4TextRouter then Gemma4TextExperts on x [T, H], float64; also the chosen experts and the smallest top-k gap. */
function gemma64(p: Gemma64) {
  const experts = new Int32Array(T * K);
  const weights = new Float64Array(T * K);
  let margin = Infinity;
  for (let t = 0; t < T; t++) {
    const row = p.x.subarray(t * H, (t + 1) * H);
    const inv = 1 / Math.sqrt(row.reduce((s, v) => s + v * v, 0) / H + EPS);
    const xs = Array.from(row, (v, i) => v * inv * p.scale[i] * H ** -0.5);
    const z = Array.from({ length: E }, (_, e) => xs.reduce((s, v, i) => s + v * p.proj[e * H + i], 0));
    const m = Math.max(...z);
    const ex = z.map(v => Math.exp(v - m));
    const sum = ex.reduce((a, v) => a + v, 0);
    const prob = ex.map(v => v / sum);
    const order = prob.map((_, e) => e).sort((a, b) => prob[b] - prob[a] || a - b);
    margin = Math.min(margin, prob[order[K - 1]] - prob[order[K]]);
    const top = order.slice(0, K);
    const denom = top.reduce((a, e) => a + prob[e], 0);
    top.forEach((e, k) => { experts[t * K + k] = e; weights[t * K + k] = (prob[e] / denom) * p.pes[e]; });
  }
  const out = experts64({ T, H, I, E, K, layout: 'outIn', activation: { kind: 'gegluTanh' }, experts, weights, x: p.x,
    W1: p.W1, W2: p.W2, lora1: [], lora2: [] });
  return { out, experts, margin };
}

const CONFIG: MoEBlockConfig = { routing: { kind: 'softmaxTopK', topK: K, renormalize: true }, activation: { kind: 'gegluTanh' } };

function weightsOf(ts: tf.Tensor[]): MoEBlockWeights {
  const [, proj, scale, pes, W1, W2] = ts;
  return {
    router: { weight: proj as tf.Tensor2D, inputNorm: { scale: scale as tf.Tensor1D, epsilon: EPS }, expertScale: pes as tf.Tensor1D },
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
      expect(run({ inputNorm: { scale: bad[1] as tf.Tensor1D, epsilon: 1e-6 } })).to.throw(OpArgumentError,
          "`routerLogits()`: 'router.inputNorm.scale' must have shape [4] but got [3] (H = 4 from router.weight [3,4])");
      expect(run({ inputNorm: { scale: bad[0] as tf.Tensor1D, epsilon: NaN } })).to.throw(OpArgumentError,
          "`routerLogits()`: 'router.inputNorm.epsilon' must be a finite number but got NaN");
      expect(run({ inputNorm: 3 as never })).to.throw(OpArgumentError,
          "`routerLogits()`: 'router.inputNorm' must be {scale, epsilon} but got 3 (number)");
    });
    tf.dispose([x, w.router.weight, w.experts.gateUp as tf.Tensor, w.experts.down as tf.Tensor, ...bad]);
  });
});
