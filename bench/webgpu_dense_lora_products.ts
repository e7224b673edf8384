/**
 * One decoder layer's dense LoRA products alone (issue 15): attention's q/k/v/o and the router
 * through loraLinear, at OLMoE's shape by default (T 2048 tokens, H 2048, q/k/v/o 2048 → 2048, the
 * router 2048 → E 64, r 8). The rank-r products, before (WEBGPU_MOE_NARROW_PRODUCTS and
 * WEBGPU_MOE_DENSE_NARROW_PRODUCTS off: ScaledMatMulProgram and tfjs's matMul) and after (both on:
 * the narrow programs' single-group forms, no plan inputs, src/backends/webgpu/kernels.ts):
 *   u    s·x·Aᵀ   [T, r]  (MoEScaledMatMul, inner H)     g    s·dy·B  [T, r]  (MoEScaledMatMul, inner out)
 *   dA   gᵀ·x     [r, H]  (MoEWeightGradProduct)         dB   dyᵀ·u   [out, r] (MoEWeightGradProduct)
 *   y+u·Bᵀ, dx+g·A  the expansions with their sums (MoEMatMulAdd, inner r: NarrowInnerGroupedMatMulProgram)
 * Per product one line: ms before and after (--chain products enqueued, one read at the end, the
 * median of --iters chains: host recording and GPU time together, so a per-call host stall shows), the
 * speedup, after's GB/s over the bytes it must move (its wide operand once, the output), the host
 * uploads of one after call (must be 0: the first version uploaded a one-group plan per call, ~1.7 ms
 * of host each on the H100, run S) and the max relative error of after against before (must be ≤ 1e-5:
 * the same f32 sums in another order); then one layer-step's sum (q/k/v/o four times, the router once;
 * each product runs once a step). Then dA and dB of each projection as a pair (weightGradProductPair,
 * the default: two dispatches) against apart (WEBGPU_MOE_WEIGHT_GRAD_PAIRS off: four), host+GPU ms and
 * GPU us (as below), and whether they agree bit for bit. Then the kernels' choices, through their own
 * code on the q/k/v/o shape, each line with host+GPU ms (as above), GPU us a call from timestamp
 * queries (tf.time, one pass per program; 'n/a' where the device has no timestamp-query, as Mesa's
 * software GL) and GB/s over the bytes the product must move (over GPU time where there is one, else
 * over host+GPU): dA and dB with the rows cut into chunks of each of --chunk-rows (all: one chunk; the
 * kernel's default: the flag WEBGPU_MOE_DENSE_GRAD_CHUNK_ROWS, 128), and u and g on
 * NarrowGroupedMatMulProgram's single-group form (the program before, 16 rows a workgroup, W staged
 * per 64-deep chunk; --grouped-rows-per-thread) and on DenseNarrowMatMulProgram in each of --layouts
 * (lanes × rows a thread; the kernel's: 64 × 1 below 2048 rows, 64 × 2 from there), each checked
 * against the grouped form at 1 row a thread (≤ 1e-5 relative) with its speedup over it. Exits 1 on a
 * mismatch or an upload.
 *   npx tsx bench/webgpu_dense_lora_products.ts [--tokens 2048] [--hidden 2048] [--out 2048]
 *       [--experts 64] [--rank 8] [--iters 7] [--chain 20] [--chunk-rows 64,128,256,512,all]
 *       [--grouped-rows-per-thread 1,2] [--layouts 32x1,32x2,32x4,64x1,64x2,64x4,128x1,128x2,128x4]
 * or bundled: ../shared/gpu/prepare.sh bench/webgpu_dense_lora_products.ts, then on the GPU machine
 *   source .gpu/on-device.sh && node .gpu/bundle/webgpu_dense_lora_products.js
 */
import * as tf from '@tensorflow/tfjs-core';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { setupDawnWebGPU } from '../src/backends/webgpu/dawn.js';
import {
  DENSE_NARROW_PRODUCTS_FLAG, type DenseNarrowProductForm, type KernelArgs, NARROW_PRODUCTS_FLAG, runNarrowDenseProduct,
  runNarrowDenseWeightGrad,
} from '../src/backends/webgpu/kernels.js';
import {
  DENSE_NARROW_LANES, DENSE_NARROW_ROWS_PER_THREAD, type DenseNarrowMatMulLayout,
} from '../src/backends/webgpu/programs/dense_narrow_matmul_program.js';
import { TENSOR_CORES_FLAG } from '../src/backends/webgpu/tensor_cores.js';
import { matMulAdd } from '../src/ops/matmul_add.js';
import { scaledMatMul } from '../src/ops/scaled_matmul.js';
import { weightGradProduct, weightGradProductPair } from '../src/ops/weight_grad_product.js';
import { WEIGHT_GRAD_PAIRS_FLAG } from '../src/backends/webgpu/weight_grad_pairs.js';
import { maxRelativeError } from '../src/util/numeric.js';
import { withHostUploads } from '../tools/webgpu_tc/scoped.js';
import { median, timeProduct } from './webgpu_timing.js';
import { commandLineFlag as flag } from './e2e/narrow_setup.js';

function withNarrow<T>(on: boolean, fn: () => T): T {
  const flags = [NARROW_PRODUCTS_FLAG, DENSE_NARROW_PRODUCTS_FLAG];
  const previous = flags.map(f => tf.env().getBool(f));
  for (const f of flags) tf.env().set(f, on);
  try {
    return fn();
  } finally {
    flags.forEach((f, i) => tf.env().set(f, previous[i]));
  }
}

const T = Number(flag('tokens', '2048'));
const H = Number(flag('hidden', '2048'));
const attnOut = Number(flag('out', '2048'));
const E = Number(flag('experts', '64'));
const r = Number(flag('rank', '8'));
const iters = Number(flag('iters', '7'));
const chain = Number(flag('chain', '20'));
const chunkRowsList = flag('chunk-rows', '64,128,256,512,all').split(',').filter(Boolean);
const groupedRowsPerThread = flag('grouped-rows-per-thread', '1,2').split(',').filter(Boolean).map(v => {
  if (v !== '1' && v !== '2') throw new Error(`--grouped-rows-per-thread: each must be 1 or 2 but got '${v}'`);
  return Number(v) as 1 | 2;
});
const layouts = flag('layouts', DENSE_NARROW_LANES.flatMap(l => DENSE_NARROW_ROWS_PER_THREAD.map(rpt => `${l}x${rpt}`)).join(','))
  .split(',').filter(Boolean).map(v => {
    const [lanes, rowsPerThread] = v.split('x').map(Number);
    const layout = { lanes, rowsPerThread } as DenseNarrowMatMulLayout;
    if (!DENSE_NARROW_LANES.includes(layout.lanes) || !DENSE_NARROW_ROWS_PER_THREAD.includes(layout.rowsPerThread)) {
      throw new Error(`--layouts: each must be LANESxROWS with lanes one of ${DENSE_NARROW_LANES.join(', ')} and rows a thread ` +
          `one of ${DENSE_NARROW_ROWS_PER_THREAD.join(', ')} but got '${v}'`);
    }
    return layout;
  });

// 'auto' for the toggle that exposes timestamp queries on NVIDIA (the sweeps' GPU times), full resolution;
// the tensor-core programs stay off (the flag below)
const adapter = await setupDawnWebGPU({ tensorCores: 'auto', extraFlags: ['disable-dawn-features=timestamp_quantization'] });
if (!(await tf.setBackend('webgpu'))) throw new Error('webgpu could not be set up');
registerMoEKernels('webgpu');
// rank-r products are never wide enough for the subgroup-matrix programs: the comparison is f32 only
tf.env().set(TENSOR_CORES_FLAG, false);
process.stdout.write(`# webgpu_dense_lora_products: T ${T} H ${H} q/k/v/o out ${attnOut} router out ${E} r ${r}; ` +
    `adapter tensor cores: ${adapter.tensorCores} (not used: rank-r products)\n`);

let seed = 11;
const normal = (shape: [number, number], std = 1) => tf.randomNormal(shape, 0, std, 'float32', seed++) as tf.Tensor2D;
const s = 16 / r;
const x = normal([T, H]);

/** a projection's operands: its LoRA factors (PEFT's A [r, in], B [out, r]), dy, u, g and the sums' addends */
function projection(out: number) {
  return {
    out, A: normal([r, H], 1 / Math.sqrt(H)), B: normal([out, r], 0.01), dy: normal([T, out]),
    u: normal([T, r]), g: normal([T, r]), y: normal([T, out]), dx: normal([T, H]),
  };
}
const projections = [['attn', projection(attnOut), 4], ['router', projection(E), 1]] as const;

let stepBefore = 0;
let stepAfter = 0;
let worst = 0;
let uploadsSeen = 0;
for (const [name, p, perLayer] of projections) {
  // [name, product, bytes it must move: the wide operand once + the output]
  const products: Array<[string, () => tf.Tensor, number]> = [
    ['u', () => scaledMatMul(x, p.A, true, s), 4 * (T * H + T * r)],
    ['g', () => scaledMatMul(p.dy, p.B, false, s), 4 * (T * p.out + T * r)],
    ['dA', () => weightGradProduct(p.g, x), 4 * (T * H + T * r + r * H)],
    ['dB', () => weightGradProduct(p.dy, p.u), 4 * (T * p.out + T * r + p.out * r)],
    ['y+u·Bᵀ', () => matMulAdd(p.u, p.B, false, true, p.y), 4 * (2 * T * p.out + T * r)],
    ['dx+g·A', () => matMulAdd(p.g, p.A, false, false, p.dx), 4 * (2 * T * H + T * r)],
  ];
  for (const [product, run, bytes] of products) {
    const label = `${name}.${product}`;
    const want = withNarrow(false, run);
    const got = withNarrow(true, run);
    const error = maxRelativeError(await got.data(), await want.data());
    tf.dispose([want, got]);
    // one more after call, its operands on the GPU and its programs compiled: what it uploads each call
    const uploads = await withHostUploads(async counted => {
      tf.dispose(withNarrow(true, run));
      return counted.writes + counted.copies;
    });
    const beforeMs = await timeProduct(() => withNarrow(false, run), iters, chain);
    const afterMs = await timeProduct(() => withNarrow(true, run), iters, chain);
    stepBefore += perLayer * beforeMs;
    stepAfter += perLayer * afterMs;
    worst = Math.max(worst, error);
    uploadsSeen += uploads;
    process.stdout.write(`${label.padEnd(14)} before ${beforeMs.toFixed(3)} ms  after ${afterMs.toFixed(3)} ms  ` +
        `${(beforeMs / afterMs).toFixed(2)}x  after ${(bytes / afterMs / 1e6).toFixed(1)} GB/s  ` +
        `uploads ${uploads} ${uploads === 0 ? 'ok' : 'UPLOADS'}  max rel err ${error.toExponential(2)} ${error <= 1e-5 ? 'ok' : 'MISMATCH'}\n`);
  }
}
process.stdout.write(`per layer-step (q/k/v/o x4 + router, expansions included) before ${stepBefore.toFixed(3)} ms  ` +
    `after ${stepAfter.toFixed(3)} ms  ${(stepBefore / stepAfter).toFixed(2)}x  ` +
    `${worst <= 1e-5 && uploadsSeen === 0 ? 'all ok' : `MISMATCH or UPLOADS (worst ${worst.toExponential(2)}, uploads ${uploadsSeen})`}\n`);

// the kernels' constants, through their own code (as bench/webgpu_dense_packed.ts sweeps tiles)
const kernelArgs = () => ({ inputs: {}, backend: tf.backend(), attrs: {} }) as unknown as KernelArgs;
const tensorOf = (info: tf.TensorInfo) => tf.engine().makeTensorFromTensorInfo(info);
const attn = projections[0][1];
const device = (tf.backend() as unknown as { device: GPUDevice }).device;
const timestamps = device.features.has('timestamp-query');
/** GPU ms of one call (its programs' passes summed): the median of `iters` calls under tf.time; undefined without timestamp-query */
async function gpuMs(run: () => tf.Tensor): Promise<number | undefined> {
  if (!timestamps) return undefined;
  tf.dispose(run());
  const samples: number[] = [];
  for (let i = 0; i < iters; i++) {
    const timing = await tf.time(() => { tf.dispose(run()); });
    if (typeof timing.kernelMs !== 'number') throw new Error(`tf.time gave no kernel time: ${JSON.stringify(timing.kernelMs)}`);
    samples.push(timing.kernelMs);
  }
  return median(samples);
}
process.stdout.write(`# sweeps: GPU times ${timestamps ? 'from timestamp queries' : 'n/a (no timestamp-query on this device)'}\n`);

// dA and dB together (weightGradProductPair: NarrowWeightGradPairProgram and one own sum, the default)
// against apart (WEIGHT_GRAD_PAIRS_FLAG off: two programs each), the same bits required
let pairMismatch = false;
for (const [name, p] of projections) {
  const pairOf = (together: boolean) => () => {
    tf.env().set(WEIGHT_GRAD_PAIRS_FLAG, together);
    try {
      const [dA, dB] = weightGradProductPair(p.g, x, p.dy, p.u);
      dA.dispose();
      return dB;
    } finally {
      tf.env().set(WEIGHT_GRAD_PAIRS_FLAG, true);
    }
  };
  const bits = async (together: boolean) => {
    tf.env().set(WEIGHT_GRAD_PAIRS_FLAG, together);
    const pair = weightGradProductPair(p.g, x, p.dy, p.u);
    tf.env().set(WEIGHT_GRAD_PAIRS_FLAG, true);
    const values = await Promise.all(pair.map(t => t.data()));
    tf.dispose(pair);
    return values.flatMap(v => Array.from(v));
  };
  const [together, apart] = [await bits(true), await bits(false)];
  const same = together.length === apart.length && together.every((v, i) => Object.is(v, apart[i]));
  pairMismatch ||= !same;
  const [pairMs, apartMs] = [await timeProduct(pairOf(true), iters, chain), await timeProduct(pairOf(false), iters, chain)];
  const [pairGpu, apartGpu] = [await gpuMs(pairOf(true)), await gpuMs(pairOf(false))];
  const us = (ms: number | undefined) => (ms === undefined ? 'n/a' : `${(ms * 1e3).toFixed(1)} us`);
  process.stdout.write(`${`${name}.dA+dB`.padEnd(14)} apart ${apartMs.toFixed(3)} ms (GPU ${us(apartGpu)})  pair ${pairMs.toFixed(3)} ms ` +
      `(GPU ${us(pairGpu)})  ${(apartMs / pairMs).toFixed(2)}x  ${same ? 'bit for bit ok' : 'MISMATCH'}\n`);
}

/** [label, variant, reference (the output to match), bytes it must move, the baseline line's label for a speedup] */
type Sweep = { label: string; run: () => tf.Tensor; reference: () => tf.Tensor; bytes: number; baseline?: string };
const product = (a: tf.Tensor2D, b: tf.Tensor2D, transposeB: boolean, form: DenseNarrowProductForm) =>
  () => tensorOf(runNarrowDenseProduct(kernelArgs(), a, b, transposeB, s, form));
const formLabel = (form: DenseNarrowProductForm) => form.program === 'grouped'
  ? `grouped ${form.rowsPerThread} row/thr`
  : `dense ${form.layout.lanes} lanes x ${form.layout.rowsPerThread} row/thr`;
const sweeps: Sweep[] = [
  ...chunkRowsList.flatMap(c => {
    const chunkRows = c === 'all' ? T : Number(c);
    if (!Number.isInteger(chunkRows) || chunkRows < 1) throw new Error(`--chunk-rows: each must be a positive integer or 'all' but got '${c}'`);
    return [
      { label: `attn.dA chunk rows ${c}`, reference: () => withNarrow(false, () => weightGradProduct(attn.g, x)),
        run: () => tensorOf(runNarrowDenseWeightGrad(kernelArgs(), attn.g, x, chunkRows)), bytes: 4 * (T * H + T * r + r * H) },
      { label: `attn.dB chunk rows ${c}`, reference: () => withNarrow(false, () => weightGradProduct(attn.dy, attn.u)),
        run: () => tensorOf(runNarrowDenseWeightGrad(kernelArgs(), attn.dy, attn.u, chunkRows)), bytes: 4 * (T * attnOut + T * r + attnOut * r) },
    ];
  }),
  // u = s·x·Aᵀ (A [r, H]: W's k contiguous) and g = s·dy·B (B [out, r]: W's n contiguous), every form
  // checked against the grouped form at 1 row a thread (the program the kernel ran before)
  ...([['attn.u', x, attn.A, true, H], ['attn.g', attn.dy, attn.B, false, attnOut]] as const).flatMap(([name, a, b, transposeB, inner]) => {
    const forms: DenseNarrowProductForm[] = [
      ...groupedRowsPerThread.map(rowsPerThread => ({ program: 'grouped', rowsPerThread }) as const),
      ...layouts.map(layout => ({ program: 'dense', layout }) as const),
    ];
    const baselineForm: DenseNarrowProductForm = { program: 'grouped', rowsPerThread: 1 };
    return forms.map(form => ({
      label: `${name} ${formLabel(form)}`, run: product(a, b, transposeB, form), reference: product(a, b, transposeB, baselineForm),
      bytes: 4 * (T * inner + T * r + r * inner), baseline: `${name} ${formLabel(baselineForm)}`,
    }));
  }),
];
const gpuByLabel = new Map<string, number>();
for (const { label, run, reference, bytes, baseline } of sweeps) {
  const want = reference();
  const got = run();
  const error = maxRelativeError(await got.data(), await want.data());
  tf.dispose([want, got]);
  const ms = await timeProduct(run, iters, chain);
  const gpu = await gpuMs(run);
  if (gpu !== undefined) gpuByLabel.set(label, gpu);
  // the baseline's own line gets no speedup
  const base = baseline === undefined || baseline === label ? undefined : gpuByLabel.get(baseline);
  worst = Math.max(worst, error);
  process.stdout.write(`${label.padEnd(34)} ${ms.toFixed(3)} ms  GPU ${gpu === undefined ? 'n/a' : `${(gpu * 1e3).toFixed(1)} us`}  ` +
      `${(bytes / (gpu ?? ms) / 1e6).toFixed(1)} GB/s${gpu === undefined ? ' (host+GPU)' : ''}  ` +
      `${base !== undefined && gpu !== undefined ? `${(base / gpu).toFixed(2)}x GPU vs ${baseline!.split(' ').slice(1).join(' ')}  ` : ''}` +
      `max rel err ${error.toExponential(2)} ${error <= 1e-5 ? 'ok' : 'MISMATCH'}\n`);
}
tf.dispose([x, ...projections.flatMap(([, p]) => [p.A, p.B, p.dy, p.u, p.g, p.y, p.dx])]);
process.exit(worst <= 1e-5 && uploadsSeen === 0 && !pairMismatch ? 0 : 1);
