import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-backend-wasm';
const backend = process.argv[2] ?? 'wasm';
await tf.setBackend(backend); await tf.ready();
function bench(name: string, f: () => tf.Tensor | tf.Tensor[], reps = 20) {
  tf.dispose(f());
  const t0 = performance.now();
  for (let i = 0; i < reps; i++) { const r = f(); tf.dispose(r); }
  console.log(name.padEnd(40), ((performance.now() - t0) / reps).toFixed(3), 'ms');
}
const x = tf.randomNormal([2048, 256]); const idx = tf.tensor1d(Array.from({length: 2048}, (_, i) => (i * 7919) % 1024), 'int32');
const x1 = tf.randomNormal([1024, 256]);
bench('gather [1024,256] by 2048', () => tf.gather(x1, idx));
bench('slice rows 256 of [2048,256]', () => tf.slice(x, [512, 0], [256, -1]));
const a = tf.randomNormal([256, 256]), b = tf.randomNormal([256, 256]);
bench('matMul NN [256,256]x[256,256]', () => tf.matMul(a, b));
bench('matMul NT', () => tf.matMul(a, b, false, true));
bench('matMul TN', () => tf.matMul(a, b, true, false));
bench('transpose [256,256]', () => tf.transpose(a));
const w = tf.randomNormal([8, 256, 256]);
bench('transpose [8,256,256] 021', () => tf.transpose(w, [0, 2, 1]));
bench('slice W_e [8,256,256]', () => tf.slice(w, [3, 0, 0], [1, 256, 256]));
const h = tf.randomNormal([2048, 256]);
bench('split h', () => tf.split(h, 2, 1));
bench('sigmoid [2048,128]', () => tf.sigmoid(tf.reshape(x,[4096,128])));
bench('mul [2048,256]', () => tf.mul(x, h));
bench('concat 8 parts', () => tf.concat(tf.split(x, 8, 0), 0));
bench('sum [1024,2,256] axis1', () => tf.sum(tf.reshape(x,[1024, 2, 256]), 1));
bench('sum [2048,256] axis0', () => tf.sum(x, 0));
bench('stack 8 [256,256]', () => tf.stack([a, a, a, a, a, a, a, a]));
