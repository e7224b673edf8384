/**
 * WebGPU benchmark of the MoE block, forward + backward, for the H100 (docs/webgpu.md):
 *   npx tsx bench/webgpu_moe.ts [--config M1,Q] [--presets auto,f] [--lora none|split|materialize]
 *       [--iters 20] [--warmup 3] [--chain 10] [--batch N] [--submit-flops N|Infinity]
 *       [--profile] [--composed] [--json out.json] [--dawn-flags enable-dawn-features=...]
 *       [--interleave 'batch=15,submit=Infinity;batch=3,submit=134217728'] [--expert-storage float32|bf16]
 *       [--tensor-cores on|off] [--half-operands on|off] [--tf-flags NAME=VALUE,...]
 * or bundled: ../shared/gpu/prepare.sh bench/webgpu_moe.ts, then on the GPU machine
 *   source .gpu/on-device.sh && node .gpu/bundle/webgpu_moe.js --config M1,Q --profile
 *
 * One step = the gradients of loss = Σ out·g w.r.t. x, the router weight, W1 and W2 (full
 * fine-tuning, softmaxTopK routing, SwiGLU), g fed as the block output's gradient. The clock stops
 * after a read of one element of each gradient, i.e. after the GPU finished the step ('median');
 * 'chained' is the time per step of --chain steps enqueued back to back with one read at the end. Per preset (tile sizes): median ms, TFLOP/s of
 * the useful expert FLOPs (18·T·K·H·I) and GB/s of the compulsory traffic (every input read once,
 * every output written once, h written and read once). --profile adds per-program GPU times from
 * timestamp queries (tf.time), --composed the stock-kernel path (the composed fusedExperts with a
 * host-read plan) for comparison. --expert-storage bf16 (LoRA cases only) runs on the experts packed
 * as bf16 halves, decoded in the products' loads, as the end-to-end run holds them.
 * --tensor-cores on adds, per config, one line: the subgroup-matrix programs of a step (their keys
 * name the block rows _r and the weight gradients' depth _d) and every gradient's max relative
 * error to the same step on the f32 kernels, PASS or FAIL (above 1e-2, not finite, or no
 * subgroup-matrix program ran: exit code 1). Batch 1 of real models (issue 15), bundled:
 *   node .gpu/bundle/webgpu_moe.js --config O,Q1 --tensor-cores on --lora split --expert-storage bf16 --profile
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { writeFileSync } from 'node:fs';
import { setupDawnWebGPU } from '../src/backends/webgpu/dawn.js';
import { parseTfFlags, setTfFlags } from './tf_flags.js';
import { setWebGPUMoETuning, type WebGPUMoETuning } from '../src/backends/webgpu/experts.js';
import { SUBMIT_FLOPS_FLAG, TC_HALF_OPERANDS_FLAG } from '../src/backends/webgpu/kernels.js';
import { TENSOR_CORES_FLAG } from '../src/backends/webgpu/tensor_cores.js';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { BENCH_CONFIGS, expertFlops } from '../src/bench/block_bench.js';
import { buildDispatchPlanAsync } from '../src/ops/experts/dispatch_plan.js';
import { fusedExperts } from '../src/ops/experts/fused_experts.js';
import type { PackedExpertWeight } from '../src/ops/packed.js';
import { registerExpertsImplementation } from '../src/ops/moe_block.js';
import { routerLogits } from '../src/ops/lora/router_logits.js';
import { route } from '../src/ops/routing/route.js';
import { maxRelativeError } from '../src/util/numeric.js';
import { median, makeProblem, type Samples, settle, stepOf, timeSteps, withPackedBf16Experts } from './webgpu_timing.js';

/** Tile presets (see WebGPUMoETuning); 'auto' is the default choice by rows per expert. */
export const PRESETS: Record<string, WebGPUMoETuning | undefined> = {
  auto: undefined,
  a: { rowTile: 64, tile: { tm: 4, tn: 4, bk: 16 }, gradTile: { tm: 4, tn: 4, bk: 16 } },
  b: { rowTile: 64, tile: { tm: 4, tn: 4, bk: 16, vec4: true }, gradTile: { tm: 4, tn: 4, bk: 16, vec4: true } },
  c: { rowTile: 128, tile: { tm: 8, tn: 8, bk: 16, vec4: true }, gradTile: { tm: 8, tn: 8, bk: 16, vec4: true } },
  d: { rowTile: 128, tile: { tm: 8, tn: 4, bk: 16, vec4: true }, gradTile: { tm: 8, tn: 4, bk: 16, vec4: true } },
  e: { rowTile: 128, tile: { tm: 8, tn: 8, bk: 8, vec4: true }, gradTile: { tm: 8, tn: 8, bk: 8, vec4: true } },
  f: { rowTile: 128, tile: { tm: 8, tn: 8, bk: 16 }, gradTile: { tm: 8, tn: 8, bk: 16 } },
  g: { rowTile: 64, tile: { tm: 4, tn: 8, bk: 16, vec4: true }, gradTile: { tm: 4, tn: 8, bk: 16, vec4: true } },
  h: { rowTile: 128, tile: { tm: 8, tn: 8, bk: 32, vec4: true }, gradTile: { tm: 8, tn: 8, bk: 32, vec4: true } },
};

/** The precision contract of issue 13: max relative error of the tensor-core path to the f32 path. */
const TENSOR_CORE_CONTRACT = 1e-2;

/**
 * One step with the tensor cores on, then the same step on the f32 kernels: the shader keys of the
 * subgroup-matrix programs the first ran (with counts), how many f32 grouped products it still
 * ran (the thin LoRA products), and each gradient's max relative error to the f32 step.
 */
async function tensorCoresAgainstF32(step: () => tf.Tensor[], names: string[]): Promise<{
  subgroupPrograms: Record<string, number>; f32Grouped: number; errors: Record<string, number>;
}> {
  const backend = tf.backend() as unknown as { runWebGPUProgram: (program: { shaderKey: string }, ...rest: unknown[]) => unknown };
  const run = backend.runWebGPUProgram;
  const keys: string[] = [];
  const read = async (on: boolean): Promise<Float32Array[]> => {
    tf.env().set(TENSOR_CORES_FLAG, on);
    const grads = step();
    const data = await Promise.all(grads.map(g => g.data() as Promise<Float32Array>));
    tf.dispose(grads);
    return data;
  };
  backend.runWebGPUProgram = function (this: unknown, program, ...rest) {
    keys.push(program.shaderKey);
    return run.call(this, program, ...rest);
  };
  let tc: Float32Array[];
  try {
    tc = await read(true);
  } finally {
    backend.runWebGPUProgram = run;
  }
  let f32: Float32Array[];
  try {
    f32 = await read(false);
  } finally {
    tf.env().set(TENSOR_CORES_FLAG, true);
  }
  const subgroupPrograms: Record<string, number> = {};
  for (const k of keys.filter(k => k.startsWith('moeSubgroup'))) subgroupPrograms[k] = (subgroupPrograms[k] ?? 0) + 1;
  const f32Grouped = keys.filter(k => k.startsWith('moeGroupedMatMul') || k.startsWith('moeGroupedWeightGrad')).length;
  return { subgroupPrograms, f32Grouped, errors: Object.fromEntries(names.map((n, i) => [n, maxRelativeError(tc[i], f32[i])])) };
}

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}
const flag = (name: string) => process.argv.includes(`--${name}`);

/**
 * Submit settings (tfjs's WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE, this package's SUBMIT_FLOPS_FLAG)
 * compared in one process, one step of each in turn: differences between machines and between
 * runs on one machine (±0.5 ms at M1) do not enter the comparison.
 */
async function timeInterleaved(
    step: () => tf.Tensor[], variants: Array<{ batch: number; submit: number }>, warmup: number,
    iters: number): Promise<Samples[]> {
  const out = variants.map((): Samples => ({ total: [], enqueue: [] }));
  const batch0 = tf.env().getNumber('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE');
  const submit0 = tf.env().getNumber(SUBMIT_FLOPS_FLAG);
  try {
    for (let i = 0; i < warmup + iters; i++) {
      for (const [v, variant] of variants.entries()) {
        tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', variant.batch);
        tf.env().set(SUBMIT_FLOPS_FLAG, variant.submit);
        const s = await timeSteps(step, 0, 1);
        if (i >= warmup) { out[v].total.push(s.total[0]); out[v].enqueue.push(s.enqueue[0]); }
      }
    }
  } finally {
    tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', batch0);
    tf.env().set(SUBMIT_FLOPS_FLAG, submit0);
  }
  return out;
}

/** ms per step over `chain` steps enqueued back to back with one wait at the end (training throughput). */
async function timeChained(step: () => tf.Tensor[], chain: number, repeats: number): Promise<number[]> {
  const out: number[] = [];
  for (let r = 0; r < repeats; r++) {
    const t0 = performance.now();
    let grads: tf.Tensor[] = [];
    for (let i = 0; i < chain; i++) {
      tf.dispose(grads);
      grads = step();
    }
    await settle(grads);
    out.push((performance.now() - t0) / chain);
    tf.dispose(grads);
  }
  return out;
}

/** The latency of one small read after a small kernel: the floor of the per-step wait. */
async function readLatency(repeats: number): Promise<number> {
  const a = tf.randomNormal([256]);
  await a.data();
  const v: number[] = [];
  for (let i = 0; i < repeats; i++) {
    const t0 = performance.now();
    const b = tf.add(a, 1);
    await b.data();
    v.push(performance.now() - t0);
    b.dispose();
  }
  a.dispose();
  return median(v);
}

/** Compulsory bytes of one step (float32): inputs read once, outputs written once, h once each way. */
function compulsoryBytes(name: string, trainBase: boolean): number {
  const { tokens: T, hidden: H, inter: I, experts: E, topK: K } = BENCH_CONFIGS[name];
  const weights = 3 * E * H * I + E * H;
  return 4 * (T * H /* x */ + weights /* W read */ + T * H /* out */ + 2 * T * K * 2 * I /* h */ +
      T * H /* dOut */ + T * H /* dx */ + (trainBase ? weights : 0) /* dW */);
}

interface Row {
  config: string; lora: string; preset: string; path: 'fused' | 'composed'; ms: number; min: number; enqueueMs: number;
  chainedMs?: number; tflops: number; gbps: number; samples: number[]; peakMiB?: number;
  gpuMs?: number; kernels?: Array<{ name: string; ms: number; count: number }>;
  /** with --profile: each dispatch's program and GPU ms in the order recorded (which of a program's calls is slow) */
  dispatches?: Array<{ name: string; ms: number }>;
}

/** One step under tfjs's profiler: GPU ms per program (largest first), per dispatch in order, and in all. */
async function profileStep(step: () => tf.Tensor[]): Promise<Required<Pick<Row, 'kernels' | 'dispatches' | 'gpuMs'>>> {
  const info = await tf.time(() => { tf.dispose(step()); }) as tf.TimingInfo & { getExtraProfileInfo?: () => string };
  const dispatches: NonNullable<Row['dispatches']> = [];
  for (const part of (info.getExtraProfileInfo?.() ?? '').split(', ')) {
    const at = part.lastIndexOf(': ');
    if (at >= 0) dispatches.push({ name: part.slice(0, at), ms: Number(part.slice(at + 2)) });
  }
  const byName = new Map<string, { ms: number; count: number }>();
  for (const d of dispatches) {
    const e = byName.get(d.name) ?? { ms: 0, count: 0 };
    e.ms += d.ms;
    e.count++;
    byName.set(d.name, e);
  }
  const kernels = [...byName].map(([name, e]) => ({ name, ...e })).sort((a, b) => b.ms - a.ms);
  return { kernels, dispatches, gpuMs: dispatches.reduce((sum, d) => sum + d.ms, 0) };
}

async function main(): Promise<void> {
  // timestamps at full resolution (Dawn rounds them to 100 µs by default)
  const extraFlags = ['disable-dawn-features=timestamp_quantization', ...arg('dawn-flags', '').split(' ').filter(f => f)];
  const tensorCores = arg('tensor-cores', 'off');
  if (tensorCores !== 'on' && tensorCores !== 'off') throw new Error(`--tensor-cores: 'on' or 'off'; got '${tensorCores}'`);
  const adapter = await setupDawnWebGPU({ extraFlags, tensorCores: tensorCores === 'on' ? 'auto' : 'off' });
  if (!(await tf.setBackend('webgpu'))) throw new Error('webgpu backend failed to initialize');
  await tf.ready();
  registerMoEKernels('webgpu');
  if (tensorCores === 'on') {
    if (adapter.tensorCores !== 'available') throw new Error(`--tensor-cores on: this adapter has none: ${adapter.tensorCores}`);
    tf.env().set(TENSOR_CORES_FLAG, true);
  }
  console.log(`# adapter: ${adapter.vendor} ${adapter.architecture} ${adapter.description} (${adapter.featureLevel}, ` +
      `[${adapter.flags.join(' ')}]); ` +
      `features: ${adapter.features.join(' ')}`);
  const configs = arg('config', 'M1').split(',');
  const presets = arg('presets', 'auto').split(',');
  const lora = arg('lora', 'none') as 'none' | 'split' | 'materialize';
  const iters = Number(arg('iters', '20'));
  const warmup = Number(arg('warmup', '3'));
  const chain = Number(arg('chain', '10'));
  const batch = arg('batch', '');
  if (batch) tf.env().set('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE', Number(batch));
  // the tensor-core MatMul's left operand converted to f16 before it (default) or as it stages (A/B runs)
  const halfOperands = arg('half-operands', 'on');
  if (halfOperands !== 'on' && halfOperands !== 'off') throw new Error(`--half-operands: 'on' or 'off'; got '${halfOperands}'`);
  tf.env().set(TC_HALF_OPERANDS_FLAG, halfOperands === 'on');
  const submitFlops = arg('submit-flops', '');
  if (submitFlops) tf.env().set(SUBMIT_FLOPS_FLAG, Number(submitFlops));
  // any other tf.env() flag for this run, e.g. WEBGPU_MOE_PADDED_H_MAX_RATIO=0 (bench/tf_flags.ts)
  const tfFlagsText = arg('tf-flags', '');
  const tfFlags = tfFlagsText === '' ? {} : parseTfFlags(tfFlagsText);
  setTfFlags(tfFlags);
  if (Object.keys(tfFlags).length > 0) console.log(`# tf flags: ${JSON.stringify(tfFlags)}`);
  console.log(`# read latency (small kernel + read): ${(await readLatency(20)).toFixed(2)} ms; ` +
      `submit batch ${tf.env().get('WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE')}, submit after products of ` +
      `${tf.env().getNumber(SUBMIT_FLOPS_FLAG)} FLOPs`);
  const rows: Row[] = [];
  const report = (r: Row) => {
    rows.push(r);
    console.log(`${r.config}\t${r.lora}\t${r.path}\t${r.preset}\tmedian ${r.ms.toFixed(2)} ms\tmin ${r.min.toFixed(2)}\t` +
        `enqueue ${r.enqueueMs.toFixed(2)}\tchained ${r.chainedMs?.toFixed(2) ?? '-'} ms/step\t` +
        `GPU ${r.gpuMs?.toFixed(2) ?? '-'} ms\t${r.tflops.toFixed(2)} TFLOP/s\t${r.gbps.toFixed(0)} GB/s` +
        `${r.peakMiB != null ? `\tpeak ${r.peakMiB.toFixed(0)} MiB` : ''}`);
  };
  const printKernels = (label: string, kernels: NonNullable<Row['kernels']>, flops: number) => {
    const total = kernels.reduce((s, k) => s + k.ms, 0);
    const dispatches = kernels.reduce((s, k) => s + k.count, 0);
    console.log(`# ${label} per program (timestamp queries, GPU ms, sum ${total.toFixed(2)}, ${dispatches} dispatches):`);
    for (const k of kernels) console.log(`#   ${k.name.padEnd(34)} ${k.ms.toFixed(3).padStart(8)} ms  x${k.count}`);
    const mm = kernels.filter(k => k.name.startsWith('Grouped') && !k.name.includes('Column')).reduce((s, k) => s + k.ms, 0);
    console.log(`#   grouped products: ${mm.toFixed(2)} ms = ${(flops / mm / 1e9).toFixed(2)} TFLOP/s on the expert FLOPs`);
  };
  const storage = arg('expert-storage', 'float32');
  if (storage !== 'float32' && (storage !== 'bf16' || lora === 'none')) {
    throw new Error(`--expert-storage: 'float32', or 'bf16' with a LoRA case; got '${storage}' with --lora ${lora}`);
  }
  let failed = false;
  for (const name of configs) {
    const p = storage === 'bf16' ? await withPackedBf16Experts(makeProblem(name, lora)) : makeProblem(name, lora);
    const flops = expertFlops(BENCH_CONFIGS[name], lora);
    const bytes = compulsoryBytes(name, lora === 'none');
    const row = (preset: string, path: Row['path'], s: Samples): Row => {
      const ms = median(s.total);
      return { config: name, lora, preset, path, ms, min: Math.min(...s.total), enqueueMs: median(s.enqueue),
        tflops: flops / ms / 1e9, gbps: bytes / ms / 1e6, samples: s.total };
    };
    const step = stepOf(p, lora);
    let best: Row | undefined;
    for (const preset of presets) {
      setWebGPUMoETuning(PRESETS[preset]);
      const r = row(preset, 'fused', await timeSteps(step, warmup, iters));
      r.chainedMs = median(await timeChained(step, chain, 3));
      if (flag('profile')) Object.assign(r, await profileStep(step));
      report(r);
      if (best === undefined || (r.gpuMs ?? r.ms) < (best.gpuMs ?? best.ms)) best = r;
    }
    setWebGPUMoETuning(PRESETS[best!.preset]);
    const interleave = arg('interleave', '');
    if (interleave) {
      const variants = interleave.split(';').map(v => {
        const kv = Object.fromEntries(v.split(',').map(p => p.split('=')));
        return { batch: Number(kv.batch ?? 15), submit: Number(kv.submit ?? Infinity) };
      });
      const samples = await timeInterleaved(step, variants, warmup, iters);
      for (const [v, variant] of variants.entries()) {
        const r = row(`batch ${variant.batch} submit ${variant.submit}`, 'fused', samples[v]);
        report(r);
      }
    }
    const before = tf.memory().numBytes;
    const mem = await tf.profile(async () => { const g = step(); await settle(g); tf.dispose(g); });
    best!.peakMiB = (mem.peakBytes - before) / 2 ** 20;
    console.log(`# ${name}: best preset ${best!.preset}, peak ${best!.peakMiB.toFixed(0)} MiB over the inputs`);
    if (best!.kernels) printKernels(`${name} preset ${best!.preset}`, best!.kernels, flops);
    if (tensorCores === 'on') {
      const names = lora === 'none' ? ['dx', 'dRouter', 'dW1', 'dW2'] : ['dx', 'dA1', 'dB1', 'dA2', 'dB2'];
      const c = await tensorCoresAgainstF32(step, names);
      const count = Object.values(c.subgroupPrograms).reduce((a, b) => a + b, 0);
      const worst = Math.max(...Object.values(c.errors).map(e => (Number.isFinite(e) ? e : Infinity)));
      const pass = count > 0 && worst <= TENSOR_CORE_CONTRACT;
      failed ||= !pass;
      console.log(`# ${name} tensor cores: ${pass ? 'PASS' : 'FAIL'} (preset ${best!.preset}, max rel. error to f32 ` +
          `${worst.toExponential(2)}, contract <= ${TENSOR_CORE_CONTRACT}; ${count} subgroup-matrix programs a step): ` +
          `${Object.entries(c.errors).map(([n, e]) => `${n} ${e.toExponential(2)}`).join(', ')}; ` +
          `${Object.entries(c.subgroupPrograms).map(([k, n]) => `${k} x${n}`).join(', ') || 'no subgroup-matrix program'}; ` +
          `${c.f32Grouped} f32 grouped products`);
    }
    if (flag('composed')) {
      // the stock-kernel path: fusedExperts composed of tfjs ops, its plan read to the host first
      const logits = routerLogits(p.x, { weight: p.router });
      const routing = route(logits, p.config.routing);
      const plan = await buildDispatchPlanAsync(routing.experts, BENCH_CONFIGS[name].experts);
      tf.dispose([routing.weights, routing.experts, logits]);
      const previous = registerExpertsImplementation('webgpu', (x, r, w, a, o) => fusedExperts(x, r, w, a, { ...o, plan }));
      try {
        const r = row('-', 'composed', await timeSteps(step, Math.min(warmup, 2), Math.min(iters, 5)));
        if (flag('profile')) Object.assign(r, await profileStep(step));
        report(r);
      } catch (err) {
        console.log(`# ${name} composed: failed: ${String(err).split('\n')[0]}`);
      } finally {
        registerExpertsImplementation('webgpu', previous);
      }
    }
    tf.dispose([p.x, p.g, p.router, p.w1, p.w2, ...p.lora]);
    if (p.packed) tf.dispose([p.packed.w1, p.packed.w2].map(w => (w as PackedExpertWeight).packed));
  }
  const out = arg('json', '');
  if (out) writeFileSync(out, JSON.stringify({ adapter, rows }, null, 1));
  if (failed) throw new Error('the tensor-core path FAILed its check against f32 (lines above)');
}

main().then(() => process.exit(0), err => { console.error(err); process.exit(1); });
