/**
 * LoRA quality on quantized experts (issue 14, "Training quality"): the example's model
 * (examples/models/tala-moe) LoRA-trained on the example's target text with its experts loaded as
 * each `expertDtype`, the same seed, steps, windows and adapter init for every format, and the
 * held-out loss (examples/data/target_val.txt) of each, next to float32's.
 *
 * Every format trains its own freshly loaded model, so nothing carries over from one format to
 * the next; the adapter starts from the same seeded values (seedAdapterInit) and the windows come
 * in the same order (trainLoop's seed), so the only difference between two rows is the experts'
 * storage.
 */
import * as tf from '@tensorflow/tfjs-core';
import { existsSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { readTokenizer } from '../data/tokenizer_file.js';
import { EXPERT_DTYPES, type ExpertDtype } from '../io/hf_block.js';
import { loadHFCheckpoint } from '../io/hf_checkpoint.js';
import { seedAdapterInit } from '../train/seeded_init.js';
import { assertFiniteNumber, assertInteger, assertOneOf, fail } from '../ops/validate.js';
import { register, unregister } from '../plugin.js';
import { evaluateLoss, withAdaptersDisabled } from '../train/evaluate.js';
import { trainLoop } from '../train/loop.js';
import { readTextFile } from '../util/files.js';

const OP = 'benchLoRAQuality';

/** What `benchLoRAQuality` compares by default: float32 and the two 4-bit formats of the target. */
export const QUALITY_DEFAULT_DTYPES: readonly ExpertDtype[] = ['float32', 'int4', 'nf4'];

export interface QualityBenchOptions {
  /** expert storages to train with; the first is the baseline (default float32, int4, nf4) */
  expertDtypes?: readonly ExpertDtype[];
  /** HF checkpoint folder with tokenizer.json; default: examples/models/tala-moe of this repository */
  model?: string;
  /** training and held-out text; default: examples/data/target_train.txt and target_val.txt */
  train?: string;
  val?: string;
  /** the example's settings: 200 steps, lr 1e-2, LoRA r 4 alpha 8 on experts and router, 8 × 64, seed 1 */
  steps?: number;
  lr?: number;
  rank?: number;
  alpha?: number;
  batch?: number;
  seq?: number;
  seed?: number;
  onRow?: (row: QualityRow) => void;
}

export interface QualityRow {
  expertDtype: ExpertDtype;
  /** held-out loss (nats per character) with the adapter off: the quantized base alone */
  baseLoss: number;
  /** held-out loss after LoRA training */
  adaptedLoss: number;
  /** the training loss of the last step */
  lastTrainLoss: number;
  /** adaptedLoss / the baseline row's adaptedLoss − 1 (0 for the baseline) */
  vsBaseline: number;
  seconds: number;
}

export interface QualityBenchResult {
  backend: string;
  model: string;
  steps: number; lr: number; rank: number; alpha: number; batch: number; seq: number; seed: number;
  rows: QualityRow[];
}

/** This repository's examples folder: src/bench or dist/bench, two levels up. */
function exampleFile(...parts: string[]): string {
  return resolve(dirname(fileURLToPath(import.meta.url)), '..', '..', 'examples', ...parts);
}

/**
 * Trains LoRA on the example's model once per expert storage and returns the held-out losses.
 * Registers the plugin on each model and unregisters it when done; call it with no registration
 * of yours in effect.
 *
 * ```js
 * await tf.setBackend('wasm');
 * const r = await benchLoRAQuality({ expertDtypes: ['float32', 'nf4'], steps: 200 });
 * r.rows[1].vsBaseline;   // e.g. 0.01: nf4's held-out loss 1 % above float32's
 * ```
 */
export async function benchLoRAQuality(options: QualityBenchOptions = {}): Promise<QualityBenchResult> {
  if (options == null || typeof options !== 'object') fail(OP, `'options' must be an object but got ${options}`);
  const dtypes = options.expertDtypes ?? QUALITY_DEFAULT_DTYPES;
  if (!Array.isArray(dtypes) || dtypes.length === 0) {
    fail(OP, `'expertDtypes' must be a non-empty list but got ${JSON.stringify(dtypes)}`);
  }
  dtypes.forEach((d, i) => assertOneOf(OP, `expertDtypes[${i}]`, d, EXPERT_DTYPES));
  const o = {
    model: options.model ?? exampleFile('models', 'tala-moe'),
    train: options.train ?? exampleFile('data', 'target_train.txt'),
    val: options.val ?? exampleFile('data', 'target_val.txt'),
    steps: options.steps ?? 200, lr: options.lr ?? 1e-2, rank: options.rank ?? 4, alpha: options.alpha ?? 8,
    batch: options.batch ?? 8, seq: options.seq ?? 64, seed: options.seed ?? 1,
  };
  for (const k of ['steps', 'rank', 'batch', 'seq'] as const) assertInteger(OP, k, o[k], 1);
  assertInteger(OP, 'seed', o.seed, 0);
  for (const k of ['lr', 'alpha'] as const) {
    assertFiniteNumber(OP, k, o[k]);
    if (!(o[k] > 0)) fail(OP, `'${k}' must be > 0 but got ${o[k]}`);
  }
  if (!existsSync(join(o.model, 'config.json'))) {
    fail(OP, `'model' must be a Hugging Face checkpoint folder with config.json but '${o.model}' has none`);
  }
  const tokenizer = await readTokenizer(o.model);
  const trainTokens = tokenizer.encode(await readTextFile(o.train, 'train'));
  const valTokens = tokenizer.encode(await readTextFile(o.val, 'val'));
  const rows: QualityRow[] = [];
  for (const expertDtype of dtypes) {
    const model = await loadHFCheckpoint(o.model, { expertDtype });
    try {
      register({ models: [model], lora: { r: o.rank, alpha: o.alpha, targets: ['experts.gate_up', 'experts.down', 'router'] } });
      seedAdapterInit(model, 'default', o.seed);
      const evaluate = () => evaluateLoss(model, valTokens, { seq: o.seq });
      const baseLoss = await withAdaptersDisabled(model, evaluate);
      const t0 = performance.now();
      const result = await trainLoop(model, trainTokens, { steps: o.steps, lr: o.lr, batch: o.batch, seq: o.seq, seed: o.seed });
      const seconds = (performance.now() - t0) / 1000;
      const adaptedLoss = await evaluate();
      const row: QualityRow = {
        expertDtype, baseLoss, adaptedLoss, lastTrainLoss: result.losses[result.losses.length - 1],
        vsBaseline: rows.length === 0 ? 0 : adaptedLoss / rows[0].adaptedLoss - 1, seconds,
      };
      rows.push(row);
      options.onRow?.(row);
    } finally {
      unregister();
      model.dispose();
    }
  }
  return { backend: tf.getBackend(), ...o, rows };
}

/** The human-readable table of benchLoRAQuality's result. */
export function formatQualityTable(r: QualityBenchResult): string {
  const head = ['experts', 'base loss', 'LoRA loss', 'vs ' + (r.rows[0]?.expertDtype ?? 'first'), 'last train loss', 's'];
  const rows = r.rows.map((row, i) => [
    row.expertDtype, row.baseLoss.toFixed(4), row.adaptedLoss.toFixed(4),
    i === 0 ? '-' : `${row.vsBaseline >= 0 ? '+' : ''}${(100 * row.vsBaseline).toFixed(2)} %`,
    row.lastTrainLoss.toFixed(4), row.seconds.toFixed(1),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map(row => row[i].length)));
  const line = (cells: string[]) => cells.map((s, i) => (i === 0 ? s.padEnd(widths[i]) : s.padStart(widths[i]))).join('  ');
  const title = `LoRA r ${r.rank} alpha ${r.alpha} on experts + router of ${r.model}, ${r.steps} steps of ` +
      `${r.batch} × ${r.seq}, lr ${r.lr}, seed ${r.seed}, backend ${r.backend}; held-out loss in nats per character`;
  return `${[title, line(head), ...rows.map(line)].join('\n')}\n`;
}
