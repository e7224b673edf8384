/**
 * Every loader reads only regular files inside the folder it was given: paths named by a file
 * (a TF.js weights manifest, an HF shard index) cannot leave the folder (`..`, absolute paths,
 * symbolic links), FIFOs and devices are refused at once instead of blocking or never ending,
 * sizes are checked before a byte is read, and a folder where a file should be is reported as
 * what it is. Each loader also finishes an interrupted atomic save before it reads.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { mkdir, readFile, rename, symlink, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CharTokenizer } from '../../src/data/tokenizer.js';
import { readTokenizer, writeTokenizer } from '../../src/data/tokenizer_file.js';
import { MoELoraError } from '../../src/errors.js';
import { FileIOError, fileIO } from '../../src/io/file_io_handler.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadModelDir, ModelDirError } from '../../src/io/model_dir.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import { artifactSiblings, FileError } from '../../src/util/files.js';
import { cleanup, fixtureConfig, fixtureDir, readAll, tempDir, writeCheckpoint } from './checkpoint_helpers.js';
import { expectSettlesQuickly, makeFifo } from './special_files.js';
import { rejection } from '../helpers/rejection.js';

/** A copy of an HF fixture checkpoint in a new folder (config.json + model.safetensors). */
async function hfCopy(arch = 'mixtral', shards = 1): Promise<string> {
  const dir = await tempDir();
  const tensors = await readAll(join(fixtureDir(arch), 'model.safetensors'));
  await writeCheckpoint(dir, await fixtureConfig(arch), tensors, shards);
  tf.dispose(Object.values(tensors));
  return dir;
}

describe('io loaders: confined to their folder, regular files only', () => {
  after(cleanup);

  describe('TF.js model folder (file:// load)', () => {
    let dir: string;
    let weights: Uint8Array;
    let manifest: { modelTopology: unknown; weightsManifest: Array<{ paths: string[]; weights: unknown[] }> };
    let expected: Float32Array;

    before(async () => {
      dir = await tempDir();
      const model = tfl.sequential({ layers: [tfl.layers.dense({ units: 2, inputShape: [3], name: 'd' })] });
      model.setWeights([tf.tensor2d([1, 2, 3, 4, 5, 6], [3, 2]), tf.tensor1d([0.5, -0.5])]);
      await model.save(fileIO(dir));
      const x = tf.ones([1, 3]);
      const y = model.predict(x) as tf.Tensor;
      expected = y.dataSync() as Float32Array;
      tf.dispose([x, y]);
      model.dispose();
      weights = new Uint8Array(await readFile(join(dir, 'weights.bin')));
      manifest = JSON.parse(await readFile(join(dir, 'model.json'), 'utf8'));
    });

    /** A model folder whose manifest names `paths` (weights.bin not written unless asked). */
    async function folderWith(paths: string[]): Promise<string> {
      const d = await tempDir();
      await writeFile(join(d, 'model.json'), JSON.stringify({ ...manifest, weightsManifest: [{ ...manifest.weightsManifest[0], paths }] }));
      return d;
    }

    it('still loads weights split over files in a subfolder and links inside the folder', async () => {
      const d = await folderWith(['shards/a.bin', 'b.bin']);
      await mkdir(join(d, 'shards'));
      await writeFile(join(d, 'shards', 'a.bin'), weights.subarray(0, 10));
      await writeFile(join(d, 'real-b.bin'), weights.subarray(10));
      await symlink(join(d, 'real-b.bin'), join(d, 'b.bin'));
      const model = await tfl.loadLayersModel(fileIO(d));
      const x = tf.ones([1, 3]);
      const y = model.predict(x) as tf.Tensor;
      expect(Array.from(y.dataSync())).to.deep.equal(Array.from(expected));
      tf.dispose([x, y]);
      model.dispose();
    });

    it("refuses '../outside/secret.bin', an absolute path and /dev/zero", async () => {
      const parent = await tempDir();
      const d = join(parent, 'model');
      await mkdir(d);
      await mkdir(join(parent, 'outside'));
      await writeFile(join(parent, 'outside', 'secret.bin'), weights);  // the right size: it would load
      await writeFile(join(d, 'model.json'), JSON.stringify({ ...manifest, weightsManifest: [{ ...manifest.weightsManifest[0], paths: ['../outside/secret.bin'] }] }));
      const what = `file:// load: weightsManifest[0] path of '${join(d, 'model.json')}'`;
      const out = await rejection(tfl.loadLayersModel(fileIO(d)));
      expect(out).to.be.instanceOf(FileError);
      expect(out.message).to.equal(`${what} '../outside/secret.bin' leads outside its folder '${d}'`);

      const secret = join(parent, 'outside', 'secret.bin');
      const abs = await folderWith([secret]);
      expect((await rejection(tfl.loadLayersModel(fileIO(abs)))).message).to.equal(
          `file:// load: weightsManifest[0] path of '${join(abs, 'model.json')}' must be relative to its folder '${abs}' ` +
          `but is the absolute path '${secret}'`);
      const zero = await folderWith(['/dev/zero']);
      const before = process.memoryUsage().rss;
      expect((await rejection(tfl.loadLayersModel(fileIO(zero)))).message).to.equal(
          `file:// load: weightsManifest[0] path of '${join(zero, 'model.json')}' must be relative to its folder '${zero}' ` +
          "but is the absolute path '/dev/zero'");
      expect(process.memoryUsage().rss - before).to.be.below(16 * 2 ** 20);
    });

    it('refuses a link that leads outside, to a file or to /dev/zero', async () => {
      const outside = await tempDir();
      await writeFile(join(outside, 'secret.bin'), weights);
      for (const target of [join(outside, 'secret.bin'), '/dev/zero']) {
        const d = await folderWith(['weights.bin']);
        await symlink(target, join(d, 'weights.bin'));
        const e = await rejection(tfl.loadLayersModel(fileIO(d)));
        expect(e).to.be.instanceOf(FileError);
        expect(e.message).to.equal(`file:// load: weightsManifest[0] path of '${join(d, 'model.json')}' ` +
            `'${join(d, 'weights.bin')}' is a link to '${target}', outside its folder '${d}'`);
      }
    });

    it('refuses a FIFO as weights file or as model.json without blocking', async () => {
      const d = await folderWith(['weights.bin']);
      const fifo = makeFifo(d, 'weights.bin');
      const e = await expectSettlesQuickly(tfl.loadLayersModel(fileIO(d)), fifo);
      expect(e).to.be.instanceOf(FileError);
      expect(e.message).to.equal(`file:// load: weight file named in '${join(d, 'model.json')}' '${fifo}' is a FIFO (named pipe), not a regular file`);

      const j = await tempDir();
      const jsonFifo = makeFifo(j, 'model.json');
      const je = await expectSettlesQuickly(tfl.loadLayersModel(fileIO(j)), jsonFifo);
      expect(je.message).to.equal(`file:// load: model.json '${jsonFifo}' is a FIFO (named pipe), not a regular file`);
    });

    it('checks the size the manifest implies before reading: a 3 GB sparse weights file is not read', async () => {
      const d = await folderWith(['weights.bin']);
      await writeFile(join(d, 'weights.bin'), '');
      await truncate(join(d, 'weights.bin'), 3e9);
      const before = process.memoryUsage();
      const e = await rejection(tfl.loadLayersModel(fileIO(d)));
      const after = process.memoryUsage();
      expect(e).to.be.instanceOf(FileIOError);
      expect(e.message).to.equal(`file:// load: the weight files of weightsManifest[0] in '${join(d, 'model.json')}' ` +
          `('${join(d, 'weights.bin')}') hold 3000000000 bytes but its weights need 32`);
      expect(after.arrayBuffers - before.arrayBuffers).to.be.below(2 ** 20);
      expect(after.rss - before.rss).to.be.below(16 * 2 ** 20);
    });

    it('refuses a malformed weightsManifest with one error listing every problem', async () => {
      const d = await tempDir();
      await writeFile(join(d, 'model.json'), JSON.stringify({
        modelTopology: manifest.modelTopology,
        weightsManifest: [{ paths: 'weights.bin', weights: [{ name: 'w', dtype: 'float32', shape: [2, -1] }] }, { paths: [], weights: 3 }],
      }));
      const e = await rejection(tfl.loadLayersModel(fileIO(d)));
      expect(e).to.be.instanceOf(FileIOError);
      expect(e.message).to.equal(`file:// load: '${join(d, 'model.json')}': 3 problems in 'weightsManifest':\n` +
          "  weightsManifest[0].paths must be an array of file names but is \"weights.bin\" (string)\n" +
          '  weightsManifest[0].weights[0].shape must be an array of non-negative integers but is an array of length 2\n' +
          '  weightsManifest[1].weights must be an array but is 3 (number)');
      await writeFile(join(d, 'model.json'), JSON.stringify({ modelTopology: manifest.modelTopology, weightsManifest: { paths: [] } }));
      expect((await rejection(tfl.loadLayersModel(fileIO(d)))).message).to.equal(
          `file:// load: '${join(d, 'model.json')}': 'weightsManifest' must be an array of {paths, weights} but got an object {paths}`);
      await writeFile(join(d, 'model.json'), JSON.stringify({
        modelTopology: manifest.modelTopology, weightsManifest: [{ paths: ['w.bin'], weights: [{ name: 'w', dtype: 'float32', shape: [2 ** 20, 2 ** 12] }] }],
      }));
      expect((await rejection(tfl.loadLayersModel(fileIO(d)))).message).to.match(
          /'weightsManifest':\n {2}its weights need 17179869184 bytes, more than the largest buffer this runtime can hold \(\d+ bytes\)$/);
    });
  });

  describe('HF checkpoint folder', () => {
    it('refuses a shard the index names that is a link to a file outside the folder', async () => {
      const dir = await hfCopy('mixtral', 2);
      const outside = await tempDir();
      const shard = 'model-00002-of-00002.safetensors';
      await rename(join(dir, shard), join(outside, shard));
      await symlink(join(outside, shard), join(dir, shard));
      const e = await rejection(loadHFCheckpoint(dir));
      expect(e).to.be.instanceOf(FileError);
      expect(e.message).to.equal(`\`loadHFCheckpoint()\`: shard named in '${join(dir, 'model.safetensors.index.json')}' ` +
          `'${join(dir, shard)}' is a link to '${join(outside, shard)}', outside its folder '${dir}'`);
    });

    it('reads only the tensors the model needs: an unused 1.5 GB tensor in model.safetensors is never read', async function () {
      this.timeout(20_000);
      const dir = await hfCopy();
      // model.safetensors again, with one more tensor at the end of its data section (sparse)
      const original = new Uint8Array(await readFile(join(dir, 'model.safetensors')));
      const n = Number(new DataView(original.buffer, original.byteOffset).getBigUint64(0, true));
      const header = JSON.parse(new TextDecoder().decode(original.subarray(8, 8 + n)));
      const dataLength = original.byteLength - 8 - n;
      const big = 1_500_000_000;
      header['unused.big'] = { dtype: 'F32', shape: [big / 4], data_offsets: [dataLength, dataLength + big] };
      let text = JSON.stringify(header);
      while (text.length % 8 !== 0) text += ' ';
      const length = new Uint8Array(8);
      new DataView(length.buffer).setBigUint64(0, BigInt(text.length), true);
      await writeFile(join(dir, 'model.safetensors'), Buffer.concat([length, Buffer.from(text), original.subarray(8 + n)]));
      await truncate(join(dir, 'model.safetensors'), 8 + text.length + dataLength + big);

      const before = process.memoryUsage();
      const model = await loadHFCheckpoint(dir);
      const after = process.memoryUsage();
      const reference = await loadHFCheckpoint(fixtureDir('mixtral'));
      const ids = tf.tensor2d([[3, 1, 4, 1, 5]], [1, 5], 'int32');
      const [a, b] = [model.predict(ids) as tf.Tensor, reference.predict(ids) as tf.Tensor];
      expect(Array.from(a.dataSync())).to.deep.equal(Array.from(b.dataSync()));
      tf.dispose([a, b, ids]);
      model.dispose();
      reference.dispose();
      const grown = (after.arrayBuffers - before.arrayBuffers) / 2 ** 20;
      expect(grown, `arrayBuffers grew by ${grown.toFixed(1)} MiB`).to.be.below(32);  // the old reader: +1429 MiB
      expect((after.rss - before.rss) / 2 ** 20).to.be.below(64);
    });

    for (const name of ['config.json', 'model.safetensors', 'model.safetensors.index.json']) {
      it(`refuses a FIFO named ${name} without blocking`, async () => {
        const dir = await hfCopy();
        if (name === 'model.safetensors.index.json') await rename(join(dir, 'model.safetensors'), join(dir, 'elsewhere'));
        else await rename(join(dir, name), join(dir, `${name}.away`));
        const fifo = makeFifo(dir, name);
        const e = await expectSettlesQuickly(loadHFCheckpoint(dir), fifo);
        expect(e).to.be.instanceOf(FileError);
        const what = { 'config.json': '`loadHFCheckpoint()`: config', 'model.safetensors': 'safetensors file',
          'model.safetensors.index.json': '`loadHFCheckpoint()`: index' }[name];
        expect(e.message).to.equal(`${what} '${fifo}' is a FIFO (named pipe), not a regular file`);
      });
    }

    it('reports a directory named model.safetensors or config.json as a directory, naming it', async () => {
      const dir = await hfCopy();
      await rename(join(dir, 'model.safetensors'), join(dir, 'away'));
      await mkdir(join(dir, 'model.safetensors'));
      const e = await rejection(loadHFCheckpoint(dir));
      expect(e.message).to.equal(`safetensors file '${join(dir, 'model.safetensors')}' is a directory, not a regular file`);
      const byFormat = await rejection(loadModelDir(dir));
      expect(byFormat).to.be.instanceOf(ModelDirError);
      expect(byFormat.message).to.equal(`'${dir}' is neither an HF checkpoint (config.json + model.safetensors or ` +
          'model.safetensors.index.json) nor a TF.js LayersModel (model.json) ' +
          `('${join(dir, 'model.safetensors')}' is a directory, not a regular file)`);

      const other = await hfCopy();
      await rename(join(other, 'config.json'), join(other, 'away'));
      await mkdir(join(other, 'config.json'));
      expect((await rejection(loadHFCheckpoint(other))).message)
          .to.equal(`\`loadHFCheckpoint()\`: config '${join(other, 'config.json')}' is a directory, not a regular file`);
      makeFifo(other, 'model.json');
      expect((await rejection(loadModelDir(other, { format: 'hf' }))).message).to.equal(
          `'${other}' is not an HF checkpoint (config.json + model.safetensors or model.safetensors.index.json) ` +
          `('${join(other, 'config.json')}' is a directory, not a regular file; ` +
          `'${join(other, 'model.json')}' is a FIFO (named pipe), not a regular file)`);
    });
  });

  describe('PEFT adapter folder, tokenizer', () => {
    for (const name of ['adapter_config.json', 'adapter_model.safetensors']) {
      it(`refuses a FIFO named ${name} without blocking, the model untouched`, async () => {
        const model = await loadHFCheckpoint(fixtureDir('mixtral'));
        const dir = await tempDir();
        for (const f of ['adapter_config.json', 'adapter_model.safetensors']) {
          if (f !== name) await writeFile(join(dir, f), await readFile(join(fixtureDir('mixtral'), 'adapter', f)));
        }
        const fifo = makeFifo(dir, name);
        const e = await expectSettlesQuickly(loadPeftAdapter(model, dir), fifo);
        expect(e).to.be.instanceOf(MoELoraError);
        expect(e.message).to.equal(name === 'adapter_config.json' ?
          `\`loadPeftAdapter()\`: adapter config '${fifo}' is a FIFO (named pipe), not a regular file` :
          `safetensors file '${fifo}' is a FIFO (named pipe), not a regular file`);
        expect(sparseMoELayers(model).every(l => l.adapterNames().length === 0)).to.equal(true);
        model.dispose();
      });
    }

    it('names the path when adapter_config.json is a directory (no bare EISDIR)', async () => {
      const model = await loadHFCheckpoint(fixtureDir('mixtral'));
      const dir = await tempDir();
      await mkdir(join(dir, 'adapter_config.json'));
      const e = await rejection(loadPeftAdapter(model, dir));
      expect(e.message).to.equal(`\`loadPeftAdapter()\`: adapter config '${join(dir, 'adapter_config.json')}' is a directory, not a regular file`);
      model.dispose();
    });

    it('refuses a FIFO or a directory named tokenizer.json', async () => {
      const dir = await tempDir();
      const fifo = makeFifo(dir, 'tokenizer.json');
      const e = await expectSettlesQuickly(readTokenizer(dir), fifo);
      expect(e).to.be.instanceOf(FileError);
      expect(e.message).to.equal(`tokenizer '${fifo}' is a FIFO (named pipe), not a regular file`);
      const other = await tempDir();
      await mkdir(join(other, 'tokenizer.json'));
      expect((await rejection(readTokenizer(other))).message)
          .to.equal(`tokenizer '${join(other, 'tokenizer.json')}' is a directory, not a regular file`);
    });
  });

  describe('a save interrupted between its two renames is finished by the next load', () => {
    /** Moves `dir` to where an interrupted atomic save leaves the new artifact, `dir` gone. */
    async function interrupt(dir: string): Promise<void> {
      await rename(dir, artifactSiblings(dir).next);
    }

    it('loadHFCheckpoint, loadModelDir and file:// load', async () => {
      const hf = await hfCopy();
      await interrupt(hf);
      const model = await loadHFCheckpoint(hf);
      model.dispose();
      await interrupt(hf);
      (await loadModelDir(hf)).model.dispose();

      const d = await tempDir();
      const m = tfl.sequential({ layers: [tfl.layers.dense({ units: 1, inputShape: [2] })] });
      await m.save(fileIO(d));
      m.dispose();
      await interrupt(d);
      (await tfl.loadLayersModel(fileIO(d))).dispose();
    });

    it('loadPeftAdapter and readTokenizer', async () => {
      const adapter = join(await tempDir(), 'adapter');
      await mkdir(adapter);
      for (const f of ['adapter_config.json', 'adapter_model.safetensors']) {
        await writeFile(join(adapter, f), await readFile(join(fixtureDir('mixtral'), 'adapter', f)));
      }
      await interrupt(adapter);
      const model = await loadHFCheckpoint(fixtureDir('mixtral'));
      await loadPeftAdapter(model, adapter);
      expect(sparseMoELayers(model)[0].adapterNames()).to.deep.equal(['default']);
      model.dispose();

      const tokDir = join(await tempDir(), 'tok');
      await mkdir(tokDir);
      await writeTokenizer(tokDir, CharTokenizer.fromText('abc'));
      await interrupt(tokDir);
      expect((await readTokenizer(tokDir) as CharTokenizer).toJSON()).to.deep.equal(CharTokenizer.fromText('abc').toJSON());
    });
  });
});
