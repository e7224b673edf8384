/**
 * The llama4_text family row (Llama4ForCausalLM): config reading, its Hub block layout loaded as
 * stored ('inOut' experts, shared expert, router under feed_forward), and the loaded block against
 * the float64 transcription of Llama4TextMoe; SparseMoE with the same settings.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadMoEBlockWeights, moeBlockTensorPlan, type TensorSource } from '../../src/io/hf_block.js';
import { configTensorPlan } from '../../src/io/hf_checkpoint_core.js';
import { hfCheckpointTensors, saveHFCheckpoint } from '../../src/io/hf_save.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter, savePeftAdapter } from '../../src/io/peft_files.js';
import { peftAdapterTensors, swapExpertFactors, type PeftTensor } from '../../src/io/peft.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import type { RotaryAttention } from '../../src/layers/attention.js';
import type { Llama3Rope } from '../../src/layers/rotary.js';
import { addMoEAdapter, buildMoECausalLM, moeCausalLMConfigFromHF, sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import { cleanup, tempDir } from '../io/checkpoint_helpers.js';
import { SparseMoE } from '../../src/layers/sparse_moe.js';
import {
  FAMILIES, type HFConfig, isMoELayer, moeBlockConfigFromHF, moeBlockDims, moeLayerIndices,
} from '../../src/models/families.js';
import { disposeMoEBlockWeights } from '../../src/models/weight_fields.js';
import { moeBlock } from '../../src/ops/moe_block.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { Rng, expectClose, expectNoLeak, tensorOf } from '../helpers/numeric.js';
import { attention64 } from '../helpers/attention64.js';
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
      kind: 'fused', layout: 'inOut',
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

// ---- the whole model --------------------------------------------------------------------------

/** A tiny Llama4ForCausalLM config shaped like the fixture's: layer 0 dense with rope and chunks, layer 1 MoE and NoPE. */
const WHOLE: HFConfig = {
  model_type: 'llama4_text', vocab_size: 23, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 4,
  num_key_value_heads: 2, head_dim: 4, intermediate_size: 6, intermediate_size_mlp: 10, num_local_experts: 4,
  num_experts_per_tok: 2, interleave_moe_layer_step: 2, no_rope_layers: [1, 0], use_qk_norm: true,
  attention_chunk_size: 3, attn_temperature_tuning: true, floor_scale: 2, attn_scale: 0.5, rms_norm_eps: 1e-5,
  rope_parameters: { rope_type: 'default', rope_theta: 50 }, tie_word_embeddings: false, hidden_act: 'silu',
};

/** Llama4ForCausalLM.forward in float64 from the checkpoint tensors `w` (HF names), for one row of ids. */
function llama4Logits64(w: Record<string, Float64Array>, ids: number[], ropeScaling: Llama3Rope | null = null): Float64Array {
  const H = 16;
  const S = ids.length;
  const rms = (v: Float64Array, weight?: Float64Array) => {
    const out = new Float64Array(v.length);
    for (let t = 0; t < v.length / H; t++) {
      let ms = 0;
      for (let i = 0; i < H; i++) ms += v[t * H + i] ** 2;
      const inv = 1 / Math.sqrt(ms / H + 1e-5);
      for (let i = 0; i < H; i++) out[t * H + i] = v[t * H + i] * inv * (weight ? weight[i] : 1);
    }
    return out;
  };
  let h = new Float64Array(S * H);
  ids.forEach((id, t) => h.set(w['model.embed_tokens.weight'].subarray(id * H, (id + 1) * H), t * H));
  const layers = [
    { rope: true, qkNorm: 'l2' as const, temperatureTuning: null, attentionChunkSize: 3 },
    { rope: false, qkNorm: 'none' as const, temperatureTuning: { attnScale: 0.5, floorScale: 2 }, attentionChunkSize: null },
  ];
  layers.forEach((settings, i) => {
    const p = `model.layers.${i}.`;
    const attnW = Object.fromEntries(['q_proj', 'k_proj', 'v_proj', 'o_proj'].map(n => [`${n}.weight`, w[`${p}self_attn.${n}.weight`]]));
    const attn = attention64(rms(h, w[`${p}input_layernorm.weight`]), attnW, {
      numHeads: 4, numKeyValueHeads: 2, headDim: 4, ropeTheta: 50, qkvBias: false, outputBias: false, normEpsilon: 1e-5,
      clipQKV: null, slidingWindow: null, ropeInterleave: true, ropeScaling, ...settings,
    }, 1, S, H);
    h = h.map((v, j) => v + attn[j]);
    const x = rms(h, w[`${p}post_attention_layernorm.weight`]);
    let mlp: Float64Array;
    if (i === 0) {
      const [g, u, d] = ['gate_proj', 'up_proj', 'down_proj'].map(n => w[`${p}feed_forward.${n}.weight`]);
      mlp = new Float64Array(S * H);
      for (let t = 0; t < S; t++) {
        const a = Array.from({ length: 10 }, (_, j) => {
          let gv = 0;
          let uv = 0;
          for (let k = 0; k < H; k++) { gv += g[j * H + k] * x[t * H + k]; uv += u[j * H + k] * x[t * H + k]; }
          return gv / (1 + Math.exp(-gv)) * uv;
        });
        for (let o = 0; o < H; o++) mlp[t * H + o] = a.reduce((s, v, j) => s + v * d[o * 10 + j], 0);
      }
    } else {
      const f = `${p}feed_forward.`;
      mlp = llama4Block64({
        x, router: w[`${f}router.weight`], W1: transposed(w[`${f}experts.gate_up_proj`], 4, H, 12),
        W2: transposed(w[`${f}experts.down_proj`], 4, 6, H), sg: w[`${f}shared_expert.gate_proj.weight`],
        su: w[`${f}shared_expert.up_proj.weight`], sd: w[`${f}shared_expert.down_proj.weight`],
      }, { T: S, H, I: 6, E: 4, K: 2, Is: 6 }).out;
    }
    h = h.map((v, j) => v + mlp[j]);
  });
  const n = rms(h, w['model.norm.weight']);
  const head = w['lm_head.weight'];
  const logits = new Float64Array(S * 23);
  for (let t = 0; t < S; t++) for (let o = 0; o < 23; o++) {
    let v = 0;
    for (let i = 0; i < H; i++) v += head[o * H + i] * n[t * H + i];
    logits[t * 23 + o] = v;
  }
  return logits;
}

describe('llama4_text whole model (Llama4ForCausalLM)', () => {
  it('builds the decoder Llama 4 describes, with the checkpoint names configTensorPlan lists', () => {
    const before = tf.memory().numTensors;
    const model = buildMoECausalLM(WHOLE, { expertKernel: 'fused' });
    const { tensors } = hfCheckpointTensors(model);
    const plan = configTensorPlan(WHOLE).all;
    expect(Object.keys(tensors).sort()).to.deep.equal(plan.map(e => e.name).sort());
    for (const e of plan) expect(tensors[e.name].shape, e.name).to.deep.equal(e.shape);
    const attn = model.getLayer('model.layers.0.self_attn') as RotaryAttention;
    expect([attn.rope, attn.ropeInterleave, attn.qkNorm, attn.attentionChunkSize, attn.temperatureTuning]).to.deep.equal([true, true, 'l2', 3, null]);
    const nope = model.getLayer('model.layers.1.self_attn') as RotaryAttention;
    expect([nope.rope, nope.qkNorm, nope.attentionChunkSize, nope.temperatureTuning]).to.deep.equal([false, 'none', null, { attnScale: 0.5, floorScale: 2 }]);
    tf.dispose(Object.values(tensors));
    model.dispose();
    expect(tf.memory().numTensors).to.equal(before);
  });

  const LLAMA3: Llama3Rope = { kind: 'llama3', factor: 4, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8 };
  for (const [expertKernel, rope] of [['fused', null], ['reference', null], ['fused', LLAMA3]] as Array<[string, Llama3Rope | null]>) {
    it(`${expertKernel}: logits equal a float64 transcription of Llama4ForCausalLM (chunks, NoPE, temperature, MoE${rope ? ', llama3 rope' : ''})`, () => {
      const config = rope === null ? WHOLE : { ...WHOLE, rope_parameters: {
        rope_type: 'llama3', rope_theta: 50, factor: 4, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8 } };
      const model = buildMoECausalLM(config, { expertKernel });
      // weights redrawn larger than the init so that routing, chunks and the temperature all matter
      const rng = new Rng(3);
      for (const v of model.weights) {
        const size = v.shape.reduce((a: number, b) => a * (b as number), 1);
        const isNorm = v.originalName.includes('norm');
        v.write(tensorOf(rng.array(size, isNorm ? 0.2 : 0.5).map(x => (isNorm ? 1 + x : x)), v.shape as number[]));
      }
      const { tensors } = hfCheckpointTensors(model);
      const w = Object.fromEntries(Object.entries(tensors).map(([k, t]) => [k, Float64Array.from(t.dataSync())]));
      tf.dispose(Object.values(tensors));
      const ids = [3, 17, 5, 9, 22, 1, 14];
      const input = tf.tensor2d([ids], [1, 7], 'int32');
      expectNoLeak(() => {
        const logits = model.predict(input) as tf.Tensor;
        expectClose(logits, llama4Logits64(w, ids, rope), 1e-4, 'logits');
        logits.dispose();
      });
      input.dispose();
      model.dispose();
    });
  }

  it("reads the Hub's llama3 rope and refuses one it would misread", () => {
    const rope = { rope_type: 'llama3', rope_theta: 5e5, factor: 16, low_freq_factor: 1, high_freq_factor: 1, original_max_position_embeddings: 8192 };
    expect(moeCausalLMConfigFromHF({ ...WHOLE, rope_parameters: rope }).ropeScaling).to.deep.equal(
        { kind: 'llama3', factor: 16, lowFreqFactor: 1, highFreqFactor: 1, originalMaxPositionEmbeddings: 8192 });
    const { low_freq_factor: _, ...missing } = rope;
    expect(() => moeCausalLMConfigFromHF({ ...WHOLE, rope_parameters: missing }))
      .to.throw("`moeCausalLMConfigFromHF()`: a llama3 rope needs 'rope_parameters.low_freq_factor' but config.json does not set it");
    expect(() => moeCausalLMConfigFromHF({ ...WHOLE, rope_parameters: { ...rope, beta_fast: 32 } }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.rope_parameters' sets 'beta_fast', which the llama3 rope does not read " +
          "(only 'rope_type', 'type', 'rope_theta', 'partial_rotary_factor', 'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')");
    expect(() => moeCausalLMConfigFromHF({ ...WHOLE, rope_parameters: { ...rope, low_freq_factor: 4 } }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'config.rope_parameters' needs high_freq_factor >= low_freq_factor > 0 but sets 4 and 1");
    expect(() => moeCausalLMConfigFromHF({ ...WHOLE, rope_parameters: { ...rope, rope_type: 'yarn' } }))
      .to.throw("`moeCausalLMConfigFromHF()`: 'llama4_text' supports the default and 'llama3' ropes but config.json sets rope_type 'yarn'");
  });

  it('saves as a Hub checkpoint and a PEFT adapter that load back to the same logits', async () => {
    const before = tf.memory().numTensors;
    const model = buildMoECausalLM(WHOLE, { expertKernel: 'fused' });
    addMoEAdapter(model, { name: 'default', r: 2, alpha: 4, targets: ['experts.gate_up', 'experts.down', 'router'] }, 'random');
    const dir = await tempDir();
    await saveHFCheckpoint(model, join(dir, 'base'));
    await savePeftAdapter(model, join(dir, 'adapter'));
    const config = JSON.parse(await readFile(join(dir, 'adapter', 'adapter_config.json'), 'utf8')) as Record<string, unknown>;
    expect(config['auto_mapping']).to.deep.equal(
        { base_model_class: 'Llama4ForCausalLM', parent_library: 'transformers.models.llama4.modeling_llama4' });
    const again = await loadHFCheckpoint(join(dir, 'base'), { expertKernel: 'fused' });
    expect(sparseMoELayers(again).map(l => l.name)).to.deep.equal(['model.layers.1.feed_forward']);
    await loadPeftAdapter(again, join(dir, 'adapter'));
    const input = tf.tensor2d([[4, 8, 15, 16, 22, 0]], [1, 6], 'int32');
    const [a, b] = [model, again].map(m => m.predict(input) as tf.Tensor);
    expectClose(b, a, 1e-6, 'logits after save and load');
    tf.dispose([a, b, input]);
    model.dispose();
    again.dispose();
    await cleanup();
    expect(tf.memory().numTensors).to.equal(before);
  });

  it("the fixture adapter reproduces PEFT's lora.logits and every lora.grad.* (PEFT reads these experts as [E, out, in])", async () => {
    const dir = 'spec/fixtures/hf/llama4_text';
    const model = await loadHFCheckpoint(dir, { expertKernel: 'fused' });
    const loaded = await loadPeftAdapter(model, join(dir, 'adapter'));
    expect([loaded.layers, loaded.targets]).to.deep.equal([['model.layers.1.feed_forward'], ['experts.gate_up', 'experts.down', 'router']]);
    const g = await readSafetensorsFile(join(dir, 'golden.safetensors'));
    const [ids, want, cot] = await Promise.all(['input_ids', 'lora.logits', 'lora.g'].map(n => g.tensor(n)));
    const lora = peftAdapterTensors(model);
    const before = tf.memory().numTensors;
    const { value, grads } = tf.variableGrads(() => {
      const logits = model.apply(ids, { training: true }) as tf.Tensor;
      expectClose(logits, want, 1e-4, 'lora.logits');
      return tf.sum(tf.mul(logits, cot)) as tf.Scalar;
    }, lora.map(t => t.variable.read() as tf.Variable));
    const gradOf = (t: PeftTensor) => grads[(t.variable.read() as tf.Variable).name] as tf.Tensor2D;
    const goldenGrad = (t: PeftTensor) => g.tensor(`lora.grad.${t.peftName.replace(/\.weight$/, '.default.weight')}`);
    for (const t of lora.filter(x => x.target === 'router')) {
      const expected = await goldenGrad(t);
      expectClose(gradOf(t), expected, 1e-4, t.peftName);
      expected.dispose();
    }
    for (const target of ['experts.gate_up', 'experts.down']) {
      // PEFT's factors are ours with A and B swapped (the same numbers, other places): so are their gradients
      const [a, b] = ['A', 'B'].map(f => lora.find(x => x.target === target && x.factor === f)!);
      const [gA, gB] = await Promise.all([goldenGrad(a), goldenGrad(b)]);
      const ours = swapExpertFactors(gradOf(a), gradOf(b), 8);
      expectClose(ours.A, gA, 1e-4, a.peftName);
      expectClose(ours.B, gB, 1e-4, b.peftName);
      tf.dispose([gA, gB, ours.A, ours.B]);
    }
    tf.dispose([value, ...Object.values(grads)]);
    expect(tf.memory().numTensors).to.equal(before);
    // saved again, the adapter holds PEFT's own tensors, bit for bit
    const out = await tempDir();
    await savePeftAdapter(model, out);
    const [saved, original] = await Promise.all([join(out, 'adapter_model.safetensors'), join(dir, 'adapter', 'adapter_model.safetensors')]
      .map(f => readSafetensorsFile(f)));
    expect(saved.names().sort()).to.deep.equal(original.names().sort());
    for (const name of original.names()) {
      const [x, y] = await Promise.all([saved.tensor(name), original.tensor(name)]);
      expect(Array.from(x.dataSync()), name).to.deep.equal(Array.from(y.dataSync()));
      tf.dispose([x, y]);
    }
    tf.dispose([ids, want, cot]);
    model.dispose();
    await cleanup();
  });
});
