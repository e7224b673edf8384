/**
 * A packed 16-bit dense projection on WebGPU against tfjs's own product on the float32 weight
 * (issue 10/15): for Qwen3-30B-A3B's and OLMoE's attention shapes, per token count, the time of
 *   f32      tf.matMul on the float32 weight (tfjs-webgpu's MatMulPacked or whichever it picks)
 *   ours-f32 MoEDenseMatMul on the same float32 weight (the grouped program with one group, its
 *            automatic tile), whichever way WEBGPU_MOE_DENSE_PROGRAM is set
 *   packed   denseWeightMatMul on the bf16 words (MoEPackedDenseMatMul: one program, halves decoded
 *            in the tile loads), with its automatic tile and with each tile of --tiles
 *   decode   the path before it: MoEDecodePacked of the whole weight, then tf.matMul
 *   tc-f32 / tc-packed (with --tensor-cores on) denseWeightMatMul on the float32 / bf16 weight with
 *            WEBGPU_MOE_TENSOR_CORES on: the subgroup-matrix program with one group (dy·W as a
 *            gradient: its per-tensor scale included); the columns above run with it off
 * for the forward x·Wᵀ and the input gradient dy·W. Time per product: --chain products enqueued
 * back to back and one read at the end, the median of --iters such chains (ms), and GFLOP/s.
 *   npx tsx bench/webgpu_dense_packed.ts [--tokens 512,2048,4096] [--shapes qwen3,olmoe,olmoe-head] [--iters 7] [--chain 20]
 *       [--tiles 2x4x16,4x4x16,8x8x16,4x4x16v,8x8x16v] [--tensor-cores on|off] [--json out.json]
 * With --tensor-cores on where the adapter has none (Mesa), the tc columns are null and a line on
 * stderr says why (DENSE_BENCH_HARNESS=1 fills them anyway, the f32 path then: a dry run of their
 * code). The LM head (olmoe-head) with no tile sweep: --shapes olmoe-head --tiles ''.
 * or bundled: ../shared/gpu/prepare.sh bench/webgpu_dense_packed.ts, then on the GPU machine
 *   source .gpu/on-device.sh && node .gpu/bundle/webgpu_dense_packed.js
 */
import * as tf from '@tensorflow/tfjs-core';
import { writeFileSync } from 'node:fs';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { setupDawnWebGPU } from '../src/backends/webgpu/dawn.js';
import { type KernelArgs, runDenseMatMul, runPackedDenseMatMul } from '../src/backends/webgpu/kernels.js';
import { TENSOR_CORES_FLAG } from '../src/backends/webgpu/tensor_cores.js';
import type { TileConfig } from '../src/backends/webgpu/programs/grouped_matmul_program.js';
import {
  type DenseMatMulAttrs, denseWeightMatMul, type PackedDenseMatMulAttrs, type PackedDenseWeight, packedDenseWeightFromBits, unpackDenseWeight,
} from '../src/ops/packed.js';
import { encodeBFloat16 } from '../src/util/half.js';
import { maxRelativeError } from '../src/util/numeric.js';
import { timeProduct } from './webgpu_timing.js';
import { commandLineFlag as flag } from './e2e/narrow_setup.js';

/** [name, out, in] of each attention projection (q, k/v, o). */
const SHAPES: Record<string, Array<[string, number, number]>> = {
  qwen3: [['q_proj', 4096, 2048], ['k_proj', 512, 2048], ['o_proj', 2048, 4096]],
  olmoe: [['q_proj', 2048, 2048]],
  // the untied LM head (50304 × 2048), one of the end-to-end step's largest dense products
  'olmoe-head': [['lm_head', 50304, 2048]],
};

function parseTile(s: string): TileConfig {
  const m = /^(\d+)x(\d+)x(\d+)(v?)$/.exec(s);
  if (m === null) throw new Error(`--tiles: '${s}' is not TMxTNxBK[v]`);
  return { tm: Number(m[1]), tn: Number(m[2]), bk: Number(m[3]), vec4: m[4] === 'v' };
}

/** MoEPackedDenseMatMul with a given tile, through the kernel's own code (runPackedDenseMatMul). */
function packedWithTile(a: tf.Tensor2D, w: PackedDenseWeight, transposeWeight: boolean, tile: TileConfig): tf.Tensor {
  const backend = tf.backend();
  const attrs: PackedDenseMatMulAttrs = { kind: w.kind, rows: w.shape[0], cols: w.shape[1], transposeWeight };
  const info = runPackedDenseMatMul({ inputs: {}, backend, attrs: {} } as unknown as KernelArgs, a, w.packed, undefined, attrs, tile);
  return tf.engine().makeTensorFromTensorInfo(info);
}

/** MoEDenseMatMul on a float32 W with its automatic tile, through the kernel's own code (runDenseMatMul). */
function oursF32(a: tf.Tensor2D, w: tf.Tensor2D, transposeWeight: boolean): tf.Tensor {
  const attrs: DenseMatMulAttrs = { rows: w.shape[0], cols: w.shape[1], transposeWeight };
  const info = runDenseMatMul({ inputs: {}, backend: tf.backend(), attrs: {} } as unknown as KernelArgs, a, w, undefined, attrs);
  return tf.engine().makeTensorFromTensorInfo(info);
}

/** `fn` with the subgroup-matrix products on (the tc columns), the flag off again after. */
async function onTensorCores<T>(fn: () => Promise<T>): Promise<T> {
  tf.env().set(TENSOR_CORES_FLAG, true);
  try {
    return await fn();
  } finally {
    tf.env().set(TENSOR_CORES_FLAG, false);
  }
}

/** max rel. error of `tc` (run with the tensor cores on) against `f32` (run with them off). */
async function productError(tc: () => tf.Tensor, f32: () => tf.Tensor): Promise<number> {
  const want = f32();
  const got = await onTensorCores(async () => tc());
  const [g, w] = await Promise.all([got.data(), want.data()]);
  tf.dispose([got, want]);
  return maxRelativeError(g, w);
}

const tensorCoresArg = flag('tensor-cores', 'off');
if (tensorCoresArg !== 'on' && tensorCoresArg !== 'off') throw new Error(`--tensor-cores: 'on' or 'off'; got '${tensorCoresArg}'`);
const adapter = await setupDawnWebGPU({ tensorCores: tensorCoresArg === 'on' ? 'auto' : 'off' });
if (!(await tf.setBackend('webgpu'))) throw new Error('webgpu could not be set up');
registerMoEKernels('webgpu');
tf.env().set(TENSOR_CORES_FLAG, false);
const tensorCores = tensorCoresArg === 'on' && (adapter.tensorCores === 'available' || process.env.DENSE_BENCH_HARNESS === '1');
if (tensorCoresArg === 'on' && adapter.tensorCores !== 'available') {
  process.stderr.write(`--tensor-cores on: no tensor cores on this adapter (${adapter.tensorCores}): ` +
      `${tensorCores ? 'tc columns are the f32 path (DENSE_BENCH_HARNESS)' : 'tc columns null'}\n`);
}
const iters = Number(flag('iters', '7'));
const chain = Number(flag('chain', '20'));
const tiles = flag('tiles', '2x4x16,4x4x16,8x8x16,4x4x16v,8x8x16v').split(',').filter(Boolean);
const rows: Array<Record<string, unknown>> = [];
for (const shapeName of flag('shapes', 'qwen3,olmoe').split(',')) {
  for (const [proj, out, inSize] of SHAPES[shapeName]) {
    // uniform in ±√(3/in) (unit-variance outputs), made on the host: packing reads the values there
    let seed = 1;
    const values = Float32Array.from({ length: out * inSize }, () => {
      seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
      return (seed / 2 ** 32 * 2 - 1) * Math.sqrt(3 / inSize);
    });
    const packed = packedDenseWeightFromBits('bf16', [out, inSize], encodeBFloat16(values));
    const wDecoded = unpackDenseWeight(packed);  // the bf16 values as float32: tfjs's product on the same numbers
    for (const n of flag('tokens', '512,2048,4096').split(',').map(Number)) {
      const x = tf.randomNormal([n, inSize], 0, 1, 'float32', 2) as tf.Tensor2D;
      const dy = tf.randomNormal([n, out], 0, 1, 'float32', 3) as tf.Tensor2D;
      const gflops = (ms: number) => Math.round(2 * n * out * inSize / ms / 1e6);
      for (const [dir, a, transposeWeight] of [['forward x·Wᵀ', x, true], ['dx dy·W', dy, false]] as const) {
        const f32 = await timeProduct(() => tf.matMul(a, wDecoded, false, transposeWeight), iters, chain);
        const ours = await timeProduct(() => oursF32(a, wDecoded, transposeWeight), iters, chain);
        const auto = await timeProduct(() => denseWeightMatMul(a, packed, transposeWeight, null), iters, chain);
        const decode = await timeProduct(() => tf.tidy(() => tf.matMul(a, unpackDenseWeight(packed), false, transposeWeight)), iters, chain);
        const byTile: Record<string, number> = {};
        for (const t of tiles) byTile[t] = await timeProduct(() => packedWithTile(a, packed, transposeWeight, parseTile(t)), iters, chain);
        const operand = transposeWeight ? 'activation' : 'gradient';
        const tcF32 = tensorCores ? await onTensorCores(() => timeProduct(() => denseWeightMatMul(a, wDecoded, transposeWeight, null, operand), iters, chain)) : null;
        const tcPacked = tensorCores ? await onTensorCores(() => timeProduct(() => denseWeightMatMul(a, packed, transposeWeight, null, operand), iters, chain)) : null;
        // the tc results against the f32 path's on the same weight (issue 13's contract: max rel. error <= 1e-2)
        const tcError = tensorCores ? {
          f32W: await productError(() => denseWeightMatMul(a, wDecoded, transposeWeight, null, operand), () => oursF32(a, wDecoded, transposeWeight)),
          packed: await productError(() => denseWeightMatMul(a, packed, transposeWeight, null, operand), () => denseWeightMatMul(a, packed, transposeWeight, null)),
        } : null;
        const ratio = (ms: number | null) => ms === null ? null : Math.round(ms / f32 * 100) / 100;
        const row = {
          shape: shapeName, proj, out, in: inSize, tokens: n, dir, f32Ms: f32, oursF32Ms: ours, packedMs: auto, decodeMs: decode,
          tcF32Ms: tcF32, tcPackedMs: tcPacked, tcMaxRelError: tcError,
          oursF32OverF32: ratio(ours), packedOverF32: ratio(auto), tcF32OverF32: ratio(tcF32), tcPackedOverF32: ratio(tcPacked),
          gflops: { f32: gflops(f32), oursF32: gflops(ours), packed: gflops(auto), decode: gflops(decode),
            tcF32: tcF32 === null ? null : gflops(tcF32), tcPacked: tcPacked === null ? null : gflops(tcPacked) },
          tileMs: byTile,
        };
        rows.push(row);
        process.stdout.write(`${JSON.stringify(row)}\n`);
      }
      tf.dispose([x, dy]);
    }
    tf.dispose([wDecoded, packed.packed]);
  }
}
const out = flag('json', '');
if (out !== '') writeFileSync(out, JSON.stringify(rows, null, 1));
process.exit(0);
