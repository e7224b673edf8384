/**
 * `tfjs-moe-lora merge`: the thin shell over mergeAdapterIntoCheckpoint (spec/io/merge.spec.ts has
 * the numbers): what it writes and prints, its argument checks before any work, --overwrite,
 * --dtype and --max-shard-size. And `convert` keeping the tokenizer files.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { copyFile, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { convertModel, type ConvertArgs } from '../../src/cli/commands/convert.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { cleanup, fixtureDir, tempDir } from '../io/checkpoint_helpers.js';
import { runMain } from './run_cli.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';
const b = ['--backend', BACKEND];

describe('cli/merge', () => {
  after(cleanup);

  it('writes the merged checkpoint, copies the tokenizer files and reports the files', async () => {
    const out = join(await tempDir('cli-merge-'), 'merged');
    const before = tf.memory().numTensors;
    const r = await runMain(['merge', '--model', fixtureDir('olmoe'), '--adapter', join(fixtureDir('olmoe'), 'adapter'),
      '--out', out, '--dtype', 'bfloat16', '--max-shard-size', '300KB', ...b]);
    expect(r.stderr).to.equal('');
    expect(r.code).to.equal(0);
    expect(tf.memory().numTensors).to.equal(before);
    expect(r.stdout).to.match(new RegExp(`^merge ${fixtureDir('olmoe')} \\+ adapter ${fixtureDir('olmoe')}/adapter \\(r 4, alpha 8, ` +
        `experts.gate_up, experts.down, router; 2 layers\\) → ${out} \\(HF checkpoint, bfloat16\\)\\n` +
        '  model-00001-of-00002.safetensors  \\d+\\.\\d KiB\\n  model-00002-of-00002.safetensors  \\d+\\.\\d KiB\\n' +
        '  copied: generation_config.json\\n$'));
    expect((await readdir(out)).sort()).to.deep.equal([
      'config.json', 'generation_config.json', 'model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors',
      'model.safetensors.index.json']);
    const shard = await readSafetensorsFile(join(out, 'model-00001-of-00002.safetensors'));
    expect(shard.info(shard.names()[0]).dtype).to.equal('BF16');

    // a model already there is replaced only with --overwrite
    const again = await runMain(['merge', '--model', fixtureDir('olmoe'), '--adapter', join(fixtureDir('olmoe'), 'adapter'), '--out', out, ...b]);
    expect(again.code).to.equal(2);
    expect(again.stderr).to.match(/^tfjs-moe-lora: --out: '.*merged' already holds a model or adapter \(config.json, .*\); pass --overwrite to replace it \(see tfjs-moe-lora --help\)\n$/);
    const replaced = await runMain(['merge', '--model', fixtureDir('olmoe'), '--adapter', join(fixtureDir('olmoe'), 'adapter'),
      '--out', out, '--overwrite', ...b]);
    expect(replaced.code).to.equal(0);
    expect((await readdir(out)).sort()).to.deep.equal(['config.json', 'generation_config.json', 'model.safetensors']);
  });

  it('refuses bad arguments before any work, with exit code 2 and one line naming the argument', async () => {
    const dir = await tempDir('cli-merge-bad-');
    const adapter = join(fixtureDir('olmoe'), 'adapter');
    for (const [argv, message] of [
      [['--model', join(dir, 'none'), '--adapter', adapter, '--out', join(dir, 'o')], `--model: '${join(dir, 'none')}' is not a directory`],
      [['--model', fixtureDir('olmoe'), '--adapter', join(dir, 'none'), '--out', join(dir, 'o')], `--adapter: '${join(dir, 'none')}' is not a directory`],
      [['--model', fixtureDir('olmoe'), '--adapter', adapter, '--out', join(dir, 'o'), '--max-shard-size', '5XB'],
        "--max-shard-size: 'maxShardSize' must be a positive whole number of bytes or a size like '5GB', '500MB' or '2GiB' but got \"5XB\" (string)"],
      [['--model', fixtureDir('olmoe'), '--adapter', adapter, '--out', join(fixtureDir('olmoe'), 'merged')],
        `--out: '${join(fixtureDir('olmoe'), 'merged')}' is inside the --model folder '${fixtureDir('olmoe')}', which the run reads; write somewhere else`],
      [['--model', fixtureDir('olmoe'), '--adapter', adapter, '--out', join(dir, 'o'), '--dtype', 'int8'],
        'Invalid values: Argument: dtype, Given: "int8", Choices: "source", "float32", "bfloat16", "float16"'],
    ] as Array<[string[], string]>) {
      const r = await runMain(['merge', ...argv, ...b]);
      expect(r.code, argv.join(' ')).to.equal(2);
      expect(r.stderr).to.equal(`tfjs-moe-lora: ${message} (see tfjs-moe-lora --help)\n`);
      expect(r.stdout).to.equal('');
    }
    expect(await readdir(dir)).to.deep.equal([]);
  });

  it('convert keeps the tokenizer and generation files: hf → tfjs → hf', async () => {
    const src = await tempDir('cli-convert-tok-');
    for (const name of ['config.json', 'model.safetensors', 'generation_config.json']) {
      await copyFile(join(fixtureDir('qwen3_moe'), name), join(src, name));
    }
    await writeFile(join(src, 'tokenizer.json'), '{"model": {"type": "BPE"}}');
    await writeFile(join(src, 'chat_template.jinja'), '{{ messages }}');
    const root = await tempDir('cli-convert-tok-out-');
    const tfjs = join(root, 'tfjs');
    const hf = join(root, 'hf');
    const args = (a: Partial<ConvertArgs>): ConvertArgs => ({ adapterName: 'default', overwrite: false, backend: BACKEND, input: '', output: '', ...a });
    const one = await convertModel(args({ input: src, output: tfjs, to: 'tfjs' }));
    expect(one.files.map(f => f.name)).to.deep.equal(['chat_template.jinja', 'generation_config.json', 'model.json', 'tokenizer.json', 'weights.bin']);
    await convertModel(args({ input: tfjs, output: hf, to: 'hf' }));
    expect((await readdir(hf)).sort()).to.deep.equal(['chat_template.jinja', 'config.json', 'generation_config.json', 'model.safetensors', 'tokenizer.json']);
    for (const name of ['tokenizer.json', 'chat_template.jinja', 'generation_config.json']) {
      expect((await readFile(join(hf, name))).equals(await readFile(join(src, name))), name).to.equal(true);
    }
    // the TF.js folder remembers the source dtypes and config floats: the checkpoint comes back byte for byte
    for (const name of ['config.json', 'model.safetensors']) {
      expect((await readFile(join(hf, name))).equals(await readFile(join(src, name))), name).to.equal(true);
    }
  });
});
