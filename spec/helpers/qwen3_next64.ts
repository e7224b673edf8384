/**
 * Float64 references written from transformers' modeling_qwen3_next.py (spec helper):
 * Qwen3NextGatedDeltaNet, Qwen3NextAttention (gated, zero-centred per-head q/k norm, partial
 * rotary) and the whole Qwen3NextForCausalLM, reading Hub-layout tensors by name; Qwen3.5-MoE's
 * text model is the same with Qwen3_5GatedDeltaNet's four input projections.
 */
import type { HFConfig } from '../../src/models/families.js';
import { linear64, moeBlock64, swiglu64, type Params } from './glm_dsa64.js';

const silu = (v: number) => v / (1 + Math.exp(-v));
const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));
const softplus = (v: number) => Math.log1p(Math.exp(v));

/** Qwen3NextRMSNorm: x · rsqrt(mean(x²) + eps) · (1 + w) */
function rmsZero64(v: Float64Array, weight: Float64Array, eps: number): Float64Array {
  const inv = 1 / Math.sqrt(v.reduce((acc, t) => acc + t * t, 0) / v.length + eps);
  return v.map((t, i) => t * inv * (1 + weight[i]));
}

export interface DeltaNet64Args {
  numKeyHeads: number; numValueHeads: number; keyHeadDim: number; valueHeadDim: number; convKernel: number; normEpsilon: number;
  /** 'separate': Qwen3_5GatedDeltaNet's in_proj_qkv / in_proj_z / in_proj_b / in_proj_a */
  projections?: 'qkvz' | 'separate';
}

/**
 * float64 Qwen3NextGatedDeltaNet.forward (no cache, no mask) on one sequence x [S, H], literally;
 * with projections 'separate', Qwen3_5GatedDeltaNet's (the same after its four projections).
 */
export function deltaNet64(x: Float64Array, w: (name: string) => Float64Array, a: DeltaNet64Args, s: number, h: number): Float64Array {
  const { numKeyHeads: nk, numValueHeads: nv, keyHeadDim: dk, valueHeadDim: dv, convKernel: kw } = a;
  const r = nv / nk;
  const per = 2 * dk + 2 * r * dv;
  const C = 2 * nk * dk + nv * dv;
  const out = new Float64Array(s * h);
  const mixed: Float64Array[] = [];
  const zs: Float64Array[] = [];
  const bs: Float64Array[] = [];
  const as: Float64Array[] = [];
  for (let t = 0; t < s; t++) {
    const row = x.slice(t * h, (t + 1) * h);
    if (a.projections === 'separate') {
      mixed.push(linear64(w('in_proj_qkv.weight'), row));
      zs.push(linear64(w('in_proj_z.weight'), row));
      bs.push(linear64(w('in_proj_b.weight'), row));
      as.push(linear64(w('in_proj_a.weight'), row));
      continue;
    }
    const qkvz = linear64(w('in_proj_qkvz.weight'), row);
    const ba = linear64(w('in_proj_ba.weight'), row);
    const q: number[] = []; const k: number[] = []; const v: number[] = []; const z: number[] = [];
    const bb: number[] = []; const aa: number[] = [];
    for (let g = 0; g < nk; g++) {   // fix_query_key_value_ordering: grouped per key head
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
      if (src >= 0) acc += w('conv1d.weight')[c * kw + j] * mixed[src][c];
    }
    return silu(acc);
  }));
  const l2 = (v: Float64Array) => { const inv = 1 / Math.sqrt(v.reduce((acc, e) => acc + e * e, 0) + 1e-6); return v.map(e => e * inv); };
  const states = Array.from({ length: nv }, () => Array.from({ length: dk }, () => new Float64Array(dv)));
  for (let t = 0; t < s; t++) {
    const outRow = new Float64Array(nv * dv);
    for (let hv = 0; hv < nv; hv++) {
      const hk = Math.floor(hv / r);    // repeat_interleave
      const q = l2(conv[t].slice(hk * dk, (hk + 1) * dk)).map(e => e / Math.sqrt(dk));
      const k = l2(conv[t].slice(nk * dk + hk * dk, nk * dk + (hk + 1) * dk));
      const v = conv[t].slice(2 * nk * dk + hv * dv, 2 * nk * dk + (hv + 1) * dv);
      const beta = sigmoid(bs[t][hv]);
      const g = -Math.exp(w('A_log')[hv]) * softplus(as[t][hv] + w('dt_bias')[hv]);
      const S = states[hv];
      for (let i = 0; i < dk; i++) for (let j = 0; j < dv; j++) S[i][j] *= Math.exp(g);
      const delta = Float64Array.from({ length: dv }, (_, j) => (v[j] - S.reduce((acc, rowS, i) => acc + rowS[j] * k[i], 0)) * beta);
      for (let i = 0; i < dk; i++) for (let j = 0; j < dv; j++) S[i][j] += k[i] * delta[j];
      const o = Float64Array.from({ length: dv }, (_, j) => S.reduce((acc, rowS, i) => acc + rowS[j] * q[i], 0));
      // Qwen3NextRMSNormGated: rms(o)·weight·silu(z), weight not zero-centred
      const inv = 1 / Math.sqrt(o.reduce((acc, e) => acc + e * e, 0) / dv + a.normEpsilon);
      for (let j = 0; j < dv; j++) outRow[hv * dv + j] = o[j] * inv * w('norm.weight')[j] * silu(zs[t][hv * dv + j]);
    }
    out.set(linear64(w('out_proj.weight'), outRow), t * h);
  }
  return out;
}

export interface GatedAttention64Args { numHeads: number; numKeyValueHeads: number; headDim: number; rotaryDim: number; ropeTheta: number; eps: number }

/**
 * float64 Qwen3NextAttention (eager, causal) on one sequence x [S, H]: q_proj gives per head
 * [q, gate]; q_norm / k_norm (1 + w) per head; rotate-half rope on the first rotaryDim; GQA
 * softmax attention; output · sigmoid(gate); o_proj.
 */
export function gatedAttention64(x: Float64Array, w: (name: string) => Float64Array, a: GatedAttention64Args, s: number, h: number): Float64Array {
  const { numHeads: nh, numKeyValueHeads: nkv, headDim: d, rotaryDim: rd } = a;
  const rope = (v: Float64Array, p: number) => {
    const out = Float64Array.from(v);
    for (let i = 0; i < rd / 2; i++) {
      const angle = p / a.ropeTheta ** ((2 * i) / rd);
      out[i] = v[i] * Math.cos(angle) - v[i + rd / 2] * Math.sin(angle);
      out[i + rd / 2] = v[i + rd / 2] * Math.cos(angle) + v[i] * Math.sin(angle);
    }
    return out;
  };
  const q: Float64Array[][] = []; const gate: Float64Array[][] = []; const k: Float64Array[][] = []; const v: Float64Array[][] = [];
  for (let p = 0; p < s; p++) {
    const row = x.slice(p * h, (p + 1) * h);
    const qg = linear64(w('q_proj.weight'), row);
    const kk = linear64(w('k_proj.weight'), row);
    const vv = linear64(w('v_proj.weight'), row);
    q.push([]); gate.push([]); k.push([]); v.push([]);
    for (let hh = 0; hh < nh; hh++) {
      q[p].push(rope(rmsZero64(qg.slice(hh * 2 * d, hh * 2 * d + d), w('q_norm.weight'), a.eps), p));
      gate[p].push(qg.slice(hh * 2 * d + d, (hh + 1) * 2 * d));
    }
    for (let hh = 0; hh < nkv; hh++) {
      k[p].push(rope(rmsZero64(kk.slice(hh * d, (hh + 1) * d), w('k_norm.weight'), a.eps), p));
      v[p].push(vv.slice(hh * d, (hh + 1) * d));
    }
  }
  const out = new Float64Array(s * h);
  for (let i = 0; i < s; i++) {
    const merged = new Float64Array(nh * d);
    for (let hh = 0; hh < nh; hh++) {
      const kv = Math.floor(hh / (nh / nkv));
      const scores = Array.from({ length: i + 1 }, (_, j) => q[i][hh].reduce((acc, t, n) => acc + t * k[j][kv][n], 0) / Math.sqrt(d));
      const m = Math.max(...scores);
      const e = scores.map(sc => Math.exp(sc - m));
      const zsum = e.reduce((acc, t) => acc + t, 0);
      e.forEach((ej, j) => { for (let t = 0; t < d; t++) merged[hh * d + t] += (ej / zsum) * v[j][kv][t]; });
      for (let t = 0; t < d; t++) merged[hh * d + t] *= sigmoid(gate[i][hh][t]);
    }
    out.set(linear64(w('o_proj.weight'), merged), i * h);
  }
  return out;
}

/**
 * float64 Qwen3NextForCausalLM logits [S, V] for one sequence: embedding; per layer (1 + w)
 * RMSNorm → GatedDeltaNet or gated attention by layer_types → residual → (1 + w) RMSNorm → MoE
 * block or dense MLP → residual; final (1 + w) RMSNorm; lm_head.
 */
export function qwen3NextLogits64(config: HFConfig, p: Params, ids: number[], moeLayers: number[]): Float64Array {
  const get = (name: string) => p.get(name)!.data;
  const H = config['hidden_size'] as number;
  const S = ids.length;
  const eps = (config['rms_norm_eps'] as number | undefined) ?? 1e-6;
  const emb = get('model.embed_tokens.weight');
  let hidden = new Float64Array(S * H);
  ids.forEach((id, t) => hidden.set(emb.slice(id * H, (id + 1) * H), t * H));
  const normRows = (x: Float64Array, weight: Float64Array) => {
    const out = new Float64Array(x.length);
    for (let t = 0; t < S; t++) out.set(rmsZero64(x.slice(t * H, (t + 1) * H), weight, eps), t * H);
    return out;
  };
  const headDim = config['head_dim'] as number;
  const rope = config['rope_parameters'] as { rope_theta?: number; partial_rotary_factor?: number } | undefined;
  const attn: GatedAttention64Args = {
    numHeads: config['num_attention_heads'] as number, numKeyValueHeads: config['num_key_value_heads'] as number, headDim,
    rotaryDim: Math.floor(headDim * (rope?.partial_rotary_factor ?? 0.25)), ropeTheta: rope?.rope_theta ?? 10000, eps,
  };
  const delta: DeltaNet64Args = {
    numKeyHeads: config['linear_num_key_heads'] as number, numValueHeads: config['linear_num_value_heads'] as number,
    keyHeadDim: config['linear_key_head_dim'] as number, valueHeadDim: config['linear_value_head_dim'] as number,
    convKernel: config['linear_conv_kernel_dim'] as number, normEpsilon: eps,
    projections: config['model_type'] === 'qwen3_5_moe_text' ? 'separate' : 'qkvz',
  };
  const types = config['layer_types'] as string[];
  for (let i = 0; i < types.length; i++) {
    const at = (rel: string) => get(`model.layers.${i}.${rel}`);
    const x = normRows(hidden, at('input_layernorm.weight'));
    const mixed = types[i] === 'linear_attention' ? deltaNet64(x, n => at(`linear_attn.${n}`), delta, S, H) :
      gatedAttention64(x, n => at(`self_attn.${n}`), attn, S, H);
    hidden = hidden.map((v, j) => v + mixed[j]);
    const mlpIn = normRows(hidden, at('post_attention_layernorm.weight'));
    let mlp: Float64Array;
    if (moeLayers.includes(i)) {
      mlp = moeBlock64(config, i, p, mlpIn, S).out;
    } else {
      mlp = new Float64Array(S * H);
      for (let t = 0; t < S; t++) mlp.set(swiglu64(at('mlp.gate_proj.weight'), at('mlp.up_proj.weight'), at('mlp.down_proj.weight'), mlpIn, t * H, H), t * H);
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
