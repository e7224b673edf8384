/**
 * The load benchmark (`tfjs-moe-lora bench --config load`): a random checkpoint with OLMoE-1B-7B's
 * shapes (hidden 2048, 64 experts, top-8, moe_intermediate 1024, vocab 50304, 16 heads; 16 layers,
 * fewer with `layers`) written in bf16 shards of at most 5 GB with HF's names and index, then
 * loaded once per expert dtype, each load in a child process of its own (load_bench_child.ts), so
 * that its peak RSS (VmHWM: its own high-water mark) is the load's alone and not the writer's or
 * another load's. Reports, per load: tf.memory().numBytes after the load, the child's RSS before
 * and at its peak, the peak of RSS minus the device's buffers (webgpu: on Mesa the device's memory
 * is RSS too) and the bytes of weights left on the host after the load, the load's wall time, and
 * the memory estimate (estimateLoadMemory).
 *
 * The checkpoint's values are a pool of random bf16 numbers (uniform in ±0.035, about the spread
 * of HF's init) written at random offsets: generating 7 billion fresh ones would time the
 * generator, not the loader; the loader cannot tell the difference.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { configTensorPlan, DENSE_DTYPES, type DenseDtype } from '../io/hf_checkpoint_core.js';
import { safetensorsLayout } from '../io/safetensors_bytes.js';
import type { HFConfig } from '../models/families.js';
import { estimateLoadMemory } from '../models/memory.js';
import { assertInteger, assertOneOf, fail } from '../ops/validate.js';
import { encodeBFloat16 } from '../util/half.js';
import { BENCH_BACKENDS } from './backend.js';

const OP = 'benchLoad';

/** The name of this case in `tfjs-moe-lora bench --config`. */
export const LOAD_BENCH_CONFIG = 'load';

/** How the routed experts are held after a load (the loader's `expertDtype` option). */
export const LOAD_BENCH_EXPERT_DTYPES = ['stored', 'float32'] as const;
export type LoadBenchExpertDtype = typeof LOAD_BENCH_EXPERT_DTYPES[number];

/** HF's default largest shard (`max_shard_size="5GB"`). */
export const DEFAULT_MAX_SHARD_BYTES = 5_000_000_000;

/** OLMoE-1B-7B's config.json (allenai/OLMoE-1B-7B-0924), with `layers` decoder layers. */
export function olmoeConfig(layers = 16): HFConfig {
  return {
    architectures: ['OlmoeForCausalLM'], model_type: 'olmoe', dtype: 'bfloat16',
    hidden_size: 2048, intermediate_size: 1024, num_hidden_layers: layers, num_attention_heads: 16,
    num_key_value_heads: 16, num_experts: 64, num_experts_per_tok: 8, norm_topk_prob: false,
    vocab_size: 50304, max_position_embeddings: 4096, rms_norm_eps: 1e-5, rope_theta: 10000,
    attention_bias: false, clip_qkv: null, hidden_act: 'silu', initializer_range: 0.02,
    tie_word_embeddings: false, pad_token_id: 1, eos_token_id: 50279, bos_token_id: null,
    router_aux_loss_coef: 0.01, output_router_logits: false,
  };
}

/**
 * OLMoE's layout at widths Mesa's software GPU takes (its buffers hold at most 128 MiB): hidden
 * 512, 8 heads, 32 experts of 512, vocab 32000; 4 layers are 275 MB of bf16 and the embedding
 * (65.5 MB as float32) is the largest tensor. The load-memory specs and tools/gpu_load/mesa.ts.
 */
export function narrowOlmoeConfig(layers: number): HFConfig {
  return {
    ...olmoeConfig(layers), hidden_size: 512, intermediate_size: 512, num_experts: 32, vocab_size: 32000,
    num_attention_heads: 8, num_key_value_heads: 8,
  };
}

/**
 * Qwen3-30B-A3B's config.json (Qwen/Qwen3-30B-A3B, as bench/e2e/make_checkpoints.py writes it):
 * hidden 2048, 128 experts top-8 of moe_intermediate 768, vocab 151936, 32 heads, 4 KV heads of
 * head_dim 128; 48 layers, fewer with `layers`.
 */
export function qwen3MoeConfig(layers = 48): HFConfig {
  return {
    architectures: ['Qwen3MoeForCausalLM'], model_type: 'qwen3_moe', dtype: 'bfloat16',
    vocab_size: 151936, hidden_size: 2048, intermediate_size: 6144, num_hidden_layers: layers,
    num_attention_heads: 32, num_key_value_heads: 4, head_dim: 128, hidden_act: 'silu',
    max_position_embeddings: 40960, initializer_range: 0.02, rms_norm_eps: 1e-6, use_cache: true,
    tie_word_embeddings: false, rope_parameters: { rope_type: 'default', rope_theta: 1000000 }, attention_bias: false,
    use_sliding_window: false, sliding_window: null, max_window_layers: layers, attention_dropout: 0,
    decoder_sparse_step: 1, moe_intermediate_size: 768, num_experts_per_tok: 8, num_experts: 128,
    norm_topk_prob: true, output_router_logits: false, router_aux_loss_coef: 0.001, mlp_only_layers: [],
    bos_token_id: 151643, eos_token_id: 151645,
  };
}

/** A routed expert's tensor in HF's names (per expert `mlp.experts.3.up_proj`, or fused `mlp.experts.gate_up_proj`); not a shared expert's. */
export const ROUTED_EXPERT_TENSOR = /\.experts\./;

/** mulberry32: a small seeded generator of uniform numbers in [0, 1). */
export function seededUniform(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface WrittenCheckpoint {
  /** the shard files, in order */
  shards: string[];
  /** bytes of tensor data (the index's metadata.total_size) */
  totalBytes: number;
  /** bytes of the largest tensor in the files */
  largestTensorBytes: number;
  /** bytes of tensor data left as holes (zeroExperts: the routed experts), not on the disk */
  zeroBytes: number;
}

/**
 * Writes config.json and the checkpoint `config` implies, every tensor BF16, in shards of at most
 * `maxShardBytes` of data named as HF names them (`model-00001-of-00004.safetensors`, or
 * model.safetensors when one shard holds all), with model.safetensors.index.json
 * (`metadata.total_size`, `weight_map`) for more than one. Streams: memory is a 32 MiB pool.
 * `zeroExperts`: the routed experts' data (ROUTED_EXPERT_TENSOR) is left as holes in the shards
 * (sparse files: zeros that take no disk), every other tensor random as before; the files have
 * the same names, headers and sizes. For the memory of a full-depth model whose bf16 experts would
 * not fit the disk (bench/e2e go.sh qwen3-full): its losses and speeds are those of zero experts.
 *
 * ```js
 * await writeRandomBF16Checkpoint(dir, olmoeConfig(2), {seed: 1});
 * await writeRandomBF16Checkpoint(dir2, qwen3MoeConfig(48), {zeroExperts: true});   // 61 GB of files, 3.1 GB on disk
 * ```
 */
export async function writeRandomBF16Checkpoint(
    dir: string, config: HFConfig, options: { seed?: number; maxShardBytes?: number; zeroExperts?: boolean } = {}): Promise<WrittenCheckpoint> {
  const maxShardBytes = options.maxShardBytes ?? DEFAULT_MAX_SHARD_BYTES;
  assertInteger(OP, 'maxShardBytes', maxShardBytes, 1);
  const random = seededUniform(options.seed ?? 1);
  const plan = configTensorPlan(config).all;
  // a pool of up to 16 Mi values (32 MiB), no larger than the checkpoint
  const values = new Float32Array(Math.min(16 * 2 ** 20, plan.reduce((n, e) => n + e.shape.reduce((a, b) => a * b, 1), 0)));
  for (let i = 0; i < values.length; i++) values[i] = (random() * 2 - 1) * 0.035;
  const pool = encodeBFloat16(values);
  const poolBytes = new Uint8Array(pool.buffer);

  // shards: tensors in graph order, a new shard when the next tensor would overflow this one
  const groups: Array<Array<{ name: string; shape: number[]; bytes: number }>> = [[]];
  let inShard = 0;
  let largestTensorBytes = 0;
  for (const { name, shape } of plan) {
    const bytes = 2 * shape.reduce((a, b) => a * b, 1);
    largestTensorBytes = Math.max(largestTensorBytes, bytes);
    if (inShard > 0 && inShard + bytes > maxShardBytes) {
      groups.push([]);
      inShard = 0;
    }
    groups.at(-1)!.push({ name, shape, bytes });
    inShard += bytes;
  }
  const n = groups.length;
  const shardName = (i: number) => n === 1 ? 'model.safetensors' :
    `model-${String(i + 1).padStart(5, '0')}-of-${String(n).padStart(5, '0')}.safetensors`;
  const weightMap: Record<string, string> = {};
  let totalBytes = 0;
  let zeroBytes = 0;
  for (const [i, group] of groups.entries()) {
    // the format's own layout (header bytes and data order); only the data is the bench's
    const { header: start, entries, dataBytes } = safetensorsLayout('writeRandomBF16Checkpoint',
        group.map(t => ({ name: t.name, dtype: 'BF16' as const, shape: t.shape })), { format: 'pt' });
    for (const e of entries) weightMap[e.name] = shardName(i);
    totalBytes += dataBytes;
    const file = await open(join(dir, shardName(i)), 'w');
    try {
      await file.write(start, 0, start.byteLength, 0);
      let at = start.byteLength;
      for (const e of entries) {
        if (options.zeroExperts === true && ROUTED_EXPERT_TENSOR.test(e.name)) {
          at += e.end - e.begin;   // a hole: reads as zeros
          zeroBytes += e.end - e.begin;
          continue;
        }
        for (let left = e.end - e.begin; left > 0;) {
          const from = 2 * Math.floor(random() * (pool.length / 2));  // an even byte: whole bf16 values
          const chunk = Math.min(left, poolBytes.byteLength - from);
          await file.write(poolBytes, from, chunk, at);
          at += chunk;
          left -= chunk;
        }
      }
      await file.truncate(at);   // the file's full length when it ends in a hole
    } finally {
      await file.close();
    }
  }
  await writeFile(join(dir, 'config.json'), JSON.stringify(config, null, 2));
  if (n > 1) {
    await writeFile(join(dir, 'model.safetensors.index.json'),
        JSON.stringify({ metadata: { total_size: totalBytes }, weight_map: weightMap }, null, 2));
  }
  return { shards: groups.map((_, i) => shardName(i)), totalBytes, largestTensorBytes, zeroBytes };
}

/** What one load in its child process reports (load_bench_child.ts). */
export interface LoadChildResult {
  /** tf.memory().numBytes after the load */
  numBytes: number;
  /** the child's RSS after its backend was set up, before the load */
  rssBefore: number;
  /** the child's peak RSS over its life (VmHWM on Linux: its own, not its parent's, see load_bench_child.ts) */
  peakRss: number;
  /** the load's wall time */
  seconds: number;
  /** the loaded model's largest weight, bytes (as held: packed experts as their int32 words) */
  largestWeightBytes: number;
  /**
   * the load's peak of RSS minus the device buffers the backend allocated (webgpu; on cpu and
   * wasm RSS alone) above the same before it, sampled every millisecond: what the load holds on
   * the host apart from the device's memory, which on Mesa's software GPU is in RSS too
   */
  peakHostBytes: number;
  /** webgpu: bytes of the model's weights still held on the host after the load (0: all on the device); cpu, wasm: 0 */
  hostValueBytesAfter: number;
}

export interface LoadBenchCase extends LoadChildResult {
  backend: string;
  expertDtype: LoadBenchExpertDtype;
  layers: number;
  /** bf16 bytes of tensor data on disk */
  checkpointBytes: number;
  shards: number;
  /** estimateLoadMemory(config, {expertBytesPerElement: 4}).bytes: what a float32 load holds */
  estimateFloat32Bytes: number;
  /** the load's own peak: peakRss − rssBefore */
  loadPeakBytes: number;
  /** the RSS target of the issue: 1.1 × numBytes + the largest weight */
  rssTargetBytes: number;
}

export interface LoadBenchOptions {
  /** decoder layers (default 16, OLMoE-1B-7B's) */
  layers?: number;
  /** another config.json to write and load instead of OLMoE's (the specs: a small one) */
  config?: HFConfig;
  /** the loads to run, each in its own child process (default both) */
  expertDtypes?: readonly LoadBenchExpertDtype[];
  /** how the loads hold the dense weights (the loader's `denseDtype`, default float32) */
  denseDtype?: DenseDtype;
  /** the backend of the loads (default cpu) */
  backend?: string;
  seed?: number;
  /** largest shard, bytes of data (default 5 GB, HF's) */
  maxShardBytes?: number;
  /** the folder to write into (default: a new one in os.tmpdir(), removed afterwards) */
  dir?: string;
  onCase?: (c: LoadBenchCase) => void;
  /** told when the checkpoint is written, before the loads (awaited) */
  onWritten?: (written: WrittenCheckpoint & { seconds: number; dir: string }) => void | Promise<void>;
}

/**
 * The child's entry, next to this module (.ts under tsx, .js once built); in an esbuild bundle
 * (../shared/gpu/prepare.sh, this module inside bench/run.js) the child bundled beside it, as
 * load_bench_child.js: prepare.sh must be given src/bench/load_bench_child.ts as an entry too.
 */
function childEntry(): string {
  const self = fileURLToPath(import.meta.url);
  return /load_bench\.(ts|js)$/.test(self) ? self.replace(/load_bench\.(ts|js)$/, 'load_bench_child.$1') :
    join(dirname(self), 'load_bench_child.js');
}

/** Runs one load in a child process and returns its report (the last line of its stdout). */
async function loadInChild(dir: string, backend: string, expertDtype: LoadBenchExpertDtype, denseDtype: DenseDtype): Promise<LoadChildResult> {
  const child = spawn(process.execPath, [...process.execArgv, childEntry(), JSON.stringify({ dir, backend, expertDtype, denseDtype })],
      { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => { stdout += d.toString(); });
  child.stderr.on('data', (d: Buffer) => { stderr += d.toString(); });
  const code = await new Promise<number | null>(resolve => child.on('close', resolve));
  const last = stdout.trim().split('\n').at(-1) ?? '';
  type Report = (LoadChildResult & { error?: undefined }) | { error: string };
  const report = ((): Report | null => {
    try {
      return JSON.parse(last) as Report;
    } catch {
      return null;  // no report: the child died (killed for memory, or before it could write)
    }
  })();
  if (code !== 0 || report === null || report.error !== undefined) {
    fail(OP, `the ${expertDtype} load on ${backend} failed (exit code ${code}): ` +
        (report?.error ?? (stderr.trim() || 'no output')));
  }
  return report;
}

/**
 * Writes the checkpoint, loads it once per expert dtype (a child process each) and reports.
 *
 * ```js
 * const cases = await benchLoad({layers: 2, backend: 'cpu'});
 * cases[0].numBytes / cases[1].numBytes;  // stored vs float32
 * ```
 */
export async function benchLoad(options: LoadBenchOptions = {}): Promise<LoadBenchCase[]> {
  const layers = options.layers ?? 16;
  assertInteger(OP, 'layers', layers, 1, 16);
  const backend = options.backend ?? 'cpu';
  assertOneOf(OP, 'backend', backend, BENCH_BACKENDS);
  const expertDtypes = options.expertDtypes ?? LOAD_BENCH_EXPERT_DTYPES;
  if (expertDtypes.length === 0) fail(OP, "'expertDtypes' must name at least one of stored, float32");
  for (const d of expertDtypes) assertOneOf(OP, 'expertDtypes', d, LOAD_BENCH_EXPERT_DTYPES);
  const denseDtype = options.denseDtype ?? 'float32';
  assertOneOf(OP, 'denseDtype', denseDtype, DENSE_DTYPES);
  const config = options.config ?? olmoeConfig(layers);
  const dir = options.dir ?? await mkdtemp(join(tmpdir(), 'moe-lora-load-bench-'));
  try {
    const began = performance.now();
    const written = await writeRandomBF16Checkpoint(dir, config, { seed: options.seed, maxShardBytes: options.maxShardBytes });
    await options.onWritten?.({ ...written, dir, seconds: (performance.now() - began) / 1000 });
    const cases: LoadBenchCase[] = [];
    for (const expertDtype of expertDtypes) {
      const r = await loadInChild(dir, backend, expertDtype, denseDtype);
      const c: LoadBenchCase = {
        backend, expertDtype, layers: config['num_hidden_layers'] as number, checkpointBytes: written.totalBytes, shards: written.shards.length,
        estimateFloat32Bytes: estimateLoadMemory(config).bytes, ...r,
        loadPeakBytes: r.peakRss - r.rssBefore, rssTargetBytes: Math.round(1.1 * r.numBytes + r.largestWeightBytes),
      };
      options.onCase?.(c);
      cases.push(c);
    }
    return cases;
  } finally {
    if (options.dir === undefined) await rm(dir, { recursive: true, force: true });
  }
}

const gib = (bytes: number) => (bytes / 2 ** 30).toFixed(2);

/** A table of the cases, one line per load, and stored/float32 when both ran. */
export function formatLoadBenchTable(cases: readonly LoadBenchCase[]): string {
  const lines = [
    'backend  experts  layers  checkpoint GiB  numBytes GiB  estimate f32 GiB  load peak RSS GiB  target GiB  ' +
        'peak host GiB  left on host GiB  largest GiB  load s',
    ...cases.map(c => [
      c.backend.padEnd(7), c.expertDtype.padEnd(7), String(c.layers).padStart(6), gib(c.checkpointBytes).padStart(14),
      gib(c.numBytes).padStart(12), gib(c.estimateFloat32Bytes).padStart(16), gib(c.loadPeakBytes).padStart(17),
      gib(c.rssTargetBytes).padStart(10), gib(c.peakHostBytes).padStart(13), gib(c.hostValueBytesAfter).padStart(16),
      gib(c.largestWeightBytes).padStart(11), c.seconds.toFixed(1).padStart(6),
    ].join('  ')),
  ];
  const stored = cases.find(c => c.expertDtype === 'stored');
  const f32 = cases.find(c => c.expertDtype === 'float32');
  if (stored && f32) lines.push(`numBytes stored / float32: ${(stored.numBytes / f32.numBytes).toFixed(3)} (target <= 0.55)`);
  return `${lines.join('\n')}\n`;
}
