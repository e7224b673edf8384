/**
 * saveHFCheckpoint as the Hub's save_pretrained: shards by maxShardSize with HF's names and index
 * (huggingface_hub's split rule), each tensor in its source dtype (a bf16 checkpoint stays bf16,
 * also through a TF.js save/load), config.json's dtype consistent, and the source folder's
 * tokenizer and generation files copied through the confinement helpers. The bf16 checkpoints are
 * fixtures truncated to bf16 here (so their values are exact) and written with the package's writer.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { integralFloatPaths, sourceDtypeOf } from '../../src/io/checkpoint_source.js';
import { fileIO } from '../../src/io/file_io_handler.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import {
  CHECKPOINT_COMPANION_FILES, hfCheckpointEntries, parseShardSize, saveHFCheckpoint,
} from '../../src/io/hf_save.js';
import {
  decodeBFloat16, decodeFloat16, encodeBFloat16, encodeFloat16, readSafetensorsFile, writeSafetensorsStream,
  type WritableDtype,
} from '../../src/io/safetensors.js';
import { buildMoECausalLM } from '../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../src/models/families.js';
import { FileError } from '../../src/util/files.js';
import { variableFloat32 } from '../../src/layers/sparse_moe.js';
import { cleanup, fixtureDir, tempDir, WHOLE_ARCHS } from './checkpoint_helpers.js';
import { expectSettlesQuickly, makeFifo } from './special_files.js';
import { rejection } from '../helpers/rejection.js';

/** Every weight's float32 bits by name (packed 16-bit experts decoded). */
function weightBits(model: tfl.LayersModel): Map<string, number[]> {
  return new Map(model.weights.map(w => {
    const values = variableFloat32(w);
    const bits = Array.from(new Uint32Array((values.dataSync() as Float32Array).slice().buffer));
    values.dispose();
    return [w.originalName, bits];
  }));
}

function expectSameWeights(actual: tfl.LayersModel, expected: tfl.LayersModel): void {
  const [a, e] = [weightBits(actual), weightBits(expected)];
  expect([...a.keys()].sort()).to.deep.equal([...e.keys()].sort());
  for (const [name, bits] of e) expect(a.get(name), `${name} bit-identical`).to.deep.equal(bits);
}

/** The (name → dtype, data bytes) of a safetensors file, from its header. */
async function headerOf(path: string): Promise<{ header: Record<string, { dtype: string; data_offsets: [number, number] }>; dataBytes: number }> {
  const bytes = await readFile(path);
  const n = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'));
  delete header['__metadata__'];
  return { header, dataBytes: bytes.byteLength - 8 - n };
}

const COMPANIONS: Record<string, string> = {
  'tokenizer.json': '{"version": "1.0", "model": {"type": "BPE"}}',
  'tokenizer_config.json': '{"model_max_length": 64}',
  'special_tokens_map.json': '{"eos_token": "</s>"}',
  'vocab.json': '{"a": 0}',
  'merges.txt': '#version: 0.2\na b\n',
  'tokenizer.model': '\u0000\u0001sentencepiece',
  'chat_template.jinja': '{% for m in messages %}{{ m.content }}{% endfor %}',
};

/**
 * A copy of a fixture whose tensors are truncated to bf16 and written as BF16 (except those in
 * `keepF32`), config.json saying bfloat16, with the companion files and a file that is not one.
 */
async function bf16Checkpoint(arch: string, keepF32: string[] = [], configKey = 'dtype'): Promise<string> {
  const dir = await tempDir(`bf16-${arch}-`);
  const source = await readSafetensorsFile(join(fixtureDir(arch), 'model.safetensors'));
  await writeSafetensorsStream(join(dir, 'model.safetensors'), source.names().map(name => ({
    name, dtype: (keepF32.includes(name) ? 'F32' : 'BF16') as WritableDtype, shape: source.info(name).shape,
    values: async () => {
      const t = await source.tensor(name);
      const values = t.dataSync() as Float32Array;
      t.dispose();
      if (!keepF32.includes(name)) {
        const bits = new Uint32Array(values.buffer);
        for (let i = 0; i < bits.length; i++) bits[i] &= 0xffff0000;
      }
      return values;
    },
  })), { format: 'pt' });
  const config = JSON.parse(await readFile(join(fixtureDir(arch), 'config.json'), 'utf8'));
  delete config['dtype'];
  config[configKey] = 'bfloat16';
  await writeFile(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  await writeFile(join(dir, 'generation_config.json'), await readFile(join(fixtureDir(arch), 'generation_config.json')));
  for (const [name, text] of Object.entries(COMPANIONS)) await writeFile(join(dir, name), text);
  await writeFile(join(dir, 'notes.txt'), 'not a tokenizer file');
  return dir;
}

const SAVE_PRETRAINED = 'spec/fixtures/save_pretrained';

const TINY: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: 11, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 6,
  norm_topk_prob: true, rms_norm_eps: 1e-6, tie_word_embeddings: true,
};

describe('io/hf_save: saved like the Hub (shards, source dtype, tokenizer files)', () => {
  after(cleanup);

  describe('what transformers wrote, byte for byte', () => {
    for (const arch of ['olmoe', 'qwen2_moe', 'qwen3_moe']) {
      it(`${arch}: the index at maxShardSize '100KB' is the one save_pretrained wrote (same shards, text, metadata)`, async () => {
        const model = await loadHFCheckpoint(fixtureDir(arch));
        const dir = await tempDir(`hf-index-${arch}-`);
        await saveHFCheckpoint(model, dir, { maxShardSize: '100KB' });
        const theirs = await readFile(join(SAVE_PRETRAINED, `${arch}.index_100KB.json`), 'utf8');
        expect(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8')).to.equal(theirs);
        model.dispose();
      });
    }

    it('config.json is the text transformers wrote (floats stay floats: 0.0, not 0), also after a TF.js save and load', async () => {
      for (const arch of WHOLE_ARCHS) {
        const model = await loadHFCheckpoint(fixtureDir(arch));
        const tfjsDir = await tempDir(`hf-config-tfjs-${arch}-`);
        await model.save(fileIO(tfjsDir));
        const reloaded = await tfl.loadLayersModel(fileIO(tfjsDir));
        const theirs = await readFile(join(fixtureDir(arch), 'config.json'), 'utf8');
        for (const m of [model, reloaded]) {
          const dir = await tempDir(`hf-config-${arch}-`);
          await saveHFCheckpoint(m, dir);
          expect(await readFile(join(dir, 'config.json'), 'utf8'), arch).to.equal(theirs);
        }
        model.dispose();
        reloaded.dispose();
      }
      // a config built in JS: undefined keys left out (as JSON.stringify), non-integers as Python writes floats
      const built = buildMoECausalLM({ ...TINY, extra: undefined, eps: [1e-5, 0.5, 2.5e-5, 1e-7, 123.25], name: 'é' } as HFConfig);
      const dir = await tempDir('hf-config-built-');
      await saveHFCheckpoint(built, dir);
      const text = await readFile(join(dir, 'config.json'), 'utf8');
      expect(text).to.include('"eps": [\n    1e-05,\n    0.5,\n    2.5e-05,\n    1e-07,\n    123.25\n  ],');
      expect(text).to.include('"name": "\\u00e9"');
      expect(text).to.not.include('extra');
      built.dispose();
      expect(integralFloatPaths('{"a": 0.0, "b": [1, 2.0, {"c": 1E2}], "d": 1e-5, "e": "3.0", "f\\"": -4.00}'))
          .to.deep.equal([['a'], ['b', 1], ['b', 2, 'c'], ['f"']]);
    });

    it('rounds to bfloat16 and float16 bit for bit as torch\'s .to() does (random bit patterns, ties, specials)', async () => {
      const file = await readSafetensorsFile(join(SAVE_PRETRAINED, 'torch_rounding.safetensors'));
      const [x, bf16, f16] = await Promise.all(['f32', 'bf16', 'f16'].map(n => file.tensor(n)));
      const values = x.dataSync() as Float32Array;
      for (const [ours, theirs, what] of [
        [decodeBFloat16(encodeBFloat16(values)), bf16.dataSync() as Float32Array, 'bf16'],
        [decodeFloat16(encodeFloat16(values)), f16.dataSync() as Float32Array, 'f16'],
      ] as const) {
        let mismatches = 0;
        let first = -1;
        for (let i = 0; i < values.length; i++) {
          const same = Object.is(ours[i], theirs[i]) || (Number.isNaN(ours[i]) && Number.isNaN(theirs[i]));
          if (!same && mismatches++ === 0) first = i;
        }
        expect(mismatches, `${what}: ${mismatches} of ${values.length} differ from torch, first at ${first}: ` +
            `${values[first]} → ${ours[first]} (torch ${theirs[first]})`).to.equal(0);
      }
      expect(values.length).to.equal(20014);
      tf.dispose([x, bf16, f16]);
    });
  });

  describe('shards', () => {
    it('splits at maxShardSize as save_pretrained does, with its file names and index; loading gives the same weights', async () => {
      const model = await loadHFCheckpoint(fixtureDir('olmoe'));
      const dir = await tempDir('hf-shards-');
      const before = tf.memory().numTensors;
      const max = 100_000;
      const saved = await saveHFCheckpoint(model, dir, { maxShardSize: '100KB' });
      expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);

      const n = saved.shards.length;
      expect(n).to.equal(9);
      const names = Array.from({ length: n }, (_, i) => `model-${String(i + 1).padStart(5, '0')}-of-0000${n}.safetensors`);
      expect(saved.shards.map(s => s.name)).to.deep.equal(names);
      expect((await readdir(dir)).sort()).to.deep.equal(['config.json', 'generation_config.json', ...names, 'model.safetensors.index.json'].sort());

      const indexText = await readFile(join(dir, 'model.safetensors.index.json'), 'utf8');
      const index = JSON.parse(indexText) as { metadata: { total_parameters: number; total_size: number }; weight_map: Record<string, string> };
      expect(Object.keys(index)).to.deep.equal(['metadata', 'weight_map']);
      const keys = Object.keys(index.weight_map);
      expect(keys, 'weight_map keys sorted (json.dumps sort_keys)').to.deep.equal([...keys].sort());
      expect(indexText.endsWith('}\n') && indexText.includes('\n  "metadata": {\n    "total_parameters": ')).to.equal(true);

      // every tensor in the shard the index names; total_size is the sum of the tensors' bytes
      const order = hfCheckpointEntries(model).tensors.map(t => t.name);
      expect(keys.sort()).to.deep.equal([...order].sort());
      let total = 0;
      const shardBytes: number[] = [];
      const shardOf = new Map<string, number>();
      for (const [i, name] of names.entries()) {
        const { header, dataBytes } = await headerOf(join(dir, name));
        for (const tensor of Object.keys(header)) {
          expect(index.weight_map[tensor], tensor).to.equal(name);
          shardOf.set(tensor, i);
        }
        shardBytes.push(dataBytes);
        total += dataBytes;
      }
      expect(shardOf.size).to.equal(order.length);
      expect(index.metadata.total_size).to.equal(total);
      expect(index.metadata.total_parameters).to.equal(total / 4);  // float32
      expect(saved.totalSize).to.equal(total);
      // each shard within the limit (no single unit here is larger); the order is checked against save_pretrained's above
      for (const bytes of shardBytes) expect(bytes).to.be.at.most(max);

      const again = await loadHFCheckpoint(dir);
      expectSameWeights(again, model);
      again.dispose();
      model.dispose();
    });

    it('gives a tensor larger than maxShardSize a shard of its own, and writes one model.safetensors when all fit', async () => {
      const model = await loadHFCheckpoint(fixtureDir('olmoe'));
      const dir = await tempDir('hf-shards-big-');
      const embedBytes = 97 * 64 * 4;
      await saveHFCheckpoint(model, dir, { maxShardSize: embedBytes - 1 });
      const index = JSON.parse(await readFile(join(dir, 'model.safetensors.index.json'), 'utf8'));
      const byShard = new Map<string, string[]>();
      for (const [t, shard] of Object.entries(index.weight_map as Record<string, string>)) byShard.set(shard, [...byShard.get(shard) ?? [], t]);
      expect(byShard.get(index.weight_map['model.embed_tokens.weight'])).to.deep.equal(['model.embed_tokens.weight']);
      expect(byShard.get(index.weight_map['lm_head.weight'])).to.deep.equal(['lm_head.weight']);
      // save_pretrained's order: lm_head before model.*
      expect(index.weight_map['lm_head.weight']).to.match(/^model-00001-of-000\d\d\.safetensors$/);
      expect(index.weight_map['model.embed_tokens.weight']).to.match(/^model-00002-of-000\d\d\.safetensors$/);

      // saved again into the same folder, unsharded: old shards and the index go
      const saved = await saveHFCheckpoint(model, dir);
      expect(saved.shards.map(s => s.name)).to.deep.equal(['model.safetensors']);
      expect((await readdir(dir)).sort()).to.deep.equal(['config.json', 'generation_config.json', 'model.safetensors']);
      expect((await readFile(join(dir, 'model.safetensors'))).equals(await readFile(join(fixtureDir('olmoe'), 'model.safetensors')))).to.equal(true);
      model.dispose();
    });

    it('parses shard sizes as transformers does (KB/MB/GB/TB = powers of 10; KiB.. powers of 2) and refuses others', async () => {
      expect(parseShardSize('5GB')).to.equal(5e9);
      expect(parseShardSize('50GB')).to.equal(5e10);
      expect(parseShardSize(' 1.5 mb ')).to.equal(1_500_000);
      expect(parseShardSize('2GiB')).to.equal(2 ** 31);
      expect(parseShardSize(1000)).to.equal(1000);
      for (const bad of ['5 XB', '5', 'GB', '-1GB', 0, -5, 1.5, '0KB', null]) {
        expect(() => parseShardSize(bad), String(bad)).to.throw(/`saveHFCheckpoint\(\)`: 'maxShardSize' must be a positive whole number of bytes or a size like '5GB', '500MB' or '2GiB' but got /);
      }
      const model = await loadHFCheckpoint(fixtureDir('olmoe'));
      const dir = await tempDir('hf-shards-bad-');
      expect((await rejection(saveHFCheckpoint(model, dir, { maxShardSize: '5XB' }))).message).to.match(/'maxShardSize' must be/);
      expect(await readdir(dir), 'nothing written').to.deep.equal([]);
      model.dispose();
    });
  });

  describe('source dtype', () => {
    it('keeps a bf16 checkpoint bf16: the same file bytes, config dtype bfloat16, the same weights', async () => {
      const src = await bf16Checkpoint('qwen3_moe');
      const model = await loadHFCheckpoint(src);
      expect(sourceDtypeOf(model, 'model.layers.1.mlp.experts.3.down_proj.weight')).to.equal('BF16');
      const dir = await tempDir('hf-bf16-');
      const saved = await saveHFCheckpoint(model, dir);
      expect(saved.dtype).to.equal('bfloat16');
      expect((await readFile(join(dir, 'model.safetensors'))).equals(await readFile(join(src, 'model.safetensors'))),
          'model.safetensors byte-identical to the bf16 source').to.equal(true);
      const config = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8'));
      expect(config['dtype']).to.equal('bfloat16');
      expect(config).to.not.have.property('torch_dtype');
      const again = await loadHFCheckpoint(dir);
      expectSameWeights(again, model);

      // written as float32 on request: widened exactly, config says float32
      const wide = await tempDir('hf-bf16-as-f32-');
      expect((await saveHFCheckpoint(model, wide, { dtype: 'float32' })).dtype).to.equal('float32');
      const { header } = await headerOf(join(wide, 'model.safetensors'));
      expect(new Set(Object.values(header).map(e => e.dtype))).to.deep.equal(new Set(['F32']));
      expect(JSON.parse(await readFile(join(wide, 'config.json'), 'utf8'))['dtype']).to.equal('float32');
      const widened = await loadHFCheckpoint(wide);
      expectSameWeights(widened, model);
      [model, again, widened].forEach(m => m.dispose());
    });

    it('keeps each tensor\'s own dtype in a mixed checkpoint, also through a TF.js save and load; torch_dtype follows', async () => {
      const src = await bf16Checkpoint('olmoe', ['model.norm.weight', 'model.layers.0.mlp.gate.weight'], 'torch_dtype');
      const model = await loadHFCheckpoint(src);
      const tfjsDir = await tempDir('hf-mixed-tfjs-');
      await model.save(fileIO(tfjsDir));
      const reloaded = await tfl.loadLayersModel(fileIO(tfjsDir));
      const dir = await tempDir('hf-mixed-');
      await saveHFCheckpoint(reloaded, dir, { sourceFolder: null });
      const { header } = await headerOf(join(dir, 'model.safetensors'));
      const f32 = Object.entries(header).filter(([, e]) => e.dtype === 'F32').map(([n]) => n).sort();
      expect(f32).to.deep.equal(['model.layers.0.mlp.gate.weight', 'model.norm.weight']);
      expect(Object.values(header).filter(e => e.dtype === 'BF16').length).to.equal(Object.keys(header).length - 2);
      const config = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8'));
      expect([config['torch_dtype'], config['dtype']]).to.deep.equal(['bfloat16', 'bfloat16']);
      expect((await readFile(join(dir, 'model.safetensors'))).equals(await readFile(join(src, 'model.safetensors')))).to.equal(true);
      model.dispose();
      reloaded.dispose();
    });

    it('rounds changed weights to bf16 to nearest even on save, and writes float16 on request', async () => {
      const model = await loadHFCheckpoint(await bf16Checkpoint('olmoe'));
      const norm = model.getLayer('model.norm').weights[0];
      const H = norm.shape[0] as number;
      const values = new Float32Array(H);
      values[0] = 1 + 2 ** -8;            // a tie: to even (1)
      values[1] = 1 + 3 * 2 ** -8;        // a tie: to even (1 + 2^-6)
      values[2] = 1 + 2 ** -8 + 2 ** -20; // above the tie: up
      values[3] = 0.1;                    // 0x3DCCCCCD → 0x3DCD
      const t = tf.tensor1d(values);
      norm.write(t);
      t.dispose();
      const dir = await tempDir('hf-bf16-rne-');
      await saveHFCheckpoint(model, dir);
      const file = await readSafetensorsFile(join(dir, 'model.safetensors'));
      expect(file.info('model.norm.weight').dtype).to.equal('BF16');
      const back = await file.tensor('model.norm.weight');
      expect(Array.from(back.dataSync().slice(0, 4))).to.deep.equal([1, 1 + 2 ** -6, 1 + 2 ** -7, 0.10009765625]);
      back.dispose();

      const half = await tempDir('hf-f16-');
      expect((await saveHFCheckpoint(model, half, { dtype: 'float16' })).dtype).to.equal('float16');
      const f16 = await readSafetensorsFile(join(half, 'model.safetensors'));
      expect(f16.info('model.norm.weight').dtype).to.equal('F16');
      const h = await f16.tensor('model.norm.weight');
      expect(Array.from(h.dataSync().slice(0, 4))).to.deep.equal([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8, 0.0999755859375]);
      h.dispose();
      expect(JSON.parse(await readFile(join(half, 'config.json'), 'utf8'))['dtype']).to.equal('float16');
      model.dispose();
    });

    it('refuses an unknown dtype before writing anything', async () => {
      const model = await loadHFCheckpoint(fixtureDir('olmoe'));
      const dir = await tempDir('hf-dtype-bad-');
      const e = await rejection(saveHFCheckpoint(model, dir, { dtype: 'int8' as 'float32' }));
      expect(e.message).to.equal("`saveHFCheckpoint()`: 'dtype' must be one of source, float32, bfloat16, float16 but got \"int8\" (string)");
      expect(await readdir(dir)).to.deep.equal([]);
      model.dispose();
    });
  });

  describe('tokenizer and generation files', () => {
    it('copies every companion file of the folder the model was loaded from, byte for byte, and nothing else', async () => {
      const src = await bf16Checkpoint('olmoe');
      const model = await loadHFCheckpoint(src);
      const dir = await tempDir('hf-companions-');
      const saved = await saveHFCheckpoint(model, dir);
      expect(saved.copied.sort()).to.deep.equal([...CHECKPOINT_COMPANION_FILES].sort());
      expect((await readdir(dir)).sort()).to.deep.equal(['config.json', 'model.safetensors', ...CHECKPOINT_COMPANION_FILES].sort());
      for (const name of CHECKPOINT_COMPANION_FILES) {
        expect((await readFile(join(dir, name))).equals(await readFile(join(src, name))), name).to.equal(true);
      }

      // extraFiles win over the source's file of the same name; sourceFolder null copies none
      await saveHFCheckpoint(model, dir, { extraFiles: { 'tokenizer.json': 'mine' } });
      expect(await readFile(join(dir, 'tokenizer.json'), 'utf8')).to.equal('mine');
      const bare = await tempDir('hf-no-companions-');
      await saveHFCheckpoint(model, bare, { sourceFolder: null });
      expect((await readdir(bare)).sort()).to.deep.equal(['config.json', 'model.safetensors']);

      // an explicit source folder; a recorded folder that is gone is skipped
      const other = await tempDir('hf-explicit-');
      await saveHFCheckpoint(model, other, { sourceFolder: fixtureDir('mixtral') });
      expect((await readdir(other)).sort()).to.deep.equal(['config.json', 'generation_config.json', 'model.safetensors']);
      await rm(src, { recursive: true });
      const gone = await tempDir('hf-source-gone-');
      expect((await saveHFCheckpoint(model, gone)).copied).to.deep.equal([]);
      model.dispose();
    });

    it('refuses a companion file that links out of the source folder, a FIFO, and a bad sourceFolder', async () => {
      const src = await bf16Checkpoint('olmoe');
      const model = await loadHFCheckpoint(src);
      const outside = await tempDir('hf-outside-');
      await writeFile(join(outside, 'secret.json'), '{}');
      await rm(join(src, 'tokenizer.json'));
      await symlink(join(outside, 'secret.json'), join(src, 'tokenizer.json'));
      const dir = await tempDir('hf-link-');
      const link = await rejection(saveHFCheckpoint(model, dir));
      expect(link).to.be.instanceOf(FileError);
      expect(link.message).to.match(/the folder the model was loaded from: 'tokenizer.json' '.*tokenizer.json' is a link to '.*secret.json', outside its folder/);
      expect(await readdir(dir), 'nothing written').to.deep.equal([]);

      await rm(join(src, 'tokenizer.json'));
      await rm(join(src, 'tokenizer_config.json'));
      const fifo = makeFifo(src, 'tokenizer_config.json');
      const e = await expectSettlesQuickly(saveHFCheckpoint(model, dir), fifo);
      expect(e.message).to.match(/'tokenizer_config.json' '.*tokenizer_config.json' is a FIFO \(named pipe\), not a regular file/);

      const missing = await rejection(saveHFCheckpoint(model, dir, { sourceFolder: join(outside, 'nope') }));
      expect(missing.message).to.match(/`saveHFCheckpoint\(\)`: sourceFolder '.*nope' does not exist/);
      const bad = await rejection(saveHFCheckpoint(model, dir, { sourceFolder: 5 as unknown as string }));
      expect(bad.message).to.equal("`saveHFCheckpoint()`: 'sourceFolder' must be a folder path or null but got 5 (number)");
      expect(await readdir(dir), 'still nothing written').to.deep.equal([]);
      model.dispose();
    });
  });
});
