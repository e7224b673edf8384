/**
 * The streaming safetensors writer: the reference implementation's layout (the same bytes as
 * encodeSafetensors, which matches files transformers wrote), BF16 / F16 rounded to nearest even
 * (checked against every pair of neighbouring 16-bit values, computed in float64), argument checks;
 * and positional reads of tensors past the 2 GiB and 4 GiB offsets of a sparse file.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { closeSync, mkdtempSync, openSync, rmSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  decodeBFloat16, decodeFloat16, encodeBFloat16, encodeFloat16, encodeSafetensors, readSafetensorsFile,
  SafetensorsError, writeSafetensorsStream, type SafetensorsStreamTensor,
} from '../../src/io/safetensors.js';
import { rejection } from '../helpers/rejection.js';

/** f32 values and their bit patterns, for exact comparisons (NaN included). */
const bitsOf = (values: Float32Array) => Array.from(new Uint32Array(values.slice().buffer));
const f32 = (...v: number[]) => new Float32Array(v);

/** Every finite non-negative 16-bit value of a format, in increasing order (16-bit patterns 0..top). */
function ladder(decode: (bits: Uint16Array) => Float32Array, top: number): Float32Array {
  return decode(Uint16Array.from({ length: top + 1 }, (_, i) => i));
}

/**
 * For each pair of neighbours (lo, hi) of a format: the midpoint must go to the one with an even
 * pattern, the next float32 above the midpoint to hi, the one below to lo. Midpoints and their
 * float32 neighbours are computed in float64 and are exact in float32 for both formats.
 */
function expectRoundsToNearestEven(encode: (v: Float32Array) => Uint16Array, values: Float32Array): void {
  const n = values.length - 1;
  const mid = new Float32Array(n);
  const above = new Float32Array(n);
  const below = new Float32Array(n);
  const step = (x: number, dir: 1 | -1) => {
    const b = new Uint32Array(new Float32Array([x]).buffer);
    b[0] += dir;
    return new Float32Array(b.buffer)[0];
  };
  for (let i = 0; i < n; i++) {
    const m = (values[i] + values[i + 1]) / 2;
    expect(Math.fround(m), `midpoint ${i} exact in float32`).to.equal(m);
    mid[i] = m;
    above[i] = step(m, 1);
    below[i] = i === 0 ? 0 : step(m, -1);
  }
  const [em, ea, eb] = [encode(mid), encode(above), encode(below)];
  for (let i = 0; i < n; i++) {
    const even = i % 2 === 0 ? i : i + 1;
    if (em[i] !== even || ea[i] !== i + 1 || eb[i] !== i) {
      expect([em[i], ea[i], eb[i]], `neighbours ${i}, ${i + 1} (${values[i]}, ${values[i + 1]})`).to.deep.equal([even, i + 1, i]);
    }
  }
}

describe('io/safetensors writer (streamed, BF16/F16 rounding)', () => {
  let dir: string;
  before(() => { dir = mkdtempSync(join(tmpdir(), 'st-writer-')); });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('writes F32 and I32 tensors with the same bytes as encodeSafetensors (the reference layout)', async () => {
    const tensors = {
      'b.weight': tf.tensor2d([[1, -2.5], [3, 1e-30]]),
      'a.bias': tf.tensor1d([0.1, 0.2, 0.3]),
      ids: tf.tensor1d([7, -9, 2147483647], 'int32'),
      empty: tf.zeros([0, 4]),
    };
    const before = tf.memory().numTensors;
    const path = join(dir, 'same.safetensors');
    const stream: SafetensorsStreamTensor[] = Object.entries(tensors).map(([name, t]) => ({
      name, dtype: t.dtype === 'int32' ? 'I32' : 'F32', shape: t.shape, values: () => t.dataSync() as Float32Array | Int32Array,
    }));
    const size = await writeSafetensorsStream(path, stream, { format: 'pt' });
    const written = await readFile(path);
    expect(written.equals(Buffer.from(await encodeSafetensors(tensors, { format: 'pt' })))).to.equal(true);
    expect(size).to.equal(written.byteLength);
    expect(tf.memory().numTensors).to.equal(before);
    tf.dispose(Object.values(tensors));
  });

  it('writes BF16 and F16 in the reference order (F32, I32, BF16, F16, then names) and reads back exactly', async () => {
    const path = join(dir, 'mixed.safetensors');
    const exactBF16 = f32(1, -2, 0.5, 3.140625, -0, 2 ** -130);      // representable in bfloat16
    const exactF16 = f32(1, -2, 0.5, 65504, 2 ** -24, 0.0999755859375);  // representable in float16
    await writeSafetensorsStream(path, [
      { name: 'z_f16', dtype: 'F16', shape: [2, 3], values: () => exactF16 },
      { name: 'a_bf16', dtype: 'BF16', shape: [6], values: async () => exactBF16 },
      { name: 'm_f32', dtype: 'F32', shape: [1], values: () => f32(0.1) },
      { name: 'n_i32', dtype: 'I32', shape: [1], values: () => new Int32Array([5]) },
    ]);
    const bytes = await readFile(path);
    const headerLength = Number(bytes.readBigUInt64LE(0));
    const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8')) as Record<string, { dtype: string; data_offsets: number[] }>;
    expect(Object.keys(header)).to.deep.equal(['m_f32', 'n_i32', 'a_bf16', 'z_f16']);
    expect(header['a_bf16']).to.deep.equal({ dtype: 'BF16', shape: [6], data_offsets: [8, 20] });
    expect(header['z_f16']).to.deep.equal({ dtype: 'F16', shape: [2, 3], data_offsets: [20, 32] });
    const file = await readSafetensorsFile(path);
    const [a, z] = [await file.tensor('a_bf16'), await file.tensor('z_f16')];
    expect(bitsOf(a.dataSync() as Float32Array)).to.deep.equal(bitsOf(exactBF16));
    expect(bitsOf(z.dataSync() as Float32Array)).to.deep.equal(bitsOf(exactF16));
    tf.dispose([a, z]);
  });

  it('rounds float32 to bfloat16 to nearest, ties to even, at every pair of neighbouring bfloat16 values', () => {
    expectRoundsToNearestEven(encodeBFloat16, ladder(decodeBFloat16, 0x7f7f));  // 0 .. largest finite
    const negative = encodeBFloat16(f32(-1 - 2 ** -8, -1 - 3 * 2 ** -8, -(2 ** -134)));
    expect(Array.from(negative)).to.deep.equal([0xbf80, 0xbf82, 0x8000]);
    // beyond the largest finite value, past its half-step: infinity; NaN stays NaN (torch's 0x7FC0)
    expect(Array.from(encodeBFloat16(f32(3.4028234663852886e38, Infinity, -Infinity, NaN)))).to.deep.equal([0x7f80, 0x7f80, 0xff80, 0x7fc0]);
    expect(Array.from(encodeBFloat16(f32(3.3895313892515355e38)))).to.deep.equal([0x7f7f]);
  });

  it('rounds float32 to float16 to nearest, ties to even, at every pair of neighbouring float16 values', () => {
    expectRoundsToNearestEven(encodeFloat16, ladder(decodeFloat16, 0x7bff));  // 0, subnormals, normals .. 65504
    const cases = encodeFloat16(f32(65519.99, 65520, 1e6, -1e6, Infinity, NaN, 2 ** -25, 2 ** -25 * 1.0001, -(2 ** -26), -1.5));
    expect(Array.from(cases)).to.deep.equal([0x7bff, 0x7c00, 0x7c00, 0xfc00, 0x7c00, 0x7e00, 0x0000, 0x0001, 0x8000, 0xbe00]);
  });

  it('encodes many values in chunks with the same result as one call (a tensor larger than a chunk)', async () => {
    const n = (1 << 22) + 5;
    const values = new Float32Array(n);
    for (let i = 0; i < n; i++) values[i] = Math.sin(i) * 1000;
    const path = join(dir, 'chunks.safetensors');
    await writeSafetensorsStream(path, [{ name: 'w', dtype: 'BF16', shape: [n], values: () => values }]);
    const bytes = await readFile(path);
    const headerLength = Number(bytes.readBigUInt64LE(0));
    const data = bytes.subarray(8 + headerLength);
    expect(Buffer.from(encodeBFloat16(values).buffer).equals(data)).to.equal(true);
  });

  it('refuses bad arguments with one clear message naming the tensor', async () => {
    const p = join(dir, 'bad.safetensors');
    const one = (over: Partial<SafetensorsStreamTensor>) =>
      rejection(writeSafetensorsStream(p, [{ name: 'w', dtype: 'F32', shape: [2], values: () => f32(1, 2), ...over }]));
    expect((await one({ values: () => f32(1, 2, 3) })).message).to.equal(
        "`writeSafetensorsStream()`: tensor 'w' (F32, shape [2]) needs 2 values (Float32Array) but values() gave 3 values (Float32Array)");
    expect((await one({ dtype: 'I32' })).message).to.match(/tensor 'w' \(I32, shape \[2\]\) needs 2 values \(Int32Array\) but values\(\) gave 2 values \(Float32Array\)/);
    expect((await one({ dtype: 'F64' as 'F32' })).message).to.equal(
        "`writeSafetensorsStream()`: tensor 'w' has dtype \"F64\" (string); writable: F32, I32, BF16, F16");
    expect((await one({ shape: [-1] })).message).to.match(/tensor 'w' must have a shape of non-negative integers but got/);
    expect((await one({ name: '__metadata__' })).message).to.equal(
        "`writeSafetensorsStream()`: '__metadata__' is reserved and cannot name a tensor");
    expect((await one({ values: 3 as unknown as () => Float32Array })).message).to.match(/tensor 'w' must have a values\(\) function but has/);
    const twice = await rejection(writeSafetensorsStream(p, [
      { name: 'w', dtype: 'F32', shape: [1], values: () => f32(1) }, { name: 'w', dtype: 'F32', shape: [1], values: () => f32(1) }]));
    expect(twice).to.be.instanceOf(SafetensorsError);
    expect(twice.message).to.equal("`writeSafetensorsStream()`: tensor 'w' is given twice");
    expect((await one({ name: 7 as unknown as string })).message).to.equal(
        '`writeSafetensorsStream()`: tensor names must be strings but got 7 (number)');
    expect((await rejection(writeSafetensorsStream(p, [], { format: 5 as unknown as string }))).message).to.equal(
        "`writeSafetensorsStream()`: metadata 'format' must be a string but got number");
    expect((await rejection(writeSafetensorsStream('', []))).message).to.match(/'path' must be a file path but got/);
    expect((await rejection(writeSafetensorsStream(p, {} as SafetensorsStreamTensor[]))).message).to.match(/'tensors' must be an array/);
  });

  it('reads tensors placed past the 2 GiB and 4 GiB offsets of a sparse file exactly (F32 and BF16)', async () => {
    const path = join(dir, 'sparse.safetensors');
    const gap = 2 ** 31 + 12;  // bytes of zeros (a U8 tensor) between the tensors
    const header = {
      past2: { dtype: 'F32', shape: [3], data_offsets: [gap, gap + 12] },
      gap2: { dtype: 'U8', shape: [gap], data_offsets: [0, gap] },
      past4: { dtype: 'BF16', shape: [4], data_offsets: [2 * gap + 12, 2 * gap + 20] },
      gap4: { dtype: 'U8', shape: [gap], data_offsets: [gap + 12, 2 * gap + 12] },
    };
    const text = Buffer.from(JSON.stringify(header));
    const head = Buffer.alloc(8 + text.byteLength);
    head.writeBigUInt64LE(BigInt(text.byteLength), 0);
    text.copy(head, 8);
    writeFileSync(path, head);
    const dataStart = head.byteLength;
    truncateSync(path, dataStart + 2 * gap + 20);  // sparse: the holes take no disk
    const fd = openSync(path, 'r+');
    const p2 = f32(1.5, -2.25, 1e-20);
    const p4 = new Uint16Array([0x3f80, 0xc040, 0x7f80, 0x0001]);
    writeSync(fd, new Uint8Array(p2.buffer), 0, 12, dataStart + gap);
    writeSync(fd, new Uint8Array(p4.buffer), 0, 8, dataStart + 2 * gap + 12);
    closeSync(fd);
    expect(dataStart + 2 * gap + 12).to.be.above(2 ** 32);
    const rss = process.memoryUsage().rss;
    const file = await readSafetensorsFile(path);
    const [a, b] = [await file.tensor('past2'), await file.tensor('past4')];
    expect(bitsOf(a.dataSync() as Float32Array)).to.deep.equal(bitsOf(p2));
    expect(bitsOf(b.dataSync() as Float32Array)).to.deep.equal(bitsOf(decodeBFloat16(p4)));
    expect((process.memoryUsage().rss - rss) / 2 ** 20, 'RSS growth in MiB').to.be.below(16);
    tf.dispose([a, b]);
    rmSync(path);
  });
});
