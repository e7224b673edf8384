/** A float64 reference of RotaryAttention (spec helper shared by the attention and LoRA specs). */
import type { RotaryAttentionArgs } from '../../src/layers/attention.js';
import type { YarnRope } from '../../src/layers/rotary.js';

export type Weights = Record<string, Float64Array>;

/** float64 reference of the layer: projections, norms, clip, rope, causal (windowed) GQA softmax attention. */
/** The layer settings the reference reads. */
export type Attention64Args = Required<Pick<RotaryAttentionArgs, 'numHeads' | 'numKeyValueHeads' | 'headDim' | 'ropeTheta' |
    'qkvBias' | 'outputBias' | 'qkNorm' | 'normEpsilon' | 'clipQKV' | 'slidingWindow'>> &
    Pick<RotaryAttentionArgs, 'sinks' | 'ropeScaling' | 'ropeInterleave'> & { rotaryDim?: number };

/**
 * float64 YaRN frequencies, written from the paper's definition: the ramp runs over the
 * dimension index between the dimensions that make betaFast and betaSlow turns over the
 * original context, 0 below (theta's frequency kept), 1 above (divided by factor).
 */
export function yarn64(d: number, theta: number, y: YarnRope): number[] {
  const turnsAt = (beta: number) => d / 2 * Math.log(y.originalMaxPositionEmbeddings / (2 * Math.PI * beta)) / Math.log(theta);
  let [lo, hi] = [turnsAt(y.betaFast), turnsAt(y.betaSlow)];
  if (y.truncate) [lo, hi] = [Math.floor(lo), Math.ceil(hi)];
  [lo, hi] = [Math.max(0, lo), Math.min(d - 1, hi)];
  const out: number[] = [];
  for (let i = 0; i < d / 2; i++) {
    const f = theta ** (-2 * i / d);
    const t = i <= lo ? 0 : i >= hi ? 1 : (i - lo) / (hi - lo);
    out.push(t * f / y.factor + (1 - t) * f);
  }
  return out;
}

export function attention64(x: Float64Array, w: Weights, a: Attention64Args,
    b: number, s: number, h: number): Float64Array {
  const { numHeads: nh, numKeyValueHeads: nkv, headDim: d } = a;
  const rep = nh / nkv;
  const linear = (row: Float64Array, name: string, out: number, bias: boolean) => {
    const y = new Float64Array(out);
    const W = w[`${name}.weight`];
    const inSize = row.length;
    for (let o = 0; o < out; o++) {
      let acc = bias ? w[`${name}.bias`][o] : 0;
      for (let i = 0; i < inSize; i++) acc += W[o * inSize + i] * row[i];
      y[o] = acc;
    }
    return y;
  };
  const rms = (v: Float64Array, off: number, len: number, weight: Float64Array) => {
    let ms = 0;
    for (let i = 0; i < len; i++) ms += v[off + i] ** 2;
    const inv = 1 / Math.sqrt(ms / len + a.normEpsilon);
    for (let i = 0; i < len; i++) v[off + i] = v[off + i] * inv * weight[i];
  };
  // partial rotary: only the first rd of each head turns, with frequencies of an rd-wide rope
  const rd = a.rotaryDim ?? d;
  const scaling = a.ropeScaling ?? null;
  const freq = scaling === null ? Array.from({ length: rd / 2 }, (_, i) => a.ropeTheta ** (-(2 * i) / rd)) : yarn64(rd, a.ropeTheta, scaling);
  const m = scaling === null ? 1 : scaling.attentionFactor;
  const rope = (v: Float64Array, off: number, p: number) => {
    const half = rd / 2;
    if (a.ropeInterleave) {
      // GPT-J / ERNIE: pair i is (2i, 2i+1), turned by frequency i (transformers' Ernie4_5 apply_rotary_pos_emb)
      for (let i = 0; i < half; i++) {
        const angle = p * freq[i];
        const x1 = v[off + 2 * i];
        const x2 = v[off + 2 * i + 1];
        v[off + 2 * i] = m * (x1 * Math.cos(angle) - x2 * Math.sin(angle));
        v[off + 2 * i + 1] = m * (x2 * Math.cos(angle) + x1 * Math.sin(angle));
      }
      return;
    }
    for (let i = 0; i < half; i++) {
      const angle = p * freq[i];
      const x1 = v[off + i];
      const x2 = v[off + i + half];
      v[off + i] = m * (x1 * Math.cos(angle) - x2 * Math.sin(angle));
      v[off + i + half] = m * (x2 * Math.cos(angle) + x1 * Math.sin(angle));
    }
  };
  const out = new Float64Array(b * s * h);
  for (let bi = 0; bi < b; bi++) {
    const q: Float64Array[] = [];
    const k: Float64Array[] = [];
    const v: Float64Array[] = [];
    for (let p = 0; p < s; p++) {
      const row = x.slice((bi * s + p) * h, (bi * s + p + 1) * h);
      const qp = linear(row, 'q_proj', nh * d, a.qkvBias);
      const kp = linear(row, 'k_proj', nkv * d, a.qkvBias);
      const vp = linear(row, 'v_proj', nkv * d, a.qkvBias);
      if (a.qkNorm === 'full') { rms(qp, 0, nh * d, w['q_norm.weight']); rms(kp, 0, nkv * d, w['k_norm.weight']); }
      if (a.clipQKV !== null) {
        for (const t of [qp, kp, vp]) for (let i = 0; i < t.length; i++) t[i] = Math.min(a.clipQKV, Math.max(-a.clipQKV, t[i]));
      }
      for (let hh = 0; hh < nh; hh++) {
        if (a.qkNorm === 'perHead') rms(qp, hh * d, d, w['q_norm.weight']);
        rope(qp, hh * d, p);
        if (a.qkNorm === 'perHeadAfterRope') rms(qp, hh * d, d, w['query_layernorm.weight']);
      }
      for (let hh = 0; hh < nkv; hh++) {
        if (a.qkNorm === 'perHead') rms(kp, hh * d, d, w['k_norm.weight']);
        rope(kp, hh * d, p);
        if (a.qkNorm === 'perHeadAfterRope') rms(kp, hh * d, d, w['key_layernorm.weight']);
      }
      q.push(qp); k.push(kp); v.push(vp);
    }
    for (let i = 0; i < s; i++) {
      const merged = new Float64Array(nh * d);
      for (let hh = 0; hh < nh; hh++) {
        const kvh = Math.floor(hh / rep);
        const keys = [];
        for (let j = 0; j <= i; j++) if (a.slidingWindow === null || i - j < a.slidingWindow) keys.push(j);
        const scores = keys.map(j => {
          let dot = 0;
          for (let t = 0; t < d; t++) dot += q[i][hh * d + t] * k[j][kvh * d + t];
          return dot / Math.sqrt(d);
        });
        // a sink joins the denominator only
        const sink = a.sinks ? w['sinks'][hh] : -Infinity;
        const top = Math.max(...scores, sink);
        const e = scores.map(sc => Math.exp(sc - top));
        const z = e.reduce((acc, val) => acc + val, 0) + Math.exp(sink - top);
        keys.forEach((j, n) => {
          for (let t = 0; t < d; t++) merged[hh * d + t] += (e[n] / z) * v[j][kvh * d + t];
        });
      }
      out.set(linear(merged, 'o_proj', h, a.outputBias), (bi * s + i) * h);
    }
  }
  return out;
}

