/**
 * bitsandbytes 4-bit / 8-bit checkpoints (src/io/bnb_checkpoint.ts). The checkpoints are written at
 * run time by tools/fixtures/make_bnb_fixture.ts from the mixtral fixture, quantized in float64 JS
 * from bitsandbytes' published algorithm (bitsandbytes itself is not installed here), with what
 * bitsandbytes decodes each weight to computed there from the codes it wrote; the reference model is
 * the plain F32 checkpoint of those decoded weights.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  BNB_FP4_CODE_BOOK, bnbTensorSource, decode4bit, decode8bit, decodeNestedAbsmax,
} from '../../src/io/bnb_checkpoint.js';
import { CheckpointError, loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { saveHFCheckpoint } from '../../src/io/hf_save.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { sparseMoELayers, type MoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { variableFloat32 } from '../../src/layers/sparse_moe.js';
import { NF4_CODE_BOOK, quantizedLayout } from '../../src/ops/quantized.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { dynamicMap, writeBnbFixture, type BnbFixtureOptions } from '../../tools/fixtures/make_bnb_fixture.js';
import type { RawTensor } from '../../tools/fixtures/raw_safetensors.js';
import { rejection } from '../helpers/rejection.js';
import { cleanup, tempDir } from './checkpoint_helpers.js';

const f32 = Math.fround;
const ID_ROWS = [[1, 5, 9, 3, 7, 2, 11, 4, 60, 33, 17, 90]];

/** The bnb checkpoint, its reference (dequantized, F32) and what each quantized weight decodes to. */
async function fixture(options: BnbFixtureOptions) {
  const [dir, referenceDir] = [await tempDir('bnb-'), await tempDir('bnb-ref-')];
  const { decoded, tensors } = await writeBnbFixture(dir, { expertIntermediate: 64, ...options, referenceDir });
  return { dir, referenceDir, decoded, tensors };
}

/** Logits of both models on the same ids. */
function logits(a: MoECausalLM, b: MoECausalLM): [Float32Array, Float32Array] {
  const ids = tf.tensor2d(ID_ROWS, [1, ID_ROWS[0].length], 'int32');
  const [x, y] = [a.predict(ids) as tf.Tensor, b.predict(ids) as tf.Tensor];
  const out: [Float32Array, Float32Array] = [x.dataSync() as Float32Array, y.dataSync() as Float32Array];
  tf.dispose([ids, x, y]);
  return out;
}

/** Every expert weight (gate_up, down) of both models as float32 values. */
function expertValues(model: MoECausalLM): Float32Array[] {
  return sparseMoELayers(model).flatMap(layer => ['gate_up', 'down'].map(field => {
    const t = variableFloat32(layer.weightVariable(field));
    const values = t.dataSync() as Float32Array;
    t.dispose();
    return values;
  }));
}

/** Loads the bnb checkpoint (with `expertDtype`) and its reference; checks storage, expert values and logits. */
async function expectImport(
    options: BnbFixtureOptions, expertDtype: 'stored' | 'float32' | 'nf4' | 'nf4-dq' | 'int8' | undefined, storage: string,
    expertTolerance: number, logitTolerance = 1e-6) {
  const { dir, referenceDir } = await fixture(options);
  const before = tf.memory().numTensors;
  const model = await loadHFCheckpoint(dir, expertDtype === undefined ? {} : { expertDtype });
  const reference = await loadHFCheckpoint(referenceDir);
  expect(sparseMoELayers(model).map(l => l.expertStorage)).to.deep.equal([storage, storage]);
  const [got, want] = [expertValues(model), expertValues(reference)];
  for (const [i, values] of got.entries()) {
    if (expertTolerance === 0) expect(Array.from(values), `expert weight ${i}`).to.deep.equal(Array.from(want[i]));
    else expect(maxRelativeError(values, want[i]), `expert weight ${i}`).to.be.at.most(expertTolerance);
  }
  const [a, b] = logits(model, reference);
  expect(maxRelativeError(a, b), 'logits vs the model of the dequantized weights').to.be.at.most(logitTolerance);
  model.dispose();
  reference.dispose();
  expect(tf.memory().numTensors).to.equal(before);
}

describe('io/bnb_checkpoint: bitsandbytes 4-bit and 8-bit checkpoints', () => {
  after(cleanup);

  describe('code books and decodes, against bitsandbytes\' published values and float64 JS', () => {
    it('NF4_CODE_BOOK is bitsandbytes\' nf4 table bit for bit; the FP4 table is get_4bit_type(\'fp4\') / 12 and the CUDA kernel\'s LUT', () => {
      // functional.py get_4bit_type('nf4') (the same literals as csrc/kernels.cu nf4_dequantization_lut)
      const nf4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
        0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0];
      expect(Array.from(NF4_CODE_BOOK)).to.deep.equal(nf4.map(f32));
      // csrc/kernels.cu fp4_dequantization_lut by the 3 low bits, bit 3 the sign
      const lut = [0, 0.005208333333, 0.66666667, 1, 0.33333333, 0.5, 0.16666667, 0.25].map(f32);
      expect(Array.from(BNB_FP4_CODE_BOOK)).to.deep.equal([...lut, ...lut.map(v => -v)]);
    });

    it('decode4bit: element 2j in the high nibble, f32(code[q] · absmax[⌊j/blocksize⌋]), an odd count drops the pad', () => {
      // 3 elements, blocks of 2: codes 15, 0 | 9 (pad 0)
      const got = decode4bit(Uint8Array.of(0xf0, 0x90), Float32Array.of(2, 0.1), NF4_CODE_BOOK, 2, 3);
      expect(Array.from(got)).to.deep.equal([2, -2, f32(NF4_CODE_BOOK[9] * f32(0.1))]);
      const fp4 = decode4bit(Uint8Array.of(0x3b), Float32Array.of(3), BNB_FP4_CODE_BOOK, 64, 2);
      expect(Array.from(fp4)).to.deep.equal([3, -3]);  // codes 3 (12/12) and 11 (−12/12)
    });

    it('decodeNestedAbsmax: f32(f32(map[c] · nested_absmax[⌊b/256⌋]) + offset); decode8bit: f32(f32(q · SCB) · f32(1/127)), within 2^-23 of q·SCB/127', () => {
      const map = Float32Array.from(dynamicMap());
      const codes = Uint8Array.from({ length: 300 }, (_, b) => (b * 37) % 256);
      const nested = Float32Array.of(0.031, 0.0007);
      const got = decodeNestedAbsmax(codes, nested, map, 256, 0.0123);
      codes.forEach((c, b) => expect(got[b]).to.equal(f32(f32(map[c] * nested[b < 256 ? 0 : 1]) + f32(0.0123))));
      const q = Int8Array.from({ length: 2 * 255 }, (_, k) => (k % 255) - 127);
      const scb = Float32Array.of(0.37, 1e-3);
      const w = decode8bit(q, scb, 2, 255);
      let worst = 0;
      q.forEach((v, k) => {
        const row = k < 255 ? 0 : 1;
        expect(w[k]).to.equal(f32(f32(v * scb[row]) * f32(1 / 127)));
        if (v !== 0) worst = Math.max(worst, Math.abs(w[k] - (v * scb[row]) / 127) / Math.abs((v * scb[row]) / 127));
      });
      expect(worst).to.be.at.most(2 ** -23);
    });

    it('every quantized weight reads as what the generator computed in float64 (nf4, fp4, double quant, int8, bf16)', async () => {
      for (const options of [{}, { quantType: 'fp4' }, { doubleQuant: true, blocksize: 128 }, { bits: 8 }, { dtype: 'bfloat16', doubleQuant: true }] as BnbFixtureOptions[]) {
        const { dir, decoded } = await fixture(options);
        const source = await bnbTensorSource(await readSafetensorsFile(join(dir, 'model.safetensors')), 'the fixture');
        for (const [name, want] of decoded) {
          const t = await source.tensor(name);
          expect(Array.from(t.dataSync()), `${JSON.stringify(options)} ${name}`).to.deep.equal(want);
          t.dispose();
        }
      }
    });
  });

  describe('the imported model equals the model of the dequantized weights', () => {
    it('NF4, blocks of 64: kept as this package\'s nf4 (codes and absmax as stored), the same expert values and logits', async () => {
      await expectImport({}, undefined, 'nf4', 0);
    });

    it('saved, an imported model is a plain checkpoint (no quantization_config) that reloads to the same logits', async () => {
      const { dir } = await fixture({});
      const before = tf.memory().numTensors;
      const model = await loadHFCheckpoint(dir);
      const saved = await tempDir('bnb-saved-');
      await saveHFCheckpoint(model, saved);
      expect(JSON.parse(await readFile(join(saved, 'config.json'), 'utf8'))).to.not.have.property('quantization_config');
      const again = await loadHFCheckpoint(saved);
      const [a, b] = logits(model, again);
      expect(maxRelativeError(a, b)).to.equal(0);
      model.dispose();
      again.dispose();
      expect(tf.memory().numTensors).to.equal(before);
    });

    it('NF4 with double quantization, nested blocks whole in each weight (256 units: 256 blocks a linear): kept as nf4-dq, nothing decoded, the same expert values and logits', async () => {
      await expectImport({ doubleQuant: true, expertIntermediate: 256 }, undefined, 'nf4-dq', 0);
      await expectImport({ doubleQuant: true, expertIntermediate: 256 }, 'nf4-dq', 'nf4-dq', 0);
      // the stored words are bitsandbytes' own: codes (nibbles swapped), absmax codes, nested absmax, offset, map
      const { dir, tensors } = await fixture({ doubleQuant: true, expertIntermediate: 256 });
      const model = await loadHFCheckpoint(dir);
      const words = new Uint8Array((sparseMoELayers(model)[0].weightVariable('gate_up').read().dataSync() as Int32Array).slice().buffer);
      const l = quantizedLayout('nf4-dq', [8, 512, 64], 2);   // expert 0 of [E, 2I, H]
      const w1 = 'model.layers.0.block_sparse_moe.experts.0.w1.weight';
      const w3 = 'model.layers.0.block_sparse_moe.experts.0.w3.weight';
      const state = JSON.parse(new TextDecoder().decode(tensors[`${w1}.quant_state.bitsandbytes__nf4`].bytes)) as { nested_offset: number };
      expect(Array.from(words.subarray(0, 4))).to.deep.equal(Array.from(tensors[w1].bytes.subarray(0, 4), b => ((b & 15) << 4) | (b >> 4)));
      expect(Array.from(words.subarray(4 * l.scaleWord, 4 * l.scaleWord + 512))).to.deep.equal(
          [...tensors[`${w1}.absmax`].bytes, ...tensors[`${w3}.absmax`].bytes]);
      const floats = new Float32Array(words.buffer);
      expect(floats[l.nestedWord]).to.equal(new Float32Array(tensors[`${w1}.nested_absmax`].bytes.slice().buffer)[0]);
      expect(floats[l.offsetWord]).to.equal(f32(state.nested_offset));
      expect(Array.from(floats.subarray(l.mapWord, l.mapWord + 256))).to.deep.equal(dynamicMap());
      model.dispose();
    });

    it('gate and up of one expert with different absmax code maps cannot share its words: refused, naming both', async () => {
      const w3 = 'model.layers.0.block_sparse_moe.experts.0.w3.weight';
      const { dir } = await fixture({
        doubleQuant: true, expertIntermediate: 256,
        edit: t => {
          const map = new Float32Array(t[`${w3}.nested_quant_map`].bytes.slice().buffer);
          map[3] = f32(map[3] * 0.999);
          t[`${w3}.nested_quant_map`] = { dtype: 'F32', shape: [256], bytes: new Uint8Array(map.buffer) };
        },
      });
      const e = await rejection(loadHFCheckpoint(dir));
      expect(e).to.be.instanceOf(CheckpointError);
      expect(e.message).to.include(`'${w3}.nested_quant_map' must equal 'model.layers.0.block_sparse_moe.experts.0.w1.weight.nested_quant_map' ` +
          '(one absmax code map per fused expert) but differs at entry 3');
    });

    it('NF4 with double quantization whose nested blocks span gate and up (64 units: 64 blocks a linear): decoded (float32 experts) by default; re-quantized only with expertDtype \'nf4\'', async () => {
      await expectImport({ doubleQuant: true }, undefined, 'float32', 0);
      // re-quantized: within half an NF4 step of the decoded weights, so the logits move a little
      await expectImport({ doubleQuant: true }, 'nf4', 'nf4', 0.16, 0.05);
    });

    it('FP4 decodes (float32); a bf16 quant state decodes to bf16 experts (rounded as bitsandbytes\' .to(bfloat16))', async () => {
      await expectImport({ quantType: 'fp4' }, undefined, 'float32', 0);
      await expectImport({ dtype: 'bfloat16', quantType: 'fp4' }, undefined, 'bf16', 0);
    });

    it('NF4 of a bf16 model stays nf4: its values are bitsandbytes\' float32 products, before its rounding to bf16 (half a bf16 step: ≤ 2^-8 relative)', async () => {
      await expectImport({ dtype: 'bfloat16' }, undefined, 'nf4', 2 ** -8, 1e-2);
    });

    it('blocks that span rows (down_proj with 96 inputs) cannot stay nf4: the experts decode', async () => {
      await expectImport({ expertIntermediate: undefined }, undefined, 'float32', 0);
    });

    it('8-bit (LLM.int8): kept as this package\'s int8 (scale SCB / 127), within 2 ulp of bitsandbytes\' dequant; float32 on request is exact', async () => {
      await expectImport({ bits: 8 }, undefined, 'int8', 2 ** -22);
      await expectImport({ bits: 8 }, 'float32', 'float32', 0);
    });
  });

  describe('errors name the tensor, what was expected and what was found', () => {
    const EXPERT = 'model.layers.0.block_sparse_moe.experts.0.w1.weight';
    const ROUTER = 'model.layers.0.block_sparse_moe.gate.weight';
    const Q = 'model.layers.0.self_attn.q_proj.weight';
    const json = (value: unknown): RawTensor => {
      const bytes = new TextEncoder().encode(typeof value === 'string' ? value : JSON.stringify(value));
      return { dtype: 'U8', shape: [bytes.length], bytes };
    };

    it('4-bit: bad quant state JSON, unknown quant_type, bad fields, misshapen tensors, a foreign code book, missing state', async () => {
      const { dir } = await fixture({
        edit: t => {
          t[`${EXPERT}.quant_state.bitsandbytes__nf4`] = json('{"quant_type": "nf4", ');
          t[`${ROUTER}.quant_state.bitsandbytes__nf4`] = json([1, 2]);
          delete t[`${Q}.quant_state.bitsandbytes__nf4`];
          t[`${Q}.quant_state.bitsandbytes__int4`] = json({ quant_type: 'int4' });
          const k = 'model.layers.0.self_attn.k_proj.weight';
          t[`${k}.quant_state.bitsandbytes__nf4`] = json({ quant_type: 'fp4', blocksize: 48, dtype: 'int8', shape: [32] });
          const v = 'model.layers.0.self_attn.v_proj.weight';
          t[`${v}.absmax`] = { dtype: 'F32', shape: [3], bytes: new Uint8Array(12) };
          t[v] = { dtype: 'U8', shape: [7, 1], bytes: new Uint8Array(7) };
          const o = 'model.layers.0.self_attn.o_proj.weight';
          t[`${o}.quant_map`] = { dtype: 'F32', shape: [16], bytes: new Uint8Array(Float32Array.from(BNB_FP4_CODE_BOOK).buffer) };
          const w2 = 'model.layers.1.block_sparse_moe.experts.0.w2.weight';
          delete t[`${w2}.quant_state.bitsandbytes__nf4`];
        },
      });
      const e = await rejection(loadHFCheckpoint(dir));
      expect(e).to.be.instanceOf(CheckpointError);
      const m = e.message;
      expect(m).to.match(/bnbTensorSource\(\)`: '.*': the bitsandbytes-quantized weights .* are not as bitsandbytes saves them; 8 problems/);
      expect(m).to.include(`'${EXPERT}.quant_state.bitsandbytes__nf4' must hold the quant state as UTF-8 JSON but does not parse`);
      expect(m).to.include(`'${ROUTER}.quant_state.bitsandbytes__nf4' must hold a JSON object {quant_type, blocksize, dtype, shape} but holds`);
      expect(m).to.include(`'${Q}.quant_state.bitsandbytes__int4': quant_type must be 'nf4' or 'fp4' but the entry names "int4" (string)`);
      expect(m).to.include("'model.layers.0.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4': quant_type must be 'nf4' (the entry's name) " +
          'but is "fp4" (string); blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096 but is 48 (number); ' +
          'dtype must be one of bfloat16, float16, float32 but is "int8" (string); shape must be [out, in] (a linear weight) but is an array of length 1');
      expect(m).to.include("'model.layers.0.self_attn.v_proj.weight' (the packed 4-bit codes of a [32,64] weight) must be U8 [1024,1] but is U8 [7,1]");
      expect(m).to.include("'model.layers.0.self_attn.v_proj.weight.absmax' (one absmax per block of 64) must be F32 [32] but is F32 [3]");
      expect(m).to.include("'model.layers.0.self_attn.o_proj.weight.quant_map' must be bitsandbytes' nf4 table [-1,");
      expect(m).to.include("'model.layers.1.block_sparse_moe.experts.0.w2.weight' is U8 (packed 4-bit?) but has no " +
          "'model.layers.1.block_sparse_moe.experts.0.w2.weight.quant_state.bitsandbytes__nf4' (or fp4) quant state");
    });

    it('double quantization: bad nested fields, a missing code book', async () => {
      const { dir } = await fixture({
        doubleQuant: true,
        edit: t => {
          t[`${EXPERT}.quant_state.bitsandbytes__nf4`] = json({ quant_type: 'nf4', blocksize: 64, dtype: 'float32', shape: [64, 64],
            nested_blocksize: 100, nested_offset: 'x', nested_dtype: 'bfloat16' });
          delete t[`${Q}.nested_quant_map`];
        },
      });
      const m = (await rejection(loadHFCheckpoint(dir))).message;
      expect(m).to.include(`'${EXPERT}.quant_state.bitsandbytes__nf4': nested_blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096 but is 100 (number); ` +
          "nested_offset must be a finite number but is \"x\" (string); nested_dtype must be 'float32' but is \"bfloat16\" (string)");
      expect(m).to.include(`'${Q}.nested_quant_map' (the 8-bit code book of the absmax codes) is missing`);
    });

    it('8-bit: a weight that is not I8, an SCB of the wrong length, an SCB without weight, a tiled weight_format', async () => {
      const { dir } = await fixture({
        bits: 8,
        edit: t => {
          t[EXPERT] = { dtype: 'U8', shape: [64, 64], bytes: new Uint8Array(64 * 64) };
          t[ROUTER.replace(/weight$/, 'SCB')] = { dtype: 'F32', shape: [3], bytes: new Uint8Array(12) };
          t['model.layers.0.extra.SCB'] = { dtype: 'F32', shape: [1], bytes: new Uint8Array(4) };
          t[Q.replace(/weight$/, 'weight_format')] = { dtype: 'U8', shape: [], bytes: Uint8Array.of(2) };
        },
      });
      const m = (await rejection(loadHFCheckpoint(dir))).message;
      expect(m).to.include('4 problems');
      expect(m).to.include(`'${EXPERT}' (an 8-bit weight, it has '${EXPERT.replace(/weight$/, 'SCB')}') must be I8 [out, in] but is U8 [64,64]`);
      expect(m).to.include(`'${ROUTER.replace(/weight$/, 'SCB')}' (the absmax of each row) must be F32 [8] but is F32 [3]`);
      expect(m).to.include("'model.layers.0.extra.SCB' has no 8-bit weight 'model.layers.0.extra.weight'");
      expect(m).to.include(`'${Q.replace(/weight$/, 'weight_format')}' must be a U8 scalar 0 (row-major, the only layout bitsandbytes writes) but is 2`);
    });

    it('a tensor source that cannot give raw bytes is refused', async () => {
      const source = { has: () => false, info: () => ({ dtype: 'F32', shape: [] }), tensor: async () => tf.scalar(0) };
      const e = await rejection(bnbTensorSource(source, "'x'"));
      expect(e).to.be.instanceOf(CheckpointError);
      expect(e.message).to.equal("'x': the bitsandbytes weights cannot be read: the tensor source has no uint8Values");
    });
  });
});
