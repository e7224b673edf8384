/**
 * Before/after on wasm in one process, for a shared and noisy machine: another checkout's fused
 * block (its src/ops and wasm MoE kernels) against this one's, alternating rounds (each round:
 * one warm-up and 5 timed steps of benchMoEBlock, fused kernel only), so that a slow phase of the
 * machine hits both alike. Prints per tree the median over rounds of the CPU ms median, each
 * round's CPU ms, the fastest step and the median wall time.
 *
 *     git archive <commit> | tar -x -C /tmp/before && ln -s "$PWD/node_modules" /tmp/before/node_modules
 *     BEFORE=/tmp/before npx tsx bench/wasm_ab.ts none float32 8      # lora, expert storage, rounds
 *
 * Both trees run with this checkout's registerMoEKernels('wasm'): the kernels it replaces
 * (BatchMatMul, Identity) are this checkout's for both, so their change is not in the difference.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-wasm';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { benchMoEBlock, median, type BenchExpertStorage, type BenchLoRA } from '../src/bench/block_bench.js';
import { wasmMoEKernelConfigs } from '../src/backends/wasm/moe_kernels.js';

const before = process.env.BEFORE;
if (!before) throw new Error('set BEFORE to the folder of the checkout to compare against');
const [lora, storage, rounds] = [(process.argv[2] ?? 'none') as BenchLoRA, (process.argv[3] ?? 'float32') as BenchExpertStorage, Number(process.argv[4] ?? 6)];
const old = {
  kernels: (await import(`${before}/src/backends/wasm/moe_kernels.ts`)).wasmMoEKernelConfigs as tf.KernelConfig[],
  bench: (await import(`${before}/src/bench/block_bench.ts`)).benchMoEBlock as typeof benchMoEBlock,
};
await tf.setBackend('wasm');
registerMoEKernels('wasm');
const trees = { before: old, after: { kernels: wasmMoEKernelConfigs, bench: benchMoEBlock } };
const results = { before: { cpu: [] as number[], min: [] as number[], ms: [] as number[] }, after: { cpu: [] as number[], min: [] as number[], ms: [] as number[] } };
for (let r = 0; r < rounds; r++) {
  for (const name of r % 2 === 0 ? ['before', 'after'] as const : ['after', 'before'] as const) {
    for (const config of trees[name].kernels) {
      tf.unregisterKernel(config.kernelName, 'wasm');
      tf.registerKernel(config);
    }
    const [c] = await trees[name].bench({ config: 'S', lora: [lora], iters: 5, warmup: 1, reference: false, expertStorage: storage });
    results[name].cpu.push(c.fused.cpuMs);
    results[name].min.push(c.fused.minMs);
    results[name].ms.push(c.fused.ms);
  }
}
for (const [name, v] of Object.entries(results)) {
  console.log(`${lora} ${storage} ${name}: CPU ms ${median(v.cpu).toFixed(1)} (rounds ${v.cpu.map(x => x.toFixed(0)).join(' ')}), ` +
      `fastest step ${Math.min(...v.min).toFixed(1)} ms, wall median ${median(v.ms).toFixed(1)} ms`);
}
