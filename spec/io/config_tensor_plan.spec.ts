import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { copyFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CheckpointError, loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { configTensorPlan, hfWeightName } from '../../src/io/hf_checkpoint_core.js';
import { moeBlockTensorPlan, type BlockTensorPlan } from '../../src/io/hf_block.js';
import { buildMoECausalLM, decoderLayerIndex, MAX_TENSOR_ELEMENTS } from '../../src/layers/moe_causal_lm.js';
import { SparseMoE } from '../../src/layers/sparse_moe.js';
import { familyOf, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices, type HFConfig } from '../../src/models/families.js';
import { INIT_PRESET_NAMES, presetConfig } from '../../src/train/presets.js';
import { cleanup, fixtureConfig, fixtureDir, tempDir, WHOLE_ARCHS } from './checkpoint_helpers.js';

type Shapes = Record<string, number[]>;

/** The SparseMoE weights (short names) a block plan's Hub tensors are fused into, with their shapes. */
function fusedShapes(plan: BlockTensorPlan): Shapes {
  const out: Shapes = { router_weight: plan.router.weight.shape };
  if (plan.router.bias) out['router_bias'] = plan.router.bias.shape;
  // ERNIE stores its selection bias [1, E]; the layer holds it [E]
  if (plan.router.correctionBias) out['correction_bias'] = plan.router.correctionBias.shape.filter((d, i, all) => all.length === 1 || d !== 1 || i > 0);
  const ex = plan.experts;
  if (ex.kind === 'perExpert') {
    const E = ex.gate.length;
    const [I, H] = ex.gate[0].shape;
    for (const part of [ex.gate, ex.up]) for (const e of part) expect(e.shape).to.deep.equal([I, H]);
    for (const e of ex.down) expect(e.shape).to.deep.equal([H, I]);
    expect([ex.up.length, ex.down.length]).to.deep.equal([E, E]);
    out['gate_up'] = [E, 2 * I, H];
    out['down'] = [E, H, I];
  } else {
    out['gate_up'] = ex.gateUp.shape;
    out['gate_up_bias'] = ex.gateUpBias.shape;
    out['down'] = ex.down.shape;
    out['down_bias'] = ex.downBias.shape;
  }
  if (plan.shared) {
    out['shared_gate'] = plan.shared.gate.shape;
    out['shared_up'] = plan.shared.up.shape;
    out['shared_down'] = plan.shared.down.shape;
    if (plan.shared.sigmoidGate) out['shared_expert_gate'] = plan.shared.sigmoidGate.shape;
  }
  return out;
}

function sparseMoEShapes(layer: SparseMoE): Shapes {
  return Object.fromEntries(layer.weights.map(w => [w.originalName.slice(layer.name.length + 1), w.shape as number[]]));
}

/** The built model's weights against the plan: plain weights by checkpoint name, SparseMoE via its block plan. */
function expectPlanMatchesModel(config: HFConfig): void {
  const before = tf.memory().numTensors;
  const plan = configTensorPlan(config);
  expect(tf.memory().numTensors, 'the plan allocates nothing').to.equal(before);
  const model = buildMoECausalLM(config);
  try {
    const built: Shapes = {};
    const blocks = new Map<number, Shapes>();
    for (const layer of model.layers) {
      if (layer instanceof SparseMoE) {
        blocks.set(decoderLayerIndex(layer.name)!, sparseMoEShapes(layer));
        continue;
      }
      for (const w of layer.weights) {
        const name = hfWeightName(layer, w);
        expect(built, `weight ${name} twice`).to.not.have.property(name);
        built[name] = w.shape as number[];
      }
    }
    const planned = Object.fromEntries(plan.plain.map(e => [e.name, e.shape]));
    expect(plan.plain.length, 'no name twice in the plan').to.equal(Object.keys(planned).length);
    expect(planned).to.deep.equal(built);
    expect(plan.blocks.map(b => b.layer)).to.deep.equal([...blocks.keys()]);
    for (const { layer, plan: block } of plan.blocks) expect(fusedShapes(block), `layer ${layer}`).to.deep.equal(blocks.get(layer));
    const blockTensors = plan.blocks.reduce((n, b) => n + Object.keys(fusedShapes(b.plan)).length, 0);
    expect(plan.all.length).to.be.at.least(plan.plain.length + blockTensors);
  } finally {
    model.dispose();
  }
  expect(tf.memory().numTensors).to.equal(before);
}

describe('io/hf_checkpoint_core configTensorPlan: the checkpoint tensors a config implies, from the config alone', () => {
  after(cleanup);

  for (const arch of WHOLE_ARCHS) {
    it(`equals the names and shapes of the weights buildMoECausalLM makes: fixture '${arch}' and its variants`, async () => {
      const config = await fixtureConfig(arch);
      expectPlanMatchesModel(config);
      expectPlanMatchesModel({ ...config, tie_word_embeddings: true });
      if (arch === 'qwen2_moe' || arch === 'qwen3_moe') {
        expectPlanMatchesModel({ ...config, mlp_only_layers: [0] });          // a dense MLP in layer 0
        expectPlanMatchesModel({ ...config, decoder_sparse_step: 2 });        // MoE in layer 1 only
      }
      if (arch === 'qwen3_moe' || arch === 'olmoe') expectPlanMatchesModel({ ...config, attention_bias: true });
      if (arch === 'qwen2_moe') expectPlanMatchesModel({ ...config, qkv_bias: false, shared_expert_intermediate_size: 0 });
      if (arch === 'glm4_moe') expectPlanMatchesModel({ ...config, use_qk_norm: true, attention_bias: false });
      if (arch === 'deepseek_v3') expectPlanMatchesModel({ ...config, q_lora_rank: 12, attention_bias: true, first_k_dense_replace: 0 });
      if (arch === 'gpt_oss') expectPlanMatchesModel({ ...config, attention_bias: false, num_key_value_heads: 4 });
      if (arch === 'ernie4_5_moe') expectPlanMatchesModel({ ...config, num_hidden_layers: 4, moe_layer_end_index: -1, moe_layer_interval: 2 });
      if (arch === 'hunyuan_v1_moe') expectPlanMatchesModel({ ...config, attention_bias: true });
    });
  }

  it('equals the built weights for every init preset', () => {
    expect(INIT_PRESET_NAMES).to.have.length.greaterThan(0);
    for (const name of INIT_PRESET_NAMES) expectPlanMatchesModel(presetConfig(name, 53));
  });

  for (const arch of ['deepseek_v3', 'glm4_moe', 'gpt_oss']) {
    it(`'${arch}': each MoE layer's block plan fuses into exactly the weights of a SparseMoE of that config`, async () => {
      const config = await fixtureConfig(arch);
      const { routing, activation } = moeBlockConfigFromHF(config);
      const dims = moeBlockDims(config);
      const before = tf.memory().numTensors;
      for (const layer of moeLayerIndices(config)) {
        const plan = moeBlockTensorPlan(config, layer);
        const layout = familyOf(config).checkpoint;
        const fused = layout.experts.kind === 'fusedInterleaved';
        const moe = new SparseMoE({
          name: `model.layers.${layer}.mlp`, numExperts: dims.experts, intermediateSize: dims.intermediate, routing, activation,
          sharedExpert: dims.sharedIntermediate === undefined ? null :
            { intermediateSize: dims.sharedIntermediate, gated: layout.shared?.sigmoidGate !== undefined },
          routerBias: layout.router.bias !== undefined, correctionBias: layout.router.correctionBias !== undefined,
          expertBias: fused, expertLayout: fused ? 'inOutInterleaved' : 'outIn',
        });
        const input = tfl.input({ shape: [null, dims.hidden] });
        const model = tfl.model({ inputs: input, outputs: moe.apply(input) as tfl.SymbolicTensor });
        expect(fusedShapes(plan)).to.deep.equal(sparseMoEShapes(moe));
        model.dispose();
      }
      expect(tf.memory().numTensors).to.equal(before);
    });
  }
});

describe('io/hf_checkpoint_core modelFromCheckpoint checks the config against the tensors before allocating', () => {
  after(cleanup);

  async function withConfig(arch: string, edit: HFConfig): Promise<string> {
    const dir = await tempDir();
    await writeFile(join(dir, 'config.json'), JSON.stringify({ ...(await fixtureConfig(arch)), ...edit }));
    await copyFile(join(fixtureDir(arch), 'model.safetensors'), join(dir, 'model.safetensors'));
    return dir;
  }

  for (const vocab of [5e6, 5e7]) {
    it(`vocab_size ${vocab}: the shape error comes at once, with no model built (peak RSS grows < 50 MB)`, async () => {
      const dir = await withConfig('qwen3_moe', { vocab_size: vocab });
      const before = tf.memory().numTensors;
      global.gc?.();
      const peakBefore = process.resourceUsage().maxRSS;  // kB, the process's peak so far
      const rssBefore = process.memoryUsage().rss;
      const start = performance.now();
      let error: unknown = null;
      try {
        await loadHFCheckpoint(dir);
      } catch (e) {
        error = e;
      }
      const ms = performance.now() - start;
      const peakGrowthMB = (process.resourceUsage().maxRSS - peakBefore) / 1024;
      const rssGrowthMB = (process.memoryUsage().rss - rssBefore) / 2 ** 20;
      expect(error).to.be.instanceOf(CheckpointError);
      const message = (error as Error).message;
      expect(message).to.contain(`does not hold the weights its config.json ('qwen3_moe') describes`);
      expect(message).to.contain(`'model.embed_tokens.weight' must have shape [${vocab},64] but has [97,64]`);
      expect(message).to.contain(`'lm_head.weight' must have shape [${vocab},64] but has [97,64]`);
      if (vocab * 64 > MAX_TENSOR_ELEMENTS) {
        expect(message).to.contain(`'model.embed_tokens.weight' would have shape [${vocab},64], ${vocab * 64} elements, ` +
            `more than the ${MAX_TENSOR_ELEMENTS} a tensor can hold`);
      }
      expect(tf.memory().numTensors).to.equal(before);
      expect(peakGrowthMB, `peak RSS growth ${peakGrowthMB.toFixed(1)} MB`).to.be.below(50);
      expect(rssGrowthMB, `RSS growth ${rssGrowthMB.toFixed(1)} MB`).to.be.below(50);
      expect(ms, `${ms.toFixed(0)} ms`).to.be.below(2000);
    });
  }

  it('a config whose sizes exceed what a tensor can hold is refused by the check even without a checkpoint mismatch', () => {
    // the plan alone says so; checkCheckpointAgainstConfig reports it first (spec above)
    const plan = configTensorPlan({ model_type: 'mixtral', vocab_size: 2 ** 26, hidden_size: 64, num_hidden_layers: 1,
      num_attention_heads: 4, intermediate_size: 8 });
    const embed = plan.all.find(e => e.name === 'model.embed_tokens.weight')!;
    expect(embed.shape[0] * embed.shape[1]).to.be.above(MAX_TENSOR_ELEMENTS);
  });

  it('lists every mismatch of the config, plain layers and MoE blocks, in one CheckpointError', async () => {
    const dir = await withConfig('mixtral', { hidden_size: 32, num_local_experts: 4 });
    const before = tf.memory().numTensors;
    let message = '';
    try {
      await loadHFCheckpoint(dir);
    } catch (e) {
      expect(e).to.be.instanceOf(CheckpointError);
      message = (e as Error).message;
    }
    expect(message).to.contain(`\`loadHFCheckpoint()\`: '${dir}' does not hold the weights its config.json ('mixtral') describes:`);
    expect(message).to.contain("'model.embed_tokens.weight' must have shape [97,32] but has [97,64]");
    expect(message).to.contain("'model.layers.1.block_sparse_moe.gate.weight' must have shape [4,32] but has [8,64]");
    expect(message).to.contain("'lm_head.weight' must have shape [97,32] but has [97,64]");
    expect(tf.memory().numTensors).to.equal(before);
  });
});
