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
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { followPeakBuffers } from '../../bench/e2e/peak_buffers.js';
import { commandLineFlag, setUpNarrowWebGPU } from '../../bench/e2e/narrow_setup.js';
import { causalMask } from '../../src/layers/attention.js';
import { ATTENTION_PROGRAM_FLAG, type AttentionProgramKind } from '../../src/backends/webgpu/programs/tiled_attention_program.js';
import { ATTENTION_KERNEL_FLAG, ATTENTION_KERNEL_MIN_BYTES_FLAG, scaledDotProductAttention } from '../../src/ops/attention_core.js';
import { maxRelativeError } from '../../src/util/numeric.js';

await setUpNarrowWebGPU();
const seq = Number(commandLineFlag('seq', '2048'));
const heads = Number(commandLineFlag('heads', '16'));
const kvHeads = Number(commandLineFlag('kv-heads', String(heads)));
const headDim = Number(commandLineFlag('head-dim', '128'));
const reps = Number(commandLineFlag('reps', '5'));
const scale = 1 / Math.sqrt(headDim);

const q = tf.randomNormal([heads, seq, headDim], 0, 1, 'float32', 1) as tf.Tensor3D;
const k = tf.randomNormal([kvHeads, seq, headDim], 0, 1, 'float32', 2) as tf.Tensor3D;
const v = tf.randomNormal([kvHeads, seq, headDim], 0, 1, 'float32', 3) as tf.Tensor3D;
const w = tf.randomNormal([heads, seq, headDim], 0, 1, 'float32', 4) as tf.Tensor3D;
const mask = causalMask(seq, null);
const lossOf = (a: tf.Tensor, b: tf.Tensor, d: tf.Tensor) =>
  tf.sum(tf.mul(scaledDotProductAttention(a as tf.Tensor3D, b as tf.Tensor3D, d as tf.Tensor3D, mask, scale), w));

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

/** `programs`: the kernels with those programs, or null: the composed path. */
async function measure(programs: AttentionProgramKind | null) {
  tf.env().set(ATTENTION_KERNEL_FLAG, programs !== null);
  tf.env().set(ATTENTION_PROGRAM_FLAG, programs ?? 'tiled');
  tf.env().set(ATTENTION_KERNEL_MIN_BYTES_FLAG, 0);   // the kernels at any size, to compare
  const forwardMs = await time(() => [scaledDotProductAttention(q, k, v, mask, scale)]);
  const trainMs = await time(() => { const r = tf.valueAndGrads(lossOf)([q, k, v]); return [r.grads[2], r.grads[0], r.grads[1], r.value]; });
  const follow = followPeakBuffers();
  const r = tf.valueAndGrads(lossOf)([q, k, v]);
  const o = scaledDotProductAttention(q, k, v, mask, scale);
  const values = [await o.data(), ...await Promise.all(r.grads.map(g => g.data()))];
  const peakMiB = Math.round(follow.peak().usedBytes / 2 ** 20);
  follow.stop();
  tf.dispose([o, r.value, ...r.grads]);
  return { forwardMs, trainMs, peakMiB, values };
}

const tiled = await measure('tiled');
const rows = await measure('rows');
const composed = await measure(null);
const errorsOf = (m: typeof tiled) =>
  Object.fromEntries(['o', 'dq', 'dk', 'dv'].map((name, i) => [name, maxRelativeError(m.values[i], composed.values[i])]));
const strip = ({ values: _, ...rest }: typeof tiled) => rest;
process.stdout.write(`${JSON.stringify({
  backend: tf.getBackend(), seq, heads, kvHeads, headDim, reps,
  tiled: strip(tiled), rows: strip(rows), composed: strip(composed), errors: { tiled: errorsOf(tiled), rows: errorsOf(rows) },
})}\n`);
process.exit(0);
