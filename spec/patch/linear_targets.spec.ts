import type * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { PluginArgsError } from '../../src/args/errors.js';
import { RotaryAttention } from '../../src/layers/attention.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { buildMoECausalLM, sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import { SwiGLUMLP } from '../../src/layers/swiglu_mlp.js';
import { patternKey } from '../../src/patch/linear_targets.js';
import { register, unregister } from '../../src/plugin.js';
import { seedAdapterInit } from '../../src/train/seeded_init.js';
import { TINY_QWEN2_MOE } from '../helpers/tiny_models.js';

/** Every adapted module of the model as '<module name>: r/alpha'. */
function adapted(model: tfl.LayersModel, name = 'default'): string[] {
  const out: string[] = [];
  for (const layer of model.layers) {
    if ((layer instanceof RotaryAttention || layer instanceof SwiGLUMLP) && layer.lora.names().includes(name)) {
      for (const [p, m] of Object.entries(layer.lora.config(name)!.modules)) out.push(`${layer.name}.${p}: ${m.r}/${m.alpha}`);
    }
  }
  for (const layer of sparseMoELayers(model)) {
    if (!layer.adapterNames().includes(name)) continue;
    const c = layer.adapterConfig(name)!;
    for (const t of c.targets) out.push(`${layer.name}:${t}: ${c.ranks?.[t] ?? c.r}/${c.alphas?.[t] ?? c.alpha}`);
  }
  return out;
}

function problems(fn: () => unknown): string[] {
  try {
    fn();
  } catch (err) {
    if (err instanceof PluginArgsError) return err.problems.map(p => p.message);
    throw err;
  }
  return [];
}

describe('LoRA targets as PEFT names them (target_modules, all-linear, rank/alpha patterns)', () => {
  let model: ReturnType<typeof buildMoECausalLM>;
  before(() => { model = buildMoECausalLM(TINY_QWEN2_MOE); });
  after(() => { unregister(); model.dispose(); });
  afterEach(() => unregister());

  it("'all-linear' on Qwen2-MoE (PEFT 0.21 leaves its config as is): attention, dense MLP, shared-expert projections and shared_expert_gate, not the router, experts or lm_head", () => {
    const trainableBefore = model.trainableWeights.length;
    register({ models: [model], lora: { r: 2, alpha: 4, targets: ['all-linear'] } });
    expect(adapted(model)).to.deep.equal([
      'model.layers.0.self_attn.q_proj: 2/4', 'model.layers.0.self_attn.k_proj: 2/4',
      'model.layers.0.self_attn.v_proj: 2/4', 'model.layers.0.self_attn.o_proj: 2/4',
      'model.layers.0.mlp.gate_proj: 2/4', 'model.layers.0.mlp.up_proj: 2/4', 'model.layers.0.mlp.down_proj: 2/4',
      'model.layers.1.self_attn.q_proj: 2/4', 'model.layers.1.self_attn.k_proj: 2/4',
      'model.layers.1.self_attn.v_proj: 2/4', 'model.layers.1.self_attn.o_proj: 2/4',
      'model.layers.1.mlp:shared.gate: 2/4', 'model.layers.1.mlp:shared.up: 2/4', 'model.layers.1.mlp:shared.down: 2/4',
      'model.layers.1.mlp:shared.sigmoid_gate: 2/4',
    ]);
    // only the adapters train: 15 modules × (A, B)
    expect(model.trainableWeights.length).to.equal(30);
    expect(model.trainableWeights.every(v => /lora_default_/.test(v.originalName))).to.equal(true);
    unregister();
    expect(adapted(model)).to.deep.equal([]);
    expect(model.trainableWeights.length).to.equal(trainableBefore);
  });

  it('attention-only targets freeze the MoE layers too (no MoE target, no MoE adapter), as PEFT does, until unregister()', () => {
    const moeWeights = sparseMoELayers(model).flatMap(l => l.weights);
    const trainableBefore = model.trainableWeights.map(v => v.name);
    expect(moeWeights.filter(v => v.trainable).length, 'the MoE layers train before').to.be.above(0);
    register({ models: [model], lora: { r: 2, alpha: 4, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] } });
    // 2 layers × 4 projections × (A, B), nothing else: a saved adapter then holds everything that trained
    expect(model.trainableWeights.length).to.equal(16);
    expect(model.trainableWeights.every(v => /lora_default_/.test(v.originalName))).to.equal(true);
    expect(moeWeights.filter(v => v.trainable)).to.deep.equal([]);
    unregister();
    expect(model.trainableWeights.map(v => v.name)).to.deep.equal(trainableBefore);
  });

  it("'all-linear' on a family PEFT 0.21 converts (GLM-4.5-MoE): attention + experts.gate_up (2r, 2α) + experts.down + router; no dense MLP, no shared expert", async () => {
    const glm = await loadHFCheckpoint('spec/fixtures/hf/glm4_moe');
    register({ models: [glm], lora: { r: 2, alpha: 4, targets: ['all-linear'], rankPattern: { 'layers.1.self_attn.q_proj': 1 } } });
    expect(adapted(glm)).to.deep.equal([
      'model.layers.0.self_attn.q_proj: 2/4', 'model.layers.0.self_attn.k_proj: 2/4',
      'model.layers.0.self_attn.v_proj: 2/4', 'model.layers.0.self_attn.o_proj: 2/4',
      'model.layers.1.self_attn.q_proj: 1/4', 'model.layers.1.self_attn.k_proj: 2/4',
      'model.layers.1.self_attn.v_proj: 2/4', 'model.layers.1.self_attn.o_proj: 2/4',
      'model.layers.1.mlp:experts.gate_up: 4/8', 'model.layers.1.mlp:experts.down: 2/4', 'model.layers.1.mlp:router: 2/4',
    ]);
    unregister();
    // a rank pattern on an MoE parameter, by PEFT's name '<module>.<parameter>'
    register({ models: [glm], lora: { r: 2, alpha: 4, targets: ['experts.down', 'router'], rankPattern: { 'experts.down_proj': 3 },
      alphaPattern: { 'mlp.gate.weight': 1 } } });
    expect(adapted(glm)).to.deep.equal(['model.layers.1.mlp:experts.down: 3/4', 'model.layers.1.mlp:router: 2/1']);
    unregister();
    glm.dispose();
  });

  it("'all-linear' on an MLA model is refused: its attention has no LoRA here yet", async () => {
    const deepseek = await loadHFCheckpoint('spec/fixtures/hf/deepseek_v3');
    expect(problems(() => register({ models: [deepseek], lora: { r: 2, alpha: 4, targets: ['all-linear'] } }))).to.deep.equal([
      "lora.targets: 'all-linear' on 'moe_causal_lm' (PEFT 0.21: every attention projection, MLA's q_proj / q_a_proj / q_b_proj / " +
          "kv_a_proj_with_mqa / kv_b_proj / o_proj included) needs LoRA on MLA attention ('model.layers.0.self_attn'), which this " +
          'package does not have yet; name the targets instead (experts.gate_up, experts.down, router, shared.*)']);
    expect(adapted(deepseek)).to.deep.equal([]);
    // its shared expert has no sigmoid gate to adapt
    expect(problems(() => register({ models: [deepseek], lora: { r: 2, alpha: 4, targets: ['shared.sigmoid_gate'] } }))).to.deep.equal([
      "models[0] layer 'model.layers.1.mlp' (SparseMoE): lora.targets: expected 'shared.sigmoid_gate' only on a layer whose shared expert is gated " +
          "(Qwen2-MoE's shared_expert_gate), but the layer's is not"]);
    deepseek.dispose();
  });

  it("'all-linear' on a gated DeltaNet model is refused: PEFT adapts its projections, which have no LoRA here yet", async () => {
    const qwen3Next = await loadHFCheckpoint('spec/fixtures/hf/qwen3_next');
    expect(problems(() => register({ models: [qwen3Next], lora: { r: 2, alpha: 4, targets: ['all-linear'] } }))).to.deep.equal([
      "lora.targets: 'all-linear' on 'moe_causal_lm' (PEFT 0.21: every nn.Linear, the gated DeltaNet's in_proj_* / out_proj " +
          "included) needs LoRA on GatedDeltaNet ('model.layers.0.linear_attn'), which this package does not have yet; name the " +
          'targets instead (q_proj, k_proj, v_proj, o_proj, experts.gate_up, experts.down, router, shared.*)']);
    expect(adapted(qwen3Next)).to.deep.equal([]);
    // named targets still work on it: the gated attention's projections and the experts
    register({ models: [qwen3Next], lora: { r: 2, alpha: 4, targets: ['q_proj', 'experts.down'] } });
    expect(adapted(qwen3Next)).to.deep.equal([
      'model.layers.1.self_attn.q_proj: 2/4', 'model.layers.0.mlp:experts.down: 2/4', 'model.layers.1.mlp:experts.down: 2/4']);
    unregister();
    qwen3Next.dispose();
  });

  it("entries match as PEFT's list matching does: the full name or its end after a '.'", () => {
    register({ models: [model], lora: { r: 1, alpha: 2, targets: ['self_attn.q_proj', 'model.layers.1.self_attn.v_proj', 'mlp.down_proj', 'experts.down'] } });
    expect(adapted(model)).to.deep.equal([
      'model.layers.0.self_attn.q_proj: 1/2', 'model.layers.0.mlp.down_proj: 1/2',
      'model.layers.1.self_attn.q_proj: 1/2', 'model.layers.1.self_attn.v_proj: 1/2',
      'model.layers.1.mlp:experts.down: 1/2',
    ]);
    unregister();
    // a bare projection name selects it everywhere, the shared expert's too
    register({ models: [model], lora: { r: 1, alpha: 2, targets: ['down_proj'] } });
    expect(adapted(model)).to.deep.equal(['model.layers.0.mlp.down_proj: 1/2', 'model.layers.1.mlp:shared.down: 1/2']);
  });

  it('rankPattern / alphaPattern give per-module r and alpha (first matching key, PEFT 0.21 get_pattern_key)', () => {
    register({ models: [model], lora: {
      r: 2, alpha: 4, rsLoRA: true, targets: ['q_proj', 'k_proj', 'o_proj'],
      rankPattern: { 'layers\\.1\\.self_attn\\.k_proj': 1, 'q_proj': 3 }, alphaPattern: { 'layers.0.self_attn.o_proj': 1, 'o_proj': 8 },
    } });
    expect(adapted(model)).to.deep.equal([
      'model.layers.0.self_attn.q_proj: 3/4', 'model.layers.0.self_attn.k_proj: 2/4', 'model.layers.0.self_attn.o_proj: 2/1',
      'model.layers.1.self_attn.q_proj: 3/4', 'model.layers.1.self_attn.k_proj: 1/4', 'model.layers.1.self_attn.o_proj: 2/8',
    ]);
    const attn1 = model.getLayer('model.layers.1.self_attn') as RotaryAttention;
    const f = attn1.lora.factors('default');
    expect(f['q_proj'].A.shape).to.deep.equal([3, 8]);
    expect(f['q_proj'].B.shape).to.deep.equal([8, 3]);
    expect(f['q_proj'].scaling).to.be.closeTo(4 / Math.sqrt(3), 1e-12);
    expect(f['o_proj'].scaling).to.be.closeTo(8 / Math.sqrt(2), 1e-12);
  });

  it('patternKey: the key must match a whole trailing part of the name after a dot; the first match wins', () => {
    expect(patternKey(['proj', 'q_proj'], 'model.layers.0.self_attn.q_proj')).to.equal('q_proj');
    expect(patternKey(['self_attn\\.(q|k)_proj', 'q_proj'], 'model.layers.0.self_attn.q_proj')).to.equal('self_attn\\.(q|k)_proj');
    expect(patternKey(['layers.1.self_attn.q_proj'], 'model.layers.11.self_attn.q_proj')).to.equal(undefined);
    expect(patternKey(['model.layers.0.mlp.up_proj'], 'model.layers.0.mlp.up_proj')).to.equal('model.layers.0.mlp.up_proj');
  });

  it('names that select nothing and unused pattern keys are problems (dropout on a shared expert is not); nothing changes', () => {
    const lines = problems(() => register({ models: [model], lora: {
      r: 2, alpha: 4, dropout: 0.1, targets: ['attn.q_proj', 'up_proj'], rankPattern: { 'k_proj': 1 }, alphaPattern: { 'v_proj': 2 },
    } }));
    expect(lines).to.deep.equal([
      "lora.targets[0]: expected a module name of the models (PEFT's rule: a full name or its end after a '.') but " +
          "'attn.q_proj' matches none; modules: 'model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.k_proj', " +
          "'model.layers.0.self_attn.v_proj', ...",
      "lora.rankPattern: expected each key to match a targeted module or MoE parameter (PEFT's rule: the name, e.g. " +
          "'model.layers.0.self_attn.q_proj' or 'model.layers.0.mlp.experts.gate_up_proj', ends with the key after a '.') but 'k_proj' matches none",
      "lora.alphaPattern: expected each key to match a targeted module or MoE parameter (PEFT's rule: the name, e.g. " +
          "'model.layers.0.self_attn.q_proj' or 'model.layers.0.mlp.experts.gate_up_proj', ends with the key after a '.') but 'v_proj' matches none",
    ]);
    expect(adapted(model)).to.deep.equal([]);
    expect(problems(() => register({ models: [model], lora: { r: 2, alpha: 4, targets: ['q_prj'] } }))).to.deep.equal([
      "lora.targets[0]: expected one of 'experts.gate_up', 'experts.down', 'router', 'shared.gate', 'shared.up', 'shared.down', 'shared.sigmoid_gate', " +
          "'all-linear', 'q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj' (module names may have a " +
          "path before the projection: 'self_attn.q_proj') but got 'q_prj' (string); did you mean 'q_proj'?"]);
    expect(problems(() => register({ models: [model], lora: { r: 2, alpha: 4, targets: ['q_proj'], rankPattern: { '(': 2, 'k_proj': 0 } } })))
        .to.deep.equal([
          "lora.rankPattern: expected keys that are regular expressions but got '('",
          'lora.rankPattern["k_proj"]: expected an integer >= 1 but got 0 (number)']);
    expect(problems(() => register({ models: [model], lora: { r: 2, alpha: 4, targets: ['q_proj'], alphaPattern: [] as never } })))
        .to.deep.equal(['lora.alphaPattern: expected an object {module-name key: a number > 0} but got []']);
  });

  it('seedAdapterInit re-draws the linear adapters\' A from U(±1/√in) by seed (B stays 0)', () => {
    const draw = (seed: number) => {
      register({ models: [model], lora: { r: 2, alpha: 4, targets: ['q_proj', 'mlp.down_proj'] } });
      seedAdapterInit(model, 'default', seed);
      const f = (model.getLayer('model.layers.0.mlp') as SwiGLUMLP).lora.factors('default')['down_proj'];
      const a = Array.from(f.A.read().dataSync());
      expect(a.every(v => Math.abs(v) <= 1 / Math.sqrt(6)), 'within ±1/√in').to.equal(true);
      expect(f.B.read().dataSync().every(v => v === 0)).to.equal(true);
      unregister();
      return a;
    };
    const first = draw(1);
    expect(draw(1)).to.deep.equal(first);
    expect(draw(2)).not.to.deep.equal(first);
  });

  it('dropout > 0 is accepted on attention and dense-MLP targets and reaches their adapters', () => {
    register({ models: [model], lora: { r: 2, alpha: 4, dropout: 0.2, targets: ['o_proj', 'mlp.gate_proj'] } });
    expect(adapted(model)).to.deep.equal(['model.layers.0.self_attn.o_proj: 2/4', 'model.layers.0.mlp.gate_proj: 2/4',
      'model.layers.1.self_attn.o_proj: 2/4']);
    expect((model.getLayer('model.layers.0.mlp') as SwiGLUMLP).lora.config('default')!.dropout).to.equal(0.2);
  });
});
