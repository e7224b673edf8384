/**
 * saveHFCheckpoint: the inverse of loadHFCheckpoint. The fixtures were written by transformers'
 * save_pretrained, so saving a loaded fixture must give back its model.safetensors byte for byte.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { hfCheckpointTensors, saveHFCheckpoint } from '../../src/io/hf_save.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { buildMoECausalLM, sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../src/models/families.js';
import { cleanup, fixtureConfig, fixtureDir, tempDir, WHOLE_ARCHS } from './checkpoint_helpers.js';

/** Every weight's bytes by its name, for bit-exact comparison. */
function weightBytes(model: tfl.LayersModel): Map<string, Buffer> {
  return new Map(model.weights.map(w => [w.originalName, Buffer.from((w.read().dataSync() as Float32Array).slice().buffer)]));
}

function expectSameWeights(actual: tfl.LayersModel, expected: tfl.LayersModel): void {
  const a = weightBytes(actual);
  const e = weightBytes(expected);
  expect([...a.keys()].sort()).to.deep.equal([...e.keys()].sort());
  for (const [name, bytes] of e) expect(a.get(name)!.equals(bytes), `${name} bit-identical`).to.equal(true);
}

async function expectRejected(promise: Promise<unknown>, pattern: RegExp): Promise<void> {
  let error: unknown;
  try {
    await promise;
  } catch (e) {
    error = e;
  }
  expect(error, 'an error').to.be.instanceOf(Error);
  expect((error as Error).message).to.match(pattern);
}

const TINY_QWEN3: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: 11, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 6,
  norm_topk_prob: true, rms_norm_eps: 1e-6, tie_word_embeddings: true,
};

describe('io/hf_save: saveHFCheckpoint', () => {
  after(cleanup);

  for (const arch of WHOLE_ARCHS) {
    it(`${arch}: saving the loaded fixture gives back its model.safetensors byte for byte and its config`, async () => {
      const model = await loadHFCheckpoint(fixtureDir(arch));
      const dir = await tempDir(`hf-save-${arch}-`);
      const before = tf.memory().numTensors;
      await saveHFCheckpoint(model, dir);
      expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);

      const saved = await readFile(join(dir, 'model.safetensors'));
      const original = await readFile(join(fixtureDir(arch), 'model.safetensors'));
      expect(saved.equals(original), 'model.safetensors byte-identical to the one transformers wrote').to.equal(true);
      expect(JSON.parse(await readFile(join(dir, 'config.json'), 'utf8'))).to.deep.equal(await fixtureConfig(arch));

      const again = await loadHFCheckpoint(dir);
      expectSameWeights(again, model);
      again.dispose();
      model.dispose();
    });
  }

  it('round-trips freshly initialized weights exactly, with tied embeddings (no lm_head tensor)', async () => {
    const model = buildMoECausalLM(TINY_QWEN3);
    const dir = await tempDir('hf-save-tied-');
    await saveHFCheckpoint(model, dir);
    const file = await readSafetensorsFile(join(dir, 'model.safetensors'));
    expect(file.names()).to.not.include('lm_head.weight');
    expect(file.names()).to.include.members([
      'model.embed_tokens.weight', 'model.layers.1.mlp.gate.weight',
      'model.layers.1.mlp.experts.3.gate_proj.weight', 'model.layers.1.mlp.experts.3.up_proj.weight',
      'model.layers.1.mlp.experts.3.down_proj.weight',
    ]);
    expect(file.info('model.layers.0.mlp.experts.0.gate_proj.weight').shape).to.deep.equal([6, 16]);
    expect(file.info('model.layers.0.mlp.experts.0.down_proj.weight').shape).to.deep.equal([16, 6]);
    const again = await loadHFCheckpoint(dir);
    expectSameWeights(again, model);
    // the same weights give the same logits
    const ids = tf.tensor2d([[1, 2, 3, 4, 5]], [1, 5], 'int32');
    const [a, b] = [model, again].map(m => m.predict(ids) as tf.Tensor);
    expect(Buffer.from(a.dataSync().buffer).equals(Buffer.from(b.dataSync().buffer))).to.equal(true);
    tf.dispose([ids, a, b]);
    again.dispose();
    model.dispose();
  });

  it('splits the fused expert weight as the loader fuses it: gate rows, then up rows, per expert', () => {
    const model = buildMoECausalLM(TINY_QWEN3);
    const layer = sparseMoELayers(model)[1];
    const gateUp = layer.weightVariable('gate_up').read().arraySync() as number[][][];  // [E, 2I, H]
    const down = layer.weightVariable('down').read().arraySync() as number[][][];       // [E, H, I]
    const { tensors } = hfCheckpointTensors(model);
    const expert = 2;
    const at = (name: string) => tensors[`model.layers.1.mlp.experts.${expert}.${name}.weight`].arraySync();
    expect(at('gate_proj')).to.deep.equal(gateUp[expert].slice(0, 6));
    expect(at('up_proj')).to.deep.equal(gateUp[expert].slice(6, 12));
    expect(at('down_proj')).to.deep.equal(down[expert]);
    tf.dispose(Object.values(tensors));
    model.dispose();
  });

  it('saves a merged adapter as part of the weights and leaves an unmerged one out', async () => {
    const model = await loadHFCheckpoint(fixtureDir('mixtral'));
    const base = weightBytes(model);
    const layers = sparseMoELayers(model);
    for (const layer of layers) {
      layer.addAdapter({ name: 'kept', r: 2, alpha: 4, targets: ['experts.gate_up', 'router'] }, 'random');
    }
    const unmergedDir = await tempDir('hf-save-unmerged-');
    await saveHFCheckpoint(model, unmergedDir);
    const unmerged = await readSafetensorsFile(join(unmergedDir, 'model.safetensors'));
    expect(unmerged.names().some(n => /lora/.test(n)), 'no LoRA tensor in the checkpoint').to.equal(false);
    const plain = await loadHFCheckpoint(unmergedDir);
    expect(sparseMoELayers(plain).every(l => l.adapterNames().length === 0)).to.equal(true);
    const plainBytes = weightBytes(plain);
    for (const [name, bytes] of plainBytes) expect(bytes.equals(base.get(name)!), `${name} is the base weight`).to.equal(true);

    for (const layer of layers) layer.mergeAdapter('kept');
    const mergedDir = await tempDir('hf-save-merged-');
    await saveHFCheckpoint(model, mergedDir);
    const merged = await loadHFCheckpoint(mergedDir);
    sparseMoELayers(merged).forEach((l, k) => {
      for (const weight of ['gate_up', 'router_weight', 'down']) {
        const saved = Buffer.from(l.weightVariable(weight).read().dataSync().buffer);
        const inModel = Buffer.from(layers[k].weightVariable(weight).read().dataSync().buffer);
        expect(saved.equals(inModel), `${l.name}/${weight} saved as merged`).to.equal(true);
      }
    });
    const gateUpBase = base.get(layers[0].weightVariable('gate_up').originalName)!;
    expect(Buffer.from(sparseMoELayers(merged)[0].weightVariable('gate_up').read().dataSync().buffer).equals(gateUpBase),
        'the merged delta changed gate_up').to.equal(false);
    for (const m of [plain, merged, model]) m.dispose();
  });

  it('rejects a model without an HF config', async () => {
    const input = tfl.input({ shape: [4] });
    const model = tfl.model({ inputs: input, outputs: tfl.layers.dense({ units: 2 }).apply(input) as tfl.SymbolicTensor, name: 'plain' });
    await expectRejected(saveHFCheckpoint(model, await tempDir()),
        /^`saveHFCheckpoint\(\)`: the model 'plain' has no HF config; build it with buildMoECausalLM\(config\) or load it with loadHFCheckpoint\(dir\)$/);
    model.dispose();
  });

  it('rejects a model whose weights do not fit the config kept in it, listing every problem', async () => {
    const model = buildMoECausalLM(TINY_QWEN3);
    model.setUserDefinedMetadata({ hfConfig: { ...TINY_QWEN3, moe_intermediate_size: 5 } });
    const dir = await tempDir();
    await expectRejected(saveHFCheckpoint(model, dir), new RegExp(
        "^`saveHFCheckpoint\\(\\)`: model 'moe_causal_lm' does not fit its config.json \\('qwen3_moe'\\): 4 problems:\\n" +
        "  'model.layers.0.mlp/gate_up' has shape \\[4,12,16\\] but the per-expert tensors " +
        "'model.layers.0.mlp.experts.0.gate_proj.weight', 'model.layers.0.mlp.experts.0.up_proj.weight'… need \\[4,10,16\\]\\n"));
    model.dispose();
  });

  it('rejects an empty folder path', async () => {
    const model = buildMoECausalLM(TINY_QWEN3);
    await expectRejected(saveHFCheckpoint(model, ''), /^`saveHFCheckpoint\(\)`: 'dir' must be a folder path but got ""$/);
    model.dispose();
  });

  it('replaces an old checkpoint as a whole (old shards and index go, a README stays) and writes extraFiles into it', async () => {
    const model = buildMoECausalLM(TINY_QWEN3);
    const dir = join(await tempDir(), 'ckpt');
    await mkdir(dir);
    const oldFiles = ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json', 'config.json'];
    for (const name of oldFiles) await writeFile(join(dir, name), 'old');
    await writeFile(join(dir, 'README.md'), 'mine');
    const tokenizer = '{"model": {"vocab": {}}}\n';
    const bytes = new Uint8Array([1, 2, 3]);
    const tensors = tf.memory().numTensors;
    await saveHFCheckpoint(model, dir, { extraFiles: { 'tokenizer.json': tokenizer, 'extra.bin': bytes } });
    expect(tf.memory().numTensors).to.equal(tensors);
    expect((await readdir(dir)).sort()).to.deep.equal(['README.md', 'config.json', 'extra.bin', 'model.safetensors', 'tokenizer.json']);
    expect(await readFile(join(dir, 'README.md'), 'utf8')).to.equal('mine');
    expect(await readFile(join(dir, 'tokenizer.json'), 'utf8')).to.equal(tokenizer);
    expect([...await readFile(join(dir, 'extra.bin'))]).to.deep.equal([1, 2, 3]);
    expect(await readdir(join(dir, '..'))).to.deep.equal(['ckpt']);
    const again = await loadHFCheckpoint(dir);
    expectSameWeights(again, model);
    again.dispose();
    model.dispose();
  });

  it('rejects extraFiles that are not an object of plain file names other than the checkpoint\'s own, nothing written', async () => {
    const model = buildMoECausalLM(TINY_QWEN3);
    const dir = join(await tempDir(), 'never');
    const cases: Array<[unknown, RegExp]> = [
      [[], /^`saveHFCheckpoint\(\)`: 'extraFiles' must be an object of file name → contents but got an array of length 0$/],
      [null, /^`saveHFCheckpoint\(\)`: 'extraFiles' must be an object of file name → contents but got null$/],
      ...['../x.json', 'sub/x.json', '..', 'config.json', 'model-00001-of-00002.safetensors', 'model.safetensors.index.json'].map(
          (name): [unknown, RegExp] => [{ [name]: 'x' }, new RegExp(`^\`saveHFCheckpoint\\(\\)\`: extraFiles names must be plain file ` +
            `names other than the checkpoint's own \\(config.json, \\*.safetensors, model.safetensors.index.json\\) but got ` +
            `${JSON.stringify(name).replace(/[.*()]/g, c => `\\${c}`)}$`)]),
      [{ 'tokenizer.json': 42 }, /^`saveHFCheckpoint\(\)`: extraFiles\['tokenizer.json'\] must be a string or a Uint8Array but got 42 \(number\)$/],
    ];
    const tensors = tf.memory().numTensors;
    for (const [extraFiles, pattern] of cases) {
      await expectRejected(saveHFCheckpoint(model, dir, { extraFiles } as never), pattern);
    }
    expect(tf.memory().numTensors).to.equal(tensors);
    expect(await readdir(join(dir, '..'))).to.deep.equal([]);
    model.dispose();
  });
});
