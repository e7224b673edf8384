/**
 * RotaryAttention under a SequenceContext, through whole models: packed samples (segment ids,
 * positions restarting at 0) give each sample the logits it has alone; right padding leaves the
 * real tokens' logits unchanged; batchLoss over packed and padded batches equals the float64
 * cross-entropy of the samples run one by one. With a sliding window (Mixtral) too.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { planRows, rowsBatch, toSample, type TokenizedSample } from '../../src/data/datasets_rows.js';
import { buildMoECausalLM, trainableVariables } from '../../src/layers/moe_causal_lm.js';
import { rotaryTablesAt } from '../../src/layers/rotary.js';
import { passConstant, passScalar } from '../../src/ops/pass_constants.js';
import { passPerCall, withSequenceContext } from '../../src/layers/sequence_context.js';
import { fileIO } from '../../src/io/file_io_handler.js';
import { loadModelDir } from '../../src/io/model_dir.js';
import type { HFConfig } from '../../src/models/families.js';
import { batchLoss, disposeBatch, IGNORE_INDEX } from '../../src/train/loss.js';
import { Adam } from '../../src/train/optimizer.js';
import { linearCrossEntropy } from '../../src/ops/linear_cross_entropy.js';
import { seedModelInit } from '../../src/train/seeded_init.js';
import { cleanup, fixtureConfig, tempDir } from '../io/checkpoint_helpers.js';
import { expectNoLeak } from '../helpers/numeric.js';

const VOCAB = 11;
const QWEN3: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: VOCAB, hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};
const SAMPLES = [[1, 5, 2, 9, 3], [4, 10, 7], [8, 1, 1, 6, 2, 0]];
/** sample s trains on every token but its first two */
const sampleOf = (ids: number[]): TokenizedSample =>
  toSample({ ids: Int32Array.from(ids), trained: Uint8Array.from(ids.map((_, t) => (t >= 2 ? 1 : 0))) }, 16);

/** logits [len, V] of one sample run alone, no context */
function alone(model: tfl.LayersModel, ids: number[]): number[][] {
  return tf.tidy(() => (model.predict(tf.tensor2d([ids], [1, ids.length], 'int32')) as tf.Tensor).arraySync() as number[][][])[0];
}

/** float64 −log softmax(logits)[target] */
function crossEntropy(logits: number[], target: number): number {
  const max = Math.max(...logits);
  return Math.log(logits.reduce((s, l) => s + Math.exp(l - max), 0)) + max - logits[target];
}

function maxDiff(a: number[][], b: number[][]): number {
  let m = 0;
  a.forEach((row, i) => row.forEach((v, j) => { m = Math.max(m, Math.abs(v - b[i][j])); }));
  return m;
}

async function models(): Promise<Array<[string, tfl.LayersModel]>> {
  const mixtral = { ...(await fixtureConfig('mixtral')), sliding_window: 3, layer_types: ['sliding_attention', 'sliding_attention'] };
  // gpt_oss: sinks, YaRN, a sliding layer (window 3) then a full one
  const gptOss = { ...(await fixtureConfig('gpt_oss')), sliding_window: 3 };
  const out: Array<[string, tfl.LayersModel]> = [['qwen3_moe', buildMoECausalLM(QWEN3)], ['mixtral, sliding window 3', buildMoECausalLM(mixtral)],
    ['gpt_oss, sinks, YaRN, sliding window 3 then full', buildMoECausalLM(gptOss)]];
  for (const [i, [, m]] of out.entries()) await seedModelInit(m, 3 + i, 0.3);
  return out;
}

describe('layers: RotaryAttention under a SequenceContext', () => {
  let built: Array<[string, tfl.LayersModel]>;
  before(async () => { built = await models(); });
  after(() => built.forEach(([, m]) => m.dispose()));

  it('packed samples never see each other: each one\'s logits equal its logits alone', () => {
    for (const [label, model] of built) {
      const samples = SAMPLES.map(sampleOf);
      const rows = planRows(samples, [0, 1, 2], 16, true);
      expect(rows).to.deep.equal([[0, 1, 2]]);
      const batch = rowsBatch(samples, rows, { sequenceLen: 16, packing: true, padTokenId: 0 });
      expect(Array.from(batch.segmentIds!.dataSync())).to.deep.equal([1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 0, 0]);
      expect(Array.from(batch.positionIds!.dataSync())).to.deep.equal([0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 0]);
      expectNoLeak(() => {
        const packed = tf.tidy(() => (withSequenceContext(batch, () => model.predict(batch.inputIds)) as tf.Tensor).arraySync() as number[][][])[0];
        let at = 0;
        for (const ids of SAMPLES) {
          expect(maxDiff(packed.slice(at, at + ids.length), alone(model, ids)), label).to.be.at.most(1e-5);
          at += ids.length;
        }
        // and without the context the same row mixes the samples (the check above can fail)
        const mixed = tf.tidy(() => (model.predict(batch.inputIds) as tf.Tensor).arraySync() as number[][][])[0];
        expect(maxDiff(mixed.slice(5, 8), alone(model, SAMPLES[1]))).to.be.above(1e-3);
      }, label);
      // no label predicts across a boundary: the last token of each sample predicts nothing
      const labels = Array.from(batch.labels.dataSync());
      expect(labels).to.deep.equal([-100, 2, 9, 3, -100, -100, 7, -100, -100, 1, 6, 2, 0, -100, -100, -100].map(l => (l === -100 ? IGNORE_INDEX : l)));
      disposeBatch(batch);
    }
  });

  it('right padding leaves the real tokens\' logits unchanged', () => {
    for (const [label, model] of built) {
      const samples = SAMPLES.map(sampleOf);
      const batch = rowsBatch(samples, [[0], [1], [2]], { sequenceLen: 16, packing: false, padTokenId: 3 });
      expect(batch.inputIds.shape).to.deep.equal([3, 8]);
      expect(batch.positionIds).to.equal(null);
      expect(Array.from(batch.segmentIds!.dataSync()).slice(8, 16)).to.deep.equal([1, 1, 1, 0, 0, 0, 0, 0]);
      expectNoLeak(() => {
        const padded = tf.tidy(() => (withSequenceContext(batch, () => model.predict(batch.inputIds)) as tf.Tensor).arraySync() as number[][][]);
        SAMPLES.forEach((ids, r) => expect(maxDiff(padded[r].slice(0, ids.length), alone(model, ids)), label).to.be.at.most(1e-5));
      }, label);
      disposeBatch(batch);
    }
  });

  it('batchLoss over packed and padded batches equals the float64 loss of the samples run one by one', () => {
    for (const [label, model] of built) {
      const samples = SAMPLES.map(sampleOf);
      let sum = 0;
      let count = 0;
      SAMPLES.forEach((ids, i) => {
        const logits = alone(model, ids);
        samples[i].labels.forEach((l, t) => { if (l !== IGNORE_INDEX) { sum += crossEntropy(logits[t], l); count++; } });
      });
      expect(count).to.equal(3 + 1 + 4);
      for (const packing of [true, false]) {
        const rows = packing ? [[2, 0], [1]] : [[0], [1], [2]];
        const batch = rowsBatch(samples, rows, { sequenceLen: 16, packing, padTokenId: 0 });
        expect(batch.targetCount).to.equal(count);
        expectNoLeak(() => {
          const loss = batchLoss(model, batch, { training: false });
          expect(Math.abs(loss.dataSync()[0] - sum / count), `${label}, packing ${packing}`).to.be.below(1e-5);
          loss.dispose();
        });
        disposeBatch(batch);
      }
    }
  });

  it('refuses context ids of another shape or dtype and positions outside the table', () => {
    const model = built[0][1];
    const ids = tf.tensor2d([[1, 2, 3]], [1, 3], 'int32');
    const short = tf.tensor2d([[1, 1]], [1, 2], 'int32');
    const float = tf.tensor2d([[0, 1, 2]], [1, 3], 'float32');
    const far = tf.tensor2d([[0, 1, 3]], [1, 3], 'int32');
    expect(() => withSequenceContext({ segmentIds: short }, () => model.predict(ids)))
      .to.throw("`RotaryAttention.call()`: 'context.segmentIds' must be [batch, seq] [1,3] but is [1,2]");
    expect(() => withSequenceContext({ positionIds: float as tf.Tensor2D }, () => model.predict(ids)))
      .to.throw("`RotaryAttention.call()`: 'context.positionIds' must be int32 but got float32 (shape [1,3])");
    expect(() => withSequenceContext({ positionIds: far }, () => model.predict(ids)))
      .to.throw("`rotaryTablesAt()`: 'positionIds' must hold positions in [0, 2] but holds 3 at index 2");
    expect(() => rotaryTablesAt(far, 8, 100, 3)).to.throw("`rotaryTablesAt()`: 'positionIds' must hold positions in [0, 2] but holds 3 at index 2");
    tf.dispose([ids, short, float, far]);
  });
});

describe('ops: passConstant, passScalar', () => {
  after(cleanup);
  it('builds a constant once per key inside a pass, shares it, disposes it when the pass returns; outside a pass builds every time', () => {
    let builds = 0;
    const build = () => { builds++; return { cos: tf.ones([2, 4]), sin: tf.zeros([2, 4]) }; };
    const before = tf.memory().numTensors;
    const [a, b, c] = withSequenceContext({}, () => tf.tidy(() => {
      const first = passConstant('tables/2', build);
      const again = passConstant('tables/2', build);
      const other = passConstant('tables/3', build);
      // a tidy inside the pass leaves the shared tensors alone
      tf.tidy(() => tf.add(first.cos, 1));
      expect(first.cos.isDisposed).to.equal(false);
      return [first, again, other];
    }));
    expect(builds).to.equal(2);
    expect(b).to.equal(a);
    expect(c).to.not.equal(a);
    // the pass has returned: its constants are gone, nothing is left behind
    expect([a.cos, a.sin, c.cos, c.sin].every(t => t.isDisposed)).to.equal(true);
    expect(tf.memory().numTensors).to.equal(before);
    // nested passes keep their own constants; the inner one's are disposed when it returns
    withSequenceContext({}, () => {
      const outer = passConstant('mask', () => tf.ones([3]));
      const inner = withSequenceContext({}, () => passConstant('mask', () => tf.zeros([3])));
      expect(inner.isDisposed).to.equal(true);
      expect(outer.isDisposed).to.equal(false);
    });
    expect(tf.memory().numTensors).to.equal(before);
    // scalars: one tensor per value inside a pass (0 and -0 apart), the number itself outside
    expect(passScalar(0.5)).to.equal(0.5);
    withSequenceContext({}, () => {
      const half = passScalar(0.5) as tf.Scalar;
      expect(half).to.be.instanceOf(tf.Tensor);
      expect(passScalar(0.5)).to.equal(half);
      expect(Array.from(half.dataSync())).to.deep.equal([0.5]);
      expect(passScalar(-0)).to.not.equal(passScalar(0));
    });
    expect(tf.memory().numTensors).to.equal(before);
    const owned = passConstant('tables/2', build);
    expect(builds).to.equal(3);
    expect(owned.cos.isDisposed).to.equal(false);
    tf.dispose([owned.cos, owned.sin]);
  });

  /** counts tensors made from host values (the mask and the tables are; kernels' outputs are not) while `fn` runs */
  function countFromHost<T>(fn: () => T): { out: T; fromHost: number } {
    const engine = tf.engine() as unknown as { makeTensor: (...args: unknown[]) => tf.Tensor };
    const makeTensor = engine.makeTensor;
    let fromHost = 0;
    engine.makeTensor = (...args: unknown[]) => { fromHost++; return makeTensor.apply(engine, args); };
    try {
      return { out: fn(), fromHost };
    } finally {
      engine.makeTensor = makeTensor;
    }
  }
  /**
   * Runs `fn` with LayersModel's own call / predict on `model`, without passPerCall's per-instance
   * hooks: every layer builds its own constants, as before passPerCall.
   */
  function unhooked<T>(model: tfl.LayersModel, fn: () => T): T {
    const methods = ['call', 'predict', 'predictOnBatch'] as const;
    const hooks = methods.map(k => {
      expect(Object.hasOwn(model, k), `passPerCall hooked ${k}`).to.equal(true);
      const hook = model[k];
      delete (model as unknown as Record<string, unknown>)[k];
      return hook;
    });
    try {
      return fn();
    } finally {
      methods.forEach((k, i) => Object.assign(model, { [k]: hooks[i] }));
    }
  }
  const bits = (t: tf.Tensor) => Array.from(new Uint32Array((t.dataSync() as Float32Array).slice().buffer));

  it('a model pass builds the causal mask, rotary tables and operands and norms\' ε once for all its layers, under a context and in a plain model.apply / predict, and trains as without sharing', async () => {
    const model = buildMoECausalLM(QWEN3, { name: 'shared_constants' });
    await seedModelInit(model, 3, 0.3);
    const ids = tf.tensor2d([[1, 5, 2, 9, 3, 4]], [1, 6], 'int32');
    const forwards: Record<string, () => tf.Tensor> = {
      unshared: () => unhooked(model, () => model.apply(ids) as tf.Tensor),
      context: () => withSequenceContext({}, () => model.apply(ids) as tf.Tensor),  // batchLoss's
      apply: () => model.apply(ids) as tf.Tensor,                                 // a user's own loop
    };
    const lossAndGrads = (forward: () => tf.Tensor) => tf.tidy(() => {
      const { value, grads } = tf.variableGrads(() => tf.mean(tf.square(forward())) as tf.Scalar,
          model.trainableWeights.map(w => w.read() as tf.Variable));
      return [value, ...Object.values(grads)];
    });
    const plain = countFromHost(() => lossAndGrads(forwards.unshared));
    const before = tf.memory().numTensors;
    const context = countFromHost(() => lossAndGrads(forwards.context));
    const apply = countFromHost(() => lossAndGrads(forwards.apply));
    // 2 layers: the second one's mask, cos and sin are the first one's, one ε scalar serves the
    // 9 RMSNorms (input, post-attention, q and k norms of each layer, the final norm), and one
    // signed-sin sign vector the 4 rotary calls (q and k of each layer)
    expect(plain.fromHost - context.fromHost).to.equal(3 + 8 + 3);
    expect(apply.fromHost, 'model.apply alone shares as a context does').to.equal(context.fromHost);
    expect(tf.memory().numTensors - before, 'the pass constants are gone once the call returned').to.equal(2 * plain.out.length);
    for (let i = 0; i < plain.out.length; i++) {
      expect(bits(context.out[i])).to.deep.equal(bits(plain.out[i]));
      expect(bits(apply.out[i])).to.deep.equal(bits(plain.out[i]));
    }
    // predict (tfjs-layers runs the layers one by one, not through call) shares too
    const predicted = countFromHost(() => model.predict(ids) as tf.Tensor);
    const onBatch = countFromHost(() => model.predictOnBatch(ids) as tf.Tensor);
    const forward = countFromHost(() => unhooked(model, () => model.predict(ids) as tf.Tensor));
    expect(forward.fromHost - predicted.fromHost).to.equal(3 + 8 + 3);
    expect(onBatch.fromHost).to.equal(predicted.fromHost);
    expect(bits(predicted.out)).to.deep.equal(bits(forward.out));
    expect(bits(onBatch.out)).to.deep.equal(bits(forward.out));
    tf.dispose([...plain.out, ...context.out, ...apply.out, predicted.out, onBatch.out, forward.out, ids]);
    expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before - plain.out.length - 1);
    model.dispose();
  });

  it('passPerCall: a model from tf.loadLayersModel shares once it is applied (twice changes nothing); loadModelDir applies it', async () => {
    const model = buildMoECausalLM(QWEN3);
    await seedModelInit(model, 5, 0.3);
    const dir = await tempDir('pass-per-call-');
    await model.save(fileIO(dir));
    const ids = tf.tensor2d([[1, 5, 2, 9]], [1, 4], 'int32');
    const predictCount = (m: tfl.LayersModel) => {
      const { out, fromHost } = countFromHost(() => m.predict(ids) as tf.Tensor);
      return { bits: bits(out), fromHost, dispose: () => out.dispose() };
    };
    const built = predictCount(model);
    const raw = await tfl.loadLayersModel(fileIO(dir));
    expect(Object.hasOwn(raw, 'call'), 'tfjs-layers\' loader knows nothing of passes').to.equal(false);
    const before = predictCount(raw);
    passPerCall(raw);
    passPerCall(raw);
    const after = predictCount(raw);
    const { model: loaded } = await loadModelDir(dir);
    const viaLoader = predictCount(loaded);
    expect(before.fromHost - after.fromHost).to.equal(3 + 8 + 3);
    expect([after.fromHost, viaLoader.fromHost]).to.deep.equal([built.fromHost, built.fromHost]);
    for (const r of [before, after, viaLoader]) expect(r.bits).to.deep.equal(built.bits);
    for (const r of [built, before, after, viaLoader]) r.dispose();
    ids.dispose();
    for (const m of [model, raw, loaded]) m.dispose();
  });

  it('a custom loop over model.apply builds as few host tensors a step as batchLoss and trains bit for bit the same', async () => {
    const models = [buildMoECausalLM(QWEN3), buildMoECausalLM(QWEN3)];
    for (const m of models) await seedModelInit(m, 4, 0.3);
    const batch = {
      inputIds: tf.tensor2d([[1, 5, 2, 9, 3, 4], [8, 1, 1, 6, 2, 0]], [2, 6], 'int32') as tf.Tensor2D,
      labels: tf.tensor2d([[5, 2, 9, 3, 4, 7], [1, 1, 6, 2, 0, 10]], [2, 6], 'int32') as tf.Tensor2D,
      segmentIds: null, positionIds: null, targetCount: 12,
    };
    const before = tf.memory().numTensors;
    const adams = models.map(m => new Adam(trainableVariables(m)));
    const trunks = new Map(models.map(m => {
      const trunk = tfl.model({ inputs: m.inputs, outputs: m.getLayer('model.norm').output as tfl.SymbolicTensor });
      passPerCall(trunk);
      return [m, trunk] as const;
    }));
    const steps: Record<'batchLoss' | 'custom', (m: tfl.LayersModel) => { value: tf.Scalar; grads: tf.NamedTensorMap }> = {
      batchLoss: m => tf.variableGrads(() => batchLoss(m, batch), trainableVariables(m)),
      // what a user writes (training.md): the model up to its final norm on the ids, the head and the
      // cross-entropy in chunks (batchLoss's path), nothing of ours around it
      custom: m => tf.variableGrads(() => tf.tidy(() => linearCrossEntropy(
          tf.reshape(trunks.get(m)!.apply(batch.inputIds) as tf.Tensor, [12, QWEN3.hidden_size as number]) as tf.Tensor2D,
          m.getLayer('lm_head').weights[0].read() as tf.Tensor2D, tf.reshape(batch.labels, [12]) as tf.Tensor1D, 12)),
      trainableVariables(m)),
    };
    for (let step = 0; step < 3; step++) {
      const made = (['batchLoss', 'custom'] as const).map((kind, k) => {
        const { out: { value, grads }, fromHost } = countFromHost(() => steps[kind](models[k]));
        adams[k].apply(trainableVariables(models[k]).map(v => grads[v.name]), 1e-2);
        tf.dispose([value, ...Object.values(grads)]);
        return fromHost;
      });
      expect(made[1], `step ${step + 1}: host tensors of the custom loop`).to.equal(made[0]);
    }
    const [a, b] = models.map(m => trainableVariables(m));
    for (let i = 0; i < a.length; i++) expect(bits(b[i]), a[i].name).to.deep.equal(bits(a[i]));
    for (const adam of adams) adam.dispose();
    expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
    tf.dispose([batch.inputIds, batch.labels]);
    for (const m of models) m.dispose();
  });
});
