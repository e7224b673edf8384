/**
 * 'nf4-dq' (bitsandbytes' double quantization, `bnb_4bit_use_double_quant`) against an independent
 * JS reference of bitsandbytes' algorithm written here from its source (functional.py quantize_4bit
 * with compress_statistics, create_dynamic_map; backends/default/ops.py quantize_4bit,
 * quantize_blockwise): every argmin by brute force over the whole code book on the float32
 * differences (torch.argmin: the lowest index on ties), float64 arithmetic rounded where torch
 * computes in float32. bitsandbytes itself is not installed anywhere here.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { packExpertWeight, unpackExpertWeight } from '../../src/ops/packed.js';
import {
  BNB_DYNAMIC_MAP, decodeQuantizedExpertInto, nearestMapCode, quantizedLayout, quantizeExpertValues,
} from '../../src/ops/quantized.js';
import { referenceDecode } from '../helpers/quantized_reference.js';

const f32 = Math.fround;
const NF4 = [
  -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
  -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
  0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
];

/** torch.argmin(|f32(x − code)|) over every entry, NaN x → 0 (torch's first index). */
function argminCode(x: number, code: ArrayLike<number>): number {
  if (Number.isNaN(x)) return 0;
  const v = Math.min(1, Math.max(-1, x));
  let best = 0;
  for (let k = 1; k < code.length; k++) if (Math.abs(f32(v - code[k])) < Math.abs(f32(v - code[best]))) best = k;
  return best;
}

/** One [out, in] weight (in a multiple of 64) through bitsandbytes' double-quantized NF4, by its definitions. */
function bnbDoubleQuant(values: Float32Array, map: ArrayLike<number>) {
  const blocks = values.length / 64;
  const q: number[] = [];
  const absmax: number[] = [];
  for (let b = 0; b < blocks; b++) {
    let m = 0;
    for (let j = 0; j < 64; j++) m = Math.max(m, Math.abs(values[b * 64 + j]));
    absmax.push(m);
    const inverse = f32(1 / m);
    for (let j = 0; j < 64; j++) q.push(argminCode(f32(values[b * 64 + j] * inverse), NF4));
  }
  const offset = f32(absmax.reduce((a, b) => a + b, 0) / blocks);
  const centred = absmax.map(a => f32(a - offset));
  const codes: number[] = [];
  const nested: number[] = [];
  for (let start = 0; start < blocks; start += 256) {
    const part = centred.slice(start, start + 256);
    const n = Math.max(...part.map(Math.abs));
    nested.push(n);
    const inverse = f32(1 / n);
    for (const c of part) codes.push(argminCode(f32(c * inverse), map));
  }
  // decode (dequantize_blockwise then += offset; dequantize_4bit)
  const decoded = q.map((c, j) => {
    const b = Math.floor(j / 64);
    const a = f32(f32(map[codes[b]] * nested[Math.floor(b / 256)]) + offset);
    return f32(NF4[c] * a);
  });
  return { q, codes, nested, offset, decoded };
}

/** Values with a spread of block absmax (so the 8-bit codes vary), a few exact ties and zeros. */
function weightValues(n: number, seed: number): Float32Array {
  let s = seed;
  const rand = () => ((s = (s * 1103515245 + 12345) % 2 ** 31) / 2 ** 31);
  const out = new Float32Array(n);
  for (let b = 0; b < n / 64; b++) {
    const scale = 0.01 + 0.2 * rand() ** 2;
    for (let j = 0; j < 64; j++) out[b * 64 + j] = f32((rand() * 2 - 1) * scale);
    // a value on an exact midpoint of two NF4 codes (times its block's absmax) and an exact zero
    out[b * 64 + 5] = f32(((NF4[9] + NF4[10]) / 2) * Math.max(...Array.from(out.subarray(b * 64, b * 64 + 64), Math.abs)));
    out[b * 64 + 6] = 0;
  }
  out.fill(0, 64 * 3, 64 * 4);   // an all-zero block
  return out;
}

describe('nf4-dq: bitsandbytes\' double-quantized NF4 held as it is', () => {
  it('BNB_DYNAMIC_MAP is create_dynamic_map(signed=True): 256 sorted values, 0 and 1 exact, each within 2^-23 relative of its float64 formula', () => {
    const map = Array.from(BNB_DYNAMIC_MAP);
    expect(map).to.have.length(256);
    for (let k = 1; k < 256; k++) expect(map[k], `entry ${k}`).to.be.greaterThan(map[k - 1]);
    expect([map[127], map[255]]).to.deep.equal([0, 1]);
    // float64: ±10^(i − 6) · (b_k + b_(k+1)) / 2 with b = linspace(0.1, 1, 2^i + 1)
    const exact: number[] = [0, 1];
    for (let i = 0; i < 7; i++) {
      for (let k = 0; k < 2 ** i; k++) {
        const mean = 0.1 + (0.9 * (k + 0.5)) / 2 ** i;
        exact.push(10 ** (i - 6) * mean, -(10 ** (i - 6)) * mean);
      }
    }
    exact.sort((a, b) => a - b);
    for (let k = 0; k < 256; k++) {
      expect(Math.abs(map[k] - exact[k]), `entry ${k}`).to.be.at.most(Math.abs(exact[k]) * 2 ** -22);
      expect(f32(map[k])).to.equal(map[k]);
    }
    expect(map[0]).to.equal(f32(-0.9929687500000001));   // −(0.9859375 + 1) / 2
  });

  it('BNB_DYNAMIC_MAP equals, bit for bit, the map torch 2.11 builds on cpu and cuda (fixture)', () => {
    const fixture = JSON.parse(readFileSync(join('spec', 'fixtures', 'bnb', 'torch_dynamic_map.json'), 'utf8')) as { map_bits: number[] };
    expect(Array.from(new Uint32Array(BNB_DYNAMIC_MAP.buffer, BNB_DYNAMIC_MAP.byteOffset, 256))).to.deep.equal(fixture.map_bits);
  });

  it('nearestMapCode is torch.argmin over the float32 differences (lowest on ties), on entries, midpoints, their neighbours and out of range', () => {
    const xs: number[] = [-2, -1, 1, 2, 0, -0, 1e-9, -1e-9, NaN];
    const m = BNB_DYNAMIC_MAP;
    for (let k = 0; k < 255; k++) {
      const mid = (m[k] + m[k + 1]) / 2;
      const mid32 = f32(mid);
      xs.push(m[k], mid, mid32, f32(mid32 * (1 + 2 ** -23)), f32(mid32 * (1 - 2 ** -23)));
    }
    for (let j = 0; j < 2000; j++) xs.push(f32(Math.sin(j * 12.9898) * 1.1));
    for (const x of xs) expect(nearestMapCode(x, m), `x = ${x}`).to.equal(argminCode(x, m));
    expect(nearestMapCode(1, m)).to.equal(255);
    for (const x of [-1, -0.96, 0.079, 0.5, 1, NaN]) expect(nearestMapCode(x, Float32Array.from(NF4)), `NF4 ${x}`).to.equal(argminCode(x, NF4));
  });

  it('quantizing gives bitsandbytes\' codes, absmax codes, nested absmax and offset bit for bit; decoding its values bit for bit (3 nested blocks)', () => {
    const [O, N] = [24, 2048];   // 768 groups: nested blocks of 256
    const values = weightValues(O * N, 5);
    const layout = quantizedLayout('nf4-dq', [1, O, N], 2);
    const words = quantizeExpertValues(layout, 1, values);
    const want = bnbDoubleQuant(values, BNB_DYNAMIC_MAP);
    const bytes = new Uint8Array(words.buffer);
    const floats = new Float32Array(words.buffer);
    const nibbles = Array.from({ length: O * N }, (_, s) => (bytes[s >> 1] >> (4 * (s & 1))) & 15);
    expect(nibbles).to.deep.equal(want.q);
    expect(Array.from(bytes.subarray(4 * layout.scaleWord, 4 * layout.scaleWord + O * N / 64))).to.deep.equal(want.codes);
    expect(Array.from(floats.subarray(layout.nestedWord, layout.nestedWord + 3))).to.deep.equal(want.nested);
    expect(Array.from(floats.subarray(layout.offsetWord, layout.offsetWord + 3))).to.deep.equal([want.offset, want.offset, want.offset]);
    expect(Array.from(floats.subarray(layout.mapWord, layout.mapWord + 256))).to.deep.equal(Array.from(BNB_DYNAMIC_MAP));
    // the ties and zeros did happen: some codes on both sides, an all-zero block (code 0: −0)
    expect(new Set(want.codes).size).to.be.greaterThan(50);
    const decoded = new Float32Array(O * N);
    decodeQuantizedExpertInto(layout, words, 0, decoded, 0);
    expect(Array.from(decoded)).to.deep.equal(want.decoded);
    expect(Array.from(referenceDecode(layout, 1, words))).to.deep.equal(want.decoded);
    // bitsandbytes' quirk, kept: an all-zero block scales to NaN, takes NF4 code 0 (−1), and its
    // absmax decodes to about 0 but not exactly (offset + a map entry · nested): −absmax_b each
    const zeroBlockAbsmax = f32(f32(BNB_DYNAMIC_MAP[want.codes[3]] * want.nested[0]) + want.offset);
    expect(want.q.slice(64 * 3, 64 * 4).every(c => c === 0)).to.equal(true);
    expect(Array.from(decoded.subarray(64 * 3, 64 * 4)).every(v => v === -zeroBlockAbsmax)).to.equal(true);
    expect(Math.abs(zeroBlockAbsmax)).to.be.lessThan(want.nested[0] * 0.01);
  });

  it('a weight\'s own stored map is what decodes (an imported checkpoint\'s), and the [E, in, out] layout reads the same groups', () => {
    const layout = quantizedLayout('nf4-dq', [1, 4, 256], 2);
    const words = quantizeExpertValues(layout, 1, weightValues(4 * 256, 9));
    const floats = new Float32Array(words.buffer);
    const [before, after] = [new Float32Array(1024), new Float32Array(1024)];
    decodeQuantizedExpertInto(layout, words, 0, before, 0);
    floats.set(BNB_DYNAMIC_MAP.map(v => v * 0.5), layout.mapWord);
    decodeQuantizedExpertInto(layout, words, 0, after, 0);
    expect(Array.from(after)).to.deep.equal(Array.from(referenceDecode(layout, 1, words)));
    expect(Array.from(after)).to.not.deep.equal(Array.from(before));
    // transposed: the same values as a [E, in, out] weight quantize to the same words
    const values = weightValues(4 * 256, 9);
    const transposed = Float32Array.from({ length: 1024 }, (_, k) => values[(k % 4) * 256 + Math.floor(k / 4)]);
    const t = quantizeExpertValues(quantizedLayout('nf4-dq', [1, 256, 4], 1), 1, transposed);
    expect(Array.from(t)).to.deep.equal(Array.from(quantizeExpertValues(layout, 1, values)));
  });

  it('packExpertWeight(…, \'nf4-dq\') round trips within NF4\'s step of each value; scales() are the decoded absmax; nothing leaks', () => {
    const before = tf.memory().numTensors;
    const values = weightValues(2 * 32 * 512, 3);
    const w0 = tf.tensor3d(values, [2, 32, 512]);
    const w = packExpertWeight(w0, 'nf4-dq');
    const d = unpackExpertWeight(w);
    const got = d.dataSync();
    const scales = w.scales()!;
    const s = scales.dataSync();
    const layout = w.layout!;
    const words = w.packed.dataSync() as Int32Array;
    for (let e = 0; e < 2; e++) {
      const one = bnbDoubleQuant(values.subarray(e * 32 * 512, (e + 1) * 32 * 512), BNB_DYNAMIC_MAP);
      expect(Array.from(got.subarray(e * 32 * 512, (e + 1) * 32 * 512))).to.deep.equal(one.decoded);
      for (let g = 0; g < 256; g++) {
        const a = f32(f32(BNB_DYNAMIC_MAP[one.codes[g]] * one.nested[0]) + one.offset);
        expect(s[e * 256 + g]).to.equal(a);
      }
    }
    expect(words.length).to.equal(2 * layout.wordsPerExpert);
    tf.dispose([w0, w.packed, d, scales]);
    expect(tf.memory().numTensors).to.equal(before);
  });
});
