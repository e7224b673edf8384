/**
 * runTraining with the loop's features, through files: checkpoints (atomic, pruned, with the
 * optimizer and trainer state), JSONL metrics, periodic evaluation, and a run resumed from a
 * checkpoint folder that repeats the uninterrupted run's losses bit for bit (cpu, same seed).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { validatePluginArgs } from '../../src/args/validate.js';
import { loadTrainCheckpoint, saveTrainCheckpoint } from '../../src/train/checkpoint.js';
import { TrainError } from '../../src/train/errors.js';
import { openMetricsLog } from '../../src/train/metrics.js';
import { runTraining, type TrainRunOptions } from '../../src/train/run.js';
import { learningRateAt } from '../../src/train/schedule.js';
import { FileError } from '../../src/util/files.js';
import { cleanup, tempDir } from '../io/checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';

const TEXT = 'la miro vidi so tasel. ka en vora lupa la kemi?\n'.repeat(8);
const VAL = 'so kemi lupa la miro.\n'.repeat(3);
const TINY_CONFIG = {
  model_type: 'qwen3_moe', hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1,
  head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8, norm_topk_prob: true, rms_norm_eps: 1e-6,
};

describe('train/run: checkpoints, metrics, evaluation and resume', () => {
  let dir: string;
  let run: (over: Partial<TrainRunOptions>) => TrainRunOptions;
  before(async () => {
    dir = await tempDir('run-loop-');
    await writeFile(join(dir, 'data.txt'), TEXT);
    await writeFile(join(dir, 'val.txt'), VAL);
    await writeFile(join(dir, 'config.json'), JSON.stringify(TINY_CONFIG));
    run = over => ({
      initConfig: join(dir, 'config.json'), data: join(dir, 'data.txt'), val: join(dir, 'val.txt'),
      steps: 6, lr: 1e-2, batch: 2, seq: 8, seed: 4, out: join(dir, 'out'), plugin: validatePluginArgs({}),
      lrScheduler: 'linear', warmupSteps: 1, gradAccum: 2, maxGradNorm: 1, progress: { quiet: true }, ...over,
    });
  });
  after(cleanup);

  it('writes pruned checkpoints and metrics; a run resumed from checkpoint-4 repeats steps 5 and 6 exactly', async () => {
    const metrics = join(dir, 'metrics.jsonl');
    const before = tf.memory().numTensors;
    const full = await runTraining(run({ saveEvery: 2, saveTotalLimit: 2, evalEvery: 3, metrics }));
    expect(tf.memory().numTensors).to.equal(before);
    const out = join(dir, 'out');
    const entries = (await readdir(out)).sort();
    // the final save beside the newest two checkpoints; nothing temporary left
    expect(entries).to.deep.equal(['checkpoint-4', 'checkpoint-6', 'config.json', 'model.safetensors', 'tokenizer.json']);
    expect((await readdir(join(out, 'checkpoint-4'))).sort())
        .to.deep.equal(['config.json', 'model.safetensors', 'optimizer.safetensors', 'tokenizer.json', 'trainer_state.json']);

    const lines = (await readFile(metrics, 'utf8')).trimEnd().split('\n').map(l => JSON.parse(l) as Record<string, number | string>);
    const train = lines.filter(l => l.type === 'train');
    expect(train.map(l => l.step)).to.deep.equal([1, 2, 3, 4, 5, 6]);
    expect(train.map(l => l.loss)).to.deep.equal(full.losses);
    expect(train.map(l => l.learning_rate)).to.deep.equal([1, 2, 3, 4, 5, 6].map(s => learningRateAt('linear', s, { lr: 1e-2, totalSteps: 6, warmupSteps: 1 })));
    for (const l of train) {
      expect(l.grad_norm).to.be.a('number').above(0);
      expect(l.tokens).to.equal(2 * 2 * 8);
      expect(l.elapsed).to.be.a('number').above(0);
      expect(l.tokens_per_second).to.be.a('number').above(0);
    }
    const evals = lines.filter(l => l.type === 'eval');
    expect(evals.map(l => l.step)).to.deep.equal([3, 6]);
    expect(evals[1].eval_loss).to.equal(full.valLossAfter);

    const state = await loadTrainCheckpoint(join(out, 'checkpoint-4'));
    expect(state.state).to.include({ step: 4, microBatches: 8 });
    expect(state.state.losses).to.deep.equal(full.losses.slice(0, 4));

    const resumed = await runTraining(run({ out: join(dir, 'out2'), resume: join(out, 'checkpoint-4'), evalEvery: 3, metrics }));
    expect(tf.memory().numTensors).to.equal(before);
    expect(resumed.steps).to.equal(6);
    expect(resumed.losses).to.deep.equal(full.losses.slice(4));
    expect(resumed.valLossAfter).to.equal(full.valLossAfter);
    // the metrics file goes on where the checkpoint's run was
    const appended = (await readFile(metrics, 'utf8')).trimEnd().split('\n').slice(lines.length).map(l => JSON.parse(l));
    expect(appended.map(l => [l.type, l.step])).to.deep.equal([['train', 5], ['train', 6], ['eval', 6]]);
    expect(await readFile(join(dir, 'out2', 'model.safetensors'))).to.deep.equal(await readFile(join(out, 'model.safetensors')));
  });

  it('refuses a resume whose options would not continue the curve, and a folder that is not a checkpoint', async () => {
    const out = join(dir, 'out');
    const e = await rejection(runTraining(run({ out: join(dir, 'out3'), resume: join(out, 'checkpoint-6'), lr: 2e-2, gradAccum: 1 })));
    expect(e).to.be.instanceOf(TrainError);
    expect(e.message).to.equal(`the run differs from the checkpoint '${join(out, 'checkpoint-6')}' it resumes, which would not ` +
        'continue its loss curve: lr 0.02 (checkpoint: 0.01), gradAccum 1 (checkpoint: 2)');
    const fake = join(dir, 'fake');
    await mkdir(fake, { recursive: true });
    await writeFile(join(fake, 'trainer_state.json'), JSON.stringify({ format: 'other', step: -1 }));
    expect((await rejection(loadTrainCheckpoint(fake))).message)
        .to.equal(`'${fake}' is not a training checkpoint this package wrote: its trainer_state.json must have format 'tfjs-moe-lora trainer state'`);
    await writeFile(join(fake, 'trainer_state.json'), JSON.stringify({ format: 'tfjs-moe-lora trainer state', step: -1, micro_batches: 0, adam_step: 0, variables: 0, losses: ['x'], options: {} }));
    expect((await rejection(loadTrainCheckpoint(fake))).message)
        .to.equal(`'${fake}' is not a training checkpoint this package wrote: 'step' must be an integer >= 0 but is -1; 'losses' must be a list of numbers`);
  });

  it('a checkpoint whose model save fails leaves nothing behind, and the older checkpoints stay', async () => {
    const out = join(dir, 'atomic');
    const state = { step: 2, microBatches: 2, losses: [1, 0.5], evalLosses: [], optimizer: { step: 2, m: [Float32Array.of(1)], v: [Float32Array.of(2)] }, seconds: 1 };
    await saveTrainCheckpoint(out, state, { lr: 1 }, async d => { await writeFile(join(d, 'weights.bin'), 'w'); });
    const failed = await rejection(saveTrainCheckpoint(out, { ...state, step: 4 }, { lr: 1 }, async d => {
      await writeFile(join(d, 'weights.bin'), 'half');
      throw new Error('disk full');
    }));
    expect(failed.message).to.equal('disk full');
    expect(await readdir(out)).to.deep.equal(['checkpoint-2']);
    const back = await loadTrainCheckpoint(join(out, 'checkpoint-2'));
    expect(back.state.optimizer.m).to.deep.equal([Float32Array.of(1)]);
    expect(back.options).to.deep.equal({ lr: 1 });
    for (const step of [4, 6]) await saveTrainCheckpoint(out, { ...state, step }, { lr: 1 }, async () => {}, 2);
    expect((await readdir(out)).sort()).to.deep.equal(['checkpoint-4', 'checkpoint-6']);
  });

  it('refuses data with datasets (or neither), dataset options on a text, no length, evaluation without validation data, and an unwritable metrics file', async () => {
    const cases: Array<[Partial<TrainRunOptions>, string]> = [
      [{ datasets: [{ path: 'a.jsonl', type: 'alpaca' }] }, 'give exactly one of data (a text file) and datasets (JSON Lines files)'],
      [{ data: undefined }, 'give exactly one of data (a text file) and datasets (JSON Lines files)'],
      [{ samplePacking: true, valSetSize: 2 }, 'samplePacking, valSetSize: for datasets (JSON Lines files), not for the text file of data'],
      [{ steps: undefined }, 'give steps (max_steps) or numEpochs'],
      [{ val: undefined, evalEvery: 2 }, 'evalEvery needs validation data: val (with data) or valSetSize (with datasets)'],
    ];
    for (const [over, message] of cases) {
      const e = await rejection(runTraining(run({ out: join(dir, 'bad'), ...over })));
      expect(e, message).to.be.instanceOf(TrainError);
      expect(e.message).to.equal(message);
    }
    expect(() => openMetricsLog(join(dir, 'missing', 'm.jsonl'), false)).to.throw(FileError,
        `the metrics file '${join(dir, 'missing', 'm.jsonl')}' cannot be opened for writing: ENOENT`);
  });

  it('numEpochs without steps: ceil(tokens / (batch · seq · gradAccum)) steps per epoch', async () => {
    const r = await runTraining(run({ out: join(dir, 'epochs'), steps: undefined, numEpochs: 0.5, val: undefined }));
    expect(r.steps).to.equal(Math.ceil(0.5 * r.trainTokens / (2 * 8 * 2)));
  });
});
