/**
 * Run by spec/backends/wasm_threads.spec.ts in a child process: starts tfjs-wasm's threaded build
 * with 2 threads, checks a product against exact sums, tries a second start, prints one JSON line.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-wasm';
import { useThreadedWasm } from '../../src/backends/wasm/threads_node.js';
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
let again = '';
try { await useThreadedWasm(2); } catch (e) { again = (e as Error).name + ': ' + (e as Error).message; }
console.log(JSON.stringify({ threads, backend: tf.getBackend(), worst, again }));
release();   // ends the worker threads, or Node would not exit
