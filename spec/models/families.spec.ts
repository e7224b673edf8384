import { expect } from 'chai';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import {
  FAMILIES, MODEL_TYPES, expertCount, familyOf, isMoELayer, moeBlockConfigFromHF, moeBlockDims,
  moeLayerIndices, type HFConfig,
} from '../../src/models/families.js';
import { OpArgumentError } from '../../src/ops/validate.js';

const FIXTURES = 'spec/fixtures/hf';
const fixtureConfig = (arch: string): HFConfig =>
  JSON.parse(readFileSync(`${FIXTURES}/${arch}/config.json`, 'utf8')) as HFConfig;

/** A GLM-4.5-Air-like config.json (the keys its Hub config.json sets). */
const GLM: HFConfig = {
  model_type: 'glm4_moe', hidden_size: 64, moe_intermediate_size: 16, num_hidden_layers: 4,
  n_routed_experts: 8, num_experts_per_tok: 2, n_group: 1, topk_group: 1, n_shared_experts: 1,
  routed_scaling_factor: 1.0, norm_topk_prob: true, first_k_dense_replace: 1,
};
const GPT_OSS: HFConfig = {
  model_type: 'gpt_oss', hidden_size: 64, intermediate_size: 32, num_hidden_layers: 3,
  num_local_experts: 4, num_experts_per_tok: 2, swiglu_limit: 5,
};
const OLMOE: HFConfig = {
  model_type: 'olmoe', hidden_size: 64, intermediate_size: 32, num_hidden_layers: 2,
  num_experts: 8, num_experts_per_tok: 2,
};

/** An ERNIE-4.5-21B-A3B-like config.json (its Hub keys, small sizes). */
const ERNIE: HFConfig = {
  model_type: 'ernie4_5_moe', hidden_size: 64, intermediate_size: 96, moe_intermediate_size: 16, num_hidden_layers: 4,
  moe_num_experts: 8, moe_k: 2, moe_num_shared_experts: 2, moe_layer_start_index: 1, moe_layer_end_index: 3,
  moe_layer_interval: 1, moe_norm_min: 1e-12, use_bias: false,
};
/** A Hunyuan-A13B-like config.json. */
const HUNYUAN: HFConfig = {
  model_type: 'hunyuan_v1_moe', hidden_size: 64, intermediate_size: 24, num_hidden_layers: 2, num_experts: 8, moe_topk: 2,
};
/** A MiniMax-M2-like config.json. */
const MINIMAX: HFConfig = {
  model_type: 'minimax_m2', hidden_size: 64, intermediate_size: 24, num_hidden_layers: 2, num_local_experts: 8,
  num_experts_per_tok: 3,
};

describe('models/families', () => {
  describe('moeBlockConfigFromHF', () => {
    it('reads the routing of each fixture family', () => {
      expect(moeBlockConfigFromHF(fixtureConfig('mixtral'))).to.deep.equal({
        routing: { kind: 'softmaxTopK', topK: 2, renormalize: true }, activation: { kind: 'swiglu' },
      });
      expect(moeBlockConfigFromHF(fixtureConfig('qwen2_moe'))).to.deep.equal({
        routing: { kind: 'softmaxTopK', topK: 2, renormalize: false }, activation: { kind: 'swiglu' },
      });
      expect(moeBlockConfigFromHF(fixtureConfig('qwen3_moe'))).to.deep.equal({
        routing: { kind: 'softmaxTopK', topK: 2, renormalize: true }, activation: { kind: 'swiglu' },
      });
      expect(moeBlockConfigFromHF(fixtureConfig('deepseek_v3'))).to.deep.equal({
        routing: {
          kind: 'sigmoidGroupTopK', topK: 4, renormalize: true, nGroup: 4, topkGroup: 2, scalingFactor: 2.5,
        },
        activation: { kind: 'swiglu' },
      });
    });

    it('reads the routing of the olmoe, glm4_moe and gpt_oss fixtures', () => {
      expect(moeBlockConfigFromHF(fixtureConfig('olmoe'))).to.deep.equal({
        routing: { kind: 'softmaxTopK', topK: 2, renormalize: false }, activation: { kind: 'swiglu' },
      });
      expect(moeBlockConfigFromHF(fixtureConfig('glm4_moe'))).to.deep.equal({
        routing: {
          kind: 'sigmoidGroupTopK', topK: 4, renormalize: true, nGroup: 1, topkGroup: 1, scalingFactor: 2.5,
        },
        activation: { kind: 'swiglu' },
      });
      expect(moeBlockConfigFromHF(fixtureConfig('gpt_oss'))).to.deep.equal({
        routing: { kind: 'topKSoftmax', topK: 2 },
        activation: { kind: 'clampedSwiglu', alpha: 1.702, limit: 7 },
      });
      expect(moeLayerIndices(fixtureConfig('glm4_moe'))).to.deep.equal([1]);
      expect(moeBlockDims(fixtureConfig('glm4_moe')).sharedIntermediate).to.equal(32);
      expect(moeBlockDims(fixtureConfig('olmoe')).intermediate).to.equal(48);
    });

    it('reads GLM-4-MoE, OLMoE and gpt-oss configs', () => {
      expect(moeBlockConfigFromHF(GLM)).to.deep.equal({
        routing: {
          kind: 'sigmoidGroupTopK', topK: 2, renormalize: true, nGroup: 1, topkGroup: 1, scalingFactor: 1,
        },
        activation: { kind: 'swiglu' },
      });
      // OLMoE's config class defaults norm_topk_prob to false
      expect(moeBlockConfigFromHF(OLMOE).routing).to.deep.equal(
          { kind: 'softmaxTopK', topK: 2, renormalize: false });
      expect(moeBlockConfigFromHF({ ...OLMOE, norm_topk_prob: true }).routing.renormalize).to.equal(true);
      expect(moeBlockConfigFromHF(GPT_OSS)).to.deep.equal({
        routing: { kind: 'topKSoftmax', topK: 2 },
        activation: { kind: 'clampedSwiglu', alpha: 1.702, limit: 5 },
      });
      const { swiglu_limit: _, ...noLimit } = GPT_OSS;
      expect(moeBlockConfigFromHF(noLimit).activation).to.deep.equal(
          { kind: 'clampedSwiglu', alpha: 1.702, limit: 7 });
    });

    it('reads ERNIE-4.5-MoE, Hunyuan and MiniMax-M2 configs', () => {
      expect(moeBlockConfigFromHF(ERNIE)).to.deep.equal({
        routing: { kind: 'softmaxBiasedTopK', topK: 2, normMin: 1e-12 }, activation: { kind: 'swiglu' },
      });
      expect(moeBlockDims(ERNIE)).to.deep.equal({ hidden: 64, intermediate: 16, experts: 8, topK: 2, sharedIntermediate: 32 });
      expect(moeBlockDims({ ...ERNIE, moe_num_shared_experts: 0 })).to.not.have.property('sharedIntermediate');
      // Ernie4_5_MoeConfig's defaults: moe_k 6, moe_norm_min 1e-12, two shared experts
      const { moe_k: _k, moe_norm_min: _n, moe_num_shared_experts: _s, ...ernieDefaults } = ERNIE;
      expect(moeBlockConfigFromHF(ernieDefaults).routing).to.deep.equal({ kind: 'softmaxBiasedTopK', topK: 6, normMin: 1e-12 });
      expect(moeBlockDims(ernieDefaults).sharedIntermediate).to.equal(32);
      expect(moeBlockConfigFromHF({ ...ERNIE, moe_norm_min: 1e-6 }).routing.normMin).to.equal(1e-6);
      expect(moeBlockConfigFromHF(HUNYUAN)).to.deep.equal({
        routing: { kind: 'softmaxTopK', topK: 2, renormalize: true }, activation: { kind: 'swiglu' },
      });
      // the routed experts and the one shared MLP are both intermediate_size wide
      expect(moeBlockDims(HUNYUAN)).to.deep.equal({ hidden: 64, intermediate: 24, experts: 8, topK: 2, sharedIntermediate: 24 });
      expect(moeBlockConfigFromHF(MINIMAX)).to.deep.equal({
        routing: { kind: 'sigmoidGroupTopK', topK: 3, renormalize: true }, activation: { kind: 'swiglu' },
      });
      expect(moeBlockDims(MINIMAX)).to.deep.equal({ hidden: 64, intermediate: 24, experts: 8, topK: 3 });
      expect(FAMILIES.ernie4_5_moe.checkpoint.router).to.deep.equal(
          { weight: 'gate.weight', correctionBias: 'moe_statics.e_score_correction_bias', correctionBiasRow: true });
      expect(FAMILIES.minimax_m2.checkpoint.block).to.equal('block_sparse_moe');
    });

    it('refuses ERNIE settings it does not implement, and names K\'s key', () => {
      expect(() => moeBlockConfigFromHF({ ...ERNIE, use_bias: true })).to.throw(OpArgumentError,
          "`moeBlockConfigFromHF()`: 'config.use_bias' must be false for 'ernie4_5_moe' (the only setting implemented) but got true");
      expect(() => moeBlockDims({ ...ERNIE, use_bias: true })).to.throw(OpArgumentError,
          "`moeBlockDims()`: 'config.use_bias' must be false for 'ernie4_5_moe' (the only setting implemented) but got true");
      expect(() => moeBlockConfigFromHF({ ...ERNIE, moe_k: 9 })).to.throw(OpArgumentError,
          "`moeBlockConfigFromHF()`: 'config.moe_k' must be <= num experts (8) but got 9");
      expect(() => moeBlockConfigFromHF({ ...ERNIE, moe_norm_min: 0 })).to.throw(OpArgumentError,
          "`moeBlockConfigFromHF()`: 'config.moe_norm_min' must be > 0 but got 0");
      // Hunyuan's per-layer lists of experts / K are not implemented: refused by the integer check
      expect(() => moeBlockConfigFromHF({ ...HUNYUAN, moe_topk: [2, 2] })).to.throw(OpArgumentError,
          "`moeBlockConfigFromHF()`: 'config.moe_topk' must be an integer but got");
    });

    it('always renormalizes Mixtral, whatever norm_topk_prob says', () => {
      const config = { ...fixtureConfig('mixtral'), norm_topk_prob: false };
      expect(moeBlockConfigFromHF(config).routing.renormalize).to.equal(true);
    });

    it('uses the config class defaults for keys config.json leaves out', () => {
      const { n_group: _g, topk_group: _t, routed_scaling_factor: _s, norm_topk_prob: _n, ...rest } =
          fixtureConfig('deepseek_v3');
      // DeepseekV3Config defaults: n_group 8 (16 experts: fine), topk_group 4, scaling 2.5, renormalize
      expect(moeBlockConfigFromHF(rest).routing).to.deep.equal({
        kind: 'sigmoidGroupTopK', topK: 4, renormalize: true, nGroup: 8, topkGroup: 4, scalingFactor: 2.5,
      });
      const { norm_topk_prob: _q, ...qwen2 } = fixtureConfig('qwen2_moe');
      expect(moeBlockConfigFromHF(qwen2).routing.renormalize).to.equal(false);
    });

    it('rejects an unknown or missing model_type, listing the supported ones', () => {
      const list = "'mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'glm4_moe', 'gpt_oss', 'ernie4_5_moe', " +
          "'hunyuan_v1_moe', 'minimax_m2', 'llama4_text', 'mistral4', 'gemma4_text', " +
          "'qwen3_5_moe_text', 'glm_moe_dsa', 'qwen3_next'";
      expect(() => moeBlockConfigFromHF({ model_type: 'llama' })).to.throw(OpArgumentError,
          `\`familyOf()\`: config 'model_type' must be one of ${list} (the supported MoE families) but got 'llama'`);
      expect(() => familyOf({ hidden_size: 4 })).to.throw(OpArgumentError, 'but got no model_type');
      expect(() => familyOf(null as unknown as HFConfig)).to.throw(OpArgumentError,
          "`familyOf()`: 'config' must be a parsed config.json object but got null");
    });

    it('rejects bad values with the key named', () => {
      expect(() => moeBlockConfigFromHF({ ...OLMOE, num_experts_per_tok: 9 })).to.throw(OpArgumentError,
          "`moeBlockConfigFromHF()`: 'config.num_experts_per_tok' must be <= num experts (8) but got 9");
      expect(() => moeBlockConfigFromHF({ ...OLMOE, num_experts_per_tok: 1.5 })).to.throw(OpArgumentError,
          "`moeBlockConfigFromHF()`: 'config.num_experts_per_tok' must be an integer but got 1.5 (number)");
      expect(() => moeBlockConfigFromHF({ ...OLMOE, norm_topk_prob: 'yes' })).to.throw(OpArgumentError,
          "`moeBlockConfigFromHF()`: 'config.norm_topk_prob' must be a boolean but got \"yes\"");
      expect(() => moeBlockConfigFromHF({ ...GLM, routed_scaling_factor: 'x' })).to.throw(OpArgumentError,
          "`moeBlockConfigFromHF()`: 'config.routed_scaling_factor' must be a finite number but got 'x'");
      expect(() => moeBlockConfigFromHF({ ...OLMOE, num_experts: 0 })).to.throw(OpArgumentError,
          "`expertCount()`: 'config.num_experts' must be >= 1 but got 0");
    });
  });

  describe('expertCount and moeBlockDims', () => {
    it('finds E under each family\'s key', () => {
      expect(expertCount(fixtureConfig('mixtral'))).to.equal(8);
      expect(expertCount(fixtureConfig('deepseek_v3'))).to.equal(16);
      // transformers 5 writes num_local_experts for Qwen3-MoE; Hub configs say num_experts
      expect(expertCount(fixtureConfig('qwen3_moe'))).to.equal(8);
      expect(expertCount({ model_type: 'qwen3_moe', num_experts: 128 })).to.equal(128);
      expect(expertCount(GPT_OSS)).to.equal(4);
    });

    it('gives H, I, E, K and the shared experts\' size', () => {
      expect(moeBlockDims(fixtureConfig('qwen2_moe'))).to.deep.equal(
          { hidden: 64, intermediate: 48, experts: 8, topK: 2, sharedIntermediate: 80 });
      expect(moeBlockDims(fixtureConfig('deepseek_v3'))).to.deep.equal(
          { hidden: 64, intermediate: 32, experts: 16, topK: 4, sharedIntermediate: 32 });
      expect(moeBlockDims({ ...GLM, n_shared_experts: 2 }).sharedIntermediate).to.equal(32);
      expect(moeBlockDims({ ...GLM, n_shared_experts: 0 })).to.not.have.property('sharedIntermediate');
      expect(moeBlockDims(fixtureConfig('mixtral'))).to.deep.equal(
          { hidden: 64, intermediate: 96, experts: 8, topK: 2 });
      expect(moeBlockDims(GPT_OSS)).to.deep.equal({ hidden: 64, intermediate: 32, experts: 4, topK: 2 });
    });

    it('names a missing required key', () => {
      const { hidden_size: _, ...noHidden } = OLMOE;
      expect(() => moeBlockDims(noHidden)).to.throw(OpArgumentError,
          "`moeBlockDims()`: config.json of 'olmoe' must set 'hidden_size'");
    });
  });

  describe('moeLayerIndices', () => {
    it('follows each family\'s rule', () => {
      expect(moeLayerIndices(fixtureConfig('mixtral'))).to.deep.equal([0, 1]);
      expect(moeLayerIndices(fixtureConfig('qwen2_moe'))).to.deep.equal([0, 1]);
      expect(moeLayerIndices(fixtureConfig('deepseek_v3'))).to.deep.equal([1]);
      expect(moeLayerIndices(GLM)).to.deep.equal([1, 2, 3]);
      expect(moeLayerIndices({ ...GLM, first_k_dense_replace: 3 })).to.deep.equal([3]);
      expect(moeLayerIndices(GPT_OSS)).to.deep.equal([0, 1, 2]);
      const qwen = { ...fixtureConfig('qwen3_moe'), num_hidden_layers: 6 };
      expect(moeLayerIndices({ ...qwen, decoder_sparse_step: 2 })).to.deep.equal([1, 3, 5]);
      expect(moeLayerIndices({ ...qwen, decoder_sparse_step: 2, mlp_only_layers: [3] })).to.deep.equal([1, 5]);
      expect(moeLayerIndices({ ...qwen, mlp_only_layers: [0, 4] })).to.deep.equal([1, 2, 3, 5]);
      expect(isMoELayer(fixtureConfig('deepseek_v3'), 0)).to.equal(false);
      // ERNIE: (i + 1) % interval == 0 within [start, end], end -1 meaning the last layer
      expect(moeLayerIndices(ERNIE)).to.deep.equal([1, 2, 3]);
      expect(moeLayerIndices({ ...ERNIE, num_hidden_layers: 8, moe_layer_end_index: -1, moe_layer_interval: 2 }))
        .to.deep.equal([1, 3, 5, 7]);
      expect(moeLayerIndices({ ...ERNIE, num_hidden_layers: 8, moe_layer_start_index: 2, moe_layer_end_index: 5 }))
        .to.deep.equal([2, 3, 4, 5]);
      const { moe_layer_start_index: _st, moe_layer_end_index: _en, moe_layer_interval: _in, ...ernieDefaults } = ERNIE;
      expect(moeLayerIndices(ernieDefaults)).to.deep.equal([1, 2, 3]);   // start 1, end -1, interval 1
      expect(moeLayerIndices(HUNYUAN)).to.deep.equal([0, 1]);
      expect(moeLayerIndices(MINIMAX)).to.deep.equal([0, 1]);
    });

    it('rejects a layer out of range and a bad mlp_only_layers', () => {
      expect(() => isMoELayer(fixtureConfig('mixtral'), 2)).to.throw(OpArgumentError,
          "`isMoELayer()`: 'layer' must be <= 1 but got 2");
      expect(() => moeLayerIndices({ ...fixtureConfig('qwen3_moe'), mlp_only_layers: 'x' })).to.throw(
          OpArgumentError, "`isMoELayer()`: 'config.mlp_only_layers' must be a list of layer indices but got \"x\"");
    });
  });

  describe('the parameter map', () => {
    it('maps every block parameter of every fixture to a distinct weight field', () => {
      // the variant folders beside them (deepseek_v3_fp8, gpt_oss_mxfp4) hold whole models only, no golden block
      const archs = readdirSync(FIXTURES).filter(a => existsSync(`${FIXTURES}/${a}/golden.json`));
      expect(archs).to.include.members([...MODEL_TYPES]);
      for (const arch of archs) {
        const golden = JSON.parse(readFileSync(`${FIXTURES}/${arch}/golden.json`, 'utf8')) as
            { config: HFConfig; block_params: Record<string, number[]>; block_test?: string };
        const family = familyOf(golden.config);
        // Gemma 4's block is the whole decoder layer; its test ran the routed branch, router and experts
        const names = Object.keys(golden.block_params)
          .filter(n => golden.block_test !== 'routed_branch' || /^(router|experts)\./.test(n)).sort();
        expect(Object.keys(family.parameters).sort(), arch).to.deep.equal(names);
        const fields = names.map(n => family.parameters[n]);
        expect(new Set(fields).size, arch).to.equal(fields.length);
      }
    });

    it('has a descriptor for every supported model_type', () => {
      expect(Object.keys(FAMILIES).sort()).to.deep.equal([...MODEL_TYPES].sort());
      for (const t of MODEL_TYPES) expect(FAMILIES[t].modelType).to.equal(t);
      expect(FAMILIES.gpt_oss.parameters).to.deep.equal({
        'router.weight': 'router.weight', 'router.bias': 'router.bias',
        'experts.gate_up_proj': 'experts.gateUp', 'experts.gate_up_proj_bias': 'experts.gateUpBias',
        'experts.down_proj': 'experts.down', 'experts.down_proj_bias': 'experts.downBias',
      });
      // the decoder's attention additions are data too
      expect(FAMILIES.gpt_oss.attention).to.deep.equal({
        sinks: true, scaledRopes: ['yarn'], ropeRequired: true, layerTypes: true,
        ropeTheta: 150000, slidingWindow: 128, attentionBias: true,
      });
      expect(FAMILIES.ernie4_5_moe.attention).to.deep.equal(
          { ropeTheta: 500000, rmsNormEps: 1e-5, tieWordEmbeddings: true, ropeInterleave: true });
      expect(FAMILIES.llama4_text.attention).to.deep.equal({ scaledRopes: ['llama3'] });
      expect(MODEL_TYPES.filter(t => FAMILIES[t].attention !== undefined)).to.deep.equal(
          ['gpt_oss', 'ernie4_5_moe', 'hunyuan_v1_moe', 'minimax_m2', 'llama4_text']);
    });
  });

  it("peftConversion is transformers 5.17's _MODEL_TO_CONVERSION_PATTERN as PEFT 0.21 acts on it (Qwen2-MoE measured unconverted)", () => {
    // transformers/conversion_mapping.py, the MoE rows PEFT's _MOE_TARGET_MODULE_MAPPING knows; a model
    // type absent here gets no rewrite (llama4_text, mistral4, qwen3_5_moe, glm_moe_dsa, gemma4_text, gpt_oss)
    const transformers: Record<string, 'mixtral' | 'qwen2_moe'> = {
      mixtral: 'mixtral', minimax: 'mixtral', minimax_m2: 'mixtral',
      deepseek_v2: 'qwen2_moe', deepseek_v3: 'qwen2_moe', dots1: 'qwen2_moe', ernie4_5_moe: 'qwen2_moe', glm4_moe: 'qwen2_moe',
      glm4_moe_lite: 'qwen2_moe', longcat_flash: 'qwen2_moe', solar_open: 'qwen2_moe', qwen3_moe: 'qwen2_moe',
      qwen3_next: 'qwen2_moe', hunyuan_v1_moe: 'qwen2_moe', flex_olmo: 'qwen2_moe', olmoe: 'qwen2_moe',
    };
    // tools/peft_check/check_linear.py: PEFT 0.21's all-linear on qwen2_moe kept the shared-expert
    // projections and took no experts, and it loaded ours with shared_expert.gate_proj unconverted
    const measuredUnconverted = ['qwen2_moe'];
    for (const type of MODEL_TYPES) {
      const want = measuredUnconverted.includes(type) ? undefined : transformers[type];
      expect(FAMILIES[type].peftConversion, type).to.equal(want);
    }
  });
});
