import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-cpu';
import '@tensorflow/tfjs-backend-wasm';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { fusedExperts, chooseLoRAMode } from '../src/ops/experts/fused_experts.js';
const backend = process.argv[2] ?? 'wasm';
await tf.setBackend(backend); await tf.ready(); registerMoEKernels(backend);
const T = +(process.argv[3] ?? 1024), H = +(process.argv[4] ?? 256), I = +(process.argv[5] ?? 128), E = +(process.argv[6] ?? 8), K = 2;
const ranks = (process.argv[7] ?? '8,32,64,128').split(',').map(Number);
const x = tf.randomNormal([T, H]) as tf.Tensor2D;
const ex = tf.tensor2d(Array.from({ length: T * K }, (_, i) => (i * 7 + Math.floor(i / K)) % E), [T, K], 'int32');
const ew = tf.randomUniform([T, K]) as tf.Tensor2D;
const w1 = tf.randomNormal([E, 2 * I, H], 0, 0.05) as tf.Tensor3D, w2 = tf.randomNormal([E, H, I], 0, 0.05) as tf.Tensor3D;
const med = (a: number[]) => [...a].sort((p, q) => p - q)[a.length >> 1];
for (const r of ranks) {
  const uA = tf.randomNormal([r * E, H], 0, 0.05) as tf.Tensor2D, uB = tf.randomNormal([2 * I, r * E], 0, 0.05) as tf.Tensor2D;
  const dA = tf.randomNormal([r * E, I], 0, 0.05) as tf.Tensor2D, dB = tf.randomNormal([H, r * E], 0, 0.05) as tf.Tensor2D;
  const res: Record<string, number> = {};
  const steps: Record<string, () => void> = {};
  for (const mode of ['materialize', 'split'] as const) {
    const f = (xx: tf.Tensor, a: tf.Tensor, b: tf.Tensor, c: tf.Tensor, d: tf.Tensor) => tf.sum(fusedExperts(xx as tf.Tensor2D, { weights: ew, experts: ex },
      { gateUp: w1, down: w2, gateUpLoRA: [{ A: a as tf.Tensor2D, B: b as tf.Tensor2D, scaling: 2 }], downLoRA: [{ A: c as tf.Tensor2D, B: d as tf.Tensor2D, scaling: 2 }] },
      { kind: 'swiglu' }, { loraMode: mode }));
    steps[mode] = () => tf.dispose(tf.grads(f)([x, uA, uB, dA, dB]));
    steps[mode]();
  }
  const samples: Record<string, number[]> = { materialize: [], split: [] };
  for (let i = 0; i < 7; i++) for (const mode of i % 2 ? ['materialize', 'split'] : ['split', 'materialize']) {
    const c0 = process.cpuUsage(); steps[mode](); const c = process.cpuUsage(c0); samples[mode].push((c.user + c.system) / 1000);
  }
  for (const m of Object.keys(samples)) res[m] = med(samples[m]);
  console.log(`T=${T} H=${H} I=${I} E=${E} r=${r}: materialize ${res.materialize.toFixed(0)} ms, split ${res.split.toFixed(0)} ms, model up/down: ${chooseLoRAMode(T * K, H, 2 * I, E, r)}/${chooseLoRAMode(T * K, I, H, E, r)}`);
  tf.dispose([uA, uB, dA, dB]);
}
