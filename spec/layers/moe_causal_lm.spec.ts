import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { RotaryAttention } from '../../src/layers/attention.js';
import { LMHead, TokenEmbedding } from '../../src/layers/embedding.js';
import {
  addMoEAdapter, buildMoECausalLM, hfConfigOf, moeCausalLMConfigFromHF, sparseMoELayers, trainableVariables,
  WHOLE_MODEL_TYPES,
} from '../../src/layers/moe_causal_lm.js';
import { MODEL_TYPES } from '../../src/models/families.js';
import { RMSNorm } from '../../src/layers/rms_norm.js';
import { SparseMoE } from '../../src/layers/sparse_moe.js';
import { SwiGLUMLP } from '../../src/layers/swiglu_mlp.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { fixtureConfig, fixtureDir, golden, WHOLE_ARCHS } from '../io/checkpoint_helpers.js';

describe('MoECausalLM', () => {
  describe('reproduces the fixtures\' logits from the HF checkpoint alone (<= 1e-4 relative)', () => {
    for (const arch of WHOLE_ARCHS) {
      for (const kernel of ['reference', 'fused'] as const) {
        it(`${arch}, expertKernel '${kernel}'`, async () => {
          const model = await loadHFCheckpoint(fixtureDir(arch), { expertKernel: kernel });
          const g = await golden(arch);
          const ids = await g.tensor('input_ids');
          const want = await g.tensor('logits');
          const before = tf.memory().numTensors;
          const logits = model.predict(ids) as tf.Tensor;
          expect(logits.shape).to.deep.equal(want.shape);
          const err = maxRelativeError(logits.dataSync(), want.dataSync());
          expect(err, `${arch} ${kernel} logits: ${err.toExponential(2)}`).to.be.at.most(1e-4);
          logits.dispose();
          expect(tf.memory().numTensors).to.equal(before);
          tf.dispose([ids, want]);
          model.dispose();
        });
      }
    }
  });

  it('is a functional LayersModel: int32 ids [batch, seq] → logits, HF module paths as layer names', async () => {
    const config = await fixtureConfig('qwen2_moe');
    const model = buildMoECausalLM(config);
    expect(model).to.be.instanceOf(tfl.LayersModel);
    expect(model.inputs[0].dtype).to.equal('int32');
    expect(model.inputs[0].shape).to.deep.equal([null, null]);
    expect(model.outputs[0].shape).to.deep.equal([null, null, 97]);
    const kinds = model.layers.map(l => `${l.name}:${l.getClassName()}`);
    expect(kinds).to.deep.equal([
      'input_ids:InputLayer', 'model.embed_tokens:TokenEmbedding',
      ...[0, 1].flatMap(i => [
        `model.layers.${i}.input_layernorm:RMSNorm`, `model.layers.${i}.self_attn:RotaryAttention`,
        `model.layers.${i}.attn_residual:Add`, `model.layers.${i}.post_attention_layernorm:RMSNorm`,
        `model.layers.${i}.mlp:SparseMoE`, `model.layers.${i}.mlp_residual:Add`]),
      'model.norm:RMSNorm', 'lm_head:LMHead']);
    const moe = sparseMoELayers(model);
    expect(moe.map(l => [l.numExperts, l.intermediateSize, l.sharedExpert])).to.deep.equal([
      [8, 48, { intermediateSize: 80, gated: true }], [8, 48, { intermediateSize: 80, gated: true }]]);
    expect(moe[0].routing).to.deep.equal({ kind: 'softmaxTopK', topK: 2, renormalize: false });
    const attn = model.getLayer('model.layers.0.self_attn') as RotaryAttention;
    expect([attn.numHeads, attn.numKeyValueHeads, attn.headDim, attn.qkvBias, attn.outputBias, attn.qkNorm])
      .to.deep.equal([4, 2, 16, true, false, 'none']);
    expect(hfConfigOf(model)).to.deep.equal(config);
    model.dispose();
  });

  it('reads the per-family attention details from config.json', async () => {
    const details = async (arch: string) => {
      const c = moeCausalLMConfigFromHF(await fixtureConfig(arch));
      return [c.qkvBias, c.outputBias, c.qkNorm, c.headDim, c.ropeTheta, c.rmsNormEps, c.slidingWindow];
    };
    expect(await details('mixtral')).to.deep.equal([false, false, 'none', 16, 1e6, 1e-5, null]);
    expect(await details('qwen2_moe')).to.deep.equal([true, false, 'none', 16, 1e4, 1e-6, null]);
    expect(await details('qwen3_moe')).to.deep.equal([false, false, 'perHead', 16, 1e4, 1e-6, null]);
    expect(await details('olmoe')).to.deep.equal([false, false, 'full', 16, 1e4, 1e-5, null]);
    expect(await details('glm4_moe')).to.deep.equal([true, false, 'none', 16, 1e4, 1e-5, null]);
    const glm = await fixtureConfig('glm4_moe');
    expect(moeCausalLMConfigFromHF(glm).rotaryDim).to.equal(8);  // partial_rotary_factor 0.5 of head_dim 16
    expect(moeCausalLMConfigFromHF({ ...glm, use_qk_norm: true }).qkNorm).to.equal('perHead');
    // GLM-4.5-MoE's config class defaults to half the head; a full rope when a config says 1
    const noFactor = { ...glm, partial_rotary_factor: undefined, rope_parameters: { rope_type: 'default', rope_theta: 1e4 } };
    expect(moeCausalLMConfigFromHF(noFactor).rotaryDim).to.equal(8);
    expect(moeCausalLMConfigFromHF({ ...noFactor, partial_rotary_factor: 1 }).rotaryDim).to.equal(16);
    const deepseek = moeCausalLMConfigFromHF(await fixtureConfig('deepseek_v3'));
    expect(deepseek.mla).to.deep.equal({
      qLoraRank: null, kvLoraRank: 32, qkNopeHeadDim: 16, qkRopeHeadDim: 8, vHeadDim: 16, ropeInterleave: true, attentionBias: false,
    });
    expect(deepseek.moe.correctionBias).to.equal(true);
    expect(moeCausalLMConfigFromHF({ ...(await fixtureConfig('deepseek_v3')), q_lora_rank: undefined }).mla!.qLoraRank)
      .to.equal(1536);  // DeepseekV3Config's default: only an explicit null means a plain q_proj
    const legacy = { ...(await fixtureConfig('mixtral')), rope_parameters: undefined, rope_theta: 5000, sliding_window: 4096 };
    expect(moeCausalLMConfigFromHF(legacy).ropeTheta).to.equal(5000);
    expect(moeCausalLMConfigFromHF(legacy).slidingWindow).to.equal(4096);
  });

  it('puts a dense SwiGLU MLP in the layers that are not MoE and ties the head to the embedding when asked', async () => {
    const config = { ...(await fixtureConfig('qwen3_moe')), mlp_only_layers: [0], tie_word_embeddings: true };
    const model = buildMoECausalLM(config);
    expect(model.getLayer('model.layers.0.mlp')).to.be.instanceOf(SwiGLUMLP);
    expect((model.getLayer('model.layers.0.mlp') as SwiGLUMLP).intermediateSize).to.equal(96);
    expect(model.getLayer('model.layers.1.mlp')).to.be.instanceOf(SparseMoE);
    expect(model.layers.some(l => l instanceof LMHead)).to.equal(false);
    const embed = model.getLayer('model.embed_tokens') as TokenEmbedding;
    expect(embed.inboundNodes.length).to.equal(2);   // ids → hidden and hidden → logits
    const ids = tf.tensor2d([[1, 5, 9]], [1, 3], 'int32');
    const logits = model.predict(ids) as tf.Tensor;
    expect(logits.shape).to.deep.equal([1, 3, 97]);
    tf.dispose([ids, logits]);
    expect(model.layers.filter(l => l instanceof RMSNorm).length).to.equal(5);
    model.dispose();
  });

  it('builds zero weights (norms at one) without drawing random numbers when initializeWeights is false', async () => {
    const config = await fixtureConfig('qwen3_moe');
    const drawn = buildMoECausalLM(config);
    const zeros = buildMoECausalLM(config, { initializeWeights: false });
    for (const [i, w] of zeros.weights.entries()) {
      const values = Array.from(w.read().dataSync());
      const isNorm = /norm/.test(w.originalName);
      expect(new Set(values), w.originalName).to.deep.equal(new Set([isNorm ? 1 : 0]));
      // the default draws HF's normal init for the same weight
      if (!isNorm) expect(new Set(drawn.weights[i].read().dataSync()).size, w.originalName).to.be.greaterThan(1);
    }
    drawn.dispose();
    zeros.dispose();
  });

  it('addMoEAdapter leaves exactly the adapter tensors trainable', async () => {
    const model = buildMoECausalLM(await fixtureConfig('mixtral'));
    expect(trainableVariables(model).length).to.equal(model.weights.length);
    addMoEAdapter(model, { name: 'default', r: 2, alpha: 4, targets: ['router', 'experts.down'] });
    const names = model.trainableWeights.map(v => v.originalName);
    expect(names).to.deep.equal([0, 1].flatMap(i => ['router_A', 'router_B', 'down_A', 'down_B']
      .map(n => `model.layers.${i}.mlp/lora_default_${n}`)));
    expect(trainableVariables(model).map(v => v.name)).to.deep.equal(model.trainableWeights.map(v => (v.read() as tf.Variable).name));
    model.dispose();
  });

  it('builds every family whole, and refuses settings the graph does not implement', async () => {
    expect(WHOLE_MODEL_TYPES).to.deep.equal(['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'gpt_oss', 'glm4_moe', 'deepseek_v3',
      'ernie4_5_moe', 'hunyuan_v1_moe', 'minimax_m2', 'llama4_text', 'mistral4',
      'glm_moe_dsa', 'qwen3_next', 'qwen3_5_moe_text']);
    // the block-only families: their block loads, their decoder is refused with the reason
    expect(MODEL_TYPES.filter(t => !WHOLE_MODEL_TYPES.includes(t))).to.deep.equal(['gemma4_text']);
    expect(() => buildMoECausalLM({
      model_type: 'gemma4_text', vocab_size: 97, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4,
      enable_moe_block: true, num_experts: 4, top_k_experts: 2, moe_intermediate_size: 32,
    })).to.throw("`moeCausalLMConfigFromHF()`: 'gemma4_text' is supported at the MoE block level only (SparseMoE, " +
        "loadMoEBlockWeights), not as a whole model: Gemma 4's decoder layer (router and experts beside a dense MLP " +
        'with their own norms, attention with v_norm, scaling 1, k_eq_v and KV-shared layers, per-layer rope and head ' +
        'sizes, per-layer inputs, logit softcapping) is not built; whole models: mixtral, qwen2_moe, qwen3_moe, olmoe, ' +
        'gpt_oss, glm4_moe, deepseek_v3, ernie4_5_moe, hunyuan_v1_moe, minimax_m2, llama4_text, mistral4, glm_moe_dsa, ' +
        'qwen3_next, qwen3_5_moe_text');
    const mixtral = await fixtureConfig('mixtral');
    expect(() => buildMoECausalLM({ ...mixtral, rope_parameters: { rope_type: 'yarn', rope_theta: 1e4, factor: 4 } }))
      .to.throw("`moeCausalLMConfigFromHF()`: only the default rope is supported but config.json sets rope_type 'yarn'");
    const qwen3 = await fixtureConfig('qwen3_moe');
    expect(() => buildMoECausalLM({ ...qwen3, use_sliding_window: true }))
      .to.throw("`moeCausalLMConfigFromHF()`: sliding-window attention ('use_sliding_window': true) is not supported for 'qwen3_moe'");
    expect(() => buildMoECausalLM({ ...qwen3, hidden_size: 'big' }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.hidden_size' must be a finite number but got \"big\"");
    expect(() => buildMoECausalLM({ ...qwen3, vocab_size: 0 }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.vocab_size' must be an integer >= 1 but got 0");
    expect(() => buildMoECausalLM({ ...qwen3, tie_word_embeddings: 'no' }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.tie_word_embeddings' must be a boolean but got \"no\"");
    expect(() => buildMoECausalLM({ ...mixtral, num_attention_heads: 5 }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.hidden_size' (64) must be divisible by 'num_attention_heads' (5) when head_dim is not set");
    expect(() => buildMoECausalLM({ ...mixtral, rope_parameters: { rope_type: 'default', rope_theta: 1e4, partial_rotary_factor: 0.5 } }))
      .to.throw('`moeCausalLMConfigFromHF()`: partial rotary embeddings are not supported but config.json sets partial_rotary_factor 0.5');
    const glm = await fixtureConfig('glm4_moe');
    const glmRope = (factor: unknown) => ({ ...glm, partial_rotary_factor: undefined, rope_parameters: { rope_type: 'default', rope_theta: 1e4, partial_rotary_factor: factor } });
    expect(() => buildMoECausalLM(glmRope(0)))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.partial_rotary_factor' must be a number in (0, 1] but got 0");
    expect(() => buildMoECausalLM({ ...glmRope(0.5), partial_rotary_factor: 0.25 }))
      .to.throw('`moeCausalLMConfigFromHF()`: config.json sets partial_rotary_factor 0.25 at the top level and 0.5 in the rope settings; they must agree');
    expect(() => buildMoECausalLM(glmRope(0.1)))
      .to.throw('`moeCausalLMConfigFromHF()`: head_dim · partial_rotary_factor (16 · 0.1) must give an even rotary width >= 2 but gives 1');
    expect(() => buildMoECausalLM({ ...glm, rope_parameters: { rope_type: 'yarn', rope_theta: 1e4, factor: 4, partial_rotary_factor: 0.5 } }))
      .to.throw("`moeCausalLMConfigFromHF()`: only the default rope is supported but config.json sets rope_type 'yarn'");
    const deepseek = await fixtureConfig('deepseek_v3');
    expect(() => buildMoECausalLM({ ...deepseek, qk_rope_head_dim: 7 }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.qk_rope_head_dim' must be even (rotary pairs) but got 7");
    expect(() => buildMoECausalLM({ ...deepseek, kv_lora_rank: 0 }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.kv_lora_rank' must be an integer >= 1 but got 0");
    expect(() => buildMoECausalLM({ ...deepseek, rope_parameters: { rope_type: 'linear', rope_theta: 1e4, factor: 4 } }))
      .to.throw("`moeCausalLMConfigFromHF()`: only the default rope is supported but config.json sets rope_type 'linear'");
    const dense = tfl.sequential({ layers: [tfl.layers.dense({ units: 1, inputShape: [2] })] });
    expect(() => addMoEAdapter(dense, { name: 'a', r: 1, alpha: 1, targets: ['router'] }))
      .to.throw(`\`addMoEAdapter()\`: the model '${dense.name}' has no SparseMoE layer`);
    dense.dispose();
    expect(() => buildMoECausalLM({ ...qwen3, model_type: 'llama' }))
      .to.throw("`familyOf()`: config 'model_type' must be one of 'mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'glm4_moe', 'gpt_oss', 'ernie4_5_moe', 'hunyuan_v1_moe', 'minimax_m2', 'llama4_text', 'mistral4', 'gemma4_text', 'qwen3_5_moe_text', 'glm_moe_dsa', 'qwen3_next' (the supported MoE families) but got 'llama'");
  });
});
