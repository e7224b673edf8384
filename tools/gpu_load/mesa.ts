/**
 * The load figures of docs/benchmarks.md ("Straight to the device") on this machine: the load bench
 * (src/bench/load_bench.ts) on each backend given on the command line, one JSON line per load.
 * Mesa's webgpu needs EGL_PLATFORM:
 *   EGL_PLATFORM=surfaceless npx tsx tools/gpu_load/mesa.ts cpu,webgpu [narrow|olmoe-widths]
 * narrow (the default): narrowOlmoeConfig(4), 275 MB of bf16, both expert dtypes.
 * olmoe-widths: OLMoE-1B-7B's widths (hidden 2048, 1024 per expert: 8 MiB gate/up and 4 MiB down an
 * expert, so the weights cross the 16 MiB upload buffers) with 2 layers, 16 experts and a vocabulary of
 * 30000 (its largest tensor, 123 MB, within Mesa's 128 MiB binding limit), 716 MB of bf16, experts and dense
 * weights stored (the dense ones as their 16-bit words).
 */
import { benchLoad, narrowOlmoeConfig, olmoeConfig, type LoadBenchOptions } from '../../src/bench/load_bench.js';

const CASES: Record<string, Pick<LoadBenchOptions, 'config' | 'expertDtypes' | 'denseDtype'>> = {
  narrow: { config: narrowOlmoeConfig(4) },
  'olmoe-widths': { config: { ...olmoeConfig(2), num_experts: 16, vocab_size: 30000 }, expertDtypes: ['stored'], denseDtype: 'stored' },
};

const name = process.argv[3] ?? 'narrow';
const chosen = CASES[name];
if (chosen === undefined) throw new Error(`tools/gpu_load/mesa.ts: the case must be one of ${Object.keys(CASES).join(', ')} but got '${name}'`);
const mb = (b: number) => Number((b / 1e6).toFixed(1));
for (const backend of (process.argv[2] ?? 'cpu,webgpu').split(',')) {
  const cases = await benchLoad({ ...chosen, backend });
  for (const c of cases) {
    process.stdout.write(`${JSON.stringify({
      backend: c.backend, experts: c.expertDtype, checkpointMB: mb(c.checkpointBytes), numMB: mb(c.numBytes),
      largestMB: mb(c.largestWeightBytes), loadPeakRssMB: mb(c.loadPeakBytes), peakHostMB: mb(c.peakHostBytes),
      leftOnHostMB: mb(c.hostValueBytesAfter), seconds: Number(c.seconds.toFixed(2)),
    })}\n`);
  }
}
