/**
 * qwen3_5_moe_text, glm_moe_dsa and qwen3_next: their config.json read as transformers 5 reads it,
 * and their MoE block loaded from the Hub's per-expert layout and run by moeBlock, against a float64
 * JS transcription of the transformers modules (spec/helpers/glm_dsa64.ts) and its finite differences.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import { blockLayerIndex, loadMoEBlockWeights, moeBlockTensorPlan, type TensorSource } from '../../src/io/hf_block.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import {
  expertCount, isMoELayer, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices, type HFConfig,
} from '../../src/models/families.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import { moeBlock } from '../../src/ops/moe_block.js';
import type { MoEBlockWeights } from '../../src/ops/types.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { moeBlock64, type Params } from '../helpers/glm_dsa64.js';
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

const dot = (a: Float64Array, b: ArrayLike<number>) => a.reduce((s, v, i) => s + v * b[i], 0);

/**
 * moeBlock on the block loaded from `params`, against moeBlock64: out, the experts chosen, and the
 * gradients of sum(out·g) w.r.t. x and every checkpoint tensor (the per-expert ones through the
 * fused gate_up / down gradients) against central differences of moeBlock64.
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
  const want = moeBlock64(config, layer, params, x, T);
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

    const loss = (p: Params, xs: Float64Array) => dot(moeBlock64(config, layer, p, xs, T).out, g);
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

  describe('the transformers 5.17 fixtures: the experts and weights of the block\'s router', () => {
    for (const arch of ['qwen3_5_moe_text', 'glm_moe_dsa', 'qwen3_next']) {
      it(`${arch}: the same experts per token as block.router.output.2, the weights of output.1`, async () => {
        const dir = `spec/fixtures/hf/${arch}`;
        const golden = JSON.parse(readFileSync(`${dir}/golden.json`, 'utf8')) as { block: string; config: HFConfig };
        const file = await readSafetensorsFile(`${dir}/model.safetensors`);
        const tensors = await readSafetensorsFile(`${dir}/golden.safetensors`);
        const before = tf.memory().numTensors;
        const w = await loadMoEBlockWeights(file, golden.config, blockLayerIndex(golden.block));
        const x3 = await tensors.tensor('block.x');
        const x = tf.reshape(x3, [-1, x3.shape[2]!]) as tf.Tensor2D;
        const { out, routing } = moeBlock(x, w, moeBlockConfigFromHF(golden.config));
        const [indices, weights] = [await tensors.tensor('block.router.output.2'), await tensors.tensor('block.router.output.1')];
        const [ours, theirs] = [routing.experts.arraySync() as number[][], indices.arraySync() as number[][]];
        const [ourW, theirW] = [routing.weights.arraySync() as number[][], weights.arraySync() as number[][]];
        expect(ours.length).to.equal(15);
        for (let t = 0; t < ours.length; t++) {
          // glm's top-k is sorted=False: compare per token by expert id
          const byExpert = (e: number[], v: number[]) => e.map((id, k) => [id, v[k]]).sort((a, b) => a[0] - b[0]);
          const [a, b] = [byExpert(ours[t], ourW[t]), byExpert(theirs[t], theirW[t])];
          expect(a.map(p => p[0]), `${arch} token ${t} experts`).to.deep.equal(b.map(p => p[0]));
          expectClose(a.map(p => p[1]), b.map(p => p[1]), 1e-5, `${arch} token ${t} weights`);
        }
        tf.dispose([x3, x, out, routing.weights, routing.experts, routing.logits, indices, weights]);
        disposeMoEBlockWeights(w);
        expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
      });
    }
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
