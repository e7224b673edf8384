/**
 * tfjs-webgpu's memory in a training run of ours.ts on narrow OLMoE-shaped random checkpoints
 * (load_bench's narrowOlmoeConfig), small enough for Mesa's software webgpu: one JSON line per
 * (layer count, pool bound) with tf.memory() after the load and after each step, the pool's free
 * bytes by kind and the peaks in use and allocated inside each step (ours.ts memoryStages). What
 * grows per layer carries over to the real shape; the free bytes beyond the peak in use are what
 * limitWebGPUBufferPool bounds.
 * --gradient-checkpointing off,on runs each (layers, bound) both ways (default off).
 *   EGL_PLATFORM=surfaceless npx tsx bench/e2e/memory_narrow.ts --layers 1,2 --seq 64 --expert-dtype nf4 --pool-limit-mb none,0
 * `--shape qwen3`: Qwen3-30B-A3B's layout narrowed (128 experts top-8, narrow_setup.ts). `--peak-buffers N`:
 * also the N largest groups of buffers alive at the run's highest point (peak_buffers.ts), by the program
 * that made them and their size. `--dense-dtype stored`: attention q/k/v/o and the embedding held as their bf16
 * words (loadHFCheckpoint's denseDtype; default float32).
 * `--attention auto|kernels|composed`: attention as the package picks (MoEAttention, which holds no [B·nh, S, L]
 * probabilities for backward, from 64 MiB of them), always as MoEAttention, or always composed.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { releaseFreeWebGPUBuffers } from '../../src/backends/webgpu/buffer_pool.js';
import type { ExpertDtype } from '../../src/io/hf_block.js';
import type { DenseDtype } from '../../src/io/hf_checkpoint_core.js';
import { commandLineFlag, setAttentionPath, setUpNarrowWebGPU, writeNarrowCheckpoint, writeNarrowData } from './narrow_setup.js';
import { assertOneOf } from '../../src/ops/validate.js';
import { runOurs } from './ours.js';
import { followPeakBuffers } from './peak_buffers.js';

await setUpNarrowWebGPU();
setAttentionPath(commandLineFlag('attention', 'auto'));
const seq = Number(commandLineFlag('seq', '64'));
const shape = commandLineFlag('shape', 'olmoe');
const steps = Number(commandLineFlag('steps', '2'));
const peakGroups = Number(commandLineFlag('peak-buffers', '0'));
const expertDtype = commandLineFlag('expert-dtype', 'nf4') as ExpertDtype;
const denseDtype = commandLineFlag('dense-dtype', 'float32') as DenseDtype;
const checkpointingRuns = commandLineFlag('gradient-checkpointing', 'off').split(',');
for (const c of checkpointingRuns) assertOneOf('memory_narrow', '--gradient-checkpointing', c, ['on', 'off']);
const mib = (bytes: number | null) => bytes === null ? null : Math.round(bytes / 2 ** 20 * 10) / 10;
const dir = await mkdtemp(join(tmpdir(), 'memory-narrow-'));
try {
  const data = await writeNarrowData(dir);
  for (const layers of commandLineFlag('layers', '1,2').split(',').map(Number)) {
    const model = await writeNarrowCheckpoint(dir, layers, shape);
    for (const bound of commandLineFlag('pool-limit-mb', 'none').split(',')) for (const checkpointing of checkpointingRuns) {
      const poolLimitBytes = bound === 'none' ? undefined : Number(bound) * 2 ** 20;
      const follow = peakGroups > 0 ? followPeakBuffers() : undefined;
      const result = await runOurs({
        model, data, out: join(dir, 'out'), seq, warmup: 1, steps, expertDtype, denseDtype, saveAdapter: false, poolLimitBytes, log: () => {},
        gradientCheckpointing: checkpointing === 'on',
      });
      const stages = result.memoryStages.map(s => ({
        stage: s.stage, inUse: mib(s.numBytesInGPU), allocated: mib(s.numBytesAllocatedInGPU), peakInUse: mib(s.peakUsedBytes),
        peakAllocated: mib(s.peakAllocatedBytes), free: Object.fromEntries(Object.entries(s.freeBytes ?? {}).map(([k, v]) => [k, mib(v)])),
      }));
      const peak = follow?.peak();
      follow?.stop();
      const atPeak = peak && { usedMiB: mib(peak.usedBytes), groups: peak.groups.slice(0, peakGroups).map(g => `${g.count} × ${g.bytes} B = ${mib(g.totalBytes)} MiB by ${g.label}`) };
      process.stdout.write(`${JSON.stringify({ shape, layers, seq, expertDtype, denseDtype, poolLimitMiB: bound, gradientCheckpointing: checkpointing, losses: result.losses, stepSeconds: result.stepSeconds, stages, atPeak })}\n`);
      // the next run starts from an empty pool, as a fresh process would
      releaseFreeWebGPUBuffers();
    }
    await rm(model, { recursive: true, force: true });
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
process.exit(0);
