/**
 * Float64 JS transcription of transformers' Llama4TextMoe (router, top-k sigmoid on the expert's
 * input, fused SwiGLU experts, shared expert), used with finite differences as the oracle.
 */
import { Rng, asF32 } from '../helpers/numeric.js';
import { experts64 } from './expert_reference64.js';

export interface Params64 {
  x: Float64Array;       // [T, H]
  router: Float64Array;  // [E, H]
  W1: Float64Array;      // [E, 2I, H]
  W2: Float64Array;      // [E, H, I]
  sg: Float64Array;      // shared gate [Is, H]
  su: Float64Array;      // shared up [Is, H]
  sd: Float64Array;      // shared down [H, Is]
}
export const NAMES = ['x', 'router', 'W1', 'W2', 'sg', 'su', 'sd'] as const;

export interface Dims { T: number; H: number; I: number; E: number; K: number; Is: number }

const silu = (v: number) => v / (1 + Math.exp(-v));

/**
 * Llama4TextMoe.forward in float64: logits = x·Wgᵀ; the K largest logits (ties to the lower
 * index); s = sigmoid(logit); out = shared(x) + Σ_k expert_k(s_k·x). Also returns the routing and
 * the smallest gap between the K-th and (K+1)-th logit.
 */
export function llama4Block64(p: Params64, d: Dims) {
  const { T, H, I, E, K, Is } = d;
  const experts = new Int32Array(T * K);
  const scaled = new Float64Array(T * K * H);
  let margin = Infinity;
  for (let t = 0; t < T; t++) {
    const z = Array.from({ length: E }, (_, e) => {
      let v = 0;
      for (let i = 0; i < H; i++) v += p.x[t * H + i] * p.router[e * H + i];
      return v;
    });
    const order = z.map((_, e) => e).sort((a, b) => z[b] - z[a] || a - b);
    if (K < E) margin = Math.min(margin, z[order[K - 1]] - z[order[K]]);
    for (let k = 0; k < K; k++) {
      const e = order[k];
      experts[t * K + k] = e;
      const s = 1 / (1 + Math.exp(-z[e]));
      for (let i = 0; i < H; i++) scaled[(t * K + k) * H + i] = s * p.x[t * H + i];
    }
  }
  const routed = experts64({
    T: T * K, H, I, E, K: 1, layout: 'outIn', activation: { kind: 'swiglu' }, experts,
    weights: new Float64Array(T * K).fill(1), x: scaled, W1: p.W1, W2: p.W2, lora1: [], lora2: [],
  });
  const out = new Float64Array(T * H);
  for (let t = 0; t < T; t++) {
    const a = new Float64Array(Is);
    for (let j = 0; j < Is; j++) {
      let g = 0;
      let u = 0;
      for (let i = 0; i < H; i++) {
        g += p.sg[j * H + i] * p.x[t * H + i];
        u += p.su[j * H + i] * p.x[t * H + i];
      }
      a[j] = silu(g) * u;
    }
    for (let o = 0; o < H; o++) {
      let v = 0;
      for (let j = 0; j < Is; j++) v += p.sd[o * Is + j] * a[j];
      for (let k = 0; k < K; k++) v += routed[(t * K + k) * H + o];
      out[t * H + o] = v;
    }
  }
  return { out, experts, margin };
}

export function params64(rng: Rng, d: Dims): Params64 {
  const { T, H, I, E, Is } = d;
  return {
    x: asF32(rng.array(T * H)), router: asF32(rng.array(E * H, 1.5)), W1: asF32(rng.array(E * 2 * I * H, 0.5)),
    W2: asF32(rng.array(E * H * I, 0.5)), sg: asF32(rng.array(Is * H, 0.5)), su: asF32(rng.array(Is * H, 0.5)),
    sd: asF32(rng.array(H * Is, 0.5)),
  };
}

