/**
 * 'all-linear' and MoE ranks as PEFT 0.21 does them: PEFT's own all-linear adapters
 * (spec/fixtures/peft_linear, made by tools/peft_check/check_linear.py) load here with PEFT's
 * logits and select the modules and parameters ours selects, and per-target ranks and alphas of
 * the MoE targets travel through rank_pattern / alpha_pattern under PEFT's names.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter, savePeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { hfConfigOf, sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import { moeTargetPatternName, planLinearLoRA } from '../../src/patch/linear_targets.js';
import { register, unregister } from '../../src/plugin.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { Rng } from '../helpers/numeric.js';
import { cleanup, fixtureDir, tempDir } from './checkpoint_helpers.js';

type Model = Awaited<ReturnType<typeof loadHFCheckpoint>>;

/** Random values in every trainable (adapter) variable, B included, so the adapter changes the logits. */
function randomizeAdapters(model: Model, seed: number): void {
  const rng = new Rng(seed);
  for (const v of model.trainableWeights) {
    const size = v.shape.reduce((p: number, q) => p * (q as number), 1);
    tf.tidy(() => { v.write(tf.tensor(Float32Array.from(rng.array(size, 0.2)), v.shape as number[])); });
  }
}

const logitsOf = (model: Model) => tf.tidy(() => {
  const ids = tf.tensor2d([[3, 1, 4, 1, 5, 9, 2, 6]], [1, 8], 'int32');
  return (model.predict(ids) as tf.Tensor).dataSync() as Float32Array;
});

/** Every LoRA factor of the model by its PEFT-independent variable name. */
const factors = (model: Model) => Object.fromEntries(model.trainableWeights.map(v => [v.originalName, Array.from(v.read().dataSync())]));

describe("io/peft: PEFT 0.21's all-linear and per-target MoE ranks", () => {
  after(async () => { unregister(); await cleanup(); });
  afterEach(() => unregister());

  for (const arch of ['mixtral', 'qwen2_moe']) {
    it(`${arch}: PEFT's own all-linear adapter selects what ours selects, with PEFT's ranks, and loads with PEFT's logits`, async () => {
      const dir = join('spec/fixtures/peft_linear', arch);
      const model = await loadHFCheckpoint(fixtureDir(arch));
      const before = tf.memory().numTensors;
      // PEFT's wrappers: a ParamWrapper adapts '<module>.<parameter>' (nested wrappers add '.base_layer')
      const wrappers: Record<string, { parameter: string | null }> = JSON.parse(await readFile(join(dir, 'peft_wrappers.json'), 'utf8'));
      const peft = Object.entries(wrappers).map(([n, w]) => w.parameter === null ? n : `${n.replace(/(\.base_layer)+$/, '')}.${w.parameter}`);
      const plan = planLinearLoRA([model], { r: 4, alpha: 8, targets: ['all-linear'], rankPattern: { q_proj: 2 } });
      expect(plan.problems).to.deep.equal([]);
      const type = hfConfigOf(model)?.['model_type'];
      const ours = [
        ...plan.linear.flatMap(p => Object.entries(p.modules).map(([m, s]) => [`${p.layer.name}.${m}`, s.r, s.alpha] as const)),
        ...[...plan.moe].flatMap(([layer, p]) => p.targets.map(t =>
          [moeTargetPatternName(type, layer.name, t), p.ranks[t] ?? 4, p.alphas[t] ?? 8] as const)),
      ];
      expect(ours.map(o => o[0]).sort()).to.deep.equal(peft.sort());
      // the ranks PEFT gave them: its rank_pattern q_proj 2, and on Mixtral the fused gate_up 2r with 2·alpha
      const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
      expect(config.rank_pattern).to.deep.equal(arch === 'mixtral' ? { '.*\\.gate_up_proj': 8, q_proj: 2 } : { q_proj: 2 });
      expect(ours.filter(o => o[1] !== 4 || o[2] !== 8).map(o => o.join(' ')).sort()).to.deep.equal(arch === 'mixtral' ? [
        'model.layers.0.mlp.experts.gate_up_proj 8 16', 'model.layers.0.self_attn.q_proj 2 8',
        'model.layers.1.mlp.experts.gate_up_proj 8 16', 'model.layers.1.self_attn.q_proj 2 8',
      ] : ['model.layers.0.self_attn.q_proj 2 8', 'model.layers.1.self_attn.q_proj 2 8']);

      const loaded = await loadPeftAdapter(model, dir);
      expect(loaded.targets).to.deep.equal(arch === 'mixtral' ? ['experts.gate_up', 'experts.down', 'router'] :
        ['shared.gate', 'shared.up', 'shared.down', 'shared.sigmoid_gate']);
      if (arch === 'mixtral') {
        const layer = sparseMoELayers(model)[0];
        expect(layer.adapterConfig('default')!.ranks).to.deep.equal({ 'experts.gate_up': 8 });
        expect(layer.adapter('default').factors['experts.gate_up']!.A.shape).to.deep.equal([8 * layer.numExperts, 64]);
      }
      const file = await readSafetensorsFile(join(dir, 'peft.safetensors'));
      const ids = await file.tensor('input_ids');
      const expected = await file.tensor('logits');
      const logits = model.predict(ids) as tf.Tensor;
      expect(maxRelativeError(logits.dataSync(), expected.dataSync())).to.be.at.most(1e-4);
      tf.dispose([ids, expected, logits]);
      model.dispose();
      expect(tf.memory().numTensors).to.be.at.most(before);
    });
  }

  it("all-linear on Mixtral saves the config PEFT saves for it ('.*\\\\.gate_up_proj': 2r, 2α); save → load is exact", async () => {
    const model = await loadHFCheckpoint(fixtureDir('mixtral'));
    register({ models: [model], lora: { r: 4, alpha: 8, targets: ['all-linear'], rankPattern: { q_proj: 2 } } });
    randomizeAdapters(model, 5);
    const want = logitsOf(model);
    const dir = await tempDir();
    await savePeftAdapter(model, dir);
    const ours = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    const peft = JSON.parse(await readFile('spec/fixtures/peft_linear/mixtral/adapter_config.json', 'utf8'));
    // the MoE keys are PEFT's own (ours names the linear modules in full: 'model.layers.0.self_attn.q_proj')
    const moeKeys = (pattern: Record<string, number>) => Object.fromEntries(Object.entries(pattern).filter(([k]) => !k.endsWith('q_proj')));
    for (const key of ['rank_pattern', 'alpha_pattern']) expect(moeKeys(ours[key]), key).to.deep.equal(moeKeys(peft[key]));
    expect(moeKeys(ours.rank_pattern)).to.deep.equal({ '.*\\.gate_up_proj': 8 });
    for (const key of ['r', 'lora_alpha']) expect(ours[key], key).to.deep.equal(peft[key]);
    // ours spells the expert parameters 'experts.gate_up_proj': the same parameters by PEFT's suffix rule
    expect(ours.target_parameters.map((e: string) => e.replace(/^experts\./, '')).sort()).to.deep.equal([...peft.target_parameters].sort());
    expect([...ours.target_modules].sort()).to.deep.equal(['k_proj', 'o_proj', 'q_proj', 'v_proj'].map(p => `self_attn.${p}`));
    const saved = factors(model);
    unregister();
    model.dispose();

    const copy = await loadHFCheckpoint(fixtureDir('mixtral'));
    await loadPeftAdapter(copy, dir);
    // the same factors exactly; the logits up to the kernels' rounding (register() ran the fused one,
    // the loaded model runs the reference one: 1e-5 as the fused-vs-reference specs)
    expect(maxRelativeError(logitsOf(copy), want)).to.be.at.most(1e-5);
    const loaded = factors(copy);
    expect(Object.keys(loaded).sort()).to.deep.equal(Object.keys(saved).sort());
    for (const [n, v] of Object.entries(saved)) expect(loaded[n], n).to.deep.equal(v);
    copy.dispose();
  });

  it('ranks and alphas that differ between layers are saved under each target\'s escaped name and load back exactly', async () => {
    const model = await loadHFCheckpoint(fixtureDir('qwen3_moe'));
    register({ models: [model], lora: {
      r: 4, alpha: 8, targets: ['experts.down', 'router', 'experts.gate_up'],
      rankPattern: { 'model.layers.1.mlp.experts.down_proj': 3, 'gate.weight': 2 }, alphaPattern: { 'layers.0.mlp.gate.weight': 5 },
    } });
    const [l0, l1] = sparseMoELayers(model);
    expect(l0.adapterConfig('default')).to.deep.include({ ranks: { router: 2 }, alphas: { router: 5 } });
    expect(l1.adapterConfig('default')).to.deep.include({ ranks: { 'experts.down': 3, router: 2 } });
    expect(l1.adapter('default').factors['experts.down']!.A.shape).to.deep.equal([3 * l1.numExperts, l1.intermediateSize]);
    randomizeAdapters(model, 6);
    const want = logitsOf(model);
    const dir = await tempDir();
    await savePeftAdapter(model, dir);
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    expect(config.rank_pattern).to.deep.equal({ 'model\\.layers\\.1\\.mlp\\.experts\\.down_proj': 3, '.*\\.gate\\.weight': 2 });
    expect(config.alpha_pattern).to.deep.equal({ 'model\\.layers\\.0\\.mlp\\.gate\\.weight': 5 });
    const saved = factors(model);
    unregister();
    model.dispose();
    const copy = await loadHFCheckpoint(fixtureDir('qwen3_moe'));
    const loaded = await loadPeftAdapter(copy, dir);
    expect(loaded.targets).to.deep.equal(['experts.gate_up', 'experts.down', 'router']);
    expect(maxRelativeError(logitsOf(copy), want)).to.be.at.most(1e-5);
    const back = factors(copy);
    expect(Object.keys(back).sort()).to.deep.equal(Object.keys(saved).sort());
    for (const [n, v] of Object.entries(saved)) expect(back[n], n).to.deep.equal(v);
    copy.dispose();
  });
});
