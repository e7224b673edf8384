import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { copyFile, mkdir, readFile, readdir, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { convertModel, formatConvert, type ConvertArgs } from '../../src/cli/commands/convert.js';
import { UsageError } from '../../src/cli/errors.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadModelDir } from '../../src/io/model_dir.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import { cleanup, fixtureDir, tempDir } from '../io/checkpoint_helpers.js';
import { runMain, spawnCli } from './run_cli.js';
import { rejection } from '../helpers/rejection.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';

const args = (a: Partial<ConvertArgs> & { input: string; output: string }): ConvertArgs =>
  ({ adapterName: 'default', overwrite: false, backend: BACKEND, ...a });

/** Every tensor of two safetensors files: same names, dtypes, shapes and bytes. */
async function expectSameSafetensors(actualPath: string, expectedPath: string): Promise<void> {
  const actual = await readSafetensorsFile(actualPath);
  const expected = await readSafetensorsFile(expectedPath);
  expect(actual.names().sort()).to.deep.equal(expected.names().sort());
  for (const name of expected.names()) {
    expect(actual.info(name), name).to.deep.equal(expected.info(name));
    const [a, e] = [await actual.tensor(name), await expected.tensor(name)];
    try {
      expect(Buffer.from((a.dataSync() as Float32Array).buffer).equals(Buffer.from((e.dataSync() as Float32Array).buffer)),
          `${name} bit-identical`).to.equal(true);
    } finally {
      tf.dispose([a, e]);
    }
  }
}

/** Every weight of two models, by name, bit for bit. */
function expectSameWeights(actual: tfl.LayerVariable[], expected: tfl.LayerVariable[]): void {
  const byName = new Map(expected.map(w => [w.originalName, w.read()]));
  expect(actual.map(w => w.originalName).sort()).to.deep.equal([...byName.keys()].sort());
  for (const w of actual) {
    const [a, e] = [w.read().dataSync(), byName.get(w.originalName)!.dataSync()];
    expect(Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(e.buffer, e.byteOffset, e.byteLength)),
        w.originalName).to.equal(true);
  }
}


describe('cli/convert', () => {
  after(cleanup);

  describe('round trips', () => {
    for (const arch of ['mixtral', 'qwen2_moe'] as const) {
      it(`HF → tfjs loads back with the checkpoint's weights bit for bit (${arch})`, async () => {
        const out = join(await tempDir(), 'tfjs');
        const before = tf.memory().numTensors;
        const r = await convertModel(args({ from: 'hf', to: 'tfjs', input: fixtureDir(arch), output: out }));
        expect(tf.memory().numTensors, 'nothing left behind').to.equal(before);
        expect(r).to.deep.include({ from: 'hf', to: 'tfjs', adapter: null, notes: [] });
        // the fixture's generation_config.json goes along (CHECKPOINT_COMPANION_FILES)
        expect(r.files.map(f => f.name)).to.deep.equal(['generation_config.json', 'model.json', 'weights.bin']);
        const hf = await loadHFCheckpoint(fixtureDir(arch));
        const { model, format } = await loadModelDir(out);
        try {
          expect(format).to.equal('tfjs');
          expectSameWeights(model.weights, hf.weights);
          const ids = tf.tensor2d([[1, 5, 9, 3]], [1, 4], 'int32');
          const [a, e] = [model.predict(ids) as tf.Tensor, hf.predict(ids) as tf.Tensor];
          expect(Array.from(a.dataSync())).to.deep.equal(Array.from(e.dataSync()));
          tf.dispose([ids, a, e]);
        } finally {
          model.dispose();
          hf.dispose();
        }
      });

      it(`HF → tfjs → HF gives back the checkpoint: the same tensors bit for bit, the same config (${arch})`, async () => {
        const root = await tempDir();
        await convertModel(args({ from: 'hf', to: 'tfjs', input: fixtureDir(arch), output: join(root, 'tfjs') }));
        const before = tf.memory().numTensors;
        const r = await convertModel(args({ from: 'tfjs', to: 'hf', input: join(root, 'tfjs'), output: join(root, 'hf') }));
        expect(tf.memory().numTensors, 'nothing left behind').to.equal(before);
        expect(r).to.deep.include({ from: 'tfjs', to: 'hf', notes: [] });
        expect(r.files.map(f => f.name)).to.include.members(['config.json', 'model.safetensors']);
        await expectSameSafetensors(join(root, 'hf', 'model.safetensors'), join(fixtureDir(arch), 'model.safetensors'));
        const [c, e] = await Promise.all([join(root, 'hf'), fixtureDir(arch)].map(async d => JSON.parse(await readFile(join(d, 'config.json'), 'utf8'))));
        expect(c).to.deep.equal(e);
      });

      it(`PEFT adapter → model (tfjs) → PEFT gives back the same adapter files (${arch})`, async () => {
        const adapter = join(fixtureDir(arch), 'adapter');
        const withAdapter = join(await tempDir(), 'lora');
        const loaded = await convertModel(args({ adapter, input: fixtureDir(arch), output: withAdapter, adapterName: 'ft' }));
        expect(loaded.to).to.equal('tfjs');
        expect(loaded.adapter).to.deep.include({ name: 'ft', layers: ['model.layers.0.mlp', 'model.layers.1.mlp'] });
        // the TF.js folder holds the adapter: its layers come back with it
        const { model } = await loadModelDir(withAdapter);
        try {
          expect(sparseMoELayers(model).map(l => l.adapterNames())).to.deep.equal([['ft'], ['ft']]);
        } finally {
          model.dispose();
        }
        const peft = join(await tempDir(), 'peft');
        const saved = await convertModel(args({ to: 'peft', input: withAdapter, output: peft, adapterName: 'ft' }));
        expect(saved.files.map(f => f.name)).to.deep.equal(['adapter_config.json', 'adapter_model.safetensors']);
        await expectSameSafetensors(join(peft, 'adapter_model.safetensors'), join(adapter, 'adapter_model.safetensors'));
        const [c, e] = await Promise.all([peft, adapter].map(async d => JSON.parse(await readFile(join(d, 'adapter_config.json'), 'utf8'))));
        for (const key of ['peft_type', 'r', 'lora_alpha', 'use_rslora', 'target_parameters', 'target_modules', 'bias']) {
          expect(c[key], key).to.deep.equal(e[key]);
        }
      });
    }
  });

  it('tfjs with an adapter → HF writes the base checkpoint and says where the adapter went', async () => {
    const root = await tempDir();
    const lora = join(root, 'lora');
    await convertModel(args({ adapter: join(fixtureDir('mixtral'), 'adapter'), input: fixtureDir('mixtral'), output: lora }));
    const r = await convertModel(args({ to: 'hf', input: lora, output: join(root, 'hf') }));
    expect(r.notes).to.deep.equal([`the model's adapters (default) are not part of an HF checkpoint; write one as PEFT with: ` +
        `convert --to peft --input ${lora} --adapter-name NAME --output DIR`]);
    await expectSameSafetensors(join(root, 'hf', 'model.safetensors'), join(fixtureDir('mixtral'), 'model.safetensors'));
  });

  it('tfjs → HF with --dtype bfloat16 --max-shard-size: bf16 shards and their index, values rounded as torch rounds', async () => {
    const root = await tempDir();
    const tfjs = join(root, 'tfjs');
    await convertModel(args({ to: 'tfjs', input: fixtureDir('mixtral'), output: tfjs }));
    const out = join(root, 'hf');
    await runMain(['convert', '--to', 'hf', '--input', tfjs, '--output', out, '--dtype', 'bfloat16', '--max-shard-size', '300KB',
      '--backend', BACKEND]).then(r => expect(r.code, r.stderr).to.equal(0));
    const files = (await readdir(out)).sort();
    expect(files.filter(f => /^model-\d{5}-of-\d{5}\.safetensors$/.test(f)).length).to.be.above(1);
    expect(files).to.include('model.safetensors.index.json');
    const index = JSON.parse(await readFile(join(out, 'model.safetensors.index.json'), 'utf8'));
    const source = await readSafetensorsFile(join(fixtureDir('mixtral'), 'model.safetensors'));
    const name = 'model.embed_tokens.weight';
    const shard = await readSafetensorsFile(join(out, index.weight_map[name]));
    expect(shard.info(name).dtype).to.equal('BF16');
    // each value is the float32 one rounded to bfloat16 (nearest, ties to even)
    const want = Float32Array.from(await source.tensor(name).then(t => t.dataSync()), v => toBF16(v));
    const got = await shard.tensor(name).then(t => t.dataSync());
    expect(Array.from(got)).to.deep.equal(Array.from(want));
    expect(JSON.parse(await readFile(join(out, 'config.json'), 'utf8')).dtype).to.equal('bfloat16');
  });

  describe('errors', () => {
    it('argument problems found in the folders are UsageErrors (exit 2)', async () => {
      const out = await tempDir();
      await writeFile(join(out, 'keep.txt'), 'x');
      await writeFile(join(out, 'config.json'), '{}');
      const cases: Array<[ConvertArgs, string]> = [
        [args({ to: 'hf', input: fixtureDir('mixtral'), output: join(out, 'a') }), '--input is an HF checkpoint already: nothing to convert to hf'],
        [args({ from: 'tfjs', to: 'hf', input: fixtureDir('mixtral'), output: join(out, 'a') }),
          `--input: '${fixtureDir('mixtral')}' is not a TF.js LayersModel (model.json)`],
        [args({ to: 'tfjs', input: 'spec', output: join(out, 'a') }),
          "--input: 'spec' is neither an HF checkpoint (config.json + model.safetensors or model.safetensors.index.json) " +
          'nor a TF.js LayersModel (model.json)'],
        [args({ to: 'tfjs', input: fixtureDir('mixtral'), output: out }),
          `--output: '${out}' already holds a model or adapter (config.json); pass --overwrite to replace it`],
      ];
      for (const [a, message] of cases) {
        const err = await rejection(convertModel(a));
        expect(err).to.be.instanceOf(UsageError);
        expect(err.message).to.equal(message);
      }
      expect((await readdir(out)).sort()).to.deep.equal(['config.json', 'keep.txt']);
    });

    it('the command: exits 2 with one line for bad arguments', async () => {
      const out = await tempDir();
      await writeFile(join(out, 'keep.txt'), 'x');
      await writeFile(join(out, 'model.json'), '{}');
      const mixtral = fixtureDir('mixtral');
      const b = ['--backend', BACKEND];
      const cases: Array<[string[], string]> = [
        [['convert', '--input', mixtral], 'Missing required argument: output'],
        [['convert', '--input', mixtral, '--output', join(out, 'a')], '--to: say what to write (hf, tfjs or peft), or pass --adapter'],
        [['convert', '--input', mixtral, '--output', join(out, 'a'), '--to', 'onnx'],
          'Invalid values: Argument: to, Given: "onnx", Choices: "hf", "tfjs", "peft"'],
        [['convert', '--input', 'no/dir', '--output', join(out, 'a'), '--to', 'tfjs'], "--input: 'no/dir' is not a directory"],
        [['convert', '--model', mixtral, '--adapter', 'no/dir', '--output', join(out, 'a')], "--adapter: 'no/dir' is not a directory"],
        [['convert', '--model', mixtral, '--adapter', join(mixtral, 'adapter'), '--to', 'hf', '--output', join(out, 'a')],
          '--adapter loads a PEFT adapter into the model and writes a TF.js folder, so --to must be tfjs (got hf); ' +
          'to write a model\'s adapter as PEFT, use --to peft without --adapter'],
        [['convert', '--input', mixtral, '--output', mixtral, '--to', 'tfjs'],
          `--output: '${mixtral}' is the --input folder '${mixtral}', which the run reads; write somewhere else`],
        [['convert', '--input', mixtral, '--output', join(out, 'keep.txt'), '--to', 'tfjs'],
          `--output: '${join(out, 'keep.txt')}' exists and is not a folder`],
        [['convert', '--input', mixtral, '--output', out, '--to', 'tfjs'],
          `--output: '${out}' already holds a model or adapter (model.json); pass --overwrite to replace it`],
        [['convert', '--input', mixtral, '--output', join(out, 'a'), '--to', 'hf'], '--input is an HF checkpoint already: nothing to convert to hf'],
        [['convert', '--input', mixtral, '--output', join(out, 'a'), '--to', 'tfjs', '--dtype', 'bfloat16'],
          '--dtype is for an HF checkpoint (--to hf) but --to is tfjs'],
        [['convert', '--input', mixtral, '--output', join(out, 'a'), '--to', 'hf', '--max-shard-size', '5XB'],
          `--max-shard-size: 'maxShardSize' must be a positive whole number of bytes or a size like '5GB', '500MB' or '2GiB' but got "5XB" (string)`],
      ];
      for (const [argv, message] of cases) {
        const r = await runMain([...argv, ...b]);
        expect(r.code, argv.join(' ')).to.equal(2);
        expect(r.stderr).to.equal(`tfjs-moe-lora: ${message} (see tfjs-moe-lora --help)\n`);
        expect(r.stdout).to.equal('');
      }
    });

    it('the command: exits 1 with the message when a model or adapter cannot be read or written', async () => {
      const b = ['--backend', BACKEND];
      const out = await tempDir();
      // a TF.js folder whose weights file lost bytes
      const broken = join(out, 'broken');
      await convertModel(args({ to: 'tfjs', input: fixtureDir('mixtral'), output: broken }));
      await truncate(join(broken, 'weights.bin'), 1000);
      const truncated = await runMain(['convert', '--to', 'peft', '--input', broken, '--output', join(out, 'p1'), ...b]);
      expect(truncated.code).to.equal(1);
      expect(truncated.stderr).to.match(new RegExp(`^tfjs-moe-lora: error: file:// load: the weight files of weightsManifest\\[0\\] ` +
          `in '.*${join('broken', 'model.json')}' \\('.*${join('broken', 'weights.bin')}'\\) hold 1000 bytes but its weights need \\d+\\n$`));

      // an adapter made for another model
      const wrong = await runMain(['convert', '--adapter', join(fixtureDir('qwen3_moe'), 'adapter'), '--model', fixtureDir('mixtral'),
        '--output', join(out, 'p2'), ...b]);
      expect(wrong.code).to.equal(1);
      expect(wrong.stderr).to.match(new RegExp(`^tfjs-moe-lora: error: \`loadPeftAdapter\\(\\)\`: '${fixtureDir('qwen3_moe')}/adapter' ` +
          "\\(adapter 'default'\\): \\d+ problems?:\\n"));
      expect(wrong.stderr).to.not.match(/\n\s+at /);

      // a model folder whose checkpoint misses tensors
      const partial = join(out, 'partial');
      await mkdir(partial);
      await copyFile(join(fixtureDir('mixtral'), 'config.json'), join(partial, 'config.json'));
      await copyFile(join(fixtureDir('qwen3_moe'), 'model.safetensors'), join(partial, 'model.safetensors'));
      const mismatch = await runMain(['convert', '--to', 'tfjs', '--input', partial, '--output', join(out, 'p3'), ...b]);
      expect(mismatch.code).to.equal(1);
      expect(mismatch.stderr).to.match(new RegExp(`^tfjs-moe-lora: error: \`loadHFCheckpoint\\(\\)\`: '${partial}' does not hold ` +
          "the weights its config.json \\('mixtral'\\) describes: \\d+ problems:\\n"));
      expect(await readdir(out)).to.have.members(['broken', 'partial']);
    });

    it('as a process: exit code 1 and no stack trace for a user error; exit 2 for a bad flag', async () => {
      const out = join(await tempDir(), 'p');
      const r = spawnCli(['convert', '--to', 'peft', '--input', fixtureDir('mixtral'), '--output', out, '--backend', BACKEND]);
      expect(r.code).to.equal(1);
      expect(r.stderr.split('\n').filter(l => l.startsWith('tfjs-moe-lora'))).to.deep.equal([
        "tfjs-moe-lora: error: `savePeftAdapter()`: no layer of 'moe_causal_lm' has an adapter 'default' (adapters: none)",
      ]);
      expect(r.stderr).to.not.match(/\n\s+at /);
      const bad = spawnCli(['convert', '--input', fixtureDir('mixtral'), '--output', out, '--to', 'tfjs', '--bogus']);
      expect(bad.code).to.equal(2);
      expect(bad.stderr).to.equal('tfjs-moe-lora: Unknown argument: bogus (see tfjs-moe-lora --help)\n');
    });
  });

  it('prints what it wrote; --help lists the options', async () => {
    const out = join(await tempDir(), 'tfjs');
    const r = await runMain(['convert', '--from', 'hf', '--to', 'tfjs', '--input', fixtureDir('mixtral'), '--output', out, '--backend', BACKEND]);
    expect(r.code, r.stderr).to.equal(0);
    const lines = r.stdout.split('\n');
    expect(lines[0]).to.equal(`convert ${fixtureDir('mixtral')} (HF checkpoint) → ${out} (TF.js LayersModel)`);
    expect(lines.slice(1, 4).map(l => l.replace(/\d+(\.\d)? (B|KiB|MiB)$/, 'N'))).to.deep.equal(
        ['  generation_config.json  N', '  model.json  N', '  weights.bin  N']);
    expect(formatConvert({
      input: 'in', from: 'tfjs', output: 'out', to: 'peft', files: [{ name: 'a', bytes: 2048 }], notes: ['n'],
      adapter: { name: 'x', r: 2, alpha: 4, rsLoRA: false, targets: ['router'], layers: ['l'], modules: [], notes: [] },
    })).to.equal("convert in (TF.js LayersModel) + adapter 'x' (r 2, alpha 4, router; 1 layers) → out (PEFT adapter)\n  a  2.0 KiB\nnote: n\n");
    const help = await runMain(['convert', '--help']);
    expect(help.code).to.equal(0);
    for (const flag of ['--input', '--model', '--output', '--from', '--to', '--adapter', '--adapter-name', '--overwrite', '--backend']) {
      expect(help.stdout).to.include(flag);
    }
  });
});

/** float32 → bfloat16 → float32, round to nearest even (torch's rounding), written out here as the reference. */
function toBF16(v: number): number {
  const view = new DataView(new ArrayBuffer(4));
  view.setFloat32(0, v);
  const bits = view.getUint32(0);
  view.setUint32(0, ((bits + 0x7fff + ((bits >>> 16) & 1)) >>> 0) & 0xffff0000);
  return view.getFloat32(0);
}
