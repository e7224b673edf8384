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
 * median of --iters chains: host recording and GPU time together, so a per-call host stall shows),
 * the speedup, after's GB/s over the bytes it must move (its wide operand once, the output), the
 * host uploads of one after call (must be 0: the first version uploaded a one-group plan per call,
 * ~1.7 ms of host each on the H100, run S) and the max relative error of after against before
 * (must be ≤ 1e-5: the same f32 sums in another order); then one layer-step's sum (q/k/v/o four
 * times, the router once; each product runs once a step). Then the kernels' two unmeasured
 * constants, through their own code on the q/k/v/o shape: dA and dB with the rows cut into chunks
 * of each of --chunk-rows (all: one chunk; the kernel's default 128), u and g with each of
 * --rows-per-thread (the kernel's: 1 up to 4096 rows, else 2). Exits 1 on a mismatch or an upload.
 *   npx tsx bench/webgpu_dense_lora_products.ts [--tokens 2048] [--hidden 2048] [--out 2048]
 *       [--experts 64] [--rank 8] [--iters 7] [--chain 20] [--chunk-rows 64,128,256,512,all]
 *       [--rows-per-thread 1,2]
 * or bundled: ../shared/gpu/prepare.sh bench/webgpu_dense_lora_products.ts, then on the GPU machine
 *   source .gpu/on-device.sh && node .gpu/bundle/webgpu_dense_lora_products.js
 */
import * as tf from '@tensorflow/tfjs-core';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { setupDawnWebGPU } from '../src/backends/webgpu/dawn.js';
import {
  DENSE_NARROW_PRODUCTS_FLAG, type KernelArgs, NARROW_PRODUCTS_FLAG, runNarrowDenseProduct, runNarrowDenseWeightGrad,
} from '../src/backends/webgpu/kernels.js';
import { TENSOR_CORES_FLAG } from '../src/backends/webgpu/tensor_cores.js';
import { matMulAdd } from '../src/ops/matmul_add.js';
import { scaledMatMul } from '../src/ops/scaled_matmul.js';
import { weightGradProduct } from '../src/ops/weight_grad_product.js';
import { maxRelativeError } from '../src/util/numeric.js';
import { withHostUploads } from '../tools/webgpu_tc/scoped.js';
import { timeProduct } from './webgpu_timing.js';
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
const rowsPerThreadList = flag('rows-per-thread', '1,2').split(',').filter(Boolean).map(v => {
  if (v !== '1' && v !== '2') throw new Error(`--rows-per-thread: each must be 1 or 2 but got '${v}'`);
  return Number(v) as 1 | 2;
});

const adapter = await setupDawnWebGPU({ tensorCores: 'off' });
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
const sweeps: Array<[string, () => tf.Tensor, () => tf.Tensor]> = [
  ...chunkRowsList.flatMap(c => {
    const chunkRows = c === 'all' ? T : Number(c);
    if (!Number.isInteger(chunkRows) || chunkRows < 1) throw new Error(`--chunk-rows: each must be a positive integer or 'all' but got '${c}'`);
    return [
      [`attn.dA chunk rows ${c}`, () => weightGradProduct(attn.g, x), () => tensorOf(runNarrowDenseWeightGrad(kernelArgs(), attn.g, x, chunkRows))],
      [`attn.dB chunk rows ${c}`, () => weightGradProduct(attn.dy, attn.u), () => tensorOf(runNarrowDenseWeightGrad(kernelArgs(), attn.dy, attn.u, chunkRows))],
    ] as Array<[string, () => tf.Tensor, () => tf.Tensor]>;
  }),
  ...rowsPerThreadList.flatMap(rows => [
    [`attn.u ${rows} row(s)/thread`, () => scaledMatMul(x, attn.A, true, s),
      () => tensorOf(runNarrowDenseProduct(kernelArgs(), x, attn.A, true, s, rows))],
    [`attn.g ${rows} row(s)/thread`, () => scaledMatMul(attn.dy, attn.B, false, s),
      () => tensorOf(runNarrowDenseProduct(kernelArgs(), attn.dy, attn.B, false, s, rows))],
  ] as Array<[string, () => tf.Tensor, () => tf.Tensor]>),
];
for (const [label, reference, variant] of sweeps) {
  const want = withNarrow(false, reference);
  const got = variant();
  const error = maxRelativeError(await got.data(), await want.data());
  tf.dispose([want, got]);
  const ms = await timeProduct(variant, iters, chain);
  worst = Math.max(worst, error);
  process.stdout.write(`${label.padEnd(26)} ${ms.toFixed(3)} ms  max rel err vs before ${error.toExponential(2)} ${error <= 1e-5 ? 'ok' : 'MISMATCH'}\n`);
}
tf.dispose([x, ...projections.flatMap(([, p]) => [p.A, p.B, p.dy, p.u, p.g, p.y, p.dx])]);
process.exit(worst <= 1e-5 && uploadsSeen === 0 ? 0 : 1);
