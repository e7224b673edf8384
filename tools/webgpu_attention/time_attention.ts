/**
 * scaledDotProductAttention on webgpu at a real shape, the MoEAttention kernels' two programs
 * (MOE_ATTENTION_PROGRAM 'tiled': TiledAttentionProgram; 'rows': AttentionProgram, a thread per
 * row) against the composed path (ATTENTION_KERNEL_FLAG off): milliseconds of the forward pass and
 * of forward + backward (the gradients of Σ O ⊙ w for q, k, v), the peak of GPU buffers in use
 * during one training pass, and how far each program's O, dq, dk, dv are from the composed path's
 * (max |a − b| / max |b|). One JSON line: {tiled, rows, composed, errors: {tiled, rows}}. For the
 * lead's GPU run (issue 15): Mesa's times mean nothing; there it checks the script.
 *   npx tsx tools/webgpu_attention/time_attention.ts --seq 2048 --heads 16 --kv-heads 16 --head-dim 128 --reps 5
 *   (OLMoE-1B-7B: 16 heads of 128; Qwen3-30B-A3B: --heads 32 --kv-heads 4)
 * Mesa: EGL_PLATFORM=surfaceless npx tsx tools/webgpu_attention/time_attention.ts --seq 128 --heads 4 --kv-heads 2 --head-dim 64 --reps 1
 *
 * `--tensor-cores on` (issues 13 and 15): the tiled programs on tensor cores
 * (SubgroupMatrixAttentionProgram) at the shapes of `--shapes` (default olmoe-b4-s512,olmoe-s2048,qwen3-s2048;
 * 'tiny' for Mesa), causal. Per shape one line: ms per training pass (and forward) of the composed
 * path, the tiled f32 programs and the tiled tensor-core programs; the tensor-core O, dq, dk, dv
 * against the composed f32 path (max |a − b| / max |b|, limit 1e-2: beyond it the line says FAIL
 * and the tool exits 1); and the subgroup-matrix programs that ran in one training pass (stats,
 * forward, gradQ, gradV must; dK runs on the tiled f32 program, or FAIL). Then a second line per
 * shape, "composed, tensor-core products": the composed path with its six batched products on
 * tensor cores (MoEBatchProduct's uniform-groups programs), its ms per training pass (forward), its
 * O, dq, dk, dv against the composed f32 path (limit 1e-2) and its uniform-groups programs in one
 * training pass and one forward (4 + 2 MatMul, 2 weight gradients; fewer: FAIL). The cotangent w is scaled to 1e-6, as a mean loss's is (dO scaling).
 * Where the adapter has no tensor cores (Mesa) it says so in one line and times the f32 paths.
 *   source .gpu/on-device.sh && node .gpu/bundle/time_attention.js --tensor-cores on --reps 5
 *   Mesa: EGL_PLATFORM=surfaceless npx tsx tools/webgpu_attention/time_attention.ts --tensor-cores on --shapes tiny --reps 1
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { followPeakBuffers } from '../../bench/e2e/peak_buffers.js';
import { commandLineFlag, setUpNarrowWebGPU } from '../../bench/e2e/narrow_setup.js';
import { registerMoEKernels } from '../../src/backends/register_all_kernels.js';
import { setupDawnWebGPU } from '../../src/backends/webgpu/dawn.js';
import { TENSOR_CORES_FLAG } from '../../src/backends/webgpu/tensor_cores.js';
import { causalMask } from '../../src/layers/attention.js';
import { ATTENTION_PROGRAM_FLAG, type AttentionProgramKind } from '../../src/backends/webgpu/programs/tiled_attention_program.js';
import { ATTENTION_KERNEL_FLAG, ATTENTION_KERNEL_MIN_BYTES_FLAG, scaledDotProductAttention } from '../../src/ops/attention_core.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { withEnvFlag, withShaderKeys } from '../webgpu_tc/scoped.js';
import { TC_BATCH_PRODUCTS_FLAG } from '../../src/backends/webgpu/kernels.js';

const tensorCores = commandLineFlag('tensor-cores', 'off');
if (tensorCores !== 'on' && tensorCores !== 'off') throw new Error(`--tensor-cores must be 'on' or 'off' but got '${tensorCores}'`);
const reps = Number(commandLineFlag('reps', '5'));

/** Mean ms of `reps` runs of fn (after one warm-up), each ended by reading one value back. */
async function time(fn: () => tf.Tensor[]): Promise<number> {
  let total = 0;
  for (let i = 0; i <= reps; i++) {
    const start = performance.now();
    const out = fn();
    await out[0].data();
    if (i > 0) total += performance.now() - start;
    tf.dispose(out);
  }
  return total / reps;
}

/** One attention problem: inputs, the loss Σ O ⊙ w, and how to run it on each path. */
function problem(batchHeads: number, kvHeads: number, seq: number, headDim: number, cotangent: number) {
  const scale = 1 / Math.sqrt(headDim);
  const q = tf.randomNormal([batchHeads, seq, headDim], 0, 1, 'float32', 1) as tf.Tensor3D;
  const k = tf.randomNormal([kvHeads, seq, headDim], 0, 1, 'float32', 2) as tf.Tensor3D;
  const v = tf.randomNormal([kvHeads, seq, headDim], 0, 1, 'float32', 3) as tf.Tensor3D;
  const w = tf.randomNormal([batchHeads, seq, headDim], 0, cotangent, 'float32', 4) as tf.Tensor3D;
  const mask = causalMask(seq, null);
  const lossOf = (a: tf.Tensor, b: tf.Tensor, d: tf.Tensor) =>
    tf.sum(tf.mul(scaledDotProductAttention(a as tf.Tensor3D, b as tf.Tensor3D, d as tf.Tensor3D, mask, scale), w));
  return {
    forward: () => scaledDotProductAttention(q, k, v, mask, scale),
    train: () => tf.valueAndGrads(lossOf)([q, k, v]),
    dispose: () => tf.dispose([q, k, v, w, mask]),
  };
}

/** The path: the kernels with those programs (tensor cores or not), or null: the composed path. */
function choosePath(programs: AttentionProgramKind | null, onTensorCores = false): void {
  tf.env().set(ATTENTION_KERNEL_FLAG, programs !== null);
  tf.env().set(ATTENTION_PROGRAM_FLAG, programs ?? 'tiled');
  tf.env().set(ATTENTION_KERNEL_MIN_BYTES_FLAG, 0);   // the kernels at any size, to compare
  tf.env().set(TENSOR_CORES_FLAG, onTensorCores);
}

/** Times forward and training passes, then one training pass and one forward for the values (and the peak of GPU buffers there). */
async function measure(p: ReturnType<typeof problem>) {
  const forwardMs = await time(() => [p.forward()]);
  const trainMs = await time(() => { const r = p.train(); return [r.grads[2], r.grads[0], r.grads[1], r.value]; });
  let values: Array<Float32Array | Int32Array | Uint8Array> = [];
  const follow = followPeakBuffers();
  const keys = await withShaderKeys(async recorded => {
    const r = p.train();
    const o = p.forward();
    values = [await o.data(), ...await Promise.all(r.grads.map(g => g.data()))];
    tf.dispose([o, r.value, ...r.grads]);
    return recorded;
  });
  const peakMiB = Math.round(follow.peak().usedBytes / 2 ** 20);
  follow.stop();
  return { forwardMs, trainMs, peakMiB, values, keys };
}

const SHAPES: Record<string, { batchHeads: number; kvHeads: number; seq: number; headDim: number; about: string }> = {
  'olmoe-b4-s512': { batchHeads: 4 * 16, kvHeads: 4 * 16, seq: 512, headDim: 128, about: 'OLMoE batch 4 × 16 heads, S 512, d 128' },
  'olmoe-s2048': { batchHeads: 16, kvHeads: 16, seq: 2048, headDim: 128, about: 'OLMoE batch 1 × 16 heads, S 2048, d 128' },
  'qwen3-s2048': { batchHeads: 32, kvHeads: 4, seq: 2048, headDim: 128, about: 'Qwen3 batch 1 × 32 q heads on 4 KV heads, S 2048, d 128' },
  tiny: { batchHeads: 4, kvHeads: 2, seq: 96, headDim: 64, about: 'for Mesa: 4 q heads on 2 KV heads, S 96, d 64' },
};
/** The largest tensor-core error against the composed f32 path that passes. */
const TENSOR_CORE_LIMIT = 1e-2;
/** The subgroup-matrix passes the kernels run (dK runs on the tiled f32 program: SubgroupMatrixAttentionProgram has none). */
const PASSES = ['stats', 'forward', 'gradQ', 'gradV'];
/**
 * The composed path's uniform-groups programs in measure's training pass and forward: MatMul for
 * q·kᵀ and P·v (twice each), dO·vᵀ and dS·k; weight gradients for Pᵀ·dO and dSᵀ·q.
 */
const COMPOSED_PRODUCTS = { moeSubgroupMatMul: 6, moeSubgroupWeightGrad: 2 };

async function tensorCoreRun(): Promise<void> {
  const adapter = await setupDawnWebGPU({ tensorCores: 'auto' });
  if (!(await tf.setBackend('webgpu'))) throw new Error('webgpu could not be set up');
  registerMoEKernels('webgpu');
  const available = adapter.tensorCores === 'available';
  console.log(`adapter ${adapter.vendor} ${adapter.description}: tensor cores ${available ? 'available' : `unavailable (${adapter.tensorCores}): ` +
      'only the f32 paths are timed'}`);
  const names = commandLineFlag('shapes', 'olmoe-b4-s512,olmoe-s2048,qwen3-s2048').split(',');
  const unknown = names.filter(n => !(n in SHAPES));
  if (unknown.length > 0) throw new Error(`--shapes: unknown ${unknown.join(', ')}; known: ${Object.keys(SHAPES).join(', ')}`);
  let failed = false;
  const report: Record<string, unknown>[] = [];
  for (const name of names) {
    const shape = SHAPES[name];
    const p = problem(shape.batchHeads, shape.kvHeads, shape.seq, shape.headDim, 1e-6);
    choosePath(null);
    const composed = await measure(p);
    choosePath('tiled');
    const tiled = await measure(p);
    const errorsOf = (m: typeof composed) => Object.fromEntries(['o', 'dq', 'dk', 'dv'].map((n, i) => [n, maxRelativeError(m.values[i], composed.values[i])]));
    const fmt = (e: Record<string, number>) => Object.entries(e).map(([n, x]) => `${n} ${x.toExponential(1)}`).join(' ');
    const entry: Record<string, unknown> = {
      shape: name, composed: { forwardMs: composed.forwardMs, trainMs: composed.trainMs },
      tiledF32: { forwardMs: tiled.forwardMs, trainMs: tiled.trainMs, errors: errorsOf(tiled) },
    };
    let line = `${name} (${shape.about}, causal): ms per training pass (forward): composed ${composed.trainMs.toFixed(1)} ` +
        `(${composed.forwardMs.toFixed(1)}), tiled f32 ${tiled.trainMs.toFixed(1)} (${tiled.forwardMs.toFixed(1)})`;
    if (available) {
      choosePath('tiled', true);
      const tc = await measure(p);
      const errors = errorsOf(tc);
      const worst = Math.max(...Object.values(errors));
      const counts = PASSES.map(pass => tc.keys.filter(k => k.startsWith(`moeSubgroupAttention_${pass}_`)).length);
      const ran = counts.every(c => c > 0);
      const ok = worst <= TENSOR_CORE_LIMIT && ran;
      failed ||= !ok;
      entry.tiledTensorCores = { forwardMs: tc.forwardMs, trainMs: tc.trainMs, errors, programs: Object.fromEntries(PASSES.map((pass, i) => [pass, counts[i]])) };
      line += `, tiled tensor cores ${tc.trainMs.toFixed(1)} (${tc.forwardMs.toFixed(1)}); tensor-core error vs composed f32 ` +
          `${fmt(errors)} (limit ${TENSOR_CORE_LIMIT}); subgroup-matrix programs in one pass ${PASSES.map((pass, i) => `${pass}×${counts[i]}`).join(' ')}` +
          ` ${ok ? 'OK' : `FAIL${ran ? '' : ' (a subgroup-matrix pass did not run)'}`}`;
    } else {
      line += `; tiled f32 error vs composed ${fmt(errorsOf(tiled))}; tensor cores unavailable`;
    }
    console.log(line);
    if (available) {
      // the composed path again, its batched products on tensor cores (batchProduct's uniform groups)
      choosePath(null, true);
      const products = await withEnvFlag(TC_BATCH_PRODUCTS_FLAG, true, () => measure(p));
      const errors = errorsOf(products);
      const worst = Math.max(...Object.values(errors));
      const uniform = products.keys.filter(k => k.endsWith('_uniformGroups'));
      const counts = Object.entries(COMPOSED_PRODUCTS).map(([program, want]) => [program, uniform.filter(k => k.startsWith(`${program}_`)).length, want] as const);
      const ran = counts.every(([, n, want]) => n >= want);
      const ok = worst <= TENSOR_CORE_LIMIT && ran;
      failed ||= !ok;
      entry.composedTensorCoreProducts = { forwardMs: products.forwardMs, trainMs: products.trainMs, peakMiB: products.peakMiB, errors,
        programs: Object.fromEntries(counts.map(([program, n]) => [program, n])) };
      console.log(`${name} composed, tensor-core products: ms per training pass (forward) ${products.trainMs.toFixed(1)} ` +
          `(${products.forwardMs.toFixed(1)}) against composed f32 ${composed.trainMs.toFixed(1)} (${composed.forwardMs.toFixed(1)}); ` +
          `error vs composed f32 ${fmt(errors)} (limit ${TENSOR_CORE_LIMIT}); uniform-groups programs in one pass + forward ` +
          `${counts.map(([program, n, want]) => `${program.replace('moeSubgroup', '')}×${n} (want ${want})`).join(' ')} ` +
          `${ok ? 'OK' : `FAIL${ran ? '' : ' (a product did not run on tensor cores)'}`}`);
    } else {
      console.log(`${name} composed, tensor-core products: tensor cores unavailable`);
    }
    report.push(entry);
    p.dispose();
  }
  console.log(JSON.stringify({ tensorCores: available, reps, shapes: report }));
  process.exit(failed ? 1 : 0);
}

/** The f32 programs at one shape (`--seq` ...), as before `--tensor-cores`. */
async function f32Run(): Promise<void> {
  await setUpNarrowWebGPU();
  const seq = Number(commandLineFlag('seq', '2048'));
  const heads = Number(commandLineFlag('heads', '16'));
  const kvHeads = Number(commandLineFlag('kv-heads', String(heads)));
  const headDim = Number(commandLineFlag('head-dim', '128'));
  const p = problem(heads, kvHeads, seq, headDim, 1);
  const withPeak = async (programs: AttentionProgramKind | null) => {
    choosePath(programs);
    const { keys: _, ...rest } = await measure(p);
    return rest;
  };
  const tiled = await withPeak('tiled');
  const rows = await withPeak('rows');
  const composed = await withPeak(null);
  const errorsOf = (m: typeof tiled) =>
    Object.fromEntries(['o', 'dq', 'dk', 'dv'].map((name, i) => [name, maxRelativeError(m.values[i], composed.values[i])]));
  const strip = ({ values: _, ...rest }: typeof tiled) => rest;
  process.stdout.write(`${JSON.stringify({
    backend: tf.getBackend(), seq, heads, kvHeads, headDim, reps,
    tiled: strip(tiled), rows: strip(rows), composed: strip(composed), errors: { tiled: errorsOf(tiled), rows: errorsOf(rows) },
  })}\n`);
  process.exit(0);
}

await (tensorCores === 'on' ? tensorCoreRun() : f32Run());
