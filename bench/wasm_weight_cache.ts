/**
 * The wasm kernels' kept operators for frozen expert weights (WASM_MOE_WEIGHT_CACHE_BYTES), off
 * (flag 0) against on, in one process and interleaved, so that a busy machine hits both alike:
 * `npx tsx bench/wasm_weight_cache.ts [float32|bf16] [split|materialize|auto]`. Prints the median
 * CPU ms per fused step of six runs each (3 timed steps after 1 warm-up per run).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-wasm';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { WEIGHT_CACHE_BYTES_FLAG, wasmWeightCacheSize } from '../src/backends/wasm/moe_kernels.js';
import { benchMoEBlock, median, type BenchExpertStorage, type BenchLoRA } from '../src/bench/block_bench.js';

await tf.setBackend('wasm');
registerMoEKernels();
const storage = (process.argv[2] ?? 'float32') as BenchExpertStorage;
const lora = (process.argv[3] ?? 'split') as BenchLoRA;
const budget = tf.env().getNumber(WEIGHT_CACHE_BYTES_FLAG);
const cpuMs: Record<'off' | 'on', number[]> = { off: [], on: [] };
for (let i = 0; i < 6; i++) {
  for (const mode of i % 2 === 1 ? ['off', 'on'] as const : ['on', 'off'] as const) {
    tf.env().set(WEIGHT_CACHE_BYTES_FLAG, mode === 'on' ? budget : 0);
    const [c] = await benchMoEBlock({ config: 'S', lora: [lora], iters: 3, warmup: 1, reference: false, expertStorage: storage });
    cpuMs[mode].push(c.fused.cpuMs);
  }
}
const [off, on] = [median(cpuMs.off), median(cpuMs.on)];
console.log(`${storage} ${lora}: CPU ms per step, cache off ${off.toFixed(1)}, on ${on.toFixed(1)} (${(off / on).toFixed(2)}x); ` +
    `kept: ${JSON.stringify(wasmWeightCacheSize(tf.backend()))}`);
