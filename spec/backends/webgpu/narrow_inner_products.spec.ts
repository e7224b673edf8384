/**
 * NarrowInnerGroupedMatMulProgram (split LoRA's expansions y += s·u·B_eᵀ and dx += gr·A_e: inner
 * = r ≤ 16, wide output, with an addend) against float64 JS: r 1, 8, 16; PEFT's B [out, r·E] read
 * strided (the forward) and A [r·E, out] read along its rows (the backward); out a multiple of 4
 * but not of the 128-column block (vec4) and not a multiple of 4 (per column); 16-, 32- and
 * 64-row blocks (row tiles 16, 32, 128); padding rows (written 0, whatever the addend holds there,
 * as the generic program does), experts with no rows, tiles past the rows in use; alpha; addend
 * on and off; every row source; and which program the kernel picks. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import {
  deviceDispatchPlan, type DevicePlan, groupedMatMul, NARROW_PRODUCTS_FLAG, type WeightStrides,
} from '../../../src/backends/webgpu/kernels.js';
import { NarrowInnerGroupedMatMulProgram } from '../../../src/backends/webgpu/programs/narrow_inner_matmul_program.js';
import type { RowSource } from '../../../src/backends/webgpu/programs/shared.js';
import type { ExpertActivation } from '../../../src/ops/types.js';
import { asF32, Rng } from '../../helpers/numeric.js';
import { chooseExperts, expectCloseAsync, expectNoLeakAsync, withEnvFlag, withShaderKeys } from './helpers.js';

const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));

/** The programs (shader key prefixes: the class's name in the key) that `fn` runs. */
async function programsOf<T>(fn: () => T): Promise<{ result: T; programs: string[] }> {
  return withShaderKeys(async keys => {
    const result = fn();
    return { result, programs: keys.map(k => k.split('_')[0]) };
  });
}

describe('webgpu: NarrowInnerGroupedMatMulProgram (split LoRA expansions)', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  // T=29, K=3 over E=6 with experts 0 and 5 unused ('skip')
  const T = 29, K = 3, E = 6;
  const rng = new Rng(17);
  const experts = chooseExperts(rng, T, K, E, 'skip');
  const activation: ExpertActivation = { kind: 'swiglu' };

  interface Case { rowTile: number; r: number; layout: 'A' | 'B'; out: number; addend: boolean; source: RowSource; alpha: number }
  const cases: Case[] = [];
  for (const rowTile of [16, 128]) {
    for (const r of [1, 8, 16]) {
      for (const layout of ['B', 'A'] as const) {
        // 300: vec4, two 128-column blocks and a ragged third; 150: per column
        for (const out of [300, 150]) cases.push({ rowTile, r, layout, out, addend: true, source: 'rows', alpha: layout === 'B' ? 1.75 : 1 });
      }
    }
  }
  for (const out of [300, 150]) {
    for (const layout of ['B', 'A'] as const) cases.push({ rowTile: 32, r: 8, layout, out, addend: false, source: 'rows', alpha: 0.5 });
  }
  cases.push({ rowTile: 32, r: 4, layout: 'A', out: 300, addend: true, source: 'gather', alpha: 1.25 });
  cases.push({ rowTile: 32, r: 4, layout: 'B', out: 150, addend: true, source: 'act', alpha: 1.25 });

  const plans = new Map<number, { plan: DevicePlan; ex: tf.Tensor2D; pairOfRow: number[] }>();
  before(async () => {
    for (const rowTile of new Set(cases.map(c => c.rowTile))) {
      const ex = tf.tensor2d(experts, [T, K], 'int32');
      const plan = deviceDispatchPlan(ex, E, rowTile);
      plans.set(rowTile, { plan, ex, pairOfRow: Array.from(await plan.pairOfRow.data()) });
    }
  });
  after(() => {
    for (const { plan, ex } of plans.values()) tf.dispose([ex, plan.seg, plan.rowOfPair, plan.pairOfRow]);
  });

  for (const c of cases) {
    const name = `${c.source} rows, r ${c.r}, out ${c.out}, row tile ${c.rowTile}, ` +
        `${c.layout === 'B' ? 'u·B_eᵀ (B [out, r·E] strided)' : 'gr·A_e (A [r·E, out])'}, ${c.addend ? 'addend' : 'no addend'}, alpha ${c.alpha}`;
    it(name, async () => {
      const { plan, pairOfRow } = plans.get(c.rowTile)!;
      const { r, out: outCols, alpha } = c;
      const cap = plan.capacity;
      // A's rows: [T, r] gathered, [cap, r] rows, or h [cap, 2r] whose activation is taken
      const width = c.source === 'act' ? 2 * r : r;
      const aData = asF32(rng.array((c.source === 'gather' ? T : cap) * width));
      // PEFT's factors: B [out, r·E] (column j·E + e), A [r·E, out] (row e·r + j)
      const f = asF32(rng.array(r * E * outCols));
      const strides: WeightStrides = c.layout === 'B' ? { sE: 1, sN: r * E, sK: E } : { sE: r * outCols, sN: 1, sK: outCols };
      const fAt = (e: number, j: number, n: number) => f[e * strides.sE + n * strides.sN + j * strides.sK];
      // nonzero on every row, padding included, which must still come out 0
      const addend = asF32(rng.array(cap * outCols));
      const a = (row: number, j: number): number => {
        const p = pairOfRow[row];
        if (c.source === 'gather') return aData[Math.floor(p / K) * r + j];
        if (c.source === 'rows') return aData[row * r + j];
        const g = aData[row * 2 * r + j];
        return g * sigmoid(g) * aData[row * 2 * r + r + j];
      };
      const want = new Float64Array(cap * outCols);
      for (let row = 0; row < cap; row++) {
        const p = pairOfRow[row];
        if (p < 0) continue;
        const e = experts[p];
        for (let n = 0; n < outCols; n++) {
          let s = 0;
          for (let j = 0; j < r; j++) s += a(row, j) * fAt(e, j, n);
          want[row * outCols + n] = alpha * s + (c.addend ? addend[row * outCols + n] : 0);
        }
      }
      const input = tf.tensor2d(Float32Array.from(aData), [c.source === 'gather' ? T : cap, width]);
      const w = c.layout === 'B' ? tf.tensor2d(Float32Array.from(f), [outCols, r * E]) : tf.tensor2d(Float32Array.from(f), [r * E, outCols]);
      const addendT = tf.tensor2d(Float32Array.from(addend), [cap, outCols]);
      const product = () => groupedMatMul({ a: input, source: c.source, w, strides, inner: r, outCols, plan, activation, alpha,
        addend: c.addend ? addendT : undefined, tile: { tm: 1, tn: 1, bk: 16 } });
      await expectNoLeakAsync(async () => {
        const { result: got, programs } = await programsOf(product);
        expect(programs, 'programs').to.deep.equal(['moeNarrowInnerGroupedMatMul']);
        await expectCloseAsync(got, want, 1e-5, 'out', [cap, outCols]);
        // the generic program's result, padding rows included, bit for bit where it matters: 0 there
        const generic = await withEnvFlag(NARROW_PRODUCTS_FLAG, false, async () => programsOf(product));
        expect(generic.programs, 'programs with the flag off').to.deep.equal(['moeGroupedMatMul']);
        const [values, genericValues] = [await got.data(), await generic.result.data()];
        const padding = pairOfRow.flatMap((p, row) => (p < 0 ? [row] : []));
        expect(padding.length, 'the plan has padding rows').to.be.greaterThan(0);
        for (const row of padding) {
          const span = [row * outCols, (row + 1) * outCols];
          expect(Array.from(values.subarray(span[0], span[1])).every(v => v === 0), `padding row ${row} is 0`).to.equal(true);
          expect(Array.from(genericValues.subarray(span[0], span[1])).every(v => v === 0), `generic padding row ${row} is 0`).to.equal(true);
        }
        await expectCloseAsync(got, genericValues, 1e-6, 'narrow vs generic');
        tf.dispose([got, generic.result]);
      });
      tf.dispose([input, w, addendT]);
    });
  }

  it('the kernel picks it for inner ≤ 16 under the flag; the generic program for inner 17, a bias, or the flag off', async () => {
    const { plan } = plans.get(128)!;
    const cap = plan.capacity;
    const outCols = 64;
    const run = async (inner: number, extra: { bias?: tf.Tensor2D; addend?: tf.Tensor2D } = {}) => {
      const u = tf.ones([cap, inner]) as tf.Tensor2D;
      const w = tf.ones([inner * E, outCols]);
      const { result, programs } = await programsOf(() => groupedMatMul({ a: u, source: 'rows', w,
        strides: { sE: inner * outCols, sN: 1, sK: outCols }, inner, outCols, plan, tile: { tm: 1, tn: 1, bk: 16 }, ...extra }));
      tf.dispose([u, w, result]);
      return programs;
    };
    const addend = tf.zeros([cap, outCols]) as tf.Tensor2D;
    const bias = tf.zeros([E, outCols]) as tf.Tensor2D;
    await expectNoLeakAsync(async () => {
      expect(await run(16, { addend })).to.deep.equal(['moeNarrowInnerGroupedMatMul']);
      expect(await run(8)).to.deep.equal(['moeNarrowInnerGroupedMatMul']);
      expect(await run(17, { addend })).to.deep.equal(['moeGroupedMatMul']);
      expect(await run(8, { addend, bias })).to.deep.equal(['moeGroupedMatMul']);
      expect(await withEnvFlag(NARROW_PRODUCTS_FLAG, false, () => run(8, { addend }))).to.deep.equal(['moeGroupedMatMul']);
    });
    tf.dispose([addend, bias]);
  });

  it('a product both narrow and shallow without an addend stays on NarrowGroupedMatMulProgram', async () => {
    const { plan } = plans.get(32)!;
    const u = tf.ones([plan.capacity, 8]) as tf.Tensor2D;
    const w = tf.ones([8 * E, 16]);
    const { result, programs } = await programsOf(() => groupedMatMul({ a: u, source: 'rows', w,
      strides: { sE: 8 * 16, sN: 1, sK: 16 }, inner: 8, outCols: 16, plan, tile: { tm: 1, tn: 1, bk: 16 } }));
    expect(programs).to.deep.equal(['moeNarrowGroupedMatMul']);
    tf.dispose([u, w, result]);
  });

  it('the program rejects an inner dimension past 16 and vec4 on a width not a multiple of 4', () => {
    const spec = { source: 'rows' as const, hasAddend: true, vec4: false, blockRows: 32 as const };
    expect(() => new NarrowInnerGroupedMatMulProgram(64, 300, 17, spec))
      .to.throw('NarrowInnerGroupedMatMulProgram: inner must be in [1, 16] but got 17');
    expect(() => new NarrowInnerGroupedMatMulProgram(64, 150, 8, { ...spec, vec4: true }))
      .to.throw('NarrowInnerGroupedMatMulProgram: vec4 needs outCols a multiple of 4 but got 150');
  });
  // its values at odd row counts through the dense kernel: dense_lora_products.spec.ts
  it('the single-group form reads no plan (no seg, no pr input), says so in the shader key, and rejects a gathered source', () => {
    const spec = { source: 'rows' as const, hasAddend: true, vec4: true, blockRows: 64 as const, singleGroup: true };
    const program = new NarrowInnerGroupedMatMulProgram(333, 132, 8, spec);
    expect(program.variableNames).to.deep.equal(['A', 'W', 'addend']);
    expect(program.variableComponents).to.deep.equal([1, 1, 4]);
    expect(program.shaderKey).to.match(/_single$/);
    const planned = new NarrowInnerGroupedMatMulProgram(320, 132, 8, { ...spec, singleGroup: false });
    expect(planned.variableNames).to.deep.equal(['A', 'W', 'seg', 'pr', 'addend']);
    expect(planned.variableComponents).to.deep.equal([1, 1, 1, 1, 4]);
    expect(planned.shaderKey).to.not.match(/_single$/);
    expect(() => new NarrowInnerGroupedMatMulProgram(64, 132, 8, { ...spec, source: 'gather' }))
      .to.throw("NarrowInnerGroupedMatMulProgram: singleGroup reads plain rows, so source must be 'rows' but got 'gather'");
  });
});
