/**
 * MLAAttention (DeepSeek-V3's multi-head latent attention) against a float64 reference written
 * from transformers' DeepseekV3Attention (both query paths, biases, interleaved rope), with
 * gradients against finite differences; packed samples equal each sample alone; a KV-cached pass
 * equals the full one; bad arguments are one clear error. The whole-model parity against
 * transformers' own logits is in moe_causal_lm.spec.ts (fixture deepseek_v3).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { KVCache } from '../../src/generate/kv_cache.js';
import { MLAAttention } from '../../src/layers/mla_attention.js';
import { withSequenceContext } from '../../src/layers/sequence_context.js';
import type { YarnRope } from '../../src/layers/rotary.js';
import { MLA_BASE as base, type MLA64Args as Args, type Weights, mla64 } from '../helpers/mla64.js';
import { asF32, expectClose, expectNoLeak, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

/** YaRN with its ramp inside the 4-wide rope part at theta 30 */
const YARN: YarnRope = {
  kind: 'yarn', factor: 4, originalMaxPositionEmbeddings: 16, betaFast: 8, betaSlow: 1, truncate: false, attentionFactor: 1.2,
};

function setup(args: Partial<Args>, seed: number, b = 2, s = 5, h = 8) {
  const full = { ...base, ...args };
  const layer = new MLAAttention({ ...full, name: 'attn' });
  layer.apply(tfl.input({ shape: [null, h] }));
  const rng = new Rng(seed);
  const w: Weights = {};
  for (const v of layer.weights) {
    const name = v.originalName.slice('attn/'.length);
    const size = v.shape.reduce((p: number, q) => p * (q as number), 1);
    w[name] = asF32(name.includes('norm') ? rng.array(size, 0.3).map(t => 1 + t) : rng.array(size, name.includes('bias') ? 0.1 : 0.5));
    v.write(tensorOf(w[name], v.shape as number[]));
  }
  const x = asF32(rng.array(b * s * h));
  return { layer, w, x, full, b, s, h };
}

describe('MLAAttention', () => {
  const cases: Array<[string, Partial<Args>]> = [
    ['plain q_proj, interleaved rope (the deepseek_v3 fixture\'s settings)', {}],
    ['q_lora_rank: q_a_proj → q_a_layernorm → q_b_proj, attention biases', { qLoraRank: 6, attentionBias: true }],
    ['rope not interleaved', { ropeInterleave: false, numHeads: 3 }],
    ['Mistral 4: YaRN on the rope part, a softmax scale, Llama 4 position scaling (context 2)', {
      qLoraRank: 6, ropeScaling: YARN, softmaxScale: 0.7, positionScaling: { beta: 0.4, originalMaxPositionEmbeddings: 2 },
    }],
  ];
  for (const [label, args] of cases) {
    it(`forward matches a float64 reference: ${label}`, () => {
      const { layer, w, x, full, b, s, h } = setup(args, 7);
      const xt = tensorOf(x, [b, s, h]);
      expectNoLeak(() => {
        const y = layer.apply(xt) as tf.Tensor;
        expect(y.shape).to.deep.equal([b, s, h]);
        expectClose(y, mla64(x, w, full, b, s, h), 1e-5, label);
        y.dispose();
      });
      xt.dispose();
      layer.dispose();
    });
  }

  it('gradients w.r.t. the input and every weight equal finite differences', () => {
    const { layer, w, x, full, b, s, h } = setup({ qLoraRank: 6, attentionBias: true }, 9, 2, 3, 8);
    const g = asF32(new Rng(10).array(b * s * h));
    const xt = tensorOf(x, [b, s, h]);
    const gt = tensorOf(g, [b, s, h]);
    const loss64 = (xs: Float64Array, ws: Weights) => mla64(xs, ws, full, b, s, h).reduce((acc, v, i) => acc + v * g[i], 0);
    expectNoLeak(() => {
      const f = (input: tf.Tensor) => tf.sum(tf.mul(layer.apply(input) as tf.Tensor, gt)) as tf.Scalar;
      const dx = tf.grad(f)(xt);
      expectClose(dx, finiteDifferences(v => loss64(v, w), x), 1e-4, 'dx');
      const { value, grads } = tf.variableGrads(() => f(xt), layer.weights.map(v => v.read() as tf.Variable));
      for (const v of layer.weights) {
        const name = v.originalName.slice('attn/'.length);
        const fd = finiteDifferences(p => loss64(x, { ...w, [name]: p }), w[name]);
        expectClose(grads[(v.read() as tf.Variable).name], fd, 1e-4, `d ${name}`);
      }
      tf.dispose([dx, value, ...Object.values(grads)]);
    });
    tf.dispose([xt, gt]);
    layer.dispose();
  });

  const MISTRAL4: Partial<Args> = { ropeScaling: YARN, softmaxScale: 0.7, positionScaling: { beta: 0.4, originalMaxPositionEmbeddings: 2 } };

  for (const [label, settings] of [['', {}], [' (Mistral 4: YaRN, position scaling)', MISTRAL4]] as Array<[string, Partial<Args>]>) {
  it(`packed samples (segmentIds, positionIds) give what each sample gives alone${label}`, () => {
    const { layer, x, h } = setup(settings, 3, 1, 5, 8);
    const packed = tensorOf(x, [1, 5, h]);
    const segmentIds = tf.tensor2d([[1, 1, 1, 2, 2]], [1, 5], 'int32');
    const positionIds = tf.tensor2d([[0, 1, 2, 0, 1]], [1, 5], 'int32');
    const [first, second] = [tensorOf(x.slice(0, 3 * h), [1, 3, h]), tensorOf(x.slice(3 * h), [1, 2, h])];
    expectNoLeak(() => {
      const y = withSequenceContext({ segmentIds, positionIds }, () => layer.apply(packed) as tf.Tensor);
      const each = [layer.apply(first) as tf.Tensor, layer.apply(second) as tf.Tensor];
      const alone = tf.concat(each, 1);
      expectClose(y, alone, 1e-6, 'packed vs alone');
      tf.dispose([y, alone, ...each]);
    });
    tf.dispose([packed, segmentIds, positionIds, first, second]);
    layer.dispose();
  });

  it(`with a KV cache, a prompt then one token at a time gives the rows of the full pass${label}`, () => {
    const { layer, x, h } = setup({ qLoraRank: 6, ...settings }, 5, 1, 6, 8);
    const full = layer.apply(tensorOf(x, [1, 6, h])) as tf.Tensor;
    const cache = new KVCache();
    const parts = [[0, 4], [4, 5], [5, 6]].map(([from, to]) => {
      const input = tensorOf(x.slice(from * h, to * h), [1, to - from, h]);
      const y = withSequenceContext({ kvCache: cache }, () => layer.apply(input) as tf.Tensor);
      input.dispose();
      return y;
    });
    expect(cache.seen('attn')).to.equal(6);
    const stitched = tf.concat(parts, 1);
    expectClose(stitched, full, 1e-5, 'cached vs full');
    const segmentIds = tf.tensor2d([[1]], [1, 1], 'int32');
    const one = tensorOf(x.slice(0, h), [1, 1, h]);
    expect(() => withSequenceContext({ kvCache: cache, segmentIds }, () => layer.apply(one)))
      .to.throw("`MLAAttention.call()`: a sequence context with a 'kvCache' takes no 'segmentIds' or 'positionIds'");
    tf.dispose([full, stitched, ...parts, segmentIds, one]);
    cache.dispose();
    layer.dispose();
  });
  }

  it("round-trips Mistral 4's settings through its config (written only when used)", () => {
    const { layer } = setup(MISTRAL4, 1);
    const config = layer.getConfig();
    expect([config['ropeScaling'], config['softmaxScale'], config['positionScaling']])
      .to.deep.equal([MISTRAL4.ropeScaling, MISTRAL4.softmaxScale, MISTRAL4.positionScaling]);
    expect((tfl.layers.Layer.fromConfig(MLAAttention, config) as MLAAttention).getConfig()).to.deep.equal(config);
    layer.dispose();
    const plain = setup({}, 1).layer;
    expect(Object.keys(plain.getConfig())).to.not.include.members(['ropeScaling', 'softmaxScale', 'positionScaling']);
    plain.dispose();
  });

  it('names its weights like HF and round-trips its config', () => {
    const { layer } = setup({ qLoraRank: 6, attentionBias: true }, 1);
    expect(layer.weights.map(v => `${v.originalName}:${v.shape}`).sort()).to.deep.equal([
      'attn/kv_a_layernorm.weight:5', 'attn/kv_a_proj_with_mqa.bias:9', 'attn/kv_a_proj_with_mqa.weight:9,8',
      'attn/kv_b_proj.weight:12,5', 'attn/o_proj.bias:8', 'attn/o_proj.weight:8,6', 'attn/q_a_layernorm.weight:6',
      'attn/q_a_proj.bias:6', 'attn/q_a_proj.weight:6,8', 'attn/q_b_proj.weight:14,6']);
    const config = layer.getConfig();
    const clone = tfl.layers.Layer.fromConfig(MLAAttention, config) as MLAAttention;
    expect(clone.getConfig()).to.deep.equal(config);
    layer.dispose();
  });

  it('rejects bad arguments', () => {
    const ok = { ...base };
    expect(() => new MLAAttention({ ...ok, numHeads: 0 })).to.throw("`MLAAttention()`: 'numHeads' must be >= 1 but got 0");
    expect(() => new MLAAttention({ ...ok, qLoraRank: 0 })).to.throw("`MLAAttention()`: 'qLoraRank' must be >= 1 but got 0");
    expect(() => new MLAAttention({ ...ok, kvLoraRank: 1.5 })).to.throw("`MLAAttention()`: 'kvLoraRank' must be an integer");
    expect(() => new MLAAttention({ ...ok, qkNopeHeadDim: 0 })).to.throw("`MLAAttention()`: 'qkNopeHeadDim' must be >= 1 but got 0");
    expect(() => new MLAAttention({ ...ok, qkRopeHeadDim: 5 }))
      .to.throw("`MLAAttention()`: 'qkRopeHeadDim' must be even (rotary pairs) but got 5");
    expect(() => new MLAAttention({ ...ok, vHeadDim: 0 })).to.throw("`MLAAttention()`: 'vHeadDim' must be >= 1 but got 0");
    expect(() => new MLAAttention({ ...ok, ropeTheta: 0 })).to.throw("`MLAAttention()`: 'ropeTheta' must be > 0 but got 0");
    expect(() => new MLAAttention({ ...ok, normEpsilon: NaN })).to.throw("`MLAAttention()`: 'normEpsilon' must be a finite number");
    expect(() => new MLAAttention({ ...ok, ropeScaling: { kind: 'ntk' } as never }))
      .to.throw("`MLAAttention()`: 'ropeScaling' must be null or {kind: 'yarn', ...} but got an object {kind}");
    expect(() => new MLAAttention({ ...ok, softmaxScale: 0 })).to.throw("`MLAAttention()`: 'softmaxScale' must be > 0 but got 0");
    expect(() => new MLAAttention({ ...ok, softmaxScale: NaN })).to.throw("`MLAAttention()`: 'softmaxScale' must be a finite number");
    expect(() => new MLAAttention({ ...ok, positionScaling: { beta: Infinity, originalMaxPositionEmbeddings: 4 } }))
      .to.throw("`MLAAttention()`: 'positionScaling.beta' must be a finite number");
    expect(() => new MLAAttention({ ...ok, positionScaling: { beta: 0.1, originalMaxPositionEmbeddings: 0 } }))
      .to.throw("`MLAAttention()`: 'positionScaling.originalMaxPositionEmbeddings' must be >= 1 but got 0");
    const layer = new MLAAttention(ok);
    expect(() => layer.build([null, null, null])).to.throw("`MLAAttention.build()`: the input's last dimension must be known but got shape [,,]");
    layer.apply(tfl.input({ shape: [null, 8] }));
    expect(() => layer.apply(tf.zeros([4, 8]))).to.throw("`MLAAttention.call()`: the input must be [batch, seq, hidden] but got shape [4,8]");
    const x = tf.zeros([1, 3, 8]);
    const bad = tf.tensor2d([[0, 1]], [1, 2], 'int32');
    expect(() => withSequenceContext({ positionIds: bad }, () => layer.apply(x)))
      .to.throw("`MLAAttention.call()`: 'context.positionIds' must be [batch, seq] [1,3] but is [1,2]");
    tf.dispose([x, bad]);
    layer.dispose();
  });
});
