/**
 * The training-step benchmark: whole Adam steps of the example's model (examples/models/tala-moe,
 * the setup of `npm run example`: LoRA r 4, alpha 8 on the experts and the router, batch 8 × 64
 * characters), with the patched MoE layers on the 'fused' and on the 'reference' expert kernel,
 * timed in the same run on the current backend. Reports tokens per second: what a user of the
 * example sees, attention, embeddings, loss and optimizer included.
 *
 * Timing as in block_bench.ts (timeRuns): warm-up steps, then rounds of one step of each case and
 * kernel in a rotating order (blocks on webgpu), medians; a step ends when its loss has been read (on webgpu: after the GPU ran
 * every kernel of the step, the optimizer's updates included, as the queue runs in order).
 */
import * as tf from '@tensorflow/tfjs-core';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { readTokenizer } from '../data/tokenizer_file.js';
import { loadHFCheckpoint } from '../io/hf_checkpoint.js';
import { sparseMoELayers, trainableVariables } from '../layers/moe_causal_lm.js';
import { assertInteger, assertOneOf, fail } from '../ops/validate.js';
import { register, unregister } from '../plugin.js';
import { windowStream } from '../train/batches.js';
import { nextTokenLoss } from '../train/loss.js';
import { readTextFile } from '../util/files.js';
import { ASYNC_READ_BACKENDS, BENCH_LORA_CASES, median, timeRuns, type BenchLoRA } from './block_bench.js';

const OP = 'benchTrainingStep';

/** The name of this case in `tfjs-moe-lora bench --config` and in the JSON records. */
export const TRAIN_BENCH_CONFIG = 'example';

export interface TrainBenchOptions {
  /** HF checkpoint folder with tokenizer.json; default: examples/models/tala-moe of this repository */
  model?: string;
  /** training text; default: examples/data/target_train.txt of this repository */
  text?: string;
  /** default ['auto'] (the example's); 'none' is full fine-tuning of every weight */
  lora?: readonly BenchLoRA[];
  /** LoRA rank and alpha (default 4 and 8, the example's) */
  rank?: number;
  alpha?: number;
  /** windows per step and characters per window (default 8 and 64, the example's) */
  batch?: number;
  seq?: number;
  /** timed steps per case and kernel (default 5), untimed ones first (default 1) */
  iters?: number;
  warmup?: number;
  /** seed of the window order (default 1) */
  seed?: number;
  onCase?: (c: TrainBenchCase) => void;
}

export interface TrainTiming {
  /** median wall time of one training step, ms */
  ms: number;
  /** tokens (predicted characters) per second at the median: batch · seq / ms */
  tokensPerSecond: number;
  /** peak bytes of tensors allocated during one step (tf.profile), above what was held before */
  peakBytes: number;
  samples: number[];
  minMs: number;
  /** median CPU time of this process per step, ms (see BenchTiming.cpuMs) */
  cpuMs: number;
}

export interface TrainBenchCase {
  config: typeof TRAIN_BENCH_CONFIG;
  backend: string;
  lora: BenchLoRA;
  fused: TrainTiming;
  /** null where the reference kernel cannot run: `referenceSkipped` says why */
  reference: TrainTiming | null;
  referenceSkipped?: string;
  /** reference ms / fused ms (null without a reference) */
  speedup: number | null;
  /** the median over rounds of reference / fused time within the round */
  pairedSpeedup: number | null;
  /** fused peakBytes / reference peakBytes */
  memRatio: number | null;
  tokensPerStep: number;
  model: { dir: string; moeLayers: number; experts: number; topK: number; moeIntermediate: number; params: number; trainable: number };
  iters: number;
  warmup: number;
}

/** This repository's examples folder: src/bench or dist/bench, two levels up. */
function exampleFile(...parts: string[]): string {
  return resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'examples', ...parts);
}

/** Why the reference is left out where reads are asynchronous only (ASYNC_READ_BACKENDS). */
const NO_SYNC_READ = 'the reference MoE block reads its routing with dataSync inside the layer call, which this backend cannot do';

type Kernel = 'fused' | 'reference';

interface Resolved {
  model: string; text: string; lora: readonly BenchLoRA[]; rank: number; alpha: number;
  batch: number; seq: number; iters: number; warmup: number; seed: number;
}

function checkOptions(options: TrainBenchOptions): Resolved {
  if (options == null || typeof options !== 'object') fail(OP, `'options' must be an object but got ${options}`);
  const lora = options.lora ?? ['auto'];
  if (!Array.isArray(lora) || lora.length === 0) fail(OP, `'lora' must be a non-empty list of cases but got ${JSON.stringify(lora)}`);
  lora.forEach((l, i) => assertOneOf(OP, `lora[${i}]`, l, BENCH_LORA_CASES));
  const r: Resolved = {
    model: options.model ?? exampleFile('models', 'tala-moe'),
    text: options.text ?? exampleFile('data', 'target_train.txt'),
    lora, rank: options.rank ?? 4, alpha: options.alpha ?? 8, batch: options.batch ?? 8, seq: options.seq ?? 64,
    iters: options.iters ?? 5, warmup: options.warmup ?? 1, seed: options.seed ?? 1,
  };
  for (const k of ['rank', 'batch', 'seq', 'iters'] as const) assertInteger(OP, k, r[k], 1);
  assertInteger(OP, 'warmup', r.warmup, 0);
  assertInteger(OP, 'seed', r.seed, 0);
  if (typeof r.alpha !== 'number' || !(r.alpha > 0)) fail(OP, `'alpha' must be a number > 0 but got ${r.alpha}`);
  if (!existsSync(join(r.model, 'config.json'))) {
    fail(OP, `'model' must be a Hugging Face checkpoint folder with config.json but '${r.model}' has none` +
        (options.model === undefined ? ' (the example model ships with the repository, not the npm package: pass one)' : ''));
  }
  if (!existsSync(r.text)) fail(OP, `'text' must be a text file but '${r.text}' does not exist`);
  return r;
}

interface Run {
  lora: BenchLoRA;
  kernel: Kernel;
  optimizer: tf.Optimizer;
  samples: Array<{ ms: number; cpuMs: number }>;
}

/**
 * Times whole training steps of the example's model with the fused and the reference expert
 * kernels, one case per LoRA setting. Registers the plugin on its own model and unregisters it
 * when done; call it with no registration of yours in effect.
 *
 * ```js
 * await tf.setBackend('wasm');
 * const [c] = await benchTrainingStep({ iters: 5 });
 * c.fused.tokensPerSecond;
 * ```
 */
export async function benchTrainingStep(options: TrainBenchOptions = {}): Promise<TrainBenchCase[]> {
  const o = checkOptions(options);
  const backend = tf.getBackend();
  const tokenizer = await readTokenizer(o.model);
  const tokens = tokenizer.encode(await readTextFile(o.text, '--text'));
  if (tokens.length < o.seq + 1) fail(OP, `'text' must hold more than seq = ${o.seq} characters but has ${tokens.length}`);
  const model = await loadHFCheckpoint(o.model);
  const kernels: Kernel[] = ASYNC_READ_BACKENDS.includes(backend) ? ['fused'] : ['fused', 'reference'];
  const results: TrainBenchCase[] = [];
  try {
    // LoRA cases share one registration with the adapter; full fine-tuning needs none
    const groups = [o.lora.filter(l => l !== 'none'), o.lora.filter(l => l === 'none')].filter(g => g.length > 0);
    for (const group of groups) {
      const runs = group.flatMap(lora => kernels.map((kernel): Run =>
        ({ lora, kernel, optimizer: tf.train.adam(1e-3), samples: [] })));
      const use = (r: Run) => register({
        models: [model], expertKernel: r.kernel, strict: true,
        ...(r.lora === 'none' ? {} : {
          loraMode: r.lora, lora: { r: o.rank, alpha: o.alpha, targets: ['experts.gate_up', 'experts.down', 'router'] },
        }),
      });
      const batches = windowStream(tokens, o.batch, o.seq, o.seed);
      const step = async (r: Run) => {
        use(r);
        const variables = trainableVariables(model);
        const windows = batches.next();
        const c0 = process.cpuUsage();
        const t0 = performance.now();
        const loss = r.optimizer.minimize(() => nextTokenLoss(model, windows), true, variables)!;
        await loss.data();
        const ms = performance.now() - t0;
        const c = process.cpuUsage(c0);
        tf.dispose([loss, windows]);
        return { ms, cpuMs: (c.user + c.system) / 1000 };
      };
      try {
        await timeRuns(runs, o.warmup, o.iters, async (r, timed) => {
          const sample = await step(r);
          if (timed) r.samples.push(sample);
        });
        const timing = async (r: Run): Promise<TrainTiming> => {
          const before = tf.memory().numBytes;
          const info = await tf.profile(async () => { await step(r); });
          const samples = r.samples.map(s => s.ms);
          const ms = median(samples);
          return {
            ms, tokensPerSecond: (o.batch * o.seq * 1000) / ms, peakBytes: info.peakBytes - before,
            samples, minMs: Math.min(...samples), cpuMs: median(r.samples.map(s => s.cpuMs)),
          };
        };
        for (const lora of group) {
          const fusedRun = runs.find(r => r.lora === lora && r.kernel === 'fused')!;
          const refRun = runs.find(r => r.lora === lora && r.kernel === 'reference');
          const fused = await timing(fusedRun);
          const reference = refRun ? await timing(refRun) : null;
          use(fusedRun);
          const layers = sparseMoELayers(model);
          const result: TrainBenchCase = {
            config: TRAIN_BENCH_CONFIG, backend, lora, fused, reference,
            speedup: reference ? reference.ms / fused.ms : null,
            pairedSpeedup: refRun ? median(refRun.samples.map((s, i) => s.ms / fusedRun.samples[i].ms)) : null,
            memRatio: reference ? fused.peakBytes / reference.peakBytes : null,
            tokensPerStep: o.batch * o.seq,
            model: {
              dir: o.model, moeLayers: layers.length, experts: layers[0].numExperts, topK: layers[0].routing.topK,
              moeIntermediate: layers[0].intermediateSize, params: model.countParams(),
              trainable: model.trainableWeights.reduce((s, w) => s + w.shape.reduce<number>((p, d) => p * (d ?? 1), 1), 0),
            },
            iters: o.iters, warmup: o.warmup,
          };
          if (reference === null) result.referenceSkipped = NO_SYNC_READ;
          results.push(result);
          options.onCase?.(result);
        }
      } finally {
        unregister();
        for (const r of runs) r.optimizer.dispose();
      }
    }
    return results;
  } finally {
    model.dispose();
  }
}

/** The human-readable table of benchTrainingStep's results. */
export function formatTrainBenchTable(cases: readonly TrainBenchCase[]): string {
  const head = ['config', 'backend', 'lora', 'fused ms', 'fused tok/s', 'ref ms', 'ref tok/s', 'speedup', 'paired',
    'fused MiB', 'ref MiB', 'mem ratio'];
  const mib = (b: number) => (b / 2 ** 20).toFixed(1);
  const rows = cases.map(c => [
    c.config, c.backend, c.lora, c.fused.ms.toFixed(1), c.fused.tokensPerSecond.toFixed(0),
    c.reference?.ms.toFixed(1) ?? '-', c.reference?.tokensPerSecond.toFixed(0) ?? '-',
    c.speedup !== null ? `${c.speedup.toFixed(2)}x` : '-', c.pairedSpeedup !== null ? `${c.pairedSpeedup.toFixed(2)}x` : '-',
    mib(c.fused.peakBytes), c.reference ? mib(c.reference.peakBytes) : '-', c.memRatio?.toFixed(2) ?? '-',
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map(r => r[i].length)));
  const line = (cells: string[]) => cells.map((s, i) => (i < 3 ? s.padEnd(widths[i]) : s.padStart(widths[i]))).join('  ').trimEnd();
  const c0 = cases[0];
  const title = c0 ? `training step of ${c0.model.dir} (${c0.model.moeLayers} MoE layers, E=${c0.model.experts} ` +
      `K=${c0.model.topK}, ${c0.model.params} weights), ${c0.tokensPerStep} tokens per step, ` +
      `median of ${c0.iters} after ${c0.warmup} warm-up` : 'no cases';
  const notes = [...new Set(cases.map(c => c.referenceSkipped).filter(s => s !== undefined))].map(s => `reference not run: ${s}`);
  return `${[title, line(head), ...rows.map(line), ...notes].join('\n')}\n`;
}
