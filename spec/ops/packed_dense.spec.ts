/**
 * PackedDenseWeight: a frozen 2-D weight in bf16/f16 halves (the expert wrapper, one expert per
 * row). Decoding against an independent decode of the bits (bf16: the high half of an f32; f16:
 * its formula), row gathers, loraLinear with a packed base bit for bit equal to the same op on
 * the decoded float32 weight (value and gradients) without leaking, and every refusal.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { loraLinear, type LinearLoRABranch } from '../../src/ops/lora/linear.js';
import {
  PackedDenseWeight, gatherDenseRows, packDenseWeight, packedDenseWeightFromBits, unpackDenseWeight, type HalfKind,
} from '../../src/ops/packed.js';

/** The 16-bit values decoded by their definition, in float64 (exactly representable in float32). */
function decodeHalf(kind: HalfKind, h: number): number {
  if (kind === 'bf16') {
    const f = new Float32Array(1);
    new Uint32Array(f.buffer)[0] = h << 16;
    return f[0];
  }
  const e = (h >> 10) & 0x1f;
  const m = h & 0x3ff;
  return (h & 0x8000 ? -1 : 1) * (e === 0 ? m * 2 ** -24 : (1 + m / 1024) * 2 ** (e - 15));
}

/** Deterministic finite 16-bit values (bf16: |x| < 2^8; f16: normal and subnormal). */
function halvesOf(kind: HalfKind, n: number, seed: number): Uint16Array {
  const out = new Uint16Array(n);
  let s = seed;
  for (let i = 0; i < n; i++) {
    s = (s * 1103515245 + 12345) >>> 0;
    const sign = (s >>> 31) << 15;
    out[i] = kind === 'bf16' ? sign | (0x3a00 + ((s >>> 8) & 0x7ff)) : sign | ((s >>> 4) & 0x77ff);
  }
  return out;
}

function bitsOf(t: tf.Tensor): number[] {
  const v = t.dataSync() as Float32Array;
  return Array.from(new Int32Array(v.buffer, v.byteOffset, v.length));
}

describe('PackedDenseWeight (16-bit frozen 2-D weights)', () => {
  for (const kind of ['bf16', 'f16'] as const) {
    for (const [rows, cols] of [[6, 8], [5, 7]]) {
      it(`${kind} [${rows}, ${cols}]: decodes to the definition's values; a row gather decodes only those rows`, () => {
        const before = tf.memory().numTensors;
        const halves = halvesOf(kind, rows * cols, rows * 31 + cols);
        const w = packedDenseWeightFromBits(kind, [rows, cols], halves);
        expect(w.shape).to.deep.equal([rows, cols]);
        expect(w.packed.dtype).to.equal('int32');
        expect(w.packed.shape).to.deep.equal([rows, Math.ceil(cols / 2)]);
        const want = Array.from(halves, h => decodeHalf(kind, h));
        const all = unpackDenseWeight(w);
        expect(all.shape).to.deep.equal([rows, cols]);
        expect(Array.from(all.dataSync())).to.deep.equal(want);
        const ids = tf.tensor1d([rows - 1, 0, rows - 1, 2], 'int32');
        const picked = gatherDenseRows(w, ids);
        expect(Array.from(picked.dataSync())).to.deep.equal([rows - 1, 0, rows - 1, 2].flatMap(r => want.slice(r * cols, (r + 1) * cols)));
        const noIds = tf.tensor1d([], 'int32');
        const none = gatherDenseRows(w, noIds);
        expect(none.shape).to.deep.equal([0, cols]);
        // packing the decoded values gives the same words (bf16/f16 → f32 → bf16/f16 is exact)
        const again = packDenseWeight(all, kind);
        expect(Array.from(again.packed.dataSync())).to.deep.equal(Array.from(w.packed.dataSync()));
        tf.dispose([all, ids, noIds, picked, none, again.packed, w.packed]);
        expect(tf.memory().numTensors, 'no tensor leaked').to.equal(before);
      });
    }
  }

  it('loraLinear with a packed base: value and gradients bit for bit those of the decoded float32 base, no leak', () => {
    const [n, inSize, out, r] = [5, 8, 6, 2];
    const packed = packedDenseWeightFromBits('bf16', [out, inSize], halvesOf('bf16', out * inSize, 7));
    const W = unpackDenseWeight(packed);
    const x = tf.randomNormal([n, inSize], 0, 1, 'float32', 1) as tf.Tensor2D;
    const A = tf.randomNormal([r, inSize], 0, 1, 'float32', 2) as tf.Tensor2D;
    const B = tf.randomNormal([out, r], 0, 1, 'float32', 3) as tf.Tensor2D;
    const bias = tf.randomNormal([out], 0, 1, 'float32', 4) as tf.Tensor1D;
    const g = tf.randomNormal([n, out], 0, 1, 'float32', 5);
    const branches = (a: tf.Tensor, b: tf.Tensor): LinearLoRABranch[] => [{ A: a as tf.Tensor2D, B: b as tf.Tensor2D, scaling: 2 }];
    const run = (base: tf.Tensor2D | PackedDenseWeight) =>
      tf.grads((xs: tf.Tensor, a: tf.Tensor, b: tf.Tensor) => tf.sum(tf.mul(loraLinear(xs as tf.Tensor2D, base, bias, branches(a, b)), g)))([x, A, B]);
    const before = tf.memory().numTensors;
    const fromPacked = run(packed);
    expect(tf.memory().numTensors - before, 'only the three gradients are left').to.equal(3);
    const fromFloat = run(W);
    fromPacked.forEach((t, i) => expect(bitsOf(t), `gradient ${i}`).to.deep.equal(bitsOf(fromFloat[i])));
    const [y1, y2] = [loraLinear(x, packed, bias, branches(A, B)), loraLinear(x, W, bias, branches(A, B))];
    expect(bitsOf(y1)).to.deep.equal(bitsOf(y2));
    tf.dispose([...fromPacked, ...fromFloat, y1, y2, W, x, A, B, bias, g, packed.packed]);
  });

  it('refuses bad arguments by name', () => {
    const words = tf.zeros([3, 2], 'int32');
    expect(() => new PackedDenseWeight('int8' as 'bf16', [3, 4], words))
        .to.throw(/PackedDenseWeight.*'kind' must be one of 'bf16', 'f16' but got "int8"/);
    expect(() => new PackedDenseWeight('bf16', [3, 4, 1], words))
        .to.throw(/PackedDenseWeight.*'shape' must be \[rows, cols\] of positive integers but got \[3,4,1\]/);
    expect(() => new PackedDenseWeight('bf16', [3, 6], words))
        .to.throw(/'packed' must be an int32 tensor \[3, 3\] \(bf16 halves of \[3,1,6\]\) but got a int32 tensor of shape \[3,2\]/);
    expect(() => packedDenseWeightFromBits('bf16', [2, 2], new Uint16Array(3)))
        .to.throw(/packedDenseWeightFromBits.*'halves' must be a Uint16Array of 4 values \(shape \[2,2\]\) but got 3 values/);
    expect(() => packedDenseWeightFromBits('bf16', [2, 0], new Uint16Array(0)))
        .to.throw(/packedDenseWeightFromBits.*'shape' must be \[rows, cols\] of positive integers but got \[2,0\]/);
    expect(() => packedDenseWeightFromBits('fp8' as 'bf16', [1, 2], new Uint16Array(2)))
        .to.throw(/packedDenseWeightFromBits.*'kind' must be one of 'bf16', 'f16' but got "fp8"/);
    const w = new PackedDenseWeight('f16', [3, 4], words);
    expect(() => packDenseWeight(w as unknown as tf.Tensor2D, 'bf16')).to.throw(/packDenseWeight.*'weight' is already packed \(f16\)/);
    const f = tf.zeros([2, 2]) as tf.Tensor2D;
    expect(() => packDenseWeight(f, 'nf4' as 'bf16')).to.throw(/packDenseWeight.*'kind' must be one of 'bf16', 'f16' but got "nf4"/);
    const floatIds = tf.tensor1d([0.5]);
    expect(() => gatherDenseRows(w, floatIds))
        .to.throw(/gatherDenseRows.*'indices' must be a 1-D int32 tensor but got a float32 tensor of shape \[1\]/);
    expect(() => unpackDenseWeight(null as unknown as tf.Tensor2D))
        .to.throw(/unpackDenseWeight.*'weight' must be a 2-D float32 tensor or a PackedDenseWeight but got null/);
    expect(() => unpackDenseWeight(tf.zeros([2, 2, 2]) as unknown as tf.Tensor2D)).to.throw(/unpackDenseWeight.*'weight' must be 2-D but got shape \[2,2,2\]/);
    expect(() => unpackDenseWeight(tf.zeros([2, 2], 'int32') as tf.Tensor2D))
        .to.throw(/unpackDenseWeight.*'weight' must be float32 or a PackedDenseWeight but got int32 \(shape \[2,2\]\)/);
    const gone = tf.zeros([2, 2]) as tf.Tensor2D;
    gone.dispose();
    expect(() => unpackDenseWeight(gone)).to.throw(/unpackDenseWeight.*'weight' was already disposed/);
    tf.dispose([words, f, floatIds]);
  });
});
