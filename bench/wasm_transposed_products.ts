/**
 * tfjs-wasm's BatchMatMul as it ships ('slow': transposed products on its scalar loop) against
 * src/backends/wasm/batch_mat_mul.ts's wrapper ('fast': the operand transposed first, XNNPACK), in
 * one process and interleaved, so that a busy machine hits both alike:
 * `npx tsx bench/wasm_transposed_products.ts [float32|bf16] [none,split]`. Prints per case the
 * median CPU ms per fused step of six runs each (3 timed steps after 1 warm-up per run), and
 * the router's three products at config S alone (median CPU ms of 20 calls).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-wasm';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { benchMoEBlock, median, type BenchExpertStorage, type BenchLoRA } from '../src/bench/block_bench.js';

await tf.setBackend('wasm');
const slowKernel = tf.getKernel(tf.BatchMatMul, 'wasm')!;
registerMoEKernels();
const fastKernel = tf.getKernel(tf.BatchMatMul, 'wasm')!;
const use = (mode: 'slow' | 'fast') => {
  tf.unregisterKernel(tf.BatchMatMul, 'wasm');
  tf.registerKernel(mode === 'fast' ? fastKernel : slowKernel);
};
const cpuMs = () => process.cpuUsage().user / 1000 + process.cpuUsage().system / 1000;

// the router at S: logits = x·W_r (W_r [H, E], fast already); its gradients dx = dlogits·W_rᵀ, dW = xᵀ·dlogits
const x = tf.randomNormal([1024, 256]);
const w = tf.randomNormal([256, 8]);
const dl = tf.randomNormal([1024, 8]);
const products: Record<string, () => tf.Tensor> = {
  'dlogits·W_rᵀ [1024,8]·[256,8]ᵀ': () => tf.matMul(dl, w, false, true),
  'xᵀ·dlogits [1024,256]ᵀ·[1024,8]': () => tf.matMul(x, dl, true, false),
};
for (const [name, f] of Object.entries(products)) {
  const times: Record<string, number[]> = { slow: [], fast: [] };
  for (let i = 0; i < 20; i++) {
    for (const mode of i % 2 ? ['slow', 'fast'] as const : ['fast', 'slow'] as const) {
      use(mode);
      const t0 = cpuMs();
      f().dispose();
      times[mode].push(cpuMs() - t0);
    }
  }
  console.log(`${name}: CPU ms, slow ${median(times.slow).toFixed(2)}, fast ${median(times.fast).toFixed(2)}`);
}
tf.dispose([x, w, dl]);

const storage = (process.argv[2] ?? 'float32') as BenchExpertStorage;
const loras = (process.argv[3] ?? (storage === 'float32' ? 'none,split' : 'split')).split(',') as BenchLoRA[];
for (const lora of loras) {
  const steps: Record<string, number[]> = { slow: [], fast: [] };
  const best: Record<string, number> = { slow: Infinity, fast: Infinity };
  for (let i = 0; i < 6; i++) {
    for (const mode of i % 2 ? ['slow', 'fast'] as const : ['fast', 'slow'] as const) {
      use(mode);
      const [c] = await benchMoEBlock({ config: 'S', lora: [lora], iters: 3, warmup: 1, reference: false, expertStorage: storage });
      steps[mode].push(c.fused.cpuMs);
      best[mode] = Math.min(best[mode], c.fused.minMs);
    }
  }
  const [slow, fast] = [median(steps.slow), median(steps.fast)];
  console.log(`${storage} ${lora}: CPU ms per step, slow ${slow.toFixed(1)}, fast ${fast.toFixed(1)} (${(slow / fast).toFixed(2)}x); ` +
      `fastest wall ms ${best.slow.toFixed(1)} → ${best.fast.toFixed(1)}`);
}
use('fast');
