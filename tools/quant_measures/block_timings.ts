/**
 * Issue 14's per-format timings: one MoE block forward + backward (the fused kernel, LoRA) with
 * the routed experts held as each storage, against float32, on one backend. The machine this runs
 * on is shared, so the storages are interleaved: each round runs every storage once (a fresh
 * benchMoEBlock run: `--iters` timed steps after one warm-up), in an order that rotates and
 * reverses from round to round, and the table gives the medians over rounds of each run's median,
 * plus the median over rounds of storage / float32 within the round (the paired ratio, in which a
 * slow phase of the machine cancels out).
 *
 *   npx tsx tools/quant_measures/block_timings.ts [--backend wasm|cpu|webgpu] [--config S] [--lora split]
 *       [--rounds 5] [--iters 3] [--storages float32,bf16,int8,int4,nf4,mxfp4] [--wasm-weight-cache BYTES] [--json]
 *
 * webgpu on Mesa: EGL_PLATFORM=surfaceless before the command. The load average at the start and
 * at the end is printed with the table.
 */
import * as tf from '@tensorflow/tfjs-core';
import { loadavg } from 'node:os';
import { parseArgs } from 'node:util';
import { selectBenchBackend } from '../../src/bench/backend.js';
import {
  BENCH_EXPERT_STORAGES, benchMoEBlock, median, type BenchExpertStorage, type BenchLoRA,
} from '../../src/bench/block_bench.js';
import { WEIGHT_CACHE_BYTES_FLAG } from '../../src/backends/wasm/moe_kernels.js';
import { MoELoraError } from '../../src/errors.js';

const { values } = parseArgs({
  options: {
    backend: { type: 'string', default: 'wasm' },
    config: { type: 'string', default: 'S' },
    lora: { type: 'string', default: 'split' },
    rounds: { type: 'string', default: '5' },
    iters: { type: 'string', default: '3' },
    storages: { type: 'string', default: 'float32,bf16,int8,int4,nf4,mxfp4' },
    json: { type: 'boolean', default: false },
    // wasm: the bytes of XNNPACK-packed frozen experts kept between steps (0: every step decodes again)
    'wasm-weight-cache': { type: 'string' },
  },
});
const storages = values.storages.split(',') as BenchExpertStorage[];
const rounds = Number(values.rounds);
function quit(message: string): never {
  console.error(message);
  process.exit(1);
}
const bad = storages.find(s => !(BENCH_EXPERT_STORAGES as readonly string[]).includes(s));
if (bad !== undefined) quit(`--storages: '${bad}' is not one of ${BENCH_EXPERT_STORAGES.join(', ')}`);
if (storages[0] !== 'float32') quit(`--storages must start with float32 (the baseline) but starts with '${storages[0]}'`);
if (!Number.isInteger(rounds) || rounds < 1) quit(`--rounds must be an integer >= 1 but got ${values.rounds}`);

const release = await selectBenchBackend(values.backend).catch((e: Error) => quit(e.message));
if (values['wasm-weight-cache'] !== undefined) {
  const bytes = Number(values['wasm-weight-cache']);
  if (values.backend !== 'wasm') quit(`--wasm-weight-cache is for --backend wasm, not ${values.backend}`);
  if (!Number.isInteger(bytes) || bytes < 0) quit(`--wasm-weight-cache must be an integer >= 0 but got ${values['wasm-weight-cache']}`);
  tf.env().set(WEIGHT_CACHE_BYTES_FLAG, bytes);
}
const cache = values.backend === 'wasm' ? `, wasm weight cache ${tf.env().getNumber(WEIGHT_CACHE_BYTES_FLAG)} B` : '';
const loadBefore = loadavg();
const ms = new Map<BenchExpertStorage, number[]>(storages.map(s => [s, []]));
const cpuMs = new Map<BenchExpertStorage, number[]>(storages.map(s => [s, []]));
const gflops = new Map<BenchExpertStorage, number[]>(storages.map(s => [s, []]));
const peak = new Map<BenchExpertStorage, number>();
const ratios = new Map<BenchExpertStorage, number[]>(storages.map(s => [s, []]));
const cpuRatios = new Map<BenchExpertStorage, number[]>(storages.map(s => [s, []]));
try {
  for (let round = 0; round < rounds; round++) {
    const shift = round % storages.length;
    let order = [...storages.slice(shift), ...storages.slice(0, shift)];
    if (round % 2 === 1) order = order.reverse();
    const thisRound = new Map<BenchExpertStorage, number>();
    const thisRoundCpu = new Map<BenchExpertStorage, number>();
    for (const storage of order) {
      const [c] = await benchMoEBlock({
        config: values.config, lora: [values.lora as BenchLoRA], iters: Number(values.iters), warmup: 1,
        reference: false, expertStorage: storage, allowAnyBackend: true,
      });
      ms.get(storage)!.push(c.fused.ms);
      cpuMs.get(storage)!.push(c.fused.cpuMs);
      gflops.get(storage)!.push(c.fused.gflops);
      peak.set(storage, c.fused.peakBytes);
      thisRound.set(storage, c.fused.ms);
      thisRoundCpu.set(storage, c.fused.cpuMs);
      process.stderr.write(`round ${round + 1}/${rounds} ${storage}: ${c.fused.ms.toFixed(1)} ms\n`);
    }
    for (const s of storages) {
      ratios.get(s)!.push(thisRound.get(s)! / thisRound.get('float32')!);
      cpuRatios.get(s)!.push(thisRoundCpu.get(s)! / thisRoundCpu.get('float32')!);
    }
  }
} catch (e) {
  if (!(e instanceof MoELoraError)) throw e;
  quit(e.message);
} finally {
  release();
}
const loadAfter = loadavg();
const rows = storages.map(s => ({
  storage: s, ms: median(ms.get(s)!), vsFloat32: median(ratios.get(s)!), cpuMs: median(cpuMs.get(s)!), cpuVsFloat32: median(cpuRatios.get(s)!),
  gflops: median(gflops.get(s)!), peakMiB: peak.get(s)! / 2 ** 20, samples: ms.get(s)!,
}));
const load = (l: number[]) => l.map(x => x.toFixed(2)).join(' ');
if (values.json) {
  console.log(JSON.stringify({ backend: values.backend, config: values.config, lora: values.lora, rounds, iters: Number(values.iters),
    weightCacheBytes: values.backend === 'wasm' ? tf.env().getNumber(WEIGHT_CACHE_BYTES_FLAG) : null, loadBefore, loadAfter, rows }, null, 2));
} else {
  console.log(`config ${values.config}, ${values.backend}, LoRA ${values.lora}, fused kernel; ${rounds} rounds of ` +
      `${values.iters} timed steps per storage${cache}; load average ${load(loadBefore)} → ${load(loadAfter)}`);
  console.log('| experts | ms (median) | vs float32 (paired) | CPU ms | CPU vs float32 (paired) | GFLOP/s | peak MiB |');
  console.log('|---|---|---|---|---|---|---|');
  for (const r of rows) {
    console.log(`| ${r.storage} | ${r.ms.toFixed(1)} | ${r.vsFloat32.toFixed(2)}× | ${r.cpuMs.toFixed(1)} | ${r.cpuVsFloat32.toFixed(2)}× | ` +
        `${r.gflops.toFixed(2)} | ${r.peakMiB.toFixed(1)} |`);
  }
}
