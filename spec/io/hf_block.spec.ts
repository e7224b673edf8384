import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import {
  blockLayerIndex, loadMoEBlockWeights, moeBlockTensorPlan, type TensorSource,
} from '../../src/io/hf_block.js';
import { readSafetensorsFile, type SafetensorsFile } from '../../src/io/safetensors.js';
import { familyOf, type HFConfig } from '../../src/models/families.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import type { MoEBlockWeights } from '../../src/ops/types.js';
import { OpArgumentError } from '../../src/ops/validate.js';

const FIXTURES = 'spec/fixtures/hf';
const ARCHS = readdirSync(FIXTURES).filter(a => existsSync(`${FIXTURES}/${a}/golden.json`));

interface Golden {
  block: string; config: HFConfig; block_params: Record<string, number[]>;
  block_buffers?: Record<string, number[]>;
}

/** Awaits `promise` and checks that it rejects with `cls` and `message` (as chai's throw: a string is contained, a RegExp matches). */
async function expectRejects(promise: Promise<unknown>, cls: new (...args: never[]) => Error, message: string | RegExp): Promise<void> {
  let error: unknown = null;
  try { await promise; } catch (e) { error = e; }
  expect(error).to.be.instanceOf(cls);
  if (typeof message === 'string') expect((error as Error).message).to.include(message);
  else expect((error as Error).message).to.match(message);
}

/** A checkpoint held in a Map, for the error cases. */
function mapSource(tensors: Record<string, tf.Tensor>): TensorSource {
  return {
    has: name => name in tensors,
    info: name => ({ dtype: tensors[name].dtype === 'float32' ? 'F32' : 'I32', shape: tensors[name].shape }),
    tensor: async name => tensors[name].clone(),
  };
}

/** rows [from, to) of a [*, C] tensor's values, as numbers */
function rows(t: tf.Tensor, from: number, to: number): number[] {
  const cols = t.shape[t.rank - 1];
  return Array.from(t.dataSync().subarray(from * cols, to * cols));
}

function slice3(t: tf.Tensor, e: number): tf.Tensor2D {
  return tf.tidy(() => tf.reshape(tf.slice(t, [e, 0, 0], [1, t.shape[1]!, t.shape[2]!]), [t.shape[1]!, t.shape[2]!]));
}

describe('io/hf_block', () => {
  describe('blockLayerIndex', () => {
    it('reads the layer from a block name', () => {
      expect(blockLayerIndex('model.layers.1.mlp')).to.equal(1);
      expect(blockLayerIndex('model.layers.12.block_sparse_moe')).to.equal(12);
      expect(blockLayerIndex('layers.0')).to.equal(0);
    });
    it('rejects a name without a layer', () => {
      expect(() => blockLayerIndex('model.mlp')).to.throw(OpArgumentError,
          "`blockLayerIndex()`: 'block' must name a decoder layer's block like 'model.layers.1.mlp' but got \"model.mlp\"");
      expect(() => blockLayerIndex('model.layers.x.mlp')).to.throw(OpArgumentError, 'but got "model.layers.x.mlp"');
    });
  });

  it('finds every fixture', () => {
    expect(ARCHS).to.include.members(
        ['mixtral', 'qwen2_moe', 'qwen3_moe', 'deepseek_v3', 'olmoe', 'glm4_moe', 'gpt_oss']);
  });

  for (const arch of ARCHS) {
    describe(`the ${arch} fixture`, () => {
      let golden: Golden;
      let file: SafetensorsFile;
      before(async () => {
        golden = JSON.parse(readFileSync(`${FIXTURES}/${arch}/golden.json`, 'utf8')) as Golden;
        file = await readSafetensorsFile(`${FIXTURES}/${arch}/model.safetensors`);
      });

      it('loads the golden block with the in-memory shapes of transformers 5', async () => {
        const before = tf.memory().numTensors;
        const w = await loadMoEBlockWeights(file, golden.config, blockLayerIndex(golden.block));
        try {
          const p = golden.block_params;
          const shapeOf = (name: string) => p[name];
          if (arch === 'gpt_oss') {
            expect(w.experts.layout).to.equal('inOutInterleaved');
            expect(w.router.weight.shape).to.deep.equal(shapeOf('router.weight'));
            expect(w.router.bias!.shape).to.deep.equal(shapeOf('router.bias'));
            expect(w.experts.gateUpBias!.shape).to.deep.equal(shapeOf('experts.gate_up_proj_bias'));
            expect(w.experts.downBias!.shape).to.deep.equal(shapeOf('experts.down_proj_bias'));
          } else {
            expect(w.experts.layout).to.equal('outIn');
            // transformers' name of the router weight: gate.weight, Hunyuan's gate.wg.weight
            const router = Object.keys(p).find(n => familyOf(golden.config).parameters[n] === 'router.weight')!;
            expect(w.router.weight.shape).to.deep.equal(shapeOf(router));
          }
          expect(w.experts.gateUp.shape).to.deep.equal(shapeOf('experts.gate_up_proj'));
          expect(w.experts.down.shape).to.deep.equal(shapeOf('experts.down_proj'));
          const sharedPrefix = ['shared_expert', 'shared_experts', 'shared_mlp'].find(s => `${s}.gate_proj.weight` in p);
          if (sharedPrefix) {
            expect(w.shared!.gate.shape).to.deep.equal(shapeOf(`${sharedPrefix}.gate_proj.weight`));
            expect(w.shared!.up.shape).to.deep.equal(shapeOf(`${sharedPrefix}.up_proj.weight`));
            expect(w.shared!.down.shape).to.deep.equal(shapeOf(`${sharedPrefix}.down_proj.weight`));
          } else {
            expect(w.shared).to.equal(undefined);
          }
          expect(w.shared?.sigmoidGate?.shape).to.deep.equal(shapeOf('shared_expert_gate.weight'));
          // the only buffer of these blocks is the selection bias (DeepSeek/GLM's gate.e_score_correction_bias,
          // ERNIE's gate.moe_statics one, held [E] though transformers keeps [1, E], MiniMax's on the block)
          // (ERNIE's is a parameter without gradient, in block_params)
          const buffers = { ...golden.block_buffers, ...p };
          const biasName = Object.keys(buffers).find(n => n.endsWith('e_score_correction_bias'));
          const biasShape = biasName === undefined ? undefined : buffers[biasName].filter(d => d !== 1 || buffers[biasName].length === 1);
          expect(w.router.correctionBias?.shape).to.deep.equal(biasShape);
        } finally {
          disposeMoEBlockWeights(w);
        }
        expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
      });

      it('holds the checkpoint\'s values, fused gate rows first then up rows', async () => {
        const layer = blockLayerIndex(golden.block);
        const plan = moeBlockTensorPlan(golden.config, layer);
        const w: MoEBlockWeights = await loadMoEBlockWeights(file, golden.config, layer);
        const raw = async (name: string) => { const t = await file.tensor(name); const v = Array.from(t.dataSync()); t.dispose(); return v; };
        try {
          expect(Array.from(w.router.weight.dataSync())).to.deep.equal(await raw(plan.router.weight.name));
          if (plan.router.bias) expect(Array.from(w.router.bias!.dataSync())).to.deep.equal(await raw(plan.router.bias.name));
          if (plan.router.correctionBias) {
            expect(Array.from(w.router.correctionBias!.dataSync())).to.deep.equal(await raw(plan.router.correctionBias.name));
          }
          const ex = plan.experts;
          if (ex.kind === 'perExpert') {
            const E = ex.gate.length;
            const I = ex.gate[0].shape[0];
            for (const e of [0, 1, E - 1]) {
              const gu = slice3(w.experts.gateUp as tf.Tensor3D, e);  // F32 fixtures load as float32
              const d = slice3(w.experts.down as tf.Tensor3D, e);
              expect(rows(gu, 0, I), `gate rows of expert ${e}`).to.deep.equal(await raw(ex.gate[e].name));
              expect(rows(gu, I, 2 * I), `up rows of expert ${e}`).to.deep.equal(await raw(ex.up[e].name));
              expect(Array.from(d.dataSync()), `down of expert ${e}`).to.deep.equal(await raw(ex.down[e].name));
              tf.dispose([gu, d]);
            }
          } else {
            expect(Array.from((w.experts.gateUp as tf.Tensor3D).dataSync())).to.deep.equal(await raw(ex.gateUp.name));
            expect(Array.from((w.experts.down as tf.Tensor3D).dataSync())).to.deep.equal(await raw(ex.down.name));
            expect(Array.from(w.experts.gateUpBias!.dataSync())).to.deep.equal(await raw(ex.gateUpBias.name));
            expect(Array.from(w.experts.downBias!.dataSync())).to.deep.equal(await raw(ex.downBias.name));
          }
          if (plan.shared) {
            expect(Array.from(w.shared!.gate.dataSync())).to.deep.equal(await raw(plan.shared.gate.name));
            expect(Array.from(w.shared!.up.dataSync())).to.deep.equal(await raw(plan.shared.up.name));
            expect(Array.from(w.shared!.down.dataSync())).to.deep.equal(await raw(plan.shared.down.name));
            if (plan.shared.sigmoidGate) {
              expect(Array.from(w.shared!.sigmoidGate!.dataSync())).to.deep.equal(await raw(plan.shared.sigmoidGate.name));
            }
          }
        } finally {
          disposeMoEBlockWeights(w);
        }
      });
    });
  }

  describe('checkpoint names', () => {
    it('uses the Hub names of each family', () => {
      const mixtral = JSON.parse(readFileSync(`${FIXTURES}/mixtral/config.json`, 'utf8')) as HFConfig;
      const plan = moeBlockTensorPlan(mixtral, 1);
      expect(plan.router.weight).to.deep.equal({ name: 'model.layers.1.block_sparse_moe.gate.weight', shape: [8, 64] });
      expect(plan.experts.kind === 'perExpert' && plan.experts.up[3]).to.deep.equal(
          { name: 'model.layers.1.block_sparse_moe.experts.3.w3.weight', shape: [96, 64] });
      const ernie = {
        model_type: 'ernie4_5_moe', hidden_size: 8, moe_intermediate_size: 4, num_hidden_layers: 2, moe_num_experts: 3,
        moe_k: 1, moe_num_shared_experts: 1,
      };
      expect(moeBlockTensorPlan(ernie, 1).router).to.deep.equal({
        weight: { name: 'model.layers.1.mlp.gate.weight', shape: [3, 8] },
        correctionBias: { name: 'model.layers.1.mlp.moe_statics.e_score_correction_bias', shape: [1, 3] },
      });
      expect(() => moeBlockTensorPlan(ernie, 0)).to.throw(OpArgumentError,
          "`moeBlockTensorPlan()`: layer 0 of this 'ernie4_5_moe' model is a dense MLP, not an MoE block (MoE layers: 1)");
      const gptOss = {
        model_type: 'gpt_oss', hidden_size: 8, intermediate_size: 4, num_hidden_layers: 1,
        num_local_experts: 2, num_experts_per_tok: 1,
      };
      expect(moeBlockTensorPlan(gptOss, 0)).to.deep.equal({
        router: {
          weight: { name: 'model.layers.0.mlp.router.weight', shape: [2, 8] },
          bias: { name: 'model.layers.0.mlp.router.bias', shape: [2] },
        },
        experts: {
          kind: 'fusedInterleaved',
          gateUp: { name: 'model.layers.0.mlp.experts.gate_up_proj', shape: [2, 8, 8] },
          gateUpBias: { name: 'model.layers.0.mlp.experts.gate_up_proj_bias', shape: [2, 8] },
          down: { name: 'model.layers.0.mlp.experts.down_proj', shape: [2, 4, 8] },
          downBias: { name: 'model.layers.0.mlp.experts.down_proj_bias', shape: [2, 8] },
        },
      });
    });
  });

  describe('errors', () => {
    // A tiny OLMoE block: H 4, I 3, E 2.
    const config: HFConfig = {
      model_type: 'olmoe', hidden_size: 4, intermediate_size: 3, num_hidden_layers: 1,
      num_experts: 2, num_experts_per_tok: 1,
    };
    const p = 'model.layers.0.mlp';
    let tensors: Record<string, tf.Tensor>;
    beforeEach(() => {
      tensors = { [`${p}.gate.weight`]: tf.ones([2, 4]) };
      for (const e of [0, 1]) {
        tensors[`${p}.experts.${e}.gate_proj.weight`] = tf.fill([3, 4], e + 1);
        tensors[`${p}.experts.${e}.up_proj.weight`] = tf.fill([3, 4], e + 10);
        tensors[`${p}.experts.${e}.down_proj.weight`] = tf.fill([4, 3], e + 20);
      }
    });
    afterEach(() => tf.dispose(Object.values(tensors)));

    it('loads the tiny block (the error cases below change one thing each)', async () => {
      const w = await loadMoEBlockWeights(mapSource(tensors), config, 0);
      expect(w.experts.gateUp.shape).to.deep.equal([2, 6, 4]);
      expect(Array.from((w.experts.gateUp as tf.Tensor3D).dataSync()).filter((_, i) => i % 4 === 0)).to.deep.equal(
          [1, 1, 1, 10, 10, 10, 2, 2, 2, 11, 11, 11]);
      disposeMoEBlockWeights(w);
    });

    it('lists every missing and misshapen tensor in one error', async () => {
      tf.dispose([tensors[`${p}.experts.1.up_proj.weight`], tensors[`${p}.experts.0.down_proj.weight`]]);
      delete tensors[`${p}.experts.1.up_proj.weight`];
      tensors[`${p}.experts.0.down_proj.weight`] = tf.zeros([3, 4]);
      const before = tf.memory().numTensors;
      await expectRejects(loadMoEBlockWeights(mapSource(tensors), config, 0), OpArgumentError,
          "`loadMoEBlockWeights()`: the checkpoint does not hold layer 0's MoE block as config.json " +
          "('olmoe') describes it; 2 problems:\n" +
          "  missing 'model.layers.0.mlp.experts.1.up_proj.weight' (expected shape [3,4])\n" +
          "  'model.layers.0.mlp.experts.0.down_proj.weight' must have shape [4,3] but has [3,4]");
      expect(tf.memory().numTensors).to.equal(before);
    });

    it('rejects a shape that disagrees with the config', async () => {
      await expectRejects(loadMoEBlockWeights(mapSource(tensors), { ...config, num_experts: 3 }, 0), OpArgumentError, /4 problems:\n  'model.layers.0.mlp.gate.weight' must have shape \[3,4\] but has \[2,4\]\n  missing 'model.layers.0.mlp.experts.2.gate_proj.weight'/);
    });

    it('rejects an integer tensor without leaking the tensors read before it', async () => {
      tensors[`${p}.gate.weight`].dispose();
      tensors[`${p}.gate.weight`] = tf.ones([2, 4], 'int32');
      const before = tf.memory().numTensors;
      await expectRejects(loadMoEBlockWeights(mapSource(tensors), config, 0), OpArgumentError,
          "`loadMoEBlockWeights()`: 'model.layers.0.mlp.gate.weight' must be a floating-point tensor but is int32");
      expect(tf.memory().numTensors).to.equal(before);
    });

    it('rejects an integer expert tensor without leaking', async () => {
      tensors[`${p}.experts.1.up_proj.weight`].dispose();
      tensors[`${p}.experts.1.up_proj.weight`] = tf.ones([3, 4], 'int32');
      const before = tf.memory().numTensors;
      await expectRejects(loadMoEBlockWeights(mapSource(tensors), config, 0), OpArgumentError,
          "`loadMoEBlockWeights()`: 'model.layers.0.mlp.experts.1.up_proj.weight' must be a floating-point tensor but is int32");
      expect(tf.memory().numTensors).to.equal(before);
    });

    it('rejects a dense layer, a bad layer index and an unknown model_type', async () => {
      const deepseek = JSON.parse(readFileSync(`${FIXTURES}/deepseek_v3/config.json`, 'utf8')) as HFConfig;
      await expectRejects(loadMoEBlockWeights(mapSource(tensors), deepseek, 0), OpArgumentError,
          "`moeBlockTensorPlan()`: layer 0 of this 'deepseek_v3' model is a dense MLP, not an MoE block (MoE layers: 1)");
      await expectRejects(loadMoEBlockWeights(mapSource(tensors), config, -1), OpArgumentError,
          "`moeBlockTensorPlan()`: 'layerIndex' must be >= 0 but got -1");
      await expectRejects(loadMoEBlockWeights(mapSource(tensors), config, 1), OpArgumentError,
          "`isMoELayer()`: 'layer' must be <= 0 but got 1");
      await expectRejects(loadMoEBlockWeights(mapSource(tensors), { ...config, model_type: 'dbrx' }, 0), OpArgumentError, "config 'model_type' must be one of 'mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', " +
          "'deepseek_v3', 'glm4_moe', 'gpt_oss', 'ernie4_5_moe', 'hunyuan_v1_moe', 'minimax_m2' (the supported MoE families) but got 'dbrx'");
    });
  });
});
