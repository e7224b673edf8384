/**
 * Float64 JS reference of the routed experts (given the routing), written from the formulas in
 * spec/fixtures/README.md with explicit index math; used with finite differences as the oracle.
 */
export interface Experts64 {
  T: number; H: number; I: number; E: number; K: number;
  layout: 'outIn' | 'inOutInterleaved' | 'inOut';
  activation: { kind: 'swiglu' } | { kind: 'gegluTanh' } | { kind: 'clampedSwiglu'; alpha: number; limit: number };
  experts: Int32Array;          // [T*K]
  weights: Float64Array;        // [T*K]
  x: Float64Array;              // [T*H]
  W1: Float64Array;             // [E,2I,H] or [E,H,2I]
  W2: Float64Array;             // [E,H,I] or [E,I,H]
  b1?: Float64Array;            // [E,2I]
  b2?: Float64Array;            // [E,H]
  lora1: Array<Adapter64>;  // A [r*E, H], B [2I, r*E]; mask [T*K, H]
  lora2: Array<Adapter64>;  // A [r*E, I], B [H, r*E]; mask [T*K, I]
}

/**
 * One expert adapter; with `mask` (LoRA dropout, one row per (token, slot) pair t*K + k) its
 * branch reads x ⊙ mask[pair] instead of x, as a per-expert nn.Linear with lora_dropout does.
 */
export interface Adapter64 { A: Float64Array; B: Float64Array; r: number; s: number; mask?: Float64Array }

/** PEFT's delta for expert e at (out o, in i): s·Σ_j B[o, j·E + e]·A[e·r + j, i]. */
function delta(f: { A: Float64Array; B: Float64Array; r: number; s: number }, E: number, inSize: number,
    e: number, o: number, i: number): number {
  let d = 0;
  for (let j = 0; j < f.r; j++) d += f.B[o * f.r * E + j * E + e] * f.A[(e * f.r + j) * inSize + i];
  return f.s * d;
}

function sigmoid(v: number): number { return 1 / (1 + Math.exp(-v)); }

export function experts64(m: Experts64): Float64Array {
  const { T, H, I, E, K } = m;
  const t2 = m.layout !== 'outIn';
  // gpt-oss alternates gate and up columns; Llama 4 ('inOut') has the gate half, then the up half
  const interleaved = m.layout === 'inOutInterleaved';
  // effective weights in (out, in) form
  // effective weight of pair p at (o, i): base + Σ deltas, a dropped adapter's delta times its mask
  const w1 = (p: number, e: number, o: number, i: number) =>
    (t2 ? m.W1[(e * H + i) * 2 * I + o] : m.W1[(e * 2 * I + o) * H + i]) +
    m.lora1.reduce((s, f) => s + delta(f, E, H, e, o, i) * (f.mask ? f.mask[p * H + i] : 1), 0);
  const w2 = (p: number, e: number, o: number, i: number) =>
    (t2 ? m.W2[(e * I + i) * H + o] : m.W2[(e * H + o) * I + i]) +
    m.lora2.reduce((s, f) => s + delta(f, E, I, e, o, i) * (f.mask ? f.mask[p * I + i] : 1), 0);
  const out = new Float64Array(T * H);
  const h = new Float64Array(2 * I);
  const a = new Float64Array(I);
  for (let t = 0; t < T; t++) {
    for (let k = 0; k < K; k++) {
      const e = m.experts[t * K + k];
      for (let o = 0; o < 2 * I; o++) {
        let v = m.b1 ? m.b1[e * 2 * I + o] : 0;
        for (let i = 0; i < H; i++) v += m.x[t * H + i] * w1(t * K + k, e, o, i);
        h[o] = v;
      }
      for (let i = 0; i < I; i++) {
        const g = interleaved ? h[2 * i] : h[i];
        const u = interleaved ? h[2 * i + 1] : h[I + i];
        if (m.activation.kind === 'swiglu') {
          a[i] = g * sigmoid(g) * u;
        } else if (m.activation.kind === 'gegluTanh') {
          // PyTorch's gelu(approximate='tanh')
          a[i] = 0.5 * g * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (g + 0.044715 * g ** 3))) * u;
        } else {
          const { alpha, limit } = m.activation;
          const gc = Math.min(g, limit);
          const uc = Math.min(Math.max(u, -limit), limit);
          a[i] = (uc + 1) * gc * sigmoid(alpha * gc);
        }
      }
      const w = m.weights[t * K + k];
      for (let o = 0; o < H; o++) {
        let v = m.b2 ? m.b2[e * H + o] : 0;
        for (let i = 0; i < I; i++) v += a[i] * w2(t * K + k, e, o, i);
        out[t * H + o] += w * v;
      }
    }
  }
  return out;
}
