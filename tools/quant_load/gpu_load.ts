/**
 * Issue 14/15 on the GPU machine: loadHFCheckpoint(dir, {expertDtype}) of a random bf16 checkpoint
 * of OLMoE-1B-7B's shapes (src/bench/load_bench.ts, 16 layers by default: 13.9 GB written to
 * `--dir`, default os.tmpdir()), 'stored' and each of `--kinds` round-robin `--repeat` times; one
 * JSON line per load, then each one's fastest time and its ratio to the fastest 'stored' load
 * (target: nf4 ≤ 2×), and how many experts the worker threads quantized. Static imports, so
 * esbuild can bundle it (tools/quant_load/on_device.sh); tools/quant_load/profile.ts is the local
 * version with the per-stage times.
 *   npx tsx tools/quant_load/gpu_load.ts --backend cpu --layers 2 --kinds nf4
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { selectBenchBackend } from '../../src/bench/backend.js';
import { olmoeConfig, writeRandomBF16Checkpoint } from '../../src/bench/load_bench.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import type { ExpertDtype } from '../../src/io/hf_block.js';
import { defaultQuantizeThreads } from '../../src/io/quantize_pool.js';

const { values: args } = parseArgs({
  options: {
    layers: { type: 'string', default: '16' },
    kinds: { type: 'string', default: 'nf4,int4' },
    repeat: { type: 'string', default: '2' },
    backend: { type: 'string', default: 'webgpu' },
    dir: { type: 'string', default: tmpdir() },
  },
});
const print = (o: object) => process.stdout.write(`${JSON.stringify(o)}\n`);
const release = await selectBenchBackend(args.backend!);
const dir = await mkdtemp(join(args.dir!, 'quant-load-'));
try {
  let t = performance.now();
  const written = await writeRandomBF16Checkpoint(dir, olmoeConfig(Number(args.layers)), { seed: 1 });
  print({ layers: Number(args.layers), checkpointGB: Number((written.totalBytes / 1e9).toFixed(2)),
    writeSeconds: Number(((performance.now() - t) / 1e3).toFixed(1)), backend: args.backend, workers: defaultQuantizeThreads() });
  const best = new Map<string, number>();
  for (let r = 0; r < Number(args.repeat); r++) {
    for (const expertDtype of ['stored', ...args.kinds!.split(',')]) {
      t = performance.now();
      const model = await loadHFCheckpoint(dir, { expertDtype: expertDtype as ExpertDtype });
      const seconds = (performance.now() - t) / 1e3;
      model.dispose();
      best.set(expertDtype, Math.min(best.get(expertDtype) ?? Infinity, seconds));
      print({ load: expertDtype, round: r, seconds: Number(seconds.toFixed(2)) });
    }
  }
  for (const [expertDtype, seconds] of best) {
    print({ fastestLoad: expertDtype, seconds: Number(seconds.toFixed(2)), overStored: Number((seconds / best.get('stored')!).toFixed(2)) });
  }
} finally {
  await rm(dir, { recursive: true, force: true });
  release();
}
