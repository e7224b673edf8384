/**
 * Split LoRA's rank-r grouped products alone (issue 15), NarrowGroupedMatMulProgram /
 * NarrowInnerGroupedMatMulProgram / NarrowWeightGradProgram against the generic tiled programs (WEBGPU_MOE_NARROW_PRODUCTS off, the
 * tiles experts.ts gives them: narrowColumns / narrowRows of the automatic tuning), at OLMoE's
 * shape by default (T 2048, K 8 of E 64, H 2048, I 1024, r 8). One layer's eight distinct ones:
 *   up.u      x[tok]·A1_eᵀ          (gather, inner H)      down.u    act(h)·A2_eᵀ      (act, inner I)
 *   down.gr   s·dOut[tok]·B2_e      (gather, inner H)      up.gr     s·dh·B1_e         (rows, inner 2I)
 *   down.dA   Σ (w·gr)ᵀ·act(h)      (P r, Q I)             down.dB   Σ (w·dOut[tok])ᵀ·u (P H, Q r)
 *   up.dA     Σ grᵀ·x[tok]          (P r, Q H)             up.dB     Σ dhᵀ·u           (P 2I, Q r)
 *   up.ex     y1 + s·u·B1_eᵀ        (inner r, out 2I)      down.ex   y2 + s·u·B2_eᵀ    (inner r, out H)
 *   up.dxA    dx1 + gr·A1_e         (inner r, out H)       down.dxA  dx2 + gr·A2_e     (inner r, out I)
 * (the expansions: the LoRA term added to the base product's output, the addend, on PEFT's B read
 * strided forward and A along its rows backward, exactly as experts.ts calls them)
 * (the forward's u is recomputed in backward: up.u and down.u run twice a step). Per product one
 * line: ms of each (--chain products enqueued, one read at the end, the median of --iters
 * chains), the speedup, the narrow one's GB/s over the bytes it must move (its wide operand
 * once, plus the output), and the max relative error of narrow against generic (must be ≤ 1e-5:
 * the same f32 sums in another order); then down.grT / up.grT: the narrow s·dy·B_e on a contiguous
 * Bᵀ copy made in the call (whether experts.ts should transpose PEFT's strided B first).
 * Routing: --skew 0 (the default) gives each token K distinct experts uniformly (the balanced
 * groups a load-balanced router gives); --skew s > 0 draws them Zipf-like, expert i with probability
 * ∝ 1/(i+1)^s, K distinct per token (seeded), so that expert 0 gets several times the mean rows as
 * frequent tokens give under real text (s 1 at OLMoE's shape: see the header's max/mean). Both sides
 * of every line run on the same plan. --grad-chunk-rows n sets WEBGPU_MOE_NARROW_GRAD_CHUNK_ROWS (the
 * rows one workgroup of the narrow dA/dB sums, rounded up to the row tile; default 128) for tuning
 * it; a huge value (100000) makes one chunk per expert, as the first version's one workgroup per
 * expert did (plus the chunk-sum dispatch).
 *   npx tsx bench/webgpu_lora_products.ts [--tokens 2048] [--experts 64] [--topk 8] [--hidden 2048]
 *       [--inter 1024] [--rank 8] [--skew 0] [--grad-chunk-rows 128] [--iters 7] [--chain 20]
 * or bundled: ../shared/gpu/prepare.sh bench/webgpu_lora_products.ts, then on the GPU machine
 *   source .gpu/on-device.sh && node .gpu/bundle/webgpu_lora_products.js
 */
import * as tf from '@tensorflow/tfjs-core';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { setupDawnWebGPU } from '../src/backends/webgpu/dawn.js';
import { webgpuMoETuningFor } from '../src/backends/webgpu/experts.js';
import {
  deviceDispatchPlan, type DevicePlan, groupedMatMul, groupedWeightGrad, NARROW_GRAD_CHUNK_ROWS_FLAG, NARROW_PRODUCTS_FLAG,
} from '../src/backends/webgpu/kernels.js';
import type { TileConfig } from '../src/backends/webgpu/programs/grouped_matmul_program.js';
import { narrowGradChunkRows } from '../src/backends/webgpu/programs/narrow_matmul_program.js';
import { TENSOR_CORES_FLAG } from '../src/backends/webgpu/tensor_cores.js';
import { maxRelativeError } from '../src/util/numeric.js';
import { timeProduct } from './webgpu_timing.js';
import { commandLineFlag as flag } from './e2e/narrow_setup.js';

function withNarrow<T>(on: boolean, fn: () => T): T {
  const previous = tf.env().getBool(NARROW_PRODUCTS_FLAG);
  tf.env().set(NARROW_PRODUCTS_FLAG, on);
  try {
    return fn();
  } finally {
    tf.env().set(NARROW_PRODUCTS_FLAG, previous);
  }
}

const T = Number(flag('tokens', '2048'));
const E = Number(flag('experts', '64'));
const K = Number(flag('topk', '8'));
const H = Number(flag('hidden', '2048'));
const I = Number(flag('inter', '1024'));
const r = Number(flag('rank', '8'));
const skew = Number(flag('skew', '0'));
if (!(skew >= 0)) throw new Error(`webgpu_lora_products: --skew must be a number >= 0 but got '${flag('skew', '0')}'`);
const iters = Number(flag('iters', '7'));
const chain = Number(flag('chain', '20'));

const adapter = await setupDawnWebGPU({ tensorCores: 'off' });
if (!(await tf.setBackend('webgpu'))) throw new Error('webgpu could not be set up');
registerMoEKernels('webgpu');
// rank-r products are never wide enough for the subgroup-matrix programs: keep the comparison f32 only
tf.env().set(TENSOR_CORES_FLAG, false);
tf.env().set(NARROW_GRAD_CHUNK_ROWS_FLAG, Number(flag('grad-chunk-rows', String(tf.env().getNumber(NARROW_GRAD_CHUNK_ROWS_FLAG)))));
let seed = 7;
const rand = () => { seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0; return seed / 2 ** 32; };
const chosen = new Int32Array(T * K);
if (skew === 0) {
  // K distinct experts per token, uniformly (a partial Fisher-Yates shuffle)
  for (let t = 0; t < T; t++) {
    const perm = Array.from({ length: E }, (_, e) => e);
    for (let k = 0; k < K; k++) {
      const j = k + Math.floor(rand() * (E - k));
      [perm[k], perm[j]] = [perm[j], perm[k]];
      chosen[t * K + k] = perm[k];
    }
  }
} else {
  // K distinct experts per token drawn in turn, each from the Zipf weights of the experts not yet drawn
  const zipf = Array.from({ length: E }, (_, e) => 1 / (e + 1) ** skew);
  for (let t = 0; t < T; t++) {
    const weights = [...zipf];
    let total = weights.reduce((a, b) => a + b, 0);
    for (let k = 0; k < K; k++) {
      let u = rand() * total;
      let e = 0;
      while (e < E - 1 && (weights[e] === 0 || u >= weights[e])) { u -= weights[e]; e++; }
      // rounding can leave u past the last weight: take the last expert not yet drawn
      while (weights[e] === 0) e--;
      chosen[t * K + k] = e;
      total -= weights[e];
      weights[e] = 0;
    }
  }
}
const rowsOfExpert = new Array<number>(E).fill(0);
for (const e of chosen) rowsOfExpert[e]++;
const meanRows = (T * K) / E;
const experts = tf.tensor2d(chosen, [T, K], 'int32');
const tuning = webgpuMoETuningFor(T * K, E);
const plan: DevicePlan = deviceDispatchPlan(experts, E, tuning.rowTile);
process.stdout.write(`# webgpu_lora_products: T ${T} K ${K} E ${E} H ${H} I ${I} r ${r}; skew ${skew}: expert rows max/mean ` +
    `${Math.max(...rowsOfExpert)}/${meanRows.toFixed(1)} = ${(Math.max(...rowsOfExpert) / meanRows).toFixed(2)}; ` +
    `narrow dA/dB chunks of ${narrowGradChunkRows(tuning.rowTile, tf.env().getNumber(NARROW_GRAD_CHUNK_ROWS_FLAG))} rows (row tile ${tuning.rowTile}); adapter tensor cores: ${adapter.tensorCores}\n`);
const cap = plan.capacity;
const normal = (shape: number[], std = 1) => tf.randomNormal(shape, 0, std, 'float32', seed++);
const x = normal([T, H]) as tf.Tensor2D;
const dOut = normal([T, H]) as tf.Tensor2D;
const h = normal([cap, 2 * I]) as tf.Tensor2D;
const dh = normal([cap, 2 * I]) as tf.Tensor2D;
const uUp = normal([cap, r]) as tf.Tensor2D;
const uDown = normal([cap, r]) as tf.Tensor2D;
const gr = normal([cap, r]) as tf.Tensor2D;
// the base products' outputs the expansions add to: [cap, 2I], [cap, H], [cap, I]
const y1 = normal([cap, 2 * I]) as tf.Tensor2D;
const yH = normal([cap, H]) as tf.Tensor2D;
const dxI = normal([cap, I]) as tf.Tensor2D;
const rw = tf.randomUniform([T * K], 0.05, 0.3, 'float32', seed++) as tf.Tensor1D;
const A1 = normal([r * E, H], 1 / Math.sqrt(H)) as tf.Tensor2D;
const B1 = normal([2 * I, r * E], 0.01) as tf.Tensor2D;
const A2 = normal([r * E, I], 1 / Math.sqrt(I)) as tf.Tensor2D;
const B2 = normal([H, r * E], 0.01) as tf.Tensor2D;
const s = 16 / r;
const activation = { kind: 'swiglu' } as const;
// the tiles experts.ts gives the generic program for these products
const narrowColumns = (t: TileConfig): TileConfig => ({ ...t, tn: 1, vec4: false });
const narrowRows = (t: TileConfig): TileConfig => ({ ...t, tm: 1, vec4: false });
const common = { plan, activation };
const aStrides = (inSize: number) => ({ sE: r * inSize, sN: inSize, sK: 1 });
const bBackward = { sE: 1, sN: E, sK: r * E };
// experts.ts's forwardStrides(factorBLayout) and backwardStrides(factorALayout): inner r
const bForward = { sE: 1, sN: r * E, sK: E };
const aBackward = (outSize: number) => ({ sE: r * outSize, sN: 1, sK: outSize });
const N = T * K;

/**
 * [name, product, bytes it must move: the wide operand's real rows once (padding rows are not
 * read; a gathered row counts once per pair) + the output]
 */
const products: Array<[string, () => tf.Tensor, number]> = [
  ['up.u', () => groupedMatMul({ ...common, a: x, source: 'gather', w: A1, strides: aStrides(H), inner: H, outCols: r,
    tile: narrowColumns(tuning.tile) }), 4 * (N * H + cap * r)],
  ['down.u', () => groupedMatMul({ ...common, a: h, source: 'act', w: A2, strides: aStrides(I), inner: I, outCols: r,
    tile: narrowColumns(tuning.tile) }), 4 * (N * 2 * I + cap * r)],
  ['down.gr', () => groupedMatMul({ ...common, a: dOut, source: 'gather', w: B2, strides: bBackward, inner: H, outCols: r,
    alpha: s, tile: narrowColumns(tuning.tile), gradient: true }), 4 * (N * H + cap * r)],
  ['up.gr', () => groupedMatMul({ ...common, a: dh, source: 'rows', w: B1, strides: bBackward, inner: 2 * I, outCols: r,
    alpha: s, tile: narrowColumns(tuning.tile), gradient: true }), 4 * (N * 2 * I + cap * r)],
  ['down.dA', () => groupedWeightGrad({ ...common, l: gr, left: 'rows', r: h, right: 'act', P: r, Q: I, outShape: A2.shape,
    outStrides: { oE: r * I, oP: I, oQ: 1 }, rowScale: rw, tile: narrowRows(tuning.gradTile) }), 4 * (N * 2 * I + r * E * I)],
  ['down.dB', () => groupedWeightGrad({ ...common, l: dOut, left: 'gather', r: uDown, right: 'rows', P: H, Q: r, outShape: B2.shape,
    outStrides: { oE: 1, oP: r * E, oQ: E }, rowScale: rw, alpha: s, tile: narrowColumns(tuning.gradTile) }), 4 * (N * H + H * r * E)],
  ['up.dA', () => groupedWeightGrad({ ...common, l: gr, left: 'rows', r: x, right: 'gather', P: r, Q: H, outShape: A1.shape,
    outStrides: { oE: r * H, oP: H, oQ: 1 }, tile: narrowRows(tuning.gradTile) }), 4 * (N * H + r * E * H)],
  ['up.dB', () => groupedWeightGrad({ ...common, l: dh, left: 'rows', r: uUp, right: 'rows', P: 2 * I, Q: r, outShape: B1.shape,
    outStrides: { oE: 1, oP: r * E, oQ: E }, alpha: s, tile: narrowColumns(tuning.gradTile) }), 4 * (N * 2 * I + 2 * I * r * E)],
  // the expansions: the addend's real rows read once, the whole output written (padding rows and
  // rows past those in use get 0), A's rows once
  ['up.ex', () => groupedMatMul({ ...common, a: uUp, source: 'rows', w: B1, strides: bForward, inner: r, outCols: 2 * I,
    addend: y1, alpha: s, tile: tuning.tile }), 4 * (N * 2 * I + cap * 2 * I + cap * r)],
  ['down.ex', () => groupedMatMul({ ...common, a: uDown, source: 'rows', w: B2, strides: bForward, inner: r, outCols: H,
    addend: yH, alpha: s, tile: tuning.tile }), 4 * (N * H + cap * H + cap * r)],
  ['up.dxA', () => groupedMatMul({ ...common, a: gr, source: 'rows', w: A1, strides: aBackward(H), inner: r, outCols: H,
    addend: yH, tile: tuning.tile }), 4 * (N * H + cap * H + cap * r)],
  ['down.dxA', () => groupedMatMul({ ...common, a: gr, source: 'rows', w: A2, strides: aBackward(I), inner: r, outCols: I,
    addend: dxI, tile: tuning.tile }), 4 * (N * I + cap * I + cap * r)],
];

/**
 * s·dy·B_e on a contiguous copy Bᵀ [E, r, out] made in the same call: PEFT's B [out, r·E] puts
 * an expert's r values of a row E apart, so staging B_e reads a 32-byte sector per value. If these
 * lines beat down.gr / up.gr, experts.ts should transpose B once per backward.
 */
const contiguousB = (b: tf.Tensor2D, out: number) =>
  tf.transpose(tf.reshape(b, [out, r, E]), [2, 1, 0]) as tf.Tensor3D;  // [E, r, out]
const variants: Array<[string, () => tf.Tensor, number, string]> = [
  ['down.grT', () => tf.tidy(() => groupedMatMul({ ...common, a: dOut, source: 'gather', w: contiguousB(B2, H),
    strides: aStrides(H), inner: H, outCols: r, alpha: s, tile: narrowColumns(tuning.tile), gradient: true })),
  4 * (N * H + cap * r), 'down.gr'],
  ['up.grT', () => tf.tidy(() => groupedMatMul({ ...common, a: dh, source: 'rows', w: contiguousB(B1, 2 * I),
    strides: aStrides(2 * I), inner: 2 * I, outCols: r, alpha: s, tile: narrowColumns(tuning.tile), gradient: true })),
  4 * (N * 2 * I + cap * r), 'up.gr'],
];

// per layer and step: up.u and down.u run twice (forward, and recomputed in backward), the rest once
const runsPerStep = (name: string) => (name.endsWith('.u') ? 2 : 1);
let stepGeneric = 0;
let stepNarrow = 0;
let worst = 0;
for (const [name, product, bytes] of products) {
  const want = withNarrow(false, product);
  const got = withNarrow(true, product);
  const error = maxRelativeError(await got.data(), await want.data());
  tf.dispose([want, got]);
  const genericMs = await timeProduct(() => withNarrow(false, product), iters, chain);
  const narrowMs = await timeProduct(() => withNarrow(true, product), iters, chain);
  stepGeneric += runsPerStep(name) * genericMs;
  stepNarrow += runsPerStep(name) * narrowMs;
  worst = Math.max(worst, error);
  process.stdout.write(`${name.padEnd(8)} generic ${genericMs.toFixed(3)} ms  narrow ${narrowMs.toFixed(3)} ms  ` +
      `${(genericMs / narrowMs).toFixed(2)}x  narrow ${(bytes / narrowMs / 1e6).toFixed(1)} GB/s  ` +
      `max rel err ${error.toExponential(2)} ${error <= 1e-5 ? 'ok' : 'MISMATCH'}\n`);
}
// the Bᵀ-copy variants (narrow only, transpose included) against the generic product on PEFT's B
for (const [name, product, bytes, of] of variants) {
  const reference = products.find(([n]) => n === of)![1];
  const want = withNarrow(false, reference);
  const got = withNarrow(true, product);
  const error = maxRelativeError(await got.data(), await want.data());
  tf.dispose([want, got]);
  const narrowMs = await timeProduct(() => withNarrow(true, product), iters, chain);
  worst = Math.max(worst, error);
  process.stdout.write(`${name.padEnd(8)} narrow on a Bᵀ copy (transpose included) ${narrowMs.toFixed(3)} ms  ` +
      `${(bytes / narrowMs / 1e6).toFixed(1)} GB/s  max rel err vs generic ${of} ${error.toExponential(2)} ${error <= 1e-5 ? 'ok' : 'MISMATCH'}\n`);
}
process.stdout.write(`per layer-step (u twice) generic ${stepGeneric.toFixed(3)} ms  narrow ${stepNarrow.toFixed(3)} ms  ` +
    `${(stepGeneric / stepNarrow).toFixed(2)}x  ${worst <= 1e-5 ? 'all ok' : 'MISMATCH'}\n`);
tf.dispose([experts, plan.seg, plan.rowOfPair, plan.pairOfRow, x, dOut, h, dh, uUp, uDown, gr, rw, A1, B1, A2, B2, y1, yH, dxI]);
process.exit(worst <= 1e-5 ? 0 : 1);
