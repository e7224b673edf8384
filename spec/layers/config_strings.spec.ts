import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { protectString, restoreString } from '../../src/layers/config_strings.js';
import { SparseMoE } from '../../src/layers/sparse_moe.js';

/** Saves a model's artifacts in memory and loads them back: tfjs's config rewriting applies both ways. */
async function roundTrip(model: tfl.LayersModel): Promise<tfl.LayersModel> {
  let saved: tf.io.ModelArtifacts | undefined;
  await model.save(tf.io.withSaveHandler(async artifacts => {
    saved = artifacts;
    return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON' } };
  }));
  return tfl.loadLayersModel(tf.io.fromMemory(saved!));
}

describe('layers/config_strings', () => {
  it('protectString output is lowercase, digits and -.~ only, and restoreString inverts it', () => {
    for (const s of ['experts.gate_up', 'My_Adapter-2', 'rsLoRA', 'default', 'A', '_', '-', '']) {
      const p = protectString(s);
      expect(p, s).to.match(/^~[a-z0-9.~-]*$/);
      expect(restoreString(p), s).to.equal(s);
    }
    expect(protectString('experts.gate_up')).to.equal('~experts.gate-1up');
    expect(restoreString('experts.gate_up')).to.equal('experts.gate_up');   // unprotected strings pass through
  });

  it('SparseMoE adapters with underscores and capitals in names and targets survive a save/load', async () => {
    const input = tfl.input({ shape: [null, 8] });
    const layer = new SparseMoE({
      name: 'moe', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2, renormalize: true },
    });
    const model = tfl.model({ inputs: input, outputs: layer.apply(input) as tfl.SymbolicTensor });
    layer.addAdapter({ name: 'My_Adapter', r: 2, alpha: 3, rsLoRA: true, targets: ['experts.gate_up', 'router'] }, 'random');
    layer.addAdapter({ name: 'other_one', r: 1, alpha: 1, targets: ['experts.down'] }, 'random');
    layer.setActiveAdapters(['other_one', 'My_Adapter']);
    const loaded = await roundTrip(model);
    const back = loaded.getLayer('moe') as SparseMoE;
    expect(back.adapterNames()).to.deep.equal(['My_Adapter', 'other_one']);
    expect(back.adapter('My_Adapter').config).to.deep.equal(
      { name: 'My_Adapter', r: 2, alpha: 3, rsLoRA: true, targets: ['experts.gate_up', 'router'] });
    expect(back.adapter('other_one').config.rsLoRA).to.equal(false);
    expect(back.activeAdapters).to.deep.equal(['other_one', 'My_Adapter']);
    const x = tf.randomNormal([2, 3, 8], 0, 1, 'float32', 7);
    const [a, b] = [model, loaded].map(m => m.predict(x) as tf.Tensor);
    expect(Array.from(b.dataSync())).to.deep.equal(Array.from(a.dataSync()));
    tf.dispose([x, a, b]);
    model.dispose();
    loaded.dispose();
  });
});
