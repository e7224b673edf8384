/**
 * MXFP4 experts (gpt-oss on the Hub): `*_blocks` + `*_scales` kept as MXFP4 by default (their
 * bytes are the quantized experts' words), decoded exactly for float32. The MXFP4 checkpoint is written here from the fixture: each expert weight
 * quantized to the e2m1 × 2^k grid by an encoder of this spec (the layout of transformers'
 * integrations/mxfp4.py, written independently of src/io/mxfp4.ts), beside the same grid values
 * stored BF16 (exact): both must load to the same weights and give the same logits.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CheckpointError, loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { saveHFCheckpoint } from '../../src/io/hf_save.js';
import { decodeMXFP4 } from '../../src/io/mxfp4.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import { variableFloat32 } from '../../src/layers/sparse_moe.js';
import { packExpertWeight } from '../../src/ops/packed.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { encodeRawSafetensors, type RawTensor } from '../../tools/fixtures/raw_safetensors.js';
import { rejection } from '../helpers/rejection.js';
import { cleanup, fixtureConfig, fixtureDir, golden, tempDir } from './checkpoint_helpers.js';

const MAGNITUDES = [0, 0.5, 1, 1.5, 2, 3, 4, 6];

/** f32 bits' high half: exact for every value of the grid. */
function bf16(v: number): number {
  const f = new Float32Array([v]);
  return new Uint32Array(f.buffer)[0] >>> 16;
}

/**
 * Quantizes w [E, in, out] (transformers' layout) to MXFP4 as the Hub stores it: blocks
 * [E, out, in/32, 16] (input 2b in the low nibble of byte b, 2b + 1 in the high one), scales
 * [E, out, in/32] (e8m0: exponent + 127), and the grid values it stands for, [E, in, out].
 */
function quantize(w: Float32Array, [E, inSize, out]: number[]) {
  const groups = inSize / 32;
  const blocks = new Uint8Array(E * out * groups * 16);
  const scales = new Uint8Array(E * out * groups);
  const grid = new Float32Array(w.length);
  for (let e = 0; e < E; e++) {
    for (let r = 0; r < out; r++) {
      for (let g = 0; g < groups; g++) {
        const at = (c: number) => (e * inSize + g * 32 + c) * out + r;
        let amax = 0;
        for (let c = 0; c < 32; c++) amax = Math.max(amax, Math.abs(w[at(c)]));
        const k = amax === 0 ? 0 : Math.ceil(Math.log2(amax / 6));
        const group = (e * out + r) * groups + g;
        scales[group] = k + 127;
        for (let c = 0; c < 32; c++) {
          const v = w[at(c)] / 2 ** k;
          let best = 0;
          MAGNITUDES.forEach((m, i) => { if (Math.abs(Math.abs(v) - m) < Math.abs(Math.abs(v) - MAGNITUDES[best])) best = i; });
          const code = best | (v < 0 && best > 0 ? 8 : 0);
          grid[at(c)] = best === 0 ? 0 : Math.sign(v) * MAGNITUDES[best] * 2 ** k;  // code 0: +0
          blocks[group * 16 + (c >> 1)] |= (c % 2 === 0 ? code : code << 4);
        }
      }
    }
  }
  return { blocks, scales, grid };
}


const f32Bytes = (v: Float32Array) => new Uint8Array(v.buffer.slice(0));
const bf16Bytes = (v: Float32Array) => new Uint8Array(Uint16Array.from(v, bf16).buffer);

/**
 * Writes the fixture as an MXFP4 checkpoint and as a BF16-experts one with the same grid values;
 * `edit` may change the MXFP4 tensors. Returns the folders and the grid values by weight name.
 */
async function writeQuantized(edit: (t: Record<string, RawTensor>) => void = () => {}) {
  const config = await fixtureConfig('gpt_oss');
  const file = await readSafetensorsFile(join(fixtureDir('gpt_oss'), 'model.safetensors'));
  const mx: Record<string, RawTensor> = {};
  const half: Record<string, RawTensor> = {};
  const grids = new Map<string, Float32Array>();
  for (const name of file.names()) {
    const t = await file.tensor(name);
    const values = t.dataSync() as Float32Array;
    if (/experts\.(gate_up|down)_proj$/.test(name)) {
      const [E, inSize, out] = t.shape;
      const { blocks, scales, grid } = quantize(values, t.shape);
      mx[`${name}_blocks`] = { dtype: 'U8', shape: [E, out, inSize / 32, 16], bytes: blocks };
      mx[`${name}_scales`] = { dtype: 'U8', shape: [E, out, inSize / 32], bytes: scales };
      half[name] = { dtype: 'BF16', shape: t.shape, bytes: bf16Bytes(grid) };
      grids.set(name, grid);
    } else {
      mx[name] = half[name] = { dtype: 'F32', shape: t.shape, bytes: f32Bytes(values) };
    }
    t.dispose();
  }
  edit(mx);
  const [mxDir, halfDir] = [await tempDir(), await tempDir()];
  const quantization = { quant_method: 'mxfp4', modules_to_not_convert: ['model.layers.*.self_attn', 'model.layers.*.mlp.router', 'model.embed_tokens', 'lm_head'] };
  await writeFile(join(mxDir, 'config.json'), JSON.stringify({ ...config, quantization_config: quantization }));
  await writeFile(join(mxDir, 'model.safetensors'), encodeRawSafetensors(mx));
  await writeFile(join(halfDir, 'config.json'), JSON.stringify(config));
  await writeFile(join(halfDir, 'model.safetensors'), encodeRawSafetensors(half));
  return { mxDir, halfDir, grids, mxTensors: mx };
}

describe('io/mxfp4: gpt-oss MXFP4 experts kept as MXFP4 on load, or decoded exactly', () => {
  after(cleanup);

  it('decodeMXFP4: low nibble first, value e2m1 · 2^(scale − 127), [E, out, in] transposed to [E, in, out]', () => {
    // E 1, out 2, in 32: row 0 scale 128 (×2), row 1 scale 126 (×1/2)
    const blocks = new Uint8Array(2 * 16);
    blocks[0] = 0x21;           // inputs 0, 1 of row 0: codes 1 (0.5) and 2 (1)
    blocks[15] = 0xf7;          // inputs 30, 31 of row 0: codes 7 (6) and 15 (−6)
    blocks[16] = 0x9c;          // inputs 0, 1 of row 1: codes 12 (−2) and 9 (−0.5)
    const bits = decodeMXFP4(blocks, Uint8Array.of(128, 126), [1, 2, 1, 16]);
    const values = Array.from(bits, b => new Float32Array(new Uint32Array([b << 16]).buffer)[0]);
    const want = new Array(64).fill(0);
    // [in 32, out 2]: input c of row r at c·2 + r
    [want[0], want[2], want[60], want[62]] = [1, 2, 12, -12];
    [want[1], want[3]] = [-1, -0.25];
    expect(values).to.deep.equal(want);
    // the ends of e8m0: 0.5 · 2^−127 (subnormal, exact in bf16) and 6 · 2^128 (infinity, as transformers' bf16)
    const ends = decodeMXFP4(Uint8Array.of(0x71, ...new Array(15).fill(0)), Uint8Array.of(0), [1, 1, 1, 16]);
    expect(new Float32Array(new Uint32Array([ends[0] << 16]).buffer)[0]).to.equal(2 ** -128);
    const big = decodeMXFP4(Uint8Array.of(0x07, ...new Array(15).fill(0)), Uint8Array.of(255), [1, 1, 1, 16]);
    expect(new Float32Array(new Uint32Array([big[0] << 16]).buffer)[0]).to.equal(Infinity);
  });

  it('an MXFP4 checkpoint loads as MXFP4 (its bytes as stored), decodes to exactly its grid values and gives the BF16 checkpoint\'s logits', async () => {
    const { mxDir, halfDir, grids, mxTensors } = await writeQuantized();
    const before = tf.memory().numTensors;
    const mx = await loadHFCheckpoint(mxDir);
    const half = await loadHFCheckpoint(halfDir);
    const wide = await loadHFCheckpoint(mxDir, { expertDtype: 'float32' });
    for (const [i, layer] of sparseMoELayers(mx).entries()) {
      expect(layer.expertStorage, layer.name).to.equal('mxfp4');
      for (const [field, hf] of [['gate_up', 'gate_up_proj'], ['down', 'down_proj']]) {
        const name = `model.layers.${i}.mlp.experts.${hf}`;
        const grid = grids.get(name)!;
        // each expert's words: its blocks' bytes (the codes), then its scales' bytes, as the file has them
        const v = layer.weightVariable(field);
        const words = v.read().dataSync() as Int32Array;
        const bytes = new Uint8Array(words.buffer, words.byteOffset, words.byteLength);
        const [blocks, scales] = [mxTensors[`${name}_blocks`].bytes, mxTensors[`${name}_scales`].bytes];
        const [E, W] = v.shape as number[];
        const codeBytes = blocks.length / E;
        const scaleBytes = scales.length / E;
        for (let e = 0; e < E; e++) {
          expect(Array.from(bytes.subarray(4 * e * W, 4 * e * W + codeBytes)), `${name} codes of expert ${e}`)
            .to.deep.equal(Array.from(blocks.subarray(e * codeBytes, (e + 1) * codeBytes)));
          expect(Array.from(bytes.subarray(4 * e * W + codeBytes, 4 * e * W + codeBytes + scaleBytes)), `${name} scales of expert ${e}`)
            .to.deep.equal(Array.from(scales.subarray(e * scaleBytes, (e + 1) * scaleBytes)));
        }
        const decoded = variableFloat32(v);
        expect(Array.from(decoded.dataSync()), `${layer.name} ${field} decoded`).to.deep.equal(Array.from(grid));
        decoded.dispose();
        const widened = sparseMoELayers(wide)[i].weightVariable(field).read().dataSync();
        expect(Array.from(widened), `${layer.name} ${field} float32`).to.deep.equal(Array.from(grid));
      }
    }
    const g = await golden('gpt_oss');
    const ids = await g.tensor('input_ids');
    const [a, b, c] = [mx, half, wide].map(m => m.predict(ids) as tf.Tensor);
    expect(maxRelativeError(a.dataSync(), b.dataSync()), 'vs the BF16 checkpoint').to.equal(0);
    expect(maxRelativeError(c.dataSync(), b.dataSync()), 'float32 experts').to.be.at.most(1e-6);
    // the grid is coarse: the logits move off transformers' unquantized ones, but not far
    const full = await g.tensor('logits');
    expect(maxRelativeError(a.dataSync(), full.dataSync())).to.be.within(1e-4, 0.5);
    // saved, the experts are plain BF16 weights and config.json no longer says MXFP4: it reloads to the same logits
    const saved = await tempDir();
    await saveHFCheckpoint(mx, saved);
    const savedConfig = JSON.parse(await readFile(join(saved, 'config.json'), 'utf8'));
    expect(savedConfig).to.not.have.property('quantization_config');
    const savedFile = await readSafetensorsFile(join(saved, 'model.safetensors'));
    expect(savedFile.info('model.layers.0.mlp.experts.gate_up_proj')).to.deep.equal({ dtype: 'BF16', shape: [8, 64, 64] });
    expect(savedFile.names().some(n => n.endsWith('_blocks'))).to.equal(false);
    const again = await loadHFCheckpoint(saved);
    const d = again.predict(ids) as tf.Tensor;
    expect(maxRelativeError(d.dataSync(), b.dataSync()), 'saved and reloaded').to.equal(0);
    tf.dispose([a, b, c, d, ids, full]);
    for (const m of [mx, half, wide, again]) m.dispose();
    expect(tf.memory().numTensors).to.equal(before);
  });

  it("expertDtype 'mxfp4' keeps the stored bytes as 'stored' does; 'nf4' quantizes the decoded grid values", async () => {
    const { mxDir } = await writeQuantized();
    const stored = await loadHFCheckpoint(mxDir);
    const asked = await loadHFCheckpoint(mxDir, { expertDtype: 'mxfp4' });
    const wide = await loadHFCheckpoint(mxDir, { expertDtype: 'float32' });
    const nf4 = await loadHFCheckpoint(mxDir, { expertDtype: 'nf4' });
    for (const [i, layer] of sparseMoELayers(asked).entries()) {
      for (const field of ['gate_up', 'down']) {
        expect(Array.from(layer.weightVariable(field).read().dataSync()), `${layer.name} ${field}`)
          .to.deep.equal(Array.from(sparseMoELayers(stored)[i].weightVariable(field).read().dataSync()));
        // gpt-oss's [E, in, out]: nf4 groups along `in` (axis 1)
        const q = packExpertWeight(sparseMoELayers(wide)[i].weightVariable(field).read() as tf.Tensor3D, 'nf4', { inputAxis: 1 });
        expect(sparseMoELayers(nf4)[i].expertStorage).to.equal('nf4');
        expect(Array.from(sparseMoELayers(nf4)[i].weightVariable(field).read().dataSync()), `${layer.name} ${field} nf4`)
          .to.deep.equal(Array.from(q.packed.dataSync()));
        q.dispose();
      }
    }
    for (const m of [stored, asked, wide, nf4]) m.dispose();
  });

  it('blocks and scales that are not as transformers stores them: one CheckpointError listing each', async () => {
    const { mxDir } = await writeQuantized(t => {
      delete t['model.layers.0.mlp.experts.down_proj_scales'];
      t['model.layers.1.mlp.experts.down_proj_scales'] = { ...t['model.layers.1.mlp.experts.down_proj_scales'], dtype: 'F32', shape: [8, 64], bytes: new Uint8Array(8 * 64 * 4) };
      const gu = t['model.layers.1.mlp.experts.gate_up_proj_scales'];
      t['model.layers.1.mlp.experts.gate_up_proj_scales'] = { ...gu, shape: [8, 32, 4], bytes: gu.bytes.slice(0, 8 * 32 * 4) };
      t['model.layers.0.mlp.experts.gate_up_proj'] = { dtype: 'F32', shape: [8, 64, 64], bytes: new Uint8Array(8 * 64 * 64 * 4) };
      t['model.layers.0.mlp.router.weight_scales'] = { dtype: 'U8', shape: [8], bytes: new Uint8Array(8) };
    });
    const before = tf.memory().numTensors;
    const err = await rejection(loadHFCheckpoint(mxDir));
    expect(err).to.be.instanceOf(CheckpointError);
    expect(err.message).to.equal(`\`mxfp4TensorSource()\`: '${mxDir}': the MXFP4 expert tensors (quantization_config.quant_method ` +
      "'mxfp4') are not as transformers stores them; 5 problems:\n" +
      "  'model.layers.0.mlp.experts.down_proj_blocks' has no 'model.layers.0.mlp.experts.down_proj_scales'\n" +
      "  'model.layers.0.mlp.experts.gate_up_proj' is stored both plain and as MXFP4 ('model.layers.0.mlp.experts.gate_up_proj_blocks', 'model.layers.0.mlp.experts.gate_up_proj_scales')\n" +
      "  'model.layers.1.mlp.experts.down_proj_blocks' and 'model.layers.1.mlp.experts.down_proj_scales' must be U8 but are U8 and F32\n" +
      "  'model.layers.1.mlp.experts.gate_up_proj_blocks' [8,64,2,16] must be [E, out, in/32, 16] and 'model.layers.1.mlp.experts.gate_up_proj_scales' [8,32,4] its first three dimensions\n" +
      "  'model.layers.0.mlp.router.weight_scales' has no 'model.layers.0.mlp.router.weight_blocks'");
    expect(tf.memory().numTensors).to.equal(before);
  });
});
