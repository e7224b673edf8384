/**
 * The step profile (step_profile.ts) of ours.ts on a narrow OLMoE-shaped random checkpoint
 * (load_bench's narrowOlmoeConfig: hidden 512, 32 experts top-8, vocab 32000), small enough for
 * Mesa's software webgpu; prints one JSON line per layer count with the counts per phase. GPU
 * dispatch and read counts carry over to the real shape (per layer, plus the LM head and loss);
 * Mesa's times do not.
 *   EGL_PLATFORM=surfaceless npx tsx bench/e2e/profile_narrow.ts --layers 1,2 --seq 64 [--composed-adam on]
 * --composed-adam on: Adam as composed tfjs ops, not MoEAdamUpdate (the counts before that kernel).
 * --grouped-adam off: Adam per variable (MoEAdamUpdate, 2 dispatches each), not K variables per dispatch in place.
 * --attention auto|kernels|composed: attention as the package picks (auto: MoEAttention from 64 MiB of probabilities),
 *   always as MoEAttention, or always as composed tfjs ops (the counts before those kernels).
 * --detail on: also the kernels by name and the programs by class, per phase (which op to cut next).
 * --dense-program forward|grouped|tfjs: which float32 dense products run MoEDenseMatMul on webgpu (WEBGPU_MOE_DENSE_PROGRAM;
 *   default forward, as the package; tfjs: the counts before that kernel).
 * --dense-dtype stored: attention q/k/v/o and the embedding held as their bf16 words (loadHFCheckpoint's denseDtype; default float32).
 * --record-repeats N: the record-only step N times; recordOnlyMs is the median wall ms per phase and
 *   recordOnlyCpuMs the median CPU ms (process.cpuUsage; on a shared host the steadier of the two).
 *   Issue 15's host time per layer is layer 2's minus layer 1's.
 * --cpu-profile on: the timed steps (--steps, default 1) under V8's sampler; prints the largest self and
 *   inclusive ms per function (cpu_profile.ts) as cpuProfile.
 */
import * as tf from '@tensorflow/tfjs-core';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { DenseDtype } from '../../src/io/hf_checkpoint_core.js';
import { DENSE_PROGRAM_FLAG } from '../../src/ops/packed.js';
import { ADAM_GROUPED_FLAG, ADAM_UPDATE_KERNEL_FLAG } from '../../src/train/adam_update.js';
import { commandLineFlag, setAttentionPath, setUpNarrowWebGPU, writeNarrowCheckpoint, writeNarrowData } from './narrow_setup.js';
import { runOurs } from './ours.js';
import type { StepProfile } from './step_profile.js';

await setUpNarrowWebGPU();
tf.env().set(ADAM_UPDATE_KERNEL_FLAG, commandLineFlag('composed-adam', 'off') !== 'on');
tf.env().set(ADAM_GROUPED_FLAG, commandLineFlag('grouped-adam', 'on') !== 'off');
setAttentionPath(commandLineFlag('attention', 'auto'));
tf.env().set(DENSE_PROGRAM_FLAG, commandLineFlag('dense-program', 'forward'));
const seq = Number(commandLineFlag('seq', '64'));
const detail = commandLineFlag('detail', 'off') === 'on';
const shape = commandLineFlag('shape', 'olmoe');
const denseDtype = commandLineFlag('dense-dtype', 'float32') as DenseDtype;
const recordRepeats = Number(commandLineFlag('record-repeats', '1'));
const cpuProfile = commandLineFlag('cpu-profile', 'off') === 'on';
const steps = Number(commandLineFlag('steps', '1'));
const dir = await mkdtemp(join(tmpdir(), 'profile-narrow-'));
try {
  const data = await writeNarrowData(dir);
  for (const layers of commandLineFlag('layers', '1,2').split(',').map(Number)) {
    const model = await writeNarrowCheckpoint(dir, layers, shape);
    const out = join(dir, `out-${layers}`);
    const result = await runOurs({ model, data, out, seq, warmup: 1, steps, denseDtype, saveAdapter: false, profile: true, profileRecordRepeats: recordRepeats, cpuProfile, log: () => {} });
    const profile = JSON.parse(await readFile(result.profileFile!, 'utf8')) as StepProfile;
    const median = (xs: number[]) => { const s = [...xs].sort((a, b) => a - b); return s.length % 2 ? s[s.length >> 1] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2; };
    const recordOnlyCpuMs = profile.recordOnlySamples && Object.fromEntries(Object.entries(profile.recordOnlySamples.cpuMs).map(([phase, xs]) => [phase, median(xs)]));
    const cpuSummary = cpuProfile ? JSON.parse(await readFile(join(out, 'cpu-profile.json'), 'utf8')) as { totalMs: number; self: unknown[]; inclusive: unknown[] } : undefined;
    const counts = Object.fromEntries(Object.entries(profile.phases).map(([phase, c]) => [phase, { kernels: c.kernels, dispatches: c.dispatches, reads: c.reads, mapReads: c.mapReads, submits: c.submits }]));
    process.stdout.write(`${JSON.stringify({ shape, denseDtype, layers, seq, variables: result.params, losses: result.losses, counts, total: profile.total, recordOnlyMs: profile.recordOnlyMs,
      ...(recordOnlyCpuMs ? { recordOnlyCpuMs, recordOnlySamples: profile.recordOnlySamples } : {}),
      ...(cpuSummary ? { cpuProfile: { totalMs: cpuSummary.totalMs, self: cpuSummary.self.slice(0, 40), inclusive: cpuSummary.inclusive.slice(0, 60) } } : {}),
      ...(detail ? { kernelCounts: profile.kernelCounts, programCounts: profile.programCounts } : {}) })}\n`);
    await rm(model, { recursive: true, force: true });
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
process.exit(0);
