/**
 * What the safetensors reader accepts and how much it reads: the header is validated as the
 * reference implementation does (tensors tile the data section exactly, names are unique), and a
 * file is read tensor by tensor with positional reads, never whole. Big files are sparse (made
 * with ftruncate, no disk used); special files (FIFOs) are made with mkfifo; all in os.tmpdir().
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import {
  closeSync, mkdirSync, mkdtempSync, openSync, readdirSync, rmSync, truncateSync, writeFileSync, writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MoELoraError } from '../../src/errors.js';
import {
  SafetensorsError, encodeSafetensors, parseSafetensors, readSafetensorsFile,
} from '../../src/io/safetensors.js';
import { FileError } from '../../src/util/files.js';
import { expectSettlesQuickly, makeFifo } from './special_files.js';
import { rejection } from '../helpers/rejection.js';

/** 0.5 and 3 as little-endian bf16 (0x3f00, 0x4040). */
const BF16_HALF_AND_THREE = new Uint8Array([0x00, 0x3f, 0x40, 0x40]);

/** A file built by hand: the u64 length, the header text as given, then the data bytes. */
function build(header: unknown, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  const text = new TextEncoder().encode(typeof header === 'string' ? header : JSON.stringify(header));
  const out = new Uint8Array(8 + text.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(text.length), true);
  out.set(text, 8);
  out.set(data, 8 + text.length);
  return out;
}

/** The length and header of a file whose data section is made sparse afterwards. */
function headerOnly(header: unknown): Uint8Array {
  return build(header);
}

/** Writes `bytes` at `position` of an existing file. */
function writeAt(path: string, position: number, bytes: Uint8Array): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, bytes, 0, bytes.byteLength, position);
  } finally {
    closeSync(fd);
  }
}

function thrown(fn: () => unknown): Error {
  try {
    fn();
  } catch (e) {
    return e as Error;
  }
  throw new Error('expected a throw');
}


const f32 = (begin: number, n: number) => ({ dtype: 'F32', shape: [n], data_offsets: [begin, begin + 4 * n] });

describe('io/safetensors reading (validation, positional reads, special files)', () => {
  let dir: string;
  before(() => { dir = mkdtempSync(join(tmpdir(), 'safetensors-reading-')); });
  after(() => { rmSync(dir, { recursive: true, force: true }); });

  describe('the data section is tiled exactly, as the reference implementation requires', () => {
    const where = "safetensors file 'x.safetensors'";
    const parse = (header: unknown, bytes: number) => parseSafetensors(build(header, new Uint8Array(bytes)), 'x.safetensors');

    it('refuses overlapping (aliased) tensors', () => {
      const e = thrown(() => parse({ a: f32(0, 4), b: f32(8, 4) }, 24));
      expect(e).to.be.instanceOf(SafetensorsError);
      expect(e.message).to.equal(`${where}: tensor 'b' (data_offsets [8, 24]) overlaps tensor 'a', which ends at 16; ` +
          'tensors must not share bytes');
      // two names for the very same bytes
      expect(thrown(() => parse({ a: f32(0, 4), b: f32(0, 4) }, 16)).message)
          .to.equal(`${where}: tensor 'b' (data_offsets [0, 16]) overlaps tensor 'a', which ends at 16; tensors must not share bytes`);
    });

    it('refuses a gap between tensors and data before the first', () => {
      expect(thrown(() => parse({ a: f32(0, 2), b: f32(12, 1) }, 16)).message)
          .to.equal(`${where}: bytes [8, 12) of the data buffer belong to no tensor (a gap before tensor 'b'); ` +
              'tensors must cover the data buffer exactly');
      expect(thrown(() => parse({ a: f32(4, 1) }, 8)).message)
          .to.equal(`${where}: bytes [0, 4) of the data buffer belong to no tensor (a gap before tensor 'a'); ` +
              'tensors must cover the data buffer exactly');
    });

    it('refuses an unreferenced tail, and data with no tensor at all', () => {
      const e = thrown(() => parse({ a: f32(0, 2) }, 12));
      expect(e).to.be.instanceOf(SafetensorsError);
      expect(e.message).to.equal(`${where}: the tensors end at byte 8 but the data buffer is 12 bytes; bytes [8, 12) belong to no tensor`);
      expect(thrown(() => parse({ __metadata__: { format: 'pt' } }, 3)).message)
          .to.equal(`${where}: the tensors end at byte 0 but the data buffer is 3 bytes; bytes [0, 3) belong to no tensor`);
    });

    it('accepts zero-byte tensors anywhere, in any header order', async () => {
      const data = new Uint8Array(new Float32Array([1, 2, 3]).buffer);
      const file = parseSafetensors(build({
        z: { dtype: 'F32', shape: [0, 3], data_offsets: [12, 12] }, b: f32(4, 2), e: { dtype: 'I32', shape: [0], data_offsets: [4, 4] },
        a: f32(0, 1), y: { dtype: 'F16', shape: [0], data_offsets: [0, 0] },
      }, data));
      expect(file.names()).to.deep.equal(['a', 'b', 'e', 'y', 'z']);
      const before = tf.memory().numTensors;
      const b = await file.tensor('b');
      const z = await file.tensor('z');
      expect(Array.from(b.dataSync())).to.deep.equal([2, 3]);
      expect(z.shape).to.deep.equal([0, 3]);
      tf.dispose([b, z]);
      expect(tf.memory().numTensors).to.equal(before);
    });

    it('refuses a name given twice (JSON.parse would keep the last silently)', () => {
      // the two entries differ, so which one a reader keeps changes the weights
      const text = `{"w": ${JSON.stringify(f32(0, 1))}, "v": ${JSON.stringify(f32(4, 1))}, "w": ${JSON.stringify(f32(4, 1))}}`;
      const e = thrown(() => parseSafetensors(build(text, new Uint8Array(8)), 'x.safetensors'));
      expect(e).to.be.instanceOf(SafetensorsError);
      expect(e.message).to.equal(`${where}: header names tensor 'w' more than once (a JSON parser would silently keep the last one)`);
      // the same name written with an escape is the same name
      const escaped = `{"w": ${JSON.stringify(f32(0, 1))}, "\\u0077": ${JSON.stringify(f32(0, 1))}}`;
      expect(thrown(() => parseSafetensors(build(escaped, new Uint8Array(4)))).message)
          .to.equal("safetensors data: header names tensor 'w' more than once (a JSON parser would silently keep the last one)");
      const meta = `{"__metadata__": {"a": "1"}, "w": ${JSON.stringify(f32(0, 1))}, "__metadata__": {"a": "2"}}`;
      expect(thrown(() => parseSafetensors(build(meta, new Uint8Array(4)))).message)
          .to.equal("safetensors data: header names '__metadata__' more than once (a JSON parser would silently keep the last one)");
    });

    it('does not mistake nested keys, or keys inside strings, for duplicates', async () => {
      const text = `{"__metadata__": {"w": "{\\"w\\": 1, \\"x\\": [\\"w\\"]}", "x": "w"}, "w": ${JSON.stringify(f32(0, 1))}, ` +
          `"x\\"w": ${JSON.stringify(f32(4, 1))}}`;
      const file = parseSafetensors(build(text, new Uint8Array(new Float32Array([5, 6]).buffer)));
      expect(file.names()).to.deep.equal(['w', 'x"w']);
      expect(file.metadata).to.deep.equal({ w: '{"w": 1, "x": ["w"]}', x: 'w' });
      const t = await file.tensor('x"w');
      expect(Array.from(t.dataSync())).to.deep.equal([6]);
      t.dispose();
    });

    it('reads every file the writer makes (the writer tiles exactly)', async () => {
      const tensors = { b: tf.ones([2, 3]), a: tf.zeros([0]), c: tf.tensor([1, 2], [2], 'int32') };
      const file = parseSafetensors(await encodeSafetensors(tensors));
      tf.dispose(Object.values(tensors));
      expect(file.names()).to.deep.equal(['a', 'b', 'c']);
    });
  });

  describe('values read out', () => {
    it('from bytes in memory: copies, never views of the bytes given (F32, I32, BF16 halves)', async () => {
      const tensors = { f: tf.tensor([1.5, -2]), i: tf.tensor([7, -8], [2], 'int32') };
      const bytes = await encodeSafetensors(tensors);
      tf.dispose(Object.values(tensors));
      const file = parseSafetensors(bytes);
      const bf16Bytes = build({ h: { dtype: 'BF16', shape: [2], data_offsets: [0, 4] } }, BF16_HALF_AND_THREE);
      const bf16 = parseSafetensors(bf16Bytes);
      const [f, i] = [await file.tensor('f'), await file.tensor('i')];
      const halves = await bf16.halfBits('h');
      bytes.fill(0xff);
      bf16Bytes.fill(0xff);
      expect(Array.from(await f.data())).to.deep.equal([1.5, -2]);
      expect(Array.from(await i.data())).to.deep.equal([7, -8]);
      expect(Array.from(halves)).to.deep.equal([0x3f00, 0x4040]);  // 0.5 and 3 in bf16
      tf.dispose([f, i]);
    });

    it('from a file: the values as written, each read its own (F32, BF16 halves)', async () => {
      const path = join(dir, 'values.safetensors');
      writeFileSync(path, build({ h: { dtype: 'BF16', shape: [2], data_offsets: [0, 4] } }, BF16_HALF_AND_THREE));
      const file = await readSafetensorsFile(path);
      const [a, b] = [await file.halfBits('h'), await file.halfBits('h')];
      a[0] = 0;
      expect(Array.from(b)).to.deep.equal([0x3f00, 0x4040]);
      rmSync(path);
    });
  });

  describe('halfBitsInto: elements read into the caller\'s array', () => {
    // 8 bf16 elements 0x3f00 + i, so each element says where it came from
    const eight = Uint8Array.from({ length: 16 }, (_, b) => b % 2 === 0 ? b / 2 : 0x3f);
    const header = { h: { dtype: 'BF16', shape: [2, 4], data_offsets: [0, 16] }, f: f32(16, 1) };
    const bytes = build(header, Uint8Array.from([...eight, 0, 0, 0, 0]));
    const sources = async () => {
      const path = join(dir, 'into.safetensors');
      writeFileSync(path, bytes);
      return [['file', await readSafetensorsFile(path)], ['memory', parseSafetensors(bytes)]] as const;
    };

    it('any range, from a file and from bytes in memory, and nothing beside it', async () => {
      for (const [where, file] of await sources()) {
        const into = new Uint16Array(7).fill(0xffff);
        await file.halfBitsInto('h', into.subarray(1, 4), 3);   // elements 3, 4, 5 into [1, 4)
        expect(Array.from(into), where).to.deep.equal([0xffff, 0x3f03, 0x3f04, 0x3f05, 0xffff, 0xffff, 0xffff]);
        await file.halfBitsInto('h', into.subarray(0, 0), 8);   // none, at the end
        const whole = new Uint16Array(8);
        await file.halfBitsInto('h', whole);
        expect(Array.from(whole), where).to.deep.equal(Array.from(await file.halfBits('h')));
      }
      expect(Array.from(bytes.subarray(bytes.length - 20, bytes.length - 4))).to.deep.equal(Array.from(eight));  // the bytes given are not touched
      rmSync(join(dir, 'into.safetensors'));
    });

    it('refuses a range outside the tensor, an array that is not a Uint16Array and a tensor that is not 16-bit', async () => {
      const [[, file]] = await sources();
      const into = new Uint16Array(4);
      for (const [args, message] of [
        [[into, 5], /halfBitsInto\('h'\): 'from' and 'into' must stay within the tensor's 8 elements but got from 5 \(number\) and 4 elements/],
        [[into, -1], /but got from -1 \(number\) and 4 elements/],
        [[into, 1.5], /but got from 1.5 \(number\) and 4 elements/],
        [[new Float32Array(4)], /halfBitsInto\('h'\): 'into' must be a Uint16Array but got a Float32Array of 16 bytes/],
      ] as const) {
        expect((await rejection(file.halfBitsInto('h', ...(args as unknown as [Uint16Array, number])))).message).to.match(message);
      }
      expect((await rejection(file.halfBitsInto('f', new Uint16Array(2)))).message)
          .to.match(/tensor 'f' has dtype F32; halfBitsInto reads BF16 and F16 tensors only/);
      rmSync(join(dir, 'into.safetensors'));
    });
  });

  describe('argument checks', () => {
    it('parseSafetensors refuses what is not a Uint8Array, naming the argument', () => {
      for (const [value, described] of [['x', '"x" (string)'], [null, 'null'], [[1, 2], 'an array of length 2'],
        [new ArrayBuffer(8), 'an ArrayBuffer of 8 bytes'], [new Float32Array(2), 'a Float32Array of 8 bytes']] as const) {
        const e = thrown(() => parseSafetensors(value as never));
        expect(e).to.be.instanceOf(SafetensorsError);
        expect(e.message).to.equal(`\`parseSafetensors()\`: 'bytes' must be a Uint8Array holding a safetensors file but got ${described}`);
      }
      expect(thrown(() => parseSafetensors(new Uint8Array(8), 3 as never)).message)
          .to.equal("`parseSafetensors()`: 'source' must be a string naming the file but got 3 (number)");
    });

    it('readSafetensorsFile refuses a path that is not a string, a folder and a missing file', async () => {
      const e = await rejection(readSafetensorsFile(7 as never));
      expect(e).to.be.instanceOf(SafetensorsError);
      expect(e.message).to.equal("`readSafetensorsFile()`: 'path' must be a file path but got 7 (number)");
      const folder = join(dir, 'model.safetensors');
      mkdirSync(folder);
      const isDir = await rejection(readSafetensorsFile(folder));
      expect(isDir).to.be.instanceOf(FileError);
      expect(isDir.message).to.equal(`safetensors file '${folder}' is a directory, not a regular file`);
      rmSync(folder, { recursive: true });
      expect((await rejection(readSafetensorsFile(join(dir, 'gone.safetensors')))).message)
          .to.equal(`safetensors file '${join(dir, 'gone.safetensors')}' does not exist`);
    });

    it('refuses a FIFO immediately instead of blocking', async () => {
      const fifo = makeFifo(dir, 'adapter_model.safetensors');
      const e = await expectSettlesQuickly(readSafetensorsFile(fifo), fifo);
      expect(e).to.be.instanceOf(FileError);
      expect(e.message).to.equal(`safetensors file '${fifo}' is a FIFO (named pipe), not a regular file`);
      rmSync(fifo);
    });
  });

  describe('positional reads', () => {
    it('reads one tensor of a file with a 1.5 GB tensor without reading the rest (RSS, arrayBuffers)', async function () {
      this.timeout(20_000);
      const path = join(dir, 'tail.safetensors');
      const big = 1_500_000_000;
      const head = headerOnly({ __metadata__: { format: 'pt' }, small: f32(0, 4), big: { dtype: 'U8', shape: [big], data_offsets: [16, 16 + big] } });
      writeFileSync(path, head);
      truncateSync(path, head.byteLength + 16 + big);  // sparse: no disk, reads as zeros
      writeAt(path, head.byteLength, new Uint8Array(new Float32Array([1.5, -2, 3, 4]).buffer));

      const before = process.memoryUsage();
      const file = await readSafetensorsFile(path);
      expect(file.info('big')).to.deep.equal({ dtype: 'U8', shape: [big] });
      const t = await file.tensor('small');
      const after = process.memoryUsage();
      expect(Array.from(t.dataSync())).to.deep.equal([1.5, -2, 3, 4]);
      t.dispose();
      const rss = (after.rss - before.rss) / 2 ** 20;
      const buffers = (after.arrayBuffers - before.arrayBuffers) / 2 ** 20;
      expect(rss, `RSS grew by ${rss.toFixed(1)} MiB`).to.be.below(16);
      expect(buffers, `arrayBuffers grew by ${buffers.toFixed(1)} MiB`).to.be.below(1);
      rmSync(path);
    });

    it('opens a file over 4 GiB (more than one Node buffer can hold) and reads its small tensor', async () => {
      const path = join(dir, 'huge.safetensors');
      const big = 5 * 2 ** 30;
      const head = headerOnly({ small: { dtype: 'I32', shape: [2], data_offsets: [big, big + 8] }, big: { dtype: 'U8', shape: [big], data_offsets: [0, big] } });
      writeFileSync(path, head);
      truncateSync(path, head.byteLength + big + 8);
      writeAt(path, head.byteLength + big, new Uint8Array(new Int32Array([7, -9]).buffer));
      const before = process.memoryUsage().rss;
      const file = await readSafetensorsFile(path);
      expect(file.names()).to.deep.equal(['big', 'small']);
      expect(file.info('big').shape).to.deep.equal([big]);
      const t = await file.tensor('small');
      expect(Array.from(t.dataSync())).to.deep.equal([7, -9]);
      t.dispose();
      expect((process.memoryUsage().rss - before) / 2 ** 20).to.be.below(16);
      const u8 = await rejection(file.tensor('big'));
      expect(u8.message).to.equal(`safetensors file '${path}': tensor 'big' has dtype U8, which cannot be decoded; ` +
          'supported: F32, F16, BF16, F8_E4M3, I32, I64');
      rmSync(path);
    });

    it('leaves no file descriptor open, and refuses a file that changed size since its header was read', async () => {
      const path = join(dir, 'changing.safetensors');
      const tensors = { a: tf.tensor([1, 2, 3]), b: tf.tensor([4, 5]) };
      writeFileSync(path, await encodeSafetensors(tensors));
      tf.dispose(Object.values(tensors));
      const fds = () => readdirSync('/proc/self/fd').length;
      const open = fds();
      const file = await readSafetensorsFile(path);
      for (let i = 0; i < 20; i++) tf.dispose(await Promise.all([file.tensor('a'), file.tensor('b')]));
      await rejection(file.tensor('nope'));
      expect(fds(), 'open descriptors').to.equal(open);

      const other = { a: tf.tensor([9, 9, 9, 9]), b: tf.tensor([4, 5]) };
      writeFileSync(path, await encodeSafetensors(other));
      tf.dispose(Object.values(other));
      const before = tf.memory().numTensors;
      const e = await rejection(file.tensor('b'));
      expect(e).to.be.instanceOf(MoELoraError);
      expect(e.message).to.match(new RegExp(`^safetensors file '${path}' is \\d+ bytes but must be \\d+$`));
      expect(tf.memory().numTensors).to.equal(before);
      expect(fds(), 'open descriptors').to.equal(open);
    });
  });
});
