/**
 * Where the time of quantizing experts on load goes (issue 14/15), on this machine's cpu backend:
 * a random bf16 checkpoint of OLMoE-1B-7B's shapes (src/bench/load_bench.ts; `--layers`, default
 * 2) is written to os.tmpdir(), then
 *   1. one expert's stages, timed apart (median of 5 over experts 0 … 4 of layer 0): reading its
 *      gate/up/down halves, decoding them to float32, quantizing each kind, the copy into the stack;
 *   2. whole loads, loadHFCheckpoint(dir, {expertDtype}) for 'stored', each quantized kind and
 *      'stored' again (the page cache is warm for every load after the first), and each kind's
 *      time over the first 'stored' one.
 * `--root DIR` imports the package from DIR/src (an older checkout, for a before/after); `--kinds`
 * limits the loads. One JSON line per figure.
 *   npx tsx tools/quant_load/profile.ts --layers 2
 *   npx tsx tools/quant_load/profile.ts --layers 2 --root /tmp/old-checkout
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const { values: args } = parseArgs({
  options: {
    layers: { type: 'string', default: '2' },
    root: { type: 'string', default: resolve(import.meta.dirname, '../..') },
    kinds: { type: 'string', default: 'int8,int4,nf4,mxfp4' },
    backend: { type: 'string', default: 'cpu' },
  },
});
const root = resolve(args.root!);
const src = (path: string) => import(join(root, 'src', path));
const { olmoeConfig, writeRandomBF16Checkpoint } = await src('bench/load_bench.ts');
const { loadHFCheckpoint } = await src('io/hf_checkpoint.ts');
const { readSafetensorsFile } = await src('io/safetensors.ts');
const { quantizedLayout, quantizeExpertInto } = await src('ops/quantized.ts');
const { decodeBFloat16 } = await src('util/half.ts');
const { selectBenchBackend } = await src('bench/backend.ts');
const release = await selectBenchBackend(args.backend!);

const print = (o: object) => process.stdout.write(`${JSON.stringify(o)}\n`);
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const time = async (f: () => unknown) => { const t = performance.now(); await f(); return performance.now() - t; };

const dir = await mkdtemp(join(tmpdir(), 'quant-load-'));
try {
  const layers = Number(args.layers);
  const config = olmoeConfig(layers);
  const written = await writeRandomBF16Checkpoint(dir, config, { seed: 1 });
  print({ root, layers, checkpointGB: Number((written.totalBytes / 1e9).toFixed(2)), shards: written.shards.length });

  // 1. one expert's stages (layer 0): gate_up is [2I, H] = [2048, 2048], down [H, I] = [2048, 1024]
  const file = await readSafetensorsFile(join(dir, written.shards[0]));
  const H = config.hidden_size, I = config.intermediate_size;
  const name = (e: number, p: string) => `model.layers.0.mlp.experts.${e}.${p}_proj.weight`;
  const stages: Record<string, number[]> = { read: [], decode: [] };
  const kinds = args.kinds!.split(',');
  for (const k of kinds) stages[`quantize ${k}`] = [];
  stages.copyToStack = [];
  for (let e = 0; e < 5; e++) {
    let halves: Uint16Array[] = [];
    stages.read.push(await time(async () => { halves = await Promise.all(['gate', 'up', 'down'].map(p => file.halfBits(name(e, p)))); }));
    let f: Float32Array[] = [];
    stages.decode.push(await time(() => { f = halves.map(h => decodeBFloat16(h)); }));
    const gateUp = new Float32Array(2 * I * H);
    gateUp.set(f[0], 0);
    gateUp.set(f[1], I * H);
    for (const k of kinds) {
      const lg = quantizedLayout(k, [64, 2 * I, H], 2);
      const ld = quantizedLayout(k, [64, H, I], 2);
      const wg = new Int32Array(lg.wordsPerExpert), wd = new Int32Array(ld.wordsPerExpert);
      stages[`quantize ${k}`].push(await time(() => { quantizeExpertInto(lg, gateUp, 0, wg, 0); quantizeExpertInto(ld, f[2], 0, wd, 0); }));
    }
    const stack = new Int32Array(8 * 2 * I * H / 8);
    const words = new Int32Array(2 * I * H / 8);
    stages.copyToStack.push(await time(() => stack.set(words, 0)));
  }
  const perExpert = 3 * I * H;
  for (const [stage, ms] of Object.entries(stages)) {
    const m = median(ms);
    print({ stage, msPerExpert: Number(m.toFixed(1)), mParamsPerS: Number((perExpert / m / 1e3).toFixed(1)) });
  }

  // 2. whole loads
  const loads: Array<[string, number]> = [];
  for (const expertDtype of ['stored', ...kinds, 'stored']) {
    let model: { dispose(): void } | null = null;
    const ms = await time(async () => { model = await loadHFCheckpoint(dir, { expertDtype }); });
    model!.dispose();
    loads.push([expertDtype, ms]);
    print({ load: expertDtype, seconds: Number((ms / 1e3).toFixed(2)), overStored: Number((ms / loads[0][1]).toFixed(2)) });
  }
} finally {
  await rm(dir, { recursive: true, force: true });
  release();
}
