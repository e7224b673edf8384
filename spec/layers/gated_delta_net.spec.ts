/**
 * GatedDeltaNet (Qwen3-Next's linear attention) against a float64 transcription of transformers'
 * Qwen3NextGatedDeltaNet (fix_query_key_value_ordering, the causal conv1d, the recurrent gated
 * delta rule, Qwen3NextRMSNormGated), with gradients against finite differences; refusals of what
 * it does not implement.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { KVCache } from '../../src/generate/kv_cache.js';
import { GatedDeltaNet, gatedDeltaNetWeightShapes, type GatedDeltaNetArgs } from '../../src/layers/gated_delta_net.js';
import { withSequenceContext } from '../../src/layers/sequence_context.js';
import { asF32, expectClose, expectNoLeak, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

type Weights = Record<string, Float64Array>;
const ARGS = { numKeyHeads: 2, numValueHeads: 4, keyHeadDim: 3, valueHeadDim: 2, convKernel: 3, normEpsilon: 1e-6 } satisfies GatedDeltaNetArgs;

const silu = (v: number) => v / (1 + Math.exp(-v));
const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));
const softplus = (v: number) => Math.log1p(Math.exp(v));

/** float64 Qwen3NextGatedDeltaNet.forward (no cache, no mask) on x [B, S, H], literally. */
function deltaNet64(x: Float64Array, w: Weights, b: number, s: number, h: number): Float64Array {
  const { numKeyHeads: nk, numValueHeads: nv, keyHeadDim: dk, valueHeadDim: dv, convKernel: kw } = ARGS;
  const r = nv / nk;
  const per = 2 * dk + 2 * r * dv;
  const C = 2 * nk * dk + nv * dv;
  const linear = (W: Float64Array, row: Float64Array) => Float64Array.from({ length: W.length / row.length }, (_, o) =>
    row.reduce((acc, t, i) => acc + W[o * row.length + i] * t, 0));
  const out = new Float64Array(b * s * h);
  for (let bi = 0; bi < b; bi++) {
    const mixed: Float64Array[] = [];
    const zs: Float64Array[] = [];
    const bs: Float64Array[] = [];
    const as: Float64Array[] = [];
    for (let t = 0; t < s; t++) {
      const row = x.slice((bi * s + t) * h, (bi * s + t + 1) * h);
      const qkvz = linear(w['in_proj_qkvz.weight'], row);
      const ba = linear(w['in_proj_ba.weight'], row);
      const q: number[] = []; const k: number[] = []; const v: number[] = []; const z: number[] = [];
      const bb: number[] = []; const aa: number[] = [];
      for (let g = 0; g < nk; g++) {
        const grp = qkvz.slice(g * per, (g + 1) * per);
        q.push(...grp.slice(0, dk));
        k.push(...grp.slice(dk, 2 * dk));
        v.push(...grp.slice(2 * dk, 2 * dk + r * dv));
        z.push(...grp.slice(2 * dk + r * dv));
        bb.push(...ba.slice(g * 2 * r, g * 2 * r + r));
        aa.push(...ba.slice(g * 2 * r + r, (g + 1) * 2 * r));
      }
      mixed.push(Float64Array.from([...q, ...k, ...v]));
      zs.push(Float64Array.from(z)); bs.push(Float64Array.from(bb)); as.push(Float64Array.from(aa));
    }
    // nn.Conv1d(groups=C, padding=K−1) then [:, :, :S], silu
    const conv = mixed.map((_, t) => Float64Array.from({ length: C }, (_, c) => {
      let acc = 0;
      for (let j = 0; j < kw; j++) {
        const src = t - (kw - 1) + j;
        if (src >= 0) acc += w['conv1d.weight'][c * kw + j] * mixed[src][c];
      }
      return silu(acc);
    }));
    const states = Array.from({ length: nv }, () => Array.from({ length: dk }, () => new Float64Array(dv)));
    for (let t = 0; t < s; t++) {
      const outRow = new Float64Array(nv * dv);
      for (let hv = 0; hv < nv; hv++) {
        const hk = Math.floor(hv / r);    // repeat_interleave
        const l2 = (v: Float64Array) => { const inv = 1 / Math.sqrt(v.reduce((a, e) => a + e * e, 0) + 1e-6); return v.map(e => e * inv); };
        const q = l2(conv[t].slice(hk * dk, (hk + 1) * dk)).map(e => e / Math.sqrt(dk));
        const k = l2(conv[t].slice(nk * dk + hk * dk, nk * dk + (hk + 1) * dk));
        const v = conv[t].slice(2 * nk * dk + hv * dv, 2 * nk * dk + (hv + 1) * dv);
        const beta = sigmoid(bs[t][hv]);
        const g = -Math.exp(w['A_log'][hv]) * softplus(as[t][hv] + w['dt_bias'][hv]);
        const S = states[hv];
        for (let i = 0; i < dk; i++) for (let j = 0; j < dv; j++) S[i][j] *= Math.exp(g);
        const delta = Float64Array.from({ length: dv }, (_, j) => (v[j] - S.reduce((a, rowS, i) => a + rowS[j] * k[i], 0)) * beta);
        for (let i = 0; i < dk; i++) for (let j = 0; j < dv; j++) S[i][j] += k[i] * delta[j];
        const o = Float64Array.from({ length: dv }, (_, j) => S.reduce((a, rowS, i) => a + rowS[j] * q[i], 0));
        // Qwen3NextRMSNormGated: rms(o)·weight·silu(z)
        const inv = 1 / Math.sqrt(o.reduce((a, e) => a + e * e, 0) / dv + ARGS.normEpsilon);
        for (let j = 0; j < dv; j++) outRow[hv * dv + j] = o[j] * inv * w['norm.weight'][j] * silu(zs[t][hv * dv + j]);
      }
      out.set(linear(w['out_proj.weight'], outRow), (bi * s + t) * h);
    }
  }
  return out;
}

function setup(seed: number, b = 2, s = 5, h = 6) {
  const layer = new GatedDeltaNet({ ...ARGS, name: 'lin' });
  layer.apply(tfl.input({ shape: [null, h] }));
  const rng = new Rng(seed);
  const w: Weights = {};
  for (const v of layer.weights) {
    const name = v.originalName.slice('lin/'.length);
    const size = v.shape.reduce((p: number, q) => p * (q as number), 1);
    w[name] = asF32(name === 'norm.weight' ? rng.array(size, 0.3).map(t => 1 + t) : rng.array(size, 0.6));
    v.write(tensorOf(w[name], v.shape as number[]));
  }
  return { layer, w, x: asF32(rng.array(b * s * h)), b, s, h };
}

describe('GatedDeltaNet', () => {
  it('forward matches a float64 Qwen3NextGatedDeltaNet (grouped projections, conv, gated delta rule, gated norm)', () => {
    const { layer, w, x, b, s, h } = setup(3);
    const xt = tensorOf(x, [b, s, h]);
    expectNoLeak(() => {
      const y = layer.apply(xt) as tf.Tensor;
      expect(y.shape).to.deep.equal([b, s, h]);
      expectClose(y, deltaNet64(x, w, b, s, h), 1e-5, 'out');
      y.dispose();
    });
    xt.dispose();
    layer.dispose();
  });

  it('gradients w.r.t. the input and every weight equal finite differences', () => {
    const { layer, w, x, b, s, h } = setup(4, 1, 4, 6);
    const g = asF32(new Rng(5).array(b * s * h));
    const xt = tensorOf(x, [b, s, h]);
    const gt = tensorOf(g, [b, s, h]);
    const loss64 = (xs: Float64Array, ws: Weights) => deltaNet64(xs, ws, b, s, h).reduce((acc, v, i) => acc + v * g[i], 0);
    expectNoLeak(() => {
      const f = (input: tf.Tensor) => tf.sum(tf.mul(layer.apply(input) as tf.Tensor, gt)) as tf.Scalar;
      const dx = tf.grad(f)(xt);
      expectClose(dx, finiteDifferences(v => loss64(v, w), x), 1e-4, 'dx');
      const { value, grads } = tf.variableGrads(() => f(xt), layer.weights.map(v => v.read() as tf.Variable));
      for (const v of layer.weights) {
        const name = v.originalName.slice('lin/'.length);
        expectClose(grads[(v.read() as tf.Variable).name], finiteDifferences(p => loss64(x, { ...w, [name]: p }), w[name]), 1e-4, `d ${name}`);
      }
      tf.dispose([dx, value, ...Object.values(grads)]);
    });
    tf.dispose([xt, gt]);
    layer.dispose();
  });

  it('names its weights like HF and round-trips its config', () => {
    const { layer } = setup(1);
    expect(layer.weights.map(v => `${v.originalName}:${v.shape}`).sort()).to.deep.equal([
      'lin/A_log:4', 'lin/conv1d.weight:20,1,3', 'lin/dt_bias:4', 'lin/in_proj_ba.weight:8,6',
      'lin/in_proj_qkvz.weight:28,6', 'lin/norm.weight:2', 'lin/out_proj.weight:6,8']);
    expect(gatedDeltaNetWeightShapes(ARGS, 6).map(e => e.name)).to.have.length(7);
    const config = layer.getConfig();
    const clone = tfl.layers.Layer.fromConfig(GatedDeltaNet, config) as GatedDeltaNet;
    expect(clone.getConfig()).to.deep.equal(config);
    layer.dispose();
  });

  it('rejects bad arguments, packed samples and a KV cache', () => {
    expect(() => new GatedDeltaNet({ ...ARGS, numKeyHeads: 0 })).to.throw("`GatedDeltaNet()`: 'numKeyHeads' must be >= 1 but got 0");
    expect(() => new GatedDeltaNet({ ...ARGS, numValueHeads: 3 })).to.throw(
        "`GatedDeltaNet()`: 'numValueHeads' must be a multiple of numKeyHeads (2) but got 3");
    expect(() => new GatedDeltaNet({ ...ARGS, keyHeadDim: 1.5 })).to.throw("`GatedDeltaNet()`: 'keyHeadDim' must be an integer");
    expect(() => new GatedDeltaNet({ ...ARGS, valueHeadDim: 0 })).to.throw("`GatedDeltaNet()`: 'valueHeadDim' must be >= 1 but got 0");
    expect(() => new GatedDeltaNet({ ...ARGS, convKernel: 0 })).to.throw("`GatedDeltaNet()`: 'convKernel' must be >= 1 but got 0");
    expect(() => new GatedDeltaNet({ ...ARGS, normEpsilon: NaN })).to.throw("`GatedDeltaNet()`: 'normEpsilon' must be a finite number");
    const layer = new GatedDeltaNet(ARGS);
    expect(() => layer.build([null, null, null])).to.throw("`GatedDeltaNet.build()`: the input's last dimension must be known but got shape [,,]");
    layer.apply(tfl.input({ shape: [null, 6] }));
    expect(() => layer.apply(tf.zeros([4, 6]))).to.throw("`GatedDeltaNet.call()`: the input must be [batch, seq, hidden] but got shape [4,6]");
    const x = tf.zeros([1, 3, 6]);
    const segmentIds = tf.tensor2d([[1, 1, 2]], [1, 3], 'int32');
    expect(() => withSequenceContext({ segmentIds }, () => layer.apply(x))).to.throw(
        "`GatedDeltaNet.call()`: packed samples ('segmentIds') are not supported: the DeltaNet state would flow from one sample into the next");
    const cache = new KVCache();
    expect(() => withSequenceContext({ kvCache: cache }, () => layer.apply(x))).to.throw(
        '`GatedDeltaNet.call()`: generation with a KV cache is not implemented for gated DeltaNet layers (their recurrent and conv states are not cached)');
    tf.dispose([x, segmentIds]);
    layer.dispose();
  });
});
