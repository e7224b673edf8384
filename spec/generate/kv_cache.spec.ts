/**
 * The KV cache in RotaryAttention: logits computed a few new tokens at a time over the cache equal
 * those of one forward pass over the whole sequence (rotary offsets, GQA, the sliding window with
 * dropped keys), and the cache holds only what later queries can reach.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { KVCache } from '../../src/generate/kv_cache.js';
import type { MoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { withSequenceContext } from '../../src/layers/sequence_context.js';
import { GPT_OSS_TINY, MIXTRAL_WINDOW, QWEN3_TINY, seededModel } from './models.js';

const IDS = [3, 17, 5, 9, 22, 0, 11, 4, 8, 13, 2];

/** logits [S, V] of the whole sequence in one pass */
async function fullLogits(model: MoECausalLM, ids: number[]): Promise<number[][]> {
  const logits = tf.tidy(() => tf.squeeze(model.apply(tf.tensor2d(ids, [1, ids.length], 'int32')) as tf.Tensor, [0]));
  const rows = await logits.array() as number[][];
  logits.dispose();
  return rows;
}

/** logits [S, V] computed chunk by chunk (sizes `chunks`) over a KV cache */
async function cachedLogits(model: MoECausalLM, ids: number[], chunks: number[], cache: KVCache): Promise<number[][]> {
  const rows: number[][] = [];
  let at = 0;
  for (const n of chunks) {
    const part = ids.slice(at, at + n);
    at += n;
    const logits = tf.tidy(() => tf.squeeze(withSequenceContext({ kvCache: cache },
        () => model.apply(tf.tensor2d(part, [1, n], 'int32'))) as tf.Tensor, [0]));
    rows.push(...await logits.array() as number[][]);
    logits.dispose();
  }
  return rows;
}

function maxAbsDiff(a: number[][], b: number[][]): number {
  let m = 0;
  a.forEach((row, i) => row.forEach((v, j) => { m = Math.max(m, Math.abs(v - b[i][j])); }));
  return m;
}

describe('generate/KVCache in RotaryAttention', () => {
  for (const [name, config] of [
    ['qwen3_moe, GQA 4/2', QWEN3_TINY], ['mixtral, GQA 4/1, sliding window 3', MIXTRAL_WINDOW],
    ['gpt_oss, sinks, YaRN, a sliding (3) then a full layer', GPT_OSS_TINY],
  ] as const) {
    it(`${name}: cached logits equal the full forward's (prompt, then 1 and 2 tokens at a time)`, async () => {
      const model = await seededModel(config, 5);
      try {
        const full = await fullLogits(model, IDS);
        // the logits are far from uniform: a wrong position or key would show
        expect(Math.max(...full[IDS.length - 1]) - Math.min(...full[IDS.length - 1])).to.be.above(0.5);
        const before = tf.memory().numTensors;
        const cache = new KVCache();
        const cached = await cachedLogits(model, IDS, [4, 1, 2, 1, 3], cache);
        expect(cache.seen('model.layers.1.self_attn')).to.equal(IDS.length);
        cache.dispose();
        expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
        expect(cached).to.have.length(IDS.length);
        expect(maxAbsDiff(cached, full)).to.be.at.most(1e-5);
      } finally {
        model.dispose();
      }
    });
  }

  it('a sliding window keeps window − 1 keys per layer; without one, every key', async () => {
    for (const [config, kept] of [[MIXTRAL_WINDOW, 2], [QWEN3_TINY, IDS.length]] as const) {
      const model = await seededModel(config, 2);
      const cache = new KVCache();
      try {
        await cachedLogits(model, IDS, [5, 6], cache);
        const before = tf.memory().numTensors;
        // one more token: it attends the kept keys and its own
        const shape: [number, number, number] = [config['num_key_value_heads'] as number, 1, config['head_dim'] as number];
        const window = (config['sliding_window'] as number | undefined) ?? null;
        const keyCount = tf.tidy(() => cache.append('model.layers.0.self_attn', tf.zeros(shape), tf.zeros(shape), window).keys.shape[1]);
        expect(keyCount, 'keys attended by the next token').to.equal(kept + 1);
        // the layer's old keys and values were released for the new ones: still two tensors a layer
        expect(tf.memory().numTensors).to.equal(before);
      } finally {
        cache.dispose();
        model.dispose();
      }
    }
  });

  it('a cache serves one batch: another batch size is refused', () => {
    const cache = new KVCache();
    try {
      tf.tidy(() => { cache.append('a', tf.zeros([2, 3, 4]), tf.zeros([2, 3, 4]), null); });
      expect(() => tf.tidy(() => { cache.append('a', tf.zeros([4, 1, 4]), tf.zeros([4, 1, 4]), null); })).to.throw(
          "`KVCache.append()`: layer 'a' cached 2 batch·head rows but got 4: a cache serves one batch; start a new one for another");
    } finally {
      cache.dispose();
    }
  });

  it('a cache takes no segment or position ids (its positions run on from its length)', async () => {
    const model = await seededModel(QWEN3_TINY, 5);
    const cache = new KVCache();
    const ids = tf.tensor2d([[1, 2, 3]], [1, 3], 'int32');
    try {
      expect(() => withSequenceContext({ kvCache: cache, positionIds: ids }, () => tf.tidy(() => { model.apply(ids); })))
        .to.throw("`RotaryAttention.call()`: a sequence context with a 'kvCache' takes no 'segmentIds' or 'positionIds'");
    } finally {
      tf.dispose(ids);
      cache.dispose();
      model.dispose();
    }
  });
});
