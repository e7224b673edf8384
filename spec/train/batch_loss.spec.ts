/**
 * batchLoss (labels with IGNORE_INDEX, a normalizer) against float64 cross-entropies of the
 * model's own logits, and withSequenceContext's scoping.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { setGradientCheckpointing } from '../../src/layers/gradient_checkpointing.js';
import { addMoEAdapter, buildMoECausalLM, splitAtHead, trainableVariables } from '../../src/layers/moe_causal_lm.js';
import { currentSequenceContext, withSequenceContext } from '../../src/layers/sequence_context.js';
import type { HFConfig } from '../../src/models/families.js';
import { tokenCrossEntropy } from '../../src/ops/token_cross_entropy.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { batchLoss, disposeBatch, IGNORE_INDEX, type TrainingBatch } from '../../src/train/loss.js';
import { seedModelInit } from '../../src/train/seeded_init.js';
import { expectNoLeak } from '../helpers/numeric.js';

const VOCAB = 11;
const TINY: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: VOCAB, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};

/** float64 −log softmax(logits)[target]. */
function crossEntropy(logits: number[], target: number): number {
  const max = Math.max(...logits);
  return Math.log(logits.reduce((s, l) => s + Math.exp(l - max), 0)) + max - logits[target];
}

function batchOf(ids: number[][], labels: number[][]): TrainingBatch {
  const [b, s] = [ids.length, ids[0].length];
  return {
    inputIds: tf.tensor2d(ids, [b, s], 'int32'), labels: tf.tensor2d(labels, [b, s], 'int32'),
    segmentIds: null, positionIds: null, targetCount: labels.flat().filter(l => l !== IGNORE_INDEX).length,
  };
}

describe('train: batchLoss', () => {
  let model: tfl.LayersModel;
  before(async () => {
    model = buildMoECausalLM(TINY);
    await seedModelInit(model, 3, 0.3);
  });
  after(() => model.dispose());

  it('is the mean cross-entropy over the labels that are not IGNORE_INDEX, or their sum over a given normalizer', () => {
    const ids = [[1, 5, 2, 9, 3], [4, 4, 10, 1, 7]];
    const I = IGNORE_INDEX;
    const labels = [[I, I, 9, 3, 0], [4, 10, I, 7, I]];
    const logits = tf.tidy(() => (model.predict(tf.tensor2d(ids, [2, 5], 'int32')) as tf.Tensor).arraySync() as number[][][]);
    let sum = 0;
    for (let b = 0; b < 2; b++) for (let t = 0; t < 5; t++) if (labels[b][t] !== I) sum += crossEntropy(logits[b][t], labels[b][t]);
    const batch = batchOf(ids, labels);
    expectNoLeak(() => {
      const mean = batchLoss(model, batch);
      const over = batchLoss(model, batch, { normalizer: 20 });
      expect(Math.abs(mean.dataSync()[0] - sum / 6)).to.be.below(1e-5);
      expect(Math.abs(over.dataSync()[0] - sum / 20)).to.be.below(1e-5);
      tf.dispose([mean, over]);
    });
    disposeBatch(batch);
  });

  it('refuses a label that is neither a token id nor IGNORE_INDEX, and labels of another shape', () => {
    const bad = batchOf([[1, 2, 3]], [[2, -1, 4]]);
    expect(() => batchLoss(model, bad)).to.throw(
        "`batchLoss()`: 'labels' must hold token ids in [0, 10] (vocab size 11) or IGNORE_INDEX (-100) but holds -1 at index 1");
    const short = { ...bad, labels: tf.tensor2d([[2, 3]], [1, 2], 'int32') };
    expect(() => batchLoss(model, short)).to.throw("`batchLoss()`: 'labels' must have the shape of 'inputIds' [1,3] but has [1,2]");
    const none = { ...batchOf([[1, 2, 3]], [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]) };
    expect(() => batchLoss(model, none)).to.throw(
        "`batchLoss()`: the batch has no label to predict (every label is IGNORE_INDEX, 'targetCount' 0)");
    expect(() => batchLoss(model, none, { normalizer: 0.5 })).to.throw("`batchLoss()`: 'normalizer' must be an integer but got 0.5 (number)");
    disposeBatch(bad);
    short.labels.dispose();
    disposeBatch(none);
  });

  it('withSequenceContext is visible inside its function only, innermost first, and restored after a throw', () => {
    expect(currentSequenceContext()).to.equal(null);
    const outer = { segmentIds: null };
    const inner = { positionIds: null };
    withSequenceContext(outer, () => {
      expect(currentSequenceContext()).to.equal(outer);
      withSequenceContext(inner, () => expect(currentSequenceContext()).to.equal(inner));
      expect(() => withSequenceContext(inner, () => { throw new Error('x'); })).to.throw('x');
      expect(currentSequenceContext()).to.equal(outer);
    });
    expect(currentSequenceContext()).to.equal(null);
  });
});

/**
 * batchLoss applies the head inside linearCrossEntropy (the model cut at its head, splitAtHead);
 * the path it replaced is the model's logits, then tokenCrossEntropy, in the same sequence
 * context. They differ in the order of sums (the loss over chunks, dW over chunks, the one-hot
 * term applied after the head's product instead of before; wasm's matMul of a chunk of rows may
 * round unlike the whole), so loss and gradients agree to float32 rounding, amplified a little by
 * the backward pass through the layers: 1e-5 relative (max-norm); measured ≤ 3e-7 on cpu,
 * ≤ 1.6e-6 on wasm. Bit-for-bit is not expected.
 */
describe('train: batchLoss applies the head chunk by chunk (linearCrossEntropy)', () => {
  const I = IGNORE_INDEX;
  const ids = [[1, 5, 2, 9, 3, 0, 8], [4, 4, 10, 1, 7, 6, 2]];
  const labels = [[I, 2, 9, 3, 0, I, 5], [4, 10, I, 7, I, 1, 1]];

  /** the composed path: the whole logits, tokenCrossEntropy; and batchLoss; each with the gradients of `vars` */
  function bothPaths(model: tfl.LayersModel, batch: TrainingBatch, vars: tf.Variable[], chunkRows?: number) {
    const [b, s] = batch.inputIds.shape;
    const composed = tf.variableGrads(() => withSequenceContext({ segmentIds: null, positionIds: null, training: true }, () => {
      const logits = model.apply(batch.inputIds, { training: true }) as tf.Tensor3D;
      return tokenCrossEntropy(tf.reshape(logits, [b * s, VOCAB]) as tf.Tensor2D, tf.reshape(batch.labels, [b * s]) as tf.Tensor1D, 20);
    }), vars);
    const fused = tf.variableGrads(() => batchLoss(model, batch, { normalizer: 20, chunkRows }), vars);
    return { composed, fused };
  }

  function expectSame(r: ReturnType<typeof bothPaths>, vars: tf.Variable[]) {
    expect(maxRelativeError(r.fused.value.dataSync(), r.composed.value.dataSync()), 'loss').to.be.at.most(1e-5);
    for (const v of vars) {
      const err = maxRelativeError(r.fused.grads[v.name].dataSync(), r.composed.grads[v.name].dataSync());
      expect(err, `${v.name}: ${err.toExponential(2)}`).to.be.at.most(1e-5);
    }
    tf.dispose([r.fused.value, r.composed.value, ...Object.values(r.fused.grads), ...Object.values(r.composed.grads)]);
  }

  it('every LoRA gradient and the loss as the logits path, for chunks of 1, 4 (not dividing 14) and all rows, with and without checkpointing', async () => {
    const model = buildMoECausalLM({ ...TINY, num_hidden_layers: 2 });
    await seedModelInit(model, 5, 0.3);
    addMoEAdapter(model, { name: 'default', r: 2, alpha: 4, targets: ['router', 'experts.gate_up', 'experts.down'] }, 'random');
    const batch = batchOf(ids, labels);
    const vars = trainableVariables(model);
    expect(vars.length).to.equal(12);  // 2 layers × 3 targets × A, B: the head is frozen (a constant of the op)
    expectNoLeak(() => {
      for (const checkpointing of [false, true]) {
        setGradientCheckpointing(model, checkpointing);
        for (const chunkRows of [1, 4, undefined]) expectSame(bothPaths(model, batch, vars, chunkRows), vars);
      }
    });
    setGradientCheckpointing(model, false);
    disposeBatch(batch);
    model.dispose();
  });

  it('a tied head trains: the embedding table gets both gradients (lookup and head), as the logits path', async () => {
    const model = buildMoECausalLM({ ...TINY, tie_word_embeddings: true });
    await seedModelInit(model, 7, 0.3);
    const split = splitAtHead(model);
    expect(split!.headWeight).to.equal(model.getLayer('model.embed_tokens').weights[0]);
    const batch = batchOf(ids, labels);
    const vars = trainableVariables(model);
    expect(vars.map(v => v.name)).to.include((split!.headWeight.read() as tf.Variable).name);
    expectNoLeak(() => expectSame(bothPaths(model, batch, vars, 3), vars));
    disposeBatch(batch);
    model.dispose();
  });

  it('a model whose output is not an LM head keeps the logits path', () => {
    const model = buildMoECausalLM(TINY);
    const sub = tfl.model({ inputs: model.inputs, outputs: model.getLayer('model.norm').output as tfl.SymbolicTensor });
    expect(splitAtHead(sub)).to.equal(null);
    model.dispose();
  });
});
