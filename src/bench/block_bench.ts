/**
 * The MoE block benchmark: forward + backward of one block (loss = Σ out·g, gradients of x and of
 * every trained tensor) with the 'fused' and the 'reference' expert kernels, timed in the same run
 * on the current tfjs backend. Used by `tfjs-moe-lora bench` and bench/run.ts.
 *
 * Timing: `warmup` untimed steps per case and kernel, then `iters` rounds of one timed step of
 * each, in an order that changes from round to round so that a slow phase of a shared machine hits
 * them all; on webgpu one block of steps per case and kernel instead (see timeRuns). A step ends
 * when its gradients exist (on webgpu: a read of one element of each). The median is reported.
 * Memory: one more step under tf.profile, peakBytes minus the bytes held before it (inputs and
 * weights excluded). On webgpu the reference gets its routing read before the timed steps
 * (hostExpertsOf), and a GPU error (out of memory) fails the run instead of timing invalid work.
 */
import * as tf from '@tensorflow/tfjs-core';
import { withLinearCpuSegmentSum } from '../backends/cpu/unsorted_segment_sum.js';
import { chooseLoRAMode } from '../ops/experts/fused_experts.js';
import { routerLogits } from '../ops/lora/router_logits.js';
import { moeBlock } from '../ops/moe_block.js';
import { ASYNC_READ_BACKENDS, referenceMoEBlock } from '../ops/reference/moe_block.js';
import { referenceRoute } from '../ops/reference/routing.js';
import { packExpertWeight, type ExpertWeightTensor } from '../ops/packed.js';
import type { LoRAFactors, MoEBlockConfig, MoEBlockWeights } from '../ops/types.js';
import { assertInteger, assertOneOf, fail } from '../ops/validate.js';

/** One benchmark shape (letters of src/ops/README.md) and the LoRA rank of its adapter cases. */
export interface BenchConfig {
  tokens: number;    // T
  hidden: number;    // H
  inter: number;     // I
  experts: number;   // E
  topK: number;      // K
  rank: number;      // r, expert and router LoRA
  /** the backends it is sized for; others need `allowAnyBackend` */
  backends: readonly string[];
}

export const BENCH_CONFIGS: Readonly<Record<string, BenchConfig>> = {
  /** a smoke test of the harness itself (specs, CI): nothing to read in its timings */
  XS: { tokens: 64, hidden: 32, inter: 16, experts: 4, topK: 2, rank: 4, backends: ['cpu', 'wasm', 'webgpu'] },
  S: { tokens: 1024, hidden: 256, inter: 128, experts: 8, topK: 2, rank: 8, backends: ['cpu', 'wasm', 'webgpu'] },
  /** the Hugging Face reference shape of ../shared/gpu/README.md (Qwen3-MoE block, H100) */
  M1: { tokens: 4096, hidden: 1024, inter: 512, experts: 8, topK: 2, rank: 8, backends: ['webgpu'] },
  /** OLMoE-1B-7B's block at a training batch of 512 tokens (bench/e2e's shape): 64 rows per expert */
  O: { tokens: 512, hidden: 2048, inter: 1024, experts: 64, topK: 8, rank: 8, backends: ['webgpu'] },
  /** a Qwen3-30B-A3B-sized block */
  Q: { tokens: 16384, hidden: 2048, inter: 768, experts: 128, topK: 8, rank: 8, backends: ['webgpu'] },
  /** Qwen3-30B-A3B's block at batch 1 × 512 tokens: 32 rows per expert (32-row tiles and tensor-core blocks) */
  Q1: { tokens: 512, hidden: 2048, inter: 768, experts: 128, topK: 8, rank: 8, backends: ['webgpu'] },
};

export const CPU_SEGMENT_SUMS = ['stock', 'linear'] as const;
export type CpuSegmentSum = typeof CPU_SEGMENT_SUMS[number];

/**
 * How the routed experts' weights are held: float32 tensors, or packed bf16 / f16 halves (frozen,
 * as a checkpoint loaded with its stored dtype; src/ops/packed.ts), rounded from the same values,
 * or quantized from them (int8, int4 in groups of 64, nf4, mxfp4; src/ops/quantized.ts).
 */
export const BENCH_EXPERT_STORAGES = ['float32', 'bf16', 'f16', 'int8', 'int4', 'nf4', 'mxfp4'] as const;
export type BenchExpertStorage = typeof BENCH_EXPERT_STORAGES[number];

export const BENCH_LORA_CASES = ['none', 'materialize', 'split', 'auto'] as const;
/** 'none': full fine-tuning (x, router and expert weights train); else router + expert LoRA, base frozen. */
export type BenchLoRA = typeof BENCH_LORA_CASES[number];

export interface BenchTiming {
  /** median wall time of one forward + backward step, ms */
  ms: number;
  /** peak bytes of tensors allocated during one step (tf.profile) */
  peakBytes: number;
  /** every timed step, ms, in order */
  samples: number[];
  /** the fastest timed step, ms: on a shared machine the least disturbed one */
  minMs: number;
  /**
   * median CPU time of this process per step (user + system, process.cpuUsage), ms: on a shared
   * machine wall time also counts the time other processes held the cores; this does not.
   * Meaningless on webgpu (the work is on the GPU).
   */
  cpuMs: number;
  /**
   * median host time until the step's kernels are all enqueued, ms: on webgpu the rest of `ms` is
   * the wait for the GPU; on cpu and wasm the same as `ms`
   */
  enqueueMs: number;
  /** model FLOPs of the expert products (see `expertFlops`) / median time, GFLOP/s */
  gflops: number;
  /** with `profile`: the kernels of the profiled step by total time, most expensive first */
  kernels?: KernelTime[];
}

/** One kernel's share of a profiled step (tf.profile's kernelTimeMs, summed over its calls). */
export interface KernelTime {
  name: string;
  ms: number;
  calls: number;
}

export interface BenchCase {
  config: string;
  backend: string;
  lora: BenchLoRA;
  fused: BenchTiming;
  /** null when the run left the reference out (`reference: false`) */
  reference: BenchTiming | null;
  /** reference ms / fused ms (null without a reference, as every ratio below) */
  speedup: number | null;
  /** reference cpuMs / fused cpuMs */
  cpuSpeedup: number | null;
  /**
   * the median over rounds of reference / fused time within the round: each round runs every case
   * once, close together, so a slow phase of a shared machine cancels out of this ratio
   */
  pairedSpeedup: number | null;
  /**
   * for 'auto', with 'materialize' or 'split' in the same run: the median over rounds of auto's
   * fused time / the faster of materialize's and split's in that round (1.1 = 10% slower)
   */
  autoVsBest?: number;
  /** fused peakBytes / reference peakBytes */
  memRatio: number | null;
  /** for 'auto': what the cost model picks for the [up, down] projections */
  autoPicks?: [string, string];
  /** cpu only: the UnsortedSegmentSum kernel the run used (tf.gather's gradient in the reference) */
  cpuSegmentSum?: CpuSegmentSum;
  shape: { T: number; H: number; I: number; E: number; K: number; r: number };
  /** how the expert weights were held */
  expertStorage: BenchExpertStorage;
  iters: number;
  warmup: number;
}

export interface BlockBenchOptions {
  /** a key of BENCH_CONFIGS */
  config: string;
  /** default: every case */
  lora?: readonly BenchLoRA[];
  /** timed steps per kernel (default 5) */
  iters?: number;
  /** untimed steps per kernel first (default 1) */
  warmup?: number;
  /** run a config on a backend it is not sized for (M1 on cpu: minutes per step) */
  allowAnyBackend?: boolean;
  /** seed of the random inputs (default 1) */
  seed?: number;
  /**
   * cpu only: 'stock' (default) measures with tfjs-cpu's UnsortedSegmentSum, which is quadratic
   * in the tokens and dominates the reference's backward (tf.gather's gradient); 'linear' swaps in
   * a single-pass kernel for the run, for a reference without that term.
   */
  cpuSegmentSum?: CpuSegmentSum;
  /** add the per-kernel times of the memory-measuring step (kernels: top 12) */
  profile?: boolean;
  /**
   * time the reference kernel too (default true); false times the fused kernel alone, e.g. at Q
   * on webgpu, where the reference's per-expert loop runs out of the H100's memory
   */
  reference?: boolean;
  /** the LoRA rank of the adapter cases instead of the config's (e.g. to find where materialize wins) */
  rank?: number;
  /**
   * 'float32' (default), or the expert weights packed as 'bf16' / 'f16' (frozen: LoRA cases only,
   * 'none' trains them)
   */
  expertStorage?: BenchExpertStorage;
  /** called after each case, e.g. to print progress */
  onCase?: (c: BenchCase) => void;
}

/**
 * FLOPs of the expert products in one step, counting a multiply-add as 2: forward 6·N·H·I
 * (N = T·K rows, up 2I×H, down H×I); backward twice that when the base weights train (dx and dW),
 * once with the base frozen (dx only; LoRA's rank-r products are left out). Router and recomputed
 * products are not counted: this is the useful work, the same for both kernels.
 */
export function expertFlops(c: BenchConfig, lora: BenchLoRA): number {
  const forward = 6 * c.tokens * c.topK * c.hidden * c.inter;
  return forward * (lora === 'none' ? 3 : 2);
}

const OP = 'benchMoEBlock';

/** The random tensors of a run; every LoRA case of the run shares them. */
interface Inputs {
  x: tf.Tensor2D;
  g: tf.Tensor2D;                 // the output's gradient: loss = Σ out·g
  router: tf.Tensor2D;
  gateUp: ExpertWeightTensor;
  down: ExpertWeightTensor;
  /** router, gate_up and down adapters (when a LoRA case is asked for) */
  lora?: { router: LoRAFactors; up: LoRAFactors; down: LoRAFactors };
  config: MoEBlockConfig;
  dispose(): void;
}

/** One case's view of the inputs: what trains and how the block's weights are made of it. */
interface Problem {
  inputs: Inputs;
  /** the trained tensors, x first */
  trained: tf.Tensor[];
  /** the block's weights with the trained tensors replaced by `args` (same order as `trained`) */
  with(args: tf.Tensor[]): MoEBlockWeights;
}

/**
 * Random inputs. The router weights are small (std 0.1/√H, logits of std about 0.1) so that top-k
 * picks experts nearly uniformly: balanced groups, as a trained router with a load balancing loss
 * gives. LoRA's B is small but not zero (PEFT initializes it to 0), so that every product does
 * real work.
 */
function makeInputs(c: BenchConfig, seed: number, withLoRA: boolean, storage: BenchExpertStorage): Inputs {
  const { tokens: T, hidden: H, inter: I, experts: E, rank: r } = c;
  let s = seed * 7919;
  const normal = (shape: number[], std: number) => tf.randomNormal(shape, 0, std, 'float32', s++);
  const owned: tf.Tensor[] = [];
  const own = <T extends tf.Tensor>(t: T): T => { owned.push(t); return t; };
  const inputs: Inputs = {
    x: own(normal([T, H], 1) as tf.Tensor2D),
    g: own(normal([T, H], 1) as tf.Tensor2D),
    router: own(normal([E, H], 0.1 / Math.sqrt(H)) as tf.Tensor2D),
    gateUp: expertWeight(normal([E, 2 * I, H], 1 / Math.sqrt(H)) as tf.Tensor3D, storage, own),
    down: expertWeight(normal([E, H, I], 1 / Math.sqrt(I)) as tf.Tensor3D, storage, own),
    config: { routing: { kind: 'softmaxTopK', topK: c.topK, renormalize: true }, activation: { kind: 'swiglu' } },
    dispose: () => tf.dispose(owned),
  };
  if (withLoRA) {
    const scaling = 16 / r;
    const adapter = (a: number[], b: number[], inSize: number): LoRAFactors => ({
      A: own(normal(a, 1 / Math.sqrt(inSize)) as tf.Tensor2D), B: own(normal(b, 0.01) as tf.Tensor2D), scaling,
    });
    inputs.lora = {
      router: adapter([r, H], [E, r], H),
      up: adapter([r * E, H], [2 * I, r * E], H),
      down: adapter([r * E, I], [H, r * E], I),
    };
  }
  return inputs;
}

/** The float32 weight as `storage` holds it (packed: rounded or quantized, the float32 one disposed). */
function expertWeight(w: tf.Tensor3D, storage: BenchExpertStorage, own: <T extends tf.Tensor>(t: T) => T): ExpertWeightTensor {
  if (storage === 'float32') return own(w);
  const packed = packExpertWeight(w, storage);
  w.dispose();
  own(packed.packed);
  return packed;
}

function problemOf(inputs: Inputs, lora: BenchLoRA): Problem {
  const { x, router, gateUp, down } = inputs;
  if (lora === 'none') {
    return {
      inputs, trained: [x, router, gateUp as tf.Tensor3D, down as tf.Tensor3D],
      with: ([, rw, w1, w2]) => ({
        router: { weight: rw as tf.Tensor2D },
        experts: { gateUp: w1 as tf.Tensor3D, down: w2 as tf.Tensor3D },
      }),
    };
  }
  const l = inputs.lora!;
  const pair = (f: LoRAFactors, a: tf.Tensor, b: tf.Tensor): LoRAFactors[] =>
    [{ A: a as tf.Tensor2D, B: b as tf.Tensor2D, scaling: f.scaling }];
  return {
    inputs, trained: [x, l.router.A, l.router.B, l.up.A, l.up.B, l.down.A, l.down.B],
    with: ([, ra, rb, ua, ub, da, db]) => ({
      router: { weight: router, lora: pair(l.router, ra, rb) },
      experts: { gateUp, down, gateUpLoRA: pair(l.up, ua, ub), downLoRA: pair(l.down, da, db) },
    }),
  };
}

/** Waits until the gradients exist: at once on cpu and wasm; on webgpu a read of one element each. */
async function settle(grads: tf.Tensor[]): Promise<void> {
  if (tf.getBackend() !== 'webgpu') return;
  const probes = tf.tidy(() => grads.map(t => tf.slice(tf.reshape(t, [-1]), 0, 1)));
  await Promise.all(probes.map(t => t.data()));
  tf.dispose(probes);
}

/** The median of `values` (the mean of the middle two for an even count). */
export function median(values: number[]): number {
  const v = [...values].sort((a, b) => a - b);
  const m = v.length >> 1;
  return v.length % 2 === 1 ? v[m] : (v[m - 1] + v[m]) / 2;
}

type Kernel = 'fused' | 'reference';

/**
 * The chosen experts of a problem, read to the host once. The reference's expert loop reads them
 * with dataSync, which webgpu does not have; there the bench reads them before the timed steps
 * (the weights do not change between steps) and hands them in, which leaves that read out of the
 * reference's time.
 */
async function hostExpertsOf(p: Problem): Promise<Int32Array> {
  const w = p.with(p.trained);
  const experts = tf.tidy(() => referenceRoute(routerLogits(p.inputs.x, w.router), p.inputs.config.routing).experts);
  try {
    return await experts.data() as Int32Array;
  } finally {
    experts.dispose();
  }
}

export { ASYNC_READ_BACKENDS };

/**
 * The timing schedule both benchmarks share: `warmup` untimed then `iters` timed calls of `timeOne`
 * per run. On cpu and wasm every run once per round, in an order that rotates and turns round from
 * round to round: a slow phase of a shared machine, or the garbage of the step before, hits them
 * alike. On a GPU backend one block per run, its warm-up right before it: interleaved with the
 * reference, whose host-side loop leaves the GPU idle for 200 ms at a time, a fused M1 step
 * measured 29 ms instead of 6.5 (H100; mostly in the wait for the GPU, enqueue 4.4 ms).
 */
export async function timeRuns<R>(
    runs: readonly R[], warmup: number, iters: number, timeOne: (r: R, timed: boolean) => Promise<void>): Promise<void> {
  if (ASYNC_READ_BACKENDS.includes(tf.getBackend())) {
    for (const r of runs) {
      for (let i = 0; i < warmup; i++) await timeOne(r, false);
      for (let i = 0; i < iters; i++) await timeOne(r, true);
    }
    return;
  }
  for (const r of runs) for (let i = 0; i < warmup; i++) await timeOne(r, false);
  for (let i = 0; i < iters; i++) {
    const order = [...runs.slice(i % runs.length), ...runs.slice(0, i % runs.length)];
    for (const r of i % 2 === 0 ? order : order.reverse()) await timeOne(r, true);
  }
}

/**
 * One forward + backward: the gradients of loss = Σ out·g w.r.t. every trained tensor, with g fed
 * as the block output's gradient. Writing the loss as tf.sum(tf.mul(out, g)) would add the
 * gradient of tf.sum, which builds a [T, H] tensor of ones on the host and uploads it every step:
 * about 40 ms of a 70 ms M1 step on webgpu (H100, interleaved run: 69 → 29 ms), nothing to do
 * with the block.
 */
function stepOf(p: Problem, kernel: Kernel, lora: BenchLoRA, hostExperts?: Int32Array): () => tf.Tensor[] {
  const loraMode = lora === 'none' ? undefined : lora;
  const block = (...args: tf.Tensor[]) => {
    const x = args[0] as tf.Tensor2D;
    const { out } = kernel === 'reference' && hostExperts !== undefined ?
      referenceMoEBlock(x, p.with(args), p.inputs.config, { hostExperts }) :
      moeBlock(x, p.with(args), p.inputs.config, { expertKernel: kernel, loraMode });
    return out;
  };
  const grads = tf.grads(block);
  return () => grads(p.trained, p.inputs.g);
}

interface Sample { ms: number; cpuMs: number; enqueueMs: number }

/** The parts of the webgpu backend and its device that gpuErrorsOf uses. */
interface GPUDeviceLike {
  pushErrorScope(filter: 'out-of-memory' | 'validation'): void;
  popErrorScope(): Promise<{ message: string } | null>;
}

/**
 * Runs `fn` and throws when the GPU reported an error meanwhile. Dawn does not make tfjs throw
 * when a buffer cannot be allocated: the step goes on with invalid buffers and its times mean
 * nothing (the reference at Q on an 80 GB H100 does that). Elsewhere it just runs `fn`.
 */
async function gpuChecked<T>(kernel: Kernel, fn: () => Promise<T>): Promise<T> {
  const device = tf.getBackend() === 'webgpu' ? (tf.backend() as unknown as { device?: GPUDeviceLike }).device : undefined;
  if (device === undefined) return fn();
  device.pushErrorScope('validation');
  device.pushErrorScope('out-of-memory');
  let result: T;
  try {
    result = await fn();
  } finally {
    const oom = await device.popErrorScope();
    const invalid = await device.popErrorScope();
    const error = oom ?? invalid;
    if (error != null) {
      throw new Error(`the ${kernel} kernel's step failed on the GPU${oom ? ' (out of memory)' : ''}: ` +
          `${error.message.split('\n')[0]}${kernel === 'reference' ? '; time the fused kernel alone with reference: false (--no-reference)' : ''}`);
    }
  }
  return result;
}

async function timeStep(step: () => tf.Tensor[], kernel: Kernel): Promise<Sample> {
  return gpuChecked(kernel, async () => {
    const c0 = process.cpuUsage();
    const t0 = performance.now();
    const grads = step();
    const enqueueMs = performance.now() - t0;
    await settle(grads);
    const ms = performance.now() - t0;
    const c = process.cpuUsage(c0);
    tf.dispose(grads);
    return { ms, cpuMs: (c.user + c.system) / 1000, enqueueMs };
  });
}

/** Peak bytes of one step above what was held before it, and its kernels by time. */
async function profileStep(step: () => tf.Tensor[], kernel: Kernel): Promise<{ peakBytes: number; kernels: KernelTime[] }> {
  const before = tf.memory().numBytes;
  const info = await gpuChecked(kernel, () => tf.profile(async () => {
    const grads = step();
    await settle(grads);
    tf.dispose(grads);
  }));
  const byName = new Map<string, KernelTime>();
  for (const k of info.kernels) {
    // a customGrad's forward is recorded as one unnamed scope around its own kernels: counting
    // it would count those twice
    if (!k.name || k.name === 'unnamed scope') continue;
    const entry = byName.get(k.name) ?? { name: k.name, ms: 0, calls: 0 };
    entry.ms += Number(k.kernelTimeMs) || 0;
    entry.calls++;
    byName.set(k.name, entry);
  }
  const kernels = [...byName.values()].sort((a, b) => b.ms - a.ms).slice(0, 12);
  return { peakBytes: info.peakBytes - before, kernels };
}

function checkOptions(options: BlockBenchOptions): Required<Omit<BlockBenchOptions, 'onCase'>> {
  if (options == null || typeof options !== 'object') fail(OP, `'options' must be an object but got ${options}`);
  const names = Object.keys(BENCH_CONFIGS);
  assertOneOf(OP, 'config', options.config, names);
  const lora = options.lora ?? BENCH_LORA_CASES;
  if (!Array.isArray(lora) || lora.length === 0) fail(OP, `'lora' must be a non-empty list of cases but got ${JSON.stringify(lora)}`);
  lora.forEach((l, i) => assertOneOf(OP, `lora[${i}]`, l, BENCH_LORA_CASES));
  const iters = options.iters ?? 5;
  const warmup = options.warmup ?? 1;
  assertInteger(OP, 'iters', iters, 1);
  assertInteger(OP, 'warmup', warmup, 0);
  const seed = options.seed ?? 1;
  assertInteger(OP, 'seed', seed, 0);
  const rank = options.rank ?? BENCH_CONFIGS[options.config].rank;
  assertInteger(OP, 'rank', rank, 1);
  if (options.reference !== undefined && typeof options.reference !== 'boolean') {
    fail(OP, `'reference' must be a boolean but got ${JSON.stringify(options.reference)}`);
  }
  const expertStorage = options.expertStorage ?? 'float32';
  assertOneOf(OP, 'expertStorage', expertStorage, BENCH_EXPERT_STORAGES);
  if (expertStorage !== 'float32' && lora.includes('none')) {
    fail(OP, `'expertStorage' '${expertStorage}' holds the expert weights frozen, so the LoRA case 'none' ` +
        `(which trains them) cannot run; ask for LoRA cases only (got ${JSON.stringify(lora)})`);
  }
  const cpuSegmentSum = options.cpuSegmentSum ?? 'stock';
  assertOneOf(OP, 'cpuSegmentSum', cpuSegmentSum, CPU_SEGMENT_SUMS);
  const backend = tf.getBackend();
  const c = BENCH_CONFIGS[options.config];
  if (!c.backends.includes(backend) && options.allowAnyBackend !== true) {
    fail(OP, `config '${options.config}' is sized for ${c.backends.join(', ')}, not ${backend} ` +
        `(allowAnyBackend / --allow-any-backend runs it anyway)`);
  }
  return {
    config: options.config, lora, iters, warmup, seed, cpuSegmentSum, rank, expertStorage,
    allowAnyBackend: options.allowAnyBackend ?? false, profile: options.profile ?? false,
    reference: options.reference ?? true,
  };
}

/**
 * Times the MoE block forward + backward with the fused and the reference expert kernels on the
 * current backend, one case per LoRA setting, and returns one record per case.
 *
 * ```js
 * await tf.setBackend('wasm');
 * const cases = await benchMoEBlock({ config: 'S', lora: ['none', 'auto'], iters: 5 });
 * cases[0].speedup;  // reference ms / fused ms
 * ```
 */
export async function benchMoEBlock(options: BlockBenchOptions): Promise<BenchCase[]> {
  const o = checkOptions(options);
  if (tf.getBackend() === 'cpu' && o.cpuSegmentSum === 'linear') {
    return withLinearCpuSegmentSum(() => runCases(o, options.onCase));
  }
  return runCases(o, options.onCase);
}

async function runCases(
    o: Required<Omit<BlockBenchOptions, 'onCase'>>, onCase: BlockBenchOptions['onCase']): Promise<BenchCase[]> {
  const c = { ...BENCH_CONFIGS[o.config], rank: o.rank };
  const backend = tf.getBackend();
  const inputs = makeInputs(c, o.seed, o.lora.some(l => l !== 'none'), o.expertStorage);
  try {
    const runs: Array<{ lora: BenchLoRA; kernel: Kernel; step: () => tf.Tensor[]; samples: Sample[] }> = [];
    for (const lora of o.lora) {
      const p = problemOf(inputs, lora);
      const hostExperts = ASYNC_READ_BACKENDS.includes(backend) ? await hostExpertsOf(p) : undefined;
      for (const kernel of o.reference ? ['fused', 'reference'] as const : ['fused'] as const) {
        runs.push({ lora, kernel, step: stepOf(p, kernel, lora, hostExperts), samples: [] });
      }
    }
    await timeRuns(runs, o.warmup, o.iters, async (r, timed) => {
      const sample = await timeStep(r.step, r.kernel);
      if (timed) r.samples.push(sample);
    });
    const results: BenchCase[] = [];
    for (const lora of o.lora) {
      const flops = expertFlops(c, lora);
      const timing = async (kernel: Kernel): Promise<BenchTiming> => {
        const r = runs.find(x => x.lora === lora && x.kernel === kernel)!;
        const ms = median(r.samples.map(v => v.ms));
        const cpuMs = median(r.samples.map(v => v.cpuMs));
        const enqueueMs = median(r.samples.map(v => v.enqueueMs));
        const { peakBytes, kernels } = await profileStep(r.step, kernel);
        const samples = r.samples.map(v => v.ms);
        const t: BenchTiming = {
          ms, peakBytes, samples, minMs: Math.min(...samples), cpuMs, enqueueMs, gflops: flops / ms / 1e6,
        };
        if (o.profile) t.kernels = kernels;
        return t;
      };
      const fused = await timing('fused');
      const reference = o.reference ? await timing('reference') : null;
      const fusedRun = runs.find(x => x.lora === lora && x.kernel === 'fused')!;
      const refRun = runs.find(x => x.lora === lora && x.kernel === 'reference');
      const rows = c.tokens * c.topK;
      const result: BenchCase = {
        config: o.config, backend, lora, fused, reference,
        speedup: reference && reference.ms / fused.ms,
        cpuSpeedup: reference && reference.cpuMs / fused.cpuMs,
        pairedSpeedup: refRun ? median(refRun.samples.map((v, i) => v.ms / fusedRun.samples[i].ms)) : null,
        memRatio: reference && fused.peakBytes / reference.peakBytes,
        shape: { T: c.tokens, H: c.hidden, I: c.inter, E: c.experts, K: c.topK, r: c.rank },
        expertStorage: o.expertStorage,
        iters: o.iters, warmup: o.warmup,
      };
      if (backend === 'cpu') result.cpuSegmentSum = o.cpuSegmentSum;
      const others = runs.filter(x => x.kernel === 'fused' && (x.lora === 'materialize' || x.lora === 'split'));
      if (lora === 'auto' && others.length > 0) {
        result.autoVsBest = median(fusedRun.samples.map((v, i) => v.ms / Math.min(...others.map(x => x.samples[i].ms))));
      }
      if (lora === 'auto') {
        result.autoPicks = [
          chooseLoRAMode(rows, c.hidden, 2 * c.inter, c.experts, c.rank),
          chooseLoRAMode(rows, c.inter, c.hidden, c.experts, c.rank),
        ];
      }
      results.push(result);
      onCase?.(result);
    }
    return results;
  } finally {
    inputs.dispose();
  }
}

const MB = 1024 * 1024;

/** The human-readable table of benchMoEBlock's results. */
export function formatBenchTable(cases: readonly BenchCase[]): string {
  const head = ['config', 'backend', 'lora', 'fused ms', 'ref ms', 'speedup', 'paired', 'fused cpu-ms', 'ref cpu-ms',
    'cpu speedup', 'fused MiB', 'ref MiB', 'mem ratio', 'fused GFLOP/s', 'ref GFLOP/s', 'auto picks', 'auto/best'];
  const ratio = (v: number | null) => (v === null ? '-' : `${v.toFixed(2)}x`);
  const rows = cases.map(c => [
    c.config, c.backend, c.lora, c.fused.ms.toFixed(1), c.reference?.ms.toFixed(1) ?? '-', ratio(c.speedup),
    ratio(c.pairedSpeedup), c.fused.cpuMs.toFixed(1), c.reference?.cpuMs.toFixed(1) ?? '-', ratio(c.cpuSpeedup),
    (c.fused.peakBytes / MB).toFixed(1), c.reference ? (c.reference.peakBytes / MB).toFixed(1) : '-',
    c.memRatio?.toFixed(2) ?? '-',
    c.fused.gflops.toFixed(2), c.reference?.gflops.toFixed(2) ?? '-', c.autoPicks ? c.autoPicks.join('/') : '',
    c.autoVsBest !== undefined ? c.autoVsBest.toFixed(2) : '',
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map(r => r[i].length)));
  const line = (cells: string[]) => cells.map((s, i) => (i < 3 ? s.padEnd(widths[i]) : s.padStart(widths[i]))).join('  ').trimEnd();
  const profiles = cases.flatMap(c => (['fused', 'reference'] as const).filter(k => c[k]?.kernels).map(k =>
    `${c.lora} ${k}: ${c[k]!.kernels!.map(t => `${t.name} ${t.ms.toFixed(1)} ms (${t.calls})`).join(', ')}`));
  const s = cases[0]?.shape;
  const title = s ? `MoE block forward+backward, T=${s.T} H=${s.H} I=${s.I} E=${s.E} K=${s.K} r=${s.r}, ` +
      `median of ${cases[0].iters} after ${cases[0].warmup} warm-up` +
      (cases[0].expertStorage !== 'float32' ? `, experts packed ${cases[0].expertStorage}` : '') +
      (cases[0].cpuSegmentSum ? `, cpu UnsortedSegmentSum: ${cases[0].cpuSegmentSum}` : '') : 'no cases';
  const profile = profiles.length > 0 ? ['kernel time in the profiled step (tf.profile):', ...profiles] : [];
  return `${[title, line(head), ...rows.map(line), ...profile].join('\n')}\n`;
}
