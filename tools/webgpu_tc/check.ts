/**
 * Tensor-core check for the GPU machine (issue 13): the subgroup-matrix grouped products against
 * the f32 kernels on random inputs (at 256, 64 and 32 rows per expert: the 128-, 64- and 32-row
 * blocks, issue 15), the dense projections (MoEDenseMatMul / MoEPackedDenseMatMul, issue 13/15:
 * x·Wᵀ and dy·W at OLMoE's [2048, 2048] and its LM head [50304, 2048], f32 and bf16 W) against the
 * f32 path, the composed attention's six batched products (MoEBatchProduct: q·kᵀ, P·v, Pᵀ·dO,
 * dO·vᵀ, dS·k, dSᵀ·q at OLMoE's batch 4 × 16 heads, S = L = 512, head 128) and its whole training
 * pass, the fused block of a transformers fixture with and without them, and block timings at M1
 * and Q, both paths in one process.
 *
 * Here (Mesa: reports that the feature is missing and exits 0):
 *   EGL_PLATFORM=surfaceless npx tsx tools/webgpu_tc/check.ts
 * On the GPU machine, after `../shared/gpu/prepare.sh tools/webgpu_tc/check.ts` in a checkout:
 *   source .gpu/on-device.sh && node .gpu/bundle/check.js
 * and a dry run of the steps there (both "paths" are the f32 kernels on Mesa):
 *   TC_CHECK_HARNESS=1 EGL_PLATFORM=surfaceless npx tsx tools/webgpu_tc/check.ts
 * TC_CHECK_STEPS=attention,dense (the steps' names, comma-separated) runs only those steps: on Mesa
 * the harness's first steps take its whole time budget. TC_CHECK_TF_FLAGS='NAME=VALUE,...' sets
 * tf.env() flags for the whole check (bench/tf_flags.ts's form), e.g. a tensor-core flag before its
 * default is decided.
 * Prints one JSON object on stdout (progress on stderr) and writes it to $OUT/tc.json when OUT is
 * set, and the report so far to $OUT/tc.partial.json after every step (a hang inside Dawn blocks
 * the event loop). Every step is caught and recorded. One line per product on stderr, PASS or FAIL:
 * FAIL when, on a tensor-core adapter, the error to f32 is above 1e-2 or not finite, or the
 * subgroup-matrix program with the plan's block (_r<rows>) or slab depth (_d<depth>) did not run.
 * The attention products print "attention <product> PASS|FAIL" lines the same way (FAIL: error
 * above 1e-2, not finite, or not the uniform-groups program the route picks); they count as products.
 * Exits 1 when there is no adapter, a product FAILed or the check stopped on an error
 * (report.fatal), 3 when a dense case failed (an error, max rel. error above 1e-2, a non-finite
 * value, or no subgroup-matrix program run; one "dense ... FAIL" line each), else 0.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type DawnAdapterReport, setupDawnWebGPU } from '../../src/backends/webgpu/dawn.js';
import { setWebGPUMoETuning, webgpuMoETuningFor } from '../../src/backends/webgpu/experts.js';
import { subgroupBlockRowsFor, weightGradDepthFor } from '../../src/backends/webgpu/programs/subgroup_matrix_program.js';
import {
  deviceDispatchPlan, type DevicePlan, groupedMatMul, groupedWeightGrad,
} from '../../src/backends/webgpu/kernels.js';
import { registerMoEKernels } from '../../src/backends/register_all_kernels.js';
import { parseTfFlags, setTfFlags } from '../../bench/tf_flags.js';
import { BENCH_CONFIGS, expertFlops } from '../../src/bench/block_bench.js';
import { blockLayerIndex, loadMoEBlockWeights } from '../../src/io/hf_block.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { type HFConfig, moeBlockConfigFromHF } from '../../src/models/families.js';
import { moeBlock } from '../../src/ops/moe_block.js';
import { readJSONFile } from '../../src/util/files.js';
import {
  bfloat16Bits, denseWeightMatMul, packExpertWeight, type PackedExpertWeight, packedDenseWeightFromBits, packedExpertWeightFromBits,
} from '../../src/ops/packed.js';
import { encodeBFloat16 } from '../../src/util/half.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { makeProblem, median, stepOf, timeSteps } from '../../bench/webgpu_timing.js';
import { batchProductTensorCoreRoute, TC_BATCH_PRODUCTS_FLAG, TC_LORA_TAIL_FLAG } from '../../src/backends/webgpu/kernels.js';
import { ATTENTION_KERNEL_FLAG, scaledDotProductAttention } from '../../src/ops/attention_core.js';
import { type BatchProductAttrs, batchProduct } from '../../src/ops/batch_product.js';
import { causalMask } from '../../src/layers/attention.js';
import { withEnvFlag, withTensorCores } from './scoped.js';
import { auditSubgroupControlFlow } from './uniformity.js';

const started = Date.now();
// TC_CHECK_HARNESS=1 runs the small steps anyway, both "paths" then f32, with short timing loops:
// a dry run of this script where the feature is missing (Mesa's software GL is slow)
const harness = process.env.TC_CHECK_HARNESS === '1';
const CHAIN = harness ? 2 : 20;
const ROUNDS = harness ? 1 : 3;
// within on_device.sh's 80 s, after variants (v6): the watchdog at +5 s
const TOTAL_BUDGET_MS = 70_000;
/** the precision contract of issue 13: max relative error to the f32 path */
const CONTRACT = 1e-2;
const report: Record<string, unknown> = { check: 'webgpu_tc v2', startedAt: new Date(started).toISOString() };
const errorText = (err: unknown) => String((err as Error)?.stack ?? (err as Error)?.message ?? err).split('\n').slice(0, 4).join(' | ');
const left = () => TOTAL_BUDGET_MS - (Date.now() - started);

function log(msg: string): void {
  process.stderr.write(`[tc ${((Date.now() - started) / 1000).toFixed(1)}s] ${msg}\n`);
  if (process.env.OUT) writeFileSync(join(process.env.OUT, 'tc.partial.json'), JSON.stringify({ ...report, lastStep: msg }, null, 1));
}

function finish(code: number): never {
  report.elapsedMs = Date.now() - started;
  report.failures = failures;
  const json = JSON.stringify(report, null, 1);
  process.stdout.write(json + '\n');
  if (process.env.OUT) writeFileSync(join(process.env.OUT, 'tc.json'), json);
  process.exit(code);
}

/**
 * Runs `run` once on the f32 kernels and once on tensor cores, recording in `entry` the programs
 * each ran (f32Programs, tcPrograms), the max relative error of tensor cores to f32 and whether
 * every tensor-core value is finite.
 */
async function compareBothPaths(run: () => tf.Tensor, entry: Record<string, unknown>): Promise<void> {
  const values = async () => { const r = run(); const d = await r.data(); r.dispose(); return d; };
  takeProgramCounts();
  const f32 = await withTensorCores(false, values);
  entry.f32Programs = takeProgramCounts();
  const tc = await withTensorCores(true, values);
  entry.tcPrograms = takeProgramCounts();
  entry.maxRelError = maxRelativeError(tc, f32);
  entry.finite = tc.every(Number.isFinite);
}

/**
 * ms per product: `chain` products enqueued back to back, one read at the end (a single product at
 * M1 is far shorter than the read's latency); the median of ROUNDS such rounds.
 */
async function chainedMs(run: () => tf.Tensor, chain: number): Promise<number> {
  const ms: number[] = [];
  for (let round = 0; round < ROUNDS; round++) {
    const t0 = performance.now();
    let r: tf.Tensor | undefined;
    for (let i = 0; i < chain; i++) {
      r?.dispose();
      r = run();
    }
    const probe = tf.tidy(() => tf.slice(tf.reshape(r!, [-1]), 0, 1));
    await probe.data();
    ms.push((performance.now() - t0) / chain);
    tf.dispose([r!, probe]);
  }
  return median(ms);
}

/** Shader keys of the programs run since the last clear (recordPrograms wraps the backend). */
const programsRun: string[] = [];
const subgroupKeysSeen = new Set<string>();
/**
 * Per subgroup-matrix program run, what tools/webgpu_tc/uniformity.ts finds in its WGSL: [] for the
 * programs with uniform control flow (2026-12-05 evening), the per-invocation loops for db64af4's.
 * Says which programs a report measured.
 */
const subgroupAudit: Record<string, string[]> = {};
/** product → the tensor-core programs' max relative error to the f32 kernels, per size: the headline of the report */
const errorSummary: Record<string, number | string> = {};
/** the products that FAILed (see the file comment): the exit code */
const failures: string[] = [];
/** whether this adapter runs the subgroup-matrix programs (else both "paths" are f32: nothing can FAIL) */
let tensorCoresAvailable = false;

function recordPrograms(): void {
  const backend = tf.backend() as unknown as { runWebGPUProgram: (program: { shaderKey: string }, ...rest: unknown[]) => unknown };
  const run = backend.runWebGPUProgram.bind(backend);
  backend.runWebGPUProgram = (program, ...rest) => {
    programsRun.push(program.shaderKey);
    if (program.shaderKey.startsWith('moeSubgroup') && !subgroupKeysSeen.has(program.shaderKey)) {
      subgroupKeysSeen.add(program.shaderKey);
      const code = (program as unknown as { getUserCode(): string }).getUserCode();
      subgroupAudit[program.shaderKey] = auditSubgroupControlFlow(code).map(f => `${f.kind}: ${f.at}`);
    }
    return run(program, ...rest);
  };
}

/**
 * How many of the programs run since the last call were subgroup-matrix ones, of how many grouped
 * products, and the subgroup-matrix shader keys (their _r / _d suffix: the block rows or the depth).
 */
function takeProgramCounts(): { subgroupMatrix: number; f32Grouped: number; subgroupKeys: string[] } {
  const subgroupKeys = programsRun.filter(k => k.startsWith('moeSubgroup'));
  const f32Grouped = programsRun.filter(k => k.startsWith('moeGroupedMatMul') || k.startsWith('moeGroupedWeightGrad')).length;
  programsRun.length = 0;
  return { subgroupMatrix: subgroupKeys.length, f32Grouped, subgroupKeys: [...new Set(subgroupKeys)] };
}

function lcg(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

interface Size { name: string; T: number; H: number; I: number; E: number; K: number }
const SIZES: Size[] = [
  // 256 rows per expert: the large tuning's 128-row tile, 128-row blocks
  { name: 'small', T: 256, H: 256, I: 128, E: 2, K: 2 },
  { name: 'M1', T: 4096, H: 1024, I: 512, E: 8, K: 2 },
];
/**
 * Batch 1's tiles (issue 15): 64 rows per expert (OLMoE-1B-7B at 512 tokens) → 64-row tiles and
 * blocks; 32 (Qwen3-30B-A3B) → 32-row tiles and blocks, the weight gradients 32 deep.
 */
const FEW_ROWS_SIZES: Size[] = [
  { name: 'rows64', T: 256, H: 256, I: 128, E: 8, K: 2 },
  { name: 'rows32', T: 256, H: 256, I: 128, E: 16, K: 2 },
];

/** Each product of the fused block once, as fusedExperts calls it (full fine-tuning, SwiGLU). */
function products(s: Size, t: {
  x: tf.Tensor2D; dOut: tf.Tensor2D; h: tf.Tensor2D; dh: tf.Tensor2D; w1: tf.Tensor3D; w2: tf.Tensor3D; rw: tf.Tensor1D;
  w1bf16: PackedExpertWeight; w1Quantized: PackedExpertWeight[]; plan: DevicePlan;
  u: tf.Tensor2D; gr: tf.Tensor2D; loraA: tf.Tensor2D; loraB: tf.Tensor2D;
}): Record<string, () => tf.Tensor> {
  const { H, I, E } = s;
  const tile = webgpuMoETuningFor(s.T * s.K, E);
  const common = { plan: t.plan, activation: { kind: 'swiglu' as const }, interleaved: false };
  const up = { sE: 2 * I * H, sN: H, sK: 1 };
  const down = { sE: H * I, sN: I, sK: 1 };
  // quantized experts: the subgroup-matrix program decodes them with the f32 program's loader
  const quantized = Object.fromEntries(t.w1Quantized.map(w => [`up (gather, ${w.kind} weight)`,
    () => groupedMatMul({ ...common, a: t.x, source: 'gather', w, strides: up, inner: H, outCols: 2 * I, tile: tile.tile })]));
  return {
    'up (gather)': () => groupedMatMul({ ...common, a: t.x, source: 'gather', w: t.w1, strides: up, inner: H, outCols: 2 * I, tile: tile.tile }),
    'up (gather, bf16 weight)': () => groupedMatMul({ ...common, a: t.x, source: 'gather', w: t.w1bf16, strides: up, inner: H, outCols: 2 * I, tile: tile.tile }),
    'down (act)': () => groupedMatMul({ ...common, a: t.h, source: 'act', w: t.w2, strides: down, inner: I, outCols: H, tile: tile.tile }),
    'g = dOut·W2 (gather, scaled)': () => groupedMatMul({ ...common, a: t.dOut, source: 'gather', w: t.w2,
      strides: { sE: H * I, sN: 1, sK: I }, inner: H, outCols: I, tile: tile.tile, gradient: true }),
    'dx rows = dh·W1 (rows, scaled)': () => groupedMatMul({ ...common, a: t.dh, source: 'rows', w: t.w1,
      strides: { sE: 2 * I * H, sN: 1, sK: H }, inner: 2 * I, outCols: H, tile: tile.tile, gradient: true }),
    'dW1 = dhᵀ·x': () => groupedWeightGrad({ ...common, l: t.dh, left: 'rows', r: t.x, right: 'gather', P: 2 * I, Q: H,
      outShape: [E, 2 * I, H], outStrides: { oE: 2 * I * H, oP: H, oQ: 1 }, tile: tile.gradTile }),
    'dW2 = (w·dOut)ᵀ·act(h)': () => groupedWeightGrad({ ...common, l: t.dOut, left: 'gather', r: t.h, right: 'act', P: H, Q: I,
      outShape: [E, H, I], outStrides: { oE: H * I, oP: I, oQ: 1 }, tile: tile.gradTile, rowScale: t.rw }),
    ...quantized,
    // split LoRA's expansions as the products' last reduction step (loraTail; f32: a product of its own): PEFT's B [2I, r·E]
    // read with sN = r·E, sK = E in forward, A [r·E, H] with sN = 1, sK = H in backward
    'up + s·u·Bᵀ (gather, bf16 weight, LoRA tail)': () => groupedMatMul({ ...common, a: t.x, source: 'gather', w: t.w1bf16, strides: up,
      inner: H, outCols: 2 * I, tile: tile.tile, loraTail: { a: t.u, w: t.loraB, strides: { sE: 1, sN: LORA_RANK * E, sK: E }, rank: LORA_RANK, alpha: 2 } }),
    'dx rows = dh·W1 + gr·A (rows, scaled, LoRA tail)': () => groupedMatMul({ ...common, a: t.dh, source: 'rows', w: t.w1,
      strides: { sE: 2 * I * H, sN: 1, sK: H }, inner: 2 * I, outCols: H, tile: tile.tile, gradient: true,
      loraTail: { a: t.gr, w: t.loraA, strides: { sE: LORA_RANK * H, sN: 1, sK: H }, rank: LORA_RANK, alpha: 1 } }),
  };
}

/** The rank of the LoRA tails checked (the end-to-end run's). */
const LORA_RANK = 8;

/** `timed`: also time both paths per product (the few-rows sizes are checked only: their products take microseconds) */
async function checkKernels(s: Size, timed = true): Promise<unknown[]> {
  const { T, H, I, E, K } = s;
  const rand = lcg(7);
  const experts = tf.tensor2d(Int32Array.from({ length: T * K }, (_, i) => (Math.floor(rand() * E) + (i % K)) % E), [T, K], 'int32');
  // distinct experts per token are not needed by the products; any ids in [0, E) are valid rows
  const tuning = webgpuMoETuningFor(T * K, E);
  const plan = deviceDispatchPlan(experts as tf.Tensor2D, E, tuning.rowTile);
  const cap = plan.capacity;
  const w1Values = Float32Array.from({ length: E * 2 * I * H }, () => (rand() - 0.5) * 2 / Math.sqrt(H));
  const t = {
    x: tf.randomNormal([T, H], 0, 1, 'float32', 1) as tf.Tensor2D,
    // a mean loss over many tokens: gradients far below f16's smallest normal without scaling
    dOut: tf.randomNormal([T, H], 0, 1e-6, 'float32', 2) as tf.Tensor2D,
    h: tf.randomNormal([cap, 2 * I], 0, 1, 'float32', 3) as tf.Tensor2D,
    dh: tf.randomNormal([cap, 2 * I], 0, 1e-6, 'float32', 4) as tf.Tensor2D,
    w1: tf.tensor3d(w1Values, [E, 2 * I, H]),
    w2: tf.randomNormal([E, H, I], 0, 1 / Math.sqrt(I), 'float32', 5) as tf.Tensor3D,
    rw: tf.randomUniform([T * K], 0, 1, 'float32', 6) as tf.Tensor1D,
    w1bf16: packedExpertWeightFromBits('bf16', [E, 2 * I, H], Uint16Array.from(w1Values, bfloat16Bits)),
    w1Quantized: [] as PackedExpertWeight[],
    plan,
    // u = x·Aᵀ is O(1); gr = s·dh·B a gradient, here 300× dh (a trained B whose columns add up): dh's operand scale
    // alone would carry it past f16's 65504, which the tail's own cap (tScale) must prevent
    u: tf.randomNormal([cap, LORA_RANK], 0, 1, 'float32', 8) as tf.Tensor2D,
    gr: tf.randomNormal([cap, LORA_RANK], 0, 3e-4, 'float32', 9) as tf.Tensor2D,
    loraA: tf.randomNormal([LORA_RANK * E, H], 0, 1 / Math.sqrt(H), 'float32', 10) as tf.Tensor2D,
    loraB: tf.randomNormal([2 * I, LORA_RANK * E], 0, 0.03, 'float32', 11) as tf.Tensor2D,
  };
  const results: unknown[] = [];
  try {
    // quantized on the host from the same values, groups along H (the input of [E, 2I, H])
    const w1Host = tf.tensor3d(w1Values, [E, 2 * I, H]);
    try {
      t.w1Quantized = (['int8', 'int4', 'nf4', 'mxfp4'] as const).map(kind => packExpertWeight(w1Host, kind));
    } finally {
      w1Host.dispose();
    }
    for (const [name, run] of Object.entries(products(s, t))) {
      const entry: Record<string, unknown> = { size: s.name, product: name };
      results.push(entry);
      log(`kernel ${s.name} ${name}`);
      try {
        await compareBothPaths(run, entry);
        entry.withinContract = entry.finite === true && (entry.maxRelError as number) <= CONTRACT;
        errorSummary[`${s.name}: ${name}`] = entry.maxRelError as number;
        // the program this plan should pick: the block's rows (products) or the slab's depth (weight gradients)
        const suffix = name.startsWith('dW') ? `_d${weightGradDepthFor(tuning.rowTile)}` : `_r${subgroupBlockRowsFor(tuning.rowTile)}`;
        const keys = (entry.tcPrograms as { subgroupKeys: string[] }).subgroupKeys;
        // a LoRA tail's product must have taken it into its own reduction
        const ran = keys.some(k => (k.endsWith(suffix) || k.endsWith(`${suffix}_loraTail`)) && (!name.includes('LoRA tail') || k.endsWith('_loraTail')));
        const problems = !tensorCoresAvailable ? [] : [
          ...(entry.withinContract ? [] : [`error ${(entry.maxRelError as number).toExponential(2)} above ${CONTRACT} or not finite`]),
          ...(ran ? [] : [`no subgroup-matrix program with ${suffix}${name.includes('LoRA tail') ? ' and a LoRA tail' : ''} ran (ran: ${keys.join(', ') || 'none'})`]),
        ];
        if (problems.length > 0) {
          entry.failure = problems.join('; ');
          failures.push(`${s.name} ${name}: ${entry.failure}`);
        }
        log(`${problems.length > 0 ? 'FAIL' : tensorCoresAvailable ? 'PASS' : 'f32 only (no tensor cores)'} ${s.name} (row tile ` +
            `${tuning.rowTile}) ${name}: tensor cores vs f32 max rel. error ${(entry.maxRelError as number).toExponential(2)}` +
            ` (${entry.withinContract ? 'within' : 'OUTSIDE'} ${CONTRACT}), ${JSON.stringify(entry.tcPrograms)}` +
            (problems.length > 0 ? ` — ${entry.failure}` : ''));
        for (const on of timed ? [false, true] : []) {
          entry[on ? 'tcMs' : 'f32Ms'] = await withTensorCores(on, () => chainedMs(run, CHAIN));
        }
        takeProgramCounts();
      } catch (err) {
        entry.error = errorText(err);
        errorSummary[`${s.name}: ${name}`] = `error: ${entry.error}`.slice(0, 200);
        if (tensorCoresAvailable) failures.push(`${s.name} ${name}: ${entry.error}`.slice(0, 300));
        log(`FAIL ${s.name} ${name}: ${entry.error}`);
      }
    }
  } finally {
    tf.dispose([experts, t.x, t.dOut, t.h, t.dh, t.w1, t.w2, t.rw, t.u, t.gr, t.loraA, t.loraB, t.w1bf16.packed, ...t.w1Quantized.map(w => w.packed),
      plan.seg, plan.rowOfPair, plan.pairOfRow]);
  }
  return results;
}

/**
 * The composed attention's shape: KV heads (batch × heads; rep 1), query rows S, keys L, head
 * width D. OLMoE-1B-7B at batch 4 × 512 tokens; the harness (Mesa) a small one with whole blocks.
 */
const ATTENTION_SHAPE = harness ? { heads: 4, s: 128, l: 128, d: 64 } : { heads: 64, s: 512, l: 512, d: 128 };

/**
 * The composed attention's six products as its customGrad calls them (batchProduct, the tape off)
 * at ATTENTION_SHAPE, tensor cores (uniform groups) against the f32 path (tfjs's BatchMatMul),
 * each timed on both; then one training pass of scaledDotProductAttention (causal, the kernels off:
 * the composed path both times), O, dq, dk, dv against the f32 path. Operands as in training: q·scale
 * and k unit-variance scores, P a softmax, dO and dS tiny (a mean loss: below f16's normals unscaled).
 */
async function checkAttention(): Promise<unknown[]> {
  const { heads, s, l, d } = ATTENTION_SHAPE;
  const results: unknown[] = [];
  const scaledQ = tf.randomNormal([heads, s, d], 0, 1 / Math.sqrt(d), 'float32', 21) as tf.Tensor3D;
  const k = tf.randomNormal([heads, l, d], 0, 1, 'float32', 22) as tf.Tensor3D;
  const v = tf.randomNormal([heads, l, d], 0, 1, 'float32', 23) as tf.Tensor3D;
  const p = tf.tidy(() => tf.softmax(tf.randomNormal([heads, s, l], 0, 2, 'float32', 24))) as tf.Tensor3D;
  const dO = tf.randomNormal([heads, s, d], 0, 1e-6, 'float32', 25) as tf.Tensor3D;
  const dS = tf.randomNormal([heads, s, l], 0, 1e-7, 'float32', 26) as tf.Tensor3D;
  const none = { transposeA: false, transposeB: false, gradient: 'none' } as const;
  const cases: Array<[string, BatchProductAttrs, tf.Tensor3D, tf.Tensor3D]> = [
    ['scores = q·kᵀ', { ...none, transposeB: true }, scaledQ, k],
    ['value = P·v', none, p, v],
    ['dV = Pᵀ·dO (dO scaled)', { ...none, transposeA: true, gradient: 'b' }, p, dO],
    ['dP = dO·vᵀ (dO scaled)', { ...none, transposeB: true, gradient: 'a' }, dO, v],
    ['dQ = dS·k (dS scaled)', { ...none, gradient: 'a' }, dS, k],
    ['dK = dSᵀ·q (dS scaled)', { ...none, transposeA: true, gradient: 'a' }, dS, scaledQ],
  ];
  try {
    for (const [product, attrs, a, b] of cases) {
      const [m, n, inner] = [attrs.transposeA ? a.shape[2] : a.shape[1], attrs.transposeB ? b.shape[1] : b.shape[2],
        attrs.transposeA ? a.shape[1] : a.shape[2]];
      const entry: Record<string, unknown> = { size: `${heads}×[${m}, ${n}] over ${inner}`, product };
      results.push(entry);
      const label = `attention ${product}`;
      log(label);
      const run = () => batchProduct(a, b, attrs.transposeA, attrs.transposeB, attrs.gradient);
      try {
        await compareBothPaths(run, entry);
        entry.withinContract = entry.finite === true && (entry.maxRelError as number) <= CONTRACT;
        errorSummary[label] = entry.maxRelError as number;
        // the program the route picks: a uniform-groups MatMul with its block rows, or weight gradient with its depth
        const route = batchProductTensorCoreRoute(attrs, heads, m, n, inner);
        const suffix = 'program' in route ? (route.program === 'matMul' ? `_r${route.blockRows}_uniformGroups` : `_d${route.depth}_uniformGroups`) : '(none)';
        const keys = (entry.tcPrograms as { subgroupKeys: string[] }).subgroupKeys;
        const ran = keys.some(key => key.endsWith(suffix));
        const problems = !tensorCoresAvailable ? [] : [
          ...(entry.withinContract ? [] : [`error ${(entry.maxRelError as number).toExponential(2)} above ${CONTRACT} or not finite`]),
          ...(ran ? [] : [`no subgroup-matrix program ending ${suffix} ran (ran: ${keys.join(', ') || 'none'})`]),
        ];
        for (const on of [false, true]) entry[on ? 'tcMs' : 'f32Ms'] = await withTensorCores(on, () => chainedMs(run, CHAIN));
        takeProgramCounts();
        if (problems.length > 0) {
          entry.failure = problems.join('; ');
          failures.push(`${label}: ${entry.failure}`);
        }
        const tflops = (ms: number) => (2 * heads * m * n * inner / (ms * 1e-3) / 1e12).toFixed(1);
        log(`${label}: ${problems.length > 0 ? 'FAIL' : tensorCoresAvailable ? 'PASS' : 'f32 only (no tensor cores)'}, ${entry.size}, ` +
            `tensor cores vs f32 max rel. error ${(entry.maxRelError as number).toExponential(2)} (contract ${CONTRACT}), ` +
            `f32 ${(entry.f32Ms as number).toFixed(3)} ms (${tflops(entry.f32Ms as number)} TFLOP/s), ` +
            `tc ${(entry.tcMs as number).toFixed(3)} ms (${tflops(entry.tcMs as number)} TFLOP/s), programs ${keys.join(', ') || 'none'}` +
            (problems.length > 0 ? ` — ${entry.failure}` : ''));
      } catch (err) {
        entry.error = errorText(err);
        errorSummary[label] = `error: ${entry.error}`.slice(0, 200);
        if (tensorCoresAvailable) failures.push(`${label}: ${entry.error}`.slice(0, 300));
        log(`FAIL ${label}: ${entry.error}`);
      }
    }
    results.push(await checkComposedAttentionPass());
  } finally {
    tf.dispose([scaledQ, k, v, p, dO, dS]);
  }
  return results;
}

/**
 * One training pass of the composed attention (the kernels off) at ATTENTION_SHAPE, causal, with
 * the tensor-core products against without: O, dq, dk, dv (the loss Σ O ⊙ w, w at 1e-6: a mean loss's
 * cotangent).
 */
async function checkComposedAttentionPass(): Promise<Record<string, unknown>> {
  const { heads, s, d } = ATTENTION_SHAPE;
  const label = 'attention composed training pass (O, dq, dk, dv)';
  const entry: Record<string, unknown> = { product: label };
  log(label);
  const q = tf.randomNormal([heads, s, d], 0, 1, 'float32', 31) as tf.Tensor3D;
  const k = tf.randomNormal([heads, s, d], 0, 1, 'float32', 32) as tf.Tensor3D;
  const v = tf.randomNormal([heads, s, d], 0, 1, 'float32', 33) as tf.Tensor3D;
  const w = tf.randomNormal([heads, s, d], 0, 1e-6, 'float32', 34) as tf.Tensor3D;
  const mask = causalMask(s, null);
  const pass = async () => {
    const { value, grads } = tf.valueAndGrads((a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) =>
      tf.sum(tf.mul(scaledDotProductAttention(a as tf.Tensor3D, b as tf.Tensor3D, c as tf.Tensor3D, mask, 1 / Math.sqrt(d)), w)))([q, k, v]);
    // O from a forward pass of its own: the loss is a scalar
    const o = scaledDotProductAttention(q, k, v, mask, 1 / Math.sqrt(d));
    const data = await Promise.all([o, ...grads].map(t => t.data() as Promise<Float32Array>));
    tf.dispose([value, o, ...grads]);
    return data;
  };
  try {
    await withEnvFlag(ATTENTION_KERNEL_FLAG, false, async () => {
      takeProgramCounts();
      const f32 = await withTensorCores(false, pass);
      entry.f32Programs = takeProgramCounts();
      const tc = await withTensorCores(true, pass);
      entry.tcPrograms = takeProgramCounts();
      entry.tcVsF32 = Object.fromEntries(['o', 'dq', 'dk', 'dv'].map((n, i) => [n, maxRelativeError(tc[i], f32[i])]));
      entry.finite = tc.every(t => t.every(Number.isFinite));
    });
    const worst = Math.max(...Object.values(entry.tcVsF32 as Record<string, number>));
    const uniform = (entry.tcPrograms as { subgroupKeys: string[] }).subgroupKeys.filter(key => key.endsWith('_uniformGroups'));
    // six products in the training pass, two in the forward: at least one program of each form ran
    const bothForms = uniform.some(key => key.startsWith('moeSubgroupMatMul')) && uniform.some(key => key.startsWith('moeSubgroupWeightGrad'));
    entry.withinContract = entry.finite === true && worst <= CONTRACT;
    errorSummary[label] = worst;
    const problems = !tensorCoresAvailable ? [] : [
      ...(entry.withinContract ? [] : [`error ${worst.toExponential(2)} above ${CONTRACT} or not finite`]),
      ...(bothForms ? [] : [`not both uniform-groups programs ran (ran: ${uniform.join(', ') || 'none'})`]),
    ];
    if (problems.length > 0) {
      entry.failure = problems.join('; ');
      failures.push(`${label}: ${entry.failure}`);
    }
    log(`${label}: ${problems.length > 0 ? 'FAIL' : tensorCoresAvailable ? 'PASS' : 'f32 only (no tensor cores)'}, tensor cores vs f32 ` +
        `${Object.entries(entry.tcVsF32 as Record<string, number>).map(([n, e]) => `${n} ${e.toExponential(2)}`).join(' ')} (contract ${CONTRACT}), ` +
        `${JSON.stringify(entry.tcPrograms)}${problems.length > 0 ? ` — ${entry.failure}` : ''}`);
  } catch (err) {
    entry.error = errorText(err);
    errorSummary[label] = `error: ${entry.error}`.slice(0, 200);
    if (tensorCoresAvailable) failures.push(`${label}: ${entry.error}`.slice(0, 300));
    log(`FAIL ${label}: ${entry.error}`);
  } finally {
    tf.dispose([q, k, v, w, mask]);
  }
  return entry;
}

interface DenseSize { name: string; rows: number; out: number; in: number }
/**
 * The dense projections of the end-to-end OLMoE step (batch 4 × 512 tokens): q/k/v/o [2048, 2048]
 * and the untied LM head [50304, 2048] (at one loss chunk's 333 rows too), cheap first; the harness (Mesa) runs small stand-ins.
 */
const DENSE_SIZES: DenseSize[] = harness
  ? [{ name: 'proj (harness)', rows: 200, out: 256, in: 192 }, { name: 'head (harness)', rows: 130, out: 640, in: 128 }]
  : [{ name: 'proj 2048', rows: 2048, out: 2048, in: 2048 },
    // the chunked loss's 333 rows: its dy·W ([333, 2048], 48 blocks of 128) runs 64-row blocks
    { name: 'LM head 333 rows', rows: 333, out: 50304, in: 2048 },
    { name: 'LM head', rows: 2048, out: 50304, in: 2048 }];
/** dense cases that failed where tensor cores are available (exit code 3) */
const denseFailures: string[] = [];

/**
 * The dense products through denseWeightMatMul as the layers call them, x·Wᵀ and dx = dy·W (dy a
 * gradient: tiny, scaled on tensor cores), float32 W and packed bf16 W: tensor cores against the f32
 * path (whatever runs with the flag off: our grouped program, or tfjs's product for the f32 dy·W
 * under the default WEBGPU_MOE_DENSE_PROGRAM), the subgroup-matrix programs counted, both timed.
 */
async function checkDense(tensorCoresAvailable: boolean): Promise<unknown[]> {
  const results: unknown[] = [];
  for (const s of DENSE_SIZES) {
    if (left() < 10_000) {
      results.push({ size: s.name, skipped: 'out of time budget' });
      if (tensorCoresAvailable) denseFailures.push(`dense ${s.name}: not run (out of time budget)`);
      continue;
    }
    const rand = lcg(11);
    // uniform in ±√(3/in): unit-variance outputs; made on the host, where bf16 packing reads them
    const values = new Float32Array(s.out * s.in);
    for (let i = 0; i < values.length; i++) values[i] = (rand() * 2 - 1) * Math.sqrt(3 / s.in);
    const w = tf.tensor2d(values, [s.out, s.in]);
    const wBf16 = packedDenseWeightFromBits('bf16', [s.out, s.in], encodeBFloat16(values));
    const x = tf.randomNormal([s.rows, s.in], 0, 1, 'float32', 1) as tf.Tensor2D;
    // a mean loss's gradient: far below f16's smallest normal without the per-tensor scale
    const dy = tf.randomNormal([s.rows, s.out], 0, 1e-6, 'float32', 2) as tf.Tensor2D;
    const flops = 2 * s.rows * s.out * s.in;
    const chain = harness ? 2 : flops > 1e11 ? 5 : 20;
    // loraLinear's LoRA tails (r 8): down = s·x·Aᵀ is O(1), B trained away from 0; g = s·dy·B a gradient 300× dy (a
    // trained B), past f16 at dy's operand scale without the tail's own cap
    const down = tf.randomNormal([s.rows, 8], 0, 1, 'float32', 3) as tf.Tensor2D;
    const loraB = tf.randomNormal([s.out, 8], 0, 0.03, 'float32', 4) as tf.Tensor2D;
    const g = tf.randomNormal([s.rows, 8], 0, 3e-4, 'float32', 5) as tf.Tensor2D;
    const loraA = tf.randomNormal([8, s.in], 0, 1 / Math.sqrt(s.in), 'float32', 6) as tf.Tensor2D;
    const cases: Array<[string, () => tf.Tensor]> = [
      ['x·Wᵀ, f32 W', () => denseWeightMatMul(x, w, true, null)],
      ['x·Wᵀ, bf16 W', () => denseWeightMatMul(x, wBf16, true, null)],
      ['dy·W, f32 W (scaled)', () => denseWeightMatMul(dy, w, false, null, 'gradient')],
      ['dy·W, bf16 W (scaled)', () => denseWeightMatMul(dy, wBf16, false, null, 'gradient')],
      // the projections only: the LM head carries no adapter
      ...(s.name.startsWith('proj') ? [
        ['x·Wᵀ + down·Bᵀ, bf16 W (LoRA tail)', () => denseWeightMatMul(x, wBf16, true, null, 'activation', { a: down, b: loraB, transposeB: true })],
        ['dy·W + g·A, bf16 W (scaled, LoRA tail)', () => denseWeightMatMul(dy, wBf16, false, null, 'gradient', { a: g, b: loraA, transposeB: false })],
      ] as Array<[string, () => tf.Tensor]> : []),
    ];
    try {
      for (const [product, run] of cases) {
        const entry: Record<string, unknown> = { size: s.name, product, shape: `[${s.rows}, ${product.startsWith('dy') ? s.out : s.in}] · W[${s.out}, ${s.in}]${product.startsWith('dy') ? '' : 'ᵀ'}` };
        results.push(entry);
        const label = `dense ${s.name} ${product}`;
        try {
          await compareBothPaths(run, entry);
          const subgroupPrograms = (entry.tcPrograms as { subgroupMatrix: number }).subgroupMatrix;
          // a LoRA tail must have gone into the product's own reduction; the LM head's dy·W (few blocks, a
          // reduction of the vocabulary) splits K
          const keys = (entry.tcPrograms as { subgroupKeys: string[] }).subgroupKeys;
          const tailFolded = !product.includes('LoRA tail') || keys.some(k => k.endsWith('_loraTail'));
          const splitWhereDue = !(s.name.startsWith('LM head 333') && product.startsWith('dy')) || keys.some(k => k.endsWith('_splitK'));
          entry.withinContract = entry.finite === true && (entry.maxRelError as number) <= CONTRACT && subgroupPrograms > 0 && tailFolded &&
              splitWhereDue;
          errorSummary[label] = entry.maxRelError as number;
          for (const on of [false, true]) {
            entry[on ? 'tcMs' : 'f32Ms'] = await withTensorCores(on, () => chainedMs(run, chain));
          }
          takeProgramCounts();
          const tflops = (ms: number) => (flops / (ms * 1e-3) / 1e12).toFixed(1);
          const verdict = !tensorCoresAvailable ? 'tensor cores unavailable (both paths f32)' : entry.withinContract ? 'PASS' : 'FAIL';
          log(`${label}: ${verdict}, tensor cores vs f32 max rel. error ${(entry.maxRelError as number).toExponential(2)} (contract ${CONTRACT}), ` +
              `subgroup-matrix programs ${subgroupPrograms}, f32 ${(entry.f32Ms as number).toFixed(2)} ms (${tflops(entry.f32Ms as number)} TFLOP/s), ` +
              `tc ${(entry.tcMs as number).toFixed(2)} ms (${tflops(entry.tcMs as number)} TFLOP/s)`);
          if (tensorCoresAvailable && !entry.withinContract) denseFailures.push(label);
        } catch (err) {
          entry.error = errorText(err);
          errorSummary[label] = `error: ${entry.error}`.slice(0, 200);
          log(`${label}: ${tensorCoresAvailable ? 'FAIL' : 'error'}: ${entry.error}`);
          if (tensorCoresAvailable) denseFailures.push(label);
        }
      }
    } finally {
      tf.dispose([w, wBf16.packed, x, dy, down, loraB, g, loraA]);
    }
  }
  return results;
}

/**
 * The qwen3_moe fixture's block (transformers' weights and input): out, dx and the gradients of
 * the expert weights and the router with the tensor cores against the f32 kernels, and out / dx
 * against transformers' own (golden) values. Read asynchronously: webgpu has no dataSync in Node.
 */
async function checkFixture(): Promise<Record<string, unknown>> {
  const dir = 'spec/fixtures/hf/qwen3_moe';
  const config = await readJSONFile(join(dir, 'config.json'), 'fixture config') as HFConfig;
  const meta = await readJSONFile(join(dir, 'golden.json'), 'fixture golden.json') as { block: string };
  const golden = await readSafetensorsFile(join(dir, 'golden.safetensors'));
  const model = await readSafetensorsFile(join(dir, 'model.safetensors'));
  const weights = await loadMoEBlockWeights(model, config, blockLayerIndex(meta.block));
  const blockConfig = moeBlockConfigFromHF(config);
  const xGolden = await golden.tensor('block.x');
  const H = xGolden.shape[xGolden.rank - 1];
  const x = tf.reshape(xGolden, [-1, H]) as tf.Tensor2D;
  const g = tf.reshape(await golden.tensor('block.g'), [-1, H]) as tf.Tensor2D;
  const names = ['out', 'dx', 'grad.router', 'grad.gateUp', 'grad.down'];
  const run = async (): Promise<Float32Array[]> => {
    const f = (xIn: tf.Tensor, router: tf.Tensor, gateUp: tf.Tensor, down: tf.Tensor) => {
      const { out, routing } = moeBlock(xIn as tf.Tensor2D, {
        ...weights, router: { ...weights.router, weight: router as tf.Tensor2D },
        experts: { ...weights.experts, gateUp: gateUp as tf.Tensor3D, down: down as tf.Tensor3D },
      }, blockConfig, { trainExpertWeights: true });
      tf.dispose([routing.experts]);
      return out;
    };
    const { value, grads } = tf.valueAndGrads(f)(
        [x, weights.router.weight, weights.experts.gateUp as tf.Tensor3D, weights.experts.down as tf.Tensor3D], g);
    const data = await Promise.all([value, ...grads].map(t => t.data() as Promise<Float32Array>));
    tf.dispose([value, ...grads]);
    return data;
  };
  const out: Record<string, unknown> = { tokens: x.shape[0], hidden: H };
  try {
    takeProgramCounts();
    const f32 = await withTensorCores(false, run);
    out.f32Programs = takeProgramCounts();
    const tc = await withTensorCores(true, run);
    out.tcPrograms = takeProgramCounts();
    const goldenOut = await golden.tensor('block.out');
    const goldenDx = await golden.tensor('block.dx');
    const [gOut, gDx] = await Promise.all([goldenOut.data(), goldenDx.data()]);
    tf.dispose([goldenOut, goldenDx]);
    out.tcVsF32 = Object.fromEntries(names.map((n, i) => [n, maxRelativeError(tc[i], f32[i])]));
    out.f32VsTransformers = { out: maxRelativeError(f32[0], gOut), dx: maxRelativeError(f32[1], gDx) };
    out.tcVsTransformers = { out: maxRelativeError(tc[0], gOut), dx: maxRelativeError(tc[1], gDx) };
    out.withinContract = Object.values(out.tcVsF32 as Record<string, number>).every(e => e <= CONTRACT);
  } finally {
    tf.dispose([xGolden, x, g, weights.router.weight, weights.experts.gateUp as tf.Tensor, weights.experts.down as tf.Tensor]);
  }
  return out;
}

async function timeBlocks(): Promise<unknown[]> {
  const rows: unknown[] = [];
  for (const config of ['M1', 'Q']) {
    for (const lora of ['none', 'split'] as const) {
      for (const on of [false, true]) {
        const entry: Record<string, unknown> = { config, lora, path: on ? 'tensorCores' : 'f32' };
        rows.push(entry);
        if (left() < 15_000) { entry.skipped = 'out of time budget'; continue; }
        log(`block ${config} ${lora} ${entry.path}`);
        const p = makeProblem(config, lora);
        try {
          const step = stepOf(p, lora);
          takeProgramCounts();
          const samples = await withTensorCores(on, () => timeSteps(step, 2, config === 'Q' ? 5 : 10));
          const ms = median(samples.total);
          entry.medianMs = ms;
          entry.enqueueMs = median(samples.enqueue);
          entry.tflops = expertFlops(BENCH_CONFIGS[config], lora) / (ms * 1e-3) / 1e12;
          entry.programs = takeProgramCounts();
          log(`block ${config} ${lora} ${entry.path}: ${ms.toFixed(2)} ms`);
        } catch (err) {
          entry.error = errorText(err);
        } finally {
          tf.dispose([p.x, p.g, p.router, p.w1, p.w2, ...p.lora]);
        }
      }
    }
  }
  return rows;
}

async function main(): Promise<void> {
  let adapter: DawnAdapterReport;
  try {
    adapter = await setupDawnWebGPU({ tensorCores: 'auto' });
  } catch (err) {
    report.fatal = errorText(err);
    finish(1);
  }
  report.adapter = adapter;
  log(`adapter ${adapter.vendor} ${adapter.description}: tensor cores ${adapter.tensorCores}`);
  await tf.setBackend('webgpu');
  // a shader that does not compile shows up here (tfjs does not throw for it), not as a wrong number only
  const deviceErrors: string[] = [];
  report.deviceErrors = deviceErrors;
  report.tcVsF32 = errorSummary;
  report.subgroupProgramAudit = subgroupAudit;
  const device = (tf.backend() as unknown as { device: GPUDevice }).device;
  device.addEventListener('uncapturederror', event => {
    if (deviceErrors.length < 20) deviceErrors.push(String((event as GPUUncapturedErrorEvent).error?.message ?? event).slice(0, 2000));
  });
  registerMoEKernels('webgpu');
  setWebGPUMoETuning(undefined);
  if (process.env.TC_CHECK_TF_FLAGS) {
    report.tfFlags = parseTfFlags(process.env.TC_CHECK_TF_FLAGS);
    setTfFlags(report.tfFlags as Record<string, number | boolean | string>);
  }
  recordPrograms();
  tensorCoresAvailable = adapter.tensorCores === 'available';
  if (!tensorCoresAvailable) {
    report.skipped = `no tensor-core path on this adapter: ${adapter.tensorCores}`;
    if (!harness) finish(0);
  }
  // the LoRA tails are checked whatever their flag's default (their cases fail where no tail ran)
  const withTails = <T>(fn: () => Promise<T>) => withEnvFlag(TC_LORA_TAIL_FLAG, true, fn);
  const fewRows = FEW_ROWS_SIZES.map(s => [`kernels_${s.name}`, () => checkKernels(s, false)] as [string, () => Promise<unknown>]);
  const steps: Array<[string, () => Promise<unknown>]> = harness && !tensorCoresAvailable
    ? [['kernels', () => withTails(() => checkKernels(SIZES[0]))], ...fewRows, ['attention', () => withEnvFlag(TC_BATCH_PRODUCTS_FLAG, true, checkAttention)],
      ['dense', () => withTails(() => checkDense(false))], ['fixture', checkFixture]]
    : [
      // the small products' exactness first (the 128-, 64- and 32-row blocks), the attention's batched
      // products, the dense projections (cheap shapes first), then the block timings (v6's speed), then
      // the rest as time allows
      ['kernels', () => withTails(() => checkKernels(SIZES[0]))],
      ...fewRows,
      ['attention', () => withEnvFlag(TC_BATCH_PRODUCTS_FLAG, true, checkAttention)],
      ['dense', () => withTails(() => checkDense(tensorCoresAvailable))],
      ['blocks', timeBlocks],
      ['fixture', checkFixture],
      ...SIZES.slice(1).map((s, i) => [`kernels${i + 1}`, () => checkKernels(s)] as [string, () => Promise<unknown>]),
    ];
  const only = process.env.TC_CHECK_STEPS?.split(',');
  const unknownSteps = only?.filter(name => !steps.some(([step]) => step === name)) ?? [];
  if (unknownSteps.length > 0) {
    report.fatal = `TC_CHECK_STEPS: unknown ${unknownSteps.join(', ')}; known: ${steps.map(([step]) => step).join(', ')}`;
    finish(1);
  }
  for (const [name, run] of steps.filter(([step]) => only === undefined || only.includes(step))) {
    if (left() < 5_000) { report[name] = { skipped: 'out of time budget' }; continue; }
    try {
      report[name] = await run();
    } catch (err) {
      report[name] = { error: errorText(err) };
    }
    log(`${name} done`);
  }
  report.subgroupPrograms = [...subgroupKeysSeen];
  report.denseFailures = denseFailures;
  log(failures.length > 0 ? `FAILED: ${failures.length} product(s):\n  ${failures.join('\n  ')}` : 'no product FAILed');
  finish(failures.length > 0 ? 1 : denseFailures.length > 0 ? 3 : 0);
}

setTimeout(() => {
  report.watchdog = `stopped at ${TOTAL_BUDGET_MS + 5000} ms; the report holds what finished`;
  report.denseFailures = denseFailures;
  finish(!report.adapter || failures.length > 0 ? 1 : denseFailures.length > 0 ? 3 : 0);
}, TOTAL_BUDGET_MS + 5000).unref();
main().catch(err => {
  // the check did not finish: never a pass
  report.fatal = errorText(err);
  report.denseFailures = denseFailures;
  finish(1);
});
