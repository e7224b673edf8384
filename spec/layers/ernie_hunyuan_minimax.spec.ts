/**
 * ernie4_5_moe, hunyuan_v1_moe and minimax_m2 as whole models, before their transformers fixtures:
 * what each config.json turns into (attention, rope, norms, head, MoE layers), the Hub tensor names
 * the checkpoint must hold, and a save → load round trip through those names. The pieces that
 * compute (the routing, the MoE block, the attention variants) are checked against float64
 * references in spec/ops/routing, spec/ops/moe_block and spec/layers/attention.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { blockLayerIndex, loadMoEBlockWeights } from '../../src/io/hf_block.js';
import { moeBlockConfigFromHF } from '../../src/models/families.js';
import { route } from '../../src/ops/routing/index.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import { configTensorPlan } from '../../src/io/hf_checkpoint_core.js';
import { saveHFCheckpoint } from '../../src/io/hf_save.js';
import { peftAdapterTensors } from '../../src/io/peft.js';
import { loadPeftAdapter, savePeftAdapter } from '../../src/io/peft_files.js';
import { readFile } from 'node:fs/promises';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { RotaryAttention } from '../../src/layers/attention.js';
import {
  addMoEAdapter, buildMoECausalLM, moeCausalLMConfigFromHF, sparseMoELayers,
} from '../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../src/models/families.js';
import type { LoRATarget } from '../../src/layers/sparse_moe.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { cleanup, fixtureConfig, fixtureDir, tempDir } from '../io/checkpoint_helpers.js';
import { Rng } from '../helpers/numeric.js';

const COMMON = { vocab_size: 37, hidden_size: 32, num_attention_heads: 4, num_key_value_heads: 2, hidden_act: 'silu' };

/** ERNIE-4.5-21B-A3B's keys: its config.json leaves tie_word_embeddings and rope_theta to the class defaults. */
const ERNIE: HFConfig = {
  ...COMMON, model_type: 'ernie4_5_moe', num_hidden_layers: 3, intermediate_size: 40, moe_intermediate_size: 8,
  moe_num_experts: 6, moe_k: 2, moe_num_shared_experts: 2, moe_layer_start_index: 1, moe_layer_end_index: 2,
  moe_layer_interval: 1, moe_norm_min: 1e-12, use_bias: false,
};
const HUNYUAN: HFConfig = {
  ...COMMON, model_type: 'hunyuan_v1_moe', num_hidden_layers: 2, intermediate_size: 12, num_experts: 6, moe_topk: 2,
  head_dim: 8, attention_bias: false, rope_theta: 10000, tie_word_embeddings: true,
};
const MINIMAX: HFConfig = {
  ...COMMON, model_type: 'minimax_m2', num_hidden_layers: 2, intermediate_size: 12, num_local_experts: 6,
  num_experts_per_tok: 2, head_dim: 8, rotary_dim: 4, rope_parameters: { rope_type: 'default', rope_theta: 5e6, partial_rotary_factor: 0.5 },
};

describe('ernie4_5_moe, hunyuan_v1_moe, minimax_m2 whole models', () => {
  after(cleanup);

  it('reads each family\'s decoder from config.json and its config class defaults', () => {
    const ernie = moeCausalLMConfigFromHF(ERNIE);
    expect([ernie.ropeInterleave, ernie.tieWordEmbeddings, ernie.ropeTheta, ernie.rmsNormEps, ernie.qkNorm, ernie.qkvBias])
      .to.deep.equal([true, true, 500000, 1e-5, 'none', false]);
    expect([ernie.moeLayers, ernie.denseIntermediateSize, ernie.moe.correctionBias, ernie.moe.sharedExpert])
      .to.deep.equal([[1, 2], 40, true, { intermediateSize: 16, gated: false }]);
    expect(ernie.moe.routing).to.deep.equal({ kind: 'softmaxBiasedTopK', topK: 2, normMin: 1e-12 });
    expect(moeCausalLMConfigFromHF({ ...ERNIE, tie_word_embeddings: false }).tieWordEmbeddings).to.equal(false);

    const hunyuan = moeCausalLMConfigFromHF(HUNYUAN);
    expect([hunyuan.qkNorm, hunyuan.ropeInterleave, hunyuan.headDim, hunyuan.ropeTheta, hunyuan.rmsNormEps, hunyuan.tieWordEmbeddings])
      .to.deep.equal(['perHeadAfterRope', false, 8, 10000, 1e-5, true]);
    expect(hunyuan.moe.sharedExpert).to.deep.equal({ intermediateSize: 12, gated: false });
    expect(moeCausalLMConfigFromHF({ ...HUNYUAN, attention_bias: true }).outputBias).to.equal(true);

    const minimax = moeCausalLMConfigFromHF(MINIMAX);
    expect([minimax.qkNorm, minimax.rotaryDim, minimax.headDim, minimax.ropeTheta, minimax.rmsNormEps, minimax.tieWordEmbeddings])
      .to.deep.equal(['full', 4, 8, 5e6, 1e-6, false]);
    expect(minimax.moe.routing).to.deep.equal({ kind: 'sigmoidGroupTopK', topK: 2, renormalize: true });
    expect(minimax.moe.sharedExpert).to.equal(null);
    // MiniMaxM2Config's rope_theta when config.json gives none; a full rope without partial_rotary_factor
    const { rope_parameters: _r, rotary_dim: _d, ...plain } = MINIMAX;
    expect([moeCausalLMConfigFromHF(plain).ropeTheta, moeCausalLMConfigFromHF(plain).rotaryDim]).to.deep.equal([5e6, 8]);
    // MiniMaxM2Config's head_dim is 128 whatever hidden_size / heads is
    const { head_dim: _h, ...noHeadDim } = plain;
    expect(moeCausalLMConfigFromHF(noHeadDim).headDim).to.equal(128);
    const { head_dim: _e, ...ernieNoHeadDim } = { ...ERNIE, head_dim: undefined };
    expect(moeCausalLMConfigFromHF(ernieNoHeadDim).headDim).to.equal(8);   // hidden_size / heads
  });

  it('names the Hub tensors of each family', () => {
    const shapes = (config: HFConfig) => new Map(configTensorPlan(config).all.map(e => [e.name, e.shape]));
    const ernie = shapes(ERNIE);
    expect(ernie.get('model.layers.1.mlp.moe_statics.e_score_correction_bias')).to.deep.equal([1, 6]);
    expect(ernie.get('model.layers.1.mlp.gate.weight')).to.deep.equal([6, 32]);
    expect(ernie.get('model.layers.2.mlp.shared_experts.up_proj.weight')).to.deep.equal([16, 32]);
    expect(ernie.get('model.layers.1.mlp.experts.5.down_proj.weight')).to.deep.equal([32, 8]);
    expect(ernie.get('model.layers.0.mlp.gate_proj.weight')).to.deep.equal([40, 32]);   // dense first layer
    expect(ernie.has('lm_head.weight'), 'tied head by default').to.equal(false);
    const hunyuan = shapes(HUNYUAN);
    expect(hunyuan.get('model.layers.0.mlp.gate.wg.weight')).to.deep.equal([6, 32]);
    expect(hunyuan.get('model.layers.1.mlp.shared_mlp.down_proj.weight')).to.deep.equal([32, 12]);
    expect(hunyuan.get('model.layers.0.mlp.experts.0.gate_proj.weight')).to.deep.equal([12, 32]);
    expect(hunyuan.get('model.layers.0.self_attn.query_layernorm.weight')).to.deep.equal([8]);
    expect(hunyuan.get('model.layers.0.self_attn.key_layernorm.weight')).to.deep.equal([8]);
    const minimax = shapes(MINIMAX);
    expect(minimax.get('model.layers.0.block_sparse_moe.gate.weight')).to.deep.equal([6, 32]);
    expect(minimax.get('model.layers.0.block_sparse_moe.e_score_correction_bias')).to.deep.equal([6]);
    expect(minimax.get('model.layers.1.block_sparse_moe.experts.3.w3.weight')).to.deep.equal([12, 32]);
    expect(minimax.get('model.layers.0.self_attn.q_norm.weight')).to.deep.equal([32]);
    expect(minimax.get('model.layers.0.self_attn.k_norm.weight')).to.deep.equal([16]);
    expect(minimax.get('lm_head.weight')).to.deep.equal([37, 32]);
  });

  for (const config of [ERNIE, HUNYUAN, MINIMAX]) {
    it(`${String(config['model_type'])}: saved under the Hub names and loaded back, the same logits`, async () => {
      const model = buildMoECausalLM(config, { expertKernel: 'fused' });
      // random, distinct norms and selection biases, so a weight loaded into the wrong place shows
      const rng = new Rng(3);
      for (const w of model.weights) {
        if (!/norm|correction_bias/.test(w.originalName)) continue;
        const values = tf.tensor(Float32Array.from(rng.array(w.read().size, 0.3)), w.shape as number[]);
        w.write(values);
        values.dispose();
      }
      expect(model.layers.filter(l => l instanceof RotaryAttention).length).to.equal(config['num_hidden_layers']);
      const dir = await tempDir('fam1-');
      await saveHFCheckpoint(model, dir);
      const file = await readSafetensorsFile(`${dir}/model.safetensors`);
      expect(file.names().sort()).to.deep.equal(configTensorPlan(config).all.map(e => e.name).sort());
      const loaded = await loadHFCheckpoint(dir, { expertKernel: 'fused' });
      const ids = tf.tensor2d([[1, 7, 3, 30, 2, 9], [4, 4, 0, 36, 11, 5]], [2, 6], 'int32');
      const before = tf.memory().numTensors;
      const a = model.predict(ids) as tf.Tensor;
      const b = loaded.predict(ids) as tf.Tensor;
      expect(Array.from(b.dataSync())).to.deep.equal(Array.from(a.dataSync()));
      const moe = sparseMoELayers(loaded);
      expect(moe.map(l => l.name)).to.deep.equal(moeCausalLMConfigFromHF(config).moeLayers.map(i =>
        `model.layers.${i}.mlp`));
      tf.dispose([a, b]);
      expect(tf.memory().numTensors).to.equal(before);
      tf.dispose(ids);
      model.dispose();
      loaded.dispose();
    });
  }

  it('ernie4_5_moe: the [1, E] selection bias on disk is the block\'s [E] bias, and loading it leaves nothing behind', async () => {
    const model = buildMoECausalLM(ERNIE);
    const bias = model.getLayer('model.layers.2.mlp').weights.find(w => w.originalName.endsWith('correction_bias'))!;
    const values = tf.tensor1d([0.5, -0.25, 0.125, 1, -1, 2]);
    bias.write(values);
    const dir = await tempDir('fam1-bias-');
    await saveHFCheckpoint(model, dir);
    const file = await readSafetensorsFile(`${dir}/model.safetensors`);
    const stored = await file.tensor('model.layers.2.mlp.moe_statics.e_score_correction_bias');
    expect(stored.shape).to.deep.equal([1, 6]);
    expect(Array.from(stored.dataSync())).to.deep.equal([0.5, -0.25, 0.125, 1, -1, 2]);
    const before = tf.memory().numTensors;
    const weights = await loadMoEBlockWeights(file, ERNIE, 2);
    expect(weights.router.correctionBias!.shape).to.deep.equal([6]);
    expect(Array.from(weights.router.correctionBias!.dataSync())).to.deep.equal([0.5, -0.25, 0.125, 1, -1, 2]);
    disposeMoEBlockWeights(weights);
    expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
    tf.dispose([values, stored]);
    model.dispose();
  });

  const PEFT_CASES: Array<[HFConfig, string, string, string[]]> = [
    [ERNIE, 'Ernie4_5_MoeForCausalLM', 'gate', ['shared_experts.gate_proj', 'shared_experts.up_proj', 'shared_experts.down_proj']],
    [HUNYUAN, 'HunYuanMoEV1ForCausalLM', 'gate.wg', ['shared_mlp.gate_proj', 'shared_mlp.up_proj', 'shared_mlp.down_proj']],
    [MINIMAX, 'MiniMaxM2ForCausalLM', 'gate', []],
  ];
  for (const [config, cls, router, shared] of PEFT_CASES) {
    it(`${String(config['model_type'])}: a PEFT adapter names transformers' modules and loads back exactly`, async () => {
      const source = buildMoECausalLM(config, { expertKernel: 'fused' });
      const targets: LoRATarget[] = ['experts.gate_up', 'experts.down', 'router', ...(shared.length > 0 ? ['shared.up' as const] : [])];
      addMoEAdapter(source, { name: 'default', r: 2, alpha: 4, targets }, 'random');
      const dir = await tempDir('fam1-peft-');
      await savePeftAdapter(source, dir);
      const adapterConfig = JSON.parse(await readFile(`${dir}/adapter_config.json`, 'utf8'));
      expect(adapterConfig['auto_mapping']['base_model_class']).to.equal(cls);
      // every MoE layer has the adapter: the entries are the names relative to the block
      expect(adapterConfig['target_parameters']).to.have.members(['experts.gate_up_proj', 'experts.down_proj', `${router}.weight`]);
      expect(adapterConfig['target_modules'] ?? []).to.deep.equal(shared.slice(1, 2));
      const target = buildMoECausalLM(config, { expertKernel: 'fused' });
      const base = new Map(source.weights.map(w => [w.originalName, w]));
      for (const w of target.weights) w.write(base.get(w.originalName)!.read());
      await loadPeftAdapter(target, dir);
      const a = peftAdapterTensors(source);
      const b = peftAdapterTensors(target);
      expect(b.map(t => t.peftName)).to.deep.equal(a.map(t => t.peftName));
      a.forEach((t, i) => expect(Array.from(b[i].variable.read().dataSync()), t.peftName).to.deep.equal(Array.from(t.variable.read().dataSync())));
      const ids = tf.tensor2d([[3, 1, 4, 1, 5, 9]], [1, 6], 'int32');
      const [y1, y2] = [source, target].map(m => m.predict(ids) as tf.Tensor);
      expect(Array.from(y2.dataSync())).to.deep.equal(Array.from(y1.dataSync()));
      tf.dispose([ids, y1, y2]);
      source.dispose();
      target.dispose();
    });
  }

  // The fixtures' routers' own outputs (transformers 5.17): logits [T, E], weights [T, K], experts [T, K]
  for (const arch of ['ernie4_5_moe', 'hunyuan_v1_moe']) {
    it(`${arch}: route() of the fixture's router logits chooses transformers' experts with its weights`, async () => {
      const dir = fixtureDir(arch);
      const config = await fixtureConfig(arch);
      const goldenFile = await readSafetensorsFile(`${dir}/golden.safetensors`);
      const block = JSON.parse(await readFile(`${dir}/golden.json`, 'utf8')).block as string;
      const weights = await loadMoEBlockWeights(await readSafetensorsFile(`${dir}/model.safetensors`), config, blockLayerIndex(block));
      const [x, logits, goldenWeights, goldenExperts] = await Promise.all(
          ['block.x', 'block.router.output.0', 'block.router.output.1', 'block.router.output.2'].map(n => goldenFile.tensor(n)));
      const before = tf.memory().numTensors;
      const ours = tf.tidy(() => tf.matMul(tf.reshape(x, [-1, x.shape[2]!]), weights.router.weight, false, true));
      expect(maxRelativeError(ours.dataSync(), logits.dataSync()), 'router logits').to.be.at.most(1e-5);
      const r = route(logits as tf.Tensor2D, moeBlockConfigFromHF(config).routing, weights.router.correctionBias);
      const K = r.experts.shape[1];
      const byExpert = (w: tf.Tensor, e: tf.Tensor) => {
        const [wv, ev] = [w.dataSync(), e.dataSync()];
        return Array.from({ length: ev.length / K }, (_, t) =>
          Array.from({ length: K }, (_, k) => [ev[t * K + k], wv[t * K + k]]).sort((a, b) => a[0] - b[0]));
      };
      const mine = byExpert(r.weights, r.experts);
      const theirs = byExpert(goldenWeights, goldenExperts);
      expect(mine.map(t => t.map(([e]) => e)), 'experts, per token').to.deep.equal(theirs.map(t => t.map(([e]) => e)));
      expect(maxRelativeError(mine.flat().map(([, w]) => w), theirs.flat().map(([, w]) => w)), 'weights').to.be.at.most(1e-5);
      tf.dispose([ours, r.weights, r.experts]);
      expect(tf.memory().numTensors).to.equal(before);
      tf.dispose([x, logits, goldenWeights, goldenExperts]);
      disposeMoEBlockWeights(weights);
    });
  }

  it('refuses what the graph does not implement', () => {
    expect(() => buildMoECausalLM({ ...ERNIE, use_bias: true })).to.throw(OpArgumentError,
        "'config.use_bias' must be false for 'ernie4_5_moe' (the only setting implemented) but got true");
    expect(() => buildMoECausalLM({ ...MINIMAX, rotary_dim: 8 })).to.throw(OpArgumentError,
        '`moeCausalLMConfigFromHF()`: config.json sets rotary_dim 8 but transformers rotates head_dim · partial_rotary_factor = 4 ' +
        'dims of each head (it does not read rotary_dim); set partial_rotary_factor to match');
    // Hunyuan-A13B's Hub rope: dynamic NTK with alpha, not implemented
    expect(() => buildMoECausalLM({ ...HUNYUAN, rope_scaling: { type: 'dynamic', alpha: 1000, factor: 1 } })).to.throw(OpArgumentError,
        "`moeCausalLMConfigFromHF()`: only the default rope is supported but config.json sets type 'dynamic'");
  });
});
