/**
 * A fixture checkpoint converted to 16-bit the way `model.to(torch.bfloat16)` does it (values
 * rounded to nearest even), written as a BF16/F16 safetensors file, beside the same rounded
 * values as an F32 file: the two must load to the same model.
 *
 * The 16-bit file is encoded here, by the safetensors format (header length, JSON header, data),
 * not by the package's writer: the loader's specs then do not rest on the writer they also test.
 */
import * as tf from '@tensorflow/tfjs-core';
import { copyFile, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { readSafetensorsFile, writeSafetensorsFile } from '../../src/io/safetensors.js';
import { bfloat16Bits, float16Bits, type PackedKind } from '../../src/ops/packed.js';

/** A safetensors file of 16-bit tensors (given as bits, with their shapes). */
export function encodeHalfSafetensors(kind: PackedKind, tensors: Record<string, { bits: Uint16Array; shape: number[] }>): Uint8Array {
  const names = Object.keys(tensors).sort();
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let offset = 0;
  for (const name of names) {
    const n = tensors[name].bits.length;
    header[name] = { dtype: kind === 'bf16' ? 'BF16' : 'F16', shape: tensors[name].shape, data_offsets: [offset, offset + 2 * n] };
    offset += 2 * n;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  const headerLength = Math.ceil(json.byteLength / 8) * 8;
  const out = new Uint8Array(8 + headerLength + offset);
  const view = new DataView(out.buffer);
  view.setBigUint64(0, BigInt(headerLength), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.byteLength, 8 + headerLength);
  let at = 8 + headerLength;
  for (const name of names) {
    for (const b of tensors[name].bits) { view.setUint16(at, b, true); at += 2; }
  }
  return out;
}

/**
 * Writes `dir16` (the fixture's tensors in `kind`, config.json saying so) and `dir32` (the same
 * rounded values as F32) from the fixture folder `fixture`.
 */
export async function writeHalfFixture(fixture: string, kind: PackedKind, dir16: string, dir32: string): Promise<void> {
  const file = await readSafetensorsFile(join(fixture, 'model.safetensors'));
  const encode = kind === 'bf16' ? bfloat16Bits : float16Bits;
  const halves: Record<string, { bits: Uint16Array; shape: number[] }> = {};
  const rounded: Record<string, tf.Tensor> = {};
  const table = new Float32Array(1);
  for (const name of file.names()) {
    const t = await file.tensor(name);
    if (t.dtype === 'float32') {
      const bits = Uint16Array.from(t.dataSync(), v => encode(v));
      halves[name] = { bits, shape: t.shape };
      // the rounded values, decoded by an independent path: bf16 as the high half of an f32, f16 by its formula
      const values = new Float32Array(bits.length);
      for (let i = 0; i < bits.length; i++) {
        const h = bits[i];
        if (kind === 'bf16') {
          new Uint32Array(table.buffer)[0] = h << 16;
          values[i] = table[0];
        } else {
          const e = (h >> 10) & 0x1f;
          const m = h & 0x3ff;
          values[i] = (h & 0x8000 ? -1 : 1) * (e === 0 ? m * 2 ** -24 : (1 + m / 1024) * 2 ** (e - 15));
        }
      }
      rounded[name] = tf.tensor(values, t.shape);
    }
    t.dispose();
  }
  const config = JSON.parse(await import('node:fs/promises').then(fs => fs.readFile(join(fixture, 'config.json'), 'utf8')));
  await mkdir(dir16, { recursive: true });
  await mkdir(dir32, { recursive: true });
  await writeFile(join(dir16, 'model.safetensors'), encodeHalfSafetensors(kind, halves));
  await writeFile(join(dir16, 'config.json'), JSON.stringify({ ...config, dtype: kind === 'bf16' ? 'bfloat16' : 'float16' }));
  await writeSafetensorsFile(join(dir32, 'model.safetensors'), rounded, { format: 'pt' });
  await copyFile(join(fixture, 'config.json'), join(dir32, 'config.json'));
  tf.dispose(Object.values(rounded));
}
