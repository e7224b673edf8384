/**
 * The safetensors reader and writer, against the HF fixtures (written by the Python reference
 * implementation), files built byte by byte here, and hand-computed F16/BF16/I64 values.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  MAX_HEADER_BYTES, SafetensorsError, encodeSafetensors, parseSafetensors, readSafetensorsFile,
  writeSafetensorsFile,
} from '../../src/io/safetensors.js';
import { Rng } from '../helpers/numeric.js';

const ARCHS = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'deepseek_v3'];
const fixture = (arch: string, file: string) => join('spec', 'fixtures', 'hf', arch, file);

/** A file built by hand: the u64 length, the header text as given, then the data bytes. */
function build(header: unknown, data: Uint8Array = new Uint8Array(0), headerLength?: bigint): Uint8Array {
  const text = new TextEncoder().encode(typeof header === 'string' ? header : JSON.stringify(header));
  const out = new Uint8Array(8 + text.length + data.length);
  new DataView(out.buffer).setBigUint64(0, headerLength ?? BigInt(text.length), true);
  out.set(text, 8);
  out.set(data, 8 + text.length);
  return out;
}

function u16le(values: number[]): Uint8Array {
  const out = new Uint8Array(2 * values.length);
  values.forEach((v, i) => new DataView(out.buffer).setUint16(2 * i, v, true));
  return out;
}

function i64le(values: bigint[]): Uint8Array {
  const out = new Uint8Array(8 * values.length);
  values.forEach((v, i) => new DataView(out.buffer).setBigInt64(8 * i, v, true));
  return out;
}

/** Reads the tensor, checks that exactly one tensor was made, returns its values and disposes it. */
async function values(file: ReturnType<typeof parseSafetensors>, name: string): Promise<{ data: number[], t: tf.Tensor }> {
  const before = tf.memory().numTensors;
  const t = await file.tensor(name);
  expect(tf.memory().numTensors - before, `tensors made by tensor('${name}')`).to.equal(1);
  const data = Array.from(t.dataSync());
  t.dispose();
  return { data, t };
}

/** `fn` (async) leaves as many tensors as it found. */
async function expectNoLeakAsync(fn: () => Promise<void>): Promise<void> {
  const before = tf.memory().numTensors;
  await fn();
  expect(tf.memory().numTensors, 'numTensors').to.equal(before);
}

function expectError(fn: () => unknown, pattern: string | RegExp): void {
  expect(fn).to.throw(SafetensorsError, pattern);
}

async function expectRejects(promise: Promise<unknown>, pattern: string | RegExp, cls: Function = SafetensorsError): Promise<void> {
  let error: unknown = null;
  try { await promise; } catch (e) { error = e; }
  expect(error).to.be.instanceOf(cls);
  if (typeof pattern === 'string') expect((error as Error).message).to.include(pattern);
  else expect((error as Error).message).to.match(pattern);
}

describe('safetensors', () => {
  let dir: string;
  before(() => { dir = mkdtempSync(join(tmpdir(), 'safetensors-spec-')); });
  after(() => { rmSync(dir, { recursive: true, force: true }); });

  describe('round trip', () => {
    it('encodes and decodes float32 and int32 tensors exactly, with metadata', async () => {
      const rng = new Rng(7);
      const w = Float32Array.from(rng.array(6));
      w[0] = -0; w[1] = 3.4e38; w[2] = 1e-45;  // -0, near the max, the smallest subnormal
      await expectNoLeakAsync(async () => {
        const tensors = {
          'z.weight': tf.tensor(w, [2, 3]),
          'a.ids': tf.tensor([-2147483648, 0, 7, 2147483647], [4], 'int32'),
          'scalar': tf.scalar(0.25),
          'empty': tf.zeros([0, 5]),
        };
        const bytes = await encodeSafetensors(tensors, { format: 'pt', note: 'ü' });
        tf.dispose(Object.values(tensors));
        const file = parseSafetensors(bytes);
        expect(file.names()).to.deep.equal(['a.ids', 'empty', 'scalar', 'z.weight']);
        expect(file.metadata).to.deep.equal({ format: 'pt', note: 'ü' });
        expect(file.info('z.weight')).to.deep.equal({ dtype: 'F32', shape: [2, 3] });
        expect(file.info('a.ids')).to.deep.equal({ dtype: 'I32', shape: [4] });
        expect(file.info('scalar')).to.deep.equal({ dtype: 'F32', shape: [] });
        expect(file.info('empty')).to.deep.equal({ dtype: 'F32', shape: [0, 5] });
        const z = await values(file, 'z.weight');
        expect(z.t.dtype).to.equal('float32');
        expect(z.t.shape).to.deep.equal([2, 3]);
        expect(Float32Array.from(z.data)).to.deep.equal(w);
        expect(Object.is(z.data[0], -0)).to.equal(true);
        const ids = await values(file, 'a.ids');
        expect(ids.t.dtype).to.equal('int32');
        expect(ids.data).to.deep.equal([-2147483648, 0, 7, 2147483647]);
        expect((await values(file, 'scalar')).data).to.deep.equal([0.25]);
        const empty = await values(file, 'empty');
        expect(empty.t.shape).to.deep.equal([0, 5]);
        expect(empty.data).to.deep.equal([]);
      });
    });

    it('lays the file out as the reference does: padded header, F32 then I32, each by name', async () => {
      const tensors = {
        'b': tf.tensor([1, 2, 3], [3], 'int32'), 'a': tf.ones([1]), 'c': tf.zeros([2]), 'a2': tf.tensor([5], [1], 'int32'),
      };
      const bytes = await encodeSafetensors(tensors);
      tf.dispose(Object.values(tensors));
      const n = Number(new DataView(bytes.buffer).getBigUint64(0, true));
      expect(n % 8).to.equal(0);
      const text = new TextDecoder().decode(bytes.subarray(8, 8 + n));
      const json = JSON.parse(text);
      expect(text.trimEnd().length).to.be.greaterThan(n - 8);
      expect(text.slice(text.trimEnd().length)).to.match(/^ *$/);
      expect(Object.keys(json)).to.deep.equal(['a', 'c', 'a2', 'b']);
      expect(json.a.data_offsets).to.deep.equal([0, 4]);
      expect(json.c.data_offsets).to.deep.equal([4, 12]);
      expect(json.a2.data_offsets).to.deep.equal([12, 16]);
      expect(json.b).to.deep.equal({ dtype: 'I32', shape: [3], data_offsets: [16, 28] });
      expect(bytes.length).to.equal(8 + n + 28);
      expect(new DataView(bytes.buffer).getInt32(8 + n + 16 + 8, true)).to.equal(3);
    });

    it('writes and reads a file', async () => {
      const path = join(dir, 'round_trip.safetensors');
      const t = tf.tensor([[1.5, -2], [3, 4]]);
      await writeSafetensorsFile(path, { t }, { format: 'pt' });
      t.dispose();
      const file = await readSafetensorsFile(path);
      expect(file.metadata).to.deep.equal({ format: 'pt' });
      await expectNoLeakAsync(async () => { expect((await values(file, 't')).data).to.deep.equal([1.5, -2, 3, 4]); });
    });

    it('rejects tensors and metadata it cannot encode', async () => {
      const b = tf.tensor([true], [1], 'bool');
      const d = tf.ones([1]);
      d.dispose();
      try {
        await expectRejects(encodeSafetensors({ flag: b }),
            "`encodeSafetensors()`: tensor 'flag' must be float32 or int32 but got bool (shape [1])");
        await expectRejects(encodeSafetensors({ gone: d }), "`encodeSafetensors()`: tensor 'gone' was already disposed");
        await expectRejects(encodeSafetensors({ x: [1] as unknown as tf.Tensor }),
            "`encodeSafetensors()`: tensor 'x' must be a tf.Tensor but got object");
        await expectRejects(encodeSafetensors({ __metadata__: b }),
            "`encodeSafetensors()`: '__metadata__' is reserved and cannot name a tensor");
        await expectRejects(encodeSafetensors({}, { step: 3 as unknown as string }),
            "`encodeSafetensors()`: metadata 'step' must be a string but got number");
      } finally {
        b.dispose();
      }
    });
  });

  describe('HF fixtures (written by the reference implementation)', () => {
    for (const arch of ARCHS) {
      it(`${arch}: model.safetensors decodes every tensor and re-encodes byte for byte`, async () => {
        const config = JSON.parse(readFileSync(fixture(arch, 'config.json'), 'utf8'));
        const file = await readSafetensorsFile(fixture(arch, 'model.safetensors'));
        expect(file.metadata).to.deep.equal({ format: 'pt' });
        expect(file.info('model.embed_tokens.weight'))
            .to.deep.equal({ dtype: 'F32', shape: [config.vocab_size, config.hidden_size] });
        expect(file.info('lm_head.weight').shape).to.deep.equal([config.vocab_size, config.hidden_size]);
        const before = tf.memory().numTensors;
        const all: Record<string, tf.Tensor> = {};
        for (const name of file.names()) {
          all[name] = await file.tensor(name);
          expect(all[name].shape, name).to.deep.equal(file.info(name).shape);
        }
        const original = readFileSync(fixture(arch, 'model.safetensors'));
        const again = await encodeSafetensors(all, { format: 'pt' });
        tf.dispose(Object.values(all));
        expect(tf.memory().numTensors).to.equal(before);
        expect(Buffer.from(again).equals(original), 'byte-identical re-encoding').to.equal(true);
      });

      it(`${arch}: golden.safetensors matches golden.json and re-encodes byte for byte`, async () => {
        const golden = JSON.parse(readFileSync(fixture(arch, 'golden.json'), 'utf8'));
        const bytes = readFileSync(fixture(arch, 'golden.safetensors'));
        const file = parseSafetensors(new Uint8Array(bytes.buffer, bytes.byteOffset, bytes.byteLength));
        const fromDisk = await readSafetensorsFile(fixture(arch, 'golden.safetensors'));
        expect(fromDisk.names()).to.deep.equal(file.names());
        expect(file.info('input_ids')).to.deep.equal({ dtype: 'I32', shape: [2, 11] });
        expect(file.info('logits').shape).to.deep.equal([2, 11, golden.config.vocab_size]);
        for (const key of ['block.x', 'block.out', 'block.g', 'block.dx']) {
          expect(file.info(key), key).to.deep.equal({ dtype: 'F32', shape: [3, 5, golden.config.hidden_size] });
        }
        for (const [param, shape] of Object.entries(golden.block_params as Record<string, number[]>)) {
          expect(file.info(`block.grad.${param}`).shape, param).to.deep.equal(shape);
        }
        await expectNoLeakAsync(async () => {
          const ids = await values(file, 'input_ids');
          expect(ids.t.dtype).to.equal('int32');
          expect(ids.data.every(v => Number.isInteger(v) && v >= 0 && v < golden.config.vocab_size)).to.equal(true);
          // One value read straight from the file bytes, independently of the reader.
          const dataStart = 8 + Number(bytes.readBigUInt64LE(0));
          const header = JSON.parse(bytes.subarray(8, dataStart).toString('utf8'));
          const [begin] = header['block.x'].data_offsets;
          const x = (await values(file, 'block.x')).data;
          expect(x[0]).to.equal(bytes.readFloatLE(dataStart + begin));
          expect(x[x.length - 1]).to.equal(bytes.readFloatLE(dataStart + begin + 4 * (x.length - 1)));
          const d1 = (await values(fromDisk, 'logits')).data;
          const d2 = (await values(file, 'logits')).data;
          expect(d1).to.deep.equal(d2);
        });
        const all: Record<string, tf.Tensor> = {};
        for (const name of file.names()) all[name] = await file.tensor(name);
        const again = await encodeSafetensors(all);
        tf.dispose(Object.values(all));
        expect(Buffer.from(again).equals(bytes), 'byte-identical re-encoding').to.equal(true);
      });

      it(`${arch}: the PEFT adapter decodes`, async () => {
        const file = await readSafetensorsFile(fixture(arch, join('adapter', 'adapter_model.safetensors')));
        expect(file.names().length).to.be.greaterThan(0);
        await expectNoLeakAsync(async () => {
          for (const name of file.names()) {
            const { t } = await values(file, name);
            expect(t.shape, name).to.deep.equal(file.info(name).shape);
            expect(name).to.match(/lora_[AB]\.weight$/);
          }
        });
      });
    }
  });

  describe('16-bit floats and I64', () => {
    it('decodes F16 normals, subnormals, zeros, infinities and NaN', async () => {
      const cases: Array<[number, number]> = [
        [0x3c00, 1], [0xc000, -2], [0x7bff, 65504], [0x3555, 0.333251953125], [0x0400, 2 ** -14],
        [0x0001, 2 ** -24], [0x03ff, 1023 * 2 ** -24], [0x8001, -(2 ** -24)], [0x0000, 0], [0x8000, -0],
        [0x7c00, Infinity], [0xfc00, -Infinity], [0x7e00, NaN], [0xfc01, NaN],
      ];
      const file = parseSafetensors(build(
          { h: { dtype: 'F16', shape: [cases.length], data_offsets: [0, 2 * cases.length] } },
          u16le(cases.map(c => c[0]))));
      await expectNoLeakAsync(async () => {
        const { data, t } = await values(file, 'h');
        expect(t.dtype).to.equal('float32');
        cases.forEach(([bits, want], i) => {
          expect(Object.is(data[i], want), `0x${bits.toString(16)} -> ${data[i]}, want ${want}`).to.equal(true);
        });
      });
    });

    it('decodes BF16 exactly, as the high half of a float32', async () => {
      const cases: Array<[number, number]> = [
        [0x3f80, 1], [0xc040, -3], [0x4049, 3.140625], [0x0001, 2 ** -133], [0x8000, -0],
        [0x7f80, Infinity], [0xff80, -Infinity], [0x7fc0, NaN], [0x3e20, 0.15625],
      ];
      const file = parseSafetensors(build(
          { __metadata__: { format: 'pt' }, b: { dtype: 'BF16', shape: [3, 3], data_offsets: [0, 18] } },
          u16le(cases.map(c => c[0]))));
      await expectNoLeakAsync(async () => {
        const { data, t } = await values(file, 'b');
        expect(t.shape).to.deep.equal([3, 3]);
        cases.forEach(([bits, want], i) => {
          expect(Object.is(data[i], want), `0x${bits.toString(16)} -> ${data[i]}, want ${want}`).to.equal(true);
        });
      });
    });

    it('decodes I64 within the int32 range to int32', async () => {
      const v = [0n, -1n, 2147483647n, -2147483648n, 5n, -77n];
      const file = parseSafetensors(build(
          { pos: { dtype: 'I64', shape: [2, 3], data_offsets: [0, 48] } }, i64le(v)));
      await expectNoLeakAsync(async () => {
        const { data, t } = await values(file, 'pos');
        expect(t.dtype).to.equal('int32');
        expect(data).to.deep.equal(v.map(Number));
      });
    });

    it('rejects an I64 value outside int32 and names it', async () => {
      for (const big of [2147483648n, -2147483649n, 1n << 40n]) {
        const file = parseSafetensors(build(
            { pos: { dtype: 'I64', shape: [2], data_offsets: [0, 16] } }, i64le([3n, big])), 'pos.safetensors');
        await expectNoLeakAsync(() => expectRejects(file.tensor('pos'),
            `safetensors file 'pos.safetensors': tensor 'pos' (I64, shape [2]): element 1 is ${big}, ` +
            'outside the int32 range [-2147483648, 2147483647]'));
      }
    });

    it('reads I32 little-endian from an unaligned data buffer', async () => {
      let text = JSON.stringify({ i: { dtype: 'I32', shape: [2], data_offsets: [0, 8] } });
      while (text.length % 4 !== 1) text += ' ';  // the data then starts at an odd byte
      const file = parseSafetensors(build(text, new Uint8Array([1, 0, 0, 0, 0xfe, 0xff, 0xff, 0xff])));
      await expectNoLeakAsync(async () => { expect((await values(file, 'i')).data).to.deep.equal([1, -2]); });
    });
  });

  describe('errors', () => {
    const where = "safetensors file 'bad.safetensors'";
    const parse = (bytes: Uint8Array) => parseSafetensors(bytes, 'bad.safetensors');
    const entry = (e: object) => build({ w: e }, new Uint8Array(16));

    it('a file shorter than 8 bytes', async () => {
      expectError(() => parse(new Uint8Array(5)),
          `${where}: is 5 bytes long, shorter than the 8-byte header length that starts the format`);
      expectError(() => parseSafetensors(new Uint8Array(0)), /^safetensors data: is 0 bytes long/);
      const path = join(dir, 'short.safetensors');
      writeFileSync(path, new Uint8Array(3));
      await expectRejects(readSafetensorsFile(path), /'.*short\.safetensors': is 3 bytes long, shorter than/);
    });

    it('a header length over the limit, without allocating it', async () => {
      const huge = build('{}', new Uint8Array(0), BigInt(MAX_HEADER_BYTES) + 1n);
      expectError(() => parse(huge), `${where}: header length 100000001 exceeds the limit of 100000000 bytes`);
      const max = build('{}', new Uint8Array(0), 0xffffffffffffffffn);
      expectError(() => parse(max), 'header length 18446744073709551615 exceeds the limit of 100000000 bytes');
      const path = join(dir, 'huge.safetensors');
      writeFileSync(path, max);
      await expectRejects(readSafetensorsFile(path), /header length 18446744073709551615 exceeds the limit/);
    });

    it('a header length past the end of the file', async () => {
      const bytes = build('{"w":{}}', new Uint8Array(4), 1000n);
      expectError(() => parse(bytes),
          `${where}: header length 1000 exceeds the 12 bytes that follow the length field (file size 20 - 8)`);
      const path = join(dir, 'truncated.safetensors');
      writeFileSync(path, bytes);
      await expectRejects(readSafetensorsFile(path), /header length 1000 exceeds the 12 bytes .*file size 20 - 8/);
    });

    it('a header that is not JSON, not UTF-8 or not an object', async () => {
      expectError(() => parse(build('{"w": ')), new RegExp(`^${where}: header \\(6 bytes\\) is not valid JSON: `));
      const notUtf8 = build('{}');
      notUtf8[8] = 0xff;
      expectError(() => parse(notUtf8), `${where}: header (2 bytes) is not valid UTF-8`);
      expectError(() => parse(build('[1, 2]')), `${where}: header must be a JSON object but got an array`);
      expectError(() => parse(build('null')), `${where}: header must be a JSON object but got null`);
    });

    it('entries that are not objects or lack a field', async () => {
      expectError(() => parse(build({ w: 3 })),
          `${where}: tensor 'w': header entry must be an object with dtype, shape and data_offsets but got number 3`);
      expectError(() => parse(entry({ shape: [4], data_offsets: [0, 16] })),
          `${where}: tensor 'w': header entry is missing 'dtype'`);
      expectError(() => parse(entry({ dtype: 'F32', data_offsets: [0, 16] })),
          `${where}: tensor 'w': header entry is missing 'shape'`);
      expectError(() => parse(entry({ dtype: 'F32', shape: [4] })),
          `${where}: tensor 'w': header entry is missing 'data_offsets'`);
    });

    it('bad dtype, shape or data_offsets values', async () => {
      expectError(() => parse(entry({ dtype: 'F128', shape: [1], data_offsets: [0, 16] })),
          `${where}: tensor 'w': unknown dtype "F128"; the format defines BOOL, U8`);
      expectError(() => parse(entry({ dtype: 'F32', shape: [2, -2], data_offsets: [0, 16] })),
          `${where}: tensor 'w': 'shape' must be an array of non-negative integers but got [2,-2]`);
      expectError(() => parse(entry({ dtype: 'F32', shape: [4], data_offsets: [0] })),
          `${where}: tensor 'w': 'data_offsets' must be [begin, end] with non-negative integers but got [0]`);
      expectError(() => parse(entry({ dtype: 'F32', shape: [4], data_offsets: [0, 1.5] })),
          "'data_offsets' must be [begin, end] with non-negative integers but got [0,1.5]");
    });

    it('data_offsets outside the data buffer, reversed, or of the wrong size', async () => {
      expectError(() => parse(entry({ dtype: 'F32', shape: [5], data_offsets: [0, 20] })),
          `${where}: tensor 'w': data_offsets [0, 20] lie outside the data buffer of 16 bytes`);
      expectError(() => parse(entry({ dtype: 'F32', shape: [4], data_offsets: [12, 28] })),
          `${where}: tensor 'w': data_offsets [12, 28] lie outside the data buffer of 16 bytes`);
      expectError(() => parse(entry({ dtype: 'F32', shape: [0], data_offsets: [8, 4] })),
          `${where}: tensor 'w': data_offsets [8, 4] end before they begin`);
      expectError(() => parse(entry({ dtype: 'F32', shape: [2, 3], data_offsets: [0, 16] })),
          `${where}: tensor 'w': data_offsets [0, 16] span 16 bytes but dtype F32 with shape [2,3] needs 24 bytes`);
      expectError(() => parse(entry({ dtype: 'BF16', shape: [4], data_offsets: [0, 16] })),
          'data_offsets [0, 16] span 16 bytes but dtype BF16 with shape [4] needs 8 bytes');
      expectError(() => parse(entry({ dtype: 'F4', shape: [3], data_offsets: [0, 1] })),
          'data_offsets [0, 1] span 1 bytes but dtype F4 with shape [3] needs 1.5 bytes');
    });

    it('metadata that is not a map of strings', async () => {
      expectError(() => parse(build({ __metadata__: { format: 1 } })),
          `${where}: '__metadata__' value 'format' must be a string but got number 1`);
      expectError(() => parse(build({ __metadata__: ['pt'] })),
          `${where}: '__metadata__' must be an object but got an array`);
    });

    it('dtypes the reader cannot decode, after a valid parse', async () => {
      const file = parse(build({
        d: { dtype: 'F64', shape: [1], data_offsets: [0, 8] },
        u: { dtype: 'U8', shape: [2], data_offsets: [8, 10] },
        b: { dtype: 'BOOL', shape: [2], data_offsets: [10, 12] },
      }, new Uint8Array(12)));
      expect(file.info('d')).to.deep.equal({ dtype: 'F64', shape: [1] });
      await expectNoLeakAsync(async () => {
        for (const [name, dtype] of [['d', 'F64'], ['u', 'U8'], ['b', 'BOOL']]) {
          await expectRejects(file.tensor(name),
              `${where}: tensor '${name}' has dtype ${dtype}, which cannot be decoded; supported: F32, F16, BF16, F8_E4M3, I32, I64`);
        }
      });
    });

    it('an unknown tensor name lists a few names', async () => {
      const file = await readSafetensorsFile(fixture('mixtral', 'model.safetensors'));
      const path = fixture('mixtral', 'model.safetensors');
      const noSuchTensor = `safetensors file '${path}': no tensor named 'nope'; it has 65 tensor(s), ` +
          "e.g. 'lm_head.weight', 'model.embed_tokens.weight', 'model.layers.0.block_sparse_moe.experts.0.w1.weight'";
      await expectRejects(file.tensor('nope'), noSuchTensor);
      expectError(() => file.info('nope'), noSuchTensor);
      expect(file.has('nope')).to.equal(false);
      expect(file.has('lm_head.weight')).to.equal(true);
      await expectRejects(parseSafetensors(build({})).tensor('x'), "safetensors data: no tensor named 'x'; it has 0 tensor(s)");
    });
  });
});
