/**
 * Each WebGPU MoE kernel on its own against float64 JS written here: the device dispatch plan,
 * the grouped products in every row source and weight layout, the weight gradients, the
 * combine, the activation backward, the routing-weight dot and the bias sums. Odd sizes, empty
 * experts, one token, K = E. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import {
  activationBackward, combineRows, deviceDispatchPlan, type DevicePlan, groupedColumnSum, groupedMatMul,
  groupedWeightGrad, pairDot, planCapacity,
} from '../../../src/backends/webgpu/kernels.js';
import type { TileConfig } from '../../../src/backends/webgpu/programs/grouped_matmul_program.js';
import { planFromExperts } from '../../../src/ops/experts/dispatch_plan.js';
import type { ExpertActivation } from '../../../src/ops/types.js';
import { Rng, asF32 } from '../../helpers/numeric.js';
import { chooseExperts, expectCloseAsync, expectNoLeakAsync } from './helpers.js';

interface PaddedPlan64 { seg: number[]; rowOfPair: number[]; pairOfRow: number[]; capacity: number }

/** The padded plan from the host's counting sort: expert e's rows start at Σ_{e'<e} ceil(n/tile)·tile. */
function paddedPlan64(experts: Int32Array, T: number, K: number, E: number, tile: number): PaddedPlan64 {
  const host = planFromExperts(experts, T, K, E);
  const starts: number[] = [];
  const hostStarts: number[] = [];
  let padded = 0;
  let plain = 0;
  for (const n of host.groupSizes) {
    starts.push(padded);
    hostStarts.push(plain);
    padded += Math.ceil(n / tile) * tile;
    plain += n;
  }
  const capacity = planCapacity(T * K, E, tile);
  const rowOfPair = Array.from(host.rowOfPair, (row, p) => {
    const e = experts[p];
    return starts[e] + row - hostStarts[e];
  });
  const pairOfRow = new Array<number>(capacity).fill(-1);
  rowOfPair.forEach((r, p) => { pairOfRow[r] = p; });
  return { seg: [...starts, padded, ...host.groupSizes], rowOfPair, pairOfRow, capacity };
}

function sigmoid(v: number): number { return 1 / (1 + Math.exp(-v)); }

/** PyTorch's gelu(approximate='tanh'), float64 */
const gelu64 = (g: number) => 0.5 * g * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (g + 0.044715 * g ** 3)));

function act64(a: ExpertActivation, g: number, u: number): number {
  if (a.kind === 'swiglu') return g * sigmoid(g) * u;
  if (a.kind === 'gegluTanh') return gelu64(g) * u;
  const gc = Math.min(g, a.limit);
  const uc = Math.min(Math.max(u, -a.limit), a.limit);
  return (uc + 1) * gc * sigmoid(a.alpha * gc);
}

/** [dGate, dUp] of act at (g, u) for da, by the formulas (clamps pass the gradient inside the limits). */
function actGrad64(a: ExpertActivation, g: number, u: number, da: number): [number, number] {
  if (a.kind === 'gegluTanh') {
    // central differences of the float64 GELU (1e-6 on float64 is ~1e-10 accurate)
    const dGelu = (gelu64(g + 1e-6) - gelu64(g - 1e-6)) / 2e-6;
    return [da * u * dGelu, da * gelu64(g)];
  }
  if (a.kind === 'swiglu') {
    const s = sigmoid(g);
    return [da * u * s * (1 + g * (1 - s)), da * g * s];
  }
  const gc = Math.min(g, a.limit);
  const uc = Math.min(Math.max(u, -a.limit), a.limit);
  const s = sigmoid(a.alpha * gc);
  const dGlu = s * (1 + a.alpha * gc * (1 - s));
  return [g <= a.limit ? da * (uc + 1) * dGlu : 0, u >= -a.limit && u <= a.limit ? da * gc * s : 0];
}

interface PlanCase { name: string; T: number; K: number; E: number; routing?: 'random' | 'one' | 'skip' }

const PLAN_CASES: PlanCase[] = [
  { name: 'odd sizes, E=5 K=3', T: 37, K: 3, E: 5 },
  { name: 'one token, K = E', T: 1, K: 4, E: 4 },
  { name: 'experts 0 and E−1 empty', T: 23, K: 2, E: 6, routing: 'skip' },
  { name: 'everything on the last expert', T: 70, K: 1, E: 3, routing: 'one' },
  { name: 'more pairs than the plan threads, E=8', T: 700, K: 2, E: 8 },
];

describe('webgpu: MoE kernels', () => {
  before(function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
  });

  describe('WebGPUMoEDispatchPlan', () => {
    for (const c of PLAN_CASES) {
      for (const tile of [16, 64]) {
        it(`matches the host's stable counting sort, padded to ${tile}: ${c.name}`, async () => {
          const experts = chooseExperts(new Rng(c.T * 31 + tile), c.T, c.K, c.E, c.routing);
          const want = paddedPlan64(experts, c.T, c.K, c.E, tile);
          const ex = tf.tensor2d(experts, [c.T, c.K], 'int32');
          const plan = deviceDispatchPlan(ex, c.E, tile);
          expect(plan.capacity).to.equal(want.capacity);
          expect(Array.from(await plan.seg.data()), 'seg').to.deep.equal(want.seg);
          expect(Array.from(await plan.rowOfPair.data()), 'rowOfPair').to.deep.equal(want.rowOfPair);
          expect(Array.from(await plan.pairOfRow.data()), 'pairOfRow').to.deep.equal(want.pairOfRow);
          tf.dispose([ex, plan.seg, plan.rowOfPair, plan.pairOfRow]);
        });
      }
    }
  });

  // One problem shared by the product tests: T=11, K=3, E=5 with expert 2 unused.
  const T = 11, K = 3, E = 5;
  const tile: TileConfig = { tm: 2, tn: 2, bk: 8 };
  const rowTile = 32;
  const rng = new Rng(7);
  const experts = chooseExperts(rng, T, K, E, 'random').map(e => (e === 2 ? 4 : e));
  // K distinct experts per token is not needed by the kernels; the repeat of 4 checks that too
  const ref = paddedPlan64(experts, T, K, E, rowTile);
  let plan: DevicePlan;
  let ex: tf.Tensor2D;
  before(() => {
    ex = tf.tensor2d(experts, [T, K], 'int32');
    plan = deviceDispatchPlan(ex, E, rowTile);
  });
  after(() => tf.dispose([ex, plan.seg, plan.rowOfPair, plan.pairOfRow]));

  /** value of operand row r (padded space) column k for each source, or 0 on padding rows */
  const rowOf = (r: number) => ref.pairOfRow[r];

  describe('WebGPUMoEGroupedMatMul', () => {
    const inner = 13, outCols = 9;
    const x = asF32(rng.array(T * inner));
    const rows = asF32(rng.array(ref.capacity * inner));
    const h = asF32(rng.array(ref.capacity * 2 * inner));
    const w = asF32(rng.array(E * outCols * inner));            // [E, out, in] or [E, in, out]
    const bias = asF32(rng.array(E * outCols));
    const addend = asF32(rng.array(ref.capacity * outCols));
    const activation: ExpertActivation = { kind: 'clampedSwiglu', alpha: 1.702, limit: 0.9 };

    for (const source of ['gather', 'rows', 'act'] as const) {
      for (const transposed of [false, true]) {
        it(`${source} rows, ${transposed ? '[E, in, out]' : '[E, out, in]'} weight, bias, addend, alpha`, async () => {
          const interleaved = transposed;
          const a = (r: number, k: number): number => {
            const p = rowOf(r);
            if (p < 0) return 0;
            if (source === 'gather') return x[Math.floor(p / K) * inner + k];
            if (source === 'rows') return rows[r * inner + k];
            const base = r * 2 * inner;
            return act64(activation, h[base + (interleaved ? 2 * k : k)], h[base + (interleaved ? 2 * k + 1 : inner + k)]);
          };
          const wAt = (e: number, n: number, k: number) =>
            transposed ? w[e * outCols * inner + k * outCols + n] : w[e * outCols * inner + n * inner + k];
          const want = new Float64Array(ref.capacity * outCols);
          for (let r = 0; r < ref.capacity; r++) {
            if (rowOf(r) < 0) continue;
            const e = experts[rowOf(r)];
            for (let n = 0; n < outCols; n++) {
              let s = 0;
              for (let k = 0; k < inner; k++) s += a(r, k) * wAt(e, n, k);
              want[r * outCols + n] = 0.5 * s + bias[e * outCols + n] + addend[r * outCols + n];
            }
          }
          const input = source === 'gather' ? tf.tensor2d(Float32Array.from(x), [T, inner])
            : source === 'rows' ? tf.tensor2d(Float32Array.from(rows), [ref.capacity, inner])
            : tf.tensor2d(Float32Array.from(h), [ref.capacity, 2 * inner]);
          const wT = tf.tensor3d(Float32Array.from(w), transposed ? [E, inner, outCols] : [E, outCols, inner]);
          const bT = tf.tensor2d(Float32Array.from(bias), [E, outCols]);
          const addT = tf.tensor2d(Float32Array.from(addend), [ref.capacity, outCols]);
          const strides = transposed ? { sE: outCols * inner, sN: 1, sK: outCols } : { sE: outCols * inner, sN: inner, sK: 1 };
          await expectNoLeakAsync(async () => {
            const out = groupedMatMul({ a: input, source, w: wT, strides, inner, outCols, plan, tile, activation,
              interleaved, bias: bT, addend: addT, alpha: 0.5 });
            await expectCloseAsync(out, want, 1e-5, 'out', [ref.capacity, outCols]);
            out.dispose();
          });
          tf.dispose([input, wT, bT, addT]);
        });
      }
    }

    it("reads PEFT's rank-major B [out, r·E] in place (sE=1, sN=r·E, sK=E)", async () => {
      const r = 3;
      const u = asF32(rng.array(ref.capacity * r));
      const B = asF32(rng.array(outCols * r * E));
      const want = new Float64Array(ref.capacity * outCols);
      for (let row = 0; row < ref.capacity; row++) {
        if (rowOf(row) < 0) continue;
        const e = experts[rowOf(row)];
        for (let o = 0; o < outCols; o++) {
          let s = 0;
          for (let j = 0; j < r; j++) s += u[row * r + j] * B[o * r * E + j * E + e];
          want[row * outCols + o] = s;
        }
      }
      const uT = tf.tensor2d(Float32Array.from(u), [ref.capacity, r]);
      const bT = tf.tensor2d(Float32Array.from(B), [outCols, r * E]);
      const out = groupedMatMul({ a: uT, source: 'rows', w: bT, strides: { sE: 1, sN: r * E, sK: E }, inner: r, outCols, plan, tile });
      await expectCloseAsync(out, want, 1e-5, 'out');
      tf.dispose([uT, bT, out]);
    });
  });

  describe('WebGPUMoEGroupedWeightGrad', () => {
    const P = 10, Q = 7;
    const dOut = asF32(rng.array(T * P));
    const hRows = asF32(rng.array(ref.capacity * 2 * Q));
    const lRows = asF32(rng.array(ref.capacity * P));
    const rw = asF32(Float64Array.from({ length: T * K }, () => 0.3 + rng.uniform()));
    const activation: ExpertActivation = { kind: 'swiglu' };

    it('gathered L scaled by the routing weight, R = act(h), into [E, P, Q]; an empty expert gets zeros', async () => {
      const want = new Float64Array(E * P * Q);
      for (let r = 0; r < ref.capacity; r++) {
        const p = rowOf(r);
        if (p < 0) continue;
        const e = experts[p];
        for (let i = 0; i < P; i++) {
          for (let q = 0; q < Q; q++) {
            const a = act64(activation, hRows[r * 2 * Q + q], hRows[r * 2 * Q + Q + q]);
            want[(e * P + i) * Q + q] += rw[p] * dOut[Math.floor(p / K) * P + i] * a;
          }
        }
      }
      const l = tf.tensor2d(Float32Array.from(dOut), [T, P]);
      const hT = tf.tensor2d(Float32Array.from(hRows), [ref.capacity, 2 * Q]);
      const s = tf.tensor1d(Float32Array.from(rw));
      const out = groupedWeightGrad({ l, left: 'gather', r: hT, right: 'act', P, Q, outShape: [E, P, Q],
        outStrides: { oE: P * Q, oP: Q, oQ: 1 }, plan, tile, rowScale: s, activation, interleaved: false });
      await expectCloseAsync(out, want, 1e-5, 'dW', [E, P, Q]);
      const empty = Array.from(await out.data()).slice(2 * P * Q, 3 * P * Q);
      expect(empty.every(v => v === 0), 'expert 2 (no rows) gets zeros').to.equal(true);
      tf.dispose([l, hT, s, out]);
    });

    it("padded rows L and gathered R, alpha, written in PEFT's B layout [P, Q·E]", async () => {
      const xs = asF32(rng.array(T * Q));
      const want = new Float64Array(P * Q * E);
      for (let r = 0; r < ref.capacity; r++) {
        const p = rowOf(r);
        if (p < 0) continue;
        const e = experts[p];
        for (let i = 0; i < P; i++) {
          for (let q = 0; q < Q; q++) want[i * Q * E + q * E + e] += 2 * lRows[r * P + i] * xs[Math.floor(p / K) * Q + q];
        }
      }
      const l = tf.tensor2d(Float32Array.from(lRows), [ref.capacity, P]);
      const xT = tf.tensor2d(Float32Array.from(xs), [T, Q]);
      const out = groupedWeightGrad({ l, left: 'rows', r: xT, right: 'gather', P, Q, outShape: [P, Q * E],
        outStrides: { oE: 1, oP: Q * E, oQ: E }, plan, tile, alpha: 2 });
      await expectCloseAsync(out, want, 1e-5, 'dB', [P, Q * E]);
      tf.dispose([l, xT, out]);
    });
  });

  describe('row-wise kernels', () => {
    const width = 6;
    const y = asF32(rng.array(ref.capacity * width));
    const rw = asF32(Float64Array.from({ length: T * K }, () => 0.3 + rng.uniform()));

    for (const weighted of [true, false]) {
      it(`WebGPUMoECombineRows ${weighted ? 'weighted' : 'unweighted'}: out[t] = Σ_k (w·) y[rowOfPair]`, async () => {
        const want = new Float64Array(T * width);
        for (let t = 0; t < T; t++) {
          for (let k = 0; k < K; k++) {
            const p = t * K + k;
            for (let j = 0; j < width; j++) want[t * width + j] += (weighted ? rw[p] : 1) * y[ref.rowOfPair[p] * width + j];
          }
        }
        const yT = tf.tensor2d(Float32Array.from(y), [ref.capacity, width]);
        const wT = tf.tensor1d(Float32Array.from(rw));
        const out = combineRows(yT, plan, weighted ? wT : undefined);
        await expectCloseAsync(out, want, 1e-6, 'out', [T, width]);
        tf.dispose([yT, wT, out]);
      });
    }

    const activations: Array<[string, ExpertActivation, boolean]> = [
      ['swiglu, gate|up halves', { kind: 'swiglu' }, false],
      ['clamped GLU, interleaved', { kind: 'clampedSwiglu', alpha: 1.702, limit: 0.7 }, true],
      ['Gemma 4 geglu (tanh GELU), gate|up halves', { kind: 'gegluTanh' }, false],
    ];
    for (const [name, activation, interleaved] of activations) {
      it(`WebGPUMoEActivationBackward (${name}): dh = act'(h)·(w·g), zero on padding`, async () => {
        const h = asF32(rng.array(ref.capacity * 2 * width));
        const g = asF32(rng.array(ref.capacity * width));
        const want = new Float64Array(ref.capacity * 2 * width);
        for (let r = 0; r < ref.capacity; r++) {
          const p = rowOf(r);
          if (p < 0) continue;
          for (let i = 0; i < width; i++) {
            const gi = r * 2 * width + (interleaved ? 2 * i : i);
            const ui = r * 2 * width + (interleaved ? 2 * i + 1 : width + i);
            const [dg, du] = actGrad64(activation, h[gi], h[ui], rw[p] * g[r * width + i]);
            want[gi] = dg;
            want[ui] = du;
          }
        }
        const hT = tf.tensor2d(Float32Array.from(h), [ref.capacity, 2 * width]);
        const gT = tf.tensor2d(Float32Array.from(g), [ref.capacity, width]);
        const wT = tf.tensor1d(Float32Array.from(rw));
        const out = activationBackward(hT, gT, wT, plan, activation, interleaved);
        await expectCloseAsync(out, want, 1e-5, 'dh', [ref.capacity, 2 * width]);
        tf.dispose([hT, gT, wT, out]);
      });

      it(`WebGPUMoEPairDot (${name}, down bias): ⟨g, act(h)⟩ + ⟨dOut, b2_e⟩ per pair`, async () => {
        const H = 5;
        const h = asF32(rng.array(ref.capacity * 2 * width));
        const g = asF32(rng.array(ref.capacity * width));
        const dOut = asF32(rng.array(T * H));
        const b2 = asF32(rng.array(E * H));
        const want = new Float64Array(T * K);
        for (let p = 0; p < T * K; p++) {
          const r = ref.rowOfPair[p];
          let s = 0;
          for (let i = 0; i < width; i++) {
            const base = r * 2 * width;
            s += g[r * width + i] * act64(activation, h[base + (interleaved ? 2 * i : i)], h[base + (interleaved ? 2 * i + 1 : width + i)]);
          }
          for (let j = 0; j < H; j++) s += dOut[Math.floor(p / K) * H + j] * b2[experts[p] * H + j];
          want[p] = s;
        }
        const hT = tf.tensor2d(Float32Array.from(h), [ref.capacity, 2 * width]);
        const gT = tf.tensor2d(Float32Array.from(g), [ref.capacity, width]);
        const dT = tf.tensor2d(Float32Array.from(dOut), [T, H]);
        const bT = tf.tensor2d(Float32Array.from(b2), [E, H]);
        const out = pairDot(gT, hT, plan, activation, interleaved, { dOut: dT, downBias: bT, experts: ex });
        await expectCloseAsync(out, want, 1e-5, 'dWeights', [T, K]);
        tf.dispose([hT, gT, dT, bT, out]);
      });
    }

    it('WebGPUMoEGroupedColumnSum: gathered and scaled, and padded rows; an empty expert sums to 0', async () => {
      const src = asF32(rng.array(T * width));
      const gathered = new Float64Array(E * width);
      const plain = new Float64Array(E * width);
      for (let r = 0; r < ref.capacity; r++) {
        const p = rowOf(r);
        if (p < 0) continue;
        for (let c = 0; c < width; c++) {
          gathered[experts[p] * width + c] += rw[p] * src[Math.floor(p / K) * width + c];
          plain[experts[p] * width + c] += y[r * width + c];
        }
      }
      const sT = tf.tensor2d(Float32Array.from(src), [T, width]);
      const yT = tf.tensor2d(Float32Array.from(y), [ref.capacity, width]);
      const wT = tf.tensor1d(Float32Array.from(rw));
      const a = groupedColumnSum(sT, 'gather', plan, wT);
      const b = groupedColumnSum(yT, 'rows', plan);
      await expectCloseAsync(a, gathered, 1e-5, 'gathered', [E, width]);
      await expectCloseAsync(b, plain, 1e-5, 'rows', [E, width]);
      tf.dispose([sT, yT, wT, a, b]);
    });
  });
});
