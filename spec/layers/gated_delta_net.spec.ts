/**
 * GatedDeltaNet (Qwen3-Next's linear attention) against a float64 transcription of transformers'
 * Qwen3NextGatedDeltaNet (spec/helpers/qwen3_next64.ts: fix_query_key_value_ordering, the causal conv1d, the recurrent gated
 * delta rule, Qwen3NextRMSNormGated), with gradients against finite differences; packed samples
 * equal each sample alone; a KV-cached pass equals the full one; bad arguments are one clear error.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { KVCache } from '../../src/generate/kv_cache.js';
import { GatedDeltaNet, gatedDeltaNetWeightShapes, type DeltaNetProjections, type GatedDeltaNetArgs } from '../../src/layers/gated_delta_net.js';
import { withSequenceContext } from '../../src/layers/sequence_context.js';
import { asF32, expectClose, expectNoLeak, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';
import { deltaNet64 as deltaNet64Row } from '../helpers/qwen3_next64.js';

type Weights = Record<string, Float64Array>;
const ARGS = { numKeyHeads: 2, numValueHeads: 4, keyHeadDim: 3, valueHeadDim: 2, convKernel: 3, normEpsilon: 1e-6 } satisfies GatedDeltaNetArgs;

/** deltaNet64 on each row of the batch. */
function deltaNet64(x: Float64Array, w: Weights, b: number, s: number, h: number, projections: DeltaNetProjections = 'qkvz'): Float64Array {
  const out = new Float64Array(b * s * h);
  for (let bi = 0; bi < b; bi++) {
    out.set(deltaNet64Row(x.slice(bi * s * h, (bi + 1) * s * h), n => w[n], { ...ARGS, projections }, s, h), bi * s * h);
  }
  return out;
}

function setup(seed: number, b = 2, s = 5, h = 6, projections: DeltaNetProjections = 'qkvz') {
  const layer = new GatedDeltaNet({ ...ARGS, projections, name: 'lin' });
  layer.apply(tfl.input({ shape: [null, h] }));
  const rng = new Rng(seed);
  const w: Weights = {};
  for (const v of layer.weights) {
    const name = v.originalName.slice('lin/'.length);
    const size = v.shape.reduce((p: number, q) => p * (q as number), 1);
    w[name] = asF32(name === 'norm.weight' ? rng.array(size, 0.3).map(t => 1 + t) : rng.array(size, 0.6));
    v.write(tensorOf(w[name], v.shape as number[]));
  }
  return { layer, w, x: asF32(rng.array(b * s * h)), b, s, h };
}

describe('GatedDeltaNet', () => {
  it('forward matches a float64 Qwen3NextGatedDeltaNet (grouped projections, conv, gated delta rule, gated norm)', () => {
    const { layer, w, x, b, s, h } = setup(3);
    const xt = tensorOf(x, [b, s, h]);
    expectNoLeak(() => {
      const y = layer.apply(xt) as tf.Tensor;
      expect(y.shape).to.deep.equal([b, s, h]);
      expectClose(y, deltaNet64(x, w, b, s, h), 1e-5, 'out');
      y.dispose();
    });
    xt.dispose();
    layer.dispose();
  });

  for (const projections of ['qkvz', 'separate'] as const) {
    it(`gradients w.r.t. the input and every weight equal finite differences (projections '${projections}')`, () => {
      const { layer, w, x, b, s, h } = setup(4, 1, 4, 6, projections);
    const g = asF32(new Rng(5).array(b * s * h));
    const xt = tensorOf(x, [b, s, h]);
    const gt = tensorOf(g, [b, s, h]);
    const loss64 = (xs: Float64Array, ws: Weights) => deltaNet64(xs, ws, b, s, h, projections).reduce((acc, v, i) => acc + v * g[i], 0);
    expectNoLeak(() => {
      const f = (input: tf.Tensor) => tf.sum(tf.mul(layer.apply(input) as tf.Tensor, gt)) as tf.Scalar;
      const dx = tf.grad(f)(xt);
      expectClose(dx, finiteDifferences(v => loss64(v, w), x), 1e-4, 'dx');
      const { value, grads } = tf.variableGrads(() => f(xt), layer.weights.map(v => v.read() as tf.Variable));
      for (const v of layer.weights) {
        const name = v.originalName.slice('lin/'.length);
        expectClose(grads[(v.read() as tf.Variable).name], finiteDifferences(p => loss64(x, { ...w, [name]: p }), w[name]), 1e-4, `d ${name}`);
      }
      tf.dispose([dx, value, ...Object.values(grads)]);
    });
    tf.dispose([xt, gt]);
    layer.dispose();
  });

  }

  it('Qwen3.5\'s four separate projections: forward matches Qwen3_5GatedDeltaNet', () => {
    const { layer, w, x, b, s, h } = setup(6, 2, 5, 6, 'separate');
    expect(layer.weights.map(v => `${v.originalName}:${v.shape}`).filter(n => n.includes('in_proj')).sort()).to.deep.equal([
      'lin/in_proj_a.weight:4,6', 'lin/in_proj_b.weight:4,6', 'lin/in_proj_qkv.weight:20,6', 'lin/in_proj_z.weight:8,6']);
    const xt = tensorOf(x, [b, s, h]);
    expectNoLeak(() => {
      const y = layer.apply(xt) as tf.Tensor;
      expectClose(y, deltaNet64(x, w, b, s, h, 'separate'), 1e-5, 'out');
      y.dispose();
    });
    const config = layer.getConfig();
    expect(config['projections']).to.equal('separate');
    expect((tfl.layers.Layer.fromConfig(GatedDeltaNet, config) as GatedDeltaNet).getConfig()).to.deep.equal(config);
    xt.dispose();
    layer.dispose();
  });

  it('names its weights like HF and round-trips its config', () => {
    const { layer } = setup(1);
    expect(layer.weights.map(v => `${v.originalName}:${v.shape}`).sort()).to.deep.equal([
      'lin/A_log:4', 'lin/conv1d.weight:20,1,3', 'lin/dt_bias:4', 'lin/in_proj_ba.weight:8,6',
      'lin/in_proj_qkvz.weight:28,6', 'lin/norm.weight:2', 'lin/out_proj.weight:6,8']);
    expect(gatedDeltaNetWeightShapes(ARGS, 6).map(e => e.name)).to.have.length(7);
    const config = layer.getConfig();
    const clone = tfl.layers.Layer.fromConfig(GatedDeltaNet, config) as GatedDeltaNet;
    expect(clone.getConfig()).to.deep.equal(config);
    layer.dispose();
  });

  it('packed samples (segmentIds) give what each sample gives alone, gradients included', () => {
    const { layer, x, h } = setup(8, 1, 6, 6);
    const packed = tensorOf(x, [1, 6, h]);
    const segmentIds = tf.tensor2d([[1, 1, 1, 1, 2, 2]], [1, 6], 'int32');
    const [first, second] = [tensorOf(x.slice(0, 4 * h), [1, 4, h]), tensorOf(x.slice(4 * h), [1, 2, h])];
    const g = tensorOf(new Rng(9).array(6 * h), [1, 6, h]);
    expectNoLeak(() => {
      const y = withSequenceContext({ segmentIds }, () => layer.apply(packed) as tf.Tensor);
      const each = [layer.apply(first) as tf.Tensor, layer.apply(second) as tf.Tensor];
      const alone = tf.concat(each, 1);
      expectClose(y, alone, 1e-6, 'packed vs alone');
      const weights = layer.weights.map(v => v.read() as tf.Variable);
      const lossPacked = () => tf.sum(tf.mul(withSequenceContext({ segmentIds }, () => layer.apply(packed) as tf.Tensor), g)) as tf.Scalar;
      const lossAlone = () => tf.sum(tf.mul(tf.concat([layer.apply(first) as tf.Tensor, layer.apply(second) as tf.Tensor], 1), g)) as tf.Scalar;
      const [a, b] = [tf.variableGrads(lossPacked, weights), tf.variableGrads(lossAlone, weights)];
      for (const v of weights) expectClose(a.grads[v.name], b.grads[v.name], 1e-5, `d ${v.name}`);
      tf.dispose([y, alone, ...each, a.value, b.value, ...Object.values(a.grads), ...Object.values(b.grads)]);
    });
    tf.dispose([packed, segmentIds, first, second, g]);
    layer.dispose();
  });

  it('with a KV cache, a prompt then one token at a time gives the rows of the full pass; the cache releases its states', () => {
    const { layer, x, h } = setup(12, 1, 7, 6);
    const before = tf.memory().numTensors;
    const fullInput = tensorOf(x, [1, 7, h]);
    const full = layer.apply(fullInput) as tf.Tensor;
    const cache = new KVCache();
    // a first call shorter than the conv (1 < K − 1), then longer ones, then single tokens
    const parts = [[0, 1], [1, 4], [4, 5], [5, 6], [6, 7]].map(([from, to]) => {
      const input = tensorOf(x.slice(from * h, to * h), [1, to - from, h]);
      const y = withSequenceContext({ kvCache: cache }, () => layer.apply(input) as tf.Tensor);
      input.dispose();
      return y;
    });
    expect(cache.state('lin/recurrent')!.shape).to.deep.equal([4, 3, 2]);
    expect(cache.state('lin/conv')!.shape).to.deep.equal([1, 2, 20]);
    const stitched = tf.concat(parts, 1);
    expectClose(stitched, full, 1e-5, 'cached vs full');
    const two = tensorOf(x.slice(0, 2 * h), [2, 1, h]);
    expect(() => withSequenceContext({ kvCache: cache }, () => layer.apply(two))).to.throw(
        "`GatedDeltaNet.call()`: the cache holds 1 rows for 'lin' but got 2: a cache serves one batch; start a new one for another");
    const one = tensorOf(x.slice(0, h), [1, 1, h]);
    const positionIds = tf.tensor2d([[0]], [1, 1], 'int32');
    expect(() => withSequenceContext({ kvCache: cache, positionIds }, () => layer.apply(one))).to.throw(
        "`GatedDeltaNet.call()`: a sequence context with a 'kvCache' takes no 'segmentIds' or 'positionIds'");
    tf.dispose([fullInput, full, stitched, ...parts, two, one, positionIds]);
    cache.dispose();
    expect(tf.memory().numTensors, 'the cache released its states').to.equal(before);
    layer.dispose();
  });

  it('rejects bad arguments and bad segment ids', () => {
    expect(() => new GatedDeltaNet({ ...ARGS, numKeyHeads: 0 })).to.throw("`GatedDeltaNet()`: 'numKeyHeads' must be >= 1 but got 0");
    expect(() => new GatedDeltaNet({ ...ARGS, numValueHeads: 3 })).to.throw(
        "`GatedDeltaNet()`: 'numValueHeads' must be a multiple of numKeyHeads (2) but got 3");
    expect(() => new GatedDeltaNet({ ...ARGS, keyHeadDim: 1.5 })).to.throw("`GatedDeltaNet()`: 'keyHeadDim' must be an integer");
    expect(() => new GatedDeltaNet({ ...ARGS, valueHeadDim: 0 })).to.throw("`GatedDeltaNet()`: 'valueHeadDim' must be >= 1 but got 0");
    expect(() => new GatedDeltaNet({ ...ARGS, convKernel: 0 })).to.throw("`GatedDeltaNet()`: 'convKernel' must be >= 1 but got 0");
    expect(() => new GatedDeltaNet({ ...ARGS, normEpsilon: NaN })).to.throw("`GatedDeltaNet()`: 'normEpsilon' must be a finite number");
    expect(() => new GatedDeltaNet({ ...ARGS, projections: 'fused' as DeltaNetProjections })).to.throw("`GatedDeltaNet()`: 'projections' must be one of");
    const layer = new GatedDeltaNet(ARGS);
    expect(() => layer.build([null, null, null])).to.throw("`GatedDeltaNet.build()`: the input's last dimension must be known but got shape [,,]");
    layer.apply(tfl.input({ shape: [null, 6] }));
    expect(() => layer.apply(tf.zeros([4, 6]))).to.throw("`GatedDeltaNet.call()`: the input must be [batch, seq, hidden] but got shape [4,6]");
    const x = tf.zeros([1, 3, 6]);
    const segmentIds = tf.tensor2d([[1, 2]], [1, 2], 'int32');
    expect(() => withSequenceContext({ segmentIds }, () => layer.apply(x))).to.throw(
        "`GatedDeltaNet.call()`: 'context.segmentIds' must be [batch, seq] [1,3] but is [1,2]");
    tf.dispose([x, segmentIds]);
    layer.dispose();
  });
});
