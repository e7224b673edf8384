/**
 * Loading a checkpoint on webgpu puts every weight straight on the device (src/io/device_tensor.ts):
 * the values equal the file's (read back asynchronously), no weight is left on the host for its
 * first use, fused expert stacks written expert by expert land where they belong (float32, packed
 * bf16, int4, the gpt-oss layout), and a load that fails mid-stack frees the stack's buffer.
 * Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { deviceTensor, hostValueBytes, onDevice, readHalfWordsToDevice, readToDevice, TensorBuilder } from '../../../src/io/device_tensor.js';
import { loadMoEBlockWeights, type TensorSource } from '../../../src/io/hf_block.js';
import { CheckpointSource } from '../../../src/io/hf_checkpoint_core.js';
import type { HFConfig } from '../../../src/models/families.js';
import { disposeMoEBlockWeights } from '../../../src/models/weight_fields.js';
import { rejection } from '../../helpers/rejection.js';
import { loadHFCheckpoint } from '../../../src/io/hf_checkpoint.js';
import { encodeFloat16, readSafetensorsFile, type SafetensorsFile } from '../../../src/io/safetensors.js';
import { sparseMoELayers, type MoECausalLM } from '../../../src/layers/moe_causal_lm.js';
import { variableFloat32 } from '../../../src/layers/sparse_moe.js';
import { isPackedExpertWeight, packExpertWeight } from '../../../src/ops/packed.js';
import { encodeHalfSafetensors, writeHalfFixture } from '../../helpers/half_checkpoint.js';
import { writeFile } from 'node:fs/promises';
import { cleanup, fixtureDir, tempDir, writeCheckpoint } from '../../io/checkpoint_helpers.js';

const dirs = { olmoe16: '', olmoe32: '', gptOss16: '', gptOss32: '' };

/** Concatenates the float32 values of `names` (each a [rows, cols] tensor) in order: a fused stack by hand. */
async function stacked(file: SafetensorsFile, names: string[]): Promise<Float32Array> {
  const parts: Float32Array[] = [];
  for (const name of names) {
    const t = await file.tensor(name);
    parts.push(await t.data() as Float32Array);
    t.dispose();
  }
  const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

/** The olmoe fixture's layer-`layer` gate_up [E, 2I, H] (gate rows then up rows per expert) and down, from `file`. */
function olmoeExpertNames(layer: number, experts: number) {
  const at = (e: number, w: string) => `model.layers.${layer}.mlp.experts.${e}.${w}.weight`;
  const es = Array.from({ length: experts }, (_, e) => e);
  return { gateUp: es.flatMap(e => [at(e, 'gate_proj'), at(e, 'up_proj')]), down: es.map(e => at(e, 'down_proj')) };
}

async function valuesOf(t: tf.Tensor): Promise<Float32Array> {
  return await t.data() as Float32Array;
}

function expectAllOnDevice(model: MoECausalLM): void {
  for (const w of model.weights) expect(hostValueBytes(w.read()), w.originalName).to.equal(0);
}

describe('webgpu: loading a checkpoint straight to the device', function () {
  this.timeout(120_000);

  before(async function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    dirs.olmoe16 = await tempDir();
    dirs.olmoe32 = await tempDir();
    dirs.gptOss16 = await tempDir();
    dirs.gptOss32 = await tempDir();
    await writeHalfFixture(fixtureDir('olmoe'), 'bf16', dirs.olmoe16, dirs.olmoe32);
    await writeHalfFixture(fixtureDir('gpt_oss'), 'bf16', dirs.gptOss16, dirs.gptOss32);
  });
  after(cleanup);

  it('a tf.tensor is left on the host by tfjs-backend-webgpu until first use; onDevice and deviceTensor put it on the device', async () => {
    const before = tf.memory().numTensors;
    const values = Float32Array.from({ length: 1000 }, (_, i) => Math.sin(i));
    const plain = tf.tensor(values, [10, 100]);
    expect(hostValueBytes(plain)).to.equal(4000);   // what the loader must not leave behind
    const moved = await onDevice(plain);
    expect(plain.isDisposed).to.equal(true);
    expect(hostValueBytes(moved)).to.equal(0);
    expect(Array.from(await valuesOf(moved))).to.deep.equal(Array.from(values));
    expect(await onDevice(moved)).to.equal(moved);  // already on the device: the same tensor
    const ints = await deviceTensor(Int32Array.from([1, -2, 2147483647]), [3], 'int32');
    expect(hostValueBytes(ints)).to.equal(0);
    expect(Array.from(await ints.data())).to.deep.equal([1, -2, 2147483647]);
    tf.dispose([moved, ints]);
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('a TensorBuilder writes pieces into one device buffer; disposed unfinished, it frees the buffer', async () => {
    const gpuBytes = () => (tf.memory() as unknown as { numBytesInGPU: number }).numBytesInGPU;
    const before = { tensors: tf.memory().numTensors, gpu: gpuBytes() };
    const stack = new TensorBuilder([3, 2, 2], 'float32');
    for (let e = 2; e >= 0; e--) await stack.write(Float32Array.from([1, 2, 3, 4], v => 10 * e + v), 4 * e);
    const t = await stack.finish();
    expect(t.shape).to.deep.equal([3, 2, 2]);
    expect(Array.from(await t.data())).to.deep.equal([1, 2, 3, 4, 11, 12, 13, 14, 21, 22, 23, 24]);
    t.dispose();
    const abandoned = new TensorBuilder([1024, 256], 'int32');
    await abandoned.write(new Int32Array(256).fill(7), 0);
    abandoned.dispose();
    expect({ tensors: tf.memory().numTensors, gpu: gpuBytes() }).to.deep.equal(before);
  });

  it('a TensorBuilder copies writes longer than an upload buffer (16 MiB) and more writes than there are upload buffers', async () => {
    // 3·2^22 + 5 int32 (48 MiB + 20 bytes): a 40 MiB write (three copies, the last short) at element 5,
    // then 5 elements at 0, then the rest in 1000 small writes, each waiting only for a free upload buffer
    const n = 3 * 2 ** 22 + 5;
    const expected = Int32Array.from({ length: n }, (_, i) => (i * 2654435761) | 0);
    const before = tf.memory().numTensors;
    const stack = new TensorBuilder([n], 'int32');
    const big = 10 * 2 ** 20;
    await stack.write(expected.slice(5, 5 + big), 5);
    await stack.write(expected.slice(0, 5), 0);
    const rest = n - 5 - big;
    const step = Math.ceil(rest / 1000);
    for (let at = 5 + big; at < n; at += step) await stack.write(expected.slice(at, Math.min(n, at + step)), at);
    const t = await stack.finish();
    expect(hostValueBytes(t)).to.equal(0);
    const got = await t.data() as Int32Array;
    t.dispose();
    expect(tf.memory().numTensors).to.equal(before);
    let mismatches = 0;
    for (let i = 0; i < n; i++) if (got[i] !== expected[i]) mismatches++;
    expect(mismatches).to.equal(0);
  });

  it('readToDevice decodes a 16-bit tensor into its device buffer in pieces: every piece where it belongs', async () => {
    // 2^22 + 3 elements: a whole 4 Mi-element piece and a short one; f16 here (bf16 is the loads below)
    const n = 2 ** 22 + 3;
    const values = Float32Array.from({ length: n }, (_, i) => Math.fround(((i * 7919) % 4001 - 2000) / 1024));
    const dir = await tempDir();
    const path = join(dir, 'big.safetensors');
    await writeFile(path, encodeHalfSafetensors('f16', { big: { bits: encodeFloat16(values), shape: [n] } }));
    const file = await readSafetensorsFile(path);
    // the file reads a piece at a time into one array (halfBitsInto); a source without it, whole
    const wholeOnly: TensorSource = {
      has: name => file.has(name), info: name => file.info(name), tensor: name => file.tensor(name), halfBits: name => file.halfBits(name),
    };
    for (const [what, source] of [['pieces read', file], ['whole read', wholeOnly]] as const) {
      const before = tf.memory().numTensors;
      const t = await readToDevice(source, 'big');
      expect(hostValueBytes(t)).to.equal(0);
      const got = await t.data();
      t.dispose();
      expect(tf.memory().numTensors).to.equal(before);
      let mismatches = 0;
      for (let i = 0; i < n; i++) if (got[i] !== values[i]) mismatches++;  // every value is exact in f16
      expect(mismatches, what).to.equal(0);
    }
  });

  it('readHalfWordsToDevice: a dense 16-bit weight\'s halves read into its words on the device over upload buffers; odd rows, a failed read', async () => {
    // [2051, 4096] halves: 4200448 words, more than one 16 MiB upload buffer; bits that say where they are
    const [rows, cols] = [2051, 4096];
    const bits = Uint16Array.from({ length: rows * cols }, (_, i) => (i * 40503) & 0xffff);
    const path = join(await tempDir(), 'dense.safetensors');
    await writeFile(path, encodeHalfSafetensors('bf16', { w: { bits, shape: [rows, cols] }, odd: { bits: bits.subarray(0, 9), shape: [3, 3] } }));
    const file = await readSafetensorsFile(path);
    const before = tf.memory().numTensors;
    const t = await readHalfWordsToDevice(file, 'w', [rows, cols]);
    expect([t.shape, t.dtype, hostValueBytes(t)]).to.deep.equal([[rows, cols / 2], 'int32', 0]);
    const got = new Uint16Array((await t.data() as Int32Array).buffer);
    t.dispose();
    let mismatches = 0;
    for (let i = 0; i < bits.length; i++) if (got[i] !== bits[i]) mismatches++;
    expect(mismatches).to.equal(0);
    expect(tf.memory().numTensors).to.equal(before);
    // an odd row needs its padding half (packedDenseWordsOf), a source without halfBitsInto a whole read per piece
    expect((await rejection(readHalfWordsToDevice(file, 'odd', [3, 3]))).message).to.equal(
        "readHalfWordsToDevice: 'odd' needs an even row and a source with halfBitsInto but has 3 columns");
    const wholeOnly: TensorSource = { has: n => file.has(n), info: n => file.info(n), tensor: n => file.tensor(n), halfBits: n => file.halfBits(n) };
    expect((await rejection(readHalfWordsToDevice(wholeOnly, 'w', [rows, cols]))).message).to.equal(
        `readHalfWordsToDevice: 'w' needs an even row and a source with halfBitsInto but has ${cols} columns and no halfBitsInto`);
    // the second upload buffer's read fails after the first's copy was submitted: nothing left behind
    let reads = 0;
    const failing: TensorSource = {
      ...wholeOnly,
      halfBitsInto: async (n, into, from) => {
        if (reads++ === 1) throw new Error('the disk went away');
        return file.halfBitsInto(n, into, from);
      },
    };
    const gpuBytes = () => (tf.memory() as unknown as { numBytesInGPU: number }).numBytesInGPU;
    const start = { tensors: tf.memory().numTensors, gpu: gpuBytes() };
    expect((await rejection(readHalfWordsToDevice(failing, 'w', [rows, cols]))).message).to.equal('the disk went away');
    expect({ tensors: tf.memory().numTensors, gpu: gpuBytes() }).to.deep.equal(start);
  });

  it('bf16 olmoe as float32: every weight on the device and equal to the file, the stacks fused expert by expert', async () => {
    const before = tf.memory().numTensors;
    const model = await loadHFCheckpoint(dirs.olmoe16, { expertDtype: 'float32' });
    try {
      expectAllOnDevice(model);
      const file = await readSafetensorsFile(join(dirs.olmoe32, 'model.safetensors'));
      const embed = await file.tensor('model.embed_tokens.weight');
      expect(Array.from(await valuesOf(model.getLayer('model.embed_tokens').weights[0].read()))).to.deep.equal(Array.from(await valuesOf(embed)));
      embed.dispose();
      for (const [i, layer] of sparseMoELayers(model).entries()) {
        const names = olmoeExpertNames(i, 8);
        expect(Array.from(await valuesOf(layer.weightVariable('gate_up').read())), `layer ${i} gate_up`)
            .to.deep.equal(Array.from(await stacked(file, names.gateUp)));
        expect(Array.from(await valuesOf(layer.weightVariable('down').read())), `layer ${i} down`)
            .to.deep.equal(Array.from(await stacked(file, names.down)));
      }
    } finally {
      model.dispose();
    }
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('bf16 experts kept packed (per-expert olmoe and fused gpt-oss) decode to the file\'s values', async () => {
    const before = tf.memory().numTensors;
    for (const [dir16, dir32, fused] of [[dirs.olmoe16, dirs.olmoe32, false], [dirs.gptOss16, dirs.gptOss32, true]] as const) {
      const model = await loadHFCheckpoint(dir16);
      try {
        expectAllOnDevice(model);
        const file = await readSafetensorsFile(join(dir32, 'model.safetensors'));
        for (const [i, layer] of sparseMoELayers(model).entries()) {
          expect(layer.expertStorage).to.equal('bf16');
          const names = fused ?
            { gateUp: [`model.layers.${i}.mlp.experts.gate_up_proj`], down: [`model.layers.${i}.mlp.experts.down_proj`] } :
            olmoeExpertNames(i, 8);
          for (const [weight, parts] of [['gate_up', names.gateUp], ['down', names.down]] as const) {
            const decoded = variableFloat32(layer.weightVariable(weight));
            expect(Array.from(await valuesOf(decoded)), `${dir16} layer ${i} ${weight}`).to.deep.equal(Array.from(await stacked(file, parts)));
            decoded.dispose();
          }
        }
      } finally {
        model.dispose();
      }
    }
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('int4 experts quantized on load, expert by expert, equal the whole stack quantized at once', async () => {
    const before = tf.memory().numTensors;
    for (const [dir16, dir32, fused] of [[dirs.olmoe16, dirs.olmoe32, false], [dirs.gptOss16, dirs.gptOss32, true]] as const) {
      const model = await loadHFCheckpoint(dir16, { expertDtype: 'int4', int4GroupSize: 32 });
      try {
        expectAllOnDevice(model);
        const file = await readSafetensorsFile(join(dir32, 'model.safetensors'));
        const layer = sparseMoELayers(model)[0];
        const name = fused ? 'model.layers.0.mlp.experts.down_proj' : undefined;
        const values = name ? await stacked(file, [name]) : await stacked(file, olmoeExpertNames(0, 8).down);
        const shape = name ? file.info(name).shape : [8, 64, 48];
        const whole = tf.tensor3d(values, shape as [number, number, number]);
        const reference = packExpertWeight(whole, 'int4', { groupSize: 32, ...(fused ? { inputAxis: 1 } : {}) });
        expect(Array.from(await layer.weightVariable('down').read().data()), dir16).to.deep.equal(Array.from(await reference.packed.data()));
        tf.dispose([whole, reference.packed]);
      } finally {
        model.dispose();
      }
    }
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('packed experts over an upload buffer (16 MiB) and odd-sized, read straight into it; a failed read mid-stack frees it', async () => {
    // H = I = 2049: gate_up is 4198401 words an expert (two upload buffers, the cut inside up_proj), down
    // 2049² halves (odd: a zero padding half); bf16 bits that say where they are
    const [E, H, I] = [2, 2049, 2049];
    const config = { model_type: 'olmoe', hidden_size: H, intermediate_size: I, num_experts: E, num_experts_per_tok: 1, num_hidden_layers: 1 } as unknown as HFConfig;
    const at = (e: number, w: string) => `model.layers.0.mlp.experts.${e}.${w}.weight`;
    const bitsOf = (seed: number, n: number) => Uint16Array.from({ length: n }, (_, i) => 0x3c00 + ((i * 31 + seed * 977) % 0x300));
    const tensors: Record<string, { bits: Uint16Array; shape: number[] }> = { 'model.layers.0.mlp.gate.weight': { bits: bitsOf(0, E * H), shape: [E, H] } };
    for (let e = 0; e < E; e++) {
      tensors[at(e, 'gate_proj')] = { bits: bitsOf(3 * e + 1, I * H), shape: [I, H] };
      tensors[at(e, 'up_proj')] = { bits: bitsOf(3 * e + 2, I * H), shape: [I, H] };
      tensors[at(e, 'down_proj')] = { bits: bitsOf(3 * e + 3, H * I), shape: [H, I] };
    }
    const path = join(await tempDir(), 'model.safetensors');
    await writeFile(path, encodeHalfSafetensors('bf16', tensors));
    const file = CheckpointSource.single(await readSafetensorsFile(path));
    const wordsOf = (...parts: Uint16Array[]) => {
      const halves = new Uint16Array(2 * Math.ceil(parts.reduce((n, p) => n + p.length, 0) / 2));
      let offset = 0;
      for (const p of parts) { halves.set(p, offset); offset += p.length; }
      return new Int32Array(halves.buffer);
    };
    const before = tf.memory().numTensors;
    const weights = await loadMoEBlockWeights(file, config, 0);
    for (const [key, parts] of [['gateUp', ['gate_proj', 'up_proj']], ['down', ['down_proj']]] as const) {
      const packed = weights.experts[key];
      if (!isPackedExpertWeight(packed)) throw new Error(`${key}: not packed`);
      const got = await packed.packed.data() as Int32Array;
      for (let e = 0; e < E; e++) {
        const expected = wordsOf(...parts.map(w => tensors[at(e, w)].bits));
        const words = got.subarray(e * expected.length, (e + 1) * expected.length);
        let mismatches = 0;
        for (let i = 0; i < expected.length; i++) if (words[i] !== expected[i]) mismatches++;
        expect(mismatches, `${key} expert ${e}`).to.equal(0);
      }
    }
    disposeMoEBlockWeights(weights);
    expect(tf.memory().numTensors).to.equal(before);

    // expert 1's up_proj fails while its gate_proj read, into the same upload buffer, is still under way
    const failing: TensorSource = {
      has: n => file.has(n), info: n => file.info(n), tensor: n => file.tensor(n), halfBits: n => file.halfBits(n),
      halfBitsInto: async (n, into, from) => {
        if (n === at(1, 'up_proj')) throw new Error('the disk went away');
        await new Promise(resolve => setTimeout(resolve, 20));
        return file.halfBitsInto(n, into, from);
      },
    };
    const gpuBytes = () => (tf.memory() as unknown as { numBytesInGPU: number }).numBytesInGPU;
    const start = { tensors: tf.memory().numTensors, gpu: gpuBytes() };
    expect((await rejection(loadMoEBlockWeights(failing, config, 0))).message).to.equal('the disk went away');
    expect({ tensors: tf.memory().numTensors, gpu: gpuBytes() }).to.deep.equal(start);
  });

  it('a load that fails in the middle of a stack leaves no tensor and no device buffer behind', async () => {
    // one expert's down_proj holds a NaN: int4 quantization refuses it after the stack's first experts were written
    const file = await readSafetensorsFile(join(dirs.olmoe32, 'model.safetensors'));
    const tensors: Record<string, tf.Tensor> = {};
    for (const name of file.names()) tensors[name] = await file.tensor(name);
    const bad = 'model.layers.0.mlp.experts.5.down_proj.weight';
    const values = (await tensors[bad].data() as Float32Array).slice();
    values[7] = NaN;
    tensors[bad].dispose();
    tensors[bad] = tf.tensor(values, file.info(bad).shape);
    const dir = await tempDir();
    await writeCheckpoint(dir, JSON.parse(await readFile(join(dirs.olmoe32, 'config.json'), 'utf8')), tensors);
    tf.dispose(Object.values(tensors));
    const gpuBytes = () => (tf.memory() as unknown as { numBytesInGPU: number }).numBytesInGPU;
    const before = { tensors: tf.memory().numTensors, gpu: gpuBytes() };
    let error: Error | undefined;
    try {
      (await loadHFCheckpoint(dir, { expertDtype: 'int4' })).dispose();
    } catch (e) {
      error = e as Error;
    }
    expect(error?.message).to.match(/must be finite to be quantized \(int4\) but holds NaN/);
    expect({ tensors: tf.memory().numTensors, gpu: gpuBytes() }).to.deep.equal(before);
  });
});
