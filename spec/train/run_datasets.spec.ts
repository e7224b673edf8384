/**
 * runTraining on JSON Lines datasets: the first step's loss is batchLoss of datasetBatches' first
 * micro-batch (the data reaches the loop as loadDatasets made it), the validation split is what
 * evaluateDatasetLoss measures, a run resumed from a checkpoint repeats the uninterrupted losses
 * exactly (the source continues at the micro-batch it stopped at), a from-scratch run takes an HF
 * tokenizer folder, and the refusals.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { validatePluginArgs } from '../../src/args/validate.js';
import { datasetBatches, loadDatasets, type DatasetSpec } from '../../src/data/datasets.js';
import { readTokenizer } from '../../src/data/tokenizer_file.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { TrainError } from '../../src/train/errors.js';
import { evaluateDatasetLoss } from '../../src/train/evaluate.js';
import { batchLoss, disposeBatch } from '../../src/train/loss.js';
import { runTraining, type TrainRunOptions } from '../../src/train/run.js';
import { writeChatModel } from '../helpers/chat_model.js';
import { cleanup, tempDir } from '../io/checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';

const TOPICS = ['rain', 'snow', 'wind', 'sun', 'fog', 'hail', 'dew', 'frost', 'mist', 'cloud'];
const CHATS = TOPICS.map(t => JSON.stringify({
  messages: [{ role: 'user', content: `what is ${t}` }, { role: 'assistant', content: `${t} is weather` }],
})).join('\n');
const COMPLETIONS = TOPICS.map(t => JSON.stringify({ prompt: `say ${t}:`, completion: ` ${t} ${t}` })).join('\n');

describe('train/run on datasets', () => {
  let dir: string;
  let model: string;
  let chats: DatasetSpec[];
  let run: (over: Partial<TrainRunOptions>) => TrainRunOptions;
  before(async () => {
    dir = await tempDir('run-datasets-');
    model = await writeChatModel(join(dir, 'chat-model'));
    await writeFile(join(dir, 'chats.jsonl'), CHATS);
    await writeFile(join(dir, 'completions.jsonl'), COMPLETIONS);
    chats = [{ path: join(dir, 'chats.jsonl'), type: 'chat_template' }];
    run = over => ({
      model, datasets: chats, valSetSize: 2, samplePacking: true, steps: 4, lr: 5e-3, batch: 2, seq: 64, seed: 3,
      out: join(dir, 'out'), overwrite: true, progress: { quiet: true },
      plugin: validatePluginArgs({ lora: { r: 2, alpha: 4, targets: ['q_proj', 'v_proj', 'experts.gate_up'] } }),
      ...over,
    });
  });
  after(cleanup);

  it('trains on the micro-batches datasetBatches makes and evaluates the split off samples', async () => {
    const before = tf.memory().numTensors;
    const r = await runTraining(run({}));
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    // the same split and first micro-batch, made here; the adapter starts with B = 0: the base model's loss
    const tokenizer = await readTokenizer(model);
    const { train, val } = await loadDatasets(chats, tokenizer, { sequenceLen: 64, samplePacking: true, valSetSize: 2, seed: 3 });
    expect(val!.samples).to.have.length(2);
    const base = await loadHFCheckpoint(model);
    try {
      const first = datasetBatches(train, { batch: 2, seed: 3 }).next();
      const loss = batchLoss(base, first, { training: false });
      expect(Math.abs(r.firstLoss! - loss.dataSync()[0])).to.be.below(1e-5);
      tf.dispose(loss);
      disposeBatch(first);
      expect(Math.abs(r.valLossBefore! - await evaluateDatasetLoss(base, val!, 2))).to.be.below(1e-5);
    } finally {
      base.dispose();
    }
    expect(r.trainTokens).to.equal(train.targetCount);
    expect(r.valLossAfter).to.be.below(r.valLossBefore!);
    expect(r.files).to.deep.equal(['adapter_config.json', 'adapter_model.safetensors']);
  });

  it('a run resumed from checkpoint-2 repeats steps 3 and 4 of the uninterrupted run exactly', async () => {
    const full = await runTraining(run({ out: join(dir, 'full'), saveEvery: 2 }));
    const resumed = await runTraining(run({ out: join(dir, 'resumed'), resume: join(dir, 'full', 'checkpoint-2') }));
    expect(full.losses).to.have.length(4);
    expect(resumed.losses).to.deep.equal(full.losses.slice(2));
  });

  it('from scratch with an HF tokenizer folder, on prompt/completion data (answers only)', async () => {
    const r = await runTraining({
      initConfig: 'qwen3_moe', tokenizer: model, datasets: [{ path: join(dir, 'completions.jsonl'), type: 'prompt_completion' }],
      steps: 2, lr: 1e-2, batch: 4, seq: 24, seed: 1, out: join(dir, 'scratch'), progress: { quiet: true }, plugin: validatePluginArgs({}),
    });
    const tokenizer = await readTokenizer(model);
    const { train } = await loadDatasets([{ path: join(dir, 'completions.jsonl'), type: 'prompt_completion' }], tokenizer,
        { sequenceLen: 24, seed: 1 });
    expect(r.vocabSize).to.equal(tokenizer.vocabSize);
    expect(r.trainTokens).to.equal(train.targetCount);
    expect(r.files).to.include('tokenizer.json');
  });

  it('refuses a held-out text with datasets, a tokenizer folder for a model, and datasets from scratch without one', async () => {
    const cases: Array<[Partial<TrainRunOptions>, string]> = [
      [{ val: 'v.txt' }, 'val (a held-out text file) goes with data; with datasets, split validation samples off with valSetSize'],
      [{ tokenizer: 'x' }, 'tokenizer is for a from-scratch run (initConfig): a model folder brings its own tokenizer.json'],
      [{ model: undefined, initConfig: 'qwen3_moe', plugin: validatePluginArgs({}) },
        'a from-scratch run on datasets needs a tokenizer folder (tokenizer): the character tokenizer is built from the text file of data'],
    ];
    for (const [over, message] of cases) {
      const e = await rejection(runTraining(run({ out: join(dir, 'bad'), ...over })));
      expect(e, message).to.be.instanceOf(TrainError);
      expect(e.message).to.equal(message);
    }
  });
});
