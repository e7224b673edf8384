/**
 * glm_moe_dsa as a whole model: a tiny random checkpoint in the Hub layout (per-expert tensors,
 * the indexer's tensors under self_attn.indexer) loaded by loadHFCheckpoint gives the logits of a
 * float64 transcription of transformers' GlmMoeDsaForCausalLM (spec/helpers/glm_dsa64.ts), with an
 * index_topk that really drops keys; the config settings the graph does not implement are refused.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { configTensorPlan } from '../../src/io/hf_checkpoint_core.js';
import { moeCausalLMConfigFromHF } from '../../src/layers/moe_causal_lm.js';
import { moeLayerIndices, type HFConfig } from '../../src/models/families.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { cleanup, tempDir, writeCheckpoint } from '../io/checkpoint_helpers.js';
import { glmDsaLogits64, type Params } from '../helpers/glm_dsa64.js';
import { asF32, expectClose, Rng } from '../helpers/numeric.js';

/** GLM-5's layout at toy size: layer 0 dense, layer 1 MoE; the indexer keeps 3 keys of up to 7. */
const GLM_DSA: HFConfig = {
  model_type: 'glm_moe_dsa', vocab_size: 32, hidden_size: 8, num_hidden_layers: 2, num_attention_heads: 2,
  num_key_value_heads: 2, intermediate_size: 12, moe_intermediate_size: 4, n_routed_experts: 4, num_experts_per_tok: 2,
  n_group: 1, topk_group: 1, n_shared_experts: 1, routed_scaling_factor: 2.5, norm_topk_prob: true,
  mlp_layer_types: ['dense', 'sparse'], q_lora_rank: 6, kv_lora_rank: 5, qk_nope_head_dim: 3, qk_rope_head_dim: 4,
  v_head_dim: 3, index_n_heads: 2, index_head_dim: 6, index_topk: 3, rms_norm_eps: 1e-5,
  rope_parameters: { rope_type: 'default', rope_theta: 30 }, tie_word_embeddings: false,
};

describe('glm_moe_dsa whole model', () => {
  after(cleanup);

  it('loads the Hub layout and matches a float64 GlmMoeDsaForCausalLM, the indexer dropping keys', async () => {
    const plan = configTensorPlan(GLM_DSA).all;
    expect(plan.map(e => e.name)).to.include.members([
      'model.layers.0.self_attn.indexer.wq_b.weight', 'model.layers.1.self_attn.indexer.k_norm.bias',
      'model.layers.1.mlp.experts.3.down_proj.weight', 'model.layers.1.mlp.gate.e_score_correction_bias',
      'model.layers.0.mlp.gate_proj.weight', 'model.layers.1.mlp.shared_experts.up_proj.weight']);
    const rng = new Rng(21);
    const params: Params = new Map();
    for (const { name, shape } of plan) {
      const n = shape.reduce((a, b) => a * b, 1);
      const norm = /(layernorm|norm)\.weight$/.test(name);
      const scale = name.endsWith('mlp.gate.weight') ? 2 : name.endsWith('correction_bias') || name.endsWith('.bias') ? 0.1 : 0.5;
      params.set(name, { data: asF32(norm ? rng.array(n, 0.2).map(t => 1 + t) : rng.array(n, scale)), shape });
    }
    const dir = await tempDir('glm-dsa-');
    const tensors = Object.fromEntries([...params].map(([name, p]) => [name, tf.tensor(Float32Array.from(p.data), p.shape)]));
    await writeCheckpoint(dir, GLM_DSA, tensors);
    tf.dispose(Object.values(tensors));

    const ids = [3, 17, 5, 29, 0, 11, 8];
    const before = tf.memory().numTensors;
    const model = await loadHFCheckpoint(dir, { expertKernel: 'fused' });
    const input = tf.tensor2d([ids], [1, ids.length], 'int32');
    const logits = model.predict(input) as tf.Tensor;
    expect(logits.shape).to.deep.equal([1, ids.length, 32]);
    expectClose(logits, glmDsaLogits64(GLM_DSA, params, ids, moeLayerIndices(GLM_DSA)), 1e-5, 'logits');
    tf.dispose([input, logits]);
    model.dispose();
    expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
  });

  it('reads GlmMoeDsaConfig\'s defaults and refuses layers that share the previous indexer choice', () => {
    const c = moeCausalLMConfigFromHF({ ...GLM_DSA, q_lora_rank: undefined, index_topk: undefined, v_head_dim: undefined });
    expect(c.mla).to.deep.equal({
      qLoraRank: 2048, kvLoraRank: 5, qkNopeHeadDim: 3, qkRopeHeadDim: 4, vHeadDim: 256, ropeInterleave: true,
      attentionBias: false, indexer: { numHeads: 2, headDim: 6, topK: 2048 },
    });
    expect(c.moeLayers).to.deep.equal([1]);
    expect(c.denseIntermediateSize).to.equal(12);
    expect(moeCausalLMConfigFromHF({ ...GLM_DSA, indexer_types: ['full', 'full'] }).mla!.indexer!.topK).to.equal(3);
    const shared = "`moeCausalLMConfigFromHF()`: 'config.indexer_types' must be 'full' for each of the 2 layers (layers sharing " +
        "the previous layer's indexer choice are not implemented) but got ";
    expect(() => moeCausalLMConfigFromHF({ ...GLM_DSA, indexer_types: ['full', 'shared'] })).to.throw(OpArgumentError,
        `${shared}["full","shared"]`);
    expect(() => moeCausalLMConfigFromHF({ ...GLM_DSA, indexer_types: ['full'] })).to.throw(OpArgumentError, `${shared}["full"]`);
    // without indexer_types, GlmMoeDsaConfig derives them: index_topk_pattern, else index_topk_freq / index_skip_topk_offset
    expect(() => moeCausalLMConfigFromHF({ ...GLM_DSA, index_topk_pattern: 'FS' })).to.throw(OpArgumentError,
        `${shared}["full","shared"]`);
    expect(() => moeCausalLMConfigFromHF({ ...GLM_DSA, index_topk_freq: 2, index_skip_topk_offset: 0 })).to.throw(OpArgumentError,
        `${shared}["shared","full"]`);
    expect(moeCausalLMConfigFromHF({ ...GLM_DSA, index_topk_freq: 2 }).mla!.indexer!.numHeads).to.equal(2);  // offset 2: layers 0, 1 full
    expect(() => moeCausalLMConfigFromHF({ ...GLM_DSA, qk_rope_head_dim: 5 })).to.throw(OpArgumentError,
        "`moeCausalLMConfigFromHF()`: 'config.qk_rope_head_dim' must be even (rotary pairs) but got 5");
  });
});
