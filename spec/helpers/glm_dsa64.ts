/**
 * Float64 references written from transformers' modeling files (spec helper): the MoE blocks of
 * qwen3_5_moe_text / qwen3_next / glm_moe_dsa (Qwen3_5MoeSparseMoeBlock, Qwen3NextSparseMoeBlock,
 * GlmMoeDsaMoE), GlmMoeDsaAttention with its indexer, and the whole GlmMoeDsaForCausalLM, all
 * reading Hub-layout checkpoint tensors by name.
 */
import { moeBlockDims, type HFConfig } from '../../src/models/families.js';

/** Checkpoint tensors by Hub name (row-major float64). */
export type Params = Map<string, { data: Float64Array; shape: number[] }>;

const silu = (v: number) => v / (1 + Math.exp(-v));
const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));

/** W·x for one row: W [out, in] row-major, x read from `xOff`. */
export function linear64(W: Float64Array, x: Float64Array, xOff = 0, inSize = x.length - xOff): Float64Array {
  const out = W.length / inSize;
  const y = new Float64Array(out);
  for (let o = 0; o < out; o++) {
    let s = 0;
    for (let i = 0; i < inSize; i++) s += W[o * inSize + i] * x[xOff + i];
    y[o] = s;
  }
  return y;
}

/** down(silu(gate(x)) · up(x)) for one row. */
export function swiglu64(gate: Float64Array, up: Float64Array, down: Float64Array, x: Float64Array, xOff: number, H: number): Float64Array {
  const g = linear64(gate, x, xOff, H);
  const u = linear64(up, x, xOff, H);
  return linear64(down, g.map((v, i) => silu(v) * u[i]));
}

/** x · rsqrt(mean(x²) + eps) · w */
export function rms64(v: Float64Array, weight: Float64Array, eps: number): Float64Array {
  const inv = 1 / Math.sqrt(v.reduce((acc, t) => acc + t * t, 0) / v.length + eps);
  return v.map((t, i) => t * inv * weight[i]);
}

/** Indices of the k largest values, largest first (the specs keep wide gaps, so no ties). */
export function topK64(values: ArrayLike<number>, k: number): number[] {
  return Array.from(values, (v, i) => [v, i]).sort((a, b) => b[0] - a[0]).slice(0, k).map(p => p[1]);
}

export interface Block64 { out: Float64Array; experts: number[][] }

/**
 * The transformers MoE block forward of layer `layer` on x [T, H]:
 * - qwen3_5_moe_text / qwen3_next: softmax(x·W_gᵀ) → top-k → /sum (Qwen3.5 always, Qwen3-Next when
 *   norm_topk_prob) → experts; plus sigmoid(x·w_sgᵀ) · shared_expert(x).
 * - glm_moe_dsa: s = sigmoid(x·W_gᵀ); groups scored by the sum of their two best s + bias; the
 *   topk_group best groups kept; top-k of s + bias there; weights s at those experts, / (sum + 1e-20)
 *   when norm_topk_prob, × routed_scaling_factor; plus the unweighted shared experts.
 */
export function moeBlock64(config: HFConfig, layer: number, p: Params, x: Float64Array, T: number): Block64 {
  const { hidden: H, experts: E, topK: K } = moeBlockDims(config);
  const at = (rel: string) => p.get(`model.layers.${layer}.mlp.${rel}`)!.data;
  const out = new Float64Array(T * H);
  const chosen: number[][] = [];
  const glm = config['model_type'] === 'glm_moe_dsa';
  for (let t = 0; t < T; t++) {
    const z = linear64(at('gate.weight'), x, t * H, H);
    let idx: number[];
    let w: number[];
    if (glm) {
      const s = z.map(sigmoid);
      const bias = at('gate.e_score_correction_bias');
      const choice = s.map((v, e) => v + bias[e]);
      const nGroup = (config['n_group'] as number | undefined) ?? 1;
      const per = E / nGroup;
      const groupScores = Array.from({ length: nGroup }, (_, g) =>
        topK64(choice.slice(g * per, (g + 1) * per), 2).reduce((acc, i) => acc + choice[g * per + i], 0));
      const groups = new Set(topK64(groupScores, (config['topk_group'] as number | undefined) ?? 1));
      const masked = choice.map((v, e) => groups.has(Math.floor(e / per)) ? v : -Infinity);
      idx = topK64(masked, K);
      w = idx.map(e => s[e]);
      if (config['norm_topk_prob'] !== false) {
        const sum = w.reduce((a, b) => a + b, 0) + 1e-20;
        w = w.map(v => v / sum);
      }
      w = w.map(v => v * ((config['routed_scaling_factor'] as number | undefined) ?? 2.5));
    } else {
      const m = Math.max(...z);
      const ez = z.map(v => Math.exp(v - m));
      const sum = ez.reduce((a, b) => a + b, 0);
      const prob = ez.map(v => v / sum);
      idx = topK64(prob, K);
      w = idx.map(e => prob[e]);
      if (config['model_type'] === 'qwen3_5_moe_text' || config['norm_topk_prob'] !== false) {
        const s = w.reduce((a, b) => a + b, 0);
        w = w.map(v => v / s);
      }
    }
    chosen.push(idx);
    for (let k = 0; k < K; k++) {
      const e = idx[k];
      const y = swiglu64(at(`experts.${e}.gate_proj.weight`), at(`experts.${e}.up_proj.weight`),
          at(`experts.${e}.down_proj.weight`), x, t * H, H);
      for (let h = 0; h < H; h++) out[t * H + h] += w[k] * y[h];
    }
    const shared = glm ? 'shared_experts' : 'shared_expert';
    const y = swiglu64(at(`${shared}.gate_proj.weight`), at(`${shared}.up_proj.weight`), at(`${shared}.down_proj.weight`), x, t * H, H);
    const scale = glm ? 1 : sigmoid(linear64(at('shared_expert_gate.weight'), x, t * H, H)[0]);
    for (let h = 0; h < H; h++) out[t * H + h] += scale * y[h];
  }
  return { out, experts: chosen };
}

/** GlmMoeDsaAttention's sizes (config names). */
export interface DSA64Args {
  numHeads: number; qkNopeHeadDim: number; qkRopeHeadDim: number; vHeadDim: number; kvLoraRank: number;
  ropeTheta: number; indexHeads: number; indexHeadDim: number; indexTopK: number;
  /** rope pairs (x0, x1), (x2, x3), ... (transformers 5.17's apply_rotary_pos_emb_interleave); default true */
  ropeInterleave?: boolean;
}

/**
 * float64 GlmMoeDsaAttention on one sequence x [S, H], weights by name relative to self_attn
 * (`w(name)`): MLA with interleaved rope on the rope parts, in the indexer too (the output laid
 * out as [x_even·cos − x_odd·sin, x_odd·cos + x_even·sin]) (q_a → q_a_layernorm (eps 1e-6) →
 * q_b; kv_a_proj_with_mqa → kv_a_layernorm → kv_b_proj) and the indexer's mask:
 * score[s, t] = Σ_h w[s,h]·relu(q_h[s]·k[t]/√d) over the causal keys, the min(topK, s + 1) best
 * kept (transformers takes top-k over all keys after adding the causal mask, so the blocked ones
 * come last and are masked again). Returns the output rows and each query's kept keys.
 */
export function dsaAttention64(x: Float64Array, w: (name: string) => Float64Array, a: DSA64Args, s: number, h: number):
    { out: Float64Array; kept: number[][] } {
  const { numHeads: nh, qkNopeHeadDim: nope, qkRopeHeadDim: rd, vHeadDim: vd, kvLoraRank: kvr } = a;
  const { indexHeads: ih, indexHeadDim: id, indexTopK } = a;
  const qk = nope + rd;
  const lin = (row: Float64Array, name: string) => linear64(w(`${name}.weight`), row);
  const layerNorm = (v: Float64Array) => {
    const mean = v.reduce((acc, t) => acc + t, 0) / v.length;
    const variance = v.reduce((acc, t) => acc + (t - mean) ** 2, 0) / v.length;
    return v.map((t, i) => (t - mean) / Math.sqrt(variance + 1e-6) * w('indexer.k_norm.weight')[i] + w('indexer.k_norm.bias')[i]);
  };
  // rope over the first rd values (pair i: (x_2i, x_2i+1) interleaved, else (x_i, x_i+rd/2)), the rest passed through
  const interleave = a.ropeInterleave ?? true;
  const rope = (v: Float64Array, p: number) => {
    const out = Float64Array.from(v);
    for (let i = 0; i < rd / 2; i++) {
      const angle = p / a.ropeTheta ** ((2 * i) / rd);
      const [x1, x2] = interleave ? [v[2 * i], v[2 * i + 1]] : [v[i], v[i + rd / 2]];
      out[i] = x1 * Math.cos(angle) - x2 * Math.sin(angle);
      out[i + rd / 2] = x2 * Math.cos(angle) + x1 * Math.sin(angle);
    }
    return out;
  };
  const q: Float64Array[][] = [];
  const k: Float64Array[][] = [];
  const v: Float64Array[][] = [];
  const iq: Float64Array[][] = [];
  const ik: Float64Array[] = [];
  const iw: Float64Array[] = [];
  for (let p = 0; p < s; p++) {
    const row = x.slice(p * h, (p + 1) * h);
    const latent = rms64(lin(row, 'q_a_proj'), w('q_a_layernorm.weight'), 1e-6);
    const qAll = lin(latent, 'q_b_proj');
    const ckv = lin(row, 'kv_a_proj_with_mqa');
    const kRot = rope(ckv.slice(kvr), p);
    const kv = lin(rms64(ckv.slice(0, kvr), w('kv_a_layernorm.weight'), 1e-6), 'kv_b_proj');
    q.push([]); k.push([]); v.push([]); iq.push([]);
    for (let hh = 0; hh < nh; hh++) {
      const qh = qAll.slice(hh * qk, (hh + 1) * qk);
      q[p].push(Float64Array.from([...qh.slice(0, nope), ...rope(qh.slice(nope), p)]));
      const kvh = kv.slice(hh * (nope + vd), (hh + 1) * (nope + vd));
      k[p].push(Float64Array.from([...kvh.slice(0, nope), ...kRot]));
      v[p].push(kvh.slice(nope));
    }
    const qi = lin(latent, 'indexer.wq_b');
    for (let hh = 0; hh < ih; hh++) iq[p].push(rope(qi.slice(hh * id, (hh + 1) * id), p));
    ik.push(rope(layerNorm(lin(row, 'indexer.wk')), p));
    iw.push(lin(row, 'indexer.weights_proj').map(t => t / Math.sqrt(ih)));
  }
  const out = new Float64Array(s * h);
  const kept: number[][] = [];
  for (let i = 0; i < s; i++) {
    const score = (j: number) => iq[i].reduce((acc, qh, hh) =>
      acc + iw[i][hh] * Math.max(0, qh.reduce((sum, t, n) => sum + t * ik[j][n], 0) / Math.sqrt(id)), 0);
    const order = Array.from({ length: i + 1 }, (_, j) => j).sort((m, n) => score(n) - score(m));
    const keys = order.slice(0, indexTopK).sort((m, n) => m - n);
    kept.push(keys);
    const merged = new Float64Array(nh * vd);
    for (let hh = 0; hh < nh; hh++) {
      const scores = keys.map(j => q[i][hh].reduce((acc, t, n) => acc + t * k[j][hh][n], 0) / Math.sqrt(qk));
      const m = Math.max(...scores);
      const e = scores.map(sc => Math.exp(sc - m));
      const z = e.reduce((acc, t) => acc + t, 0);
      e.forEach((ej, c) => { for (let t = 0; t < vd; t++) merged[hh * vd + t] += (ej / z) * v[keys[c]][hh][t]; });
    }
    out.set(lin(merged, 'o_proj'), i * h);
  }
  return { out, kept };
}

/**
 * float64 GlmMoeDsaForCausalLM logits [S, V] for one sequence of ids: embedding; per layer
 * RMSNorm → attention → residual → RMSNorm → dense SwiGLU MLP or the MoE block → residual; final
 * RMSNorm; lm_head.
 */
export function glmDsaLogits64(config: HFConfig, p: Params, ids: number[], moeLayers: number[]): Float64Array {
  const get = (name: string) => p.get(name)!.data;
  const H = config['hidden_size'] as number;
  const S = ids.length;
  const eps = (config['rms_norm_eps'] as number | undefined) ?? 1e-5;
  const emb = get('model.embed_tokens.weight');
  let hidden = new Float64Array(S * H);
  ids.forEach((id, t) => hidden.set(emb.slice(id * H, (id + 1) * H), t * H));
  const normRows = (x: Float64Array, weight: Float64Array) => {
    const out = new Float64Array(x.length);
    for (let t = 0; t < S; t++) out.set(rms64(x.slice(t * H, (t + 1) * H), weight, eps), t * H);
    return out;
  };
  const rope = config['rope_parameters'] as { rope_theta?: number } | undefined;
  const args: DSA64Args = {
    numHeads: config['num_attention_heads'] as number, qkNopeHeadDim: config['qk_nope_head_dim'] as number,
    qkRopeHeadDim: config['qk_rope_head_dim'] as number, vHeadDim: config['v_head_dim'] as number,
    kvLoraRank: config['kv_lora_rank'] as number, ropeTheta: rope?.rope_theta ?? 10000,
    indexHeads: config['index_n_heads'] as number, indexHeadDim: config['index_head_dim'] as number,
    indexTopK: config['index_topk'] as number,
  };
  const layers = config['num_hidden_layers'] as number;
  for (let i = 0; i < layers; i++) {
    const at = (rel: string) => get(`model.layers.${i}.${rel}`);
    const attn = dsaAttention64(normRows(hidden, at('input_layernorm.weight')), n => at(`self_attn.${n}`), args, S, H).out;
    hidden = hidden.map((v, j) => v + attn[j]);
    const mlpIn = normRows(hidden, at('post_attention_layernorm.weight'));
    let mlp: Float64Array;
    if (moeLayers.includes(i)) {
      mlp = moeBlock64(config, i, p, mlpIn, S).out;
    } else {
      mlp = new Float64Array(S * H);
      for (let t = 0; t < S; t++) {
        mlp.set(swiglu64(at('mlp.gate_proj.weight'), at('mlp.up_proj.weight'), at('mlp.down_proj.weight'), mlpIn, t * H, H), t * H);
      }
    }
    hidden = hidden.map((v, j) => v + mlp[j]);
  }
  const final = normRows(hidden, get('model.norm.weight'));
  const head = get('lm_head.weight');
  const V = head.length / H;
  const logits = new Float64Array(S * V);
  for (let t = 0; t < S; t++) logits.set(linear64(head, final, t * H, H), t * V);
  return logits;
}
