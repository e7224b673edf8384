/**
 * Token ids are int32 and in [0, vocab): a float id is never rounded silently, and an id out of
 * range is one clear error naming the argument, not a tfjs GatherV2 message or (for a target) a
 * zero one-hot row that silently changes the loss.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { assertTokenIds, TokenEmbedding } from '../../src/layers/embedding.js';
import { buildMoECausalLM } from '../../src/layers/moe_causal_lm.js';
import type { HFConfig } from '../../src/models/families.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { evaluateLoss, generateGreedy } from '../../src/train/evaluate.js';
import { nextTokenLoss } from '../../src/train/loss.js';
import { rejection } from '../helpers/rejection.js';

const VOCAB = 11;
const TINY: HFConfig = {
  model_type: 'qwen3_moe', vocab_size: VOCAB, hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8,
};
const HOST = ['cpu', 'wasm'].includes(process.env.TFJS_BACKEND ?? 'cpu');  // as spec/setup.ts picks it

/** The OpArgumentError a promise rejects with, nothing left behind. */
async function asyncRefusal(p: Promise<unknown>): Promise<Error> {
  const before = tf.memory().numTensors;
  const e = await rejection(p);
  expect(e).to.be.instanceOf(OpArgumentError);
  expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  return e;
}

function refusal(fn: () => unknown): Error {
  const before = tf.memory().numTensors;
  try {
    fn();
  } catch (e) {
    expect(e).to.be.instanceOf(OpArgumentError);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    return e as Error;
  }
  throw new Error('expected an OpArgumentError');
}

describe('token ids: int32 and in range, or a clear error', () => {
  let model: tfl.LayersModel;
  before(() => { model = buildMoECausalLM(TINY); });
  after(() => model.dispose());

  // A whole model's predict()/apply() feed through tfjs-layers' executor, which casts every feed to
  // the input's declared dtype (int32) before any layer runs, as for any tfjs model; the package's
  // own entry points (below) and TokenEmbedding itself refuse non-int32 ids.
  it('TokenEmbedding refuses non-int32 ids instead of casting them; the model refuses ids outside [0, vocab)', () => {
    const embed = new TokenEmbedding({ name: 'e', vocabSize: 5, hiddenSize: 2 });
    const good = tf.tensor2d([[1, 4]], [1, 2], 'int32');
    tf.dispose(embed.apply(good) as tf.Tensor);  // builds the table
    for (const dtype of ['float32', 'bool'] as const) {
      const ids = tf.tensor2d([[1, 0]], [1, 2], dtype);
      expect(refusal(() => embed.apply(ids)).message)
        .to.equal(`\`TokenEmbedding.call()\`: 'input_ids' must be int32 token ids but got ${dtype} (shape [1,2])`);
      ids.dispose();
    }
    good.dispose();
    embed.dispose();
    if (!HOST) return;  // on a GPU backend the range is checked where ids are host data (below)
    for (const [bad, at] of [[VOCAB, 1], [-1, 2], [1e6, 0]]) {
      const data = [3, 4, 5];
      data[at] = bad;
      const ids = tf.tensor2d([data], [1, 3], 'int32');
      expect(refusal(() => model.predict(ids)).message).to.equal(
        `\`TokenEmbedding.call()\`: 'input_ids' must hold token ids in [0, ${VOCAB - 1}] (vocab size ${VOCAB}) but holds ${bad} at index ${at}`);
      ids.dispose();
    }
    const ok = tf.tensor2d([[0, VOCAB - 1]], [1, 2], 'int32');
    const logits = model.predict(ok) as tf.Tensor;
    expect(logits.shape).to.deep.equal([1, 2, VOCAB]);
    tf.dispose([ok, logits]);
  });

  it('nextTokenLoss refuses float windows and a target outside the vocab (it would be a zero one-hot row)', () => {
    const floats = tf.tensor2d([[1, 2, 3]], [1, 3], 'float32');
    expect(refusal(() => nextTokenLoss(model, floats as tf.Tensor2D)).message)
      .to.equal("`nextTokenLoss()`: 'windows' must be int32 but got float32 (shape [1,3])");
    floats.dispose();
    const badTarget = tf.tensor2d([[1, 2, VOCAB]], [1, 3], 'int32');   // only the last (target) id is out of range
    expect(refusal(() => nextTokenLoss(model, badTarget)).message).to.equal(
      `\`nextTokenLoss()\`: 'windows' must hold token ids in [0, ${VOCAB - 1}] (vocab size ${VOCAB}) but holds ${VOCAB} at index 2`);
    badTarget.dispose();
  });

  it('evaluateLoss and generateGreedy take an Int32Array of ids in range', async () => {
    const tokens = Float32Array.from([1, 2, 3, 4]);
    expect((await asyncRefusal(evaluateLoss(model, tokens as unknown as Int32Array, { seq: 2 }))).message)
      .to.equal("`evaluateLoss()`: 'tokens' must be an Int32Array of token ids but got a Float32Array of 16 bytes");
    expect((await asyncRefusal(evaluateLoss(model, [1, 2, 3] as unknown as Int32Array, { seq: 2 }))).message)
      .to.equal("`evaluateLoss()`: 'tokens' must be an Int32Array of token ids but got an array of length 3");
    expect((await asyncRefusal(evaluateLoss(model, Int32Array.from([1, 2, 12, 3]), { seq: 2 }))).message).to.equal(
      `\`evaluateLoss()\`: 'tokens' must hold token ids in [0, ${VOCAB - 1}] (vocab size ${VOCAB}) but holds 12 at index 2`);
    expect((await asyncRefusal(generateGreedy(model, Float32Array.from([1.5]) as unknown as Int32Array, { maxNewTokens: 1 }))).message)
      .to.equal("`generateGreedy()`: 'prompt' must be an Int32Array of token ids but got a Float32Array of 4 bytes");
    expect((await asyncRefusal(generateGreedy(model, Int32Array.from([1, -3]), { maxNewTokens: 1 }))).message).to.equal(
      `\`generateGreedy()\`: 'prompt' must hold token ids in [0, ${VOCAB - 1}] (vocab size ${VOCAB}) but holds -3 at index 1`);
    const before = tf.memory().numTensors;
    expect(Number.isFinite(await evaluateLoss(model, Int32Array.from([0, 5, VOCAB - 1, 2]), { seq: 2 }))).to.equal(true);
    expect(await generateGreedy(model, Int32Array.from([0, VOCAB - 1]), { maxNewTokens: 2 })).to.have.length(2);
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('nextTokenLoss needs a model whose output is logits [batch, seq, vocab]', () => {
    const input = tfl.input({ shape: [3], dtype: 'int32' });
    const dense = tfl.model({ inputs: input, outputs: tfl.layers.dense({ units: 2 }).apply(input) as tfl.SymbolicTensor, name: 'flat' });
    const windows = tf.tensor2d([[1, 2, 3]], [1, 3], 'int32');
    expect(refusal(() => nextTokenLoss(dense, windows)).message)
      .to.equal("`vocabSizeOf()`: the model 'flat' must output logits [batch, seq, vocab] but outputs shape [null,2]");
    windows.dispose();
    dense.dispose();
  });

  it('assertTokenIds checks host arrays on every backend', () => {
    expect(() => assertTokenIds('op', 'ids', Int32Array.from([0, 4]), 4))
      .to.throw("`op()`: 'ids' must hold token ids in [0, 3] (vocab size 4) but holds 4 at index 1");
    assertTokenIds('op', 'ids', Int32Array.from([0, 3]), 4);
  });
});
