import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { readFile, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { FileIOError, fileIO, registerFileIOHandler } from '../../src/io/file_io_handler.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { peftAdapterTensors } from '../../src/io/peft.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { RotaryAttention } from '../../src/layers/attention.js';
import { buildMoECausalLM, hfConfigOf, sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import { SwiGLUMLP } from '../../src/layers/swiglu_mlp.js';
import { SparseMoE } from '../../src/layers/sparse_moe.js';
import { cleanup, fixtureConfig, fixtureDir, tempDir } from './checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';

describe('io/file_io_handler (file:// without tfjs-node)', () => {
  before(() => { registerFileIOHandler(); });
  after(cleanup);

  it('registers once: a second call is a no-op and a file:// URL has exactly one handler', () => {
    expect(registerFileIOHandler()).to.equal(false);
    expect(tf.io.getSaveHandlers('file:///tmp/x').length).to.equal(1);
    expect(tf.io.getLoadHandlers('file:///tmp/x/model.json').length).to.equal(1);
    expect(tf.io.getSaveHandlers('http://example.com/x').every(h => !(h instanceof Object.getPrototypeOf(fileIO('x')).constructor))).to.equal(true);
  });

  it('model.save(file://dir) writes model.json + weights.bin as tfjs-node does; loadLayersModel restores the same model', async () => {
    const model = await loadHFCheckpoint(fixtureDir('qwen2_moe'), { expertKernel: 'fused' });
    await loadPeftAdapter(model, join(fixtureDir('qwen2_moe'), 'adapter'));
    const moe = sparseMoELayers(model);
    moe[1].addAdapter({ name: 'second', r: 2, alpha: 3, rsLoRA: true, targets: ['shared.up', 'router'] }, 'random');
    moe[1].setActiveAdapters(['default', 'second']);
    moe[0].disableAdapters();
    const dir = await tempDir();
    const result = await model.save(`file://${dir}`);
    expect(result.modelArtifactsInfo.weightDataBytes).to.equal((await stat(join(dir, 'weights.bin'))).size);

    const json = JSON.parse(await readFile(join(dir, 'model.json'), 'utf8'));
    expect(Object.keys(json).sort()).to.deep.equal(
      ['convertedBy', 'format', 'generatedBy', 'modelTopology', 'userDefinedMetadata', 'weightsManifest']);
    expect(json.format).to.equal('layers-model');
    expect(json.convertedBy).to.equal(null);
    expect(json.generatedBy).to.match(/^TensorFlow\.js tfjs-layers v/);
    expect(json.weightsManifest.length).to.equal(1);
    expect(json.weightsManifest[0].paths).to.deep.equal(['weights.bin']);
    const names: string[] = json.weightsManifest[0].weights.map((w: { name: string }) => w.name);
    expect(names).to.include.members([
      'model.embed_tokens/weight', 'model.layers.0.self_attn/q_proj.bias', 'model.layers.1.mlp/gate_up',
      'model.layers.1.mlp/lora_default_gate_up_A', 'model.layers.1.mlp/lora_second_shared_up_B', 'lm_head/weight']);
    expect(new Set(names).size).to.equal(names.length);
    expect(json.userDefinedMetadata.hfConfig).to.deep.equal(await fixtureConfig('qwen2_moe'));

    const loaded = await tfl.loadLayersModel(`file://${join(dir, 'model.json')}`);
    expect(loaded.layers.map(l => `${l.name}:${l.getClassName()}`)).to.deep.equal(model.layers.map(l => `${l.name}:${l.getClassName()}`));
    expect(loaded.getLayer('model.layers.0.self_attn')).to.be.instanceOf(RotaryAttention);
    const [a, b] = [moe, sparseMoELayers(loaded)];
    expect(b.map(l => [l.adapterNames(), l.activeAdapters, l.adaptersDisabled, l.expertKernel])).to.deep.equal(
      a.map(l => [l.adapterNames(), l.activeAdapters, l.adaptersDisabled, l.expertKernel]));
    expect(b[1].adapter('second').config).to.deep.equal({ name: 'second', r: 2, alpha: 3, rsLoRA: true, targets: ['shared.up', 'router'] });
    expect(hfConfigOf(loaded)).to.deep.equal(hfConfigOf(model));
    for (const [i, w] of model.weights.entries()) {
      expect(Array.from(loaded.weights[i].read().dataSync()), w.originalName).to.deep.equal(Array.from(w.read().dataSync()));
    }
    expect(b[1].weightVariable('gate_up').trainable).to.equal(false);
    expect(peftAdapterTensors(loaded).every(t => t.variable.trainable)).to.equal(true);
    const ids = tf.tensor2d([[1, 2, 3, 4, 5], [9, 8, 7, 6, 5]], [2, 5], 'int32');
    const [y1, y2] = [model, loaded].map(m => m.predict(ids) as tf.Tensor);
    expect(Array.from(y2.dataSync())).to.deep.equal(Array.from(y1.dataSync()));
    tf.dispose([ids, y1, y2]);
    // a folder path loads too
    const again = await tfl.loadLayersModel(`file://${dir}`);
    expect(again.layers.filter(l => l instanceof SparseMoE).length).to.equal(2);
    [model, loaded, again].forEach(m => m.dispose());
  });

  it('round-trips a tied-embedding model with a dense MLP layer', async () => {
    const model = buildMoECausalLM({ ...(await fixtureConfig('qwen3_moe')), tie_word_embeddings: true, mlp_only_layers: [0] });
    const dir = await tempDir();
    await model.save(`file://${dir}`);
    const loaded = await tfl.loadLayersModel(`file://${dir}/model.json`);
    expect(loaded.getLayer('model.layers.0.mlp')).to.be.instanceOf(SwiGLUMLP);
    expect(loaded.getLayer('model.embed_tokens').inboundNodes.length).to.equal(2);
    expect(loaded.weights.length).to.equal(model.weights.length);
    const ids = tf.tensor2d([[4, 8, 15, 16, 23, 42]], [1, 6], 'int32');
    const [y1, y2] = [model, loaded].map(m => m.predict(ids) as tf.Tensor);
    expect(Array.from(y2.dataSync())).to.deep.equal(Array.from(y1.dataSync()));
    tf.dispose([ids, y1, y2]);
    model.dispose();
    loaded.dispose();
  });

  it('errors: a .json save path, a missing model, a weights file of the wrong size', async () => {
    const dir = await tempDir();
    const model = tfl.sequential({ layers: [tfl.layers.dense({ units: 2, inputShape: [3] })] });
    const bad = await rejection(model.save(`file://${join(dir, 'model.json')}`));
    expect(bad).to.be.instanceOf(FileIOError);
    expect(bad.message).to.equal(`file:// save: the path must be a directory (model.json and weights.bin are written into it) ` +
      `but got '${join(dir, 'model.json')}'; use 'file://${dir}'`);
    const missing = await rejection(tfl.loadLayersModel(`file://${join(dir, 'nothing', 'model.json')}`));
    expect(missing.message).to.equal(`file:// load: model folder '${join(dir, 'nothing')}' does not exist`);
    await model.save(`file://${dir}`);
    await writeFile(join(dir, 'weights.bin'), new Uint8Array(7));
    const short = await rejection(tfl.loadLayersModel(`file://${join(dir, 'model.json')}`));
    expect(short.message).to.equal(`file:// load: the weight files of weightsManifest[0] in '${join(dir, 'model.json')}' ` +
      `('${join(dir, 'weights.bin')}') hold 7 bytes but its weights need 32`);
    await writeFile(join(dir, 'model.json'), '{not json');
    expect((await rejection(tfl.loadLayersModel(`file://${join(dir, 'model.json')}`))).message)
      .to.match(/^file:\/\/ load: model\.json '.*model\.json' is not valid JSON: /);
    await writeFile(join(dir, 'model.json'), JSON.stringify({ format: 'layers-model' }));
    expect((await rejection(tfl.loadLayersModel(`file://${join(dir, 'model.json')}`))).message)
      .to.equal(`file:// load: '${join(dir, 'model.json')}' has no 'modelTopology'`);
    await writeFile(join(dir, 'model.json'), JSON.stringify({ modelTopology: {}, weightsManifest: [{ paths: ['gone.bin'], weights: [] }] }));
    expect((await rejection(fileIO(join(dir, 'model.json')).load())).message)
      .to.equal(`file:// load: weightsManifest[0] path of '${join(dir, 'model.json')}' '${join(dir, 'gone.bin')}' does not exist`);
    expect((await rejection(fileIO(dir).save({ modelTopology: new ArrayBuffer(4) }))).message)
      .to.equal(`file:// save to '${dir}': binary (GraphDef) topologies are not supported, only JSON`);
    expect(() => fileIO('')).to.throw("`fileIO()`: 'path' must be a non-empty string but got \"\"");
    model.dispose();
  });
});
