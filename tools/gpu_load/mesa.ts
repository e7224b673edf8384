/**
 * The load figures of docs/benchmarks.md ("Straight to the device") on this machine: the load bench
 * (src/bench/load_bench.ts) on narrowOlmoeConfig(4), 275 MB of bf16, each backend given on the
 * command line, both expert dtypes, one JSON line per load. Mesa's webgpu needs EGL_PLATFORM:
 *   EGL_PLATFORM=surfaceless npx tsx tools/gpu_load/mesa.ts cpu,webgpu
 */
import { benchLoad, narrowOlmoeConfig } from '../../src/bench/load_bench.js';

const mb = (b: number) => Number((b / 1e6).toFixed(1));
for (const backend of (process.argv[2] ?? 'cpu,webgpu').split(',')) {
  const cases = await benchLoad({ config: narrowOlmoeConfig(4), backend });
  for (const c of cases) {
    process.stdout.write(`${JSON.stringify({
      backend: c.backend, experts: c.expertDtype, checkpointMB: mb(c.checkpointBytes), numMB: mb(c.numBytes),
      largestMB: mb(c.largestWeightBytes), loadPeakRssMB: mb(c.loadPeakBytes), peakHostMB: mb(c.peakHostBytes),
      leftOnHostMB: mb(c.hostValueBytesAfter), seconds: Number(c.seconds.toFixed(1)),
    })}\n`);
  }
}
