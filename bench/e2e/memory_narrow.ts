/**
 * tfjs-webgpu's memory in a training run of ours.ts on narrow OLMoE-shaped random checkpoints
 * (load_bench's narrowOlmoeConfig), small enough for Mesa's software webgpu: one JSON line per
 * (layer count, pool bound) with tf.memory() after the load and after each step, the pool's free
 * bytes by kind and the peaks in use and allocated inside each step (ours.ts memoryStages). What
 * grows per layer carries over to the real shape; the free bytes beyond the peak in use are what
 * limitWebGPUBufferPool bounds.
 * --gradient-checkpointing off,on runs each (layers, bound) both ways (default off).
 *   EGL_PLATFORM=surfaceless npx tsx bench/e2e/memory_narrow.ts --layers 1,2 --seq 64 --expert-dtype nf4 --pool-limit-mb none,0
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { releaseFreeWebGPUBuffers } from '../../src/backends/webgpu/buffer_pool.js';
import type { ExpertDtype } from '../../src/io/hf_block.js';
import { commandLineFlag, setUpNarrowWebGPU, writeNarrowCheckpoint, writeNarrowData } from './narrow_setup.js';
import { assertOneOf } from '../../src/ops/validate.js';
import { runOurs } from './ours.js';

await setUpNarrowWebGPU();
const seq = Number(commandLineFlag('seq', '64'));
const steps = Number(commandLineFlag('steps', '2'));
const expertDtype = commandLineFlag('expert-dtype', 'nf4') as ExpertDtype;
const checkpointingRuns = commandLineFlag('gradient-checkpointing', 'off').split(',');
for (const c of checkpointingRuns) assertOneOf('memory_narrow', '--gradient-checkpointing', c, ['on', 'off']);
const mib = (bytes: number | null) => bytes === null ? null : Math.round(bytes / 2 ** 20 * 10) / 10;
const dir = await mkdtemp(join(tmpdir(), 'memory-narrow-'));
try {
  const data = await writeNarrowData(dir);
  for (const layers of commandLineFlag('layers', '1,2').split(',').map(Number)) {
    const model = await writeNarrowCheckpoint(dir, layers);
    for (const bound of commandLineFlag('pool-limit-mb', 'none').split(',')) for (const checkpointing of checkpointingRuns) {
      const poolLimitBytes = bound === 'none' ? undefined : Number(bound) * 2 ** 20;
      const result = await runOurs({
        model, data, out: join(dir, 'out'), seq, warmup: 1, steps, expertDtype, saveAdapter: false, poolLimitBytes, log: () => {},
        gradientCheckpointing: checkpointing === 'on',
      });
      const stages = result.memoryStages.map(s => ({
        stage: s.stage, inUse: mib(s.numBytesInGPU), allocated: mib(s.numBytesAllocatedInGPU), peakInUse: mib(s.peakUsedBytes),
        peakAllocated: mib(s.peakAllocatedBytes), free: Object.fromEntries(Object.entries(s.freeBytes ?? {}).map(([k, v]) => [k, mib(v)])),
      }));
      process.stdout.write(`${JSON.stringify({ layers, seq, expertDtype, poolLimitMiB: bound, gradientCheckpointing: checkpointing, losses: result.losses, stepSeconds: result.stepSeconds, stages })}\n`);
      // the next run starts from an empty pool, as a fresh process would
      releaseFreeWebGPUBuffers();
    }
    await rm(model, { recursive: true, force: true });
  }
} finally {
  await rm(dir, { recursive: true, force: true });
}
process.exit(0);
