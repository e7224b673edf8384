/**
 * The wasm MoE kernels at config S's shapes with their loops in moe_simd (src/backends/wasm/moe_simd.ts)
 * against their JS loops and XNNPACK's products (flag WASM_MOE_SIMD_KERNELS off), alternating round by round in one
 * process so that a busy machine slows both alike. Prints per kernel the median over rounds of
 * each round's mean ms a call, and the ratio.
 *
 *     npx tsx bench/wasm_simd_kernels.ts [rounds, default 8]
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-wasm';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { SIMD_KERNELS_FLAG, moeSimdSettled } from '../src/backends/wasm/moe_simd.js';
import { median } from '../src/bench/block_bench.js';
import { combineRows, expertActivation, expertActivationGrad, groupedProduct, groupedWeightGrad, pairRowDot } from '../src/ops/experts/kernels.js';

const rounds = Number(process.argv[2] ?? 8);
await tf.setBackend('wasm');
registerMoEKernels('wasm');
if (!(await moeSimdSettled((tf.backend() as unknown as { wasm: object }).wasm))) throw new Error('moe_simd did not load');

// config S: T = 1024 tokens, K = 2 (N = 2048 rows), H = 256, I = 128, E = 8, r = 8
const [T, K, H, I, E, R] = [1024, 2, 256, 128, 8, 8];
const N = T * K;
const groups = Array<number>(E).fill(N / E);
const x = tf.randomNormal([T, H]) as tf.Tensor2D;
const tokenOfRow = tf.tensor1d(Array.from({ length: N }, (_, i) => (i * 13) % T), 'int32');
const rowOfPair = tf.tensor1d(Array.from({ length: N }, (_, i) => (i * 7) % N), 'int32');
const h = tf.randomNormal([N, 2 * I]) as tf.Tensor2D;
const da = tf.randomNormal([N, I]) as tf.Tensor2D;
const scale = tf.randomUniform([N]) as tf.Tensor1D;
const y = tf.randomNormal([N, H]) as tf.Tensor2D;
const a = tf.randomNormal([N, I]) as tf.Tensor2D;
const routing = tf.randomUniform([T, K]) as tf.Tensor2D;
const gr = tf.randomNormal([N, R]) as tf.Tensor2D;
const w = tf.randomNormal([E, 2 * I, H]) as tf.Tensor3D;
const loraA = tf.randomNormal([E, R, H]) as tf.Tensor3D;   // A_e [r, in]
const loraB = tf.randomNormal([E, H, R]) as tf.Tensor3D;   // B_e [out, r]
const swiglu = { kind: 'swiglu' } as const;

const cases: Array<[string, () => tf.TensorContainer]> = [
  ['SwiGLU forward [2048, 256] → a, a·w', () => expertActivation(h, swiglu, false, scale)],
  ['SwiGLU backward [2048, 256]', () => expertActivationGrad(h, da, swiglu, false, scale)],
  ['combine [2048, 256] → [1024, 256], weighted', () => combineRows(y, rowOfPair, T, K, routing)],
  ['pairRowDot [2048, 128]', () => pairRowDot(a, a, rowOfPair, T, K)],
  ['dA = grᵀ·x[token] [8, 256] per expert', () => groupedWeightGrad({ t: gr }, { t: x, index: tokenOfRow }, groups)],
  ['dB = dyᵀ·u [256, 8] per expert', () => groupedWeightGrad({ t: y }, { t: gr }, groups)],
  ['dW = dyᵀ·x[token] [256, 256] per expert (transposed gather)', () => groupedWeightGrad({ t: y }, { t: x, index: tokenOfRow }, groups)],
  ['x[token]·W_eᵀ [2048, 256]·[256, 256] (row gather, W transposed)', () => groupedProduct({ t: x, index: tokenOfRow }, w, groups, true)],
  ['u = s·x[token]·A_eᵀ [2048, 256]·[256, 8]', () => groupedProduct({ t: x, index: tokenOfRow }, loraA, groups, true, { alpha: 2 })],
  ['gr = s·dy·B_e [2048, 256]·[256, 8]', () => groupedProduct({ t: y }, loraB, groups, false, { alpha: 2 })],
  ['y + u·B_eᵀ [2048, 8]·[8, 256]', () => groupedProduct({ t: gr }, loraB, groups, true, { addTo: y })],
  ['dx + gr·A_e [2048, 8]·[8, 256]', () => groupedProduct({ t: gr }, loraA, groups, false, { addTo: y })],
];
const calls = 10;
const times = new Map<string, { simd: number[]; js: number[] }>(cases.map(([name]) => [name, { simd: [], js: [] }]));
for (let round = 0; round < rounds; round++) {
  for (const simd of round % 2 === 0 ? [true, false] : [false, true]) {
    tf.env().set(SIMD_KERNELS_FLAG, simd);
    for (const [name, fn] of cases) {
      tf.dispose(fn());   // warm
      const t0 = performance.now();
      for (let i = 0; i < calls; i++) tf.dispose(fn());
      times.get(name)![simd ? 'simd' : 'js'].push((performance.now() - t0) / calls);
    }
  }
}
for (const [name, { simd, js }] of times) {
  console.log(`${name}: JS loops ${median(js).toFixed(3)} ms, moe_simd ${median(simd).toFixed(3)} ms (${(median(js) / median(simd)).toFixed(2)}×)`);
}
