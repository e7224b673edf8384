/**
 * loadDatasets, datasetBatches and evaluationBatches: truncation, dropping samples with nothing to
 * predict, the seeded validation split, packing, per-epoch seeded order, a resumed stream equal to
 * the tail of the uninterrupted one, evaluation visiting every sample once, a large file streamed,
 * and every error for bad options.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { datasetBatches, epochBatchCount, evaluationBatches, loadDatasets, type TokenizedDataset } from '../../src/data/datasets.js';
import { DatasetError } from '../../src/data/datasets_error.js';
import { MAX_JSONL_LINE_BYTES } from '../../src/data/datasets_jsonl.js';
import { CharTokenizer } from '../../src/data/tokenizer.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { disposeBatch, IGNORE_INDEX, type TrainingBatch } from '../../src/train/loss.js';
import { rejection } from '../helpers/rejection.js';

const WORDS = ['la', 'miro', 'vidi', 'so', 'tasel', 'ka', 'en', 'vora', 'lupa', 'kemi'];
const tok = CharTokenizer.fromText(WORDS.join(' ') + '?\n:');
/** 24 prompt/completion lines of different lengths; sample i's completion is 'c<i in letters>' */
const LINES = Array.from({ length: 24 }, (_, i) => ({
  prompt: `${WORDS.slice(0, 1 + (i % 7)).join(' ')}?\n`, completion: `${WORDS[i % 10]} ${WORDS[(i * 3) % 10]}${'a'.repeat(i % 5)}`,
}));

let dir: string;
async function jsonl(name: string, lines: unknown[]): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, lines.map(l => JSON.stringify(l)).join('\n'));
  return path;
}
const load = async (options: { samplePacking?: boolean; valSetSize?: number; seed?: number; sequenceLen?: number } = {}) =>
  loadDatasets([{ path: await jsonl('pc.jsonl', LINES), type: 'prompt_completion' }], tok, { sequenceLen: 40, seed: 1, ...options });
const key = (ids: ArrayLike<number>) => tok.decode(Array.from(ids));

interface Plain { ids: number[][]; labels: number[][]; segments: number[][] | null; positions: number[][] | null; targetCount: number }
function plain(b: TrainingBatch): Plain {
  const read = (t: tf.Tensor2D | null) => (t === null ? null : t.arraySync());
  const out = { ids: b.inputIds.arraySync(), labels: b.labels.arraySync(), segments: read(b.segmentIds), positions: read(b.positionIds), targetCount: b.targetCount };
  disposeBatch(b);
  return out;
}

/** the samples of a batch, as texts (packed rows cut at segment changes) */
function samplesOf(b: Plain): string[] {
  const out: string[] = [];
  b.ids.forEach((row, r) => {
    let cur: number[] = [];
    row.forEach((id, t) => {
      const seg = b.segments === null ? 1 : b.segments[r][t];
      if (t > 0 && (b.segments === null ? 1 : b.segments[r][t - 1]) !== seg && cur.length > 0) { out.push(key(cur)); cur = []; }
      if (seg !== 0) cur.push(id);
    });
    if (cur.length > 0) out.push(key(cur));
  });
  return out;
}

describe('data/datasets: splits, batches, packing, resume', () => {
  before(async () => { dir = await mkdtemp(join(tmpdir(), 'datasets-')); });
  after(() => rm(dir, { recursive: true, force: true }));

  it('splits a seeded, disjoint validation set (a fraction rounds up, or a count)', async () => {
    const texts = new Set(LINES.map(l => l.prompt + l.completion));
    for (const [valSetSize, n] of [[0.1, 3], [5, 5]] as const) {
      const a = await load({ valSetSize, seed: 3 });
      const again = await load({ valSetSize, seed: 3 });
      const other = await load({ valSetSize, seed: 4 });
      const names = (d: TokenizedDataset | null) => d!.samples.map(s => key(s.ids));
      expect(names(a.val)).to.have.length(n);
      expect(names(a.train)).to.have.length(24 - n);
      expect(new Set([...names(a.train), ...names(a.val)])).to.deep.equal(texts);
      expect(names(a.val)).to.deep.equal(names(again.val));
      expect(names(a.val)).not.to.deep.equal(names(other.val));
      expect(a.train.targetCount + a.val!.targetCount).to.equal((await load()).train.targetCount);
    }
    expect((await load()).val).to.equal(null);
  });

  it('cuts samples to sequenceLen and drops those left with nothing to predict', async () => {
    const path = await jsonl('cut.jsonl', [{ prompt: 'la miro vidi so\n', completion: 'ka' }, { prompt: 'la\n', completion: 'vora lupa kemi' }]);
    const { train, dropped } = await loadDatasets([{ path, type: 'prompt_completion' }], tok, { sequenceLen: 10, seed: 0 });
    expect(dropped).to.equal(1);
    expect(train.samples).to.have.length(1);
    expect(key(train.samples[0].ids)).to.equal('la\nvora lu');
    // 'la\n' is masked: 'vora lu' is predicted from position 2 on, and the last position predicts nothing
    expect(Array.from(train.samples[0].labels)).to.deep.equal([IGNORE_INDEX, IGNORE_INDEX, ...Array.from(tok.encode('vora lu')), IGNORE_INDEX].slice(0, 10));
  });

  for (const samplePacking of [false, true]) {
    it(`datasetBatches (packing ${samplePacking}): every sample once an epoch in a new seeded order; startBatch k continues the stream`, async () => {
      const { train } = await load({ samplePacking });
      const batch = 3;
      const counts = [0, 1, 2].map(epoch => epochBatchCount(train, { batch, seed: 9, epoch }));
      const total = counts[0] + counts[1] + counts[2];
      const before = tf.memory().numTensors;
      const source = datasetBatches(train, { batch, seed: 9 });
      const stream: Plain[] = [];
      for (let i = 0; i < total; i++) {
        expect(source.epoch).to.equal(i < counts[0] ? 0 : i < counts[0] + counts[1] ? 1 : 2);
        stream.push(plain(source.next()));
      }
      expect(tf.memory().numTensors).to.equal(before);
      const all = train.samples.map(s => key(s.ids)).sort();
      const epochs = [stream.slice(0, counts[0]), stream.slice(counts[0], counts[0] + counts[1])].map(e => e.flatMap(samplesOf));
      for (const e of epochs) expect([...e].sort()).to.deep.equal(all);
      expect(epochs[0]).not.to.deep.equal(epochs[1]);
      for (const b of stream) {
        expect(b.ids.length).to.be.at.most(batch);
        expect(b.targetCount).to.equal(b.labels.flat().filter(l => l !== IGNORE_INDEX).length);
        if (samplePacking) {
          expect(b.ids[0]).to.have.length(40);
          // positions restart at 0 with every segment
          b.segments!.forEach((row, r) => row.forEach((s, t) => {
            if (s !== 0 && (t === 0 || row[t - 1] !== s)) expect(b.positions![r][t]).to.equal(0);
            if (s !== 0 && t > 0 && row[t - 1] === s) expect(b.positions![r][t]).to.equal(b.positions![r][t - 1] + 1);
          }));
        } else {
          expect(b.ids[0].length % 8).to.equal(0);
        }
      }
      for (const k of [1, counts[0] - 1, counts[0], counts[0] + 2]) {
        const resumed = datasetBatches(train, { batch, seed: 9, startBatch: k });
        for (let i = k; i < total; i++) expect(plain(resumed.next()), `startBatch ${k}, batch ${i}`).to.deep.equal(stream[i]);
      }
      expect(plain(datasetBatches(train, { batch, seed: 10 }).next())).not.to.deep.equal(stream[0]);
    });
  }

  it('evaluationBatches visit every validation sample once, in order', async () => {
    for (const samplePacking of [false, true]) {
      const { val } = await load({ samplePacking, valSetSize: 7 });
      const before = tf.memory().numTensors;
      const seen: string[] = [];
      let targets = 0;
      for (const b of evaluationBatches(val!, 2)) {
        const p = plain(b);
        seen.push(...samplesOf(p));
        targets += p.targetCount;
      }
      expect(tf.memory().numTensors).to.equal(before);
      expect(seen).to.deep.equal(val!.samples.map(s => key(s.ids)));
      expect(targets).to.equal(val!.targetCount);
    }
  });

  it('streams a large file line by line (200k lines), and refuses a line with no end (a sparse 17 MiB file)', async function () {
    this.timeout(60000);
    const path = join(dir, 'big.jsonl');
    await writeFile(path, Array.from({ length: 200_000 }, (_, i) => `{"text":"${WORDS[i % 10]}"}`).join('\n'));
    const { train } = await loadDatasets([{ path, type: 'completion' }], tok, { sequenceLen: 8, seed: 0 });
    expect(train.samples).to.have.length(200_000);
    expect(key(train.samples[199_999].ids)).to.equal('kemi');
    const sparse = join(dir, 'sparse.jsonl');
    const handle = await open(sparse, 'w');
    await handle.truncate(MAX_JSONL_LINE_BYTES + (1 << 20));
    await handle.close();
    const e = await rejection(loadDatasets([{ path: sparse, type: 'completion' }], tok, { sequenceLen: 8, seed: 0 }));
    expect(e).to.be.instanceOf(DatasetError);
    expect(e.message).to.equal(`${sparse}:1: the line is longer than ${MAX_JSONL_LINE_BYTES} bytes (MAX_JSONL_LINE_BYTES); is this a JSON Lines file?`);
  });

  it('refuses bad options and datasets with nothing to train on, each with one clear error', async () => {
    const path = await jsonl('ok.jsonl', LINES);
    const empty = await jsonl('empty.jsonl', []);
    const masked = await jsonl('masked.jsonl', [{ prompt: 'la miro vidi so tasel ka\n', completion: 'en' }]);
    const opts = { sequenceLen: 40, seed: 0 };
    const cases: Array<[() => Promise<unknown>, new (m: string) => Error, string]> = [
      [() => loadDatasets([], tok, opts), OpArgumentError, "`loadDatasets()`: 'specs' must be a non-empty array of {path, type} but got an array of length 0"],
      [() => loadDatasets([null as never], tok, opts), OpArgumentError, "`loadDatasets()`: 'specs[0]' must be an object {path, type} but got null"],
      [() => loadDatasets([{ path: '', type: 'completion' }], tok, opts), OpArgumentError, "`loadDatasets()`: 'specs[0].path' must be a file path but got \"\" (string)"],
      [() => loadDatasets([{ path, type: 'sharegpt' as never }], tok, opts), OpArgumentError,
        "`loadDatasets()`: 'specs[0].type' must be one of completion, prompt_completion, alpaca, chat_template but got \"sharegpt\" (string)"],
      [() => loadDatasets([{ path, type: 'alpaca', field: 'x' }], tok, opts), OpArgumentError,
        "`loadDatasets()`: 'specs[0].field' must be a non-empty string, for type completion only, but got \"x\" (string) (type alpaca)"],
      [() => loadDatasets([{ path, type: 'completion' }], tok, null as never), OpArgumentError, "`loadDatasets()`: 'options' must be an object but got null"],
      [() => loadDatasets([{ path, type: 'completion' }], tok, { ...opts, sequenceLen: 1 }), OpArgumentError, "`loadDatasets()`: 'sequenceLen' must be >= 2 but got 1"],
      [() => loadDatasets([{ path, type: 'completion' }], tok, { ...opts, valSetSize: 2.5 }), OpArgumentError,
        "`loadDatasets()`: 'valSetSize' must be a fraction in (0, 1) or a whole count >= 1 but got 2.5 (number)"],
      [() => loadDatasets([{ path, type: 'prompt_completion' }], tok, { ...opts, valSetSize: 24 }), OpArgumentError,
        "`loadDatasets()`: 'valSetSize' 24 leaves no training sample: 24 of the 24 samples would validate"],
      [() => loadDatasets([{ path: empty, type: 'completion' }], tok, opts), DatasetError, `${empty}: the dataset has no line; expected one JSON object per line`],
      [() => loadDatasets([{ path: masked, type: 'prompt_completion' }], tok, { ...opts, sequenceLen: 10 }), DatasetError,
        `${masked}: no sample has a token to predict within sequenceLen 10`],
    ];
    for (const [p, cls, message] of cases) {
      const e = await rejection(p());
      expect(e, message).to.be.instanceOf(cls);
      expect(e.message).to.equal(message);
    }
    const { train } = await load();
    expect(() => datasetBatches(train, { batch: 0, seed: 1 })).to.throw("`datasetBatches()`: 'batch' must be >= 1 but got 0");
    expect(() => datasetBatches(train, { batch: 1, seed: 1, startBatch: -1 })).to.throw("`datasetBatches()`: 'startBatch' must be >= 0 but got -1");
    expect(() => evaluationBatches(train, 1.5)).to.throw("`evaluationBatches()`: 'batch' must be an integer but got 1.5 (number)");
  });
});
