/**
 * The fast quantizer (src/ops/quantized.ts: table lookups, one pass per group, codes gathered a
 * word at a time) against the formulas written out plainly (spec/helpers/quantize_reference.ts,
 * the loop it replaced): every word equal, on data made to hit the edges: exact ties of each
 * kind's rounding, values one float32 step either side of NF4's midpoints, zeros and −0,
 * subnormal values and groups, huge values, rows whose length is not a multiple of 8 (codes that
 * share a word across rows), both input axes; and the same error for NaN and ±Infinity.
 */
import { expect } from 'chai';
import { INT4_GROUP_SIZES, NF4_CODE_BOOK, QUANTIZED_KINDS, quantizedLayout, quantizeExpertValues } from '../../src/ops/quantized.js';
import { referenceQuantizeExpert } from '../helpers/quantize_reference.js';
import { Rng } from '../helpers/numeric.js';

const f32 = Math.fround;

function nextUp(x: number): number {
  const b = new Float32Array([x]);
  const u = new Int32Array(b.buffer);
  if (x === 0) return 2 ** -149;
  u[0] += x > 0 ? 1 : -1;
  return b[0];
}
function nextDown(x: number): number { return -nextUp(-x); }

/** Rows of `inputs` values, each row one kind of edge (cycled), the rest random with outliers. */
function edgeValues(rows: number, inputs: number, seed: number): Float32Array {
  const rng = new Rng(seed);
  const v = new Float32Array(rows * inputs);
  const nf4Mid = Array.from({ length: 15 }, (_, c) => (NF4_CODE_BOOK[c] + NF4_CODE_BOOK[c + 1]) / 2);
  // period-32 patterns, so every group (32, 64, 128) of a pattern row holds the pattern's ends
  const int4Ties = [0, 15, ...Array.from({ length: 15 }, (_, k) => k + 0.5), ...Array.from({ length: 15 }, (_, k) => k)];
  const mxTies = [4, -4, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 6, 7.75, -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5, 5.5, -6.5,
    0.125, 3, 2, 1, 0.5, 0, -0, 4.5, 2.25, 1.125, 7.5, -7.75];
  const nf4Near = [1, -1, ...nf4Mid.flatMap(m => [f32(m), nextUp(f32(m)), nextDown(f32(m))]).slice(0, 30)];
  for (let r = 0; r < rows; r++) {
    const row = v.subarray(r * inputs, (r + 1) * inputs);
    switch (r % 9) {
      case 0: row.forEach((_, i) => { row[i] = i === 0 ? 127 : (rng.int(255) - 127) + (i % 2 ? 0.5 : 0); }); break;  // int8 ties (scale 1)
      case 1: row.forEach((_, i) => { row[i] = int4Ties[i % 32]; }); break;
      case 2: row.forEach((_, i) => { row[i] = mxTies[i % 32]; }); break;
      case 3: row.forEach((_, i) => { row[i] = nf4Near[i % 32] * (i % 64 < 32 ? 1 : -1); }); break;
      case 4: row.forEach((_, i) => { row[i] = i % 3 === 0 ? -0 : 0; }); break;
      case 5: row.forEach((_, i) => { row[i] = (rng.uniform() - 0.5) * 2 ** -130 + (i % 7 === 0 ? 2 ** -149 : 0); }); break;  // subnormal groups
      case 6: row.forEach((_, i) => { row[i] = i % 40 < 20 ? (rng.uniform() - 0.5) * 3e38 : rng.normal() * 1e-39; }); break;
      case 7: row.forEach((_, i) => { row[i] = i % 50 < 25 ? 0 : rng.normal(); }); break;  // groups of zeros in a row
      default: row.forEach((_, i) => { row[i] = rng.normal() * 0.03 * (i % 37 === 0 ? 20 : 1); });
    }
  }
  return v;
}

function expectSameWords(kind: typeof QUANTIZED_KINDS[number], shape: number[], axis: 1 | 2, g: number | undefined, values: Float32Array): void {
  const layout = quantizedLayout(kind, shape, axis, g);
  const fast = quantizeExpertValues(layout, shape[0], values);
  const block = shape[1] * shape[2];
  for (let e = 0; e < shape[0]; e++) {
    const ref = referenceQuantizeExpert(layout, values, e * block);
    const got = fast.subarray(e * layout.wordsPerExpert, (e + 1) * layout.wordsPerExpert);
    for (let w = 0; w < ref.length; w++) {
      if (got[w] !== ref[w]) {
        expect.fail(`${kind} [${shape}] axis ${axis} g${g} expert ${e} word ${w}` +
            ` (${w < layout.scaleWord ? 'codes' : 'scales/zeros'}): ${got[w].toString(16)} but the formula gives ${ref[w].toString(16)}`);
      }
    }
  }
}

describe('the fast quantizer equals the formulas bit for bit', () => {
  for (const kind of QUANTIZED_KINDS) {
    it(`${kind}: ties, near-ties, zeros, subnormals, huge values, rows not a multiple of 8, both input axes`, () => {
      const groups = kind === 'int4' ? INT4_GROUP_SIZES : [undefined];
      // [E, out, in]: 100 inputs (ragged last groups, rows sharing words), 256 (whole groups); 9 rows per edge cycle
      for (const [outputs, inputs] of [[18, 100], [9, 256], [5, 13]]) {
        for (const g of groups) {
          const values = edgeValues(2 * outputs, inputs, outputs + inputs);
          expectSameWords(kind, [2, outputs, inputs], 2, g, values);
          // axis 1: the same values read as [E, in, out] (the input strided)
          expectSameWords(kind, [2, inputs, outputs], 1, g, values);
        }
      }
    });
  }

  it('the NF4 table and the E2M1 quarters agree with the midpoints on 10^6 random values and every float32 near a midpoint', () => {
    // through the whole quantizer: one group of 64 with absmax 1 (x = v exactly)
    const layout = quantizedLayout('nf4', [1, 1, 64], 2);
    const rng = new Rng(5);
    const values = new Float32Array(64);
    for (let rep = 0; rep < 16000; rep++) {
      values[0] = rep % 2 ? 1 : -1;
      for (let i = 1; i < 64; i++) values[i] = rng.uniform() * 2 - 1;
      const got = quantizeExpertValues(layout, 1, values);
      const ref = referenceQuantizeExpert(layout, values, 0);
      if (got.some((w, i) => w !== ref[i])) expect.fail(`nf4 random group ${rep} differs`);
    }
  });

  for (const [bad, label] of [[NaN, 'NaN'], [Infinity, 'Infinity'], [-Infinity, '-Infinity']] as const) {
    it(`every kind refuses ${label} with the formula's message, naming the first non-finite value`, () => {
      for (const kind of QUANTIZED_KINDS) {
        const values = edgeValues(4, 100, 3);
        values[150] = bad;            // row 1
        values[390] = Number.isNaN(bad) ? Infinity : NaN;  // a later row: not the one named
        const layout = quantizedLayout(kind, [1, 4, 100], 2);
        let refMessage = '';
        try { referenceQuantizeExpert(layout, values, 0); } catch (e) { refMessage = (e as Error).message; }
        expect(refMessage).to.equal(`'values' must be finite to be quantized (${kind}) but holds ${label}`);
        expect(() => quantizeExpertValues(layout, 1, values)).to.throw(`\`quantizeExpertValues()\`: ${refMessage}`);
      }
    });
  }
});
