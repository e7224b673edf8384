/**
 * The problems and the clock of the WebGPU block benchmark (bench/webgpu_moe.ts), shared with the
 * tensor-core check (tools/webgpu_tc/check.ts) so that both time the same step the same way.
 */
import * as tf from '@tensorflow/tfjs-core';
import { BENCH_CONFIGS } from '../src/bench/block_bench.js';
import { moeBlock } from '../src/ops/moe_block.js';
import { bfloat16Bits, type ExpertWeightTensor, packedExpertWeightFromBits } from '../src/ops/packed.js';
import type { MoEBlockConfig } from '../src/ops/types.js';

export function median(v: number[]): number {
  const s = [...v].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** ms per product: `chain` products enqueued, one read at the end; the median of `iters` chains. */
export async function timeProduct(product: () => tf.Tensor, iters: number, chain: number): Promise<number> {
  const samples: number[] = [];
  for (let i = 0; i < iters + 1; i++) {
    const t0 = performance.now();
    const outs: tf.Tensor[] = [];
    for (let c = 0; c < chain; c++) outs.push(product());
    const probe = tf.tidy(() => tf.slice(tf.reshape(outs[outs.length - 1], [-1]), 0, 1));
    await probe.data();
    const ms = (performance.now() - t0) / chain;
    tf.dispose([...outs, probe]);
    if (i > 0) samples.push(ms);  // the first chain compiles the programs
  }
  return median(samples);
}

export interface Problem {
  x: tf.Tensor2D; g: tf.Tensor2D; router: tf.Tensor2D; w1: tf.Tensor3D; w2: tf.Tensor3D; config: MoEBlockConfig;
  /** the expert weights packed as bf16 halves (rounded from w1, w2), when asked for: frozen, LoRA only */
  packed?: { w1: ExpertWeightTensor; w2: ExpertWeightTensor };
  /** expert LoRA [A1, B1, A2, B2] (rank BENCH_CONFIGS[name].rank, PEFT layouts), when benchmarked */
  lora: tf.Tensor2D[];
  scaling: number;
}

export function makeProblem(name: string, lora: 'none' | 'split' | 'materialize'): Problem {
  const c = BENCH_CONFIGS[name];
  const { tokens: T, hidden: H, inter: I, experts: E, rank: r } = c;
  let seed = 1;
  const normal = (shape: number[], std: number) => tf.randomNormal(shape, 0, std, 'float32', seed++);
  return {
    x: normal([T, H], 1) as tf.Tensor2D,
    g: normal([T, H], 1) as tf.Tensor2D,
    // small router weights: near-uniform top-k, balanced groups as a load-balanced router gives
    router: normal([E, H], 0.1 / Math.sqrt(H)) as tf.Tensor2D,
    w1: normal([E, 2 * I, H], 1 / Math.sqrt(H)) as tf.Tensor3D,
    w2: normal([E, H, I], 1 / Math.sqrt(I)) as tf.Tensor3D,
    config: { routing: { kind: 'softmaxTopK', topK: c.topK, renormalize: true }, activation: { kind: 'swiglu' } },
    lora: lora === 'none' ? [] : [normal([r * E, H], 1 / Math.sqrt(H)), normal([2 * I, r * E], 0.01),
      normal([r * E, I], 1 / Math.sqrt(I)), normal([H, r * E], 0.01)] as tf.Tensor2D[],
    scaling: 16 / r,
  };
}

/**
 * Adds bf16-packed copies of the problem's expert weights (as a checkpoint loaded with
 * expertDtype 'stored' holds them), rounded to nearest even from the float32 ones; read back from
 * the device with data(), which webgpu allows.
 */
export async function withPackedBf16Experts(p: Problem): Promise<Problem> {
  const pack = async (w: tf.Tensor3D) => {
    const values = await w.data() as Float32Array;
    // a plain loop: Uint16Array.from(values, f) lists every value first (out of memory at O's 268 M)
    const bits = new Uint16Array(values.length);
    for (let i = 0; i < values.length; i++) bits[i] = bfloat16Bits(values[i]);
    return packedExpertWeightFromBits('bf16', w.shape, bits);
  };
  return { ...p, packed: { w1: await pack(p.w1), w2: await pack(p.w2) } };
}

/**
 * One step: the gradients of Σ out·g (g fed as the output's gradient) w.r.t. x, W_g, W1, W2 —
 * or, with expert LoRA, w.r.t. x and the adapters (base and router frozen).
 */
export function stepOf(p: Problem, lora: 'none' | 'split' | 'materialize'): () => tf.Tensor[] {
  if (lora === 'none') {
    const grads = tf.grads((x: tf.Tensor, r: tf.Tensor, w1: tf.Tensor, w2: tf.Tensor) => {
      const { out, routing } = moeBlock(x as tf.Tensor2D, { router: { weight: r as tf.Tensor2D },
        experts: { gateUp: w1 as tf.Tensor3D, down: w2 as tf.Tensor3D } }, p.config);
      tf.dispose([routing.experts]);
      return out;
    });
    return () => grads([p.x, p.router, p.w1, p.w2], p.g);
  }
  const grads = tf.grads((x: tf.Tensor, a1: tf.Tensor, b1: tf.Tensor, a2: tf.Tensor, b2: tf.Tensor) => {
    const { out, routing } = moeBlock(x as tf.Tensor2D, { router: { weight: p.router }, experts: {
      gateUp: p.packed?.w1 ?? p.w1, down: p.packed?.w2 ?? p.w2,
      gateUpLoRA: [{ A: a1 as tf.Tensor2D, B: b1 as tf.Tensor2D, scaling: p.scaling }],
      downLoRA: [{ A: a2 as tf.Tensor2D, B: b2 as tf.Tensor2D, scaling: p.scaling }],
    } }, p.config, { loraMode: lora });
    tf.dispose([routing.experts]);
    return out;
  });
  return () => grads([p.x, ...p.lora], p.g);
}

/** Waits for the GPU: a read of one element of each gradient. */
export async function settle(ts: tf.Tensor[]): Promise<void> {
  const probes = tf.tidy(() => ts.map(t => tf.slice(tf.reshape(t, [-1]), 0, 1)));
  await Promise.all(probes.map(t => t.data()));
  tf.dispose(probes);
}

export interface Samples { total: number[]; enqueue: number[] }

/** Per step: wall time to the GPU's end (total) and the host's time to enqueue it. */
export async function timeSteps(step: () => tf.Tensor[], warmup: number, iters: number): Promise<Samples> {
  const s: Samples = { total: [], enqueue: [] };
  for (let i = 0; i < warmup + iters; i++) {
    const t0 = performance.now();
    const grads = step();
    const t1 = performance.now();
    await settle(grads);
    const ms = performance.now() - t0;
    tf.dispose(grads);
    if (i >= warmup) { s.total.push(ms); s.enqueue.push(t1 - t0); }
  }
  return s;
}

