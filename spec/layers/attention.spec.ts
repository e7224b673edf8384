import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { RotaryAttention, type RotaryAttentionArgs } from '../../src/layers/attention.js';
import type { YarnRope } from '../../src/layers/rotary.js';
import { attention64, type Weights } from '../helpers/attention64.js';
import { asF32, expectClose, expectNoLeak, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

const base = {
  numHeads: 4, numKeyValueHeads: 2, headDim: 4, ropeTheta: 50, qkvBias: false, outputBias: false,
  qkNorm: 'none', normEpsilon: 1e-6, clipQKV: null, slidingWindow: null,
} as const;

function setup(args: Partial<RotaryAttentionArgs>, seed: number, b = 2, s = 5, h = 12) {
  const full = { ...base, ...args } as Required<Omit<RotaryAttentionArgs, keyof tfl.layers.Layer | 'name' | 'initializerRange'>>;
  const layer = new RotaryAttention({ ...full, name: 'attn' });
  layer.apply(tfl.input({ shape: [null, h] }));  // builds inside the layer's name scope, as a model does
  const rng = new Rng(seed);
  const w: Weights = {};
  for (const v of layer.weights) {
    const name = v.originalName.slice('attn/'.length);
    const size = v.shape.reduce((p: number, q) => p * (q as number), 1);
    w[name] = asF32(name.includes('norm') ? rng.array(size, 0.3).map(t => 1 + t) : rng.array(size, name.includes('bias') ? 0.1 : 0.4));
    v.write(tensorOf(w[name], v.shape as number[]));
  }
  const x = asF32(rng.array(b * s * h));
  return { layer, w, x, full, b, s, h };
}

/** YaRN with a ramp inside head_dim 4 at theta 50 (dimension bounds 0.33 and 1.0) */
const YARN: YarnRope = {
  kind: 'yarn', factor: 4, originalMaxPositionEmbeddings: 16, betaFast: 8, betaSlow: 1, truncate: false,
  attentionFactor: 0.1 * Math.log(4) + 1,
};

describe('RotaryAttention', () => {
  const cases: Array<[string, Partial<RotaryAttentionArgs>]> = [
    ['Mixtral-like: GQA, no bias', {}],
    ['Qwen2-MoE-like: q/k/v bias', { qkvBias: true }],
    ['Qwen3-MoE-like: per-head q/k norm, all biases', { qkNorm: 'perHead', qkvBias: true, outputBias: true }],
    ['OLMoE-like: q/k norm over the projection, clip_qkv, no GQA', { qkNorm: 'full', numKeyValueHeads: 4, clipQKV: 0.8 }],
    ['sliding window 2', { slidingWindow: 2 }],
    ['GLM-4.5-MoE-like: partial rotary (half of each head), q/k/v bias, per-head q/k norm',
      { rotaryDim: 2, qkvBias: true, qkNorm: 'perHead' }],
    ['gpt-oss-like: sinks, YaRN rope, all biases, sliding window 3', {
      sinks: true, ropeScaling: YARN, qkvBias: true, outputBias: true, slidingWindow: 3,
    }],
    ['ERNIE-4.5-like: interleaved rope pairs (2i, 2i+1), head 8', { ropeInterleave: true, headDim: 8 }],
    ['Hunyuan-like: per-head q/k norm after rope, all biases', { qkNorm: 'perHeadAfterRope', qkvBias: true, outputBias: true }],
    ['MiniMax-M2-like: q/k norm over the projection, partial rotary', { qkNorm: 'full', rotaryDim: 2 }],
    ['Llama 4 rope layer: adjacent-pair (complex) rope, L2 q/k norm, chunks of 2', {
      ropeInterleave: true, qkNorm: 'l2', attentionChunkSize: 2,
    }],
    ['Llama 4 NoPE layer: no rope, temperature tuning (floor scale 2)', {
      rope: false, temperatureTuning: { attnScale: 0.5, floorScale: 2 },
    }],
    ["Llama 4 rope layer with the Hub's llama3 rope scaling (one frequency in the smoothed band, one divided)", {
      ropeInterleave: true, qkNorm: 'l2', ropeScaling: { kind: 'llama3', factor: 4, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8 },
    }],
    ['interleaved rope pairs on a partial rotary width (the first 4 of each head of 8)', {
      ropeInterleave: true, headDim: 8, rotaryDim: 4,
    }],
  ];
  for (const [label, args] of cases) {
    it(`forward matches a float64 reference: ${label}`, () => {
      const { layer, w, x, full, b, s, h } = setup(args, 7);
      const xt = tensorOf(x, [b, s, h]);
      expectNoLeak(() => {
        const y = layer.apply(xt) as tf.Tensor;
        expect(y.shape).to.deep.equal([b, s, h]);
        expectClose(y, attention64(x, w, full, b, s, h), 1e-5, label);
        y.dispose();
      });
      xt.dispose();
      layer.dispose();
    });
  }

  for (const [label, args] of [cases[2], cases[3], cases[5], cases[6], cases[7], cases[8], cases[10], cases[11]]) {
    it(`gradients w.r.t. the input and every weight equal finite differences: ${label}`, () => {
      const { layer, w, x, full, b, s, h } = setup({ ...args, clipQKV: null }, 9, 2, 3, 8);
      const refArgs = { ...full, clipQKV: null };
      const rng = new Rng(10);
      const g = asF32(rng.array(b * s * h));
      const xt = tensorOf(x, [b, s, h]);
      const gt = tensorOf(g, [b, s, h]);
      const loss64 = (xs: Float64Array, ws: Weights) => attention64(xs, ws, refArgs, b, s, h).reduce((acc, v, i) => acc + v * g[i], 0);
      expectNoLeak(() => {
        const f = (input: tf.Tensor) => tf.sum(tf.mul(layer.apply(input) as tf.Tensor, gt)) as tf.Scalar;
        const dx = tf.grad(f)(xt);
        expectClose(dx, finiteDifferences(v => loss64(v, w), x), 1e-4, 'dx');
        const vars = layer.weights.map(v => v.read() as tf.Variable);
        const { value, grads } = tf.variableGrads(() => f(xt), vars);
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
  }

  it('is causal: changing a later token leaves earlier outputs unchanged', () => {
    const { layer, x, b, s, h } = setup({ qkNorm: 'perHead' }, 4);
    const changed = Float64Array.from(x);
    for (let i = (s - 1) * h; i < s * h; i++) changed[i] += 1;  // last token of the first sequence
    const y1 = (layer.apply(tensorOf(x, [b, s, h])) as tf.Tensor).dataSync();
    const y2 = (layer.apply(tensorOf(changed, [b, s, h])) as tf.Tensor).dataSync();
    expect(Array.from(y2.slice(0, (s - 1) * h))).to.deep.equal(Array.from(y1.slice(0, (s - 1) * h)));
    expect(Math.abs(y2[(s - 1) * h] - y1[(s - 1) * h])).to.be.greaterThan(0);
    layer.dispose();
  });

  it('names its weights like HF and round-trips its config', () => {
    const { layer } = setup({ qkNorm: 'full', qkvBias: true, outputBias: true, clipQKV: 2, slidingWindow: 3 }, 1);
    expect(layer.weights.map(v => v.originalName).sort()).to.deep.equal([
      'attn/k_norm.weight', 'attn/k_proj.bias', 'attn/k_proj.weight', 'attn/o_proj.bias', 'attn/o_proj.weight',
      'attn/q_norm.weight', 'attn/q_proj.bias', 'attn/q_proj.weight', 'attn/v_proj.bias', 'attn/v_proj.weight']);
    expect(layer.weights.find(v => v.originalName === 'attn/q_norm.weight')!.shape).to.deep.equal([16]);
    expect(layer.weights.find(v => v.originalName === 'attn/k_norm.weight')!.shape).to.deep.equal([8]);
    const config = layer.getConfig();
    const clone = tfl.layers.Layer.fromConfig(RotaryAttention, config) as RotaryAttention;
    expect(clone.getConfig()).to.deep.equal(config);
    layer.dispose();
    // gpt-oss: one sink logit per head, HF's name; YaRN survives the round trip
    const gptOss = setup({ sinks: true, ropeScaling: YARN }, 1).layer;
    expect(gptOss.weights.find(v => v.originalName === 'attn/sinks')!.shape).to.deep.equal([4]);
    const gptOssConfig = gptOss.getConfig();
    expect(gptOssConfig['ropeScaling']).to.deep.equal(YARN);
    expect((tfl.layers.Layer.fromConfig(RotaryAttention, gptOssConfig) as RotaryAttention).getConfig()).to.deep.equal(gptOssConfig);
    gptOss.dispose();
    // Hunyuan: its norms after rope keep HF's names (query_layernorm / key_layernorm) and width D
    const hunyuan = setup({ qkNorm: 'perHeadAfterRope', ropeInterleave: false }, 1).layer;
    expect(hunyuan.weights.map(v => v.originalName).filter(n => n.includes('norm')).sort())
      .to.deep.equal(['attn/key_layernorm.weight', 'attn/query_layernorm.weight']);
    expect(hunyuan.weights.find(v => v.originalName === 'attn/key_layernorm.weight')!.shape).to.deep.equal([4]);
    hunyuan.dispose();
    const ernie = setup({ ropeInterleave: true }, 1).layer;
    const ernieConfig = ernie.getConfig();
    expect(ernieConfig['ropeInterleave']).to.equal(true);
    expect((tfl.layers.Layer.fromConfig(RotaryAttention, ernieConfig) as RotaryAttention).ropeInterleave).to.equal(true);
    ernie.dispose();
  });

  it("round-trips Llama 4's settings through its config (rope, temperature and chunks written only when used)", () => {
    for (const args of [{ ropeInterleave: true, qkNorm: 'l2', attentionChunkSize: 2 },
      { rope: false, temperatureTuning: { attnScale: 0.5, floorScale: 2 } }] as Array<Partial<RotaryAttentionArgs>>) {
      const { layer } = setup(args, 1);
      const config = layer.getConfig();
      for (const [key, value] of Object.entries(args)) expect(config[key], key).to.deep.equal(value);
      expect((tfl.layers.Layer.fromConfig(RotaryAttention, config) as RotaryAttention).getConfig()).to.deep.equal(config);
      layer.dispose();
    }
    const { layer } = setup({}, 1);
    expect(Object.keys(layer.getConfig())).to.not.include.members(['rope', 'temperatureTuning', 'attentionChunkSize']);
    layer.dispose();
  });

  it('rejects bad arguments', () => {
    const ok = { numHeads: 4, numKeyValueHeads: 2, headDim: 4, ropeTheta: 1e4 };
    expect(() => new RotaryAttention({ ...ok, numKeyValueHeads: 3 }))
      .to.throw("`RotaryAttention()`: 'numKeyValueHeads' (3) must divide 'numHeads' (4)");
    expect(() => new RotaryAttention({ ...ok, numKeyValueHeads: 8 }))
      .to.throw("`RotaryAttention()`: 'numKeyValueHeads' must be <= 4 but got 8");
    expect(() => new RotaryAttention({ ...ok, headDim: 5 }))
      .to.throw("`RotaryAttention()`: 'headDim' must be even (rotary pairs) but got 5");
    expect(() => new RotaryAttention({ ...ok, ropeTheta: -1 }))
      .to.throw("`RotaryAttention()`: 'ropeTheta' must be > 0 but got -1");
    expect(() => new RotaryAttention({ ...ok, qkNorm: 'rms' as never }))
      .to.throw("`RotaryAttention()`: 'qkNorm' must be one of 'none', 'perHead', 'full', 'perHeadAfterRope', 'l2' but got 'rms'");
    expect(() => new RotaryAttention({ ...ok, ropeInterleave: 'yes' as never }))
      .to.throw("`RotaryAttention()`: 'ropeInterleave' must be a boolean but got \"yes\" (string)");
    expect(() => new RotaryAttention({ ...ok, rope: 0 as never }))
      .to.throw("`RotaryAttention()`: 'rope' must be a boolean but got 0 (number)");
    expect(() => new RotaryAttention({ ...ok, temperatureTuning: { attnScale: NaN, floorScale: 4 } }))
      .to.throw("`RotaryAttention()`: 'temperatureTuning.attnScale' must be a finite number but got NaN");
    expect(() => new RotaryAttention({ ...ok, temperatureTuning: { attnScale: 0.1, floorScale: 0 } }))
      .to.throw("`RotaryAttention()`: 'temperatureTuning.floorScale' must be > 0 but got 0");
    expect(() => new RotaryAttention({ ...ok, attentionChunkSize: 0 }))
      .to.throw("`RotaryAttention()`: 'attentionChunkSize' must be >= 1 but got 0");
    expect(() => new RotaryAttention({ ...ok, clipQKV: 0 }))
      .to.throw("`RotaryAttention()`: 'clipQKV' must be > 0 but got 0");
    expect(() => new RotaryAttention({ ...ok, slidingWindow: 0 }))
      .to.throw("`RotaryAttention()`: 'slidingWindow' must be >= 1 but got 0");
    expect(() => new RotaryAttention({ ...ok, rotaryDim: 6 }))
      .to.throw("`RotaryAttention()`: 'rotaryDim' must be <= 4 but got 6");
    expect(() => new RotaryAttention({ ...ok, headDim: 6, rotaryDim: 3 }))
      .to.throw("`RotaryAttention()`: 'rotaryDim' must be even (rotary pairs) but got 3");
    const yarn = (change: Partial<YarnRope>) => new RotaryAttention({ ...ok, ropeScaling: { ...YARN, ...change } });
    expect(() => new RotaryAttention({ ...ok, ropeScaling: { kind: 'ntk' } as never }))
      .to.throw("`RotaryAttention()`: 'ropeScaling' must be null, {kind: 'yarn', ...} or {kind: 'llama3', ...} but got an object {kind}");
    const llama3 = { kind: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 8192 } as const;
    expect(() => new RotaryAttention({ ...ok, ropeScaling: { ...llama3, lowFreqFactor: 2, highFreqFactor: 1 } }))
      .to.throw("`RotaryAttention()`: 'ropeScaling' needs highFreqFactor >= lowFreqFactor > 0 but got lowFreqFactor 2, highFreqFactor 1");
    expect(() => new RotaryAttention({ ...ok, ropeScaling: { ...llama3, factor: NaN } }))
      .to.throw("`RotaryAttention()`: 'ropeScaling.factor' must be a finite number but got NaN");
    expect(() => new RotaryAttention({ ...ok, ropeScaling: { ...llama3, originalMaxPositionEmbeddings: 0 } }))
      .to.throw("`RotaryAttention()`: 'ropeScaling.originalMaxPositionEmbeddings' must be >= 1 but got 0");
    expect(() => yarn({ factor: NaN })).to.throw("`RotaryAttention()`: 'ropeScaling.factor' must be a finite number but got NaN");
    expect(() => yarn({ factor: 0.5 })).to.throw("`RotaryAttention()`: 'ropeScaling.factor' must be >= 1 but got 0.5");
    expect(() => yarn({ attentionFactor: 0 })).to.throw("`RotaryAttention()`: 'ropeScaling.attentionFactor' must be > 0 but got 0");
    expect(() => yarn({ betaFast: 1, betaSlow: 2 }))
      .to.throw("`RotaryAttention()`: 'ropeScaling' needs betaFast > betaSlow > 0 but got betaFast 1, betaSlow 2");
    expect(() => yarn({ originalMaxPositionEmbeddings: 0.5 }))
      .to.throw("`RotaryAttention()`: 'ropeScaling.originalMaxPositionEmbeddings' must be an integer but got 0.5");
    expect(() => yarn({ truncate: 'yes' as never }))
      .to.throw("`RotaryAttention()`: 'ropeScaling.truncate' must be a boolean but got \"yes\" (string)");
    expect(() => new RotaryAttention({ ...ok, sinks: 1 as never }))
      .to.throw("`RotaryAttention()`: 'sinks' must be a boolean but got 1 (number)");
    const layer = new RotaryAttention(ok);
    layer.apply(tfl.input({ shape: [null, 8] }));
    expect(() => layer.apply(tf.zeros([4, 8]))).to.throw("`RotaryAttention.call()`: the input must be [batch, seq, hidden] but got shape [4,8]");
    layer.dispose();
  });
});
