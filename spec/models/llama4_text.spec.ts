/**
 * The llama4_text family row (Llama4ForCausalLM): config reading, its Hub block layout loaded as
 * stored ('inOut' experts, shared expert, router under feed_forward), and the loaded block against
 * the float64 transcription of Llama4TextMoe; SparseMoE with the same settings.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { loadMoEBlockWeights, moeBlockTensorPlan, type TensorSource } from '../../src/io/hf_block.js';
import { SparseMoE } from '../../src/layers/sparse_moe.js';
import {
  FAMILIES, type HFConfig, isMoELayer, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices,
} from '../../src/models/families.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import { moeBlock } from '../../src/ops/moe_block.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { Rng, expectClose, expectNoLeak, tensorOf } from '../helpers/numeric.js';
import { type Dims, llama4Block64, params64 } from '../ops/llama4_reference64.js';

const CONFIG: HFConfig = {
  model_type: 'llama4_text', hidden_size: 6, intermediate_size: 3, intermediate_size_mlp: 10, num_hidden_layers: 4,
  num_local_experts: 4, num_experts_per_tok: 1, interleave_moe_layer_step: 2, hidden_act: 'silu',
};

/** [E, a, b] float64 data of an [E, b, a] tensor: Llama 4 stores its experts [E, in, out]. */
function transposed(data: Float64Array, E: number, a: number, b: number): Float64Array {
  const out = new Float64Array(data.length);
  for (let e = 0; e < E; e++) for (let i = 0; i < a; i++) for (let j = 0; j < b; j++) out[(e * b + j) * a + i] = data[(e * a + i) * b + j];
  return out;
}

function mapSource(tensors: Record<string, tf.Tensor>): TensorSource {
  return {
    has: name => name in tensors,
    info: name => ({ dtype: 'F32', shape: tensors[name].shape }),
    tensor: async name => tensors[name].clone(),
  };
}

describe('llama4_text (Llama4ForCausalLM)', () => {
  it('reads its config: top-k sigmoid on the input, shared expert of intermediate_size, MoE every step-th layer', () => {
    expect(moeBlockConfigFromHF(CONFIG)).to.deep.equal({
      routing: { kind: 'topKSigmoid', topK: 1 }, activation: { kind: 'swiglu' }, weightedInput: true,
    });
    expect(moeBlockDims(CONFIG)).to.deep.equal({ hidden: 6, intermediate: 3, experts: 4, topK: 1, sharedIntermediate: 3 });
    // Llama4TextConfig: range(step - 1, layers, step), or moe_layers when given
    expect(moeLayerIndices(CONFIG)).to.deep.equal([1, 3]);
    expect(moeLayerIndices({ ...CONFIG, interleave_moe_layer_step: undefined })).to.deep.equal([0, 1, 2, 3]);
    expect(moeLayerIndices({ ...CONFIG, moe_layers: [0, 2] })).to.deep.equal([0, 2]);
    expect(() => isMoELayer({ ...CONFIG, moe_layers: [0, 4] }, 0)).to.throw(OpArgumentError,
        "`isMoELayer()`: 'config.moe_layers' must be a list of layer indices in [0, 4) but got [0,4]");
    expect(() => moeBlockConfigFromHF({ ...CONFIG, hidden_act: 'gelu' })).to.throw(OpArgumentError, "'config.hidden_act' must be");
    expect(moeBlockTensorPlan(CONFIG, 1).experts).to.deep.equal({
      kind: 'fusedInOut',
      gateUp: { name: 'model.layers.1.feed_forward.experts.gate_up_proj', shape: [4, 6, 6] },
      down: { name: 'model.layers.1.feed_forward.experts.down_proj', shape: [4, 3, 6] },
    });
    expect(FAMILIES.llama4_text.checkpoint.router.weight).to.equal('router.weight');
  });

  it('loads a Hub-layout block as stored and computes Llama4TextMoe (float64 transcription)', async () => {
    const d: Dims = { T: 7, H: 6, I: 3, E: 4, K: 1, Is: 3 };
    const p = params64(new Rng(5), d);
    const prefix = 'model.layers.3.feed_forward.';
    const tensors: Record<string, tf.Tensor> = {
      [`${prefix}router.weight`]: tensorOf(p.router, [4, 6]),
      [`${prefix}experts.gate_up_proj`]: tensorOf(transposed(p.W1, 4, 6, 6), [4, 6, 6]),
      [`${prefix}experts.down_proj`]: tensorOf(transposed(p.W2, 4, 6, 3), [4, 3, 6]),
      [`${prefix}shared_expert.gate_proj.weight`]: tensorOf(p.sg, [3, 6]),
      [`${prefix}shared_expert.up_proj.weight`]: tensorOf(p.su, [3, 6]),
      [`${prefix}shared_expert.down_proj.weight`]: tensorOf(p.sd, [6, 3]),
    };
    const weights = await loadMoEBlockWeights(mapSource(tensors), CONFIG, 3);
    expect(weights.experts.layout).to.equal('inOut');
    const x = tensorOf(p.x, [7, 6]) as tf.Tensor2D;
    const ref = llama4Block64(p, d);
    for (const expertKernel of ['fused', 'reference']) {
      expectNoLeak(() => {
        const { out, routing } = moeBlock(x, weights, moeBlockConfigFromHF(CONFIG), { expertKernel });
        expect(Array.from(routing.experts.dataSync()), `${expertKernel}: experts`).to.deep.equal(Array.from(ref.experts));
        expectClose(out, ref.out, 1e-5, `${expertKernel}: out`);
        tf.dispose([out, routing.weights, routing.experts, routing.logits]);
      });
    }
    await loadMoEBlockWeights(mapSource(tensors), CONFIG, 2).then(() => expect.fail('layer 2 is dense'), (e: Error) =>
      expect(e.message).to.equal("`moeBlockTensorPlan()`: layer 2 of this 'llama4_text' model is a dense MLP, not an MoE block (MoE layers: 1, 3)"));
    disposeMoEBlockWeights(weights);
    tf.dispose([x, ...Object.values(tensors)]);
  });

  it('SparseMoE with the inOut layout and weightedInput: same output as moeBlock, and round-trips its config', () => {
    const before = tf.memory().numTensors;
    const layer = new SparseMoE({
      name: 'model.layers.1.feed_forward', numExperts: 4, intermediateSize: 3, routing: { kind: 'topKSigmoid', topK: 2 },
      expertLayout: 'inOut', weightedInput: true, sharedExpert: { intermediateSize: 5, gated: false }, expertKernel: 'fused',
    });
    const x = tf.randomNormal([2, 3, 6], 0, 1, 'float32', 9) as tf.Tensor3D;
    const out = layer.apply(x) as tf.Tensor;
    expect(layer.weightVariable('gate_up').shape).to.deep.equal([4, 6, 6]);
    expect(layer.blockConfig()).to.deep.equal({
      routing: { kind: 'topKSigmoid', topK: 2 }, activation: { kind: 'swiglu' }, weightedInput: true,
    });
    tf.tidy(() => {
      const direct = moeBlock(tf.reshape(x, [6, 6]) as tf.Tensor2D, layer.blockWeights(), layer.blockConfig());
      expectClose(out, tf.reshape(direct.out, [2, 3, 6]), 1e-6, 'layer vs moeBlock');
    });
    const clone = SparseMoE.fromConfig(SparseMoE, layer.getConfig()) as SparseMoE;
    expect(clone.weightedInput).to.equal(true);
    expect(clone.expertLayout).to.equal('inOut');
    expect(() => new SparseMoE({ numExperts: 4, intermediateSize: 3, routing: { kind: 'topKSigmoid', topK: 1 }, weightedInput: 1 as never }))
      .to.throw(OpArgumentError, "`SparseMoE()`: 'weightedInput' must be a boolean but got 1 (number)");
    tf.dispose([x, out]);
    for (const w of layer.weights) w.dispose();
    expect(tf.memory().numTensors).to.equal(before);
  });
});
