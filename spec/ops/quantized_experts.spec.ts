import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { fusedExperts } from '../../src/ops/experts/fused_experts.js';
import { GROUPED_MATMUL } from '../../src/ops/experts/kernels.js';
import { PackedExpertWeight, packedExpertGroup, packExpertWeight, unpackExpertWeight } from '../../src/ops/packed.js';
import {
  BNB_DYNAMIC_MAP, E2M1_VALUES, NF4_CODE_BOOK, QUANTIZED_KINDS, quantizedLayout, quantizeExpertValues, type QuantizedKind,
} from '../../src/ops/quantized.js';
import { referenceExperts } from '../../src/ops/reference/moe_block.js';
import type { LoRAMode } from '../../src/ops/types.js';
import { makePackedCase, PACKED_CASE_GRAD_NAMES, packedCaseGrads, type PackedCase } from '../helpers/packed_case.js';
import { referenceDecode } from '../helpers/quantized_reference.js';
import { expectClose, expectNoLeak, Rng } from '../helpers/numeric.js';

/** The quantized block equals the float32 block run on the reference-decoded values (≤ 1e-5). */
function expectSameAsDequantized(c: PackedCase, loraMode: LoRAMode, label: string): void {
  const quantized = packedCaseGrads(c, fusedExperts, c.gateUp, c.down, { loraMode });
  const plain = packedCaseGrads(c, fusedExperts, c.gateUp32, c.down32, { loraMode });
  quantized.forEach((t, i) => expectClose(t, plain[i], 1e-5, `${label} ${PACKED_CASE_GRAD_NAMES[i]}`));
  tf.dispose([...quantized, ...plain]);
}

/** Random weights [E, rows, cols] with a spread of magnitudes per row (outliers, zeros). */
function weightValues(seed: number, size: number): Float32Array {
  const rng = new Rng(seed);
  const v = Float32Array.from(rng.array(size, 0.7));
  for (let i = 0; i < size; i += 37) v[i] *= 9;   // outliers
  for (let i = 5; i < size; i += 41) v[i] = 0;
  return v;
}

describe('quantized expert weights (int8, int4, NF4, MXFP4)', () => {
  describe('the formats', () => {
    it("NF4's code book is bitsandbytes' 16 float32 values, MXFP4's the 16 e2m1 values", () => {
      expect(Array.from(NF4_CODE_BOOK)).to.deep.equal([
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
      ].map(Math.fround));
      expect(Array.from(E2M1_VALUES)).to.deep.equal([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0, -0.5, -1, -1.5, -2, -3, -4, -6]);
    });

    it('lays out codes, then scales (then zeros), per expert: the sizes of each format', () => {
      // [E, out 6, in 100]: int8 one scale per output; int4 g32 → 4 groups (the last of 4 inputs)
      const shape = [2, 6, 100];
      const words = (k: QuantizedKind, g?: number) => quantizedLayout(k, shape, 2, g).wordsPerExpert;
      expect(words('int8')).to.equal(600 / 4 + 6);
      expect(words('int4', 32)).to.equal(600 / 8 + 2 * 6 * 4);
      expect(words('int4')).to.equal(600 / 8 + 2 * 6 * 2);
      expect(words('nf4')).to.equal(600 / 8 + 6 * 2);
      expect(words('mxfp4')).to.equal(600 / 8 + Math.ceil((6 * 4) / 4));
      // nf4-dq: a code byte per group, a nested absmax and an offset per 256 groups, the 256-entry map
      expect(words('nf4-dq')).to.equal(600 / 8 + Math.ceil((6 * 2) / 4) + 2 + 256);
      // the input on axis 1 ([E, in, out]): the same sizes with rows and cols swapped
      expect(quantizedLayout('nf4', [2, 100, 6], 1).wordsPerExpert).to.equal(words('nf4'));
    });

    it('a hand-made MXFP4 expert decodes as gpt-oss stores it: low nibble first, E2M1·2^(e − 127)', () => {
      // [1, out 1, in 32]: byte 0 = 0x21 → inputs 0, 1 are codes 1 (0.5) and 2 (1); byte 1 = 0xf9 → −0.5, −6
      const words = new Int32Array(quantizedLayout('mxfp4', [1, 1, 32], 2).wordsPerExpert);
      const bytes = new Uint8Array(words.buffer);
      bytes[0] = 0x21;
      bytes[1] = 0xf9;
      bytes[16] = 129;   // the scale byte, after the 4 words of codes: 2^2
      const w = new PackedExpertWeight('mxfp4', [1, 1, 32], tf.tensor2d(words, [1, words.length], 'int32'));
      const d = unpackExpertWeight(w);
      expect(Array.from(d.dataSync()).slice(0, 5)).to.deep.equal([2, 4, -2, -24, 0]);
      tf.dispose([w.packed, d]);
    });

    for (const kind of QUANTIZED_KINDS) {
      for (const axis of [2, 1] as const) {
        it(`${kind}, input on axis ${axis}: the decode equals the format's formula bit for bit (a ragged last group too)`, () => {
          // 72 inputs: the last group of 64 (or 32) is partial; int4 at each group size
          const sizes = kind === 'int4' ? [32, 64, 128] : [undefined];
          for (const g of sizes) {
            const shape = axis === 2 ? [3, 10, 72] : [3, 72, 10];
            const layout = quantizedLayout(kind, shape, axis, g);
            const words = quantizeExpertValues(layout, 3, weightValues(3, 3 * 720));
            const w = new PackedExpertWeight(kind, shape, tf.tensor2d(words, [3, layout.wordsPerExpert], 'int32'), { inputAxis: axis, groupSize: g });
            const decoded = unpackExpertWeight(w);
            const expected = referenceDecode(layout, 3, words);
            const got = decoded.dataSync() as Float32Array;
            for (let i = 0; i < expected.length; i++) {
              if (!Object.is(got[i], expected[i])) expect.fail(`${kind} g${g} element ${i}: ${got[i]} but the formula gives ${expected[i]}`);
            }
            // one expert group (the composed fallback's decode) equals its slice
            const group = packedExpertGroup(w, 1);
            expect(Array.from(group.dataSync())).to.deep.equal(Array.from(expected.subarray(720, 1440)));
            tf.dispose([w.packed, decoded, group]);
          }
        });
      }
    }

    it("round trip: each entry within the format's own bound", () => {
      const shape = [2, 8, 192];
      const values = weightValues(7, 2 * 8 * 192);
      const w0 = tf.tensor3d(values, shape as [number, number, number]);
      const maxMapGap = Math.max(...Array.from(BNB_DYNAMIC_MAP.subarray(1), (v, k) => v - BNB_DYNAMIC_MAP[k]));
      for (const kind of QUANTIZED_KINDS) {
        const w = packExpertWeight(w0, kind);
        const layout = w.layout!;
        const decoded = unpackExpertWeight(w).dataSync();
        const scales = w.scales()!;
        const s = scales.dataSync();
        let worst = 0;
        for (let e = 0; e < 2; e++) {
          for (let o = 0; o < 8; o++) {
            for (let i = 0; i < 192; i++) {
              const at = e * 8 * 192 + o * 192 + i;
              const grp = e * 8 * layout.groupsPerOutput + o * layout.groupsPerOutput + Math.floor(i / layout.groupSize);
              const err = Math.abs(values[at] - decoded[at]);
              // the format's step: int8 and int4 half a step (plus float32 rounding of the decode);
              // NF4 half the widest gap of its code book (−1 … −0.696) times absmax; MXFP4 one step
              // of the largest e2m1 gap (2·2^e) once saturated at 6·2^e, so at most 2^(e+1)
              // nf4-dq: NF4's bound around the true absmax, which the decoded one s misses by at most
              // half the widest gap of the 8-bit map times the nested absmax (δ)
              const nested = new Float32Array(w.packed.dataSync().buffer)[e * layout.wordsPerExpert + layout.nestedWord + Math.floor(grp / 256)];
              const delta = nested * (maxMapGap / 2) * (1 + 2 ** -20);
              const bound = kind === 'int8' || kind === 'int4' ? s[grp] * (0.5 + 2 ** -18) + Math.abs(values[at]) * 2 ** -23 :
                kind === 'nf4' ? s[grp] * ((1 - 0.6961928009986877) / 2) * (1 + 2 ** -20) :
                kind === 'nf4-dq' ? (s[grp] + delta) * ((1 - 0.6961928009986877) / 2) * (1 + 2 ** -20) + delta : s[grp] * 2;
              if (err > bound) expect.fail(`${kind} (${e}, ${o}, ${i}): |${values[at]} − ${decoded[at]}| > ${bound}`);
              worst = Math.max(worst, err / (bound || 1));
            }
          }
        }
        expect(worst, kind).to.be.greaterThan(0.05);  // the bound is not vacuous
        tf.dispose([w.packed, scales]);
      }
      w0.dispose();
    });

    it('int4 keeps its zero points; int8 and NF4 have none; an all-zero group decodes to zeros', () => {
      const w0 = tf.zeros([1, 2, 64]) as tf.Tensor3D;
      for (const kind of QUANTIZED_KINDS) {
        const w = packExpertWeight(w0, kind);
        const zeros = w.zeros();
        expect(zeros === null, kind).to.equal(kind !== 'int4');
        const d = unpackExpertWeight(w);
        expect(Array.from(d.dataSync()).every(v => v === 0), kind).to.equal(true);
        const codes = w.codes();
        expect(codes.shape).to.deep.equal([1, kind === 'int8' ? 32 : 16]);
        tf.dispose([w.packed, d, codes, zeros ?? []]);
      }
      w0.dispose();
    });

    it('refuses bad kinds, group sizes, input axes, values and packed tensors, naming the argument', () => expectNoLeak(() => {
      const w0 = tf.ones([2, 4, 64]) as tf.Tensor3D;
      expect(() => packExpertWeight(w0, 'int3' as 'int4')).to.throw(/`packExpertWeight\(\)`: 'kind' must be one of 'bf16', 'f16', 'int8', 'int4', 'nf4', 'nf4-dq', 'mxfp4' but got "int3"/);
      expect(() => packExpertWeight(w0, 'int4', { groupSize: 48 })).to.throw(/`packExpertWeight\(\)`: 'groupSize' of int4 must be one of 32, 64, 128 but got 48/);
      expect(() => packExpertWeight(w0, 'nf4', { groupSize: 32 })).to.throw(/'groupSize' is fixed for nf4 \(64\) but got 32/);
      expect(() => packExpertWeight(w0, 'int8', { groupSize: 32 })).to.throw(/'groupSize' is fixed for int8 \(one scale per output: 64\) but got 32/);
      expect(() => packExpertWeight(w0, 'int8', { inputAxis: 0 as 1 })).to.throw(/'inputAxis' must be 1 or 2 but got 0/);
      expect(() => packExpertWeight(w0, 'bf16', { groupSize: 64 })).to.throw(/`packExpertWeight\(\)`: 'options' are for quantized kinds, not bf16/);
      const bad = tf.fill([1, 1, 4], NaN) as tf.Tensor3D;
      expect(() => packExpertWeight(bad, 'int8')).to.throw(/`packExpertWeight\(\)`: 'weight' must be finite to be quantized \(int8\) but holds NaN/);
      expect(() => quantizeExpertValues(quantizedLayout('nf4', [1, 1, 4], 2), 1, Float32Array.of(1, Infinity, 0, 0))).to.throw(
          /`quantizeExpertValues\(\)`: 'values' must be finite to be quantized \(nf4\) but holds Infinity/);
      bad.dispose();
      const words = tf.zeros([2, 5], 'int32');
      expect(() => new PackedExpertWeight('nf4', [2, 4, 64], words)).to.throw(
          /`PackedExpertWeight\(\)`: 'packed' must be an int32 tensor \[2, 36\] \(nf4 words of \[2,4,64\]\) but got a int32 tensor of shape \[2,5\]/);
      expect(() => new PackedExpertWeight('bf16', [2, 4, 64], words, { groupSize: 64 })).to.throw(/'groupSize' is for quantized kinds, not bf16/);
      expect(() => quantizeExpertValues(quantizedLayout('int8', [1, 2, 4], 2), 1, new Float32Array(3))).to.throw(
          /`quantizeExpertValues\(\)`: 'values' must be a Float32Array of 8 values but got 3 values/);
      tf.dispose([w0, words]);
    }));
  });

  describe('fusedExperts on quantized weights equals the float32 block on the dequantized values (≤ 1e-5)', () => {
    const dims = { T: 9, H: 64, I: 40, E: 4, K: 2, r: 2 };
    for (const kind of QUANTIZED_KINDS) {
      for (const loraMode of ['split', 'materialize'] as const) {
        it(`${kind}, LoRA ${loraMode}: output and the gradients of x and of every LoRA factor`, () => {
          const c = makePackedCase(kind, dims, 31);
          expectSameAsDequantized(c, loraMode, `${kind} ${loraMode}`);
          c.dispose();
        });
      }
    }

    it('gpt-oss layout (input on axis 1, biases, clamped activation): nf4, nf4-dq, mxfp4 and int4 g32', () => {
      for (const [kind, g] of [['nf4', undefined], ['nf4-dq', undefined], ['mxfp4', undefined], ['int4', 32]] as const) {
        const c = makePackedCase(kind, { ...dims, I: 32 }, 32, 'inOutInterleaved', g);
        expectSameAsDequantized(c, 'split', `${kind} gpt-oss`);
        c.dispose();
      }
    });

    it('nf4-dq over several nested blocks of 256 groups (gate_up 512 groups an expert, down 256)', () => {
      const c = makePackedCase('nf4-dq', { ...dims, H: 256, I: 64 }, 35);
      expectSameAsDequantized(c, 'split', 'nf4-dq 2 nested blocks');
      c.dispose();
    });

    it('the composed fallback (no grouped-product kernel) decodes one expert group at a time, same results', () => {
      for (const kind of ['int4', 'nf4-dq'] as const) {
        const c = makePackedCase(kind, dims, 33);
        const saved = tf.getKernel(GROUPED_MATMUL, tf.getBackend());
        if (saved) tf.unregisterKernel(GROUPED_MATMUL, tf.getBackend());
        try {
          expectSameAsDequantized(c, 'split', `composed ${kind}`);
        } finally {
          if (saved) tf.registerKernel(saved);
        }
        c.dispose();
      }
    });

    it('the reference block (the oracle) decodes them too; the base is frozen and leaks nothing', () => {
      const c = makePackedCase('nf4', dims, 34);
      const routing = { weights: c.routingWeights, experts: c.experts };
      const before = tf.memory().numTensors;
      const a = referenceExperts(c.x, routing, { gateUp: c.gateUp, down: c.down, layout: c.layout }, c.activation);
      const b = referenceExperts(c.x, routing, { gateUp: c.gateUp32, down: c.down32, layout: c.layout }, c.activation);
      expectClose(a, b, 1e-6, 'reference nf4');
      tf.dispose([a, b]);
      expect(tf.memory().numTensors).to.equal(before);
      const { grads } = tf.valueAndGrads((x: tf.Tensor) => tf.sum(fusedExperts(x as tf.Tensor2D, routing,
          { gateUp: c.gateUp, down: c.down, layout: c.layout }, c.activation)))([c.x]);
      expect(grads).to.have.length(1);
      tf.dispose(grads);
      expect(() => fusedExperts(c.x, routing, { gateUp: c.gateUp, down: c.down, layout: c.layout }, c.activation,
          { trainExpertWeights: true })).to.throw(/frozen/);
      c.dispose();
    });
  });
});
