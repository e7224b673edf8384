/** A float64 reference of MLAAttention, literally as transformers' DeepseekV3Attention / Mistral4Attention compute it (spec helper). */
import type { MLAAttentionArgs } from '../../src/layers/mla_attention.js';
import type { YarnRope } from '../../src/layers/rotary.js';
import { yarn64 } from './attention64.js';

export type Weights = Record<string, Float64Array>;
export type MLA64Args = Required<Pick<MLAAttentionArgs, 'numHeads' | 'qLoraRank' | 'kvLoraRank' | 'qkNopeHeadDim' | 'qkRopeHeadDim' |
    'vHeadDim' | 'ropeTheta' | 'ropeInterleave' | 'attentionBias' | 'normEpsilon'>> &
    Pick<MLAAttentionArgs, 'ropeScaling' | 'softmaxScale' | 'positionScaling'>;

export const MLA_BASE: MLA64Args = {
  numHeads: 2, qLoraRank: null, kvLoraRank: 5, qkNopeHeadDim: 3, qkRopeHeadDim: 4, vHeadDim: 3,
  ropeTheta: 30, ropeInterleave: true, attentionBias: false, normEpsilon: 1e-6,
};

/** float64 MLA, literally as transformers' DeepseekV3Attention (eager) computes it, one row at a time. */
export function mla64(x: Float64Array, w: Weights, a: MLA64Args, b: number, s: number, h: number): Float64Array {
  const { numHeads: nh, qkNopeHeadDim: nope, qkRopeHeadDim: rd, vHeadDim: vd, kvLoraRank: kvr } = a;
  const qk = nope + rd;
  const linear = (row: Float64Array, name: string) => {
    const W = w[`${name}.weight`];
    const out = W.length / row.length;
    const bias = w[`${name}.bias`];
    return Float64Array.from({ length: out }, (_, o) => {
      let acc = bias === undefined ? 0 : bias[o];
      for (let i = 0; i < row.length; i++) acc += W[o * row.length + i] * row[i];
      return acc;
    });
  };
  const rms = (v: Float64Array, weight: Float64Array) => {
    const inv = 1 / Math.sqrt(v.reduce((acc, t) => acc + t * t, 0) / v.length + a.normEpsilon);
    return v.map((t, i) => t * inv * weight[i]);
  };
  // apply_rotary_pos_emb(_interleave): view(d/2, 2).transpose → evens then odds, then rotate_half
  // Mistral 4: YaRN frequencies of an rd-wide rope, cos and sin times the attention factor
  const freq = a.ropeScaling ? yarn64(rd, a.ropeTheta, a.ropeScaling as YarnRope) : Array.from({ length: rd / 2 }, (_, i) => a.ropeTheta ** (-(2 * i) / rd));
  const m = a.ropeScaling ? (a.ropeScaling as YarnRope).attentionFactor : 1;
  const rope = (v: Float64Array, p: number) => {
    const r = a.ropeInterleave ? Float64Array.from({ length: rd }, (_, i) => v[i < rd / 2 ? 2 * i : 2 * (i - rd / 2) + 1]) : v;
    const out = new Float64Array(rd);
    for (let i = 0; i < rd / 2; i++) {
      const angle = p * freq[i];
      out[i] = m * (r[i] * Math.cos(angle) - r[i + rd / 2] * Math.sin(angle));
      out[i + rd / 2] = m * (r[i + rd / 2] * Math.cos(angle) + r[i] * Math.sin(angle));
    }
    return out;
  };
  // get_llama_4_attn_scale on the whole query
  const qScale = (p: number) => (a.positionScaling ?
    1 + a.positionScaling.beta * Math.log(1 + Math.floor(p / a.positionScaling.originalMaxPositionEmbeddings)) : 1);
  const softmaxScale = a.softmaxScale ?? 1 / Math.sqrt(qk);
  const result = new Float64Array(b * s * h);
  for (let bi = 0; bi < b; bi++) {
    const q: Float64Array[][] = [];   // [pos][head] → qk
    const k: Float64Array[][] = [];
    const v: Float64Array[][] = [];
    for (let p = 0; p < s; p++) {
      const row = x.slice((bi * s + p) * h, (bi * s + p + 1) * h);
      const qAll = a.qLoraRank === null ? linear(row, 'q_proj') : linear(rms(linear(row, 'q_a_proj'), w['q_a_layernorm.weight']), 'q_b_proj');
      const ckv = linear(row, 'kv_a_proj_with_mqa');
      const kRot = rope(ckv.slice(kvr), p);
      const kv = linear(rms(ckv.slice(0, kvr), w['kv_a_layernorm.weight']), 'kv_b_proj');
      q.push([]); k.push([]); v.push([]);
      for (let hh = 0; hh < nh; hh++) {
        const qh = qAll.slice(hh * qk, (hh + 1) * qk);
        q[p].push(Float64Array.from([...qh.slice(0, nope), ...rope(qh.slice(nope), p)]).map(t => t * qScale(p)));
        const kvh = kv.slice(hh * (nope + vd), (hh + 1) * (nope + vd));
        k[p].push(Float64Array.from([...kvh.slice(0, nope), ...kRot]));
        v[p].push(kvh.slice(nope));
      }
    }
    for (let i = 0; i < s; i++) {
      const merged = new Float64Array(nh * vd);
      for (let hh = 0; hh < nh; hh++) {
        const scores = Array.from({ length: i + 1 }, (_, j) => q[i][hh].reduce((acc, t, n) => acc + t * k[j][hh][n], 0) * softmaxScale);
        const m = Math.max(...scores);
        const e = scores.map(sc => Math.exp(sc - m));
        const z = e.reduce((acc, t) => acc + t, 0);
        e.forEach((ej, j) => { for (let t = 0; t < vd; t++) merged[hh * vd + t] += (ej / z) * v[j][hh][t]; });
      }
      result.set(linear(merged, 'o_proj'), (bi * s + i) * h);
    }
  }
  return result;
}

