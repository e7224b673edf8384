/**
 * scaledDotProductAttention against float64 (value, and gradients by finite differences) and
 * against the composed tape version it replaces in RotaryAttention / MLAAttention (the KV heads
 * tiled, scores + mask, tf.softmax, tf.grads): causal, sliding-window, chunked, packed-segment
 * [B, 1, S, S] and KV-cache [S, L] masks, grouped KV heads, a value width other than the key's, a
 * fully blocked row; no tensors left behind. Reads with await data(), so it runs on webgpu too
 * (spec/backends/webgpu/attention_core.spec.ts).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { scaledDotProductAttention } from '../../src/ops/attention_core.js';
import { attentionMask, causalMask } from '../../src/layers/attention.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { Rng, asF32, finiteDifferences } from '../helpers/numeric.js';

interface Case {
  nq: number; nkv: number; s: number; keyLen: number; dk: number; dv: number; batch: number;
  /** [S, L] or [B, 1, S, L], a constant */
  mask: () => tf.Tensor2D | tf.Tensor4D;
  /** the gradients checked against finite differences (default all three) */
  differenced?: Array<'dq' | 'dk' | 'dv'>;
}

/** float64: Σ o ⊙ w of softmax(q·kᵀ·scale + mask)·v, query head n on KV head floor(n / rep). */
function loss64(c: Case, q: Float64Array, k: Float64Array, v: Float64Array, mask: Float64Array, w: Float64Array,
    scale: number): number {
  const rep = c.nq / c.nkv;
  const perSample = c.nq / c.batch;
  let total = 0;
  for (let n = 0; n < c.nq; n++) {
    const g = Math.floor(n / rep);
    const sample = Math.floor(n / perSample);
    for (let i = 0; i < c.s; i++) {
      const scores = new Float64Array(c.keyLen);
      for (let j = 0; j < c.keyLen; j++) {
        let dot = 0;
        for (let e = 0; e < c.dk; e++) dot += q[(n * c.s + i) * c.dk + e] * k[(g * c.keyLen + j) * c.dk + e];
        const m = mask.length === c.s * c.keyLen ? mask[i * c.keyLen + j] : mask[(sample * c.s + i) * c.keyLen + j];
        // a blocked score is the mask's value: in float32, −1e9 + q·k rounds to −1e9 (so a fully
        // blocked row is uniform, as in tf.softmax); elsewhere exp(−1e9 − max) is 0 either way
        scores[j] = m <= -1e8 ? m : dot * scale + m;
      }
      const max = Math.max(...scores);
      const exps = scores.map(x => Math.exp(x - max));
      const sum = exps.reduce((a, b) => a + b, 0);
      for (let e = 0; e < c.dv; e++) {
        let o = 0;
        for (let j = 0; j < c.keyLen; j++) o += exps[j] / sum * v[(g * c.keyLen + j) * c.dv + e];
        total += o * w[(n * c.s + i) * c.dv + e];
      }
    }
  }
  return total;
}

/** The composed version the layers ran on the tape before: KV heads tiled, scores + mask, softmax. */
function composed(q: tf.Tensor3D, k: tf.Tensor3D, v: tf.Tensor3D, mask: tf.Tensor2D | tf.Tensor4D, scale: number,
    batch: number): tf.Tensor3D {
  const [nq, s] = q.shape;
  const [nkv, keyLen] = k.shape;
  const rep = nq / nkv;
  const repeat = (t: tf.Tensor3D) =>
    tf.reshape(tf.tile(tf.reshape(t, [nkv, 1, keyLen * t.shape[2]]), [1, rep, 1]), [nq, keyLen, t.shape[2]]) as tf.Tensor3D;
  const scaled = tf.mul(tf.matMul(q, repeat(k), false, true), scale);
  const scores = mask.rank === 2 ? tf.add(scaled, mask) :
    tf.reshape(tf.add(tf.reshape(scaled, [batch, nq / batch, s, keyLen]), mask), [nq, s, keyLen]);
  return tf.matMul(tf.softmax(scores), repeat(v));
}

async function check(c: Case, seed: number): Promise<void> {
  const rng = new Rng(seed);
  const scale = 1 / Math.sqrt(c.dk);
  const q64 = asF32(rng.array(c.nq * c.s * c.dk));
  const k64 = asF32(rng.array(c.nkv * c.keyLen * c.dk));
  const v64 = asF32(rng.array(c.nkv * c.keyLen * c.dv));
  const w64 = asF32(rng.array(c.nq * c.s * c.dv));
  const q = tf.tensor3d(Float32Array.from(q64), [c.nq, c.s, c.dk]);
  const k = tf.tensor3d(Float32Array.from(k64), [c.nkv, c.keyLen, c.dk]);
  const v = tf.tensor3d(Float32Array.from(v64), [c.nkv, c.keyLen, c.dv]);
  const w = tf.tensor3d(Float32Array.from(w64), [c.nq, c.s, c.dv]);
  const mask = c.mask();
  const mask64 = Float64Array.from(await mask.data());
  const before = tf.memory().numTensors;
  const lossOf = (attend: typeof scaledDotProductAttention) =>
    (a: tf.Tensor, b: tf.Tensor, d: tf.Tensor) => tf.sum(tf.mul(attend(a as tf.Tensor3D, b as tf.Tensor3D, d as tf.Tensor3D, mask, scale), w));
  const fused = tf.valueAndGrads(lossOf(scaledDotProductAttention))([q, k, v]);
  const plain = tf.valueAndGrads(lossOf((a, b, d, m, sc) => composed(a, b, d, m, sc, c.batch)))([q, k, v]);
  const value = (await fused.value.data())[0];
  const want = loss64(c, q64, k64, v64, mask64, w64, scale);
  expect(Math.abs(value - want) / Math.max(1, Math.abs(want)), `value ${value} vs ${want}`).to.be.below(1e-5);
  expect(Math.abs(value - (await plain.value.data())[0]) / Math.max(1, Math.abs(want))).to.be.below(1e-5);
  const fd = [
    finiteDifferences(x => loss64(c, x, k64, v64, mask64, w64, scale), q64),
    finiteDifferences(x => loss64(c, q64, x, v64, mask64, w64, scale), k64),
    finiteDifferences(x => loss64(c, q64, k64, x, mask64, w64, scale), v64),
  ];
  for (const [i, name] of ['dq', 'dk', 'dv'].entries()) {
    const got = await fused.grads[i].data();
    const tape = await plain.grads[i].data();
    expect(fused.grads[i].shape, `${name}: shape`).to.deep.equal([q, k, v][i].shape);
    expect(got.every(Number.isFinite), `${name}: finite`).to.equal(true);
    if ((c.differenced ?? ['dq', 'dk', 'dv']).includes(name as 'dq')) {
      const errFD = maxRelativeError(got, fd[i]);
      expect(errFD, `${name} against float64 finite differences`).to.be.below(2e-5);
    }
    const errTape = maxRelativeError(got, tape);
    expect(errTape, `${name} against the composed tape version`).to.be.below(2e-5);
  }
  tf.dispose([fused.value, ...fused.grads, plain.value, ...plain.grads]);
  expect(tf.memory().numTensors, 'numTensors after the passes').to.equal(before);
  tf.dispose([q, k, v, w, mask]);
}

describe('ops/scaledDotProductAttention', () => {
  it('one head per KV head, causal mask [S, S]', async () => {
    await check({ nq: 3, nkv: 3, s: 5, keyLen: 5, dk: 4, dv: 4, batch: 1, mask: () => causalMask(5, null) }, 1);
  });

  it('grouped KV heads (rep 2, two samples) with a sliding window', async () => {
    await check({ nq: 8, nkv: 4, s: 6, keyLen: 6, dk: 4, dv: 4, batch: 2, mask: () => causalMask(6, 3) }, 2);
  });

  it('packed segments [B, 1, S, S] (attentionMask with segment ids), grouped KV heads (rep 3)', async () => {
    const ids = tf.tensor2d([[0, 0, 0, 1, 1], [0, 0, 1, 1, 2]], [2, 5], 'int32');
    await check({ nq: 6, nkv: 2, s: 5, keyLen: 5, dk: 4, dv: 4, batch: 2, mask: () => attentionMask(5, null, ids) }, 3);
    ids.dispose();
  });

  it('chunked attention (Llama 4) and a KV cache: 2 new queries over 6 keys [S, L], value width 3 ≠ key width 4 (MLA)', async () => {
    await check({ nq: 2, nkv: 1, s: 2, keyLen: 6, dk: 4, dv: 3, batch: 1, mask: () => causalMask(2, null, 6, 4, 0, 4) }, 4);
  });

  it('a fully blocked row (−1e9 everywhere, −2e9 where two masks add) spreads evenly, with finite gradients', async () => {
    // In float32 a blocked row's scores all round to −1e9: its weights are uniform and locally
    // constant in q and k, which finite differences see and softmax's gradient (tfjs's, PyTorch's,
    // this op's) does not; so dq and dk are held to the composed version only, dv to both.
    const blocked = [[0, -1e9, -1e9], [-1e9, -1e9, -1e9], [-2e9, 0, -1e9]];
    await check({ nq: 2, nkv: 2, s: 3, keyLen: 3, dk: 2, dv: 2, batch: 1, mask: () => tf.tensor2d(blocked), differenced: ['dv'] }, 5);
  });

  it('refuses mismatched shapes, a bad mask and a bad scale, naming the argument', () => {
    const q = tf.zeros([4, 3, 2]) as tf.Tensor3D;
    const k = tf.zeros([2, 5, 2]) as tf.Tensor3D;
    const v = tf.zeros([2, 5, 6]) as tf.Tensor3D;
    const mask = tf.zeros([3, 5]) as tf.Tensor2D;
    const run = (args: Partial<{ q: unknown; k: unknown; v: unknown; mask: unknown; scale: unknown }>) => () =>
      scaledDotProductAttention((args.q ?? q) as tf.Tensor3D, (args.k ?? k) as tf.Tensor3D, (args.v ?? v) as tf.Tensor3D,
          (args.mask ?? mask) as tf.Tensor2D, (args.scale ?? 0.5) as number);
    const shapes = '(q [4,3,2], k [2,5,2], v [2,5,6])';
    const others = [tf.zeros([4, 3]), tf.zeros([2, 5, 3]), tf.zeros([2, 4, 6]), tf.zeros([3, 5, 2]), tf.zeros([3, 4]),
      tf.zeros([2, 1, 3, 5]), tf.zeros([3, 1, 3, 5]), tf.zeros([3, 5], 'int32'), tf.zeros([3, 5, 1]), tf.zeros([3, 5, 6])];
    const [q2, k3, v4, k3heads, mask34, mask4, mask4of3, maskInt, mask3d, v3heads] = others;
    expect(run({ q: q2 })).to.throw("`scaledDotProductAttention()`: 'q' must be 3-D but got shape [4,3]");
    expect(run({ k: k3 })).to.throw("`scaledDotProductAttention()`: 'k' must have q's head width 2 in its last axis but got [2,5,3] " +
        '(q [4,3,2], k [2,5,3], v [2,5,6])');
    expect(run({ v: v4 })).to.throw("`scaledDotProductAttention()`: 'v' must be [2,5,*] like k's heads and keys but got [2,4,6] " +
        '(q [4,3,2], k [2,5,2], v [2,4,6])');
    expect(run({ k: k3heads, v: v3heads })).to.throw("`scaledDotProductAttention()`: k's 3 heads must divide q's 4 heads");
    expect(run({ mask: mask34 })).to.throw(`\`scaledDotProductAttention()\`: 'mask' must be [S, L] = [3,5] or [B, 1, S, L] with B dividing k's 2 heads but got [3,4] ${shapes}`);
    expect(run({ mask: mask4of3 })).to.throw("'mask' must be [S, L] = [3,5] or [B, 1, S, L] with B dividing k's 2 heads but got [3,1,3,5]");
    expect(run({ mask: mask3d })).to.throw("`scaledDotProductAttention()`: 'mask' must be a 2-D [S, L] or 4-D [B, 1, S, L] float32 tensor but got a float32 tensor of shape [3, 5, 1]");
    expect(run({ mask: [[0]] })).to.throw("'mask' must be a 2-D [S, L] or 4-D [B, 1, S, L] float32 tensor but got an array of length 1");
    expect(run({ mask: maskInt })).to.throw("`scaledDotProductAttention()`: 'mask' must be float32 but got int32 (shape [3,5])");
    expect(run({ scale: Number.NaN })).to.throw("`scaledDotProductAttention()`: 'scale' must be a finite number but got NaN (number)");
    expect(run({ scale: 0 })).to.throw("`scaledDotProductAttention()`: 'scale' must be > 0 but got 0");
    // a [B, 1, S, L] mask with B dividing the KV heads is taken
    const out = scaledDotProductAttention(q, k, v, mask4 as tf.Tensor4D, 0.5);
    expect(out.shape).to.deep.equal([4, 3, 6]);
    tf.dispose([q, k, v, mask, out, ...others]);
  });
});
