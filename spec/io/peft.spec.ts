import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { copyFile, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { expertFactorLayout, PeftAdapterError, peftAdapterTensors } from '../../src/io/peft.js';
import { loadPeftAdapter, savePeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile, writeSafetensorsFile } from '../../src/io/safetensors.js';
import { addMoEAdapter, sparseMoELayers, trainableVariables } from '../../src/layers/moe_causal_lm.js';
import type { SparseMoE } from '../../src/layers/sparse_moe.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { moeLayerIndices } from '../../src/models/families.js';
import { cleanup, fixtureConfig, fixtureDir, golden, readAll, tempDir, WHOLE_ARCHS } from './checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';

/** A copy of a fixture adapter with its config and tensors edited. */
async function editedAdapter(
    arch: string, editConfig: (c: Record<string, unknown>) => void,
    editTensors: (t: Record<string, tf.Tensor>) => void = () => {}): Promise<string> {
  const dir = await tempDir();
  const config = JSON.parse(await readFile(join(fixtureDir(arch), 'adapter', 'adapter_config.json'), 'utf8'));
  editConfig(config);
  await writeFile(join(dir, 'adapter_config.json'), JSON.stringify(config));
  const tensors = await readAll(join(fixtureDir(arch), 'adapter', 'adapter_model.safetensors'));
  editTensors(tensors);
  await writeSafetensorsFile(join(dir, 'adapter_model.safetensors'), tensors, { format: 'pt' });
  tf.dispose(Object.values(tensors));
  return dir;
}

describe('io/peft', () => {
  after(cleanup);

  describe('the fixture adapters reproduce PEFT\'s lora.logits and every lora.grad.* (<= 1e-4 relative)', () => {
    // llama4_text's (Llama 4 names its blocks feed_forward, PEFT reads its experts the other way round) are in spec/models/llama4_text.spec.ts
    for (const arch of WHOLE_ARCHS.filter(a => a !== 'llama4_text')) {
      for (const kernel of ['reference', 'fused'] as const) {
        it(`${arch}, expertKernel '${kernel}'`, async () => {
          const model = await loadHFCheckpoint(fixtureDir(arch), { expertKernel: kernel });
          const loaded = await loadPeftAdapter(model, join(fixtureDir(arch), 'adapter'));
          // deepseek_v3 and glm4_moe start with a dense layer: one adapted block fewer
          const moeLayers = moeLayerIndices(await fixtureConfig(arch));
          expect(loaded).to.deep.equal({
            name: 'default', r: 4, alpha: 8, rsLoRA: false, targets: ['experts.gate_up', 'experts.down', 'router'],
            layers: moeLayers.map(i => `model.layers.${i}.mlp`), modules: [], notes: [],
          });
          const g = await golden(arch);
          const [ids, want, cot] = await Promise.all(['input_ids', 'lora.logits', 'lora.g'].map(n => g.tensor(n)));
          const lora = peftAdapterTensors(model);
          expect(lora.length).to.equal(6 * moeLayers.length);
          expect(trainableVariables(model).map(v => v.name).sort()).to.deep.equal(lora.map(t => (t.variable.read() as tf.Variable).name).sort());
          const before = tf.memory().numTensors;
          let logitsErr = NaN;
          const { value, grads } = tf.variableGrads(() => {
            const logits = model.apply(ids, { training: true }) as tf.Tensor;
            logitsErr = maxRelativeError(logits.dataSync(), want.dataSync());
            return tf.sum(tf.mul(logits, cot)) as tf.Scalar;
          }, lora.map(t => t.variable.read() as tf.Variable));
          expect(logitsErr, `${arch} ${kernel} lora.logits ${logitsErr.toExponential(2)}`).to.be.at.most(1e-4);
          for (const t of lora) {
            const expected = await g.tensor(`lora.grad.${t.peftName.replace(/\.weight$/, '.default.weight')}`);
            const err = maxRelativeError(grads[(t.variable.read() as tf.Variable).name].dataSync(), expected.dataSync());
            expect(err, `${arch} ${kernel} grad ${t.peftName}: ${err.toExponential(2)}`).to.be.at.most(1e-4);
            expected.dispose();
          }
          tf.dispose([value, ...Object.values(grads)]);
          expect(tf.memory().numTensors).to.equal(before);
          tf.dispose([ids, want, cot]);
          model.dispose();
        });
      }
    }
  });

  it('save writes PEFT\'s files: the fixture adapter comes back with the same names and bit-identical tensors', async () => {
    const model = await loadHFCheckpoint(fixtureDir('olmoe'));
    await loadPeftAdapter(model, join(fixtureDir('olmoe'), 'adapter'));
    const dir = await tempDir();
    await savePeftAdapter(model, dir);
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    expect(config).to.deep.include({
      peft_type: 'LORA', r: 4, lora_alpha: 8, use_rslora: false, lora_dropout: 0, bias: 'none', use_dora: false,
      target_modules: [], target_parameters: ['experts.gate_up_proj', 'experts.down_proj', 'gate.weight'],
      rank_pattern: {}, alpha_pattern: {}, layers_to_transform: null,
    });
    const saved = await readSafetensorsFile(join(dir, 'adapter_model.safetensors'));
    const original = await readSafetensorsFile(join(fixtureDir('olmoe'), 'adapter', 'adapter_model.safetensors'));
    expect(saved.metadata).to.deep.equal({ format: 'pt' });
    expect(saved.names()).to.deep.equal(original.names());
    for (const n of original.names()) {
      const [a, b] = [await saved.tensor(n), await original.tensor(n)];
      expect(a.shape, n).to.deep.equal(b.shape);
      expect(Array.from(a.dataSync()), n).to.deep.equal(Array.from(b.dataSync()));
      tf.dispose([a, b]);
    }
    model.dispose();
  });

  it('save → load round-trips a trained-looking adapter exactly, shared-expert targets, rsLoRA and partial layers included', async () => {
    const source = await loadHFCheckpoint(fixtureDir('qwen2_moe'));
    addMoEAdapter(source, {
      name: 'mine', r: 3, alpha: 5, rsLoRA: true,
      targets: ['router', 'experts.down', 'shared.gate', 'shared.up', 'shared.down'],
    }, 'random');
    sparseMoELayers(source)[0].removeAdapter('mine');   // only layer 1 keeps it
    const dir = await tempDir();
    await savePeftAdapter(source, dir, { name: 'mine' });
    const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    // PEFT ignores layers_to_transform for target_parameters: entries name the layer instead
    expect(config).to.deep.include({
      r: 3, lora_alpha: 5, use_rslora: true, layers_to_transform: null,
      target_parameters: ['model.layers.1.mlp.experts.down_proj', 'model.layers.1.mlp.gate.weight'],
      target_modules: ['model.layers.1.mlp.shared_expert.gate_proj', 'model.layers.1.mlp.shared_expert.up_proj', 'model.layers.1.mlp.shared_expert.down_proj'],
    });
    const file = await readSafetensorsFile(join(dir, 'adapter_model.safetensors'));
    expect(file.names()).to.deep.equal([
      'base_model.model.model.layers.1.mlp.experts.lora_A.weight', 'base_model.model.model.layers.1.mlp.experts.lora_B.weight',
      'base_model.model.model.layers.1.mlp.gate.lora_A.weight', 'base_model.model.model.layers.1.mlp.gate.lora_B.weight',
      'base_model.model.model.layers.1.mlp.shared_expert.down_proj.lora_A.weight', 'base_model.model.model.layers.1.mlp.shared_expert.down_proj.lora_B.weight',
      'base_model.model.model.layers.1.mlp.shared_expert.gate_proj.lora_A.weight', 'base_model.model.model.layers.1.mlp.shared_expert.gate_proj.lora_B.weight',
      'base_model.model.model.layers.1.mlp.shared_expert.up_proj.lora_A.weight', 'base_model.model.model.layers.1.mlp.shared_expert.up_proj.lora_B.weight']);
    expect(file.info('base_model.model.model.layers.1.mlp.shared_expert.down_proj.lora_A.weight').shape).to.deep.equal([3, 80]);

    const target = await loadHFCheckpoint(fixtureDir('qwen2_moe'));
    const loaded = await loadPeftAdapter(target, dir, { name: 'mine' });
    expect(loaded.layers).to.deep.equal(['model.layers.1.mlp']);
    expect(loaded.targets).to.deep.equal(['experts.down', 'router', 'shared.gate', 'shared.up', 'shared.down']);
    const a = peftAdapterTensors(source, 'mine');
    const b = peftAdapterTensors(target, 'mine');
    expect(b.map(t => t.peftName)).to.deep.equal(a.map(t => t.peftName));
    a.forEach((t, i) => expect(Array.from(b[i].variable.read().dataSync()), t.peftName).to.deep.equal(Array.from(t.variable.read().dataSync())));
    const ids = tf.tensor2d([[3, 1, 4, 1, 5, 9, 2, 6]], [1, 8], 'int32');
    const [y1, y2] = [source, target].map(m => m.predict(ids) as tf.Tensor);
    expect(Array.from(y2.dataSync())).to.deep.equal(Array.from(y1.dataSync()));
    tf.dispose([ids, y1, y2]);
    source.dispose();
    target.dispose();
  });

  it('refuses an adapter made for another model with one error listing every problem, and changes nothing', async () => {
    const model = await loadHFCheckpoint(fixtureDir('qwen3_moe'));
    const err = await rejection(loadPeftAdapter(model, join(fixtureDir('mixtral'), 'adapter')));
    expect(err).to.be.instanceOf(PeftAdapterError);
    const lines = err.message.split('\n');
    expect(lines[0]).to.equal(`\`loadPeftAdapter()\`: '${join(fixtureDir('mixtral'), 'adapter')}' (adapter 'default'): 5 problems:`);
    const want = '(experts.gate_up_proj: A [32,64], B [96,32] or experts.down_proj: A [32,48], B [64,32])';
    expect(lines.slice(1)).to.deep.equal([
      '  the adapter was made for mixtral (auto_mapping {"base_model_class":"MixtralForCausalLM",' +
        '"parent_library":"transformers.models.mixtral.modeling_mixtral"}) but the model is qwen3_moe (Qwen3MoeForCausalLM)',
    ].concat([0, 1].flatMap(i => [
      `  'base_model.model.model.layers.${i}.mlp.experts.base_layer' has A [32,64], B [192,32], which fits no target of this layer with r = 4 ${want}`,
      `  'base_model.model.model.layers.${i}.mlp.experts' has A [32,96], B [64,32], which fits no target of this layer with r = 4 ${want}`,
    ])));
    expect(sparseMoELayers(model).map(l => l.adapterNames())).to.deep.equal([[], []]);
    expect(trainableVariables(model).length).to.equal(model.weights.length);

    const stray = await editedAdapter('qwen3_moe', () => {}, t => {
      t['base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'] = tf.zeros([4, 64]);
      t['base_model.model.model.layers.7.mlp.gate.lora_A.weight'] = tf.zeros([4, 64]);
      t['base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight'].dispose();
      delete t['base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight'];
      for (const f of ['A', 'B']) {
        t[`base_model.model.model.layers.0.mlp.gate.lora_${f}.weight`].dispose();
        delete t[`base_model.model.model.layers.0.mlp.gate.lora_${f}.weight`];
      }
    });
    const strayErr = await rejection(loadPeftAdapter(model, stray));
    const expectedModules = "(expected 'base_model.model.<block>.<module>.lora_{A,B}.weight' with <module> one of experts[.base_layer], " +
      "gate, shared_expert.gate_proj, shared_expert.up_proj, shared_expert.down_proj, shared_expert_gate and <block> one of 'model.layers.0.mlp', 'model.layers.1.mlp')";
    expect(strayErr.message.split('\n').slice(1)).to.deep.equal([
      "  'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' is a LoRA tensor of 'model.layers.0.self_attn' that " +
        'the adapter config does not target (target_modules [])',
      `  'base_model.model.model.layers.7.mlp.gate.lora_A.weight' is not a LoRA tensor of this model's MoE blocks ${expectedModules}`,
      '  no LoRA tensors for router on \'model.layers.0.mlp\'',
      "  'base_model.model.model.layers.1.mlp.experts.base_layer' has lora_A but no lora_B",
    ]);
    model.dispose();
  });

  it('refuses unsupported PEFT options, one line each; a non-zero lora_dropout loads onto the MoE adapters', async () => {
    const model = await loadHFCheckpoint(fixtureDir('mixtral'));
    const dir = await editedAdapter('mixtral', c => {
      Object.assign(c, {
        use_dora: true, lora_bias: true,
        target_modules: ['w1'], bias: 'all', modules_to_save: ['lm_head'], peft_type: 'LOHA',
        target_parameters: ['experts.gate_up_proj', 'experts.down_proj', 'gate.weight', 'self_attn.q_proj.weight'],
      });
    });
    const err = await rejection(loadPeftAdapter(model, dir));
    expect(err.message.split('\n')).to.deep.equal([
      `\`loadPeftAdapter()\`: '${dir}' (adapter 'default'): 7 problems:`,
      "  peft_type must be 'LORA' but is \"LOHA\"",
      '  DoRA (use_dora) is not supported but adapter_config.json sets use_dora: true',
      '  LoRA biases (lora_bias) are not supported but adapter_config.json sets lora_bias: true',
      '  modules_to_save is not supported but adapter_config.json sets modules_to_save: ["lm_head"]',
      "  bias must be 'none' (trained biases are not supported) but is \"all\"",
      "  target_parameters entry \"self_attn.q_proj.weight\" is not supported; supported: 'experts.gate_up_proj', 'experts.down_proj', 'gate.weight' (optionally after a module path)",
      "  target_modules entry \"w1\" is not supported: LoRA on modules is supported on the attention projections ('q_proj', " +
        "'k_proj', 'v_proj', 'o_proj'), the dense MLPs' ('gate_proj', 'up_proj', 'down_proj') and the shared expert's " +
        "('shared_expert.gate_proj', 'shared_expert.up_proj', 'shared_expert.down_proj'); it matches none of this model's",
    ]);
    const shared = await editedAdapter('mixtral', c => { c['target_modules'] = ['shared_expert.up_proj']; });
    expect((await rejection(loadPeftAdapter(model, shared))).message.split('\n').slice(1)).to.deep.equal([
      "  shared.up is targeted but 'model.layers.0.mlp' has no shared expert",
      "  shared.up is targeted but 'model.layers.1.mlp' has no shared expert",
      "  no LoRA tensors for shared.up on 'model.layers.0.mlp'",
      "  no LoRA tensors for shared.up on 'model.layers.1.mlp'",
    ]);

    const dropout = await editedAdapter('mixtral', c => { c['lora_dropout'] = 0.05; });
    const loaded = await loadPeftAdapter(model, dropout);
    expect(loaded.notes).to.deep.equal([]);
    expect((model.getLayer('model.layers.0.mlp') as SparseMoE).adapterConfig('default')!.dropout).to.equal(0.05);
    const again = await rejection(loadPeftAdapter(model, dropout));
    expect(again.message.split('\n').slice(1)).to.deep.equal([
      "  layer 'model.layers.0.mlp' already has an adapter named 'default'",
      "  layer 'model.layers.1.mlp' already has an adapter named 'default'",
    ]);
    model.dispose();
  });

  it('checks every adapter_config.json value and tensor (one message each)', async () => {
    const model = await loadHFCheckpoint(fixtureDir('mixtral'));
    const problems = async (edit: (c: Record<string, unknown>) => void, editTensors?: (t: Record<string, tf.Tensor>) => void) =>
      (await rejection(loadPeftAdapter(model, await editedAdapter('mixtral', edit, editTensors)))).message.split('\n').slice(1);
    expect(await problems(c => Object.assign(c, { r: 0, lora_alpha: -1, use_rslora: 'yes', lora_dropout: 1.5 }))).to.include.members([
      '  r must be an integer >= 1 but is 0',
      '  lora_alpha must be a number > 0 but is -1',
      '  use_rslora must be a boolean but is "yes"',
      '  lora_dropout must be a number in [0, 1) but is 1.5',
    ]);
    const unsupported: Array<[string, unknown, string]> = [
      ['use_qalora', true, 'QA-LoRA (use_qalora) is not supported'],
      ['layer_replication', [[0, 1]], 'layer_replication is not supported'],
      ['alora_invocation_tokens', [5], 'aLoRA (alora_invocation_tokens) is not supported'],
      ['trainable_token_indices', [1, 2], 'trainable_token_indices is not supported'],
      ['fan_in_fan_out', true, 'fan_in_fan_out is not supported'],
    ];
    for (const [key, value, message] of unsupported) {
      expect(await problems(c => { c[key] = value; })).to.deep.equal([
        `  ${message} but adapter_config.json sets ${key}: ${JSON.stringify(value)}`]);
    }
    expect(await problems(c => { c['target_parameters'] = 'experts.down_proj'; c['target_modules'] = 'gate_proj|up_proj'; })).to.include.members([
      '  target_parameters must be a list but is "experts.down_proj"',
      '  target_modules as a pattern ("gate_proj|up_proj") is not supported; list the shared-expert projections',
    ]);
    expect(await problems(c => { c['target_parameters'] = []; c['target_modules'] = {}; c['layers_to_transform'] = 'all'; })).to.deep.equal([
      '  layers_to_transform must be null, an index or a list but is "all"',
      '  target_modules must be a list but is {}',
      "  layer 'model.layers.0.mlp' has LoRA tensors but the adapter config targets nothing on it",
      "  layer 'model.layers.1.mlp' has LoRA tensors but the adapter config targets nothing on it",
    ]);
    expect(await problems(c => { c['target_parameters'] = ['experts.gate_up_proj', 'gate.weight']; })).to.deep.equal([0, 1].map(i =>
      `  'base_model.model.model.layers.${i}.mlp.experts' adapts experts.down, which the adapter config does not target on this layer`));
    expect(await problems(c => { c['target_parameters'] = []; })).to.include(
      '  the adapter targets nothing: target_parameters and target_modules are both empty');
    expect(await problems(c => { c['layers_to_transform'] = 0; })).to.deep.equal([
      "  layer 'model.layers.1.mlp' has LoRA tensors but is not in layers_to_transform [0]"]);
    expect(await problems(() => {}, t => {
      for (const n of Object.keys(t)) if (n.includes('layers.1.')) { t[n].dispose(); delete t[n]; }
      const a = t['base_model.model.model.layers.0.mlp.gate.lora_A.weight'];
      t['base_model.model.model.layers.0.mlp.gate.lora_A.weight'] = tf.cast(a, 'int32');
      a.dispose();
    })).to.deep.equal([
      "  'base_model.model.model.layers.0.mlp.gate.lora_A.weight' must be a float tensor but is I32",
      "  no LoRA tensors for 'model.layers.1.mlp' (expected targets: experts.gate_up, experts.down, router)",
    ]);
    expect(await problems(() => {}, t => {
      // a third expert wrapper that duplicates gate_up
      t['base_model.model.model.layers.0.mlp.experts.base_layer.base_layer.lora_A.weight'] = t['base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight'].clone();
      t['base_model.model.model.layers.0.mlp.experts.base_layer.base_layer.lora_B.weight'] = t['base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight'].clone();
    })).to.deep.equal([
      "  'base_model.model.model.layers.0.mlp.experts.base_layer' is a second adapter for experts.gate_up on 'model.layers.0.mlp'"]);
    const dir = await tempDir();
    await writeFile(join(dir, 'adapter_config.json'), '[1, 2]');
    expect((await rejection(loadPeftAdapter(model, dir))).message).to.equal(`\`loadPeftAdapter()\`: ${join(dir, 'adapter_config.json')} must hold a JSON object`);
    expect(sparseMoELayers(model).map(l => l.adapterNames())).to.deep.equal([[], []]);
    model.dispose();
    const plain = tfl.sequential({ layers: [tfl.layers.dense({ units: 1, inputShape: [2] })] });
    expect((await rejection(loadPeftAdapter(plain, dir))).message).to.equal(
      `\`loadPeftAdapter()\`: the model '${plain.name}' has no SparseMoE, attention or dense-MLP layer to load an adapter into`);
    plain.dispose();
  });

  it('layers_to_transform limits the layers; target_parameters order and full-path entries do not matter', async () => {
    const model = await loadHFCheckpoint(fixtureDir('mixtral'));
    const dir = await editedAdapter('mixtral', c => {
      c['layers_to_transform'] = [1];
      c['target_parameters'] = ['mlp.gate.weight', 'mlp.experts.down_proj', 'mlp.experts.gate_up_proj'];
    }, t => {
      for (const n of Object.keys(t)) if (n.includes('layers.0.')) { t[n].dispose(); delete t[n]; }
    });
    const loaded = await loadPeftAdapter(model, dir, { name: 'late' });
    expect(loaded.layers).to.deep.equal(['model.layers.1.mlp']);
    expect(sparseMoELayers(model).map(l => l.adapterNames())).to.deep.equal([[], ['late']]);
    model.dispose();
  });

  it('entries with a module path target single layers, as PEFT matches them; such adapters save and load back', async () => {
    const model = await loadHFCheckpoint(fixtureDir('mixtral'));
    const dir = await editedAdapter('mixtral', c => {
      c['target_parameters'] = ['experts.down_proj', 'model.layers.1.mlp.gate.weight'];
    }, t => {
      for (const n of Object.keys(t)) {
        if (n.includes('base_layer') || n.includes('layers.0.mlp.gate.')) { t[n].dispose(); delete t[n]; }
      }
    });
    const loaded = await loadPeftAdapter(model, dir);
    expect(loaded.targets).to.deep.equal(['experts.down', 'router']);
    const [l0, l1] = sparseMoELayers(model);
    expect([l0.adapter('default').config.targets, l1.adapter('default').config.targets]).to.deep.equal([['experts.down'], ['experts.down', 'router']]);
    const out = await tempDir();
    await savePeftAdapter(model, out);
    const config = JSON.parse(await readFile(join(out, 'adapter_config.json'), 'utf8'));
    expect(config.target_parameters).to.deep.equal([
      'model.layers.0.mlp.experts.down_proj', 'model.layers.1.mlp.experts.down_proj', 'model.layers.1.mlp.gate.weight']);
    const again = await loadHFCheckpoint(fixtureDir('mixtral'));
    await loadPeftAdapter(again, out);
    const [a, b] = [peftAdapterTensors(model), peftAdapterTensors(again)];
    expect(b.map(t => t.peftName)).to.deep.equal(a.map(t => t.peftName));
    a.forEach((t, i) => expect(Array.from(b[i].variable.read().dataSync())).to.deep.equal(Array.from(t.variable.read().dataSync())));
    model.dispose();
    again.dispose();
  });

  it('savePeftAdapter refuses a missing adapter and layers whose adapters differ', async () => {
    const model = await loadHFCheckpoint(fixtureDir('mixtral'));
    const dir = await tempDir();
    expect((await rejection(savePeftAdapter(model, dir))).message).to.equal(
      "`savePeftAdapter()`: no layer of 'moe_causal_lm' has an adapter 'default' (adapters: none)");
    const [l0, l1] = sparseMoELayers(model);
    l0.addAdapter({ name: 'default', r: 2, alpha: 4, targets: ['router'] });
    l1.addAdapter({ name: 'default', r: 4, alpha: 4, targets: ['router', 'experts.down'] });
    expect((await rejection(savePeftAdapter(model, dir))).message).to.equal(
      `\`savePeftAdapter()\`: '${dir}' (adapter 'default'): 1 problem:\n` +
      "  'model.layers.1.mlp' has r 4, alpha 4, rsLoRA false but 'model.layers.0.mlp' has r 2, alpha 4, rsLoRA false (PEFT keeps one of each per adapter)");
    model.dispose();
  });

  describe('adapters that would load silently wrong are refused or converted', () => {
    /** Expert factors of our (PEFT >= 0.19.1) layout in PEFT < 0.19.1's, by index (an independent reference). */
    function toOldLayout(t: Record<string, tf.Tensor>, r: number) {
      for (const nameA of Object.keys(t).filter(n => /\.experts(\.base_layer)*\.lora_A\.weight$/.test(n))) {
        const nameB = nameA.replace('lora_A', 'lora_B');
        const [A, B] = [t[nameA], t[nameB]];
        const [rE, inDim] = A.shape;
        const outDim = B.shape[0];
        const e = rE / r;
        const [a, b] = [A.dataSync(), B.dataSync()];
        const oldA = new Float32Array(rE * outDim);   // [r·E, out]: row e·r + j is B_e's column j
        const oldB = new Float32Array(inDim * rE);    // [in, r·E]: column j·E + e is A_e's row j
        for (let x = 0; x < e; x++) {
          for (let j = 0; j < r; j++) {
            for (let o = 0; o < outDim; o++) oldA[(x * r + j) * outDim + o] = b[o * rE + j * e + x];
            for (let i = 0; i < inDim; i++) oldB[i * rE + j * e + x] = a[(x * r + j) * inDim + i];
          }
        }
        tf.dispose([A, B]);
        t[nameA] = tf.tensor2d(oldA, [rE, outDim]);
        t[nameB] = tf.tensor2d(oldB, [inDim, rE]);
      }
    }
    const logitsWith = async (arch: string, dir: string) => {
      const model = await loadHFCheckpoint(fixtureDir(arch));
      const loaded = await loadPeftAdapter(model, dir);
      const ids = tf.tensor2d([[3, 1, 4, 1, 5, 9, 2, 6]], [1, 8], 'int32');
      const y = model.predict(ids) as tf.Tensor;
      const logits = Array.from(y.dataSync());
      tf.dispose([ids, y]);
      model.dispose();
      return { logits, notes: loaded.notes };
    };

    it('a NaN or an infinity in any factor: one error naming each tensor, the model untouched, no tensor left', async () => {
      const model = await loadHFCheckpoint(fixtureDir('qwen3_moe'));
      const dir = await editedAdapter('qwen3_moe', () => {}, t => {
        for (const [name, value] of [['base_model.model.model.layers.0.mlp.gate.lora_B.weight', NaN],
          ['base_model.model.model.layers.1.mlp.experts.lora_A.weight', -Infinity]] as const) {
          const values = t[name].dataSync().slice();
          values[3] = value;
          values[7] = value;
          const shape = t[name].shape;
          t[name].dispose();
          t[name] = tf.tensor(values, shape);
        }
      });
      const before = tf.memory().numTensors;
      const err = await rejection(loadPeftAdapter(model, dir));
      expect(tf.memory().numTensors).to.equal(before);
      expect(err).to.be.instanceOf(PeftAdapterError);
      expect(err.message).to.equal(`\`loadPeftAdapter()\`: '${dir}' (adapter 'default'): 2 problems:\n` +
        "  'base_model.model.model.layers.0.mlp.gate.lora_B.weight' holds 2 non-finite values (NaN or ±Infinity)\n" +
        "  'base_model.model.model.layers.1.mlp.experts.lora_A.weight' holds 2 non-finite values (NaN or ±Infinity)");
      expect(sparseMoELayers(model).map(l => l.adapterNames())).to.deep.equal([[], []]);
      expect(trainableVariables(model).length).to.equal(model.weights.length);
      model.dispose();
    });

    it('an adapter recorded for another architecture does not load into a same-sized model; saves record ours', async () => {
      const model = await loadHFCheckpoint(fixtureDir('qwen3_moe'));
      const mixtral = { base_model_class: 'MixtralForCausalLM', parent_library: 'transformers.models.mixtral.modeling_mixtral' };
      const forMixtral = await editedAdapter('qwen3_moe', c => { c['auto_mapping'] = mixtral; });
      expect((await rejection(loadPeftAdapter(model, forMixtral))).message).to.equal(
        `\`loadPeftAdapter()\`: '${forMixtral}' (adapter 'default'): 1 problem:\n` +
        `  the adapter was made for mixtral (auto_mapping ${JSON.stringify(mixtral)}) but the model is qwen3_moe (Qwen3MoeForCausalLM)`);
      const forLlama = await editedAdapter('qwen3_moe', c => { c['auto_mapping'] = { base_model_class: 'LlamaForCausalLM' }; });
      expect((await rejection(loadPeftAdapter(model, forLlama))).message).to.include(
        '  the adapter was made for LlamaForCausalLM (auto_mapping {"base_model_class":"LlamaForCausalLM"}) but the model is qwen3_moe');
      expect(sparseMoELayers(model).map(l => l.adapterNames())).to.deep.equal([[], []]);
      // what PEFT's save_pretrained writes with task_type null, and the version whose layout we write
      await loadPeftAdapter(model, join(fixtureDir('qwen3_moe'), 'adapter'));
      const dir = await tempDir();
      await savePeftAdapter(model, dir);
      const config = JSON.parse(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
      const fixture = JSON.parse(await readFile(join(fixtureDir('qwen3_moe'), 'adapter', 'adapter_config.json'), 'utf8'));
      expect(config).to.deep.include({ auto_mapping: fixture.auto_mapping, peft_version: fixture.peft_version, task_type: null });
      model.dispose();
      const mixtralModel = await loadHFCheckpoint(fixtureDir('mixtral'));
      expect((await rejection(loadPeftAdapter(mixtralModel, dir))).message).to.include(
        '  the adapter was made for qwen3_moe (auto_mapping {"base_model_class":"Qwen3MoeForCausalLM",');
      mixtralModel.dispose();
    });

    for (const [arch, version, old] of [['qwen3_moe', '0.18.1', true], ['qwen3_moe', '0.19.0', true], ['mixtral', '0.17.0', true],
      ['olmoe', '0.19.1', false]] as const) {
      it(`peft_version ${version} on ${arch}: ${old ? 'the older expert layout is converted exactly' : 'the layout is ours'}: the same logits`, async () => {
        const want = await logitsWith(arch, join(fixtureDir(arch), 'adapter'));
        const dir = await editedAdapter(arch, c => { c['peft_version'] = version; }, t => { if (old) toOldLayout(t, 4); });
        const before = tf.memory().numTensors;
        const got = await logitsWith(arch, dir);
        expect(tf.memory().numTensors).to.equal(before);
        expect(got).to.deep.equal(want);
        expect(got.notes).to.deep.equal([]);
      });
    }

    it("which PEFT versions swapped in and out, on [E, out, in] weights and on gpt-oss's [E, in, out] (transposed) ones", () => {
      // PEFT 0.17/0.18 read [E, d1, d2] as [E, in, out]; 0.19.0 swapped only transposed weights; 0.19.1 swaps the others
      const cases: Array<[string, boolean, 'ours' | 'swapped']> = [
        ['0.17.1', false, 'swapped'], ['0.18.1', false, 'swapped'], ['0.19.0', false, 'swapped'], ['0.19.1', false, 'ours'],
        ['0.21.0', false, 'ours'], ['0.17.1', true, 'ours'], ['0.18.1', true, 'ours'], ['0.19.0', true, 'swapped'],
        ['0.19.1', true, 'ours'], ['0.20.1.dev0@abc', true, 'ours'], ['1.0.0', false, 'ours'], ['0.18.2.dev0', false, 'swapped'],
      ];
      for (const [version, transposed, layout] of cases) {
        const problems: string[] = [];
        expect(expertFactorLayout(version, transposed, problems, []), `${version} transposed ${transposed}`).to.equal(layout);
        expect(problems).to.deep.equal([]);
      }
    });

    it('peft_version: unparsable or an ambiguous pre-release is refused; newer or missing loads with a note', async () => {
      const model = await loadHFCheckpoint(fixtureDir('qwen3_moe'));
      for (const version of ['latest', 7, '0.19.1.dev0', '0.19.0rc1']) {
        const message = (await rejection(loadPeftAdapter(model, await editedAdapter('qwen3_moe', c => { c['peft_version'] = version; })))).message;
        expect(message.split('\n').slice(1)).to.deep.equal([typeof version === 'string' && version.startsWith('0.19') ?
          `  peft_version ${version} is a pre-release between two expert LoRA layouts (PEFT changed it in 0.19.0 and 0.19.1); ` +
            'save the adapter again with a released PEFT' :
          `  peft_version must be a PEFT version such as '0.21.0' but is ${JSON.stringify(version)}`]);
      }
      model.dispose();
      const want = await logitsWith('qwen3_moe', join(fixtureDir('qwen3_moe'), 'adapter'));
      const newer = await logitsWith('qwen3_moe', await editedAdapter('qwen3_moe', c => { c['peft_version'] = '0.23.0.dev0@abc123'; }));
      expect(newer.logits).to.deep.equal(want.logits);
      expect(newer.notes).to.deep.equal(['peft_version 0.23.0.dev0@abc123 is newer than the newest PEFT checked here (0.21); ' +
        'its expert factors are read in the layout of PEFT >= 0.19.1']);
      const missing = await logitsWith('qwen3_moe', await editedAdapter('qwen3_moe', c => { delete c['peft_version']; }));
      expect(missing.logits).to.deep.equal(want.logits);
      expect(missing.notes).to.deep.equal(['adapter_config.json has no peft_version: the expert factors are read in the layout of ' +
        "PEFT >= 0.19.1 (this package's earlier saves); an adapter from PEFT 0.17 needs peft_version set to convert it"]);
    });
  });

  it('a missing adapter file is a clear error', async () => {
    const model = await loadHFCheckpoint(fixtureDir('mixtral'));
    const dir = await tempDir();
    await copyFile(join(fixtureDir('mixtral'), 'adapter', 'adapter_config.json'), join(dir, 'adapter_config.json'));
    expect((await rejection(loadPeftAdapter(model, dir))).message).to.contain('adapter_model.safetensors');
    const empty = await tempDir();
    expect((await rejection(loadPeftAdapter(model, empty))).message)
      .to.equal(`\`loadPeftAdapter()\`: adapter config '${join(empty, 'adapter_config.json')}' does not exist`);
    model.dispose();
  });
});
