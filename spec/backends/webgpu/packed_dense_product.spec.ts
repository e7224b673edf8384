/**
 * Packed 16-bit dense weights read in place on WebGPU: MoEGatherPackedRows decodes only the looked-up
 * rows, bit for bit the host decode for every 16-bit pattern (words above 2^24, NaN, Inf, subnormal
 * halves); MoEPackedDenseMatMul's x·Wᵀ (+ b) and dy·W equal the decoded weight's tf.matMul within
 * float32 rounding and a float64 reference, over odd inputs, rows that are not whole tiles and
 * every tile preset, bf16 and f16, without decoding W (no MoEDecodePacked kernel runs) and without
 * leaks. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import {
  denseWeightMatMul, GATHER_PACKED_ROWS, gatherDenseRows, PACKED_DENSE_MATMUL, packedDenseWeightFromBits, unpackDenseWeight, type HalfKind,
} from '../../../src/ops/packed.js';
import { decodeBFloat16, decodeFloat16, encodeBFloat16, encodeFloat16 } from '../../../src/util/half.js';
import { expectCloseAsync, expectNoLeakAsync, productFloat64, profileKernels } from './helpers.js';

/** A deterministic stream of 16-bit patterns (any pattern: NaNs, infinities and subnormals included). */
function halfPatterns(count: number, seed: number): Uint16Array {
  let s = seed >>> 0;
  return Uint16Array.from({ length: count }, () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s >>> 16;
  });
}

/** Finite values in (−2, 2) rounded to `kind` (the products' operands), made on the host. */
function randomHalves(kind: HalfKind, count: number, seed: number): Uint16Array {
  const v = Float32Array.from(halfPatterns(count, seed), h => (h - 32768) / 16384);
  return kind === 'bf16' ? encodeBFloat16(v) : encodeFloat16(v);
}

const decodeHost = (kind: HalfKind, halves: Uint16Array) => kind === 'bf16' ? decodeBFloat16(halves) : decodeFloat16(halves);
const bitsOf = (v: Float32Array) => new Int32Array(v.buffer, v.byteOffset, v.length);

describe('webgpu: packed dense weights read in place (gather, products)', function () {
  this.timeout(60_000);
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    for (const k of [GATHER_PACKED_ROWS, PACKED_DENSE_MATMUL]) expect(tf.getKernel(k, 'webgpu'), k).to.not.equal(undefined);
  });

  for (const kind of ['bf16', 'f16'] as const) {
    it(`${kind}: gathers rows bit for bit the host decode, for every pattern; zeros outside the table; only those rows`, async () => {
      const [rows, cols] = [6, 7];
      const halves = halfPatterns(rows * cols, kind === 'bf16' ? 7 : 11);
      // row 0: 0x7f7f3f81-style words (tfjs's Gather rounds words above 2^24), NaN with a payload, ±Inf,
      // subnormals and -0; row 5 (the table's last) ends on the odd column
      const specials = kind === 'bf16'
        ? [0x3f81, 0x7f7f, 0x7fc1, 0xff80, 0x0001, 0x8003, 0x8000]
        : [0x3c01, 0x7bff, 0x7e01, 0xfc00, 0x0001, 0x83ff, 0x8000];
      halves.set(specials, 0);
      halves.set([0x7f80, 0xffff, 0x0400, 0x7c00, 0x03ff, 0xfc01, 0x3f81], 5 * cols);
      const want = decodeHost(kind, halves);
      await expectNoLeakAsync(async () => {
        const w = packedDenseWeightFromBits(kind, [rows, cols], halves);
        const ids = tf.tensor1d([5, 0, 3, 5, -1, 6, 1], 'int32');
        const got = gatherDenseRows(w, ids);
        expect(got.shape).to.deep.equal([7, cols]);
        const values = await got.data() as Float32Array;
        const expected = [5, 0, 3, 5, -1, 6, 1].flatMap(id => id < 0 || id >= rows ? Array(cols).fill(0) : Array.from(want.subarray(id * cols, (id + 1) * cols)));
        const [gotBits, wantBits] = [bitsOf(values), bitsOf(Float32Array.from(expected))];
        for (let i = 0; i < values.length; i++) {
          // a NaN stays NaN, its payload not compared: GPUs may canonicalize it on the f32 store (Mesa's
          // GL backend writes 0x7fc00000 for bf16 0xffff), and the host's f16 table has one NaN for all
          if (Number.isNaN(expected[i])) expect(values[i], `element ${i}`).to.be.NaN;
          else expect(gotBits[i], `element ${i} (0x${(wantBits[i] >>> 0).toString(16)})`).to.equal(wantBits[i]);
        }
        tf.dispose([got, ids, w.packed]);
      });
      const nans = Array.from(want).filter(Number.isNaN).length;
      expect(nans, 'the patterns hold NaNs').to.be.above(1);
    });

    it(`${kind}: a lookup runs one program and holds only the looked-up rows, never the float32 table`, async () => {
      const [rows, cols] = [512, 63];
      const w = packedDenseWeightFromBits(kind, [rows, cols], randomHalves(kind, rows * cols, 5));
      const ids = tf.tensor1d([511, 0, 7, 511], 'int32');
      await expectNoLeakAsync(async () => {
        const { kernels, peakBytes } = await profileKernels(() => gatherDenseRows(w, ids));
        expect(kernels).to.deep.equal([GATHER_PACKED_ROWS]);
        expect(peakBytes, 'peak bytes: the [4, 63] result').to.equal(4 * 4 * cols);
      });
      tf.dispose([ids, w.packed]);
    });
  }

  // (n, in, out): n picks the tile (2×4 below 64 rows, 4×4 vec4 from 64), none a whole tile
  const shapes: Array<[number, number, number]> = [[5, 7, 6], [70, 33, 19], [300, 65, 130]];
  for (const kind of ['bf16', 'f16'] as const) {
    for (const [n, inSize, out] of shapes) {
      it(`${kind} [${n}, ${inSize}] · W[${out}, ${inSize}]ᵀ + b and dy·W: the decoded product's values within rounding, W never decoded`, async () => {
        const packed = packedDenseWeightFromBits(kind, [out, inSize], randomHalves(kind, out * inSize, n));
        const wValues = decodeHost(kind, randomHalves(kind, out * inSize, n));
        const x = tf.randomNormal([n, inSize], 0, 1, 'float32', 1) as tf.Tensor2D;
        const dy = tf.randomNormal([n, out], 0, 1, 'float32', 2) as tf.Tensor2D;
        const bias = tf.randomNormal([out], 0, 1, 'float32', 3) as tf.Tensor1D;
        const [xv, dyv, bv] = await Promise.all([x.data(), dy.data(), bias.data()]) as Float32Array[];
        await expectNoLeakAsync(async () => {
          const W = unpackDenseWeight(packed);
          const cases = [
            { label: 'x·Wᵀ + b', got: denseWeightMatMul(x, packed, true, bias), decoded: tf.tidy(() => tf.add(tf.matMul(x, W, false, true), bias)),
              ref: productFloat64(xv, n, wValues, out, inSize, true, bv), shape: [n, out] },
            { label: 'x·Wᵀ', got: denseWeightMatMul(x, packed, true, null), decoded: tf.matMul(x, W, false, true),
              ref: productFloat64(xv, n, wValues, out, inSize, true, null), shape: [n, out] },
            { label: 'dy·W', got: denseWeightMatMul(dy, packed, false, null), decoded: tf.matMul(dy, W),
              ref: productFloat64(dyv, n, wValues, out, inSize, false, null), shape: [n, inSize] },
          ];
          for (const c of cases) {
            await expectCloseAsync(c.got, c.ref, 1e-6, `${c.label} vs float64`, c.shape);
            await expectCloseAsync(c.got, await c.decoded.data(), 1e-6, `${c.label} vs the decoded weight's tf.matMul`);
          }
          for (const [fn, label] of [[() => denseWeightMatMul(x, packed, true, bias), 'forward'], [() => denseWeightMatMul(dy, packed, false, null), 'dx']] as const) {
            const { kernels, peakBytes } = await profileKernels(fn);
            expect(kernels, `${label}: one program, W not decoded`).to.deep.equal([PACKED_DENSE_MATMUL]);
            expect(peakBytes, `${label}: peak bytes, the result only`).to.equal(4 * n * (label === 'dx' ? inSize : out));
          }
          tf.dispose([W, ...cases.flatMap(c => [c.got, c.decoded])]);
        });
        tf.dispose([x, dy, bias, packed.packed]);
      });
    }
  }

  it('an empty batch gives an empty product', async () => {
    const packed = packedDenseWeightFromBits('bf16', [3, 5], randomHalves('bf16', 15, 4));
    await expectNoLeakAsync(async () => {
      const x = tf.zeros([0, 5]) as tf.Tensor2D;
      const y = denseWeightMatMul(x, packed, true, null);
      expect(y.shape).to.deep.equal([0, 3]);
      expect(Array.from(await y.data())).to.deep.equal([]);
      tf.dispose([x, y]);
    });
    packed.dispose();
  });
});
