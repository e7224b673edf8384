/**
 * transformers' routing in float64, one token at a time, for every RoutingKind: the oracle of the
 * routing specs on every backend (spec/ops/routing.spec.ts, spec/backends/webgpu/family_parity.spec.ts).
 */
import type { RoutingConfig } from '../../src/ops/types.js';
import { Rng, asF32, finiteDifferences } from './numeric.js';

/** Indices sorted by descending value, ties to the lower index (tf.topk's order). */
export function order(values: ArrayLike<number>): number[] {
  return Array.from(values, (_, i) => i).sort((a, b) => values[b] - values[a] || a - b);
}

export function softmax64(z: ArrayLike<number>): number[] {
  const m = Math.max(...Array.from(z));
  const e = Array.from(z, v => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map(v => v / s);
}

export const sigmoid64 = (v: number) => 1 / (1 + Math.exp(-v));

export interface Route64 {
  weights: number[];
  experts: number[];
  /** the smallest score gap at any decision (group or expert cut); Infinity if none */
  margin: number;
}

/** transformers' routing of one token, float64, written from the formulas in spec/fixtures/README.md. */
export function route64(z: ArrayLike<number>, cfg: RoutingConfig, bias?: ArrayLike<number>): Route64 {
  const E = z.length;
  const K = cfg.topK;
  const renormalize = cfg.renormalize ?? true;
  const scale = cfg.scalingFactor ?? 1;
  const nGroup = cfg.nGroup ?? 1;
  const topkGroup = cfg.topkGroup ?? 1;
  let margin = Infinity;
  const cut = (scores: number[], idx: number[], stableTie: (a: number, b: number) => boolean) => {
    if (idx.length > K) {
      const a = idx[K - 1];
      const b = idx[K];
      if (!(scores[a] === scores[b] && stableTie(a, b))) margin = Math.min(margin, scores[a] - scores[b]);
    }
    return idx.slice(0, K);
  };
  if (cfg.kind === 'topKSoftmax') {
    const experts = cut(Array.from(z), order(z), () => false);
    return { experts, weights: softmax64(experts.map(e => z[e])), margin };
  }
  if (cfg.kind === 'softmaxBiasedTopK') {
    // ERNIE: select on p + bias, weigh with p / max(Σ, normMin)
    const p = softmax64(z);
    const choice = p.map((v, e) => v + (bias ? bias[e] : 0));
    const experts = cut(choice, order(choice), () => false);
    const sel = experts.map(e => p[e]);
    const denom = Math.max(sel.reduce((a, b) => a + b, 0), cfg.normMin ?? 1e-12);
    return { experts, weights: sel.map(v => v / denom), margin };
  }
  if (cfg.kind === 'topKSigmoid') {
    // Llama4Router: top-k of the logits, sigmoid of each kept logit
    const experts = cut(Array.from(z), order(z), () => false);
    return { experts, weights: experts.map(e => sigmoid64(z[e])), margin };
  }
  if (cfg.kind === 'softmaxTopK') {
    const p = softmax64(z);
    const experts = cut(p, order(p), () => false);
    const sel = experts.map(e => p[e]);
    const sum = sel.reduce((a, b) => a + b, 0);
    return { experts, weights: renormalize ? sel.map(v => v / sum) : sel, margin };
  }
  const base = cfg.kind === 'sigmoidGroupTopK' ? Array.from(z, sigmoid64) : softmax64(z);
  const choice = base.map((v, e) => v + (bias ? bias[e] : 0));
  const size = E / nGroup;
  const groupScores: number[] = [];
  for (let g = 0; g < nGroup; g++) {
    const members = choice.slice(g * size, (g + 1) * size).sort((a, b) => b - a);
    if (cfg.kind === 'softmaxGroupLimitedGreedy') groupScores.push(members[0]);
    else groupScores.push(size === 1 ? members[0] : members[0] + members[1]);
  }
  const groupOrder = order(groupScores);
  if (topkGroup < nGroup) {
    margin = Math.min(margin, groupScores[groupOrder[topkGroup - 1]] - groupScores[groupOrder[topkGroup]]);
  }
  const kept = new Set(groupOrder.slice(0, topkGroup));
  const isKept = (e: number) => kept.has(Math.floor(e / size));
  const masked = choice.map((v, e) => (isKept(e) ? v : 0.0));
  // two masked experts tie at exactly 0.0 whatever the logits: that tie never moves
  const experts = cut(masked, order(masked), (a, b) => !isKept(a) && !isKept(b));
  let w = experts.map(e => base[e]);
  if (renormalize && cfg.kind !== 'softmaxGroupLimitedGreedy') {
    const denom = w.reduce((a, b) => a + b, 0) + 1e-20;
    w = w.map(v => v / denom);
  }
  return { experts, weights: w.map(v => v * scale), margin };
}

export function routeRows64(x: Float64Array, T: number, cfg: RoutingConfig, bias?: ArrayLike<number>) {
  const E = x.length / T;
  const K = cfg.topK;
  const weights = new Float64Array(T * K);
  const experts = new Int32Array(T * K);
  let margin = Infinity;
  for (let t = 0; t < T; t++) {
    const r = route64(x.subarray(t * E, (t + 1) * E), cfg, bias);
    weights.set(r.weights, t * K);
    experts.set(r.experts, t * K);
    margin = Math.min(margin, r.margin);
  }
  return { weights, experts, margin };
}

/** d Σ(weights·G) / d logits by central differences, token by token (tokens are independent). */
export function gradFD(x: Float64Array, T: number, cfg: RoutingConfig, G: Float64Array, bias?: ArrayLike<number>) {
  const E = x.length / T;
  const K = cfg.topK;
  const out = new Float64Array(T * E);
  for (let t = 0; t < T; t++) {
    const g = G.subarray(t * K, (t + 1) * K);
    const f = (row: Float64Array) => route64(row, cfg, bias).weights.reduce((a, w, k) => a + w * g[k], 0);
    out.set(finiteDifferences(f, Float64Array.from(x.subarray(t * E, (t + 1) * E))), t * E);
  }
  return out;
}

/** float32-exact logits whose every routing decision has a gap >= 1e-3 (so FD never flips one). */
export function separatedLogits(rng: Rng, T: number, E: number, cfg: RoutingConfig, bias?: ArrayLike<number>): Float64Array {
  const x = new Float64Array(T * E);
  for (let t = 0; t < T; t++) {
    let row: Float64Array;
    do row = asF32(rng.array(E, 1.5)); while (route64(row, cfg, bias).margin < 1e-3);
    x.set(row, t * E);
  }
  return x;
}
