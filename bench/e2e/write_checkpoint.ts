/**
 * A random bf16 checkpoint for ours-only runs on the GPU machine (no PyTorch needed), in HF's layout
 * and shard names (src/bench/load_bench.ts writeRandomBF16Checkpoint), with e2e_checkpoint.json as
 * make_checkpoints.py writes it. `--zero-experts on` leaves the routed experts as holes (zeros that
 * take no disk): Qwen3-30B-A3B's 48 layers are 61 GB of files but 3.1 GB on the disk. Such a run
 * measures memory and speed of the full depth, not learning: e2e_checkpoint.json says
 * `zeroExperts: true` and ours.ts copies it into result.json.
 *   npx tsx bench/e2e/write_checkpoint.ts --model qwen3 --layers 48 --zero-experts on --out DIR
 * On the GPU machine (bundled by prepare.sh): node .gpu/bundle/write_checkpoint.js ...
 */
import { mkdir, readdir, stat, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { olmoeConfig, qwen3MoeConfig, ROUTED_EXPERT_TENSOR, writeRandomBF16Checkpoint } from '../../src/bench/load_bench.js';
import { configTensorPlan } from '../../src/io/hf_checkpoint_core.js';
import type { HFConfig } from '../../src/models/families.js';
import { assertInteger, assertOneOf, fail } from '../../src/ops/validate.js';

const OP = 'e2eWriteCheckpoint';

/** The models this writer knows: make_checkpoints.py's two, with their Hub names and full depth. */
export const E2E_CHECKPOINT_MODELS = {
  qwen3: { source: 'Qwen/Qwen3-30B-A3B', layers: 48, config: qwen3MoeConfig },
  olmoe: { source: 'allenai/OLMoE-1B-7B-0924', layers: 16, config: olmoeConfig },
} as const;

export interface E2ECheckpointInfo {
  model: string;
  model_type: string;
  source: string;
  layers: number;
  full_layers: number;
  params: number;
  expert_params: number;
  /** bytes of the files (as make_checkpoints.py's `bytes`), and of them on the disk */
  bytes: number;
  disk_bytes: number;
  /** the routed experts are all zeros (holes): losses and logits are not a real model's */
  zeroExperts: boolean;
  /** bytes of tensor data that are holes */
  zero_bytes: number;
  note: string;
  writer: 'bench/e2e/write_checkpoint.ts';
  save_seconds: number;
}

/**
 * Writes `model` with `layers` decoder layers to `out` (created; must be empty or missing) and
 * e2e_checkpoint.json beside it; returns what that file holds.
 *
 * ```js
 * await writeE2ECheckpoint({model: 'qwen3', layers: 48, zeroExperts: true, out: '/tmp/e2e-work/ckpt-qwen3-full'});
 * ```
 */
export async function writeE2ECheckpoint(o: {
  model: string; layers?: number; zeroExperts: boolean; out: string; seed?: number;
  /** another config.json to write under `model`'s name (the specs: a small one) */
  config?: HFConfig;
}): Promise<E2ECheckpointInfo> {
  assertOneOf(OP, 'model', o.model, Object.keys(E2E_CHECKPOINT_MODELS));
  const spec = E2E_CHECKPOINT_MODELS[o.model as keyof typeof E2E_CHECKPOINT_MODELS];
  const layers = o.layers ?? spec.layers;
  assertInteger(OP, 'layers', layers, 1, spec.layers);
  if (typeof o.out !== 'string' || o.out === '') fail(OP, `'out' must be a folder path but got ${JSON.stringify(o.out)}`);
  await mkdir(o.out, { recursive: true });
  const present = await readdir(o.out);
  if (present.length > 0) fail(OP, `'out' must be an empty or missing folder but '${o.out}' holds ${present.length} entries (${present.slice(0, 3).join(', ')})`);
  const config = o.config ?? spec.config(layers);
  const began = performance.now();
  const written = await writeRandomBF16Checkpoint(o.out, config, { seed: o.seed ?? 1, zeroExperts: o.zeroExperts });
  const seconds = (performance.now() - began) / 1000;
  const plan = configTensorPlan(config).all;
  const count = (keep: (name: string) => boolean) => plan.filter(e => keep(e.name)).reduce((n, e) => n + e.shape.reduce((a, b) => a * b, 1), 0);
  let bytes = 0;
  let diskBytes = 0;
  for (const f of await readdir(o.out)) {
    const s = await stat(join(o.out, f));
    bytes += s.size;
    diskBytes += s.blocks * 512;
  }
  const info: E2ECheckpointInfo = {
    model: o.model, model_type: String(config['model_type']), source: spec.source, layers: config['num_hidden_layers'] as number, full_layers: spec.layers,
    params: count(() => true), expert_params: count(name => ROUTED_EXPERT_TENSOR.test(name)), bytes, disk_bytes: diskBytes,
    zeroExperts: o.zeroExperts, zero_bytes: written.zeroBytes,
    note: o.zeroExperts ? 'routed experts all zeros (sparse holes, no disk); every other tensor random bf16 (±0.035): memory and speed, not learning' :
      'every tensor random bf16 (±0.035)',
    writer: 'bench/e2e/write_checkpoint.ts', save_seconds: seconds,
  };
  await writeFile(join(o.out, 'e2e_checkpoint.json'), JSON.stringify(info, null, 1));
  return info;
}

/** The command line's flags as writeE2ECheckpoint's options. */
export function parseWriteCheckpointArgs(argv: readonly string[]): { model: string; layers?: number; zeroExperts: boolean; out: string } {
  const flags: Record<string, string> = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || i + 1 >= argv.length) fail(OP, `arguments must be '--flag value' pairs but got ${JSON.stringify(argv.slice(i, i + 2))}`);
    flags[argv[i].slice(2)] = argv[i + 1];
  }
  for (const k of Object.keys(flags)) {
    if (!['model', 'layers', 'zero-experts', 'out'].includes(k)) fail(OP, `'--${k}' is not a flag; the flags are --model --layers --zero-experts --out`);
  }
  assertOneOf(OP, '--zero-experts', flags['zero-experts'] ?? 'off', ['on', 'off']);
  return {
    model: flags['model'], layers: flags['layers'] === undefined ? undefined : Number(flags['layers']),
    zeroExperts: flags['zero-experts'] === 'on', out: flags['out'],
  };
}

async function main(): Promise<void> {
  const info = await writeE2ECheckpoint(parseWriteCheckpointArgs(process.argv.slice(2)));
  process.stdout.write(`${JSON.stringify(info)}\n`);
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().then(() => process.exit(0), err => {
    process.stderr.write(`[write_checkpoint] failed: ${(err as Error).message}\n`);
    process.exit(1);
  });
}
