/**
 * Block-scaled FP8 checkpoints (DeepSeek-V3's Hub format): e4m3fn decoding against the values the
 * OCP FP8 spec lists; a deepseek_v3 checkpoint quantized here (weights in float8_e4m3fn, one
 * weight_scale_inv per 16 × 16 block, partial blocks included) loads as the float32 model of its
 * dequantized values; every malformed FP8 setting or tensor is one clear CheckpointError.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { copyFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { hfConfigOf } from '../../src/layers/moe_causal_lm.js';
import { decodeFloat8E4M3 } from '../../src/util/float8.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { rejection } from '../helpers/rejection.js';
import { cleanup, fixtureConfig, fixtureDir, golden, readAll, tempDir } from './checkpoint_helpers.js';

/** The finite e4m3fn values, written out from the format's definition (bias 7, no infinities). */
function e4m3Finite(): Array<{ bits: number; value: number }> {
  const out: Array<{ bits: number; value: number }> = [];
  for (let bits = 0; bits < 0x7f; bits++) {
    const e = bits >> 3;
    const m = bits & 7;
    out.push({ bits, value: e === 0 ? (m / 8) * Math.pow(2, -6) : (1 + m / 8) * Math.pow(2, e - 7) });
  }
  return out;
}

/** The nearest e4m3fn code of v (|v| <= 448). */
function toE4M3(v: number, table: Array<{ bits: number; value: number }>): number {
  let best = table[0];
  for (const t of table) if (Math.abs(Math.abs(v) - t.value) < Math.abs(Math.abs(v) - best.value)) best = t;
  return best.bits | (v < 0 && best.value !== 0 ? 0x80 : 0);
}

interface RawTensor { dtype: string; shape: number[]; bytes: Uint8Array }

/** A safetensors file of raw tensors (the writer of this package writes no F8). */
async function writeRaw(path: string, tensors: Record<string, RawTensor>): Promise<void> {
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const [name, t] of Object.entries(tensors)) {
    header[name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes.length] };
    offset += t.bytes.length;
  }
  let json = JSON.stringify(header);
  while ((8 + json.length) % 8 !== 0) json += ' ';
  const out = new Uint8Array(8 + json.length + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(json.length), true);
  out.set(new TextEncoder().encode(json), 8);
  let at = 8 + json.length;
  for (const t of Object.values(tensors)) { out.set(t.bytes, at); at += t.bytes.length; }
  await writeFile(path, out);
}

const f32Bytes = (v: Float32Array) => new Uint8Array(v.buffer.slice(0));
const BLOCK = 16;

/**
 * The deepseek_v3 fixture with every linear weight of the decoder (attention, dense MLP, experts,
 * shared experts) quantized as the Hub stores it; also the float32 checkpoint of the values it means.
 */
async function quantizedFixture() {
  const all = await readAll(join(fixtureDir('deepseek_v3'), 'model.safetensors'));
  const table = e4m3Finite();
  const fp8: Record<string, RawTensor> = {};
  const meant: Record<string, RawTensor> = {};
  for (const [name, t] of Object.entries(all)) {
    const values = t.dataSync() as Float32Array;
    if (!/\.layers\.\d+\..*proj(_with_mqa)?\.weight$/.test(name)) {
      fp8[name] = meant[name] = { dtype: 'F32', shape: t.shape, bytes: f32Bytes(Float32Array.from(values)) };
      continue;
    }
    const [rows, cols] = t.shape;
    const [br, bc] = [Math.ceil(rows / BLOCK), Math.ceil(cols / BLOCK)];
    const scales = new Float32Array(br * bc);
    for (let i = 0; i < rows; i++) {
      for (let j = 0; j < cols; j++) {
        const s = Math.floor(i / BLOCK) * bc + Math.floor(j / BLOCK);
        scales[s] = Math.max(scales[s], Math.abs(values[i * cols + j]) / 448);
      }
    }
    const codes = new Uint8Array(rows * cols);
    const dequantized = new Float32Array(rows * cols);
    for (let i = 0; i < rows; i++) {
      for (let j = 0; j < cols; j++) {
        const s = scales[Math.floor(i / BLOCK) * bc + Math.floor(j / BLOCK)];
        const code = toE4M3(values[i * cols + j] / s, table);
        codes[i * cols + j] = code;
        dequantized[i * cols + j] = (code & 0x80 ? -1 : 1) * table[code & 0x7f].value * s;
      }
    }
    fp8[name] = { dtype: 'F8_E4M3', shape: t.shape, bytes: codes };
    fp8[`${name}_scale_inv`] = { dtype: 'F32', shape: [br, bc], bytes: f32Bytes(scales) };
    meant[name] = { dtype: 'F32', shape: t.shape, bytes: f32Bytes(dequantized) };
  }
  tf.dispose(Object.values(all));
  return { fp8, meant };
}

const FP8_CONFIG = { quant_method: 'fp8', fmt: 'e4m3', activation_scheme: 'dynamic', weight_block_size: [BLOCK, BLOCK] };

async function checkpoint(tensors: Record<string, RawTensor>, quantization: unknown): Promise<string> {
  const dir = await tempDir('fp8-');
  const config = { ...(await fixtureConfig('deepseek_v3')), ...(quantization === undefined ? {} : { quantization_config: quantization }) };
  await writeFile(join(dir, 'config.json'), JSON.stringify(config));
  await writeRaw(join(dir, 'model.safetensors'), tensors);
  await copyFile(join(fixtureDir('deepseek_v3'), 'generation_config.json'), join(dir, 'generation_config.json'));
  return dir;
}

describe('io/fp8_checkpoint: block-scaled FP8 weights decoded on load', () => {
  after(cleanup);

  it('decodes e4m3fn as the OCP FP8 spec defines it', () => {
    const got = decodeFloat8E4M3(Uint8Array.of(0x00, 0x80, 0x01, 0x07, 0x08, 0x38, 0x3c, 0x40, 0x7e, 0xfe, 0xb8, 0x7f, 0xff));
    expect(Array.from(got.slice(0, 11))).to.deep.equal([0, -0, 2 ** -9, 7 * 2 ** -9, 2 ** -6, 1, 1.5, 2, 448, -448, -1]);
    expect(Number.isNaN(got[11]) && Number.isNaN(got[12])).to.equal(true);
    const positive = decodeFloat8E4M3(Uint8Array.from({ length: 0x7f }, (_, i) => i));
    expect(Array.from(positive)).to.deep.equal(e4m3Finite().map(t => t.value));
  });

  it('an FP8 deepseek_v3 checkpoint gives the logits of the float32 checkpoint of its dequantized weights', async () => {
    const { fp8, meant } = await quantizedFixture();
    const [fp8Dir, meantDir] = [await checkpoint(fp8, FP8_CONFIG), await checkpoint(meant, undefined)];
    const g = await golden('deepseek_v3');
    const ids = await g.tensor('input_ids');
    const reference = await loadHFCheckpoint(meantDir);
    const before = tf.memory().numTensors;
    const model = await loadHFCheckpoint(fp8Dir);
    expect(hfConfigOf(model)!['quantization_config']).to.equal(undefined);  // a plain float32 model now
    const [a, b] = [model.predict(ids) as tf.Tensor, reference.predict(ids) as tf.Tensor];
    expect(maxRelativeError(a.dataSync(), b.dataSync())).to.equal(0);
    // quantizing changed the weights: the check above is not base against base
    const unquantized = await g.tensor('logits');
    expect(maxRelativeError(a.dataSync(), unquantized.dataSync())).to.be.above(1e-4);
    tf.dispose([a, b, unquantized]);
    model.dispose();
    expect(tf.memory().numTensors).to.equal(before);
    reference.dispose();
    ids.dispose();
    // the stored scales are what the file holds: read back as written
    const file = await readSafetensorsFile(join(fp8Dir, 'model.safetensors'));
    expect(file.info('model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv')).to.deep.equal({ dtype: 'F32', shape: [3, 4] });
  });

  it('refuses other quantizations and malformed FP8 tensors, each in one CheckpointError', async () => {
    const { fp8 } = await quantizedFixture();
    const name = 'model.layers.1.self_attn.o_proj.weight';
    const first = 'model.layers.0.self_attn.q_proj.weight';
    const cases: Array<[Record<string, RawTensor>, unknown, string]> = [
      [fp8, { quant_method: 'gptq' }, `config.json's quantization_config has quant_method "gptq" (string); only block-scaled 'fp8' (DeepSeek-V3's format) is decoded`],
      [fp8, 'fp8', `config.json's quantization_config must be an object but got "fp8" (string)`],
      [fp8, { ...FP8_CONFIG, fmt: 'e5m2' }, `config.json's quantization_config has fmt "e5m2" (string); only 'e4m3' (float8_e4m3fn) is decoded`],
      [fp8, { ...FP8_CONFIG, weight_block_size: [16] }, `config.json's quantization_config must have weight_block_size [rows, columns] of integers >= 1 but has an array of length 1`],
      [fp8, { ...FP8_CONFIG, weight_block_size: [32, 32] },  // the first FP8 tensor in the checks' order
        `FP8 tensor '${first}' of shape [96,64] needs '${first}_scale_inv' of shape [3,2] (blocks of 32 × 32) but it has [6,4]`],
      [Object.fromEntries(Object.entries(fp8).filter(([n]) => n !== `${name}_scale_inv`)), FP8_CONFIG,
        `FP8 tensor '${name}' has no scale tensor '${name}_scale_inv'`],
      [{ ...fp8, [`${name}_scale_inv`]: { dtype: 'I32', shape: [4, 4], bytes: new Uint8Array(64) } }, FP8_CONFIG,
        `FP8 tensor '${name}' needs a float '${name}_scale_inv' (F32, BF16, F16) but it is I32`],
      [{ ...fp8, 'model.norm.weight': { dtype: 'F8_E4M3', shape: [64], bytes: new Uint8Array(64) } }, FP8_CONFIG,
        "FP8 tensor 'model.norm.weight' must be 2-D [out, in] (scaled per block) but has shape [64]"],
    ];
    for (const [tensors, quantization, message] of cases) {
      const dir = await checkpoint(tensors, quantization);
      const before = tf.memory().numTensors;
      const e = await rejection(loadHFCheckpoint(dir));
      expect(e.name, message).to.equal('CheckpointError');
      expect(e.message, message).to.contain(`'${dir}': ${message}`);
      expect(tf.memory().numTensors).to.equal(before);
    }
    // without a quantization_config, FP8 tensors are not float weights this package can use as they are
    const raw = await rejection(loadHFCheckpoint(await checkpoint(fp8, undefined)));
    expect(raw.message).to.contain(`'${name}' must be a float tensor (F32, F16, BF16) but is F8_E4M3`);
  });
});
