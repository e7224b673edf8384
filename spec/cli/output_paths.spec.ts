/**
 * Output folders of `train` and `convert` (src/util/output_folder.ts): checked before any work
 * (a path under /proc fails at once, not after training or never), a model or adapter already
 * there is replaced only with --overwrite (other files stay), and the output is never an input
 * folder nor inside one, symbolic links resolved.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { cp, mkdir, readdir, readFile, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { runTraining } from '../../src/train/run.js';
import { validatePluginArgs } from '../../src/args/validate.js';
import { FileError } from '../../src/util/files.js';
import { cleanup, fixtureDir, tempDir } from '../io/checkpoint_helpers.js';
import { expectSettlesQuickly, makeFifo } from '../io/special_files.js';
import { runMain, type CliRun } from './run_cli.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';
const TINY_CONFIG = {
  model_type: 'qwen3_moe', hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1,
  head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8, norm_topk_prob: true,
  rms_norm_eps: 1e-6,
};
const TEXT = 'la miro vidi so tasel. ka en vora lupa la kemi?\n'.repeat(8);

function expectUsageError(r: CliRun, message: string): void {
  expect(r.code, r.stderr).to.equal(2);
  expect(r.stdout).to.equal('');
  expect(r.stderr).to.equal(`tfjs-moe-lora: ${message} (see tfjs-moe-lora --help)\n`);
}

/** Every file of a folder with its bytes, to show that a refused run changed nothing. */
async function snapshot(dir: string, prefix = '', files: Record<string, string> = {}): Promise<Record<string, string>> {
  for (const entry of (await readdir(dir, { withFileTypes: true })).sort((a, b) => a.name.localeCompare(b.name))) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) await snapshot(path, `${prefix}${entry.name}/`, files);
    else files[`${prefix}${entry.name}`] = (await readFile(path)).toString('base64');
  }
  return files;
}

describe('cli output folders', () => {
  let dir: string;
  let data: string;
  let config: string;
  let model: string;
  const common = (over: Record<string, string> = {}) =>
    Object.entries({ data, steps: '1', batch: '2', seq: '8', backend: BACKEND, ...over }).flatMap(([k, v]) => [`--${k}`, v]);

  before(async () => {
    dir = await tempDir('cli-out-');
    data = join(dir, 'data.txt');
    config = join(dir, 'config.json');
    model = join(dir, 'model');
    await writeFile(data, TEXT);
    await writeFile(config, JSON.stringify(TINY_CONFIG));
    const r = await runMain(['train', '--init-config', config, ...common(), '--out', model, '--json']);
    expect(r.code, r.stderr).to.equal(0);
  });
  after(cleanup);

  describe('train --out', () => {
    it('a path under /proc fails at once, before the model is read', async () => {
      const started = Date.now();
      // the mixtral fixture has no tokenizer.json: had the model been read first, that would be the error (exit 1)
      const r = await runMain(['train', '--model', fixtureDir('mixtral'), ...common(), '--out', '/proc/tfjs-moe-lora/out']);
      expectUsageError(r, "--out: cannot create the folder '/proc/tfjs-moe-lora': ENOENT");
      expect(Date.now() - started).to.be.below(5000);
      const self = await runMain(['train', '--init-config', config, ...common(), '--out', '/proc/self/out']);
      expect(self.code, self.stderr).to.equal(2);
      expect(self.stderr).to.match(/^tfjs-moe-lora: --out: cannot write in '\/proc\/\d+' \(for '\/proc\/self\/out'\): E[A-Z]+ /);
    });

    it('a parent that is a file fails before the run; a missing parent is created before the run', async () => {
      const r = await runMain(['train', '--init-config', config, ...common(), '--out', join(data, 'out')]);
      expectUsageError(r, `--out: '${data}' exists and is not a folder`);
      // the model is read after the check: it fails (no tokenizer.json), but --out's parent is there already
      const parent = join(dir, 'deep', 'er');
      const failed = await runMain(['train', '--model', fixtureDir('mixtral'), ...common(), '--lora-rank', '2',
        '--lora-alpha', '4', '--out', join(parent, 'adapter')]);
      expect(failed.code, failed.stderr).to.equal(1);
      expect(failed.stderr).to.include('tokenizer.json');
      expect(await readdir(parent)).to.deep.equal([]);
    });

    it('an existing checkpoint or adapter is refused without --overwrite, replaced with it; other files stay', async () => {
      const out = join(dir, 'full');
      expect((await runMain(['train', '--model', model, ...common(), '--out', out, '--json'])).code).to.equal(0);
      await writeFile(join(out, 'README.md'), 'my notes');
      const before = await snapshot(out);
      const refused = await runMain(['train', '--model', model, ...common({ steps: '2' }), '--out', out]);
      expectUsageError(refused, `--out: '${out}' already holds a model or adapter (config.json, model.safetensors, ` +
          'tokenizer.json); pass --overwrite to replace it');
      expect(await snapshot(out)).to.deep.equal(before);

      const replaced = await runMain(['train', '--model', model, ...common({ steps: '2' }), '--out', out, '--overwrite', '--json']);
      expect(replaced.code, replaced.stderr).to.equal(0);
      const after = await snapshot(out);
      expect(Object.keys(after)).to.deep.equal(Object.keys(before));
      expect(after['README.md']).to.equal(before['README.md']);
      expect(after['model.safetensors']).to.not.equal(before['model.safetensors']);
      (await loadHFCheckpoint(out)).dispose();

      const adapter = join(dir, 'adapter');
      const lora = ['--lora-rank', '2', '--lora-alpha', '4', '--lora-targets', 'experts.gate_up'];
      expect((await runMain(['train', '--model', model, ...common(), ...lora, '--out', adapter])).code).to.equal(0);
      const refusedAdapter = await runMain(['train', '--model', model, ...common(), ...lora, '--out', adapter]);
      expectUsageError(refusedAdapter, `--out: '${adapter}' already holds a model or adapter (adapter_config.json, ` +
          'adapter_model.safetensors); pass --overwrite to replace it');
    });

    it('--out is never the --model folder, inside it or a link to it, even with --overwrite', async () => {
      const link = join(dir, 'link-to-model');
      await symlink(model, link);
      const before = await snapshot(model);
      const cases: Array<[string, string]> = [
        [model, `--out: '${model}' is the --model folder '${model}', which the run reads; write somewhere else`],
        [join(model, 'sub'), `--out: '${join(model, 'sub')}' is inside the --model folder '${model}', which the run reads; write somewhere else`],
        [link, `--out: '${link}' is the --model folder '${model}', which the run reads; write somewhere else`],
        [join(link, 'a', 'b'), `--out: '${join(link, 'a', 'b')}' is inside the --model folder '${model}', which the run reads; write somewhere else`],
      ];
      for (const [out, message] of cases) {
        expectUsageError(await runMain(['train', '--model', model, ...common(), '--out', out, '--overwrite']), message);
      }
      expect(await snapshot(model)).to.deep.equal(before);
    });

    it('runTraining() checks out before any work, with the same rules', async () => {
      const plugin = validatePluginArgs({});
      const tensors = tf.memory().numTensors;
      const base = { model, data, steps: 1, lr: 1e-3, batch: 2, seq: 8, seed: 1, plugin };
      const refusals: Array<[Parameters<typeof runTraining>[0], string]> = [
        [{ ...base, out: '' }, "`runTraining()`: out must be a folder path but got \"\" (string)"],
        [{ ...base, out: 42 as unknown as string }, '`runTraining()`: out must be a folder path but got 42 (number)'],
        [{ ...base, out: model, overwrite: true },
          `\`runTraining()\`: out: '${model}' is the model folder '${model}', which the run reads; write somewhere else`],
        [{ ...base, model: undefined, initConfig: config, out: model },
          `\`runTraining()\`: out: '${model}' already holds a model or adapter (config.json, model.safetensors, ` +
          'tokenizer.json); pass --overwrite to replace it'],
      ];
      for (const [options, message] of refusals) {
        let error: unknown;
        await runTraining(options).catch(e => { error = e; });
        expect(error).to.be.instanceOf(FileError);
        expect((error as Error).message).to.equal(message);
      }
      expect(tf.memory().numTensors).to.equal(tensors);
    });
  });

  it('runTraining() refuses a FIFO as its data at once instead of blocking on it', async () => {
    const fifo = makeFifo(dir, 'data.fifo');
    const plugin = validatePluginArgs({});
    const err = await expectSettlesQuickly(runTraining({
      initConfig: 'qwen3_moe', data: fifo, steps: 1, lr: 1e-3, batch: 2, seq: 8, seed: 1, plugin, out: join(dir, 'fifo-out'),
    }), fifo);
    expect(err).to.be.instanceOf(FileError);
    expect(err.message).to.equal(`the training data file '${fifo}' is a FIFO (named pipe), not a regular file`);
  });

  describe('convert --output', () => {
    let input: string;
    before(async () => {
      input = join(dir, 'mixtral');
      await cp(fixtureDir('mixtral'), input, { recursive: true });
    });

    it('is never the --input or --adapter folder, inside one or a link to one', async () => {
      const link = join(dir, 'link-to-input');
      await symlink(input, link);
      const adapter = join(input, 'adapter');
      const before = await snapshot(input);
      const cases: Array<[string[], string]> = [
        [['--input', input, '--to', 'tfjs', '--output', join(input, 'tfjs')],
          `--output: '${join(input, 'tfjs')}' is inside the --input folder '${input}', which the run reads; write somewhere else`],
        [['--input', input, '--to', 'tfjs', '--output', join(link, 'tfjs')],
          `--output: '${join(link, 'tfjs')}' is inside the --input folder '${input}', which the run reads; write somewhere else`],
        [['--input', fixtureDir('qwen3_moe'), '--adapter', adapter, '--output', adapter, '--overwrite'],
          `--output: '${adapter}' is the --adapter folder '${adapter}', which the run reads; write somewhere else`],
      ];
      for (const [argv, message] of cases) {
        expectUsageError(await runMain(['convert', ...argv, '--backend', BACKEND]), message);
      }
      expect(await snapshot(input)).to.deep.equal(before);
      expect(await readdir(input)).to.not.include('tfjs');
    });

    it('a path under /proc fails at once', async () => {
      expectUsageError(await runMain(['convert', '--input', input, '--to', 'tfjs', '--output', '/proc/tfjs-moe-lora', '--backend', BACKEND]),
          "--output: cannot write in '/proc' (for '/proc/tfjs-moe-lora'): ENOENT");
    });

    it('--overwrite replaces a model (old shards too) and keeps the other files', async () => {
      const out = join(dir, 'converted');
      await mkdir(out);
      await writeFile(join(out, 'README.md'), 'notes');
      await writeFile(join(out, 'model.json'), '{"old": true}');
      await writeFile(join(out, 'group1-shard2of2.bin'), 'old shard');
      expectUsageError(await runMain(['convert', '--input', input, '--to', 'tfjs', '--output', out, '--backend', BACKEND]),
          `--output: '${out}' already holds a model or adapter (group1-shard2of2.bin, model.json); pass --overwrite to replace it`);
      const r = await runMain(['convert', '--input', input, '--to', 'tfjs', '--output', out, '--overwrite', '--backend', BACKEND]);
      expect(r.code, r.stderr).to.equal(0);
      // generation_config.json: the input fixture's, carried along by convert
      expect((await readdir(out)).sort()).to.deep.equal(['README.md', 'generation_config.json', 'model.json', 'weights.bin']);
      expect(await readFile(join(out, 'README.md'), 'utf8')).to.equal('notes');
      expect(JSON.parse(await readFile(join(out, 'model.json'), 'utf8'))).to.have.property('modelTopology');
    });
  });
});
