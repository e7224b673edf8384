/**
 * qwen3_next and qwen3_5_moe_text as whole models: a tiny random checkpoint in the Hub layout (per-expert tensors,
 * linear_attn.* for the DeltaNet layers, a doubled q_proj for the gated attention) loaded by
 * loadHFCheckpoint gives the logits of a float64 transcription of transformers'
 * Qwen3NextForCausalLM / Qwen3_5MoeForCausalLM (spec/helpers/qwen3_next64.ts); what the graph does not
 * implement is refused.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { generate } from '../../src/generate/generate.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { configTensorPlan } from '../../src/io/hf_checkpoint_core.js';
import { moeCausalLMConfigFromHF } from '../../src/layers/moe_causal_lm.js';
import { moeLayerIndices, type HFConfig } from '../../src/models/families.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { cleanup, tempDir, writeCheckpoint } from '../io/checkpoint_helpers.js';
import type { Params } from '../helpers/glm_dsa64.js';
import { asF32, expectClose, Rng } from '../helpers/numeric.js';
import { qwen3NextLogits64 } from '../helpers/qwen3_next64.js';

/** Qwen3-Next at toy size: DeltaNet, DeltaNet, gated attention; layer 1 dense (mlp_only_layers). */
const QWEN3_NEXT: HFConfig = {
  model_type: 'qwen3_next', vocab_size: 32, hidden_size: 8, num_hidden_layers: 3, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 4, intermediate_size: 10, moe_intermediate_size: 4, shared_expert_intermediate_size: 6,
  num_experts: 4, num_experts_per_tok: 2, norm_topk_prob: true, decoder_sparse_step: 1, mlp_only_layers: [1],
  layer_types: ['linear_attention', 'linear_attention', 'full_attention'], linear_num_key_heads: 1, linear_num_value_heads: 2,
  linear_key_head_dim: 3, linear_value_head_dim: 2, linear_conv_kernel_dim: 3, rms_norm_eps: 1e-6,
  rope_parameters: { rope_type: 'default', rope_theta: 30, partial_rotary_factor: 0.5 }, tie_word_embeddings: false,
};

/** Qwen3.5-MoE's text model at the same size: every layer MoE, Qwen3_5GatedDeltaNet's four projections. */
const QWEN3_5: HFConfig = {
  ...QWEN3_NEXT, model_type: 'qwen3_5_moe_text', mlp_only_layers: undefined, decoder_sparse_step: undefined,
  norm_topk_prob: undefined, intermediate_size: undefined,
  rope_parameters: { rope_type: 'default', rope_theta: 30, partial_rotary_factor: 0.5, mrope_section: [1], mrope_interleaved: true },
};

/** A random Hub-layout checkpoint for `config` in a temp folder, and its tensors as float64. */
async function randomCheckpoint(config: HFConfig, seed: number): Promise<{ dir: string; params: Params }> {
  const rng = new Rng(seed);
  const params: Params = new Map();
  for (const { name, shape } of configTensorPlan(config).all) {
    const n = shape.reduce((a, b) => a * b, 1);
    const scale = name.endsWith('mlp.gate.weight') ? 2 : name.endsWith('layernorm.weight') || name.endsWith('_norm.weight') ||
      name === 'model.norm.weight' ? 0.2 : 0.5;
    const values = name.endsWith('linear_attn.norm.weight') ? rng.array(n, 0.2).map(t => 1 + t) : rng.array(n, scale);
    params.set(name, { data: asF32(values), shape });
  }
  const dir = await tempDir('qwen3-next-');
  const tensors = Object.fromEntries([...params].map(([name, p]) => [name, tf.tensor(Float32Array.from(p.data), p.shape)]));
  await writeCheckpoint(dir, config, tensors);
  tf.dispose(Object.values(tensors));
  return { dir, params };
}

async function expectLogitsMatch(config: HFConfig, seed: number): Promise<void> {
  const { dir, params } = await randomCheckpoint(config, seed);
  const ids = [3, 17, 5, 29, 0, 11];
  const before = tf.memory().numTensors;
  const model = await loadHFCheckpoint(dir, { expertKernel: 'fused' });
  const input = tf.tensor2d([ids], [1, ids.length], 'int32');
  const logits = model.predict(input) as tf.Tensor;
  expectClose(logits, qwen3NextLogits64(config, params, ids, moeLayerIndices(config)), 1e-5, 'logits');
  tf.dispose([input, logits]);
  model.dispose();
  expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
}

describe('qwen3_next and qwen3_5_moe_text whole models', () => {
  after(cleanup);

  it('qwen3_5_moe_text: Qwen3_5GatedDeltaNet\'s four projections, every layer MoE, the text rope without mrope keys', async () => {
    const names = configTensorPlan(QWEN3_5).all.map(e => e.name);
    expect(names).to.include.members(['model.layers.0.linear_attn.in_proj_qkv.weight', 'model.layers.1.linear_attn.in_proj_z.weight',
      'model.layers.0.linear_attn.in_proj_b.weight', 'model.layers.1.linear_attn.in_proj_a.weight', 'model.layers.1.mlp.shared_expert_gate.weight']);
    expect(names.filter(n => n.includes('in_proj_qkvz'))).to.deep.equal([]);
    await expectLogitsMatch(QWEN3_5, 41);
  });

  it('qwen3_next: loads the Hub layout and matches a float64 Qwen3NextForCausalLM (DeltaNet and gated attention layers)', async () => {
    const plan = configTensorPlan(QWEN3_NEXT).all;
    expect(plan.find(e => e.name === 'model.layers.2.self_attn.q_proj.weight')!.shape).to.deep.equal([16, 8]);
    expect(plan.map(e => e.name)).to.include.members([
      'model.layers.0.linear_attn.in_proj_qkvz.weight', 'model.layers.1.linear_attn.conv1d.weight', 'model.layers.0.linear_attn.A_log',
      'model.layers.2.self_attn.q_norm.weight', 'model.layers.1.mlp.gate_proj.weight', 'model.layers.2.mlp.shared_expert_gate.weight']);
    expect(plan.map(e => e.name)).to.not.include('model.layers.0.self_attn.q_proj.weight');
    await expectLogitsMatch(QWEN3_NEXT, 31);
  });

  it('generates the same tokens with the cache (DeltaNet states, attention keys) as without it', async () => {
    const { dir } = await randomCheckpoint(QWEN3_NEXT, 51);
    const model = await loadHFCheckpoint(dir, { expertKernel: 'fused' });
    const before = tf.memory().numTensors;
    const cached = await generate(model, [3, 17, 5, 29], { maxNewTokens: 6, useCache: true });
    const uncached = await generate(model, [3, 17, 5, 29], { maxNewTokens: 6, useCache: false });
    expect(Array.from(cached.ids)).to.deep.equal(Array.from(uncached.ids)).and.to.have.length(6);
    expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
    model.dispose();
  });

  it('reads Qwen3NextConfig\'s defaults and refuses a bad layer_types', () => {
    const { layer_types: _, ...noTypes } = QWEN3_NEXT;
    // default: every 4th layer full attention (full_attention_interval 4)
    expect(moeCausalLMConfigFromHF({ ...noTypes, num_hidden_layers: 4, mlp_only_layers: [] }).deltaNet!.layers)
      .to.deep.equal([true, true, true, false]);
    expect(moeCausalLMConfigFromHF({ ...noTypes, full_attention_interval: 2 }).deltaNet!.layers).to.deep.equal([true, false, true]);
    const { rope_parameters: _r, ...noRope } = QWEN3_NEXT;
    expect(moeCausalLMConfigFromHF({ ...noRope, head_dim: 16 }).rotaryDim).to.equal(4);  // partial_rotary_factor 0.25
    const c = moeCausalLMConfigFromHF(QWEN3_NEXT);
    expect(c).to.include({ zeroCenteredNorms: true, outputGate: true, rmsNormEps: 1e-6, qkNorm: 'perHead', rotaryDim: 2 });
    expect(c.deltaNet!.shape).to.deep.equal({ numKeyHeads: 1, numValueHeads: 2, keyHeadDim: 3, valueHeadDim: 2, convKernel: 3, projections: 'qkvz' });
    expect(() => moeCausalLMConfigFromHF({ ...QWEN3_NEXT, layer_types: ['linear_attention', 'sliding_attention', 'full_attention'] }))
      .to.throw(OpArgumentError, "`moeCausalLMConfigFromHF()`: 'config.layer_types' must list 'linear_attention' or " +
        "'full_attention' for each of the 3 layers but got [\"linear_attention\",\"sliding_attention\",\"full_attention\"]");
    expect(() => moeCausalLMConfigFromHF({ ...QWEN3_NEXT, linear_num_value_heads: 3, linear_num_key_heads: 2 }))
      .to.throw(OpArgumentError, "`moeCausalLMConfigFromHF()`: 'config.linear_num_value_heads' (3) must be a multiple of 'linear_num_key_heads' (2)");
  });
});
