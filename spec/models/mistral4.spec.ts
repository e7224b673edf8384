/**
 * The mistral4 family row (Mistral4ForCausalLM): config reading, its checkpoint block layout (the
 * experts fused as transformers 5.17 saves them, shared experts, no correction bias), and the loaded block against a
 * float64 transcription of Mistral4MoE (Mistral4TopkRouter: softmax, group-limited top-k with
 * masked scores 0.0, renormalised + 1e-20, × routed_scaling_factor; plus the shared experts).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFile } from 'node:fs/promises';
import { loadMoEBlockWeights, moeBlockTensorPlan, type TensorSource } from '../../src/io/hf_block.js';
import { configTensorPlan } from '../../src/io/hf_checkpoint_core.js';
import { hfCheckpointTensors } from '../../src/io/hf_save.js';
import { buildMoECausalLM, moeCausalLMConfigFromHF } from '../../src/layers/moe_causal_lm.js';
import type { MLAAttention } from '../../src/layers/mla_attention.js';
import type { YarnRope } from '../../src/layers/rotary.js';
import { type HFConfig, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices } from '../../src/models/families.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import { moeBlock } from '../../src/ops/moe_block.js';
import { expectFixtureRouting } from './fixture_routing.js';
import { Rng, asF32, expectClose, expectNoLeak, tensorOf } from '../helpers/numeric.js';
import { experts64 } from '../ops/expert_reference64.js';
import { mla64 } from '../helpers/mla64.js';

const CONFIG: HFConfig = {
  model_type: 'mistral4', hidden_size: 8, moe_intermediate_size: 3, intermediate_size: 12, num_hidden_layers: 3,
  n_routed_experts: 8, num_experts_per_tok: 3, n_group: 4, topk_group: 2, first_k_dense_replace: 1,
  n_shared_experts: 2, routed_scaling_factor: 1.5, norm_topk_prob: true, hidden_act: 'silu',
};

const silu = (v: number) => v / (1 + Math.exp(-v));

/** W1 [E, 2I, H] (each expert's gate rows, then its up rows) and W2 [E, H, I], as Mistral4Experts holds them. */
interface Block64 { x: Float64Array; router: Float64Array; W1: Float64Array; W2: Float64Array;
  sg: Float64Array; su: Float64Array; sd: Float64Array }

/** Mistral4MoE.forward in float64, one token at a time (T tokens, H, I, E, K, Is = I·n_shared). */
function mistral4Block64(b: Block64, T: number, H: number, I: number, E: number, K: number, Is: number) {
  const G = 4;
  const keep = 2;
  const experts = new Int32Array(T * K);
  const weights = new Float64Array(T * K);
  for (let t = 0; t < T; t++) {
    const z = Array.from({ length: E }, (_, e) => b.router.subarray(e * H, (e + 1) * H).reduce((s, w, i) => s + w * b.x[t * H + i], 0));
    const m = Math.max(...z);
    const ex = z.map(v => Math.exp(v - m));
    const sum = ex.reduce((a, v) => a + v, 0);
    const p = ex.map(v => v / sum);
    const size = E / G;
    const groupScore = Array.from({ length: G }, (_, g) => p.slice(g * size, (g + 1) * size).sort((a, c) => c - a).slice(0, 2).reduce((a, v) => a + v, 0));
    const keptGroups = new Set(groupScore.map((_, g) => g).sort((a, c) => groupScore[c] - groupScore[a]).slice(0, keep));
    const masked = p.map((v, e) => (keptGroups.has(Math.floor(e / size)) ? v : 0));
    const chosen = masked.map((_, e) => e).sort((a, c) => masked[c] - masked[a] || a - c).slice(0, K);
    const denom = chosen.reduce((a, e) => a + p[e], 0) + 1e-20;
    chosen.forEach((e, k) => { experts[t * K + k] = e; weights[t * K + k] = (p[e] / denom) * 1.5; });
  }
  const out = experts64({ T, H, I, E, K, layout: 'outIn', activation: { kind: 'swiglu' }, experts, weights, x: b.x,
    W1: b.W1, W2: b.W2, lora1: [], lora2: [] });
  for (let t = 0; t < T; t++) {
    const a = Array.from({ length: Is }, (_, j) => {
      let g = 0;
      let u = 0;
      for (let i = 0; i < H; i++) { g += b.sg[j * H + i] * b.x[t * H + i]; u += b.su[j * H + i] * b.x[t * H + i]; }
      return silu(g) * u;
    });
    for (let o = 0; o < H; o++) out[t * H + o] += a.reduce((s, v, j) => s + v * b.sd[o * Is + j], 0);
  }
  return { out, experts };
}

function mapSource(tensors: Record<string, tf.Tensor>): TensorSource {
  return {
    has: name => name in tensors,
    info: name => ({ dtype: 'F32', shape: tensors[name].shape }),
    tensor: async name => tensors[name].clone(),
  };
}

describe('mistral4 (Mistral4ForCausalLM)', () => {
  it('reads its config: softmax group-limited top-k, scaling, n_shared_experts shared experts, dense first layers', () => {
    expect(moeBlockConfigFromHF(CONFIG)).to.deep.equal({
      routing: { kind: 'softmaxGroupTopK', topK: 3, renormalize: true, nGroup: 4, topkGroup: 2, scalingFactor: 1.5 },
      activation: { kind: 'swiglu' },
    });
    expect(moeBlockDims(CONFIG)).to.deep.equal({ hidden: 8, intermediate: 3, experts: 8, topK: 3, sharedIntermediate: 6 });
    expect(moeLayerIndices(CONFIG)).to.deep.equal([1, 2]);
    // Mistral4Config's defaults: 128 experts, top-4, one group, no dense layer
    const bare: HFConfig = { model_type: 'mistral4', hidden_size: 8, moe_intermediate_size: 3, num_hidden_layers: 2 };
    expect(moeBlockConfigFromHF(bare).routing).to.deep.equal(
        { kind: 'softmaxGroupTopK', topK: 4, renormalize: true, nGroup: 1, topkGroup: 1, scalingFactor: 1 });
    expect(moeLayerIndices(bare)).to.deep.equal([0, 1]);
    const plan = moeBlockTensorPlan(CONFIG, 1);
    expect(plan.router).to.deep.equal({ weight: { name: 'model.layers.1.mlp.gate.weight', shape: [8, 8] } });
    expect(plan.shared!.gate).to.deep.equal({ name: 'model.layers.1.mlp.shared_experts.gate_proj.weight', shape: [6, 8] });
  });

  it('loads a Hub-layout block and computes Mistral4MoE (float64 transcription)', async () => {
    const [T, H, I, E, K, Is] = [9, 8, 3, 8, 3, 6];
    const rng = new Rng(17);
    const f = (n: number, s = 0.5) => asF32(rng.array(n, s));
    const b: Block64 = {
      x: f(T * H, 1), router: f(E * H, 2), W1: f(E * 2 * I * H), W2: f(E * H * I), sg: f(Is * H), su: f(Is * H), sd: f(H * Is),
    };
    const prefix = 'model.layers.2.mlp.';
    const tensors: Record<string, tf.Tensor> = {
      [`${prefix}gate.weight`]: tensorOf(b.router, [E, H]),
      [`${prefix}shared_experts.gate_proj.weight`]: tensorOf(b.sg, [Is, H]),
      [`${prefix}shared_experts.up_proj.weight`]: tensorOf(b.su, [Is, H]),
      [`${prefix}shared_experts.down_proj.weight`]: tensorOf(b.sd, [H, Is]),
      // transformers 5.17 saves Mistral 4's experts fused, as it holds them
      [`${prefix}experts.gate_up_proj`]: tensorOf(b.W1, [E, 2 * I, H]),
      [`${prefix}experts.down_proj`]: tensorOf(b.W2, [E, H, I]),
    };
    const weights = await loadMoEBlockWeights(mapSource(tensors), CONFIG, 2);
    expect(weights.router.correctionBias).to.equal(undefined);
    const x = tensorOf(b.x, [T, H]) as tf.Tensor2D;
    const ref = mistral4Block64(b, T, H, I, E, K, Is);
    const sets = (a: ArrayLike<number>) => Array.from({ length: T }, (_, t) => Array.from(a).slice(t * K, (t + 1) * K).sort().join());
    for (const expertKernel of ['fused', 'reference']) {
      expectNoLeak(() => {
        const { out, routing } = moeBlock(x, weights, moeBlockConfigFromHF(CONFIG), { expertKernel });
        expect(sets(routing.experts.dataSync()), `${expertKernel}: experts`).to.deep.equal(sets(ref.experts));
        expectClose(out, ref.out, 1e-5, `${expertKernel}: out`);
        tf.dispose([out, routing.weights, routing.experts, routing.logits]);
      });
    }
    disposeMoEBlockWeights(weights);
    tf.dispose([x, ...Object.values(tensors)]);
  });
});

// ---- the whole model --------------------------------------------------------------------------

/** Mistral4ForCausalLM, tiny: MLA with YaRN (context 2, so the Llama 4 position scaling acts), layer 0 dense. */
const WHOLE: HFConfig = {
  ...CONFIG, vocab_size: 19, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 2, q_lora_rank: 6,
  kv_lora_rank: 5, qk_nope_head_dim: 4, qk_rope_head_dim: 4, v_head_dim: 3, rope_interleave: true, rms_norm_eps: 1e-6,
  tie_word_embeddings: false,
  rope_parameters: {
    rope_type: 'yarn', rope_theta: 30, factor: 4, original_max_position_embeddings: 2, max_position_embeddings: 64,
    beta_fast: 8, beta_slow: 1, mscale: 1, mscale_all_dim: 0.7, llama_4_scaling_beta: 0.4, partial_rotary_factor: 0.5,
  },
};

/** YaRN's get_mscale, written out: 0.1·m·ln(s) + 1 */
const getMscale = (s: number, m: number) => 0.1 * m * Math.log(s) + 1;

/** Mistral4ForCausalLM.forward in float64 from the checkpoint tensors `w` (HF names), one row of ids. */
function mistral4Logits64(w: Record<string, Float64Array>, ids: number[]): Float64Array {
  const H = 8;
  const S = ids.length;
  const rms = (v: Float64Array, weight: Float64Array) => {
    const out = new Float64Array(v.length);
    for (let t = 0; t < v.length / H; t++) {
      let ms = 0;
      for (let i = 0; i < H; i++) ms += v[t * H + i] ** 2;
      const inv = 1 / Math.sqrt(ms / H + 1e-6);
      for (let i = 0; i < H; i++) out[t * H + i] = v[t * H + i] * inv * weight[i];
    }
    return out;
  };
  let h = new Float64Array(S * H);
  ids.forEach((id, t) => h.set(w['model.embed_tokens.weight'].subarray(id * H, (id + 1) * H), t * H));
  for (let i = 0; i < 2; i++) {
    const p = `model.layers.${i}.`;
    const attnW = Object.fromEntries(Object.entries(w).filter(([k]) => k.startsWith(`${p}self_attn.`))
      .map(([k, v]) => [k.slice(`${p}self_attn.`.length), v]));
    const attn = mla64(rms(h, w[`${p}input_layernorm.weight`]), attnW, {
      numHeads: 2, qLoraRank: 6, kvLoraRank: 5, qkNopeHeadDim: 4, qkRopeHeadDim: 4, vHeadDim: 3, ropeTheta: 30,
      ropeInterleave: true, attentionBias: false, normEpsilon: 1e-6,
      ropeScaling: { kind: 'yarn', factor: 4, originalMaxPositionEmbeddings: 2, betaFast: 8, betaSlow: 1, truncate: true,
        attentionFactor: getMscale(4, 1) / getMscale(4, 0.7) },
      softmaxScale: getMscale(4, 0.7) ** 2 / Math.sqrt(8),
      positionScaling: { beta: 0.4, originalMaxPositionEmbeddings: 2 },
    }, 1, S, H);
    h = h.map((v, j) => v + attn[j]);
    const x = rms(h, w[`${p}post_attention_layernorm.weight`]);
    let mlp: Float64Array;
    if (i === 0) {
      const [g, u, d] = ['gate_proj', 'up_proj', 'down_proj'].map(n => w[`${p}mlp.${n}.weight`]);
      mlp = new Float64Array(S * H);
      for (let t = 0; t < S; t++) {
        const a = Array.from({ length: 12 }, (_, j) => {
          let gv = 0;
          let uv = 0;
          for (let k = 0; k < H; k++) { gv += g[j * H + k] * x[t * H + k]; uv += u[j * H + k] * x[t * H + k]; }
          return gv / (1 + Math.exp(-gv)) * uv;
        });
        for (let o = 0; o < H; o++) mlp[t * H + o] = a.reduce((acc, v, j) => acc + v * d[o * 12 + j], 0);
      }
    } else {
      const f = `${p}mlp.`;
      mlp = mistral4Block64({
        x, router: w[`${f}gate.weight`], W1: w[`${f}experts.gate_up_proj`], W2: w[`${f}experts.down_proj`],
        sg: w[`${f}shared_experts.gate_proj.weight`], su: w[`${f}shared_experts.up_proj.weight`],
        sd: w[`${f}shared_experts.down_proj.weight`],
      }, S, H, 3, 8, 3, 6).out;
    }
    h = h.map((v, j) => v + mlp[j]);
  }
  const n = rms(h, w['model.norm.weight']);
  const head = w['lm_head.weight'];
  return Float64Array.from({ length: S * 19 }, (_, j) => {
    const [t, o] = [Math.floor(j / 19), j % 19];
    let v = 0;
    for (let i = 0; i < H; i++) v += head[o * H + i] * n[t * H + i];
    return v;
  });
}

describe('mistral4 whole model (Mistral4ForCausalLM)', () => {
  it("reads Mistral 4's rope: YaRN on the rope part, mscale, the softmax scale, Llama 4 position scaling", () => {
    const c = moeCausalLMConfigFromHF(WHOLE);
    expect(c.mla).to.deep.include({
      qLoraRank: 6, kvLoraRank: 5, qkNopeHeadDim: 4, qkRopeHeadDim: 4, vHeadDim: 3, ropeInterleave: true,
      positionScaling: { beta: 0.4, originalMaxPositionEmbeddings: 2 },
    });
    expect(c.mla!.ropeScaling).to.deep.include({ kind: 'yarn', factor: 4, originalMaxPositionEmbeddings: 2, betaFast: 8, betaSlow: 1, truncate: true });
    expect((c.mla!.ropeScaling as YarnRope).attentionFactor).to.be.closeTo(getMscale(4, 1) / getMscale(4, 0.7), 1e-15);
    expect(c.mla!.softmaxScale).to.be.closeTo(getMscale(4, 0.7) ** 2 / Math.sqrt(8), 1e-15);
    expect([c.ropeTheta, c.ropeScaling, c.rmsNormEps]).to.deep.equal([30, null, 1e-6]);
    // the config class's default rope when config.json has none
    const bare = moeCausalLMConfigFromHF({ ...WHOLE, rope_parameters: undefined });
    expect(bare.mla!.ropeScaling).to.deep.include({ factor: 128, originalMaxPositionEmbeddings: 8192, betaFast: 32, betaSlow: 1 });
    expect(bare.mla!.positionScaling).to.deep.equal({ beta: 0.1, originalMaxPositionEmbeddings: 8192 });
    expect(() => moeCausalLMConfigFromHF({ ...WHOLE, rope_parameters: { rope_type: 'default', rope_theta: 1e4 } }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'mistral4' is implemented with its YaRN rope (rope_type 'yarn') but config.json sets rope_type \"default\" (string)");
    expect(() => moeCausalLMConfigFromHF({ ...WHOLE, rope_parameters: { ...WHOLE['rope_parameters'] as object, low_freq_factor: 1 } }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.rope_parameters' sets 'low_freq_factor', which MLA's YaRN as implemented here does not read");
    expect(() => moeCausalLMConfigFromHF({ ...WHOLE, rope_parameters: { ...WHOLE['rope_parameters'] as object, partial_rotary_factor: 0.25 } }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.rope_parameters.partial_rotary_factor' must make (qk_nope_head_dim + qk_rope_head_dim) · factor = qk_rope_head_dim (4 of 8) but got 0.25");
    expect(() => moeCausalLMConfigFromHF({ ...WHOLE, rope_parameters: [] }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.rope_parameters' must be an object but got an array of length 0");
  });

  it('builds the decoder with the checkpoint names configTensorPlan lists', () => {
    const before = tf.memory().numTensors;
    const model = buildMoECausalLM(WHOLE);
    const { tensors } = hfCheckpointTensors(model);
    const plan = configTensorPlan(WHOLE).all;
    expect(Object.keys(tensors).sort()).to.deep.equal(plan.map(e => e.name).sort());
    for (const e of plan) expect(tensors[e.name].shape, e.name).to.deep.equal(e.shape);
    expect((model.getLayer('model.layers.0.self_attn') as MLAAttention).positionScaling).to.deep.equal({ beta: 0.4, originalMaxPositionEmbeddings: 2 });
    tf.dispose(Object.values(tensors));
    model.dispose();
    expect(tf.memory().numTensors).to.equal(before);
  });

  for (const expertKernel of ['fused', 'reference']) {
    it(`${expertKernel}: logits equal a float64 transcription of Mistral4ForCausalLM`, () => {
      const model = buildMoECausalLM(WHOLE, { expertKernel });
      const rng = new Rng(8);
      for (const v of model.weights) {
        const size = v.shape.reduce((a: number, b) => a * (b as number), 1);
        const isNorm = v.originalName.includes('norm');
        v.write(tensorOf(rng.array(size, isNorm ? 0.2 : v.originalName.includes('gate.weight') ? 2 : 0.5).map(x => (isNorm ? 1 + x : x)), v.shape as number[]));
      }
      const { tensors } = hfCheckpointTensors(model);
      const w = Object.fromEntries(Object.entries(tensors).map(([k, t]) => [k, Float64Array.from(t.dataSync())]));
      tf.dispose(Object.values(tensors));
      const ids = [3, 17, 5, 9, 0, 12, 7];
      const input = tf.tensor2d([ids], [1, 7], 'int32');
      expectNoLeak(() => {
        const logits = model.predict(input) as tf.Tensor;
        expectClose(logits, mistral4Logits64(w, ids), 1e-4, 'logits');
        logits.dispose();
      });
      input.dispose();
      model.dispose();
    });
  }
});

describe('mistral4: the transformers fixture', () => {
  for (const expertKernel of ['fused', 'reference']) {
    it(`${expertKernel}: chooses the experts transformers chose on the fixture's block.x, with its weights`, async () => {
      await expectFixtureRouting('spec/fixtures/hf/mistral4', expertKernel);
    });
  }
});

describe("deepseek_v3 with the Hub's YaRN (the attention Mistral 4's is modelled on)", () => {
  it('reads rope_scaling as DeepseekV3Attention does: YaRN on the rope part, mscale², top-level rope_theta', async () => {
    const fixture = JSON.parse(await readFile('spec/fixtures/hf/deepseek_v3/config.json', 'utf8')) as HFConfig;
    // DeepSeek-V3's config.json style: legacy rope_scaling with `type`, rope_theta beside it
    const hub = { ...fixture, rope_parameters: undefined, rope_theta: 20000, rope_scaling: {
      type: 'yarn', factor: 40, original_max_position_embeddings: 16, beta_fast: 32, beta_slow: 1, mscale: 0.707, mscale_all_dim: 1,
    } };
    const c = moeCausalLMConfigFromHF(hub);
    const qk = (fixture['qk_nope_head_dim'] as number) + (fixture['qk_rope_head_dim'] as number);
    expect(c.mla!.ropeScaling).to.deep.include({ kind: 'yarn', factor: 40, originalMaxPositionEmbeddings: 16, betaFast: 32, betaSlow: 1 });
    expect((c.mla!.ropeScaling as YarnRope).attentionFactor).to.be.closeTo(getMscale(40, 0.707) / getMscale(40, 1), 1e-15);
    expect(c.mla!.softmaxScale).to.be.closeTo(getMscale(40, 1) ** 2 / Math.sqrt(qk), 1e-15);
    expect(c.mla!.positionScaling).to.equal(null);
    expect(c.ropeTheta).to.equal(20000);
    // the fixture's default rope keeps the plain path
    expect(moeCausalLMConfigFromHF(fixture).mla!.ropeScaling ?? null).to.equal(null);
  });
});
