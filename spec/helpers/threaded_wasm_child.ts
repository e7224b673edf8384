/**
 * Run by spec/backends/wasm_threads.spec.ts in a child process: starts tfjs-wasm's threaded build
 * with 2 threads, checks a product against exact sums and the package's SIMD module on its shared
 * heap, runs the fused experts block (forward and every gradient, split LoRA and full fine-tuning)
 * with moe_simd's row loops split over its worker and on the calling thread alone, tries a second
 * start, prints one JSON line.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-wasm';
import '@tensorflow/tfjs-layers';   // the gradients of tfjs's own ops
import { useThreadedWasm } from '../../src/backends/wasm/threads_node.js';
import { SIMD_THREADS_FLAG, attachMoESimdThreads, attachedMoESimdThreads, moeSimd } from '../../src/backends/wasm/moe_simd.js';
import { registerMoEKernels } from '../../src/backends/register_all_kernels.js';
import { fusedExperts } from '../../src/ops/experts/fused_experts.js';
import type { LoRAMode } from '../../src/ops/types.js';
import { makeExpertCase, trainedOf, weightsWith } from './expert_cases.js';
// one loop worker whatever the cores (by default none on a 2-core machine)
const { threads, loopWorkers, release } = await useThreadedWasm(2, { loopWorkers: 1 });
registerMoEKernels('wasm');
// values exact in float32 with exact float32 sums: any product order gives the same bits
const [m, k, n] = [67, 40, 33];
const a = Float32Array.from({ length: m * k }, (_, i) => ((i * 7) % 11) - 5);
const b = Float32Array.from({ length: k * n }, (_, i) => ((i * 5) % 13) - 6);
const c = tf.matMul(tf.tensor2d(a, [m, k]), tf.tensor2d(b, [k, n])).dataSync();
let worst = 0;
for (let i = 0; i < m; i++) for (let j = 0; j < n; j++) {
  let s = 0;
  for (let t = 0; t < k; t++) s += a[i * k + t] * b[t * n + j];
  worst = Math.max(worst, Math.abs(c[i * n + j] - s));
}
// the package's SIMD module on the threaded build's shared memory: row 1 of a [3, 3] copied into row 2
const backend = tf.backend() as unknown as { wasm: { HEAPF32: Float32Array }; dataIdMap: { get(id: object): { memoryOffset: number } } };
const heap = tf.tensor1d([1, 2, 3, 4, 5, 6, 0, 0, 0]);
const at = backend.dataIdMap.get(heap.dataId).memoryOffset;   // bytes
const simd = moeSimd(backend.wasm);
simd?.gatherRows(1, 3, at, 0, 0, 1, at + 24);
const gathered = simd === null ? null : Array.from(backend.wasm.HEAPF32.subarray(at / 4 + 6, at / 4 + 9));
heap.dispose();

// the fused block with the loops split over the worker and on the calling thread: the same bits
const pool = attachedMoESimdThreads(backend.wasm)!;
const splitCalls: Record<string, number> = {};
attachMoESimdThreads(backend.wasm, {
  parts: pool.parts,
  run: (name, parts, own) => { splitCalls[name] = (splitCalls[name] ?? 0) + 1; pool.run(name, parts, own); },
});
// split LoRA (rank-8 adapters, frozen base) and full fine-tuning (no adapters)
const bitsOfBlock = (loraMode: LoRAMode | undefined, trainBase: boolean) => {
  const adapters = trainBase ? {} : { lora1: [8], lora2: [8] };
  const c = makeExpertCase({ T: 256, H: 256, I: 64, E: 4, K: 2, ...adapters }, 3);
  const trained = trainedOf(c, trainBase);
  const f = (...inputs: tf.Tensor[]) => {
    const { x, weights, w } = weightsWith(c, trained, inputs);
    const out = fusedExperts(x, { weights, experts: c.experts }, w, c.activation, { trainExpertWeights: trainBase, loraMode });
    return tf.sum(tf.mul(out, out));
  };
  const { value, grads } = tf.valueAndGrads(f)(trained.map(p => p.t));
  const bits = [value, ...grads].map(t => Array.from(new Uint32Array(Float32Array.from(t.dataSync()).buffer)));
  tf.dispose([value, ...grads]);
  c.dispose();
  return bits;
};
let blockMismatches = 0;
for (const [loraMode, trainBase] of [['split', false], [undefined, true]] as Array<[LoRAMode | undefined, boolean]>) {
  tf.env().set(SIMD_THREADS_FLAG, true);
  const split = bitsOfBlock(loraMode, trainBase);
  tf.env().set(SIMD_THREADS_FLAG, false);
  const alone = bitsOfBlock(loraMode, trainBase);
  tf.env().set(SIMD_THREADS_FLAG, true);
  split.forEach((bits, i) => { if (bits.some((v, j) => v !== alone[i][j])) blockMismatches++; });
}
const splitExports = Object.keys(splitCalls).sort();
let again = '';
try { await useThreadedWasm(2); } catch (e) { again = (e as Error).name + ': ' + (e as Error).message; }
console.log(JSON.stringify({ threads, loopWorkers, backend: tf.getBackend(), worst, gathered, parts: pool.parts, blockMismatches, splitExports, again }));
release();   // ends the worker threads, or Node would not exit
