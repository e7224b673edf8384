/**
 * Run by spec/backends/wasm_threads.spec.ts in a child process: starts tfjs-wasm's threaded build
 * with 2 threads, checks a product against exact sums and the package's SIMD module on its shared
 * heap, tries a second start, prints one JSON line.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-wasm';
import { useThreadedWasm } from '../../src/backends/wasm/threads_node.js';
import { moeSimd } from '../../src/backends/wasm/moe_simd.js';
const { threads, release } = await useThreadedWasm(2);
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
let again = '';
try { await useThreadedWasm(2); } catch (e) { again = (e as Error).name + ': ' + (e as Error).message; }
console.log(JSON.stringify({ threads, backend: tf.getBackend(), worst, gathered, again }));
release();   // ends the worker threads, or Node would not exit
