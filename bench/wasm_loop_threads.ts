/**
 * The fused block at config S on tfjs-wasm's threaded build, with moe_simd's row loops split over
 * the package's worker threads and on the calling thread alone (tf.env() flag
 * WASM_MOE_SIMD_THREADS), alternating rounds in one process so that a noisy machine hits both
 * alike. Each round: one warm-up and `iters` timed steps of benchMoEBlock per case, fused kernel
 * only. Prints one JSON line: per setting and case, each round's gflops (the expert products'
 * model FLOPs / median step) and ms, and their medians.
 *
 *     npx tsx bench/wasm_loop_threads.ts 8 4 10         # XNNPACK threads, rounds, timed steps a round
 *     node .gpu/bundle/wasm_loop_threads.js 8 4 10      # on the GPU machine (tools/wasm_threads/)
 *
 * A fourth argument sets the loop workers (useThreadedWasm's default: the cores beside XNNPACK's threads).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-wasm';
import { cpus } from 'node:os';
import { SIMD_THREADS_FLAG } from '../src/backends/wasm/moe_simd.js';
import { useThreadedWasm } from '../src/backends/wasm/threads_node.js';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { benchMoEBlock, median, type BenchExpertStorage, type BenchLoRA } from '../src/bench/block_bench.js';

const [threadCount, rounds, iters] = [Number(process.argv[2] ?? 8), Number(process.argv[3] ?? 4), Number(process.argv[4] ?? 10)];
const workersArg = process.argv[5] === undefined ? undefined : Number(process.argv[5]);
const cases: Array<[BenchLoRA, BenchExpertStorage]> = [['none', 'float32'], ['split', 'float32'], ['split', 'bf16']];
const { threads, loopWorkers, release } = await useThreadedWasm(threadCount, { loopWorkers: workersArg });
if (loopWorkers === 0) throw new Error(`no cores beside ${threads} XNNPACK threads for loop workers (os.cpus(): ${cpus().length})`);
registerMoEKernels('wasm');
type Runs = Record<string, { gflops: number[]; ms: number[] }>;
const results: Record<'split' | 'alone', Runs> = { split: {}, alone: {} };
for (let r = 0; r < rounds; r++) {
  for (const setting of r % 2 === 0 ? ['split', 'alone'] as const : ['alone', 'split'] as const) {
    tf.env().set(SIMD_THREADS_FLAG, setting === 'split');
    for (const [lora, storage] of cases) {
      const [c] = await benchMoEBlock({ config: 'S', lora: [lora], iters, warmup: 1, reference: false, expertStorage: storage });
      const runs = results[setting][`${lora} ${storage}`] ??= { gflops: [], ms: [] };
      runs.gflops.push(c.fused.gflops);
      runs.ms.push(c.fused.ms);
    }
  }
}
const summary = Object.fromEntries(Object.entries(results).map(([setting, runs]) => [setting, Object.fromEntries(
    Object.entries(runs).map(([name, v]) => [name, { ...v, medianGflops: median(v.gflops), medianMs: median(v.ms) }]))]));
console.log(JSON.stringify({ threads, loopWorkers, rounds, iters, ...summary }));
release();
