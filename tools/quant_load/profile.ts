/**
 * Where the time of quantizing experts on load goes (issue 14/15), on this machine's cpu backend:
 * a random bf16 checkpoint of OLMoE-1B-7B's shapes (src/bench/load_bench.ts; `--layers`, default
 * 2) is written to os.tmpdir(), then
 *   1. one expert's stages, timed apart (median of 5 over experts 0 … 4 of layer 0): reading its
 *      gate/up/down halves, decoding them to float32, quantizing each kind, the copy into the stack;
 *   2. whole loads, loadHFCheckpoint(dir, {expertDtype}) for 'stored' and each quantized kind,
 *      round-robin `--repeat` times (default 1; the page cache is warm: the checkpoint was just
 *      written), then each one's fastest time and its ratio to the fastest 'stored' load.
 * `--root DIR` imports the package from DIR/src (an older checkout, for a before/after); `--kinds`
 * limits the loads. One JSON line per figure.
 *   npx tsx tools/quant_load/profile.ts --layers 2 --repeat 3
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
    repeat: { type: 'string', default: '1' },
  },
});
const root = resolve(args.root!);
const src = (path: string) => import(join(root, 'src', path));
const { olmoeConfig, writeRandomBF16Checkpoint } = await src('bench/load_bench.ts');
const { loadHFCheckpoint } = await src('io/hf_checkpoint.ts');
const { readSafetensorsFile } = await src('io/safetensors.ts');
const { quantizedLayout, quantizeExpertInto } = await src('ops/quantized.ts');
const half = await src('util/half.ts');
// decoding into reused buffers where the checkout has it (what its loader does), else a new array a tensor
const decode: (bits: Uint16Array, out: Float32Array) => Float32Array =
    half.decodeBFloat16Into ? (bits, out) => half.decodeBFloat16Into(bits, out, 0) : bits => half.decodeBFloat16(bits);
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
  const f = [I * H, I * H, H * I].map(n => new Float32Array(n));   // reused, as the loader's block is
  const gateUp = new Float32Array(2 * I * H);
  for (let e = 0; e < 5; e++) {
    let halves: Uint16Array[] = [];
    stages.read.push(await time(async () => { halves = await Promise.all(['gate', 'up', 'down'].map(p => file.halfBits(name(e, p)))); }));
    stages.decode.push(await time(() => halves.forEach((h, i) => { f[i] = decode(h, f[i]); })));
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

  // 2. whole loads, round-robin `repeat` times (the machine may be shared: the fastest of each counts)
  const best = new Map<string, number>();
  for (let r = 0; r < Number(args.repeat); r++) {
    for (const expertDtype of ['stored', ...kinds]) {
      let model: { dispose(): void } | null = null;
      const ms = await time(async () => { model = await loadHFCheckpoint(dir, { expertDtype }); });
      model!.dispose();
      best.set(expertDtype, Math.min(best.get(expertDtype) ?? Infinity, ms));
      print({ load: expertDtype, round: r, seconds: Number((ms / 1e3).toFixed(2)) });
    }
  }
  for (const [expertDtype, ms] of best) {
    print({ fastestLoad: expertDtype, seconds: Number((ms / 1e3).toFixed(2)), overStored: Number((ms / best.get('stored')!).toFixed(2)) });
  }
} finally {
  await rm(dir, { recursive: true, force: true });
  release();
}
