/**
 * qwen3_5_moe_text, glm_moe_dsa and qwen3_next: their config.json read as transformers 5 reads it,
 * and their MoE block loaded from the Hub's per-expert layout and run by moeBlock, against a float64
 * JS transcription of the transformers modules (Qwen3_5MoeSparseMoeBlock, GlmMoeDsaMoE,
 * Qwen3NextSparseMoeBlock) and its finite differences.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { loadMoEBlockWeights, moeBlockTensorPlan, type TensorSource } from '../../src/io/hf_block.js';
import {
  expertCount, isMoELayer, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices, type HFConfig,
} from '../../src/models/families.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import { buildMoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { moeBlock } from '../../src/ops/moe_block.js';
import type { MoEBlockWeights } from '../../src/ops/types.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { Rng, asF32, expectClose, finiteDifferences } from '../helpers/numeric.js';

const QWEN3_5: HFConfig = {
  model_type: 'qwen3_5_moe_text', hidden_size: 8, num_hidden_layers: 2, moe_intermediate_size: 4,
  shared_expert_intermediate_size: 5, num_experts: 6, num_experts_per_tok: 2,
  // Qwen3_5MoeTopKRouter has no norm_topk_prob: it always renormalizes, whatever a config says
  norm_topk_prob: false,
};
const QWEN3_NEXT: HFConfig = {
  model_type: 'qwen3_next', hidden_size: 8, num_hidden_layers: 2, moe_intermediate_size: 4,
  shared_expert_intermediate_size: 5, num_experts: 6, num_experts_per_tok: 3,
};
const GLM_DSA: HFConfig = {
  model_type: 'glm_moe_dsa', hidden_size: 8, num_hidden_layers: 3, moe_intermediate_size: 4,
  n_routed_experts: 8, num_experts_per_tok: 3, n_group: 2, topk_group: 1, n_shared_experts: 1,
  routed_scaling_factor: 2.5, norm_topk_prob: true, mlp_layer_types: ['dense', 'sparse', 'sparse'],
};

/** A Hub checkpoint held in a Map of float64 arrays (also the reference's parameters). */
type Params = Map<string, { data: Float64Array; shape: number[] }>;

function hubParams(config: HFConfig, layer: number, rng: Rng): Params {
  const plan = moeBlockTensorPlan(config, layer);
  const entries = [plan.router.weight, plan.router.correctionBias, ...(plan.experts.kind === 'perExpert' ?
    [...plan.experts.gate, ...plan.experts.up, ...plan.experts.down] : []),
  plan.shared?.gate, plan.shared?.up, plan.shared?.down, plan.shared?.sigmoidGate];
  const params: Params = new Map();
  for (const e of entries) {
    if (e === undefined) continue;
    const n = e.shape.reduce((a, b) => a * b, 1);
    // router weights scaled up so that the top-k choice has wide gaps (finite differences keep it)
    const scale = e.name.endsWith('mlp.gate.weight') ? 2 : e.name.endsWith('correction_bias') ? 0.3 : 0.5;
    params.set(e.name, { data: asF32(rng.array(n, scale)), shape: e.shape });
  }
  return params;
}

function mapSource(params: Params): TensorSource {
  return {
    has: name => params.has(name),
    info: name => ({ dtype: 'F32', shape: params.get(name)!.shape }),
    tensor: async name => tf.tensor(Float32Array.from(params.get(name)!.data), params.get(name)!.shape),
  };
}

const silu = (v: number) => v / (1 + Math.exp(-v));
const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));

/** x·Wᵀ for one token: W [out, in] row-major. */
function linear(W: Float64Array, x: Float64Array, xOff: number, out: number, inSize: number): Float64Array {
  const y = new Float64Array(out);
  for (let o = 0; o < out; o++) {
    let s = 0;
    for (let i = 0; i < inSize; i++) s += W[o * inSize + i] * x[xOff + i];
    y[o] = s;
  }
  return y;
}

/** down(silu(gate(x)) · up(x)) for one token (an expert or the shared MLP). */
function swiglu(gate: Float64Array, up: Float64Array, down: Float64Array, x: Float64Array, xOff: number,
    H: number, I: number): Float64Array {
  const g = linear(gate, x, xOff, I, H);
  const u = linear(up, x, xOff, I, H);
  const a = g.map((v, i) => silu(v) * u[i]);
  return linear(down, a, 0, H, I);
}

/** Indices of the k largest values, largest first (the tests keep wide gaps, so no ties). */
function topK(values: ArrayLike<number>, k: number): number[] {
  return Array.from(values, (v, i) => [v, i]).sort((a, b) => b[0] - a[0]).slice(0, k).map(p => p[1]);
}

interface Block64 { out: Float64Array; experts: number[][] }

/**
 * The transformers block forward in float64, from the modeling files of transformers 5:
 * - qwen3_5_moe_text / qwen3_next: softmax(x·W_gᵀ) → top-k → /sum (Qwen3.5 always, Qwen3-Next when
 *   norm_topk_prob) → experts; plus sigmoid(x·w_sgᵀ) · shared_expert(x).
 * - glm_moe_dsa: s = sigmoid(x·W_gᵀ); groups scored by the sum of their two best s + bias; the
 *   topk_group best groups kept; top-k of s + bias there; weights s at those experts, / (sum + 1e-20)
 *   when norm_topk_prob, × routed_scaling_factor; plus the unweighted shared experts.
 */
function block64(config: HFConfig, layer: number, p: Params, x: Float64Array, T: number): Block64 {
  const { hidden: H, intermediate: I, experts: E, topK: K, sharedIntermediate: Is } = moeBlockDims(config);
  const at = (rel: string) => p.get(`model.layers.${layer}.mlp.${rel}`)!.data;
  const out = new Float64Array(T * H);
  const chosen: number[][] = [];
  const glm = config['model_type'] === 'glm_moe_dsa';
  for (let t = 0; t < T; t++) {
    const z = linear(at('gate.weight'), x, t * H, E, H);
    let idx: number[];
    let w: number[];
    if (glm) {
      const s = z.map(sigmoid);
      const bias = at('gate.e_score_correction_bias');
      const choice = s.map((v, e) => v + bias[e]);
      const nGroup = config['n_group'] as number;
      const per = E / nGroup;
      const groupScores = Array.from({ length: nGroup }, (_, g) => {
        const best = topK(choice.slice(g * per, (g + 1) * per), 2);
        return best.reduce((acc, i) => acc + choice[g * per + i], 0);
      });
      const groups = new Set(topK(groupScores, config['topk_group'] as number));
      const masked = choice.map((v, e) => groups.has(Math.floor(e / per)) ? v : -Infinity);
      idx = topK(masked, K);
      w = idx.map(e => s[e]);
      if (config['norm_topk_prob'] !== false) {
        const sum = w.reduce((a, b) => a + b, 0) + 1e-20;
        w = w.map(v => v / sum);
      }
      w = w.map(v => v * (config['routed_scaling_factor'] as number));
    } else {
      const m = Math.max(...z);
      const ez = z.map(v => Math.exp(v - m));
      const sum = ez.reduce((a, b) => a + b, 0);
      const prob = ez.map(v => v / sum);
      idx = topK(prob, K);
      w = idx.map(e => prob[e]);
      const renormalize = config['model_type'] === 'qwen3_5_moe_text' || config['norm_topk_prob'] !== false;
      if (renormalize) {
        const s = w.reduce((a, b) => a + b, 0);
        w = w.map(v => v / s);
      }
    }
    chosen.push(idx);
    for (let k = 0; k < K; k++) {
      const e = idx[k];
      const y = swiglu(at(`experts.${e}.gate_proj.weight`), at(`experts.${e}.up_proj.weight`),
          at(`experts.${e}.down_proj.weight`), x, t * H, H, I);
      for (let h = 0; h < H; h++) out[t * H + h] += w[k] * y[h];
    }
    const sharedName = glm ? 'shared_experts' : 'shared_expert';
    const y = swiglu(at(`${sharedName}.gate_proj.weight`), at(`${sharedName}.up_proj.weight`),
        at(`${sharedName}.down_proj.weight`), x, t * H, H, Is!);
    const scale = glm ? 1 : sigmoid(linear(at('shared_expert_gate.weight'), x, t * H, 1, H)[0]);
    for (let h = 0; h < H; h++) out[t * H + h] += scale * y[h];
  }
  return { out, experts: chosen };
}

const dot = (a: Float64Array, b: ArrayLike<number>) => a.reduce((s, v, i) => s + v * b[i], 0);

/**
 * moeBlock on the block loaded from `params`, against block64: out, the experts chosen, and the
 * gradients of sum(out·g) w.r.t. x and every checkpoint tensor (the per-expert ones through the
 * fused gate_up / down gradients) against central differences of block64.
 */
async function checkBlock(config: HFConfig, layer: number, seed: number): Promise<void> {
  const rng = new Rng(seed);
  const { hidden: H, intermediate: I, experts: E, topK: K } = moeBlockDims(config);
  const T = 6;
  const params = hubParams(config, layer, rng);
  const x = asF32(rng.array(T * H));
  const g = asF32(rng.array(T * H));
  const before = tf.memory().numTensors;
  const w = await loadMoEBlockWeights(mapSource(params), config, layer);
  const blockConfig = moeBlockConfigFromHF(config);
  const want = block64(config, layer, params, x, T);
  try {
    const xt = tf.tensor2d(Float32Array.from(x), [T, H]);
    const gt = tf.tensor2d(Float32Array.from(g), [T, H]);
    const s = w.shared!;
    const inputs: tf.Tensor[] = [xt, w.router.weight, w.experts.gateUp as tf.Tensor, w.experts.down as tf.Tensor,
      s.gate, s.up, s.down, ...(s.sigmoidGate ? [s.sigmoidGate] : [])];
    const f = (...ts: tf.Tensor[]) => {
      const weights: MoEBlockWeights = {
        router: { ...w.router, weight: ts[1] as tf.Tensor2D },
        experts: { ...w.experts, gateUp: ts[2] as tf.Tensor3D, down: ts[3] as tf.Tensor3D },
        shared: { gate: ts[4] as tf.Tensor2D, up: ts[5] as tf.Tensor2D, down: ts[6] as tf.Tensor2D,
          sigmoidGate: ts[7] as tf.Tensor2D | undefined },
      };
      const { out, routing } = moeBlock(ts[0] as tf.Tensor2D, weights, blockConfig, { trainExpertWeights: true });
      return tf.tidy(() => {
        const loss = tf.sum(tf.mul(out, gt));
        tf.dispose([out, routing.weights, routing.experts, routing.logits]);
        return loss;
      });
    };
    const { out, routing } = moeBlock(xt, w, blockConfig);
    expectClose(out, want.out, 1e-5, 'out');
    const chosen = routing.experts.arraySync() as number[][];
    for (let t = 0; t < T; t++) {
      // glm's top-k is sorted=False: compare the sets
      expect([...chosen[t]].sort(), `token ${t}`).to.deep.equal([...want.experts[t]].sort());
    }
    tf.dispose([out, routing.weights, routing.experts, routing.logits]);
    const grads = tf.grads(f)(inputs);

    const loss = (p: Params, xs: Float64Array) => dot(block64(config, layer, p, xs, T).out, g);
    expectClose(grads[0], finiteDifferences(xs => loss(params, xs), x), 1e-4, 'dx');
    /** d loss / d one checkpoint tensor */
    const fd = (name: string) => {
      const entry = params.get(name)!;
      return finiteDifferences(v => loss(new Map(params).set(name, { data: v, shape: entry.shape }), x), entry.data);
    };
    const prefix = `model.layers.${layer}.mlp.`;
    expectClose(grads[1], fd(`${prefix}gate.weight`), 1e-4, 'd router');
    const gateUp = grads[2].arraySync() as number[][][];
    const down = grads[3].arraySync() as number[][][];
    for (let e = 0; e < E; e++) {
      expectClose(gateUp[e].slice(0, I).flat(), fd(`${prefix}experts.${e}.gate_proj.weight`), 1e-4, `d gate_proj ${e}`);
      expectClose(gateUp[e].slice(I).flat(), fd(`${prefix}experts.${e}.up_proj.weight`), 1e-4, `d up_proj ${e}`);
      expectClose(down[e].flat(), fd(`${prefix}experts.${e}.down_proj.weight`), 1e-4, `d down_proj ${e}`);
    }
    const shared = config['model_type'] === 'glm_moe_dsa' ? 'shared_experts' : 'shared_expert';
    expectClose(grads[4], fd(`${prefix}${shared}.gate_proj.weight`), 1e-4, 'd shared gate');
    expectClose(grads[5], fd(`${prefix}${shared}.up_proj.weight`), 1e-4, 'd shared up');
    expectClose(grads[6], fd(`${prefix}${shared}.down_proj.weight`), 1e-4, 'd shared down');
    if (s.sigmoidGate) expectClose(grads[7], fd(`${prefix}shared_expert_gate.weight`), 1e-4, 'd shared_expert_gate');
    expect(K).to.be.lessThan(E);
    tf.dispose([xt, gt, ...grads]);
  } finally {
    disposeMoEBlockWeights(w);
  }
  expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
}

describe('models/families: qwen3_5_moe_text, glm_moe_dsa, qwen3_next', () => {
  describe('config.json', () => {
    it('reads each family\'s routing', () => {
      expect(moeBlockConfigFromHF(QWEN3_5)).to.deep.equal({
        routing: { kind: 'softmaxTopK', topK: 2, renormalize: true }, activation: { kind: 'swiglu' },
      });
      expect(moeBlockConfigFromHF(QWEN3_NEXT)).to.deep.equal({
        routing: { kind: 'softmaxTopK', topK: 3, renormalize: true }, activation: { kind: 'swiglu' },
      });
      expect(moeBlockConfigFromHF({ ...QWEN3_NEXT, norm_topk_prob: false }).routing.renormalize).to.equal(false);
      expect(moeBlockConfigFromHF(GLM_DSA)).to.deep.equal({
        routing: {
          kind: 'sigmoidGroupTopK', topK: 3, renormalize: true, nGroup: 2, topkGroup: 1, scalingFactor: 2.5,
        },
        activation: { kind: 'swiglu' },
      });
    });

    it('uses the config classes\' defaults', () => {
      const bare = (type: string) => ({ model_type: type, hidden_size: 16, num_hidden_layers: 4 });
      // Qwen3_5MoeTextConfig: 256 experts, top-8, moe 512, shared 512
      expect(moeBlockDims({ ...bare('qwen3_5_moe_text'), moe_intermediate_size: 512 })).to.deep.equal(
          { hidden: 16, intermediate: 512, experts: 256, topK: 8, sharedIntermediate: 512 });
      // Qwen3NextConfig: 512 experts, top-10, norm_topk_prob true
      expect(moeBlockConfigFromHF(bare('qwen3_next')).routing).to.deep.equal(
          { kind: 'softmaxTopK', topK: 10, renormalize: true });
      expect(expertCount(bare('qwen3_next'))).to.equal(512);
      // GlmMoeDsaConfig: 256 experts, top-8, one group, x2.5, 1 shared expert
      expect(moeBlockConfigFromHF(bare('glm_moe_dsa')).routing).to.deep.equal(
          { kind: 'sigmoidGroupTopK', topK: 8, renormalize: true, nGroup: 1, topkGroup: 1, scalingFactor: 2.5 });
      expect(moeBlockDims({ ...bare('glm_moe_dsa'), moe_intermediate_size: 32 }).sharedIntermediate).to.equal(32);
    });

    it('finds the MoE layers: all (Qwen3.5), decoder_sparse_step (Qwen3-Next), mlp_layer_types (GLM-DSA)', () => {
      expect(moeLayerIndices(QWEN3_5)).to.deep.equal([0, 1]);
      expect(moeLayerIndices({ ...QWEN3_5, mlp_only_layers: [0] })).to.deep.equal([0, 1]);
      expect(moeLayerIndices({ ...QWEN3_NEXT, num_hidden_layers: 4, mlp_only_layers: [2] })).to.deep.equal([0, 1, 3]);
      expect(moeLayerIndices({ ...QWEN3_NEXT, num_hidden_layers: 4, decoder_sparse_step: 2 })).to.deep.equal([1, 3]);
      expect(moeLayerIndices(GLM_DSA)).to.deep.equal([1, 2]);
      expect(moeLayerIndices({ ...GLM_DSA, mlp_layer_types: ['sparse', 'dense', 'sparse'] })).to.deep.equal([0, 2]);
      // without mlp_layer_types, GlmMoeDsaConfig makes the first first_k_dense_replace (default 3) dense
      const { mlp_layer_types: _, ...noTypes } = GLM_DSA;
      expect(moeLayerIndices({ ...noTypes, num_hidden_layers: 5 })).to.deep.equal([3, 4]);
      expect(moeLayerIndices({ ...noTypes, first_k_dense_replace: 1 })).to.deep.equal([1, 2]);
      expect(moeLayerIndices({ ...noTypes, first_k_dense_replace: 7 })).to.deep.equal([]);
      expect(isMoELayer(GLM_DSA, 0)).to.equal(false);
    });

    it('rejects an mlp_layer_types that is not one dense/sparse entry per layer', () => {
      expect(() => moeLayerIndices({ ...GLM_DSA, mlp_layer_types: ['dense', 'sparse'] })).to.throw(OpArgumentError,
          "`isMoELayer()`: 'config.mlp_layer_types' must list 'dense' or 'sparse' for each of the 3 layers " +
          'but got ["dense","sparse"]');
      expect(() => isMoELayer({ ...GLM_DSA, mlp_layer_types: ['dense', 'moe', 'sparse'] }, 1)).to.throw(
          OpArgumentError, "must list 'dense' or 'sparse' for each of the 3 layers but got");
      expect(() => isMoELayer({ ...GLM_DSA, mlp_layer_types: 'sparse' }, 1)).to.throw(
          OpArgumentError, "must list 'dense' or 'sparse' for each of the 3 layers but got");
    });

    it('names the Hub tensors of each block', () => {
      const qwen = moeBlockTensorPlan(QWEN3_NEXT, 1);
      expect(qwen.router.weight).to.deep.equal({ name: 'model.layers.1.mlp.gate.weight', shape: [6, 8] });
      expect(qwen.shared).to.deep.equal({
        gate: { name: 'model.layers.1.mlp.shared_expert.gate_proj.weight', shape: [5, 8] },
        up: { name: 'model.layers.1.mlp.shared_expert.up_proj.weight', shape: [5, 8] },
        down: { name: 'model.layers.1.mlp.shared_expert.down_proj.weight', shape: [8, 5] },
        sigmoidGate: { name: 'model.layers.1.mlp.shared_expert_gate.weight', shape: [1, 8] },
      });
      expect(moeBlockTensorPlan(QWEN3_5, 0).shared).to.deep.equal({
        gate: { name: 'model.layers.0.mlp.shared_expert.gate_proj.weight', shape: [5, 8] },
        up: { name: 'model.layers.0.mlp.shared_expert.up_proj.weight', shape: [5, 8] },
        down: { name: 'model.layers.0.mlp.shared_expert.down_proj.weight', shape: [8, 5] },
        sigmoidGate: { name: 'model.layers.0.mlp.shared_expert_gate.weight', shape: [1, 8] },
      });
      const glm = moeBlockTensorPlan(GLM_DSA, 2);
      expect(glm.router.correctionBias).to.deep.equal(
          { name: 'model.layers.2.mlp.gate.e_score_correction_bias', shape: [8] });
      expect(glm.shared!.gate).to.deep.equal({ name: 'model.layers.2.mlp.shared_experts.gate_proj.weight', shape: [4, 8] });
      expect(glm.shared).to.not.have.property('sigmoidGate');
      expect(glm.experts.kind === 'perExpert' && glm.experts.up[7]).to.deep.equal(
          { name: 'model.layers.2.mlp.experts.7.up_proj.weight', shape: [4, 8] });
      expect(() => moeBlockTensorPlan(GLM_DSA, 0)).to.throw(OpArgumentError,
          "`moeBlockTensorPlan()`: layer 0 of this 'glm_moe_dsa' model is a dense MLP, not an MoE block (MoE layers: 1, 2)");
    });
  });

  it('refuses them as whole models, saying what is missing', () => {
    const whole = (config: HFConfig) => () => buildMoECausalLM({ ...config, vocab_size: 32, num_attention_heads: 2 });
    const deltaNet = 'not as a whole model: its gated DeltaNet linear-attention layers are not implemented; whole models: ';
    expect(whole(QWEN3_NEXT)).to.throw(OpArgumentError,
        "`moeCausalLMConfigFromHF()`: 'qwen3_next' is supported at the MoE block level only (SparseMoE, loadMoEBlockWeights), " +
        deltaNet + 'mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, glm4_moe, deepseek_v3');
    expect(whole(QWEN3_5)).to.throw(OpArgumentError, `'qwen3_5_moe_text' is supported at the MoE block level only (SparseMoE, loadMoEBlockWeights), ${deltaNet}`);
    expect(whole(GLM_DSA)).to.throw(OpArgumentError, "'glm_moe_dsa' is supported at the MoE block level only (SparseMoE, " +
        'loadMoEBlockWeights), not as a whole model: its DeepSeek sparse attention (MLA with a top-k token indexer) is not implemented');
  });

  describe('the block, loaded from the Hub layout, against transformers\' forward in float64', () => {
    it('qwen3_5_moe_text: softmax top-k always renormalized, sigmoid-gated shared expert', async () => {
      await checkBlock(QWEN3_5, 1, 11);
    });
    it('qwen3_next: softmax top-k renormalized (norm_topk_prob), sigmoid-gated shared expert', async () => {
      await checkBlock(QWEN3_NEXT, 0, 12);
    });
    it('qwen3_next with norm_topk_prob false', async () => {
      await checkBlock({ ...QWEN3_NEXT, norm_topk_prob: false }, 1, 13);
    });
    it('glm_moe_dsa: sigmoid scores, biased group-limited selection, x2.5, unweighted shared experts', async () => {
      await checkBlock(GLM_DSA, 2, 14);
    });
  });
});
