/**
 * Datasets for fine-tuning (Node): JSON Lines files of one of axolotl's dataset types, tokenized
 * with the model's tokenizer, loss-masked, truncated, split into train and validation samples,
 * then served as deterministic micro-batches (padded, or packed several samples a row).
 */
import { fail, assertInteger } from '../ops/validate.js';
import type { BatchSource } from '../train/batches.js';
import type { TrainingBatch } from '../train/loss.js';
import { describeValue } from '../util/describe.js';
import { DatasetError } from './datasets_error.js';
import { DATASET_TYPES, sampleTokens, type DatasetType } from './datasets_formats.js';
import { readJsonl } from './datasets_jsonl.js';
import { planRows, rowsBatch, toSample, type TokenizedSample } from './datasets_rows.js';
import { SeededRandom } from './random.js';
import type { TextTokenizer } from './text_tokenizer.js';

/** One dataset file: axolotl's `datasets: [{path, type, field}]` entry. */
export interface DatasetSpec {
  /** a JSON Lines file */
  path: string;
  type: DatasetType;
  /** `completion` only: the field holding the text; default "text" */
  field?: string;
}

export interface LoadDatasetsOptions {
  /** the most tokens a sample keeps (longer ones are cut) and the width of a packed row */
  sequenceLen: number;
  /** several samples a row (axolotl's sample_packing); default false */
  samplePacking?: boolean;
  /** train on prompts / instructions / user turns too (axolotl's train_on_inputs); default false */
  trainOnInputs?: boolean;
  /** validation samples: a fraction in (0, 1) or a count ≥ 1 (axolotl's val_set_size); default 0, none */
  valSetSize?: number;
  /** the seed of the validation split (and, in datasetBatches, of the order) */
  seed: number;
}

/** Tokenized samples and how they become rows. */
export interface TokenizedDataset {
  readonly samples: readonly TokenizedSample[];
  readonly sequenceLen: number;
  readonly samplePacking: boolean;
  /** the id written at padding positions (the tokenizer's pad, else its EOS, else 0); never predicted */
  readonly padTokenId: number;
  /** Σ targetCount over the samples */
  readonly targetCount: number;
}

function datasetOf(samples: TokenizedSample[], base: Omit<TokenizedDataset, 'samples' | 'targetCount'>): TokenizedDataset {
  return { ...base, samples, targetCount: samples.reduce((s, x) => s + x.targetCount, 0) };
}

function checkSpecs(op: string, specs: unknown): DatasetSpec[] {
  if (!Array.isArray(specs) || specs.length === 0) fail(op, `'specs' must be a non-empty array of {path, type} but got ${describeValue(specs)}`);
  specs.forEach((s, i) => {
    const spec = s as Partial<DatasetSpec> | null;
    if (spec === null || typeof spec !== 'object') fail(op, `'specs[${i}]' must be an object {path, type} but got ${describeValue(s)}`);
    if (typeof spec.path !== 'string' || spec.path.length === 0) fail(op, `'specs[${i}].path' must be a file path but got ${describeValue(spec.path)}`);
    if (!DATASET_TYPES.includes(spec.type as DatasetType)) {
      fail(op, `'specs[${i}].type' must be one of ${DATASET_TYPES.join(', ')} but got ${describeValue(spec.type)}`);
    }
    if (spec.field !== undefined && (typeof spec.field !== 'string' || spec.field.length === 0 || spec.type !== 'completion')) {
      fail(op, `'specs[${i}].field' must be a non-empty string, for type completion only, but got ${describeValue(spec.field)} (type ${spec.type})`);
    }
  });
  return specs as DatasetSpec[];
}

/** How many of `total` samples validate: HF datasets' train_test_split rounds a fraction up. */
function validationCount(op: string, valSetSize: number, total: number): number {
  if (valSetSize === 0) return 0;
  const count = valSetSize < 1 ? Math.ceil(valSetSize * total) : valSetSize;
  if (count >= total) {
    fail(op, `'valSetSize' ${valSetSize} leaves no training sample: ${count} of the ${total} samples would validate`);
  }
  return count;
}

/**
 * Reads the dataset files (streamed line by line), tokenizes each line, masks the loss as
 * `trainOnInputs` says, cuts samples to `sequenceLen` tokens, drops those left with nothing to
 * predict (an answer cut away entirely), and splits off `valSetSize` samples for validation
 * (a seeded choice; both parts keep the files' order).
 *
 * ```js
 * const tok = await readTokenizer('./Qwen3-30B-A3B');
 * const {train, val} = await loadDatasets([{path: 'chat.jsonl', type: 'chat_template'}], tok,
 *     {sequenceLen: 2048, samplePacking: true, valSetSize: 0.05, seed: 42});
 * ```
 */
export async function loadDatasets(
    specs: DatasetSpec[], tokenizer: TextTokenizer, options: LoadDatasetsOptions,
): Promise<{ train: TokenizedDataset; val: TokenizedDataset | null; dropped: number }> {
  const op = 'loadDatasets';
  checkSpecs(op, specs);
  if (options === null || typeof options !== 'object') fail(op, `'options' must be an object but got ${describeValue(options)}`);
  assertInteger(op, 'sequenceLen', options.sequenceLen, 2);
  assertInteger(op, 'seed', options.seed, 0, 2 ** 32 - 1);
  const valSetSize = options.valSetSize ?? 0;
  if (typeof valSetSize !== 'number' || !(valSetSize >= 0) || (valSetSize >= 1 && !Number.isInteger(valSetSize))) {
    fail(op, `'valSetSize' must be a fraction in (0, 1) or a whole count >= 1 but got ${describeValue(valSetSize)}`);
  }
  const samples: TokenizedSample[] = [];
  let dropped = 0;
  for (const spec of specs) {
    let lines = 0;
    for await (const { record, where } of readJsonl(spec.path)) {
      lines++;
      const tokens = sampleTokens(record, spec.type, tokenizer, { field: spec.field, trainOnInputs: options.trainOnInputs, where });
      const sample = toSample(tokens, options.sequenceLen);
      if (sample.targetCount === 0) dropped++;
      else samples.push(sample);
    }
    if (lines === 0) throw new DatasetError(`${spec.path}: the dataset has no line; expected one JSON object per line`);
  }
  if (samples.length === 0) {
    throw new DatasetError(`${specs.map(s => s.path).join(', ')}: no sample has a token to predict within sequenceLen ${options.sequenceLen}`);
  }
  const valCount = validationCount(op, valSetSize, samples.length);
  const base = {
    sequenceLen: options.sequenceLen, samplePacking: options.samplePacking === true,
    padTokenId: tokenizer.padTokenId ?? tokenizer.eosTokenIds[0] ?? 0,
  };
  if (valCount === 0) return { train: datasetOf(samples, base), val: null, dropped };
  const isVal = new Uint8Array(samples.length);
  for (const i of shuffled(samples.length, new SeededRandom(options.seed)).slice(0, valCount)) isVal[i] = 1;
  return {
    train: datasetOf(samples.filter((_, i) => isVal[i] === 0), base),
    val: datasetOf(samples.filter((_, i) => isVal[i] === 1), base),
    dropped,
  };
}

/** 0..n−1 in a seeded order (Fisher–Yates). */
function shuffled(n: number, rng: SeededRandom): number[] {
  const order = Array.from({ length: n }, (_, i) => i);
  for (let i = n - 1; i > 0; i--) {
    const j = rng.int(i + 1);
    [order[i], order[j]] = [order[j], order[i]];
  }
  return order;
}

/** The rows of one epoch: the samples in an order drawn from (seed, epoch), packed or one a row. */
function epochRows(dataset: TokenizedDataset, seed: number, epoch: number): number[][] {
  const rng = new SeededRandom((seed + Math.imul(epoch + 1, 0x9e3779b1)) >>> 0);
  return planRows(dataset.samples, shuffled(dataset.samples.length, rng), dataset.sequenceLen, dataset.samplePacking);
}

/** The micro-batch stream of datasetBatches; `epoch` and `batchInEpoch` say where the next batch comes from. */
export interface DatasetBatchSource extends BatchSource {
  readonly epoch: number;
  readonly batchInEpoch: number;
}

/**
 * How many micro-batches of `batch` rows epoch `epoch` has (packing makes it depend on the epoch's order).
 *
 * ```js
 * epochBatchCount(train, {batch: 4, seed: 42, epoch: 0});  // e.g. 13
 * ```
 */
export function epochBatchCount(dataset: TokenizedDataset, options: { batch: number; seed: number; epoch: number }): number {
  return Math.ceil(epochRows(dataset, options.seed, options.epoch).length / options.batch);
}

/**
 * The training micro-batches, epoch after epoch without end: each epoch visits every sample once
 * in a new seeded order (from `seed` and the epoch), `batch` rows a micro-batch (an epoch's last
 * one may have fewer). Made again with the same seed and `startBatch` k, it continues exactly
 * where the first stream was after k micro-batches (BatchSource's contract: how resume works).
 *
 * ```js
 * const source = datasetBatches(train, {batch: 4, seed: 42});
 * const batch = source.next();  // TrainingBatch; disposeBatch(batch) after the step
 * ```
 */
export function datasetBatches(
    dataset: TokenizedDataset, options: { batch: number; seed: number; startBatch?: number }): DatasetBatchSource {
  const op = 'datasetBatches';
  assertInteger(op, 'batch', options.batch, 1);
  assertInteger(op, 'seed', options.seed, 0, 2 ** 32 - 1);
  const startBatch = options.startBatch ?? 0;
  assertInteger(op, 'startBatch', startBatch, 0);
  const { batch, seed } = options;
  let epoch = 0;
  let rows = epochRows(dataset, seed, epoch);
  let index = startBatch;
  const advance = () => {
    while (index * batch >= rows.length) {
      index -= Math.ceil(rows.length / batch);
      rows = epochRows(dataset, seed, ++epoch);
    }
  };
  advance();
  return {
    get epoch() { return epoch; },
    get batchInEpoch() { return index; },
    next(): TrainingBatch {
      const out = rowsBatch(dataset.samples, rows.slice(index * batch, (index + 1) * batch), rowOptions(dataset));
      index++;
      advance();
      return out;
    },
  };
}

function rowOptions(dataset: TokenizedDataset) {
  return { sequenceLen: dataset.sequenceLen, packing: dataset.samplePacking, padTokenId: dataset.padTokenId };
}

/**
 * Evaluation micro-batches that visit every sample of `dataset` once, in its order (packed when the
 * dataset packs), made one at a time as the loop asks; the caller disposes each.
 *
 * ```js
 * for (const b of evaluationBatches(val, 8)) { sum += batchLoss(model, b, {training: false, normalizer: val.targetCount}).dataSync()[0]; disposeBatch(b); }
 * ```
 */
export function evaluationBatches(dataset: TokenizedDataset, batch: number): Generator<TrainingBatch> {
  assertInteger('evaluationBatches', 'batch', batch, 1);  // here, not in the generator: checked at the call
  const order = Array.from({ length: dataset.samples.length }, (_, i) => i);
  const rows = planRows(dataset.samples, order, dataset.sequenceLen, dataset.samplePacking);
  return (function* () {
    for (let r = 0; r < rows.length; r += batch) yield rowsBatch(dataset.samples, rows.slice(r, r + batch), rowOptions(dataset));
  })();
}
