/**
 * The mistral4 family row (Mistral4ForCausalLM): config reading, its Hub block layout (per-expert
 * tensors fused on load, shared experts, no correction bias), and the loaded block against a
 * float64 transcription of Mistral4MoE (Mistral4TopkRouter: softmax, group-limited top-k with
 * masked scores 0.0, renormalised + 1e-20, × routed_scaling_factor; plus the shared experts).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { loadMoEBlockWeights, moeBlockTensorPlan, type TensorSource } from '../../src/io/hf_block.js';
import { type HFConfig, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices } from '../../src/models/families.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import { moeBlock } from '../../src/ops/moe_block.js';
import { Rng, asF32, expectClose, expectNoLeak, tensorOf } from '../helpers/numeric.js';
import { experts64 } from '../ops/expert_reference64.js';

const CONFIG: HFConfig = {
  model_type: 'mistral4', hidden_size: 8, moe_intermediate_size: 3, intermediate_size: 12, num_hidden_layers: 3,
  n_routed_experts: 8, num_experts_per_tok: 3, n_group: 4, topk_group: 2, first_k_dense_replace: 1,
  n_shared_experts: 2, routed_scaling_factor: 1.5, norm_topk_prob: true, hidden_act: 'silu',
};

const silu = (v: number) => v / (1 + Math.exp(-v));

interface Block64 { x: Float64Array; router: Float64Array; gate: Float64Array[]; up: Float64Array[]; down: Float64Array[];
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
  const W1 = new Float64Array(E * 2 * I * H);
  const W2 = new Float64Array(E * H * I);
  for (let e = 0; e < E; e++) {
    W1.set(b.gate[e], e * 2 * I * H);
    W1.set(b.up[e], (e * 2 + 1) * I * H);
    W2.set(b.down[e], e * H * I);
  }
  const out = experts64({ T, H, I, E, K, layout: 'outIn', activation: { kind: 'swiglu' }, experts, weights, x: b.x, W1, W2, lora1: [], lora2: [] });
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
      x: f(T * H, 1), router: f(E * H, 2), gate: Array.from({ length: E }, () => f(I * H)), up: Array.from({ length: E }, () => f(I * H)),
      down: Array.from({ length: E }, () => f(H * I)), sg: f(Is * H), su: f(Is * H), sd: f(H * Is),
    };
    const prefix = 'model.layers.2.mlp.';
    const tensors: Record<string, tf.Tensor> = {
      [`${prefix}gate.weight`]: tensorOf(b.router, [E, H]),
      [`${prefix}shared_experts.gate_proj.weight`]: tensorOf(b.sg, [Is, H]),
      [`${prefix}shared_experts.up_proj.weight`]: tensorOf(b.su, [Is, H]),
      [`${prefix}shared_experts.down_proj.weight`]: tensorOf(b.sd, [H, Is]),
    };
    for (let e = 0; e < E; e++) {
      tensors[`${prefix}experts.${e}.gate_proj.weight`] = tensorOf(b.gate[e], [I, H]);
      tensors[`${prefix}experts.${e}.up_proj.weight`] = tensorOf(b.up[e], [I, H]);
      tensors[`${prefix}experts.${e}.down_proj.weight`] = tensorOf(b.down[e], [H, I]);
    }
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
