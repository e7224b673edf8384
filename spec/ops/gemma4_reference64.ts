/**
 * Float64 JS transcription of transformers' Gemma4TextRouter + Gemma4TextExperts (the routed
 * branch of a Gemma 4 decoder layer), used with finite differences as the oracle. Sizes fixed.
 */
import { experts64 } from './expert_reference64.js';

export interface Gemma64 { x: Float64Array; proj: Float64Array; scale: Float64Array; pes: Float64Array; W1: Float64Array; W2: Float64Array }
export const NAMES = ['x', 'proj', 'scale', 'pes', 'W1', 'W2'] as const;
export const [T, H, I, E, K, EPS] = [6, 8, 3, 6, 2, 1e-6];

/** Gemma4TextRouter then Gemma4TextExperts on x [T, H], float64; also the chosen experts and the smallest top-k gap. */
export function gemma64(p: Gemma64) {
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

