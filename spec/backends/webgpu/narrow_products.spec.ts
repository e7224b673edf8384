/**
 * NarrowGroupedMatMulProgram (split LoRA's rank-r products) against float64 JS: every row source,
 * r in {1, 4, 8, 16}, A's layout (reduction contiguous) and PEFT's B read as dy·B_e (strided),
 * several BK chunks with a ragged last one, padding rows, an empty expert, 16- and 32-row blocks;
 * and which program the kernel picks. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { WebGPUBackend, WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { expect } from 'chai';
import { deviceDispatchPlan, groupedMatMul, NARROW_PRODUCTS_FLAG, type WeightStrides } from '../../../src/backends/webgpu/kernels.js';
import type { RowSource } from '../../../src/backends/webgpu/programs/shared.js';
import type { ExpertActivation } from '../../../src/ops/types.js';
import { asF32, Rng } from '../../helpers/numeric.js';
import { chooseExperts, expectCloseAsync, expectNoLeakAsync } from './helpers.js';

const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));

/** The constructor names of the programs `fn` runs. */
function programsOf(fn: () => void): string[] {
  const backend = tf.backend() as unknown as WebGPUBackend;
  const original = backend.runWebGPUProgram.bind(backend);
  const names: string[] = [];
  backend.runWebGPUProgram = ((program: WebGPUProgram, ...rest: Parameters<WebGPUBackend['runWebGPUProgram']> extends [unknown, ...infer R] ? R : never) => {
    names.push(program.constructor.name);
    return original(program, ...rest);
  }) as WebGPUBackend['runWebGPUProgram'];
  try {
    fn();
  } finally {
    backend.runWebGPUProgram = original;
  }
  return names;
}

describe('webgpu: NarrowGroupedMatMulProgram (rank-r grouped products)', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  // T=29, K=3 over E=6 with expert 0 and 5 unused ('skip'); inner 150: two full 64-deep chunks
  // and a ragged third
  const T = 29, K = 3, E = 6, inner = 150;
  const rng = new Rng(11);
  const experts = chooseExperts(rng, T, K, E, 'skip');
  const activation: ExpertActivation = { kind: 'swiglu' };
  const x = asF32(rng.array(T * inner));

  for (const rowTile of [16, 32]) {
    describe(`row tile ${rowTile}`, () => {
      let plan: ReturnType<typeof deviceDispatchPlan>;
      let ex: tf.Tensor2D;
      let pairOfRow: number[];
      before(async () => {
        ex = tf.tensor2d(experts, [T, K], 'int32');
        plan = deviceDispatchPlan(ex, E, rowTile);
        pairOfRow = Array.from(await plan.pairOfRow.data());
      });
      after(() => tf.dispose([ex, plan.seg, plan.rowOfPair, plan.pairOfRow]));

      for (const source of ['gather', 'rows', 'act'] as const) {
        for (const r of [1, 4, 8, 16]) {
          for (const layout of ['A', 'B'] as const) {
            it(`${source} rows, r ${r}, ${layout === 'A' ? 'x·A_eᵀ (A [r·E, in])' : 'dy·B_e (B [in, r·E] strided)'}`, async () => {
              const cap = plan.capacity;
              const rows = asF32(rng.array(cap * inner));
              const h = asF32(rng.array(cap * 2 * inner));
              // the factor: A [r·E, inner] (expert-major rows) or B [inner, r·E] (column j·E + e)
              const f = asF32(rng.array(r * E * inner));
              const strides: WeightStrides = layout === 'A' ? { sE: r * inner, sN: inner, sK: 1 } : { sE: 1, sN: E, sK: r * E };
              const fAt = (e: number, n: number, k: number) => f[e * strides.sE + n * strides.sN + k * strides.sK];
              const a = (row: number, k: number): number => {
                const p = pairOfRow[row];
                if (source === 'gather') return x[Math.floor(p / K) * inner + k];
                if (source === 'rows') return rows[row * inner + k];
                const g = h[row * 2 * inner + k];
                return g * sigmoid(g) * h[row * 2 * inner + inner + k];
              };
              const alpha = 1.75;
              const want = new Float64Array(cap * r);
              for (let row = 0; row < cap; row++) {
                const p = pairOfRow[row];
                if (p < 0) continue;
                const e = experts[p];
                for (let n = 0; n < r; n++) {
                  let s = 0;
                  for (let k = 0; k < inner; k++) s += a(row, k) * fAt(e, n, k);
                  want[row * r + n] = alpha * s;
                }
              }
              const input = source === 'gather' ? tf.tensor2d(Float32Array.from(x), [T, inner])
                : source === 'rows' ? tf.tensor2d(Float32Array.from(rows), [cap, inner])
                : tf.tensor2d(Float32Array.from(h), [cap, 2 * inner]);
              const fT = layout === 'A' ? tf.tensor2d(Float32Array.from(f), [r * E, inner]) : tf.tensor2d(Float32Array.from(f), [inner, r * E]);
              await expectNoLeakAsync(async () => {
                let out: tf.Tensor2D | undefined;
                const programs = programsOf(() => {
                  out = groupedMatMul({ a: input, source, w: fT, strides, inner, outCols: r, plan, activation, alpha,
                    tile: { tm: 1, tn: 1, bk: 16 } });
                });
                expect(programs, 'programs').to.deep.equal(['NarrowGroupedMatMulProgram']);
                await expectCloseAsync(out!, want, 1e-5, 'out', [cap, r]);
                const got = await out!.data();
                const padding = pairOfRow.flatMap((p, row) => (p < 0 ? Array.from(got.subarray(row * r, row * r + r)) : []));
                expect(padding.every(v => v === 0), 'padding rows are 0').to.equal(true);
                out!.dispose();
              });
              tf.dispose([input, fT]);
            });
          }
        }
      }
    });
  }

  it('the kernel keeps the generic program for r 17, a bias or addend, and with the flag off; both agree', async () => {
    const rowTile = 32;
    const ex = tf.tensor2d(experts, [T, K], 'int32');
    const plan = deviceDispatchPlan(ex, E, rowTile);
    const input = tf.tensor2d(Float32Array.from(x), [T, inner]);
    const run = (r: number, extra: { addend?: tf.Tensor2D } = {}) => {
      const w = tf.ones([r * E, inner]);
      const names: string[] = [];
      let out: tf.Tensor2D | undefined;
      names.push(...programsOf(() => {
        out = groupedMatMul({ a: input, source: 'gather' as RowSource, w, strides: { sE: r * inner, sN: inner, sK: 1 }, inner, outCols: r,
          plan, tile: { tm: 1, tn: 1, bk: 16 }, ...extra });
      }));
      w.dispose();
      return { names, out: out! };
    };
    const wide = run(17);
    expect(wide.names).to.deep.equal(['GroupedMatMulProgram']);
    const addend = tf.zeros([plan.capacity, 8]) as tf.Tensor2D;
    const withAddend = run(8, { addend });
    expect(withAddend.names).to.deep.equal(['GroupedMatMulProgram']);
    const narrow = run(8);
    expect(narrow.names).to.deep.equal(['NarrowGroupedMatMulProgram']);
    const previous = tf.env().getBool(NARROW_PRODUCTS_FLAG);
    tf.env().set(NARROW_PRODUCTS_FLAG, false);
    let generic: ReturnType<typeof run>;
    try {
      generic = run(8);
    } finally {
      tf.env().set(NARROW_PRODUCTS_FLAG, previous);
    }
    expect(generic.names).to.deep.equal(['GroupedMatMulProgram']);
    await expectCloseAsync(narrow.out, await generic.out.data(), 1e-6, 'narrow vs generic');
    await expectCloseAsync(withAddend.out, await generic.out.data(), 1e-6, 'generic with a zero addend');
    tf.dispose([wide.out, withAddend.out, narrow.out, generic.out, addend, input, ex, plan.seg, plan.rowOfPair, plan.pairOfRow]);
  });
});
