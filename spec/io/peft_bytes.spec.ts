/**
 * PEFT adapters without the file system (src/io/peft.ts, what the browser entry exports):
 * encodePeftAdapter gives the very bytes savePeftAdapter writes, and loadPeftAdapterFrom loads
 * PEFT's own files from bytes into a model that then reproduces PEFT's logits.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { encodePeftAdapter, loadPeftAdapterFrom, PeftAdapterError, peftAdapterTensors, type PeftAdapterFiles } from '../../src/io/peft.js';
import { loadPeftAdapter, savePeftAdapter } from '../../src/io/peft_files.js';
import { parseSafetensors } from '../../src/io/safetensors_bytes.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { cleanup, fixtureDir, golden, tempDir } from './checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';

const ARCH = 'qwen3_moe';

async function fixtureFiles(arch: string): Promise<PeftAdapterFiles> {
  const dir = join(fixtureDir(arch), 'adapter');
  return {
    config: await readFile(join(dir, 'adapter_config.json'), 'utf8'),
    weights: new Uint8Array(await readFile(join(dir, 'adapter_model.safetensors'))),
  };
}

describe('io/peft without the file system (loadPeftAdapterFrom, encodePeftAdapter)', () => {
  after(cleanup);

  it('loadPeftAdapterFrom loads PEFT\'s files from bytes: the model gives PEFT\'s lora.logits (<= 1e-4 relative)', async () => {
    const model = await loadHFCheckpoint(fixtureDir(ARCH));
    const loaded = await loadPeftAdapterFrom(model, await fixtureFiles(ARCH));
    expect(loaded).to.deep.equal({
      name: 'default', r: 4, alpha: 8, rsLoRA: false, targets: ['experts.gate_up', 'experts.down', 'router'],
      layers: ['model.layers.0.mlp', 'model.layers.1.mlp'], modules: [], notes: [],
    });
    const g = await golden(ARCH);
    const [ids, want] = await Promise.all(['input_ids', 'lora.logits'].map(n => g.tensor(n)));
    const before = tf.memory().numTensors;
    const logits = model.apply(ids) as tf.Tensor;
    const err = maxRelativeError(logits.dataSync(), want.dataSync());
    logits.dispose();
    expect(tf.memory().numTensors, 'tensors left by the forward pass').to.equal(before);
    expect(err, `lora.logits ${err.toExponential(2)}`).to.be.at.most(1e-4);
    tf.dispose([ids, want]);
    model.dispose();
  });

  it('encodePeftAdapter gives the bytes savePeftAdapter writes, and they parse back to the trained values', async () => {
    const model = await loadHFCheckpoint(fixtureDir(ARCH));
    await loadPeftAdapter(model, join(fixtureDir(ARCH), 'adapter'));
    // trained-looking values, so a file of zeros or of the fixture would not pass
    for (const [k, t] of peftAdapterTensors(model).entries()) {
      t.variable.write(tf.tidy(() => tf.add(t.variable.read(), tf.fill(t.variable.shape as number[], 0.25 * (k + 1)))));
    }
    const before = tf.memory().numTensors;
    const files = await encodePeftAdapter(model);
    expect(tf.memory().numTensors, 'tensors left by encodePeftAdapter').to.equal(before);
    const dir = await tempDir();
    await savePeftAdapter(model, dir);
    expect(files.config).to.equal(await readFile(join(dir, 'adapter_config.json'), 'utf8'));
    expect(Buffer.from(files.weights).equals(await readFile(join(dir, 'adapter_model.safetensors'))), 'same weight bytes').to.equal(true);

    const config = JSON.parse(files.config);
    expect(config).to.deep.include({ peft_type: 'LORA', r: 4, lora_alpha: 8, target_parameters: ['experts.gate_up_proj', 'experts.down_proj', 'gate.weight'] });
    const parsed = parseSafetensors(files.weights);
    expect(parsed.metadata).to.deep.equal({ format: 'pt' });
    const tensors = peftAdapterTensors(model);
    expect(parsed.names()).to.have.members(tensors.map(t => t.peftName));
    for (const t of tensors) {
      const read = await parsed.tensor(t.peftName);
      expect(read.shape, t.peftName).to.deep.equal(t.variable.shape);
      expect(Array.from(read.dataSync()), t.peftName).to.deep.equal(Array.from(t.variable.read().dataSync()));
      read.dispose();
    }

    // and they load back into a fresh model as the same adapter
    const other = await loadHFCheckpoint(fixtureDir(ARCH));
    await loadPeftAdapterFrom(other, files);
    const back = peftAdapterTensors(other);
    for (const [k, t] of tensors.entries()) {
      expect(Array.from(back[k].variable.read().dataSync()), t.peftName).to.deep.equal(Array.from(t.variable.read().dataSync()));
    }
    model.dispose();
    other.dispose();
  });

  it('names what is wrong with the files, and leaves the model untouched', async () => {
    const model = await loadHFCheckpoint(fixtureDir(ARCH));
    const files = await fixtureFiles(ARCH);
    const bad = (f: unknown) => rejection(loadPeftAdapterFrom(model, f as PeftAdapterFiles));
    const shape = "`loadPeftAdapterFrom()`: 'files' must be {config: the text of adapter_config.json, weights: the bytes of " +
        'adapter_model.safetensors (a Uint8Array)} but is ';
    expect((await bad(null)).message).to.equal(`${shape}null`);
    expect((await bad({ config: files.config, weights: Array.from(files.weights.slice(0, 2)) })).message).to.match(new RegExp(`^${shape.replace(/[()[\]{}.*+?^$|\\]/g, '\\$&')}`));
    expect((await bad({ ...files, config: '{"r": 4,' })).message)
        .to.match(/^`loadPeftAdapterFrom\(\)`: 'files.config' \(adapter_config.json\) is not valid JSON: /);
    expect((await bad({ ...files, config: '[1, 2]' })).message)
        .to.equal("`loadPeftAdapterFrom()`: 'files.config' (adapter_config.json) must hold a JSON object");
    const wrongRank = JSON.stringify({ ...JSON.parse(files.config), r: 8 });
    expect((await bad({ ...files, config: wrongRank })).message).to.match(
        /^`loadPeftAdapterFrom\(\)`: the given files \(adapter 'default'\): \d+ problems?:\n {2}.*fits no target of this layer with r = 8/);
    expect((await bad({ ...files, weights: files.weights.slice(0, 7) })).name).to.equal('SafetensorsError');
    expect(peftAdapterTensors(model), 'no adapter was added').to.deep.equal([]);
    model.dispose();
  });

  it('encodePeftAdapter refuses a model without the adapter', async () => {
    const model = await loadHFCheckpoint(fixtureDir(ARCH));
    const e = await rejection(encodePeftAdapter(model));
    expect(e).to.be.instanceOf(PeftAdapterError);
    expect(e.message).to.equal("`encodePeftAdapter()`: no layer of 'moe_causal_lm' has an adapter 'default' (adapters: none)");
    model.dispose();
  });
});
