/**
 * Checkpoints over fetch (fetchHFCheckpoint) and from memory (loadHFCheckpointFrom): the same
 * models as loadHFCheckpoint reads from disk, and their own error messages.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fetchHFCheckpoint, type FetchFunction } from '../../src/io/fetch_checkpoint.js';
import { CheckpointError, loadHFCheckpoint, loadHFCheckpointFrom } from '../../src/io/hf_checkpoint.js';
import { parseSafetensors, readSafetensorsFile, SafetensorsError } from '../../src/io/safetensors.js';
import type { MoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { cleanup, fixtureConfig, fixtureDir, readAll, tempDir, writeCheckpoint } from './checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';
import { writeHalfFixture } from '../helpers/half_checkpoint.js';
import { sourceDtypeOf } from '../../src/io/checkpoint_source.js';

/** A fetch over the local file system: '<dir>/<file>' URLs, 404 for missing files; records what it was asked. */
function folderFetch(overrides: Record<string, () => Promise<Response>> = {}): FetchFunction & { urls: string[] } {
  const urls: string[] = [];
  const fn = async (url: string) => {
    urls.push(url);
    const override = Object.entries(overrides).find(([suffix]) => url.endsWith(suffix));
    if (override !== undefined) return override[1]();
    const bytes = await readFile(url).catch(() => null);
    return bytes === null ? new Response('not found', { status: 404, statusText: 'Not Found' }) : new Response(bytes);
  };
  return Object.assign(fn, { urls });
}

function logits(model: MoECausalLM, ids: tf.Tensor): number[] {
  return tf.tidy(() => Array.from((model.predict(ids) as tf.Tensor).dataSync()));
}


describe('io/fetch_checkpoint fetchHFCheckpoint', () => {
  after(cleanup);

  it('gives the model loadHFCheckpoint reads from disk, from a single file or shards, and leaves nothing behind', async () => {
    const before = tf.memory().numTensors;
    const ids = tf.tensor2d([[3, 1, 4, 1, 5, 9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3]], [2, 8], 'int32');
    const fromDisk = await loadHFCheckpoint(fixtureDir('qwen3_moe'));
    const fetch = folderFetch();
    const files: Array<[string, number]> = [];
    const fetched = await fetchHFCheckpoint(fixtureDir('qwen3_moe'), { fetch, onFile: (url, bytes) => files.push([url, bytes]) });
    expect(fetch.urls).to.deep.equal(['config.json', 'model.safetensors'].map(f => `${fixtureDir('qwen3_moe')}/${f}`));
    expect(files.map(([url]) => url)).to.deep.equal(fetch.urls);
    expect(files[1][1]).to.equal((await readFile(join(fixtureDir('qwen3_moe'), 'model.safetensors'))).byteLength);
    expect(fetched.weights.map(w => w.originalName)).to.deep.equal(fromDisk.weights.map(w => w.originalName));
    for (const [i, w] of fetched.weights.entries()) {
      expect(Array.from(w.read().dataSync()), w.originalName).to.deep.equal(Array.from(fromDisk.weights[i].read().dataSync()));
    }
    expect(logits(fetched, ids)).to.deep.equal(logits(fromDisk, ids));
    fetched.dispose();

    // mixtral in two shards, from a base URL with a trailing slash
    const dir = await tempDir();
    const tensors = await readAll(join(fixtureDir('mixtral'), 'model.safetensors'));
    await writeCheckpoint(dir, await fixtureConfig('mixtral'), tensors, 2);
    tf.dispose(Object.values(tensors));
    const shardFetch = folderFetch();
    const sharded = await fetchHFCheckpoint(`${dir}/`, { fetch: shardFetch });
    expect(shardFetch.urls.map(u => u.slice(dir.length + 1))).to.deep.equal([
      'config.json', 'model.safetensors', 'model.safetensors.index.json',
      'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']);
    const mixtral = await loadHFCheckpoint(fixtureDir('mixtral'));
    expect(logits(sharded, ids)).to.deep.equal(logits(mixtral, ids));
    for (const m of [sharded, mixtral, fromDisk]) m.dispose();
    ids.dispose();
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('remembers each tensor\'s dtype on disk, as loadHFCheckpoint does: a bf16 checkpoint is saved back as bf16', async () => {
    const dir16 = await tempDir();
    const dir32 = await tempDir();
    await writeHalfFixture(fixtureDir('qwen3_moe'), 'bf16', dir16, dir32);
    const fetched = await fetchHFCheckpoint(dir16, { fetch: folderFetch() });
    const fromBytes = await loadHFCheckpointFrom({ config: JSON.parse(await readFile(join(dir16, 'config.json'), 'utf8')),
      tensors: parseSafetensors(new Uint8Array(await readFile(join(dir16, 'model.safetensors')))) });
    try {
      for (const model of [fetched, fromBytes]) {
        expect(sourceDtypeOf(model, 'model.embed_tokens.weight')).to.equal('BF16');
        expect(sourceDtypeOf(model, 'model.layers.0.mlp.experts.0.down_proj.weight')).to.equal('BF16');
      }
    } finally {
      fetched.dispose();
      fromBytes.dispose();
    }
  });

  it('names the URL and the cause of every failure, and leaves nothing behind', async () => {
    const qwen = fixtureDir('qwen3_moe');
    const before = tf.memory().numTensors;
    const msg = async (url: string, fetch: FetchFunction) => (await rejection(fetchHFCheckpoint(url, { fetch }))).message;

    const empty = await tempDir();
    expect(await msg(empty, folderFetch())).to.equal(`\`fetchHFCheckpoint()\`: cannot fetch config '${empty}/config.json': HTTP 404 (not found)`);
    expect(await msg(qwen, folderFetch({ 'config.json': async () => new Response('{"model_type": ') })))
        .to.match(new RegExp(`^\`fetchHFCheckpoint\\(\\)\`: config '${qwen}/config.json' is not valid JSON: `));
    expect(await msg(qwen, folderFetch({ 'model.safetensors': async () => new Response('busy', { status: 503, statusText: 'Service Unavailable' }) })))
        .to.equal(`\`fetchHFCheckpoint()\`: cannot fetch weights '${qwen}/model.safetensors': HTTP 503 Service Unavailable`);
    expect(await msg(qwen, folderFetch({ 'model.safetensors': async () => { throw new TypeError('fetch failed'); } })))
        .to.equal(`\`fetchHFCheckpoint()\`: cannot fetch weights '${qwen}/model.safetensors': fetch failed`);

    // an unknown model type fails on config.json, before any weights are asked for
    const llama = folderFetch({ 'config.json': async () => new Response(JSON.stringify({ ...(await fixtureConfig('qwen3_moe')), model_type: 'llama' })) });
    const unknown = await rejection(fetchHFCheckpoint(qwen, { fetch: llama }));
    expect(unknown).to.be.instanceOf(OpArgumentError);
    expect(unknown.message).to.contain("but got 'llama'");
    expect(llama.urls).to.deep.equal([`${qwen}/config.json`]);

    const dir = await tempDir();
    await writeFile(join(dir, 'config.json'), JSON.stringify(await fixtureConfig('qwen3_moe')));
    expect(await msg(dir, folderFetch())).to.equal(`\`fetchHFCheckpoint()\`: '${dir}' has neither model.safetensors nor model.safetensors.index.json`);
    await writeFile(join(dir, 'model.safetensors.index.json'), '{"weight_map": [');
    expect(await msg(dir, folderFetch())).to.match(new RegExp(`^\`fetchHFCheckpoint\\(\\)\`: index '${dir}/model.safetensors.index.json' is not valid JSON: `));
    await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { 'lm_head.weight': 'model-00001-of-00001.safetensors', 'model.norm.weight': 'https://elsewhere/x.safetensors' } }));
    expect(await msg(dir, folderFetch())).to.equal(`\`fetchHFCheckpoint()\`: '${dir}': 2 problems:\n` +
      "  weight_map['model.norm.weight'] must be a .safetensors file name in the same folder but is \"https://elsewhere/x.safetensors\"\n" +
      "  shard 'model-00001-of-00001.safetensors' named in the index is missing");
    await rm(join(dir, 'model.safetensors.index.json'));

    // a checkpoint without the tensors its config describes
    const tensors = await readAll(join(qwen, 'model.safetensors'));
    tensors['model.norm.weight'].dispose();
    delete tensors['model.norm.weight'];
    await writeCheckpoint(dir, await fixtureConfig('qwen3_moe'), tensors);
    tf.dispose(Object.values(tensors));
    expect(await msg(dir, folderFetch())).to.equal(
      `\`fetchHFCheckpoint()\`: '${dir}' does not hold the weights its config.json ('qwen3_moe') describes: 1 problem:\n` +
      "  missing 'model.norm.weight' (expected shape [64])");

    const bytes = await readFile(join(qwen, 'model.safetensors'));
    const truncated = await rejection(fetchHFCheckpoint(qwen, { fetch: folderFetch({ 'model.safetensors': async () => new Response(bytes.subarray(0, 50_000)) }) }));
    expect(truncated).to.be.instanceOf(SafetensorsError);
    expect(truncated.message).to.contain(`'${qwen}/model.safetensors'`);

    expect((await rejection(fetchHFCheckpoint(''))).message)
        .to.equal("`fetchHFCheckpoint()`: 'url' must be the checkpoint folder's URL but got \"\"");
    const noFetch = await rejection(fetchHFCheckpoint(qwen, { fetch: 42 as unknown as FetchFunction }));
    expect(noFetch).to.be.instanceOf(CheckpointError);
    expect(noFetch.message).to.equal("`fetchHFCheckpoint()`: 'options.fetch' must be a function (default: the global fetch, " +
      'which this runtime lacks) but got number');
    expect(tf.memory().numTensors).to.equal(before);
  });
});

describe('io/hf_checkpoint_core loadHFCheckpointFrom', () => {
  it('builds the model from a config and tensors in memory, as loadHFCheckpoint does from the folder', async () => {
    const dir = fixtureDir('olmoe');
    const config = await fixtureConfig('olmoe');
    const tensors = parseSafetensors(new Uint8Array(await readFile(join(dir, 'model.safetensors'))));
    const ids = tf.tensor2d([[7, 0, 2, 9, 4]], [1, 5], 'int32');
    const fromMemory = await loadHFCheckpointFrom({ config, tensors });
    const fromDisk = await loadHFCheckpoint(dir);
    expect(logits(fromMemory, ids)).to.deep.equal(logits(fromDisk, ids));
    fromMemory.dispose();
    fromDisk.dispose();
    ids.dispose();
  });

  it('refuses what is not a checkpoint, and lists missing tensors under the source name', async () => {
    const config = await fixtureConfig('qwen3_moe');
    const file = await readSafetensorsFile(join(fixtureDir('qwen3_moe'), 'model.safetensors'));
    const before = tf.memory().numTensors;
    expect((await rejection(loadHFCheckpointFrom(null as never))).message)
        .to.equal("`loadHFCheckpointFrom()`: 'files' must be {config, tensors} but got null");
    expect((await rejection(loadHFCheckpointFrom({ config: [] as never, tensors: file }))).message)
        .to.equal("`loadHFCheckpointFrom()`: 'config' must be the parsed config.json object but got []");
    const noTensor = await rejection(loadHFCheckpointFrom({ config, tensors: { has: () => true } as never }));
    expect(noTensor).to.be.instanceOf(CheckpointError);
    expect(noTensor.message).to.equal("`loadHFCheckpointFrom()`: 'tensors' must have has, info, tensor (e.g. a SafetensorsFile) but lacks info, tensor");

    const withoutHead = {
      has: (n: string) => n !== 'lm_head.weight' && file.has(n),
      info: (n: string) => file.info(n),
      tensor: (n: string) => file.tensor(n),
    };
    const missing = await rejection(loadHFCheckpointFrom({ config, tensors: withoutHead, source: "'tiny.safetensors'" }));
    expect(missing.message).to.equal("`loadHFCheckpointFrom()`: 'tiny.safetensors' does not hold the weights its config.json " +
      "('qwen3_moe') describes: 1 problem:\n  missing 'lm_head.weight' (expected shape [97,64])");
    expect((await rejection(loadHFCheckpointFrom({ config, tensors: withoutHead }))).message)
        .to.match(/^`loadHFCheckpointFrom\(\)`: the checkpoint does not hold the weights/);
    expect(tf.memory().numTensors).to.equal(before);
  });
});
