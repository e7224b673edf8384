/**
 * PEFT files for LoRA on attention and dense-MLP projections (with MoE targets beside them):
 * target_modules, PEFT tensor names, rank/alpha patterns and lora_dropout, the round trip, and
 * the merge into a checkpoint.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { saveHFCheckpoint } from '../../src/io/hf_save.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { mergeAdapterIntoCheckpoint } from '../../src/io/merge.js';
import { loadPeftAdapter, savePeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile, writeSafetensorsFile } from '../../src/io/safetensors.js';
import { RotaryAttention } from '../../src/layers/attention.js';
import { buildMoECausalLM, sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import { SwiGLUMLP } from '../../src/layers/swiglu_mlp.js';
import { register, unregister } from '../../src/plugin.js';
import { seedModelInit } from '../../src/train/seeded_init.js';
import { expectClose, Rng } from '../helpers/numeric.js';
import { rejection } from '../helpers/rejection.js';
import { TINY_QWEN2_MOE } from '../helpers/tiny_models.js';
import { cleanup, readAll, tempDir } from './checkpoint_helpers.js';

const ids = () => tf.tensor2d([[1, 5, 9, 3, 30, 2]], [1, 6], 'int32');

async function baseModel() {
  const model = buildMoECausalLM(TINY_QWEN2_MOE);
  await seedModelInit(model, 3, 0.2);
  return model;
}

/** Random values in every trainable (adapter) variable, B included, so the adapter changes the logits. */
function randomizeAdapters(model: ReturnType<typeof buildMoECausalLM>, seed: number): void {
  const rng = new Rng(seed);
  for (const v of model.trainableWeights) {
    const size = v.shape.reduce((p: number, q) => p * (q as number), 1);
    tf.tidy(() => { v.write(tf.tensor(Float32Array.from(rng.array(size, 0.3)), v.shape as number[])); });
  }
}

function logits(model: ReturnType<typeof buildMoECausalLM>): Float32Array {
  return tf.tidy(() => {
    const x = ids();
    return (model.apply(x) as tf.Tensor).dataSync() as Float32Array;
  });
}

describe('io/peft: LoRA on attention and dense-MLP projections', () => {
  after(async () => { unregister(); await cleanup(); });
  afterEach(() => unregister());

  const lora = {
    r: 2, alpha: 4, targets: ['q_proj', 'v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.down_proj', 'experts.down', 'shared_expert.up_proj'],
    rankPattern: { 'layers.1.self_attn.v_proj': 1 }, alphaPattern: { 'o_proj': 8 },
  };

  it('save → load is exact: PEFT names, target_modules and patterns in the config, the same tensors and logits', async () => {
    const model = await baseModel();
    register({ models: [model], lora });
    randomizeAdapters(model, 5);
    const dir = await tempDir();
    await savePeftAdapter(model, dir);
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    expect({
      target_modules: config.target_modules, target_parameters: config.target_parameters, r: config.r, lora_alpha: config.lora_alpha,
      rank_pattern: config.rank_pattern, alpha_pattern: config.alpha_pattern, lora_dropout: config.lora_dropout,
    }).to.deep.equal({
      target_modules: ['shared_expert.up_proj', 'self_attn.q_proj', 'self_attn.v_proj', 'self_attn.o_proj', 'mlp.gate_proj', 'mlp.down_proj'],
      target_parameters: ['experts.down_proj'], r: 2, lora_alpha: 4,
      rank_pattern: { 'model.layers.1.self_attn.v_proj': 1 },
      alpha_pattern: { 'model.layers.0.self_attn.o_proj': 8, 'model.layers.1.self_attn.o_proj': 8 },
      lora_dropout: 0,
    });
    const saved = await readAll(join(dir, 'adapter_model.safetensors'));
    const names = (module: string) => [`base_model.model.${module}.lora_A.weight`, `base_model.model.${module}.lora_B.weight`];
    expect(Object.keys(saved).sort()).to.deep.equal([
      ...names('model.layers.0.self_attn.q_proj'), ...names('model.layers.0.self_attn.v_proj'), ...names('model.layers.0.self_attn.o_proj'),
      ...names('model.layers.0.mlp.gate_proj'), ...names('model.layers.0.mlp.down_proj'),
      ...names('model.layers.1.self_attn.q_proj'), ...names('model.layers.1.self_attn.v_proj'), ...names('model.layers.1.self_attn.o_proj'),
      ...names('model.layers.1.mlp.experts'), ...names('model.layers.1.mlp.shared_expert.up_proj'),
    ].sort());
    const attn1 = model.getLayer('model.layers.1.self_attn') as RotaryAttention;
    expect(saved['base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight'].shape).to.deep.equal([1, 8]);
    expect(Array.from(saved['base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight'].dataSync()))
        .to.deep.equal(Array.from(attn1.lora.factors('default')['v_proj'].B.read().dataSync()));

    const copy = await baseModel();
    const loaded = await loadPeftAdapter(copy, dir);
    expect(loaded.modules).to.deep.equal([
      'model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj', 'model.layers.0.self_attn.o_proj',
      'model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.down_proj',
      'model.layers.1.self_attn.q_proj', 'model.layers.1.self_attn.v_proj', 'model.layers.1.self_attn.o_proj',
    ]);
    expect(loaded.targets).to.deep.equal(['experts.down', 'shared.up']);
    const copyAttn1 = copy.getLayer('model.layers.1.self_attn') as RotaryAttention;
    expect(copyAttn1.lora.config('default')!.modules).to.deep.equal({ q_proj: { r: 2, alpha: 4 }, v_proj: { r: 1, alpha: 4 }, o_proj: { r: 2, alpha: 8 } });
    for (const layerName of ['model.layers.0.self_attn', 'model.layers.0.mlp', 'model.layers.1.self_attn']) {
      const a = model.getLayer(layerName) as RotaryAttention | SwiGLUMLP;
      const b = copy.getLayer(layerName) as RotaryAttention | SwiGLUMLP;
      for (const [p, f] of Object.entries(a.lora.factors('default'))) {
        expect(Array.from(b.lora.factors('default')[p].A.read().dataSync()), `${layerName}.${p} A`).to.deep.equal(Array.from(f.A.read().dataSync()));
        expect(Array.from(b.lora.factors('default')[p].B.read().dataSync()), `${layerName}.${p} B`).to.deep.equal(Array.from(f.B.read().dataSync()));
      }
    }
    // only the adapter trains in the loaded model too
    expect(copy.trainableWeights.length).to.equal(model.trainableWeights.length);
    const withAdapter = logits(model);
    expect(maxDiff(withAdapter, logits(await baseModel()))).to.be.greaterThan(1e-3);
    expect(Array.from(logits(copy))).to.deep.equal(Array.from(withAdapter));
    tf.dispose(Object.values(saved));
    unregister();
    model.dispose();
    copy.dispose();
  });

  it('lora_dropout and rsLoRA are saved and loaded as PEFT writes them', async () => {
    const model = await baseModel();
    register({ models: [model], lora: { r: 2, alpha: 4, dropout: 0.25, rsLoRA: true, targets: ['k_proj', 'mlp.up_proj'] } });
    const dir = await tempDir();
    await savePeftAdapter(model, dir);
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    expect([config.lora_dropout, config.use_rslora, config.target_modules]).to.deep.equal([0.25, true, ['self_attn.k_proj', 'mlp.up_proj']]);
    const copy = await baseModel();
    const loaded = await loadPeftAdapter(copy, dir);
    expect([loaded.rsLoRA, loaded.notes]).to.deep.equal([true, []]);
    expect((copy.getLayer('model.layers.0.mlp') as SwiGLUMLP).lora.config('default')).to.deep.equal(
        { name: 'default', modules: { up_proj: { r: 2, alpha: 4 } }, rsLoRA: true, dropout: 0.25 });
    unregister();
    model.dispose();
    copy.dispose();
  });

  it('lora_dropout on MoE targets: saved with shared-expert targets, 0 with parameter targets (PEFT\'s ParamWrapper refuses it), loaded back', async () => {
    const model = await baseModel();
    register({ models: [model], lora: { r: 2, alpha: 4, dropout: 0.1, targets: ['shared_expert.up_proj', 'q_proj'] } });
    const dir = await tempDir();
    await savePeftAdapter(model, dir);
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    expect([config.lora_dropout, config.target_parameters]).to.deep.equal([0.1, []]);
    unregister();
    model.dispose();
    const experts = await baseModel();
    // the experts and the router ('gate.weight') are parameter targets in PEFT
    register({ models: [experts], lora: { r: 2, alpha: 4, dropout: 0.1, targets: ['experts.gate_up', 'router', 'shared_expert.up_proj'] } });
    const expertsDir = await tempDir();
    await savePeftAdapter(experts, expertsDir);
    const expertsConfig = JSON.parse(await readFile(join(expertsDir, 'adapter_config.json'), 'utf8'));
    expect([expertsConfig.lora_dropout, expertsConfig.target_parameters]).to.deep.equal([0, ['experts.gate_up_proj', 'gate.weight']]);
    // the MoE layers and the linear layers of one adapter must agree (PEFT keeps one lora_dropout)
    (experts.getLayer('model.layers.0.self_attn') as RotaryAttention).lora.add({ name: 'default', modules: { q_proj: { r: 2, alpha: 4 } }, dropout: 0.3 });
    expect((await rejection(savePeftAdapter(experts, await tempDir()))).message).to.match(/the adapted layers have lora_dropout 0\.1, 0\.3 \(PEFT keeps one per adapter\)/);
    unregister();
    experts.dispose();
    const copy = await baseModel();
    await loadPeftAdapter(copy, dir);
    expect(sparseMoELayers(copy).map(l => l.adapterConfig('default')?.dropout)).to.deep.equal([0.1]);
    copy.dispose();
  });

  it('mergeAdapterIntoCheckpoint folds attention and dense-MLP adapters: merged logits = model + adapter', async () => {
    const model = await baseModel();
    const baseDir = await tempDir();
    await saveHFCheckpoint(model, baseDir);
    register({ models: [model], lora });
    randomizeAdapters(model, 6);
    const adapterDir = await tempDir();
    await savePeftAdapter(model, adapterDir);
    const withAdapter = logits(model);
    unregister();
    const outDir = await tempDir();
    const result = await mergeAdapterIntoCheckpoint(baseDir, adapterDir, outDir);
    expect(result.adapter.modules).to.have.length(8);
    const file = await readSafetensorsFile(join(outDir, 'model.safetensors'));
    expect(file.names().filter(n => n.includes('lora'))).to.deep.equal([]);
    const merged = await loadHFCheckpoint(outDir);
    expectClose(logits(merged), withAdapter, 1e-4, 'merged logits vs model + adapter');
    merged.dispose();
    model.dispose();
  });

  it('refuses linear tensors that are missing, misshapen, untargeted or not float, one line each', async () => {
    const model = await baseModel();
    register({ models: [model], lora: { r: 2, alpha: 4, targets: ['q_proj'] } });
    const dir = await tempDir();
    await savePeftAdapter(model, dir);
    unregister();
    model.dispose();
    const tensors = await readAll(join(dir, 'adapter_model.safetensors'));
    const q0 = 'base_model.model.model.layers.0.self_attn.q_proj';
    const q1 = 'base_model.model.model.layers.1.self_attn.q_proj';
    tf.dispose([tensors[`${q0}.lora_B.weight`], tensors[`${q1}.lora_A.weight`], tensors[`${q1}.lora_B.weight`]]);
    delete tensors[`${q0}.lora_B.weight`];
    tensors[`${q1}.lora_A.weight`] = tf.zeros([3, 8]);
    tensors[`${q1}.lora_B.weight`] = tf.zeros([8, 2], 'int32');
    tensors['base_model.model.model.layers.0.mlp.up_proj.lora_A.weight'] = tf.zeros([2, 8]);
    await writeSafetensorsFile(join(dir, 'adapter_model.safetensors'), tensors, { format: 'pt' });
    tf.dispose(Object.values(tensors));
    const copy = await baseModel();
    const err = await rejection(loadPeftAdapter(copy, dir));
    expect(err.message.split('\n').slice(1)).to.deep.equal([
      `  no '${q0}.lora_B.weight' (the adapter config targets 'model.layers.0.self_attn.q_proj')`,
      `  '${q1}.lora_A.weight' has shape [3,8] but model.layers.1.self_attn.q_proj with r = 2 needs [2,8]`,
      `  '${q1}.lora_B.weight' must be a float tensor but is I32`,
      "  'base_model.model.model.layers.0.mlp.up_proj.lora_A.weight' is a LoRA tensor of 'model.layers.0.mlp' that the " +
          'adapter config does not target (target_modules ["self_attn.q_proj"])',
    ]);
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    await writeFile(join(dir, 'adapter_config.json'), JSON.stringify({ ...config, rank_pattern: { q_proj: 0 }, alpha_pattern: [] }));
    expect((await rejection(loadPeftAdapter(copy, dir))).message.split('\n').slice(1, 3)).to.deep.equal([
      '  rank_pattern must map module-name keys to integers >= 1 but is {"q_proj":0}',
      '  alpha_pattern must map module-name keys to numbers > 0 but is []',
    ]);
    expect(copy.trainableWeights.length).to.equal(copy.weights.length);
    copy.dispose();
  });

  it('savePeftAdapter refuses linear adapters that PEFT cannot hold in one config', async () => {
    const model = await baseModel();
    const attn = model.getLayer('model.layers.0.self_attn') as RotaryAttention;
    const mlp = model.getLayer('model.layers.0.mlp') as SwiGLUMLP;
    attn.lora.add({ name: 'x', modules: { q_proj: { r: 2, alpha: 4 } }, rsLoRA: true, dropout: 0.1 });
    mlp.lora.add({ name: 'x', modules: { up_proj: { r: 2, alpha: 4 } }, dropout: 0.2 });
    const dir = await tempDir();
    const err = await rejection(savePeftAdapter(model, dir, { name: 'x' }));
    expect(err.message.split('\n')).to.deep.equal([
      `\`savePeftAdapter()\`: '${dir}' (adapter 'x'): 2 problems:`,
      "  'model.layers.0.mlp' has rsLoRA false but 'model.layers.0.self_attn.q_proj' has rsLoRA true (PEFT keeps one per adapter)",
      '  the adapted layers have lora_dropout 0.1, 0.2 (PEFT keeps one per adapter)',
    ]);
    model.dispose();
  });
});

function maxDiff(a: Float32Array, b: Float32Array): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}
