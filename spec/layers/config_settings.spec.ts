/**
 * No silent acceptance: a config.json setting that changes what the model computes but that the
 * graph does not apply is an error naming the key, the value and what is supported; and building
 * or loading, failing or not, leaves no tensor behind.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { RotaryAttention } from '../../src/layers/attention.js';
import { buildMoECausalLM, moeCausalLMConfigFromHF } from '../../src/layers/moe_causal_lm.js';
import { moeBlockConfigFromHF, type HFConfig } from '../../src/models/families.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { cleanup, fixtureConfig, fixtureDir, readAll, tempDir, WHOLE_ARCHS, writeCheckpoint } from '../io/checkpoint_helpers.js';

const OP = '`moeCausalLMConfigFromHF()`: ';

/** buildMoECausalLM(config) throws an OpArgumentError with exactly `message` and leaves no tensor. */
function expectRefused(config: HFConfig, message: string): void {
  const before = tf.memory().numTensors;
  let error: unknown = null;
  try {
    buildMoECausalLM(config).dispose();
  } catch (e) {
    error = e;
  }
  expect(error, message).to.be.instanceOf(OpArgumentError);
  expect((error as Error).message).to.equal(message);
  expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
}

describe('MoECausalLM config settings: applied or refused, never ignored', () => {
  after(cleanup);

  it("hidden_act: 'silu' or 'swish' (both SiLU in transformers) for the SwiGLU families, anything else refused", async () => {
    for (const arch of WHOLE_ARCHS.filter(a => a !== 'gpt_oss')) {
      const config = await fixtureConfig(arch);
      for (const act of ['gelu', 'relu', 'gelu_pytorch_tanh']) {
        expectRefused({ ...config, hidden_act: act },
          `\`moeBlockConfigFromHF()\`: 'config.hidden_act' must be 'silu' or 'swish' (the SwiGLU gate activation '${arch}' computes) ` +
          `but got ${JSON.stringify(act)} (string)`);
      }
      expectRefused({ ...config, hidden_act: 7 },
        `\`moeBlockConfigFromHF()\`: 'config.hidden_act' must be 'silu' or 'swish' (the SwiGLU gate activation '${arch}' computes) but got 7 (number)`);
      for (const act of ['silu', 'swish', undefined]) {
        const model = buildMoECausalLM({ ...config, hidden_act: act });
        model.dispose();
      }
    }
    // the block-level families too; gpt-oss's experts hard-code their clamped SwiGLU and do not read hidden_act
    const deepseek = await fixtureConfig('deepseek_v3');
    expect(() => moeBlockConfigFromHF({ ...deepseek, hidden_act: 'gelu' }))
      .to.throw("`moeBlockConfigFromHF()`: 'config.hidden_act' must be 'silu' or 'swish' (the SwiGLU gate activation 'deepseek_v3' computes) but got \"gelu\" (string)");
    expect(moeBlockConfigFromHF({ ...(await fixtureConfig('gpt_oss')), hidden_act: 'gelu' }).activation.kind).to.equal('clampedSwiglu');
    buildMoECausalLM({ ...(await fixtureConfig('gpt_oss')), hidden_act: 'gelu' }).dispose();
  });

  it('rope: only the default rope, every key it would ignore refused, rope_scaling and rope_parameters must agree', async () => {
    const mixtral = await fixtureConfig('mixtral');
    const rope = (parameters: unknown) => ({ ...mixtral, rope_parameters: parameters });
    for (const [key, value] of [
      ['factor', 4], ['original_max_position_embeddings', 4096], ['low_freq_factor', 1], ['high_freq_factor', 4],
      ['beta_fast', 32], ['attention_factor', 1.5],
    ] as const) {
      expectRefused(rope({ rope_type: 'default', rope_theta: 1e6, [key]: value }),
        `${OP}'config.rope_parameters' sets '${key}', which the default rope does not use ` +
        "(only 'rope_type', 'type', 'rope_theta', 'partial_rotary_factor'); a scaled rope is not implemented");
    }
    for (const type of ['linear', 'dynamic', 'yarn', 'llama3', 'longrope', 'made_up']) {
      expectRefused(rope({ rope_type: type, rope_theta: 1e6, factor: 2 }),
        `${OP}only the default rope is supported but config.json sets rope_type '${type}'`);
    }
    // transformers 4's key, alone or next to rope_type
    expectRefused({ ...mixtral, rope_parameters: undefined, rope_scaling: { type: 'linear', factor: 2 } },
      `${OP}only the default rope is supported but config.json sets type 'linear'`);
    expectRefused(rope({ rope_type: 'default', type: 'linear', rope_theta: 1e6 }),
      `${OP}only the default rope is supported but config.json sets type 'linear'`);
    expectRefused({ ...mixtral, rope_scaling: { rope_type: 'linear', factor: 8, rope_theta: 1e6 } },
      `${OP}config.json sets both 'rope_parameters' {"rope_theta":1000000,"rope_type":"default"} and 'rope_scaling' ` +
      '{"factor":8,"rope_theta":1000000,"rope_type":"linear"} and they disagree (transformers 5 reads rope_parameters, ' +
      'older versions rope_scaling); keep one of them');
    expectRefused({ ...mixtral, rope_theta: 1e4 },
      `${OP}config.json sets rope_theta 10000 (number) at the top level and 1000000 in 'rope_parameters'; they must agree`);
    expectRefused({ ...mixtral, partial_rotary_factor: 0.5 },
      `${OP}partial rotary embeddings are not supported but config.json sets partial_rotary_factor 0.5 (number)`);
    expectRefused(rope('default'), `${OP}'config.rope_parameters' must be an object but got "default" (string)`);
    // the same settings twice (key order aside), a top-level theta that agrees, or rope_scaling alone: accepted and applied
    const theta = (c: HFConfig) => moeCausalLMConfigFromHF(c).ropeTheta;
    expect(theta({ ...mixtral, rope_scaling: { rope_type: 'default', rope_theta: 1e6 } })).to.equal(1e6);
    expect(theta({ ...mixtral, rope_theta: 1e6 })).to.equal(1e6);
    expect(theta({ ...mixtral, rope_parameters: undefined, rope_scaling: { rope_type: 'default', rope_theta: 5e5 } })).to.equal(5e5);
    expect(theta({ ...mixtral, rope_parameters: { rope_type: 'default' }, rope_theta: 2e5 })).to.equal(2e5);
  });

  it('training-time settings the graph does not implement (attention dropout, router jitter) are refused', async () => {
    const mixtral = await fixtureConfig('mixtral');
    expectRefused({ ...mixtral, attention_dropout: 0.1 },
      `${OP}attention dropout is not implemented: 'config.attention_dropout' must be 0 but got 0.1 (number)`);
    expectRefused({ ...mixtral, router_jitter_noise: 0.01 },
      `${OP}router jitter noise is not implemented: 'config.router_jitter_noise' must be 0 but got 0.01 (number)`);
    buildMoECausalLM({ ...mixtral, attention_dropout: 0, router_jitter_noise: 0 }).dispose();
  });

  it('layer_types must say what the graph computes for every layer; OLMoE head_dim must be hidden / heads', async () => {
    const qwen2 = await fixtureConfig('qwen2_moe');
    expectRefused({ ...qwen2, layer_types: ['full_attention', 'sliding_attention'] },
      `${OP}'config.layer_types' must list 'full_attention' for each of the 2 layers (what this 'qwen2_moe' graph computes) ` +
      'but got ["full_attention","sliding_attention"]');
    expectRefused({ ...qwen2, layer_types: ['full_attention'] },
      `${OP}'config.layer_types' must list 'full_attention' for each of the 2 layers (what this 'qwen2_moe' graph computes) but got ["full_attention"]`);
    const mixtral = await fixtureConfig('mixtral');
    expectRefused({ ...mixtral, sliding_window: 16, layer_types: ['full_attention', 'full_attention'] },
      `${OP}'config.layer_types' must list 'sliding_attention' for each of the 2 layers (what this 'mixtral' graph computes) ` +
      'but got ["full_attention","full_attention"]');
    buildMoECausalLM({ ...mixtral, sliding_window: 16, layer_types: ['sliding_attention', 'sliding_attention'] }).dispose();
    const olmoe = await fixtureConfig('olmoe');
    expectRefused({ ...olmoe, head_dim: 32 },
      `${OP}'config.head_dim' of 'olmoe' must be hidden_size / num_attention_heads (16) or unset but got 32 (number)`);
    buildMoECausalLM({ ...olmoe, head_dim: 16 }).dispose();
  });

  it('gpt_oss: YaRN read as transformers reads it, sliding/full layers from layer_types, sinks; what it cannot apply refused', async () => {
    const gptOss = await fixtureConfig('gpt_oss');
    const c = moeCausalLMConfigFromHF(gptOss);
    expect([c.ropeTheta, c.ropeScaling, c.layerWindows, c.sinks, c.qkvBias, c.outputBias, c.headDim]).to.deep.equal([
      150000,
      { kind: 'yarn', factor: 32, originalMaxPositionEmbeddings: 4096, betaFast: 32, betaSlow: 1, truncate: false,
        attentionFactor: 0.1 * Math.log(32) + 1 },
      [128, null], true, true, true, 16]);
    const yarn = gptOss['rope_parameters'] as Record<string, unknown>;
    const withRope = (change: Record<string, unknown>) => ({ ...gptOss, rope_parameters: { ...yarn, ...change } });
    // transformers' defaults: truncate true, beta_fast 32 / beta_slow 1 when unset or 0; attention_factor when set
    expect(moeCausalLMConfigFromHF(withRope({ truncate: undefined, beta_fast: 0, beta_slow: null, attention_factor: 1.5 })).ropeScaling)
      .to.deep.equal({ kind: 'yarn', factor: 32, originalMaxPositionEmbeddings: 4096, betaFast: 32, betaSlow: 1, truncate: true, attentionFactor: 1.5 });
    expect(moeCausalLMConfigFromHF({ ...gptOss, rope_parameters: { rope_type: 'default', rope_theta: 1e4 } }).ropeScaling).to.equal(null);
    // the Hub's gpt-oss config.json: rope_scaling without a theta, rope_theta at the top level
    const { rope_theta: hubTheta, ...hubRope } = yarn;
    const hub = moeCausalLMConfigFromHF({ ...gptOss, rope_parameters: undefined, rope_scaling: hubRope, rope_theta: hubTheta });
    expect([hub.ropeTheta, hub.ropeScaling]).to.deep.equal([c.ropeTheta, c.ropeScaling]);
    // no layer_types: GptOssConfig's alternation, sliding first
    expect(moeCausalLMConfigFromHF({ ...gptOss, layer_types: undefined, num_hidden_layers: 3, sliding_window: 5 }).layerWindows)
      .to.deep.equal([5, null, 5]);
    const model = buildMoECausalLM({ ...gptOss, layer_types: ['full_attention', 'sliding_attention'], sliding_window: 4 });
    expect([0, 1].map(i => (model.getLayer(`model.layers.${i}.self_attn`) as RotaryAttention).slidingWindow)).to.deep.equal([null, 4]);
    model.dispose();

    expectRefused(withRope({ factor: undefined }),
      `${OP}a YaRN rope needs 'rope_parameters.factor' but config.json does not set it`);
    expectRefused(withRope({ original_max_position_embeddings: null }),
      `${OP}a YaRN rope needs 'rope_parameters.original_max_position_embeddings' but config.json does not set it`);
    expectRefused(withRope({ factor: 0.5 }), `${OP}'config.rope_parameters.factor' must be >= 1 but got 0.5`);
    expectRefused(withRope({ truncate: 'no' }), `${OP}'config.rope_parameters.truncate' must be a boolean but got "no" (string)`);
    expectRefused(withRope({ mscale: 1, mscale_all_dim: 1 }),
      `${OP}'config.rope_parameters' sets 'mscale', 'mscale_all_dim', which YaRN as implemented here does not read ` +
      "(only 'rope_type', 'type', 'rope_theta', 'partial_rotary_factor', 'factor', 'original_max_position_embeddings', " +
      "'beta_fast', 'beta_slow', 'truncate', 'attention_factor')");
    expectRefused(withRope({ rope_type: 'llama3' }),
      `${OP}'gpt_oss' supports the default and 'yarn' ropes but config.json sets rope_type 'llama3'`);
    expectRefused(withRope({ type: 'linear' }),
      `${OP}'gpt_oss' supports the default and 'yarn' ropes but config.json sets type 'linear'`);
    expectRefused(withRope({ type: 'yarn', rope_type: 'default' }),
      `${OP}'config.rope_parameters' sets rope_type 'default' and type 'yarn'; they must agree`);
    expectRefused({ ...gptOss, rope_parameters: undefined, rope_theta: 150000 },
      `${OP}config.json of 'gpt_oss' must set 'rope_parameters' (or 'rope_scaling'): its config class's default is a yarn rope`);
    expectRefused({ ...gptOss, layer_types: ['sliding_attention', 'chunked_attention'] },
      `${OP}'config.layer_types' must list 'sliding_attention' or 'full_attention' for each of the 2 layers ` +
      'but got ["sliding_attention","chunked_attention"]');
    expectRefused({ ...gptOss, layer_types: ['full_attention'] },
      `${OP}'config.layer_types' must list 'sliding_attention' or 'full_attention' for each of the 2 layers but got ["full_attention"]`);
  });

  it('sizes that would make a weight larger than a tensor can hold are refused before anything is allocated', async () => {
    const mixtral = await fixtureConfig('mixtral');
    expectRefused({ ...mixtral, vocab_size: 5e7 },
      "`buildMoECausalLM()`: the config makes weights larger than a tensor can hold (2147483647 elements): " +
      'model.embed_tokens.weight [50000000,64] = 3200000000');
    expectRefused({ ...mixtral, num_local_experts: 2 ** 20, intermediate_size: 2 ** 10, vocab_size: 2 ** 26 },
      "`buildMoECausalLM()`: the config makes weights larger than a tensor can hold (2147483647 elements): " +
      `model.embed_tokens.weight [${2 ** 26},64] = ${2 ** 32}, mlp gate_up (fused experts) [${2 ** 20},${2 ** 11},64] = ${2 ** 37}`);
  });

  it('a config that fails while building (after some layers made their weights) leaves no tensor', async () => {
    const mixtral = await fixtureConfig('mixtral');
    expectRefused({ ...mixtral, num_key_value_heads: 3 }, "`RotaryAttention()`: 'numKeyValueHeads' (3) must divide 'numHeads' (4)");
    expectRefused({ ...mixtral, rms_norm_eps: -1 }, "`RMSNorm()`: 'epsilon' must be >= 0 but got -1");
    expectRefused({ ...mixtral, num_attention_heads: 2, head_dim: 7 }, "`RotaryAttention()`: 'headDim' must be even (rotary pairs) but got 7");
    const qwen2 = await fixtureConfig('qwen2_moe');
    expectRefused({ ...qwen2, mlp_only_layers: [1], intermediate_size: 0 },
      `${OP}'config.intermediate_size' must be an integer >= 1 but got 0`);
  });

  it('a tied model (built, or loaded from a checkpoint) leaves no tensor after dispose', async () => {
    const config = { ...(await fixtureConfig('mixtral')), tie_word_embeddings: true };
    let before = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) buildMoECausalLM(config).dispose();
    expect(tf.memory().numTensors).to.equal(before);
    // rebuilt from model.json (tf.loadLayersModel calls the shared layer twice again)
    const built = buildMoECausalLM(config);
    let artifacts: tf.io.ModelArtifacts | null = null;
    await built.save(tf.io.withSaveHandler(async a => {
      artifacts = a;
      return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON' } };
    }));
    built.dispose();
    expect(tf.memory().numTensors).to.equal(before);
    for (let i = 0; i < 2; i++) (await tfl.loadLayersModel(tf.io.fromMemory(artifacts!))).dispose();
    expect(tf.memory().numTensors).to.equal(before);
    const tensors = await readAll(join(fixtureDir('mixtral'), 'model.safetensors'));
    tensors['lm_head.weight'].dispose();
    delete tensors['lm_head.weight'];
    const dir = await tempDir();
    await writeCheckpoint(dir, config, tensors);
    tf.dispose(Object.values(tensors));
    before = tf.memory().numTensors;
    for (let i = 0; i < 3; i++) {
      const model = await loadHFCheckpoint(dir);
      const ids = tf.tensor2d([[1, 2, 3]], [1, 3], 'int32');
      const logits = model.predict(ids) as tf.Tensor;
      expect(logits.shape).to.deep.equal([1, 3, 97]);
      tf.dispose([ids, logits]);
      model.dispose();
    }
    expect(tf.memory().numTensors).to.equal(before);
  });
});
