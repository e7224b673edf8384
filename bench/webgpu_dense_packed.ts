/**
 * A packed 16-bit dense projection on WebGPU against tfjs's own product on the float32 weight
 * (issue 10/15): for Qwen3-30B-A3B's and OLMoE's attention shapes, per token count, the time of
 *   f32      tf.matMul on the float32 weight (tfjs-webgpu's MatMulPacked or whichever it picks)
 *   ours-f32 MoEDenseMatMul on the same float32 weight (the grouped program with one group, its
 *            automatic tile), whichever way WEBGPU_MOE_DENSE_PROGRAM is set
 *   packed   denseWeightMatMul on the bf16 words (MoEPackedDenseMatMul: one program, halves decoded
 *            in the tile loads), with its automatic tile and with each tile of --tiles
 *   decode   the path before it: MoEDecodePacked of the whole weight, then tf.matMul
 * for the forward x·Wᵀ and the input gradient dy·W. Time per product: --chain products enqueued
 * back to back and one read at the end, the median of --iters such chains (ms), and GFLOP/s.
 *   npx tsx bench/webgpu_dense_packed.ts [--tokens 512,2048,4096] [--shapes qwen3,olmoe] [--iters 7] [--chain 20]
 *       [--tiles 2x4x16,4x4x16,8x8x16,4x4x16v,8x8x16v] [--json out.json]
 * or bundled: ../shared/gpu/prepare.sh bench/webgpu_dense_packed.ts, then on the GPU machine
 *   source .gpu/on-device.sh && node .gpu/bundle/webgpu_dense_packed.js
 */
import * as tf from '@tensorflow/tfjs-core';
import { writeFileSync } from 'node:fs';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { setupDawnWebGPU } from '../src/backends/webgpu/dawn.js';
import { type KernelArgs, runDenseMatMul, runPackedDenseMatMul } from '../src/backends/webgpu/kernels.js';
import type { TileConfig } from '../src/backends/webgpu/programs/grouped_matmul_program.js';
import {
  type DenseMatMulAttrs, denseWeightMatMul, type PackedDenseMatMulAttrs, type PackedDenseWeight, packedDenseWeightFromBits, unpackDenseWeight,
} from '../src/ops/packed.js';
import { encodeBFloat16 } from '../src/util/half.js';
import { median } from './webgpu_timing.js';

function flag(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

/** [name, out, in] of each attention projection (q, k/v, o). */
const SHAPES: Record<string, Array<[string, number, number]>> = {
  qwen3: [['q_proj', 4096, 2048], ['k_proj', 512, 2048], ['o_proj', 2048, 4096]],
  olmoe: [['q_proj', 2048, 2048]],
};

function parseTile(s: string): TileConfig {
  const m = /^(\d+)x(\d+)x(\d+)(v?)$/.exec(s);
  if (m === null) throw new Error(`--tiles: '${s}' is not TMxTNxBK[v]`);
  return { tm: Number(m[1]), tn: Number(m[2]), bk: Number(m[3]), vec4: m[4] === 'v' };
}

/** ms per product: `chain` products enqueued, one read at the end; the median of `iters` chains. */
async function timeProduct(product: () => tf.Tensor, iters: number, chain: number): Promise<number> {
  const samples: number[] = [];
  for (let i = 0; i < iters + 1; i++) {
    const t0 = performance.now();
    const outs: tf.Tensor[] = [];
    for (let c = 0; c < chain; c++) outs.push(product());
    const probe = tf.tidy(() => tf.slice(tf.reshape(outs[outs.length - 1], [-1]), 0, 1));
    await probe.data();
    const ms = (performance.now() - t0) / chain;
    tf.dispose([...outs, probe]);
    if (i > 0) samples.push(ms);  // the first chain compiles the programs
  }
  return median(samples);
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

await setupDawnWebGPU();
if (!(await tf.setBackend('webgpu'))) throw new Error('webgpu could not be set up');
registerMoEKernels('webgpu');
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
        const row = {
          shape: shapeName, proj, out, in: inSize, tokens: n, dir, f32Ms: f32, oursF32Ms: ours, packedMs: auto, decodeMs: decode,
          oursF32OverF32: Math.round(ours / f32 * 100) / 100, packedOverF32: Math.round(auto / f32 * 100) / 100,
          gflops: { f32: gflops(f32), oursF32: gflops(ours), packed: gflops(auto), decode: gflops(decode) },
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
