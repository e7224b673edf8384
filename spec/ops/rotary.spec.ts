/**
 * applyRotary (one customGrad: x·cos + reverse(x)·signed sin, and its transpose) against float64
 * and finite differences and against the composed applyRotaryReference's tfjs gradient, for both
 * table layouts; applyRotaryToHeads (the same on x [B, S, heads, D], the heads moved to [B·heads, S, D])
 * against float64 of the transposed x and finite differences. Reads are awaited, so this runs on webgpu too (spec/backends/webgpu/layer_ops.spec.ts).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { applyRotary, applyRotaryToHeads } from '../../src/ops/rotary.js';
import { applyRotaryReference, rotaryTables, rotaryTablesAt } from '../../src/layers/rotary.js';
import { expectCloseAsync, expectNoLeakAsync } from '../backends/webgpu/helpers.js';
import { asF32, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

/**
 * float64 x·cos + rotateHalf(x)·sin on x [N, S, D]; tables [S, D] (b = 0) or [B, S, D] with
 * row n reading table n / (N / B).
 */
function rope64(x: Float64Array, cos: Float64Array, sin: Float64Array, n: number, s: number, d: number, b: number): Float64Array {
  const out = new Float64Array(x.length);
  const half = d / 2;
  for (let a = 0; a < n; a++) {
    const table = b === 0 ? 0 : Math.floor(a / (n / b));
    for (let p = 0; p < s; p++) {
      const base = (a * s + p) * d;
      const at = (table * s + p) * d;
      for (let i = 0; i < d; i++) {
        const rotated = i < half ? -x[base + i + half] : x[base + i - half];
        out[base + i] = x[base + i] * cos[at + i] + rotated * sin[at + i];
      }
    }
  }
  return out;
}

interface RopeCase { name: string; n: number; s: number; d: number; tables: () => { cos: tf.Tensor; sin: tf.Tensor } }

const rng = new Rng(23);
const CASES: RopeCase[] = [
  { name: 'shared tables [S, D] (rotaryTables)', n: 6, s: 5, d: 8, tables: () => rotaryTables(5, 8, 100) },
  {
    name: 'per-row tables [B, S, D] (rotaryTablesAt, packed positions), 3 heads per row', n: 6, s: 4, d: 6,
    tables: () => tf.tidy(() => {
      const ids = tf.tensor2d([[0, 1, 2, 0], [0, 1, 0, 1]], [2, 4], 'int32');
      return rotaryTablesAt(ids, 6, 50, 4);
    }),
  },
  {
    name: 'per-row tables [B, S, D], one head per row (MLA\'s shared rope key)', n: 2, s: 3, d: 4,
    tables: () => tf.tidy(() => rotaryTablesAt(tf.tensor2d([[2, 0, 1], [1, 2, 0]], [2, 3], 'int32'), 4, 10, 3)),
  },
  {
    // halves that differ: the op must not lean on the tables' repeated halves
    name: 'arbitrary tables [S, D]', n: 2, s: 3, d: 4,
    tables: () => ({ cos: tensorOf(asF32(rng.array(12)), [3, 4]), sin: tensorOf(asF32(rng.array(12)), [3, 4]) }),
  },
  {
    // D a multiple of 8 (webgpu's RotaryProgram takes quads), arbitrary per-row tables, 2 heads per row
    name: 'arbitrary per-row tables [B, S, D], D 16', n: 4, s: 3, d: 16,
    tables: () => ({ cos: tensorOf(asF32(rng.array(96)), [2, 3, 16]), sin: tensorOf(asF32(rng.array(96)), [2, 3, 16]) }),
  },
];

describe('ops/applyRotary', () => {
  for (const c of CASES) {
    it(`${c.name}: float64, finite differences and the composed reference`, async () => {
      const { n, s, d } = c;
      const { cos, sin } = c.tables();
      const b = cos.rank === 3 ? cos.shape[0] : 0;
      const [cos64, sin64] = [Float64Array.from(await cos.data()), Float64Array.from(await sin.data())];
      const x = asF32(rng.array(n * s * d));
      const g = asF32(rng.array(n * s * d));
      const [xt, gt] = [tensorOf(x, [n, s, d]) as tf.Tensor3D, tensorOf(g, [n, s, d])];
      const tables = [cos, sin] as [tf.Tensor2D, tf.Tensor2D];
      await expectNoLeakAsync(async () => {
        const y = applyRotary(xt, ...tables);
        await expectCloseAsync(y, rope64(x, cos64, sin64, n, s, d, b), 1e-6, 'forward', [n, s, d]);
        const dx = tf.grad((a: tf.Tensor) => tf.sum(tf.mul(applyRotary(a as tf.Tensor3D, ...tables), gt)))(xt);
        const composed = tf.grad((a: tf.Tensor) => tf.sum(tf.mul(applyRotaryReference(a as tf.Tensor3D, ...tables), gt)))(xt);
        const fd = finiteDifferences(v => rope64(v, cos64, sin64, n, s, d, b).reduce((acc, val, i) => acc + val * g[i], 0), x);
        await expectCloseAsync(dx, fd, 1e-5, 'dx against finite differences', [n, s, d]);
        await expectCloseAsync(dx, await composed.data(), 1e-6, 'dx against the composed reference', [n, s, d]);
        tf.dispose([y, dx, composed]);
      });
      tf.dispose([xt, gt, cos, sin]);
    });
  }

  it('refuses bad arguments with one message naming the argument and every shape', () => {
    const { cos, sin } = rotaryTables(3, 4, 100);
    const x = tf.zeros([2, 3, 4]) as tf.Tensor3D;
    const made = [tf.zeros([2, 3, 4], 'int32'), tf.zeros([6, 4]), tf.zeros([2, 3, 5]), tf.zeros([3, 3, 4]), tf.zeros([4, 4])];
    const [ints, flat, odd, three, long] = made as tf.Tensor3D[];
    const gone = tf.zeros([3, 4]) as tf.Tensor2D;
    gone.dispose();
    const perRow = tf.zeros([3, 3, 4]) as tf.Tensor3D;  // B = 3 does not divide N = 2
    expect(() => applyRotary(ints, cos, sin)).to.throw("`applyRotary()`: 'x' must be a float32 tensor but got a int32 tensor of shape [2, 3, 4]");
    expect(() => applyRotary(x, gone, sin)).to.throw("`applyRotary()`: 'cos' was already disposed");
    expect(() => applyRotary(x, cos, null as unknown as tf.Tensor2D)).to.throw("`applyRotary()`: 'sin' must be a float32 tensor but got null");
    expect(() => applyRotary(flat, cos, sin)).to.throw("`applyRotary()`: 'x' must be [N, S, D] but got x [6,4], cos [3,4], sin [3,4]");
    expect(() => applyRotary(odd, cos, sin)).to.throw("`applyRotary()`: 'x' must have an even last axis (D) but got x [2,3,5], cos [3,4], sin [3,4]");
    const tableMessage = (c: tf.Tensor, s: tf.Tensor) => "`applyRotary()`: 'cos' and 'sin' must both be [S, D] = [3, 4] or [B, S, D] " +
      `with B dividing N = 2 but got x [2,3,4], cos [${c.shape}], sin [${s.shape}]`;
    expect(() => applyRotary(x, long as unknown as tf.Tensor2D, long as unknown as tf.Tensor2D)).to.throw(tableMessage(long, long));
    expect(() => applyRotary(x, perRow, perRow)).to.throw(tableMessage(perRow, perRow));
    expect(() => applyRotary(x, cos, three)).to.throw(tableMessage(cos, three));
    tf.dispose([cos, sin, x, perRow, ...made]);
  });
});

/** x [B, S, h, D] → [B·h, S, D] in float64 (the heads' transpose applyRotaryToHeads folds in) */
function headsFirst64(x: Float64Array, b: number, s: number, h: number, d: number): Float64Array {
  const out = new Float64Array(x.length);
  for (let bi = 0; bi < b; bi++) {
    for (let p = 0; p < s; p++) {
      for (let hi = 0; hi < h; hi++) {
        for (let i = 0; i < d; i++) out[((bi * h + hi) * s + p) * d + i] = x[((bi * s + p) * h + hi) * d + i];
      }
    }
  }
  return out;
}

describe('ops/applyRotaryToHeads', () => {
  // the cases' N rows as B samples of h heads: per-row tables fix B, shared ones take B = 2 where N allows
  for (const c of CASES) {
    it(`${c.name}: float64 of the transposed heads and finite differences`, async () => {
      const { n, s, d } = c;
      const { cos, sin } = c.tables();
      const tableRows = cos.rank === 3 ? cos.shape[0] : 0;
      const b = tableRows > 0 ? tableRows : n % 2 === 0 ? 2 : 1;
      const h = n / b;
      const [cos64, sin64] = [Float64Array.from(await cos.data()), Float64Array.from(await sin.data())];
      const x = asF32(rng.array(n * s * d));
      const g = asF32(rng.array(n * s * d));
      const [xt, gt] = [tensorOf(x, [b, s, h, d]) as tf.Tensor4D, tensorOf(g, [n, s, d])];
      const tables = [cos, sin] as [tf.Tensor2D, tf.Tensor2D];
      const rotated = (v: Float64Array) => rope64(headsFirst64(v, b, s, h, d), cos64, sin64, n, s, d, tableRows);
      await expectNoLeakAsync(async () => {
        const y = applyRotaryToHeads(xt, ...tables);
        expect(y.shape).to.deep.equal([n, s, d]);
        await expectCloseAsync(y, rotated(x), 1e-6, 'forward', [n, s, d]);
        const dx = tf.grad((a: tf.Tensor) => tf.sum(tf.mul(applyRotaryToHeads(a as tf.Tensor4D, ...tables), gt)))(xt);
        expect(dx.shape).to.deep.equal([b, s, h, d]);
        const fd = finiteDifferences(v => rotated(v).reduce((acc, val, i) => acc + val * g[i], 0), x);
        await expectCloseAsync(dx, fd, 1e-5, 'dx against finite differences', [b, s, h, d]);
        tf.dispose([y, dx]);
      });
      tf.dispose([xt, gt, cos, sin]);
    });
  }

  it('refuses bad arguments with one message naming the argument and every shape', () => {
    const { cos, sin } = rotaryTables(3, 4, 100);
    const flat = tf.zeros([2, 3, 4]) as unknown as tf.Tensor4D;
    const perRow = tf.zeros([3, 3, 4]) as tf.Tensor3D;  // B = 3 does not divide N = B·h = 2
    const x = tf.zeros([1, 3, 2, 4]) as tf.Tensor4D;
    expect(() => applyRotaryToHeads(flat, cos, sin)).to.throw(
      "`applyRotaryToHeads()`: 'x' must be [B, S, heads, D] but got x [2,3,4], cos [3,4], sin [3,4]");
    expect(() => applyRotaryToHeads(x, perRow, perRow)).to.throw("`applyRotaryToHeads()`: 'cos' and 'sin' must both be [S, D] = [3, 4] " +
      'or [B, S, D] with B dividing N = 2 but got x [1,3,2,4], cos [3,3,4], sin [3,3,4]');
    tf.dispose([cos, sin, flat, perRow, x]);
  });
});
