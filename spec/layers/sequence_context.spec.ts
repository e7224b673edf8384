/**
 * RotaryAttention under a SequenceContext, through whole models: packed samples (segment ids,
 * positions restarting at 0) give each sample the logits it has alone; right padding leaves the
 * real tokens' logits unchanged; batchLoss over packed and padded batches equals the float64
 * cross-entropy of the samples run one by one. With a sliding window (Mixtral) too.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { planRows, rowsBatch, toSample, type TokenizedSample } from '../../src/data/datasets_rows.js';
import { buildMoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { rotaryTablesAt } from '../../src/layers/rotary.js';
import { passConstant, passScalar } from '../../src/ops/pass_constants.js';
import { withSequenceContext } from '../../src/layers/sequence_context.js';
import type { HFConfig } from '../../src/models/families.js';
import { batchLoss, disposeBatch, IGNORE_INDEX } from '../../src/train/loss.js';
import { seedModelInit } from '../../src/train/seeded_init.js';
import { fixtureConfig } from '../io/checkpoint_helpers.js';
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

  it('a model pass under a context builds the causal mask, rotary tables and operands and norms\' ε once for all its layers, and trains as without sharing', async () => {
    const model = buildMoECausalLM(QWEN3, { name: 'shared_constants' });
    await seedModelInit(model, 3, 0.3);
    const ids = tf.tensor2d([[1, 5, 2, 9, 3, 4]], [1, 6], 'int32');
    const lossOf = (shared: boolean) => tf.tidy(() => {
      const f = () => tf.mean(tf.square(shared ? withSequenceContext({}, () => model.apply(ids) as tf.Tensor) : model.apply(ids) as tf.Tensor)) as tf.Scalar;
      const { value, grads } = tf.variableGrads(f, model.trainableWeights.map(w => w.read() as tf.Variable));
      return [value, ...Object.values(grads)];
    });
    // tensors made from host values (the mask and the tables are; kernels' outputs are not)
    const engine = tf.engine() as unknown as { makeTensor: (...args: unknown[]) => tf.Tensor };
    const makeTensor = engine.makeTensor;
    let fromHost = 0;
    engine.makeTensor = (...args: unknown[]) => { fromHost++; return makeTensor.apply(engine, args); };
    const counted = (shared: boolean) => {
      fromHost = 0;
      const out = lossOf(shared);
      return { out, fromHost };
    };
    let plain: tf.Tensor[], shared: tf.Tensor[], plainMade: number, sharedMade: number, before: number;
    try {
      ({ out: plain, fromHost: plainMade } = counted(false));
      before = tf.memory().numTensors;
      ({ out: shared, fromHost: sharedMade } = counted(true));
    } finally {
      engine.makeTensor = makeTensor;
    }
    // 2 layers: the second one's mask, cos and sin are the first one's, one ε scalar serves the
    // 9 RMSNorms (input, post-attention, q and k norms of each layer, the final norm), and one
    // signed-sin sign vector the 4 rotary calls (q and k of each layer)
    expect(plainMade - sharedMade).to.equal(3 + 8 + 3);
    expect(tf.memory().numTensors - before).to.equal(shared.length);
    for (let i = 0; i < plain.length; i++) expect(Array.from(shared[i].dataSync())).to.deep.equal(Array.from(plain[i].dataSync()));
    tf.dispose([...plain, ...shared, ids]);
    model.dispose();
  });
});
