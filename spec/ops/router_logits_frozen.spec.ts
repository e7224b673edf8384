/**
 * routerLogits with a frozen router (weight and bias non-trainable tf.Variables, as LoRA leaves
 * them) against float64 and finite differences: the logits and the gradients of x and of every
 * adapter's A and B, with a bias, a dropout mask, Gemma 4's input scale. On webgpu that router runs
 * as one loraLinear op (issue 15), so it is also checked against the composed path a trainable
 * weight takes. Reads with `await data()` so the spec runs on webgpu too (spec/backends/webgpu/).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { loraDropoutMask } from '../../src/ops/lora/dropout.js';
import { routerLogits } from '../../src/ops/lora/router_logits.js';
import type { RouterWeights } from '../../src/ops/types.js';
import { asF32, expectClose, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

const [T, H, E] = [5, 7, 4];
interface Adapter64 { A: Float64Array; B: Float64Array; r: number; s: number; mask: Float64Array | null }

/** float64 logits[t, e] = Σ_h x̂[t,h]·W[e,h] + b[e] + Σ_a s_a·Σ_j (Σ_h x̂[t,h]·m_a[t,h]·A_a[j,h])·B_a[e,j], x̂ the (scaled) input. */
function logits64(x: Float64Array, W: Float64Array, b: Float64Array | null, adapters: Adapter64[], scale: Float64Array | null, eps: number): Float64Array {
  const xs = Float64Array.from(x);
  if (scale !== null) {
    for (let t = 0; t < T; t++) {
      let ms = 0;
      for (let h = 0; h < H; h++) ms += x[t * H + h] ** 2 / H;
      for (let h = 0; h < H; h++) xs[t * H + h] = x[t * H + h] / Math.sqrt(ms + eps) * scale[h] * H ** -0.5;
    }
  }
  const out = new Float64Array(T * E);
  for (let t = 0; t < T; t++) {
    for (let e = 0; e < E; e++) {
      let acc = b ? b[e] : 0;
      for (let h = 0; h < H; h++) acc += xs[t * H + h] * W[e * H + h];
      for (const a of adapters) {
        for (let j = 0; j < a.r; j++) {
          let low = 0;
          for (let h = 0; h < H; h++) low += xs[t * H + h] * (a.mask ? a.mask[t * H + h] : 1) * a.A[j * H + h];
          acc += a.s * low * a.B[e * a.r + j];
        }
      }
      out[t * E + e] = acc;
    }
  }
  return out;
}

const read = async (t: tf.Tensor) => Float64Array.from(await t.data());

describe('ops/routerLogits with a frozen router weight', () => {
  const cases = [
    { label: 'two adapters', bias: false, dropout: false, inputScale: false },
    { label: 'two adapters, a frozen bias', bias: true, dropout: false, inputScale: false },
    { label: 'two adapters, the first with dropout', bias: false, dropout: true, inputScale: false },
    { label: 'one adapter, Gemma 4\'s input scale', bias: false, dropout: false, inputScale: true },
  ];
  for (const c of cases) {
    it(`${c.label}: logits and the gradients of x, A and B equal float64 (finite differences) and the trainable-weight path`, async () => {
      const rng = new Rng(31);
      const x = asF32(rng.array(T * H));
      const W = asF32(rng.array(E * H));
      const b = c.bias ? asF32(rng.array(E)) : null;
      const scale = c.inputScale ? asF32(rng.array(H)) : null;
      const g = asF32(rng.array(T * E));
      const specs = (c.inputScale ? [[2, 1.5]] : [[2, 1.5], [3, -0.75]]).map(([r, s]) => ({ r, s }));
      const seeds = specs.map((_, a) => (c.dropout && a === 0 ? 7 : undefined));
      const masks = await Promise.all(seeds.map(async seed => {
        if (seed === undefined) return null;
        const m = loraDropoutMask([T, H], 0.4, seed);
        const data = await read(m);
        m.dispose();
        return data;
      }));
      const adapters64: Adapter64[] = specs.map(({ r, s }, a) => ({ A: asF32(rng.array(r * H)), B: asF32(rng.array(E * r)), r, s, mask: masks[a] }));

      const xt = tensorOf(x, [T, H]) as tf.Tensor2D;
      const frozenW = tf.variable(tensorOf(W, [E, H]), false) as tf.Variable<tf.Rank.R2>;
      const trainableW = tf.variable(tensorOf(W, [E, H]), true) as tf.Variable<tf.Rank.R2>;
      const frozenB = b === null ? undefined : tf.variable(tensorOf(b, [E]), false) as tf.Variable<tf.Rank.R1>;
      const scaleT = scale === null ? undefined : tensorOf(scale, [H]) as tf.Tensor1D;
      const gt = tensorOf(g, [T, E]);
      const factors = adapters64.flatMap(a => [tensorOf(a.A, [a.r, H]), tensorOf(a.B, [E, a.r])]) as tf.Tensor2D[];
      const routerOf = (weight: tf.Tensor2D, fs: tf.Tensor[]): RouterWeights => ({
        weight, ...(frozenB ? { bias: frozenB } : {}),
        ...(scaleT ? { inputScale: scaleT, inputNormEpsilon: 1e-6 } : {}),
        lora: specs.map(({ s }, a) => ({ A: fs[2 * a] as tf.Tensor2D, B: fs[2 * a + 1] as tf.Tensor2D, scaling: s,
          ...(seeds[a] === undefined ? {} : { dropout: { p: 0.4, seed: seeds[a] } }) })),
      });
      const inputs = [xt, ...factors];
      const loss = (weight: tf.Tensor2D) => (...v: tf.Tensor[]) => tf.sum(tf.mul(routerLogits(v[0] as tf.Tensor2D, routerOf(weight, v.slice(1))), gt)) as tf.Scalar;

      const before = tf.memory().numTensors;
      const y = routerLogits(xt, routerOf(frozenW, factors));
      const frozen = tf.grads(loss(frozenW))(inputs);
      const trainable = tf.grads(loss(trainableW))(inputs);
      expect(tf.memory().numTensors - before, 'only the logits and two sets of gradients are left').to.equal(1 + 2 * inputs.length);

      expectClose(await read(y), logits64(x, W, b, adapters64, scale, 1e-6), 1e-5, 'logits vs float64');
      const lossOf = (xs: Float64Array, as: Adapter64[]) => logits64(xs, W, b, as, scale, 1e-6).reduce((acc, v, i) => acc + v * g[i], 0);
      const references = [
        finiteDifferences(p => lossOf(p, adapters64), x),
        ...adapters64.flatMap((ad, a) => [
          finiteDifferences(p => lossOf(x, adapters64.map((o, k) => (k === a ? { ...o, A: p } : o))), ad.A),
          finiteDifferences(p => lossOf(x, adapters64.map((o, k) => (k === a ? { ...o, B: p } : o))), ad.B),
        ]),
      ];
      const names = ['x', 'A0', 'B0', 'A1', 'B1'];
      for (let i = 0; i < inputs.length; i++) {
        expect(frozen[i].shape, `d ${names[i]} shape`).to.deep.equal(inputs[i].shape);
        expectClose(await read(frozen[i]), references[i], 1e-4, `d ${names[i]} vs finite differences`);
        expectClose(await read(frozen[i]), await read(trainable[i]), 1e-5, `d ${names[i]} vs the trainable-weight path`);
      }
      tf.dispose([y, ...frozen, ...trainable, xt, frozenW, trainableW, gt, ...factors]);
      frozenB?.dispose();
      scaleT?.dispose();
    });
  }
});
