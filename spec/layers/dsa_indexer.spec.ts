/**
 * MLAAttention with the DSA indexer (glm_moe_dsa's DeepSeek sparse attention) against a float64
 * reference written from transformers' GlmMoeDsaAttention and GlmMoeDsaIndexer (eager,
 * spec/helpers/glm_dsa64.ts): the
 * indexer keeps each query's topK best keys, gradients equal finite differences (none reaches the
 * indexer, which transformers runs under no_grad), a KV-cached pass equals the full one, and bad
 * indexer arguments are one clear error.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { KVCache } from '../../src/generate/kv_cache.js';
import { dsaIndexerWeightShapes } from '../../src/layers/dsa_indexer.js';
import { MLAAttention, mlaWeightShapes, type MLAAttentionArgs } from '../../src/layers/mla_attention.js';
import { withSequenceContext } from '../../src/layers/sequence_context.js';
import { dsaAttention64, type DSA64Args } from '../helpers/glm_dsa64.js';
import { asF32, expectClose, expectNoLeak, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

type Weights = Record<string, Float64Array>;

const ARGS = {
  numHeads: 2, qLoraRank: 6, kvLoraRank: 5, qkNopeHeadDim: 3, qkRopeHeadDim: 4, vHeadDim: 3,
  ropeTheta: 30, ropeInterleave: true, attentionBias: false, normEpsilon: 1e-6,
  indexer: { numHeads: 3, headDim: 6, topK: 3 },
} satisfies MLAAttentionArgs;

/** dsaAttention64 on each row of the batch, weights by name. */
function dsa64(x: Float64Array, w: Weights, b: number, s: number, h: number, interleave = true): { out: Float64Array; kept: number[][][] } {
  const args: DSA64Args = {
    numHeads: ARGS.numHeads, qkNopeHeadDim: ARGS.qkNopeHeadDim, qkRopeHeadDim: ARGS.qkRopeHeadDim, vHeadDim: ARGS.vHeadDim,
    kvLoraRank: ARGS.kvLoraRank, ropeTheta: ARGS.ropeTheta, indexHeads: ARGS.indexer.numHeads, ropeInterleave: interleave,
    indexHeadDim: ARGS.indexer.headDim, indexTopK: ARGS.indexer.topK,
  };
  const out = new Float64Array(b * s * h);
  const kept: number[][][] = [];
  for (let bi = 0; bi < b; bi++) {
    const r = dsaAttention64(x.slice(bi * s * h, (bi + 1) * s * h), n => w[n], args, s, h);
    out.set(r.out, bi * s * h);
    kept.push(r.kept);
  }
  return { out, kept };
}

function setup(seed: number, b = 2, s = 6, h = 8, args: Partial<MLAAttentionArgs> = {}) {
  const layer = new MLAAttention({ ...ARGS, ...args, name: 'attn' });
  layer.apply(tfl.input({ shape: [null, h] }));
  const rng = new Rng(seed);
  const w: Weights = {};
  for (const v of layer.weights) {
    const name = v.originalName.slice('attn/'.length);
    const size = v.shape.reduce((p: number, q) => p * (q as number), 1);
    w[name] = asF32(name.includes('norm.weight') || name.includes('layernorm') ? rng.array(size, 0.3).map(t => 1 + t) :
      rng.array(size, name.includes('bias') ? 0.1 : 0.7));
    v.write(tensorOf(w[name], v.shape as number[]));
  }
  const x = asF32(rng.array(b * s * h));
  return { layer, w, x, b, s, h };
}

describe('MLAAttention with the DSA indexer', () => {
  it('keeps each query\'s topK best-scored keys, as transformers\' GlmMoeDsaAttention', () => {
    const { layer, w, x, b, s, h } = setup(7);
    const want = dsa64(x, w, b, s, h);
    // the indexer really drops keys here: later queries keep 3 of up to 6
    expect(want.kept[0][5]).to.have.length(3);
    expect(want.kept[0].slice(3).some(row => row.join() !== '0,1,2')).to.equal(true);
    const xt = tensorOf(x, [b, s, h]);
    expectNoLeak(() => {
      const y = layer.apply(xt) as tf.Tensor;
      expectClose(y, want.out, 1e-5, 'out');
      y.dispose();
    });
    // with topK >= the keys, the indexer keeps all: plain MLA (the same weights without an indexer)
    const plain = new MLAAttention({ ...ARGS, indexer: null, name: 'plain' });
    plain.apply(tfl.input({ shape: [null, h] }));
    for (const v of plain.weights) v.write(tensorOf(w[v.originalName.slice('plain/'.length)], v.shape as number[]));
    const wide = setup(7, b, s, h, { indexer: { ...ARGS.indexer, topK: s } });
    const [yWide, yPlain] = [wide.layer.apply(xt) as tf.Tensor, plain.apply(xt) as tf.Tensor];
    expectClose(yWide, yPlain, 1e-6, 'topK >= S vs no indexer');
    tf.dispose([xt, yWide, yPlain]);
    [layer, plain, wide.layer].forEach(l => l.dispose());
  });

  it('rope not interleaved (rotate-half pairs) in the attention and the indexer alike', () => {
    const { layer, w, x, b, s, h } = setup(8, 2, 6, 8, { ropeInterleave: false });
    const xt = tensorOf(x, [b, s, h]);
    const y = layer.apply(xt) as tf.Tensor;
    expectClose(y, dsa64(x, w, b, s, h, false).out, 1e-5, 'out');
    tf.dispose([xt, y]);
    layer.dispose();
  });

  it('gradients w.r.t. the input and the attention weights equal finite differences; the indexer gets none', () => {
    const { layer, w, x, b, s, h } = setup(9, 1, 6, 8);
    const g = asF32(new Rng(10).array(b * s * h));
    const xt = tensorOf(x, [b, s, h]);
    const gt = tensorOf(g, [b, s, h]);
    const loss64 = (xs: Float64Array, ws: Weights) => dsa64(xs, ws, b, s, h).out.reduce((acc, v, i) => acc + v * g[i], 0);
    expectNoLeak(() => {
      const f = (input: tf.Tensor) => tf.sum(tf.mul(layer.apply(input) as tf.Tensor, gt)) as tf.Scalar;
      const dx = tf.grad(f)(xt);
      expectClose(dx, finiteDifferences(v => loss64(v, w), x), 1e-4, 'dx');
      const { value, grads } = tf.variableGrads(() => f(xt), layer.weights.map(v => v.read() as tf.Variable));
      for (const v of layer.weights) {
        const name = v.originalName.slice('attn/'.length);
        const grad = grads[(v.read() as tf.Variable).name];
        if (name.startsWith('indexer.')) {
          expect(grad === undefined || grad.dataSync().every(t => t === 0), `d ${name} is zero`).to.equal(true);
          continue;
        }
        expectClose(grad, finiteDifferences(p => loss64(x, { ...w, [name]: p }), w[name]), 1e-4, `d ${name}`);
      }
      tf.dispose([dx, value, ...Object.values(grads)]);
    });
    tf.dispose([xt, gt]);
    layer.dispose();
  });

  it('with a KV cache, a prompt then one token at a time gives the rows of the full pass', () => {
    const { layer, x, h } = setup(5, 1, 7, 8);
    const full = layer.apply(tensorOf(x, [1, 7, h])) as tf.Tensor;
    const cache = new KVCache();
    const parts = [[0, 4], [4, 5], [5, 6], [6, 7]].map(([from, to]) => {
      const input = tensorOf(x.slice(from * h, to * h), [1, to - from, h]);
      const y = withSequenceContext({ kvCache: cache }, () => layer.apply(input) as tf.Tensor);
      input.dispose();
      return y;
    });
    expect(cache.seen('attn/indexer')).to.equal(7);
    const stitched = tf.concat(parts, 1);
    expectClose(stitched, full, 1e-5, 'cached vs full');
    tf.dispose([full, stitched, ...parts]);
    cache.dispose();
    layer.dispose();
  });

  it('names the indexer weights like HF and round-trips its config', () => {
    const { layer } = setup(1);
    expect(layer.weights.map(v => `${v.originalName}:${v.shape}`).filter(n => n.includes('indexer')).sort()).to.deep.equal([
      'attn/indexer.k_norm.bias:6', 'attn/indexer.k_norm.weight:6', 'attn/indexer.weights_proj.weight:3,8',
      'attn/indexer.wk.weight:6,8', 'attn/indexer.wq_b.weight:18,6']);
    expect(mlaWeightShapes(ARGS, 8).filter(e => e.name.startsWith('indexer.'))).to.deep.equal(
        dsaIndexerWeightShapes(ARGS.indexer, 8, 6));
    const config = layer.getConfig();
    expect(config['indexer']).to.deep.equal(ARGS.indexer);
    const clone = tfl.layers.Layer.fromConfig(MLAAttention, config) as MLAAttention;
    expect(clone.getConfig()).to.deep.equal(config);
    layer.dispose();
  });

  it('rejects bad indexer arguments', () => {
    const make = (indexer: unknown, extra: Partial<MLAAttentionArgs> = {}) =>
      () => new MLAAttention({ ...ARGS, ...extra, indexer: indexer as MLAAttentionArgs['indexer'] });
    expect(make({ ...ARGS.indexer, numHeads: 0 })).to.throw("`MLAAttention()`: 'indexer.numHeads' must be >= 1 but got 0");
    expect(make({ ...ARGS.indexer, headDim: 2.5 })).to.throw("`MLAAttention()`: 'indexer.headDim' must be an integer");
    expect(make({ ...ARGS.indexer, topK: 0 })).to.throw("`MLAAttention()`: 'indexer.topK' must be >= 1 but got 0");
    expect(make({ ...ARGS.indexer, headDim: 2 })).to.throw(
        "`MLAAttention()`: 'indexer.headDim' must be >= qkRopeHeadDim (4): its rope part is that wide, but got 2");
    expect(make(ARGS.indexer, { qLoraRank: null })).to.throw(
        "`MLAAttention()`: 'indexer' needs a query latent: 'qLoraRank' must be set (transformers' indexer reads q_a_layernorm's output)");
    expect(make(7)).to.throw("`MLAAttention()`: 'indexer' must be {numHeads, headDim, topK} or null but got number");
  });
});
