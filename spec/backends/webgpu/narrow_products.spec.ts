/**
 * NarrowGroupedMatMulProgram and NarrowWeightGradProgram (split LoRA's rank-r products) against
 * float64 JS: every row source, r in {1, 4, 8, 16}, A's layout (reduction contiguous) and PEFT's
 * B read as dy·B_e (strided), several BK chunks with a ragged last one, padding rows, empty
 * experts, 16- and 32-row blocks; the weight gradients narrow on either side, scaled by the
 * routing weight, into PEFT's A and B layouts over several 256-column blocks, also under skewed
 * routing (one expert with many rows, others empty) at several chunk sizes, their order fixed
 * (the same bits twice); a LoRA factor pair's two gradients in one program and one own sum, bit
 * for bit the two apart; and which program the kernel picks. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { WebGPUBackend, WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { expect } from 'chai';
import {
  deviceDispatchPlan, groupedMatMul, groupedNarrowLayoutFor, groupedWeightGrad, type GroupedWeightGradArgs, groupedWeightGradPair,
  NARROW_GRAD_CHUNK_ROWS_FLAG, NARROW_LANE_PRODUCTS_FLAG, NARROW_PRODUCTS_FLAG, type WeightStrides,
} from '../../../src/backends/webgpu/kernels.js';
import { NARROW_GRAD_PAIR_SUM_PROGRAM, WEIGHT_GRAD_PAIRS_FLAG } from '../../../src/backends/webgpu/weight_grad_pairs.js';
import { DenseNarrowMatMulProgram } from '../../../src/backends/webgpu/programs/dense_narrow_matmul_program.js';
import {
  narrowGradChunkRows, NarrowGroupedMatMulProgram, NarrowWeightGradProgram, NarrowWeightGradSumProgram,
} from '../../../src/backends/webgpu/programs/narrow_matmul_program.js';
import type { RowSource } from '../../../src/backends/webgpu/programs/shared.js';
import type { ExpertActivation } from '../../../src/ops/types.js';
import { asF32, Rng } from '../../helpers/numeric.js';
import { chooseExperts, expectCloseAsync, expectNoLeakAsync, withEnvFlag, withOwnDispatches } from './helpers.js';

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

/**
 * Skewed routing, as real text gives: 200 tokens, top 2 of 8 experts; expert 3 has 200 rows (a full
 * chunk of 128 and a ragged one), expert 6 exactly 128 (one full chunk), expert 7 71, expert 0 one
 * row, 1, 2, 4, 5 none.
 */
function skewedRouting(): { T: number; K: number; E: number; experts: Int32Array } {
  const T = 200, K = 2, E = 8;
  const experts = new Int32Array(T * K);
  for (let t = 0; t < T; t++) {
    experts[t * K] = 3;
    experts[t * K + 1] = t < 128 ? 6 : t === 128 ? 0 : 7;
  }
  return { T, K, E, experts };
}

/** A routing's device plan and its pairOfRow read back (for the float64 references). */
class RoutedPlan {
  plan!: ReturnType<typeof deviceDispatchPlan>;
  pairOfRow: number[] = [];
  private ex?: tf.Tensor2D;
  constructor(readonly experts: Int32Array, readonly T: number, readonly K: number, readonly E: number, readonly rowTile: number) {}

  async make(): Promise<void> {
    this.ex = tf.tensor2d(this.experts, [this.T, this.K], 'int32');
    this.plan = deviceDispatchPlan(this.ex, this.E, this.rowTile);
    this.pairOfRow = Array.from(await this.plan.pairOfRow.data());
  }

  dispose(): void {
    tf.dispose([this.ex!, this.plan.seg, this.plan.rowOfPair, this.plan.pairOfRow]);
  }
}

type WeightGradCase = { narrow: 'P' | 'Q'; left: 'gather' | 'rows'; right: RowSource; r?: number; scaled?: boolean };

/**
 * groupedWeightGrad with P or Q = r narrow (the other 300 wide: two 256-column blocks, the second
 * ragged) against float64 JS, into PEFT's A layout (narrow P) or B layout (narrow Q); checks that
 * the kernel runs the narrow programs and leaks nothing.
 */
async function checkWeightGrad(routed: RoutedPlan, c: WeightGradCase & { r: number }, rng: Rng): Promise<void> {
  const { plan, pairOfRow, experts, T, K, E } = routed;
  const { r, scaled = false } = c;
  const wide = 300;
  const activation: ExpertActivation = { kind: 'swiglu' };
  const cap = plan.capacity;
  const rw = asF32(Float64Array.from({ length: T * K }, () => 0.2 + rng.uniform()));
  const P = c.narrow === 'P' ? r : wide;
  const Q = c.narrow === 'P' ? wide : r;
  const lData = asF32(rng.array((c.left === 'gather' ? T : cap) * P));
  const rWidth = c.right === 'act' ? 2 * Q : Q;
  const rData = asF32(rng.array((c.right === 'gather' ? T : cap) * rWidth));
  const L = (row: number, p: number) => {
    const pair = pairOfRow[row];
    const v = c.left === 'gather' ? lData[Math.floor(pair / K) * P + p] : lData[row * P + p];
    return scaled ? v * rw[pair] : v;
  };
  const R = (row: number, q: number) => {
    const pair = pairOfRow[row];
    if (c.right === 'gather') return rData[Math.floor(pair / K) * Q + q];
    if (c.right === 'rows') return rData[row * Q + q];
    const g = rData[row * 2 * Q + q];
    return g * sigmoid(g) * rData[row * 2 * Q + Q + q];
  };
  // narrow P: PEFT's A [r·E, wide] (oE r·wide, oP wide, oQ 1); narrow Q: B [wide, r·E] (oE 1, oP r·E, oQ E)
  const outShape = c.narrow === 'P' ? [r * E, wide] : [wide, r * E];
  const o = c.narrow === 'P' ? { oE: r * wide, oP: wide, oQ: 1 } : { oE: 1, oP: r * E, oQ: E };
  const alpha = 0.75;
  const want = new Float64Array(r * E * wide);
  for (let row = 0; row < cap; row++) {
    const pair = pairOfRow[row];
    if (pair < 0) continue;
    const e = experts[pair];
    for (let p = 0; p < P; p++) {
      for (let q = 0; q < Q; q++) want[e * o.oE + p * o.oP + q * o.oQ] += alpha * L(row, p) * R(row, q);
    }
  }
  const lT = tf.tensor2d(Float32Array.from(lData), [c.left === 'gather' ? T : cap, P]);
  const rT = tf.tensor2d(Float32Array.from(rData), [c.right === 'gather' ? T : cap, rWidth]);
  const rwT = tf.tensor1d(Float32Array.from(rw));
  await expectNoLeakAsync(async () => {
    let out: tf.Tensor | undefined;
    const programs = programsOf(() => {
      out = groupedWeightGrad({ l: lT, left: c.left, r: rT, right: c.right, P, Q, outShape, outStrides: o, plan,
        tile: { tm: 1, tn: 1, bk: 16 }, rowScale: scaled ? rwT : undefined, activation, alpha });
    });
    expect(programs, 'programs').to.deep.equal(['NarrowWeightGradProgram', 'NarrowWeightGradSumProgram']);
    await expectCloseAsync(out!, want, 1e-5, 'dW', outShape);
    // experts with no rows: exact zeros
    const got = await out!.data();
    for (let e = 0; e < E; e++) {
      if (experts.includes(e)) continue;
      for (let p = 0; p < P; p++) {
        for (let q = 0; q < Q; q++) expect(got[e * o.oE + p * o.oP + q * o.oQ], `dW of empty expert ${e}`).to.equal(0);
      }
    }
    out!.dispose();
  });
  tf.dispose([lT, rT, rwT]);
}

describe('webgpu: NarrowGroupedMatMulProgram (rank-r grouped products)', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  // T=29, K=3 over E=6 with expert 0 and 5 unused ('skip'); inner 150: two full 64-deep chunks
  // and a ragged third (the lanes' program: no whole round of 4·64, the rest one k at a time);
  // 600: the lanes' program's two rounds of 256 and a ragged rest
  const T = 29, K = 3, E = 6, inner = 150;
  const rng = new Rng(11);
  const experts = chooseExperts(rng, T, K, E, 'skip');
  const activation: ExpertActivation = { kind: 'swiglu' };
  const x = asF32(rng.array(T * inner));

  // NarrowGroupedMatMulProgram (16 lanes a row, W staged), and DenseNarrowMatMulProgram's planned form
  // (lanes splitting k; 4 or 8 rows a workgroup: 64 lanes, 1 row a thread below 2048 rows of capacity) for W along k
  const programs = [['NarrowGroupedMatMulProgram', false], ['DenseNarrowMatMulProgram', true]] as const;
  for (const [rowTile, inner, [program, lanes]] of programs.flatMap(p => [[16, 150, p], [32, 600, p]] as const)) {
    describe(`row tile ${rowTile}, inner ${inner}: ${program}`, () => {
      const x = asF32(rng.array(T * inner));
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
          // with the lanes on, B (W strided along k) runs the staged program as without them: once (r 8) for the routing
          for (const layout of (lanes && r !== 8 ? ['A'] : ['A', 'B']) as ReadonlyArray<'A' | 'B'>) {
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
                const programs = await withEnvFlag(NARROW_LANE_PRODUCTS_FLAG, lanes, async () => programsOf(() => {
                  out = groupedMatMul({ a: input, source, w: fT, strides, inner, outCols: r, plan, activation, alpha,
                    tile: { tm: 1, tn: 1, bk: 16 } });
                }));
                // W strided along k (B) stays staged: groupedNarrowLayoutFor
                expect(programs, 'programs').to.deep.equal([layout === 'A' ? program : 'NarrowGroupedMatMulProgram']);
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

  // 'skip': experts 0 and E−1 empty, ~22 rows each (one ragged staged step); 'one': all 87 rows on
  // the last expert (three steps of 32, the last ragged)
  for (const routing of ['skip', 'one'] as const) describe(`weight gradients, routing '${routing}'`, () => {
    const experts = chooseExperts(new Rng(5), T, K, E, routing);
    const routed = new RoutedPlan(experts, T, K, E, 32);
    before(() => routed.make());
    after(() => routed.dispose());

    const cases: WeightGradCase[] = [
      // dA_e = Σ (s·dy·B_e)ᵀ·x: L = gr rows, R = x gathered (up) or act(h) (down), also plain rows
      { narrow: 'P', left: 'rows', right: 'gather' }, { narrow: 'P', left: 'rows', right: 'act' },
      { narrow: 'P', left: 'rows', right: 'rows' },
      // dB_e = Σ (w·dy)ᵀ·u: L = dOut gathered (down) or dh rows (up), R = u rows
      { narrow: 'Q', left: 'gather', right: 'rows' }, { narrow: 'Q', left: 'rows', right: 'rows' },
    ];
    for (const r of [1, 4, 8, 16]) {
      for (const c of cases) {
        for (const scaled of [false, true]) {
          it(`narrow ${c.narrow} = ${r}: L ${c.left}, R ${c.right}${scaled ? ', L scaled by the routing weight' : ''}`, async () => {
            await checkWeightGrad(routed, { ...c, r, scaled }, rng);
          });
        }
      }
    }
  });

  // Skewed routing (skewedRouting). Chunk flags: 1 and 8 make chunks of 1 and 8 rows (inside a
  // row tile), 48 chunks of 48 (row tile 16) or 64 rows (32), 128 the default, 1000 one chunk per expert.
  describe('weight gradients under skewed routing: chunks of rows', () => {
    const { T, K, E, experts } = skewedRouting();
    const cases: WeightGradCase[] = [
      // down.dA (act(h), the routing weight on gr), up.dA (x gathered), down.dB (dOut gathered, scaled)
      { narrow: 'P', left: 'rows', right: 'act', scaled: true }, { narrow: 'P', left: 'rows', right: 'gather' },
      { narrow: 'Q', left: 'gather', right: 'rows', scaled: true },
    ];
    for (const rowTile of [16, 32]) {
      describe(`row tile ${rowTile}`, () => {
        const routed = new RoutedPlan(experts, T, K, E, rowTile);
        before(() => routed.make());
        after(() => routed.dispose());
        for (const chunkRows of [1, 8, 48, 128, 1000]) {
          for (const r of [1, 8, 16]) {
            for (const c of cases) {
              it(`chunk flag ${chunkRows}, narrow ${c.narrow} = ${r}: L ${c.left}, R ${c.right}${c.scaled ? ', scaled' : ''}`, async () => {
                await withEnvFlag(NARROW_GRAD_CHUNK_ROWS_FLAG, chunkRows, () => checkWeightGrad(routed, { ...c, r }, rng));
              });
            }
          }
        }
      });
    }

    it('chunks fit the row tile: whole tiles from one tile up, divisors of it below', () => {
      expect([200, 128, 64, 48, 1].map(t => narrowGradChunkRows(128, t))).to.deep.equal([256, 128, 64, 32, 1]);
      expect([48, 1000].map(t => narrowGradChunkRows(32, t))).to.deep.equal([64, 1024]);
      expect(narrowGradChunkRows(24, 16)).to.equal(12);
    });

    it('sums in a fixed order: two runs give the same bits', async () => {
      const routed = new RoutedPlan(experts, T, K, E, 16);
      await routed.make();
      const l = tf.tensor2d(Float32Array.from(rng.array(routed.plan.capacity * 8)), [routed.plan.capacity, 8]);
      const x = tf.tensor2d(Float32Array.from(rng.array(T * 300)), [T, 300]);
      await expectNoLeakAsync(async () => {
        const run = () => groupedWeightGrad({ l, left: 'rows', r: x, right: 'gather', P: 8, Q: 300, outShape: [8 * E, 300],
          outStrides: { oE: 8 * 300, oP: 300, oQ: 1 }, plan: routed.plan, tile: { tm: 1, tn: 1, bk: 16 } });
        const [first, second] = await withEnvFlag(NARROW_GRAD_CHUNK_ROWS_FLAG, 16, async () => [run(), run()]);
        expect(Array.from(await first.data())).to.deep.equal(Array.from(await second.data()));
        tf.dispose([first, second]);
      });
      tf.dispose([l, x]);
      routed.dispose();
    });

    it('rejects a chunk flag that is not an integer in [1, 2^24], naming the op and the flag', async () => {
      const routed = new RoutedPlan(experts, T, K, E, 16);
      await routed.make();
      const l = tf.zeros([routed.plan.capacity, 8]) as tf.Tensor2D;
      const x = tf.zeros([T, 300]) as tf.Tensor2D;
      for (const bad of [0, 2.5, 2 ** 24 + 1]) {
        await expectNoLeakAsync(async () => {
          await withEnvFlag(NARROW_GRAD_CHUNK_ROWS_FLAG, bad, async () => {
            expect(() => groupedWeightGrad({ l, left: 'rows', r: x, right: 'gather', P: 8, Q: 300, outShape: [8 * E, 300],
              outStrides: { oE: 8 * 300, oP: 300, oQ: 1 }, plan: routed.plan, tile: { tm: 1, tn: 1, bk: 16 } }))
              .to.throw(`\`groupedWeightGrad()\`: the flag ${NARROW_GRAD_CHUNK_ROWS_FLAG} must be an integer in [1, ${2 ** 24}] but got ${bad} (number)`);
          });
        });
      }
      tf.dispose([l, x]);
      routed.dispose();
    });
  });

  // a LoRA factor pair's dA_e and dB_e together (groupedWeightGradPair): the up projection's (x
  // gathered; dh rows) and the down projection's (act(h), dOut gathered, both scaled by the routing
  // weight, as experts.ts passes them), at equal and unequal ranks, under skewedRouting and at
  // several chunk sizes: bit for bit the two groupedWeightGrads, in two dispatches
  describe('weight gradient pairs (dA_e and dB_e in one program and one own sum)', () => {
    const { T, K, E, experts } = skewedRouting();
    const wide = 300;
    const activation: ExpertActivation = { kind: 'swiglu' };
    type Side = { left: 'gather' | 'rows'; right: RowSource; narrow: 'P' | 'Q'; r: number };
    /** one product's arguments over `routed`, into PEFT's A (narrow P) or B (narrow Q) layout, random operands */
    const sideArgs = (routed: RoutedPlan, side: Side, rw: tf.Tensor1D | undefined, alpha: number, made: tf.Tensor[]): GroupedWeightGradArgs => {
      const { plan } = routed;
      const [P, Q] = side.narrow === 'P' ? [side.r, wide] : [wide, side.r];
      const random = (rows: number, cols: number) => tf.tensor2d(Float32Array.from(asF32(rng.array(rows * cols))), [rows, cols]);
      const l = random(side.left === 'gather' ? T : plan.capacity, P);
      const r = random(side.right === 'gather' ? T : plan.capacity, side.right === 'act' ? 2 * Q : Q);
      made.push(l, r);
      const [outShape, outStrides] = side.narrow === 'P'
        ? [[side.r * E, wide], { oE: side.r * wide, oP: wide, oQ: 1 }]
        : [[wide, side.r * E], { oE: 1, oP: side.r * E, oQ: E }];
      return { l, left: side.left, r, right: side.right, P, Q, outShape, outStrides, plan, tile: { tm: 1, tn: 1, bk: 16 }, rowScale: rw,
        activation, alpha };
    };
    const pairs: Array<{ name: string; sides: [Side, Side]; scaled: boolean }> = [];
    for (const [r0, r1] of [[1, 1], [8, 8], [16, 16], [4, 16]]) {
      pairs.push({ name: `up, r ${r0}/${r1}`, scaled: false,
        sides: [{ narrow: 'P', left: 'rows', right: 'gather', r: r0 }, { narrow: 'Q', left: 'rows', right: 'rows', r: r1 }] });
      pairs.push({ name: `down, r ${r0}/${r1}, scaled`, scaled: true,
        sides: [{ narrow: 'P', left: 'rows', right: 'act', r: r0 }, { narrow: 'Q', left: 'gather', right: 'rows', r: r1 }] });
    }
    for (const rowTile of [16, 32]) {
      describe(`row tile ${rowTile}`, () => {
        const routed = new RoutedPlan(experts, T, K, E, rowTile);
        before(() => routed.make());
        after(() => routed.dispose());
        for (const chunkRows of [1, 48, 128]) {
          for (const { name, sides, scaled } of pairs) {
            it(`chunk flag ${chunkRows}, ${name}: the two gradients bit for bit apart, in NarrowWeightGradPairProgram and one own sum`, async () => {
              const made: tf.Tensor[] = [];
              const rw = scaled ? tf.tensor1d(Float32Array.from(asF32(Float64Array.from({ length: T * K }, () => 0.2 + rng.uniform())))) : undefined;
              if (rw) made.push(rw);
              const args = [sideArgs(routed, sides[0], rw, 1, made), sideArgs(routed, sides[1], rw, 0.75, made)] as const;
              await withEnvFlag(NARROW_GRAD_CHUNK_ROWS_FLAG, chunkRows, () => expectNoLeakAsync(async () => {
                let pair: tf.Tensor[] = [];
                const { programs, own } = await withOwnDispatches(async recorded =>
                  ({ programs: programsOf(() => { pair = groupedWeightGradPair(args[0], args[1]); }), own: [...recorded] }));
                expect(programs, 'programs').to.deep.equal(['NarrowWeightGradPairProgram']);
                expect(own, 'own dispatches').to.deep.equal([NARROW_GRAD_PAIR_SUM_PROGRAM]);
                // the flag off: the two apart, four programs
                let apart: tf.Tensor[] = [];
                const off = await withEnvFlag(WEIGHT_GRAD_PAIRS_FLAG, false, async () =>
                  programsOf(() => { apart = groupedWeightGradPair(args[0], args[1]); }));
                const apartPrograms = ['NarrowWeightGradProgram', 'NarrowWeightGradSumProgram'];
                expect(off).to.deep.equal([...apartPrograms, ...apartPrograms]);
                for (let i = 0; i < 2; i++) {
                  expect(pair[i].shape).to.deep.equal(args[i].outShape);
                  expect(Array.from(await pair[i].data()), `product ${i}: bit for bit apart`).to.deep.equal(Array.from(await apart[i].data()));
                }
                tf.dispose([...pair, ...apart]);
              }));
              tf.dispose(made);
            });
          }
        }
      });
    }
  });

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
    expect(narrow.names).to.deep.equal(['DenseNarrowMatMulProgram']);
    const staged = await withEnvFlag(NARROW_LANE_PRODUCTS_FLAG, false, async () => run(8));
    expect(staged.names).to.deep.equal(['NarrowGroupedMatMulProgram']);
    const generic = await withEnvFlag(NARROW_PRODUCTS_FLAG, false, async () => run(8));
    expect(generic.names).to.deep.equal(['GroupedMatMulProgram']);
    await expectCloseAsync(narrow.out, await generic.out.data(), 1e-6, 'narrow vs generic');
    await expectCloseAsync(staged.out, await generic.out.data(), 1e-6, 'staged narrow vs generic');
    await expectCloseAsync(withAddend.out, await generic.out.data(), 1e-6, 'generic with a zero addend');
    tf.dispose([wide.out, withAddend.out, narrow.out, staged.out, generic.out, addend, input, ex, plan.seg, plan.rowOfPair, plan.pairOfRow]);
  });

  it('the lanes\' program at 2 rows a thread (a capacity of 2048 rows or more): padding mixed with real rows in a thread', async () => {
    // 700 tokens × 3 over 6 experts (0 and 5 unused), row tile 16: 2100 pairs, each expert's last tile part padding
    const T = 700, K = 3, inner = 150, r = 8;
    const rng = new Rng(21);
    const experts = chooseExperts(rng, T, K, E, 'skip');
    const routed = new RoutedPlan(experts, T, K, E, 16);
    await routed.make();
    const { plan, pairOfRow } = routed;
    expect(plan.capacity).to.be.at.least(2048);
    expect(groupedNarrowLayoutFor(16, plan.capacity, true)).to.deep.equal({ lanes: 64, rowsPerThread: 2 });
    const h = asF32(rng.array(plan.capacity * 2 * inner));
    const f = asF32(rng.array(r * E * inner));
    const want = new Float64Array(plan.capacity * r);
    for (let row = 0; row < plan.capacity; row++) {
      const p = pairOfRow[row];
      if (p < 0) continue;
      for (let n = 0; n < r; n++) {
        let sum = 0;
        for (let k = 0; k < inner; k++) {
          const g = h[row * 2 * inner + k];
          sum += g * sigmoid(g) * h[row * 2 * inner + inner + k] * f[experts[p] * r * inner + n * inner + k];
        }
        want[row * r + n] = 0.5 * sum;
      }
    }
    const input = tf.tensor2d(Float32Array.from(h), [plan.capacity, 2 * inner]);
    const fT = tf.tensor2d(Float32Array.from(f), [r * E, inner]);
    await expectNoLeakAsync(async () => {
      let out: tf.Tensor2D | undefined;
      const programs = programsOf(() => {
        out = groupedMatMul({ a: input, source: 'act', w: fT, strides: { sE: r * inner, sN: inner, sK: 1 }, inner, outCols: r, plan,
          activation: { kind: 'swiglu' }, alpha: 0.5, tile: { tm: 1, tn: 1, bk: 16 } });
      });
      expect(programs).to.deep.equal(['DenseNarrowMatMulProgram']);
      await expectCloseAsync(out!, want, 1e-5, 'out', [plan.capacity, r]);
      out!.dispose();
    });
    tf.dispose([input, fT]);
    routed.dispose();
  });

  it('the lanes\' program takes a plan whose row tile its block divides; its planned form checks its rows and activation', async () => {
    // 64 lanes, 1 row a thread (4-row blocks) below 2048 rows of capacity, 2 (8-row blocks) from it
    expect(groupedNarrowLayoutFor(16, 512, true)).to.deep.equal({ lanes: 64, rowsPerThread: 1 });
    expect(groupedNarrowLayoutFor(128, 24576, true)).to.deep.equal({ lanes: 64, rowsPerThread: 2 });
    // W strided along k (PEFT's B read as dy·B_e): staged by NarrowGroupedMatMulProgram
    expect(groupedNarrowLayoutFor(128, 24576, false)).to.equal(undefined);
    expect(groupedNarrowLayoutFor(4, 2048, true)).to.equal(undefined);
    expect(await withEnvFlag(NARROW_LANE_PRODUCTS_FLAG, false, async () => groupedNarrowLayoutFor(128, 24576, true))).to.equal(undefined);
    const layout = { lanes: 64, rowsPerThread: 2 } as const;
    const planned = new DenseNarrowMatMulProgram(64, 8, layout, { source: 'gather' });
    expect(planned.variableNames).to.deep.equal(['A', 'W', 'seg', 'pr']);
    expect(planned.shaderKey).to.match(/_planned_gather_/);
    expect(new DenseNarrowMatMulProgram(64, 8, layout).variableNames).to.deep.equal(['A', 'W']);
    expect(() => new DenseNarrowMatMulProgram(60, 8, layout, { source: 'rows' }))
      .to.throw('DenseNarrowMatMulProgram: a planned product\'s rows must be whole blocks of 8 but got 60');
    expect(() => new DenseNarrowMatMulProgram(64, 8, layout, { source: 'act' }))
      .to.throw("DenseNarrowMatMulProgram: an activation goes with source 'act' only, but got source 'act' and none");
    expect(() => new DenseNarrowMatMulProgram(64, 8, layout, { source: 'rows', activation: { kind: 'swiglu', interleaved: false } }))
      .to.throw("but got source 'rows' and 'swiglu'");
  });

  it('the weight gradient keeps the generic program for P, Q > 16 and with the flag off; both agree', async () => {
    const ex = tf.tensor2d(experts, [T, K], 'int32');
    const plan = deviceDispatchPlan(ex, E, 32);
    const input = tf.tensor2d(Float32Array.from(x), [T, inner]);
    const run = (P: number) => {
      const l = tf.ones([plan.capacity, P]) as tf.Tensor2D;
      let out: tf.Tensor | undefined;
      const names = programsOf(() => {
        out = groupedWeightGrad({ l, left: 'rows', r: input, right: 'gather', P, Q: inner, outShape: [P * E, inner],
          outStrides: { oE: P * inner, oP: inner, oQ: 1 }, plan, tile: { tm: 1, tn: 8, bk: 16 } });
      });
      l.dispose();
      return { names, out: out! };
    };
    const wide = run(17);
    expect(wide.names).to.deep.equal(['GroupedWeightGradProgram']);
    const narrow = run(8);
    expect(narrow.names).to.deep.equal(['NarrowWeightGradProgram', 'NarrowWeightGradSumProgram']);
    const generic = await withEnvFlag(NARROW_PRODUCTS_FLAG, false, async () => run(8));
    expect(generic.names).to.deep.equal(['GroupedWeightGradProgram']);
    await expectCloseAsync(narrow.out, await generic.out.data(), 1e-6, 'narrow vs generic');
    tf.dispose([wide.out, narrow.out, generic.out, input, ex, plan.seg, plan.rowOfPair, plan.pairOfRow]);
  });
  // their values, row counts and chunks: dense_lora_products.spec.ts, through the dense kernels
  it('single-group forms read no plan (no seg, no pr input), say so in the shader key, and reject what needs a plan', () => {
    const product = new NarrowGroupedMatMulProgram(333, 8, { source: 'rows', kContiguous: true, rowsPerThread: 1, singleGroup: true });
    expect(product.variableNames).to.deep.equal(['A', 'W']);
    expect(product.shaderKey).to.match(/_single$/);
    expect(product.outputShape).to.deep.equal([333, 8]);
    expect(new NarrowGroupedMatMulProgram(333, 8, { source: 'rows', kContiguous: true, rowsPerThread: 1 }).shaderKey).to.not.match(/_single$/);
    expect(() => new NarrowGroupedMatMulProgram(64, 8, { source: 'gather', kContiguous: true, rowsPerThread: 1, singleGroup: true }))
      .to.throw("NarrowGroupedMatMulProgram: singleGroup reads plain rows, so source must be 'rows' but got 'gather'");

    const spec = { left: 'rows', right: 'rows', scaleLeft: false, narrow: 'P', singleGroup: true, tile: { tm: 1, tn: 1, bk: 16 } } as const;
    // 333 rows in chunks of 128: 3 chunks, the last 77 rows
    const grad = new NarrowWeightGradProgram(333, 128, 8, 300, spec);
    expect(grad.variableNames).to.deep.equal(['L', 'R']);
    expect(grad.outputShape).to.deep.equal([3, 8, 300]);
    expect(grad.shaderKey).to.match(/_single$/);
    expect(grad.uniforms).to.match(/numRows : i32/);
    expect(() => new NarrowWeightGradProgram(333, 128, 8, 300, { ...spec, left: 'gather' }))
      .to.throw("NarrowWeightGradProgram: singleGroup reads plain rows, so left and right must be 'rows' and scaleLeft false " +
        "but got left 'gather', right 'rows', scaleLeft false");
    expect(() => new NarrowWeightGradProgram(333, 128, 8, 300, { ...spec, right: 'act', activation: { kind: 'swiglu', interleaved: false } }))
      .to.throw("but got left 'rows', right 'act', scaleLeft false");
    expect(() => new NarrowWeightGradProgram(333, 128, 8, 300, { ...spec, scaleLeft: true }))
      .to.throw("but got left 'rows', right 'rows', scaleLeft true");

    const sum = new NarrowWeightGradSumProgram([8, 300], 1, 8, 300, 'P', true);
    expect(sum.variableNames).to.deep.equal(['partial']);
    expect(sum.shaderKey).to.match(/_single$/);
    expect(new NarrowWeightGradSumProgram([8, 300], 1, 8, 300, 'P').variableNames).to.deep.equal(['partial', 'seg']);
    expect(() => new NarrowWeightGradSumProgram([16, 300], 2, 8, 300, 'P', true))
      .to.throw('NarrowWeightGradSumProgram: singleGroup sums one group, so numExperts must be 1 but got 2');
  });
});
