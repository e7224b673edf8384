import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { copyFile, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CheckpointError, loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { MoELoraError } from '../../src/errors.js';
import { SafetensorsError } from '../../src/io/safetensors.js';
import { SparseMoE } from '../../src/layers/sparse_moe.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { cleanup, fixtureConfig, fixtureDir, golden, readAll, tempDir, writeCheckpoint } from './checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';

async function logitsOf(dir: string, ids: tf.Tensor): Promise<Float32Array> {
  const model = await loadHFCheckpoint(dir);
  const out = model.predict(ids) as tf.Tensor;
  const data = out.dataSync() as Float32Array;
  out.dispose();
  model.dispose();
  return data;
}


describe('io/hf_checkpoint loadHFCheckpoint', () => {
  after(cleanup);

  it('fills every weight: the model equals the checkpoint tensor for tensor, and leaves nothing behind', async () => {
    const before = tf.memory().numTensors;
    const model = await loadHFCheckpoint(fixtureDir('qwen2_moe'));
    const tensors = await readAll(join(fixtureDir('qwen2_moe'), 'model.safetensors'));
    const variables = model.weights.length;
    expect(tf.memory().numTensors).to.equal(before + variables + Object.keys(tensors).length);
    const embed = model.getLayer('model.embed_tokens').weights[0].read();
    expect(Array.from(embed.dataSync())).to.deep.equal(Array.from(tensors['model.embed_tokens.weight'].dataSync()));
    const qBias = model.getLayer('model.layers.1.self_attn').weights.find(w => w.originalName.endsWith('/q_proj.bias'))!;
    expect(Array.from(qBias.read().dataSync())).to.deep.equal(Array.from(tensors['model.layers.1.self_attn.q_proj.bias'].dataSync()));
    const moe = model.getLayer('model.layers.1.mlp') as SparseMoE;
    const gateUp = moe.weightVariable('gate_up').read();   // [E, 2I, H]: expert 3's gate rows, then its up rows
    const e3 = tf.tidy(() => tf.slice(gateUp, [3, 0, 0], [1, 96, 64]).dataSync());
    const want = [...tensors['model.layers.1.mlp.experts.3.gate_proj.weight'].dataSync(), ...tensors['model.layers.1.mlp.experts.3.up_proj.weight'].dataSync()];
    expect(Array.from(e3)).to.deep.equal(want);
    expect(Array.from(moe.weightVariable('shared_expert_gate').read().dataSync()))
      .to.deep.equal(Array.from(tensors['model.layers.1.mlp.shared_expert_gate.weight'].dataSync()));
    tf.dispose(Object.values(tensors));
    model.dispose();
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('reads a sharded checkpoint (model.safetensors.index.json) exactly like the single file', async () => {
    const config = await fixtureConfig('mixtral');
    const tensors = await readAll(join(fixtureDir('mixtral'), 'model.safetensors'));
    const dir = await tempDir();
    await writeCheckpoint(dir, config, tensors, 2);
    tf.dispose(Object.values(tensors));
    const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8'));
    expect(new Set(Object.values(index.weight_map))).to.deep.equal(
      new Set(['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']));
    const ids = await (await golden('mixtral')).tensor('input_ids');
    const sharded = await logitsOf(dir, ids);
    const single = await logitsOf(fixtureDir('mixtral'), ids);
    expect(Array.from(sharded)).to.deep.equal(Array.from(single));
    ids.dispose();
  });

  it('ties the LM head to the embedding when config says so (no lm_head.weight needed)', async () => {
    const config = await fixtureConfig('mixtral');
    const tensors = await readAll(join(fixtureDir('mixtral'), 'model.safetensors'));
    const untied = await tempDir();
    const lmHead = tensors['lm_head.weight'];
    tensors['lm_head.weight'] = tensors['model.embed_tokens.weight'];
    await writeCheckpoint(untied, config, tensors);
    const tied = await tempDir();
    delete tensors['lm_head.weight'];
    await writeCheckpoint(tied, { ...config, tie_word_embeddings: true }, tensors);
    tf.dispose([lmHead, ...Object.values(tensors)]);
    const ids = await (await golden('mixtral')).tensor('input_ids');
    const a = await logitsOf(untied, ids);
    const b = await logitsOf(tied, ids);
    const err = a.reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);
    expect(err).to.be.below(1e-5);
    ids.dispose();
  });

  it('loads dense MLP layers (mlp_only_layers) from <layer>.mlp.{gate,up,down}_proj.weight', async () => {
    const config = { ...(await fixtureConfig('qwen3_moe')), mlp_only_layers: [0] };
    const tensors = await readAll(join(fixtureDir('qwen3_moe'), 'model.safetensors'));
    for (const n of Object.keys(tensors)) {
      if (n.startsWith('model.layers.0.mlp.')) { tensors[n].dispose(); delete tensors[n]; }
    }
    const dense = {
      'model.layers.0.mlp.gate_proj.weight': tf.randomNormal([96, 64], 0, 0.1, 'float32', 1),
      'model.layers.0.mlp.up_proj.weight': tf.randomNormal([96, 64], 0, 0.1, 'float32', 2),
      'model.layers.0.mlp.down_proj.weight': tf.randomNormal([64, 96], 0, 0.1, 'float32', 3),
    };
    const dir = await tempDir();
    await writeCheckpoint(dir, config, { ...tensors, ...dense });
    const model = await loadHFCheckpoint(dir);
    const mlp = model.getLayer('model.layers.0.mlp');
    for (const [name, t] of Object.entries(dense)) {
      const w = mlp.weights.find(v => `model.layers.0.mlp.${v.originalName.split('/').pop()}` === name)!;
      expect(Array.from(w.read().dataSync()), name).to.deep.equal(Array.from(t.dataSync()));
    }
    model.dispose();
    tf.dispose([...Object.values(tensors), ...Object.values(dense)]);
  });

  it('lists every missing, misshapen or non-float tensor in one CheckpointError and leaves nothing behind', async () => {
    const config = await fixtureConfig('mixtral');
    const tensors = await readAll(join(fixtureDir('mixtral'), 'model.safetensors'));
    const drop = ['model.norm.weight', 'model.layers.1.block_sparse_moe.experts.5.w3.weight'];
    for (const n of drop) { tensors[n].dispose(); delete tensors[n]; }
    tensors['model.layers.0.self_attn.k_proj.weight'].dispose();
    tensors['model.layers.0.self_attn.k_proj.weight'] = tf.zeros([64, 64]);
    tensors['model.layers.1.block_sparse_moe.gate.weight'].dispose();
    tensors['model.layers.1.block_sparse_moe.gate.weight'] = tf.zeros([8, 64], 'int32');
    const dir = await tempDir();
    await writeCheckpoint(dir, config, tensors);
    tf.dispose(Object.values(tensors));
    const before = tf.memory().numTensors;
    const err = await rejection(loadHFCheckpoint(dir));
    expect(err).to.be.instanceOf(CheckpointError);
    expect(err.message).to.equal(
      `\`loadHFCheckpoint()\`: '${dir}' does not hold the weights its config.json ('mixtral') describes: 4 problems:\n` +
      "  'model.layers.0.self_attn.k_proj.weight' must have shape [32,64] but has [64,64]\n" +
      "  'model.layers.1.block_sparse_moe.gate.weight' must be a float tensor (F32, F16, BF16) but is I32\n" +
      "  missing 'model.layers.1.block_sparse_moe.experts.5.w3.weight' (expected shape [96,64])\n" +
      "  missing 'model.norm.weight' (expected shape [64])");
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('refuses unknown model types, missing files, a truncated file and a bad index', async () => {
    const dir = await tempDir();
    await writeFile(join(dir, 'config.json'), JSON.stringify({ ...(await fixtureConfig('mixtral')), model_type: 'llama' }));
    const unknown = await rejection(loadHFCheckpoint(dir));
    expect(unknown).to.be.instanceOf(OpArgumentError);
    expect(unknown.message).to.contain("config 'model_type' must be one of 'mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', " +
      "'deepseek_v3', 'glm4_moe', 'gpt_oss', 'ernie4_5_moe', 'hunyuan_v1_moe', 'minimax_m2' (the supported MoE families) but got 'llama'");

    await writeFile(join(dir, 'config.json'), JSON.stringify(await fixtureConfig('mixtral')));
    const none = await rejection(loadHFCheckpoint(dir));
    expect(none.message).to.equal(`\`loadHFCheckpoint()\`: '${dir}' has neither model.safetensors nor model.safetensors.index.json`);

    const noConfig = await tempDir();
    const noConfigError = await rejection(loadHFCheckpoint(noConfig));
    expect(noConfigError).to.be.instanceOf(MoELoraError);
    expect(noConfigError.message).to.equal(`\`loadHFCheckpoint()\`: config '${join(noConfig, 'config.json')}' does not exist`);

    await writeFile(join(dir, 'pytorch_model.bin'), '');
    expect((await rejection(loadHFCheckpoint(dir))).message).to.equal(`\`loadHFCheckpoint()\`: '${dir}' has neither ` +
      'model.safetensors nor model.safetensors.index.json (PyTorch .bin checkpoints are not supported; save with safe_serialization=True)');
    await rm(join(dir, 'pytorch_model.bin'));
    await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: {} }));
    expect((await rejection(loadHFCheckpoint(dir))).message).to.equal(`\`loadHFCheckpoint()\`: '${join(dir, 'model.safetensors.index.json')}' ` +
      "must have a 'weight_map' object {tensor name: shard file}");
    await rm(join(dir, 'model.safetensors.index.json'));
    expect((await rejection(loadHFCheckpoint(''))).message).to.equal("`loadHFCheckpoint()`: 'dir' must be a folder path but got \"\"");
    const badJson = await tempDir();
    await writeFile(join(badJson, 'config.json'), '{"model_type": ');
    expect((await rejection(loadHFCheckpoint(badJson))).message).to.match(/^`loadHFCheckpoint\(\)`: config '.*config\.json' is not valid JSON: /);

    await copyFile(join(fixtureDir('mixtral'), 'model.safetensors'), join(dir, 'model.safetensors'));
    await truncate(join(dir, 'model.safetensors'), 50_000);
    const truncated = await rejection(loadHFCheckpoint(dir));
    expect(truncated).to.be.instanceOf(SafetensorsError);
    expect(truncated.message).to.contain(join(dir, 'model.safetensors'));

    await rm(join(dir, 'model.safetensors'));
    const tensors = await readAll(join(fixtureDir('mixtral'), 'model.safetensors'));
    await writeCheckpoint(dir, await fixtureConfig('mixtral'), tensors, 2);
    tf.dispose(Object.values(tensors));
    const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8'));
    const inSecond = Object.keys(index.weight_map).find(n => index.weight_map[n] === 'model-00002-of-00002.safetensors' && !['lm_head.weight', 'model.embed_tokens.weight'].includes(n))!;
    index.weight_map[inSecond] = 'model-00001-of-00002.safetensors';
    index.weight_map['lm_head.weight'] = 'model-00003-of-00003.safetensors';
    index.weight_map['model.embed_tokens.weight'] = '../elsewhere.safetensors';
    await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify(index));
    const bad = await rejection(loadHFCheckpoint(dir));
    expect(bad.message).to.equal(`\`loadHFCheckpoint()\`: '${dir}': 3 problems:\n` +
      "  weight_map['model.embed_tokens.weight'] must be a .safetensors file name in the same folder but is \"../elsewhere.safetensors\"\n" +
      "  shard 'model-00003-of-00003.safetensors' named in the index is missing\n" +
      `  the index puts '${inSecond}' in 'model-00001-of-00002.safetensors' but that shard does not hold it`);
  });
});
