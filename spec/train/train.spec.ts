/**
 * The training pieces: the loss and the evaluation against float64 references computed here from
 * the model's logits, windows, greedy generation, the loop (determinism, stop, resume, errors)
 * and the seeded inits.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { SeededRandom } from '../../src/data/random.js';
import { buildMoECausalLM, freezeBaseLayers, sparseMoELayers, trainableVariables } from '../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../src/models/families.js';
import { evaluationWindows, MAX_LOGITS_ELEMENTS, sampleWindows, windowStream } from '../../src/train/batches.js';
import { TrainError } from '../../src/train/errors.js';
import { evaluateLoss, generateGreedy, withAdaptersDisabled } from '../../src/train/evaluate.js';
import { DIVERGENCE_PATIENCE, divergence, noGradientWarning, trainLoop, type TrainWarning } from '../../src/train/loop.js';
import { register } from '../../src/plugin.js';
import { nextTokenLoss } from '../../src/train/loss.js';
import { INIT_PRESET_NAMES, presetConfig } from '../../src/train/presets.js';
import { seedAdapterInit, seedModelInit } from '../../src/train/seeded_init.js';
import { expectNoLeak } from '../helpers/numeric.js';
import { rejection } from '../helpers/rejection.js';

const VOCAB = 11;
const TINY: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: VOCAB, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};

async function tinyModel(seed = 1): Promise<tfl.LayersModel> {
  const model = buildMoECausalLM(TINY);
  // larger weights than HF's 0.02 so the logits (and the losses compared below) are not all alike
  await seedModelInit(model, seed, 0.3);
  return model;
}

/** Logits [S, V] of one token row, as float64 numbers. */
function logitsOf(model: tfl.LayersModel, ids: number[]): number[][] {
  return tf.tidy(() => (model.predict(tf.tensor2d(ids, [1, ids.length], 'int32')) as tf.Tensor).arraySync() as number[][][])[0];
}

/** float64 −log softmax(logits)[target]. */
function crossEntropy(logits: number[], target: number): number {
  const max = Math.max(...logits);
  const logSum = Math.log(logits.reduce((s, l) => s + Math.exp(l - max), 0)) + max;
  return logSum - logits[target];
}

/** float64 reference: the mean next-token cross-entropy of each row, each row run alone. */
function referenceLoss(model: tfl.LayersModel, rows: number[][]): { sum: number; count: number } {
  let sum = 0;
  let count = 0;
  for (const row of rows) {
    const logits = logitsOf(model, row.slice(0, -1));
    for (let t = 0; t + 1 < row.length; t++) {
      sum += crossEntropy(logits[t], row[t + 1]);
      count++;
    }
  }
  return { sum, count };
}

function randomTokens(n: number, seed: number): Int32Array {
  const rng = new SeededRandom(seed);
  return Int32Array.from({ length: n }, () => rng.int(VOCAB));
}

/** A text with structure to learn: a repeated pattern of the vocabulary. */
const PATTERN = Int32Array.from({ length: 400 }, (_, i) => [1, 2, 3, 4, 5, 6, 3, 7][i % 8]);

describe('train: loss, windows, evaluation, generation', () => {
  let model: tfl.LayersModel;
  before(async () => { model = await tinyModel(); });
  after(() => model.dispose());

  it('nextTokenLoss is the mean next-token cross-entropy (float64 reference)', () => {
    const rows = [[1, 5, 2, 9, 3, 3, 0], [4, 4, 10, 1, 7, 2, 6]];
    const windows = tf.tensor2d(rows, [2, 7], 'int32') as tf.Tensor2D;
    const { sum, count } = referenceLoss(model, rows);
    expectNoLeak(() => {
      const loss = nextTokenLoss(model, windows);
      expect(Math.abs(loss.dataSync()[0] - sum / count)).to.be.below(1e-5);
      loss.dispose();
    });
    windows.dispose();
  });

  it('nextTokenLoss rejects windows that are not int32 [B, S+1] with S >= 1', () => {
    const f = tf.zeros([2, 4]) as tf.Tensor2D;
    const short = tf.zeros([2, 1], 'int32') as tf.Tensor2D;
    expect(() => nextTokenLoss(model, f)).to.throw("`nextTokenLoss()`: 'windows' must be int32 but got float32 (shape [2,4])");
    expect(() => nextTokenLoss(model, short)).to.throw(
        "`nextTokenLoss()`: 'windows' must hold at least 2 tokens per row (inputs and their next tokens) but got shape [2,1]");
    tf.dispose([f, short]);
  });

  it('evaluationWindows predicts every token after the first exactly once', () => {
    expect(evaluationWindows(Int32Array.from([0, 1, 2, 3, 4, 5]), 2).map(w => Array.from(w)))
        .to.deep.equal([[0, 1, 2], [2, 3, 4], [4, 5]]);
    for (const [n, seq] of [[7, 3], [9, 4], [2, 5], [13, 1]]) {
      const tokens = Int32Array.from({ length: n }, (_, i) => i);
      const predicted = evaluationWindows(tokens, seq).flatMap(w => Array.from(w.subarray(1)));
      expect(predicted, `n ${n} seq ${seq}`).to.deep.equal(Array.from(tokens.subarray(1)));
    }
  });

  it('evaluateLoss is the mean over every predicted token of the text (float64 reference)', async () => {
    const tokens = randomTokens(23, 4);
    const windows = evaluationWindows(tokens, 5).map(w => Array.from(w));
    const { sum, count } = referenceLoss(model, windows);
    expect(count).to.equal(22);
    const before = tf.memory().numTensors;
    // batch 3 with 5 windows: full and partial batches, and a shorter last window on its own
    expect(Math.abs(await evaluateLoss(model, tokens, { seq: 5, batch: 3 }) - sum / count)).to.be.below(1e-5);
    expect(tf.memory().numTensors, 'numTensors').to.equal(before);
    expect((await rejection(evaluateLoss(model, Int32Array.from([1]), { seq: 4 }))).message)
        .to.equal('`evaluateLoss()`: the text must have at least 2 tokens but has 1');
    expect((await rejection(evaluateLoss(model, tokens, { seq: 0 }))).message).to.equal("`evaluateLoss()`: 'seq' must be >= 1 but got 0");
  });

  it('generateGreedy appends the argmax of the last position, within the context, until the stop token', async () => {
    const prompt = [3, 1, 4, 1, 5];
    const reference = (context: number, n: number) => {
      const ids = [...prompt];
      for (let i = 0; i < n; i++) {
        const logits = logitsOf(model, ids.slice(Math.max(0, ids.length - context)));
        const last = logits[logits.length - 1];
        ids.push(last.indexOf(Math.max(...last)));
      }
      return ids.slice(prompt.length);
    };
    const before = tf.memory().numTensors;
    expect(Array.from(await generateGreedy(model, Int32Array.from(prompt), { maxNewTokens: 6 }))).to.deep.equal(reference(Infinity, 6));
    expect(Array.from(await generateGreedy(model, Int32Array.from(prompt), { maxNewTokens: 6, context: 3 }))).to.deep.equal(reference(3, 6));
    expect(tf.memory().numTensors, 'numTensors').to.equal(before);
    const full = reference(Infinity, 6);
    const stop = full[2];
    const stopped = Array.from(await generateGreedy(model, Int32Array.from(prompt), { maxNewTokens: 6, stopToken: stop }));
    expect(stopped).to.deep.equal(full.slice(0, full.indexOf(stop) + 1));
    expect((await rejection(generateGreedy(model, new Int32Array(0), { maxNewTokens: 2 }))).message)
        .to.equal("`generateGreedy()`: 'prompt' must hold at least one token");
  });

  it('withAdaptersDisabled evaluates the base model and restores each layer\'s state once an async fn settles', async () => {
    const adapted = await tinyModel();
    const layers = sparseMoELayers(adapted);
    for (const l of layers) l.addAdapter({ name: 'a', r: 2, alpha: 4, targets: ['experts.gate_up', 'router'] }, 'random');
    // the 'random' init draws from tfjs's unseeded generator, and some draws moved the loss by
    // less than the 1e-3 asserted below: seeded values make the adapter's effect the same every run
    const rng = new SeededRandom(7);
    // the MoE layers' trainable weights are the adapter's factors (adding it froze their base)
    for (const w of layers.flatMap(l => l.trainableWeights)) {
      const values = Float32Array.from({ length: w.shape.reduce<number>((n, d) => n * (d ?? 1), 1) }, () => rng.next() - 0.5);
      const t = tf.tensor(values, w.shape as number[]);
      w.write(t);
      t.dispose();
    }
    const tokens = randomTokens(30, 5);
    const base = await evaluateLoss(model, tokens, { seq: 8 });
    expect(Math.abs(await evaluateLoss(adapted, tokens, { seq: 8 }) - base)).to.be.above(1e-3);
    layers[1].disableAdapters();
    const pending = withAdaptersDisabled(adapted, () => evaluateLoss(adapted, tokens, { seq: 8 }));
    // still off while the asynchronous evaluation runs
    expect(layers.map(l => l.adaptersDisabled)).to.deep.equal([true, true]);
    expect(await pending).to.equal(base);
    expect(layers.map(l => l.adaptersDisabled)).to.deep.equal([false, true]);
    // a synchronous fn: restored before it returns, and after a throw
    expect(withAdaptersDisabled(adapted, () => layers.map(l => l.adaptersDisabled))).to.deep.equal([true, true]);
    expect(() => withAdaptersDisabled(adapted, () => { throw new Error('boom'); })).to.throw('boom');
    expect(layers.map(l => l.adaptersDisabled)).to.deep.equal([false, true]);
    expect((await rejection(withAdaptersDisabled(adapted, () => Promise.reject(new Error('late')))) as Error).message).to.equal('late');
    expect(layers.map(l => l.adaptersDisabled)).to.deep.equal([false, true]);
    adapted.dispose();
  });
});

describe('train: windows and the training loop', () => {
  it('sampleWindows takes seq + 1 consecutive tokens at seeded starts', () => {
    const tokens = Int32Array.from({ length: 50 }, (_, i) => i);
    const a = sampleWindows(tokens, 4, 6, new SeededRandom(9));
    const b = sampleWindows(tokens, 4, 6, new SeededRandom(9));
    expect(a.shape).to.deep.equal([4, 7]);
    expect(a.arraySync()).to.deep.equal(b.arraySync());
    for (const row of a.arraySync() as number[][]) row.forEach((v, k) => expect(v).to.equal(row[0] + k));
    expect(() => sampleWindows(tokens.subarray(0, 5), 1, 6, new SeededRandom(1)))
        .to.throw('`sampleWindows()`: the text has 5 tokens but a window of seq 6 needs 7');
    tf.dispose([a, b]);
  });

  it('windowStream resumed at step k gives the windows of steps k + 1, k + 2, ...', () => {
    const tokens = randomTokens(200, 2);
    const whole = windowStream(tokens, 3, 5, 7);
    const steps = [whole.next(), whole.next(), whole.next(), whole.next()];
    const resumed = windowStream(tokens, 3, 5, 7, 2);
    const [third, fourth] = [resumed.next(), resumed.next()];
    expect(third.arraySync()).to.deep.equal(steps[2].arraySync());
    expect(fourth.arraySync()).to.deep.equal(steps[3].arraySync());
    expect(steps[0].arraySync()).to.not.deep.equal(steps[1].arraySync());
    tf.dispose([...steps, third, fourth]);
  });

  it('learns a repeated pattern, leaves no tensor behind and repeats its losses for a seed', async () => {
    const runs: number[][] = [];
    for (let run = 0; run < 2; run++) {
      const model = await tinyModel(3);
      const before = tf.memory().numTensors;
      const reports: number[] = [];
      const r = await trainLoop(model, PATTERN, {
        steps: 12, lr: 2e-2, batch: 4, seq: 8, seed: 5, onStep: s => reports.push(s.step),
      });
      expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
      expect(reports).to.deep.equal([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
      expect(r).to.include({ step: 12, stopped: false });
      expect(r.losses).to.have.length(12);
      expect(r.losses[11], `losses ${r.losses}`).to.be.below(0.6 * r.losses[0]);
      runs.push(r.losses);
      model.dispose();
    }
    expect(runs[1]).to.deep.equal(runs[0]);
  });

  it('stops when asked, and a resumed run continues the step count', async () => {
    const model = await tinyModel();
    let calls = 0;
    const stopped = await trainLoop(model, PATTERN, {
      steps: 10, lr: 1e-2, batch: 2, seq: 8, seed: 1, shouldStop: () => ++calls > 2,
    });
    expect(stopped).to.include({ step: 2, stopped: true });
    expect(stopped.losses).to.have.length(2);
    const resumed = await trainLoop(model, PATTERN, { steps: 4, startStep: 2, lr: 1e-2, batch: 2, seq: 8, seed: 1 });
    expect(resumed).to.include({ step: 4, stopped: false });
    expect(resumed.losses).to.have.length(2);
    model.dispose();
  });

  it('trains only the trainable variables (LoRA: the adapters)', async () => {
    const model = await tinyModel();
    for (const l of sparseMoELayers(model)) l.addAdapter({ name: 'default', r: 2, alpha: 4, targets: ['experts.down'] });
    freezeBaseLayers(model);
    const frozen = model.weights.filter(w => !/lora_/.test(w.originalName)).map(w => [w, w.read().dataSync().slice()] as const);
    await trainLoop(model, PATTERN, { steps: 2, lr: 1e-2, batch: 2, seq: 8, seed: 1 });
    for (const [w, values] of frozen) expect(Array.from(w.read().dataSync()), w.originalName).to.deep.equal(Array.from(values));
    const b = sparseMoELayers(model)[0].adapter('default').factors['experts.down']!.B;
    expect(Math.max(...Array.from(b.read().dataSync()).map(Math.abs))).to.be.above(0);
    model.dispose();
  });

  it('rejects a text shorter than one window, a model with nothing to train and bad options', async () => {
    const model = await tinyModel();
    const reject = async (p: Promise<unknown>) => {
      try { await p; } catch (e) { return e as Error; }
      throw new Error('expected a rejection');
    };
    const short = await reject(trainLoop(model, PATTERN.subarray(0, 8), { steps: 1, lr: 1e-2, batch: 1, seq: 8, seed: 1 }));
    expect(short).to.be.instanceOf(TrainError);
    expect(short.message).to.equal('the training text has 8 tokens but one window of seq 8 needs 9; use more text or a smaller seq');
    expect((await reject(trainLoop(model, PATTERN, { steps: 1, lr: 0, batch: 1, seq: 8, seed: 1 }))).message)
        .to.equal("`trainLoop()`: 'lr' must be > 0 but got 0");
    expect((await reject(trainLoop(model, PATTERN, { steps: 2, startStep: 3, lr: 1, batch: 1, seq: 8, seed: 1 }))).message)
        .to.equal("`trainLoop()`: 'startStep' must be <= 2 but got 3");
    for (const l of model.layers) l.trainable = false;
    expect((await reject(trainLoop(model, PATTERN, { steps: 1, lr: 1e-2, batch: 1, seq: 8, seed: 1 }))).message)
        .to.equal("the model 'moe_causal_lm' has no trainable weights");
    model.dispose();
  });
});

describe('train: divergence, failures and leaks', () => {
  const reject = async (p: Promise<unknown>) => {
    try { await p; } catch (e) { return e as Error; }
    throw new Error('expected a rejection');
  };
  const lnV = Math.log(VOCAB);

  it('divergence(): a collapse back to ln(vocab) after the loss was below it, a sustained blow-up, nothing else', () => {
    const stuck = Array<number>(DIVERGENCE_PATIENCE).fill(lnV * 1.001);
    expect(divergence([2.3, 1.1, 0.8, ...stuck], VOCAB)).to.equal(
      `the model collapsed: the loss is stuck at ln(vocab) = ${lnV.toFixed(4)} (the same probability for all 11 tokens) ` +
      `for the last ${DIVERGENCE_PATIENCE} steps, after it had reached 0.8000`);
    // from scratch: near ln(vocab) from the start, never clearly below it: no alarm however long
    expect(divergence([lnV, ...stuck, ...stuck, lnV * 0.95], VOCAB)).to.equal(null);
    // back near ln(vocab) for fewer steps than the patience, or still learning: no alarm
    expect(divergence([1.0, ...stuck.slice(1), 1.5], VOCAB)).to.equal(null);
    expect(divergence([2.0, 1.5, ...Array<number>(DIVERGENCE_PATIENCE).fill(1.9)], VOCAB)).to.equal(null);
    const huge = Array<number>(DIVERGENCE_PATIENCE).fill(500);
    expect(divergence([2.4, ...huge], VOCAB)).to.equal(
      `the loss diverged: it stayed above 9.600 (4 × the larger of the first loss 2.4000 and ln(vocab)) for the last ` +
      `${DIVERGENCE_PATIENCE} steps, and is 500.0`);
    expect(divergence([2.4, 20, ...huge.slice(1), 2.0], VOCAB)).to.equal(null);
    expect(divergence([2.4, ...huge], null)).to.match(/^the loss diverged/);
  });

  it('a run that collapses stops with a message that says so, a large lr that blows up too, and no tensor is left', async () => {
    const model = await tinyModel(3);
    const lmHead = model.weights.find(w => /lm_head/.test(w.originalName))!;
    const before = tf.memory().numTensors;
    // learn first (the loss goes clearly below ln V), then force uniform logits after every step from step 15 on
    const err = await reject(trainLoop(model, PATTERN, {
      steps: 100, lr: 2e-2, batch: 4, seq: 8, seed: 5,
      onStep: s => {
        if (s.step < 15) return;
        const zeros = tf.zerosLike(lmHead.read());
        lmHead.write(zeros);
        zeros.dispose();
      },
    }));
    expect(err).to.be.instanceOf(TrainError);
    expect(err.message).to.match(new RegExp(`^the model collapsed: the loss is stuck at ln\\(vocab\\) = ${lnV.toFixed(4).replace('.', '\\.')} ` +
      `\\(the same probability for all 11 tokens\\) for the last ${DIVERGENCE_PATIENCE} steps, after it had reached \\d\\.\\d{4} ` +
      `at step ${15 + DIVERGENCE_PATIENCE}; try a smaller learning rate \\(it is 0\\.02\\)$`));
    expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
    model.dispose();

    const blown = await tinyModel(1);
    const beforeBlown = tf.memory().numTensors;
    // lr 100: at 1000 the loss now falls to a dead model's ln(vocab) after 5 huge steps, since
    // rmsNorm's closed-form gradient stays right where tfjs's Rsqrt gradient overflowed
    const blownWarnings: TrainWarning[] = [];
    const blowUp = await reject(trainLoop(blown, PATTERN, {
      steps: 100, lr: 100, batch: 4, seq: 8, seed: 1, onWarning: w => blownWarnings.push(w),
    }));
    expect(blowUp).to.be.instanceOf(TrainError);
    expect(blownWarnings, 'a blow-up has gradients: no dead-model warning before the error').to.deep.equal([]);
    expect(blowUp.message).to.match(/^the loss diverged: it stayed above .* at step \d+; try a smaller learning rate \(it is 100\)$/);
    expect(tf.memory().numTensors, 'no tensor left behind').to.equal(beforeBlown);
    blown.dispose();
  });

  it('a dead model (lr 1000: every gradient 0, the loss at ln(vocab)) warns once after the patience, and stops only when asked', async () => {
    const dead = await tinyModel(1);
    const before = tf.memory().numTensors;
    const seen: Array<{ step: number; norm: number; loss: number }> = [];
    const warned: TrainWarning[] = [];
    // what the loop reports, not what it decides from: the norms and losses come from onStep
    const steps = 25;
    const run = await trainLoop(dead, PATTERN, {
      steps, lr: 1000, batch: 4, seq: 8, seed: 1,
      onStep: r => seen.push({ step: r.step, norm: r.gradNorm, loss: r.loss }),
      onWarning: w => { warned.push(w); expect(seen.at(-1)!.step, 'after the step\'s onStep').to.equal(w.step); },
    });
    // the first step whose gradients are exactly 0 and stay so: the warning comes DIVERGENCE_PATIENCE − 1 steps later
    const firstDead = seen.findIndex((s, i) => seen.slice(i).every(t => t.norm === 0)) + 1;
    expect(firstDead, 'the model dies within the first few huge steps').to.be.within(2, steps - DIVERGENCE_PATIENCE);
    expect(seen.slice(firstDead - 1).every(s => Math.abs(s.loss - lnV) < 1e-5)).to.equal(true);
    const at = firstDead + DIVERGENCE_PATIENCE - 1;
    const message = `no gradient: the gradients' global norm was exactly 0 for the last ${DIVERGENCE_PATIENCE} steps ` +
        `(steps ${firstDead}–${at}) with the loss at ${lnV.toFixed(4)} = ln(vocab), the same probability for all 11 tokens: ` +
        'nothing trains any more (a dead model; too large a learning rate? it is 1000)';
    expect(warned).to.deep.equal([{ step: at, kind: 'noGradient', message }]);
    expect(run).to.deep.include({ step: steps, stopped: false, stoppedNoGradient: false, warnings: warned });
    expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
    dead.dispose();

    const stopping = await tinyModel(1);
    const stopped = await trainLoop(stopping, PATTERN, { steps, lr: 1000, batch: 4, seq: 8, seed: 1, stopOnNoGradient: true });
    expect(stopped).to.deep.include({ step: at, stopped: false, stoppedNoGradient: true, warnings: warned });
    expect(stopped.losses).to.have.length(at);
    stopping.dispose();

    // a streak warns once, when it reaches the patience; a loss away from ln(vocab) is not called uniform
    expect(noGradientWarning(DIVERGENCE_PATIENCE - 1, 9, lnV, VOCAB, 1)).to.equal(null);
    expect(noGradientWarning(DIVERGENCE_PATIENCE + 1, 11, lnV, VOCAB, 1)).to.equal(null);
    expect(noGradientWarning(DIVERGENCE_PATIENCE, 30, 0.5, VOCAB, 0.1)!.message).to.equal(
      `no gradient: the gradients' global norm was exactly 0 for the last ${DIVERGENCE_PATIENCE} steps ` +
      `(steps ${31 - DIVERGENCE_PATIENCE}–30) with the loss at 0.5000: nothing trains any more (a dead model; too large a ` +
      'learning rate? it is 0.1)');
  });

  it('no false alarm: a from-scratch run whose loss starts and stays near ln(vocab) trains to the end', async () => {
    const model = buildMoECausalLM(TINY);
    await seedModelInit(model, 2, 0.02);  // HF's init: near-uniform logits, loss ≈ ln V at the start
    const warnings: TrainWarning[] = [];
    const slow = await trainLoop(model, PATTERN, {
      steps: 3 * DIVERGENCE_PATIENCE, lr: 1e-7, batch: 4, seq: 8, seed: 1, onWarning: w => warnings.push(w),
    });
    expect(Math.abs(slow.losses[0] - lnV)).to.be.below(0.02 * lnV);
    expect(slow.losses.every(l => Math.abs(l - lnV) < 0.02 * lnV)).to.equal(true);
    expect(slow).to.include({ step: 3 * DIVERGENCE_PATIENCE, stopped: false, stoppedNoGradient: false });
    // at ln(vocab) too, but with gradients: not a dead model
    expect(slow.warnings).to.deep.equal([]);
    const learning = await trainLoop(model, PATTERN, {
      steps: 40, lr: 2e-2, batch: 4, seq: 8, seed: 1, onWarning: w => warnings.push(w),
    });
    expect(learning.losses.at(-1)).to.be.below(0.5 * lnV);
    expect(learning.warnings).to.deep.equal([]);
    expect(warnings, 'onWarning was never called').to.deep.equal([]);
    model.dispose();
  });

  it('every failing trainLoop leaves no tensor: a non-finite loss, a throwing forward pass, a throwing onStep', async () => {
    const model = await tinyModel();
    const embed = model.weights.find(w => /embed/.test(w.originalName))!;
    const saved = embed.read().clone();
    let before = tf.memory().numTensors;
    const nans = tf.fill(embed.shape as number[], NaN);
    embed.write(nans);
    nans.dispose();
    const nan = await reject(trainLoop(model, PATTERN, { steps: 3, lr: 1e-2, batch: 2, seq: 8, seed: 1 }));
    expect(nan.message).to.equal('the loss became NaN at step 1; try a smaller learning rate (it is 0.01)');
    expect(tf.memory().numTensors, 'non-finite loss').to.equal(before);
    // the non-finite step was not applied: every other weight is as it was
    for (const w of trainableVariables(model)) expect(w.dataSync().every(Number.isFinite), w.name).to.equal(w.name.includes('embed') ? false : true);
    embed.write(saved);
    saved.dispose();

    // a layer deep in the model throws after others saved tensors for the backward pass
    const layer = sparseMoELayers(model)[1];
    const call = layer.call.bind(layer);
    layer.call = () => { throw new Error('boom in the second MoE layer'); };
    before = tf.memory().numTensors;
    expect((await reject(trainLoop(model, PATTERN, { steps: 3, lr: 1e-2, batch: 2, seq: 8, seed: 1 }))).message).to.equal('boom in the second MoE layer');
    expect(tf.memory().numTensors, 'throwing forward pass').to.equal(before);
    layer.call = call;

    before = tf.memory().numTensors;
    const onStep = await reject(trainLoop(model, PATTERN, {
      steps: 3, lr: 1e-2, batch: 2, seq: 8, seed: 1, onStep: () => { throw new Error('from onStep'); } }));
    expect(onStep.message).to.equal('from onStep');
    expect(tf.memory().numTensors, 'throwing onStep').to.equal(before);
    model.dispose();
  });

  it('unregister() during training stops with a TrainError that says what happened, and leaves no tensor', async () => {
    const model = await tinyModel();
    const handle = register({ models: [model], lora: { r: 2, alpha: 4, targets: ['experts.down'] } });
    const adapters = 2 * 2;  // A and B on each of the 2 layers, removed by unregister()
    const before = tf.memory().numTensors;
    const err = await reject(trainLoop(model, PATTERN, {
      steps: 5, lr: 1e-2, batch: 2, seq: 8, seed: 1, onStep: s => { if (s.step === 2) handle.unregister(); } }));
    expect(err).to.be.instanceOf(TrainError);
    expect(err.message).to.equal("the model's trainable weights changed during training, before step 3 (was the plugin " +
      'unregistered or an adapter removed?); the loop trains the weights it started with');
    expect(tf.memory().numTensors).to.equal(before - adapters);
    model.dispose();
  });

  it('a batch whose logits cannot fit in a tensor is one clear error before anything is allocated', async () => {
    const model = await tinyModel();
    const before = tf.memory().numTensors;
    const err = await reject(trainLoop(model, PATTERN, { steps: 1, lr: 1e-2, batch: 1e9, seq: 8, seed: 1 }));
    expect(err.message).to.equal("`trainLoop()`: 'batch' × 'seq' × vocab (1000000000 × 8 × 11 = 8.800e+10 logits) must be at " +
      `most ${MAX_LOGITS_ELEMENTS} (2^30, 4 GiB of float32); use a smaller batch or seq`);
    expect(tf.memory().numTensors).to.equal(before);
    model.dispose();
  });
});

describe('train: seeded inits and presets', () => {
  it('seedModelInit gives the same weights for a seed, keeps the norms at 1 and draws with the given std', async () => {
    const [a, b, c] = [await tinyModel(4), await tinyModel(4), await tinyModel(5)];
    const values = (m: tfl.LayersModel) => m.weights.map(w => Array.from(w.read().dataSync()));
    expect(values(b)).to.deep.equal(values(a));
    expect(values(c)).to.not.deep.equal(values(a));
    const norm = a.weights.find(w => /input_layernorm/.test(w.originalName))!;
    expect(Array.from(norm.read().dataSync()).every(v => v === 1)).to.equal(true);
    const gateUp = Array.from(sparseMoELayers(a)[0].weightVariable('gate_up').read().dataSync());
    const std = Math.sqrt(gateUp.reduce((s, v) => s + v * v, 0) / gateUp.length);
    expect(std).to.be.within(0.27, 0.33);
    for (const m of [a, b, c]) m.dispose();
  });

  it('seedAdapterInit draws A from U(±1/√in) the same way for a seed and keeps B at zero', async () => {
    const draw = async () => {
      const model = await tinyModel();
      for (const l of sparseMoELayers(model)) l.addAdapter({ name: 'default', r: 2, alpha: 4, targets: ['experts.gate_up', 'experts.down'] });
      seedAdapterInit(model, 'default', 8);
      const f = sparseMoELayers(model)[1].adapter('default').factors;
      const out = {
        a: Array.from(f['experts.down']!.A.read().dataSync()),
        b: Array.from(f['experts.down']!.B.read().dataSync()),
      };
      model.dispose();
      return out;
    };
    const [x, y] = [await draw(), await draw()];
    expect(y.a).to.deep.equal(x.a);
    const bound = 1 / Math.sqrt(8);  // in = I = 8 for experts.down
    expect(Math.max(...x.a.map(Math.abs))).to.be.within(0.8 * bound, bound);
    expect(x.b.every(v => v === 0)).to.equal(true);
  });

  it('every preset builds a model of its family with hidden 64, 2 layers and 8 experts (top-2)', () => {
    for (const name of INIT_PRESET_NAMES) {
      const config = presetConfig(name, 31);
      const model = buildMoECausalLM(config);
      const layers = sparseMoELayers(model);
      expect(config['model_type'], name).to.equal(name);
      expect(layers.map(l => [l.numExperts, l.routing.topK, l.weightVariable('router_weight').shape[1]]), name)
          .to.deep.equal([[8, 2, 64], [8, 2, 64]]);
      expect(model.outputs[0].shape[2]).to.equal(31);
      model.dispose();
    }
  });
});
