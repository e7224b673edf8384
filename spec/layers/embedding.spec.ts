import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { LMHead, TokenEmbedding } from '../../src/layers/embedding.js';
import { SwiGLUMLP } from '../../src/layers/swiglu_mlp.js';
import { asF32, expectClose, expectNoLeak, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

describe('TokenEmbedding, LMHead and SwiGLUMLP', () => {
  const rng = new Rng(5);
  const [v, h] = [7, 4];
  const table = asF32(rng.array(v * h));

  it('TokenEmbedding looks rows up for ids and, applied to hidden states, gives logits against the same table', () => {
    const embed = new TokenEmbedding({ name: 'emb', vocabSize: v, hiddenSize: h });
    const ids = tfl.input({ shape: [null], dtype: 'int32' });
    const hidden = embed.apply(ids) as tfl.SymbolicTensor;
    const logits = embed.apply(hidden) as tfl.SymbolicTensor;   // the tied head: one shared layer
    expect(hidden.shape).to.deep.equal([null, null, h]);
    expect(logits.shape).to.deep.equal([null, null, v]);
    const model = tfl.model({ inputs: ids, outputs: [hidden, logits] });
    expect(embed.weights.map(w => [w.originalName, w.shape])).to.deep.equal([['emb/weight', [v, h]]]);
    embed.weights[0].write(tensorOf(table, [v, h]));
    const idData = [3, 0, 6, 6, 1, 2];
    const x = tf.tensor2d(idData, [2, 3], 'int32');
    expectNoLeak(() => {
      const [e, l] = model.predict(x) as tf.Tensor[];
      const wantE = idData.flatMap(i => Array.from(table.slice(i * h, (i + 1) * h)));
      expectClose(e, wantE, 0, 'embedding rows');
      const wantL = idData.flatMap(i => Array.from({ length: v }, (_, j) => {
        let acc = 0;
        for (let k = 0; k < h; k++) acc += table[i * h + k] * table[j * h + k];
        return acc;
      }));
      expectClose(l, wantL, 1e-6, 'tied logits');
      tf.dispose([e, l]);
    });
    x.dispose();
    model.dispose();
  });

  it('the embedding gradient scatters into the looked-up rows (repeated ids add up)', () => {
    const embed = new TokenEmbedding({ name: 'emb2', vocabSize: v, hiddenSize: h });
    const ids = tf.tensor2d([[2, 5, 2]], [1, 3], 'int32');
    embed.apply(ids);
    const g = asF32(rng.array(3 * h));
    const gt = tensorOf(g, [1, 3, h]);
    const { value, grads } = tf.variableGrads(() => tf.sum(tf.mul(embed.apply(ids) as tf.Tensor, gt)) as tf.Scalar,
        [embed.weights[0].read() as tf.Variable]);
    const want = new Float64Array(v * h);
    [2, 5, 2].forEach((id, t) => { for (let k = 0; k < h; k++) want[id * h + k] += g[t * h + k]; });
    expectClose(grads[(embed.weights[0].read() as tf.Variable).name], want, 1e-6, 'd table');
    tf.dispose([ids, gt, value, ...Object.values(grads)]);
    embed.dispose();
  });

  it('LMHead computes x·Wᵀ with W [V, H] named "weight"', () => {
    const head = new LMHead({ name: 'lm_head', vocabSize: v, hiddenSize: h });
    const x = asF32(rng.array(2 * h));
    const xt = tensorOf(x, [1, 2, h]);
    head.apply(xt);
    head.weights[0].write(tensorOf(table, [v, h]));
    expect(head.weights[0].originalName).to.equal('lm_head/weight');
    const y = head.apply(xt) as tf.Tensor;
    const want = [0, 1].flatMap(t => Array.from({ length: v }, (_, j) => {
      let acc = 0;
      for (let k = 0; k < h; k++) acc += x[t * h + k] * table[j * h + k];
      return acc;
    }));
    expect(y.shape).to.deep.equal([1, 2, v]);
    expectClose(y, want, 1e-6, 'logits');
    tf.dispose([xt, y]);
    head.dispose();
  });

  it('SwiGLUMLP computes down(silu(gate x)·up x), gradients equal finite differences', () => {
    const mlp = new SwiGLUMLP({ name: 'mlp', intermediateSize: 3 });
    mlp.apply(tfl.input({ shape: [null, h] }));
    const w: Record<string, Float64Array> = {};
    for (const p of mlp.weights) {
      const name = p.originalName.slice('mlp/'.length);
      w[name] = asF32(rng.array(p.shape.reduce((a: number, b) => a * (b as number), 1), 0.5));
      p.write(tensorOf(w[name], p.shape as number[]));
    }
    expect(Object.keys(w).sort()).to.deep.equal(['down_proj.weight', 'gate_proj.weight', 'up_proj.weight']);
    const x = asF32(rng.array(2 * 2 * h));
    const g = asF32(rng.array(2 * 2 * h));
    const mlp64 = (xs: Float64Array, gate: Float64Array) => {
      const out = new Float64Array(xs.length);
      for (let t = 0; t < xs.length / h; t++) {
        const a = new Float64Array(3);
        for (let i = 0; i < 3; i++) {
          let gs = 0; let us = 0;
          for (let k = 0; k < h; k++) { gs += gate[i * h + k] * xs[t * h + k]; us += w['up_proj.weight'][i * h + k] * xs[t * h + k]; }
          a[i] = (gs / (1 + Math.exp(-gs))) * us;
        }
        for (let o = 0; o < h; o++) for (let i = 0; i < 3; i++) out[t * h + o] += w['down_proj.weight'][o * 3 + i] * a[i];
      }
      return out;
    };
    const xt = tensorOf(x, [2, 2, h]);
    const gt = tensorOf(g, [2, 2, h]);
    expectNoLeak(() => {
      const y = mlp.apply(xt) as tf.Tensor;
      expectClose(y, mlp64(x, w['gate_proj.weight']), 1e-6, 'forward');
      const gateVar = mlp.weights.find(p => p.originalName === 'mlp/gate_proj.weight')!.read() as tf.Variable;
      const { value, grads } = tf.variableGrads(() => tf.sum(tf.mul(mlp.apply(xt) as tf.Tensor, gt)) as tf.Scalar, [gateVar]);
      const fd = finiteDifferences(p => mlp64(x, p).reduce((acc, val, i) => acc + val * g[i], 0), w['gate_proj.weight']);
      expectClose(grads[gateVar.name], fd, 1e-5, 'd gate_proj');
      tf.dispose([y, value, ...Object.values(grads)]);
    });
    tf.dispose([xt, gt]);
    mlp.dispose();
  });

  it('rejects bad sizes and a bad input rank', () => {
    expect(() => new TokenEmbedding({ vocabSize: 0, hiddenSize: 4 })).to.throw("`TokenEmbedding()`: 'vocabSize' must be >= 1 but got 0");
    expect(() => new LMHead({ vocabSize: 4, hiddenSize: 2.5 })).to.throw("`LMHead()`: 'hiddenSize' must be an integer but got 2.5 (number)");
    expect(() => new SwiGLUMLP({ intermediateSize: -1 })).to.throw("`SwiGLUMLP()`: 'intermediateSize' must be >= 1 but got -1");
    const embed = new TokenEmbedding({ vocabSize: 4, hiddenSize: 2 });
    expect(() => embed.apply(tf.zeros([4], 'int32'))).to.throw(
      '`TokenEmbedding.call()`: the input must be ids [batch, seq] or hidden states [batch, seq, hidden] but got shape [4]');
  });
});
