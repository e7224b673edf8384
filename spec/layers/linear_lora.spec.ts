import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { RotaryAttention } from '../../src/layers/attention.js';
import { dropoutSeedOf, loraDropoutMask } from '../../src/layers/linear_lora.js';
import { withSequenceContext } from '../../src/layers/sequence_context.js';
import { SwiGLUMLP } from '../../src/layers/swiglu_mlp.js';
import { attention64, type Weights } from '../helpers/attention64.js';
import { asF32, expectClose, expectNoLeak, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

const attnArgs = {
  numHeads: 2, numKeyValueHeads: 1, headDim: 4, ropeTheta: 50, qkvBias: true, outputBias: false,
  qkNorm: 'none', normEpsilon: 1e-6, clipQKV: null, slidingWindow: null,
} as const;

/** Writes random float32-exact values into every variable of the layer; returns them by short name. */
function fill(layer: tfl.layers.Layer, rng: Rng, scale = 0.4): Weights {
  const w: Weights = {};
  for (const v of layer.weights) {
    const name = v.originalName.slice(layer.name.length + 1);
    const size = v.shape.reduce((p: number, q) => p * (q as number), 1);
    w[name] = asF32(rng.array(size, scale));
    v.write(tensorOf(w[name], v.shape as number[]));
  }
  return w;
}

/** W + s·B·A in float64 (W [out, in], A [r, in], B [out, r]). */
function folded(W: Float64Array, A: Float64Array, B: Float64Array, r: number, s: number): Float64Array {
  const inSize = A.length / r;
  const out = W.length / inSize;
  const y = Float64Array.from(W);
  for (let o = 0; o < out; o++) {
    for (let i = 0; i < inSize; i++) {
      let acc = 0;
      for (let k = 0; k < r; k++) acc += B[o * r + k] * A[k * inSize + i];
      y[o * inSize + i] += s * acc;
    }
  }
  return y;
}

/** float64 linear with LoRA: x·Wᵀ + s·((m ⊙ x)·Aᵀ)·Bᵀ per row (m = 1 without dropout). */
function linear64(x: Float64Array, n: number, W: Float64Array, lora: { A: Float64Array; B: Float64Array; r: number; s: number; mask?: Float64Array } | null): Float64Array {
  const inSize = x.length / n;
  const out = W.length / inSize;
  const y = new Float64Array(n * out);
  for (let t = 0; t < n; t++) {
    const ax = lora ? new Float64Array(lora.r) : null;
    if (lora) {
      for (let k = 0; k < lora.r; k++) {
        for (let i = 0; i < inSize; i++) ax![k] += lora.A[k * inSize + i] * x[t * inSize + i] * (lora.mask ? lora.mask[t * inSize + i] : 1);
      }
    }
    for (let o = 0; o < out; o++) {
      let acc = 0;
      for (let i = 0; i < inSize; i++) acc += W[o * inSize + i] * x[t * inSize + i];
      if (lora) for (let k = 0; k < lora.r; k++) acc += lora.s * lora.B[o * lora.r + k] * ax![k];
      y[t * out + o] = acc;
    }
  }
  return y;
}

type Lora64 = Parameters<typeof linear64>[3];

/** float64 SwiGLU MLP: down(silu(gate(x)) · up(x)), each projection with its optional LoRA. */
function mlp64(x: Float64Array, n: number, w: Weights, lora: Partial<Record<'gate_proj' | 'up_proj' | 'down_proj', Lora64>>): Float64Array {
  const g = linear64(x, n, w['gate_proj.weight'], lora.gate_proj ?? null);
  const u = linear64(x, n, w['up_proj.weight'], lora.up_proj ?? null);
  const a = g.map((v, i) => v / (1 + Math.exp(-v)) * u[i]);
  return linear64(a, n, w['down_proj.weight'], lora.down_proj ?? null);
}

function attentionLayer(h: number): RotaryAttention {
  const layer = new RotaryAttention({ ...attnArgs, name: 'self_attn' });
  layer.apply(tfl.input({ shape: [null, h] }));
  return layer;
}

function mlpLayer(h: number, i: number): SwiGLUMLP {
  const layer = new SwiGLUMLP({ name: 'mlp', intermediateSize: i });
  layer.apply(tfl.input({ shape: [null, h] }));
  return layer;
}

describe('LoRA on linear projections (attention, dense MLP)', () => {
  it('a fresh adapter (PEFT init, B = 0) gives exactly the base output; A ~ U(±1/√in), the base frozen', () => {
    const attn = attentionLayer(8);
    const mlp = mlpLayer(8, 6);
    fill(attn, new Rng(1));
    fill(mlp, new Rng(2));
    const x = tensorOf(new Rng(3).array(2 * 3 * 8), [2, 3, 8]);
    for (const [layer, modules] of [[attn, ['q_proj', 'k_proj', 'v_proj', 'o_proj']], [mlp, ['gate_proj', 'up_proj', 'down_proj']]] as const) {
      const before = layer.apply(x) as tf.Tensor;
      layer.lora.add({ name: 'default', modules: Object.fromEntries(modules.map(m => [m, { r: 2, alpha: 4 }])) });
      expectNoLeak(() => {
        const after = layer.apply(x) as tf.Tensor;
        expect(Array.from(after.dataSync())).to.deep.equal(Array.from(before.dataSync()));
        after.dispose();
      });
      before.dispose();
      expect(layer.trainableWeights.map(v => v.originalName)).to.deep.equal(
          modules.flatMap(m => [`${layer.name}/lora_default_${m}_A`, `${layer.name}/lora_default_${m}_B`]));
      for (const m of modules) {
        const f = layer.lora.factors('default')[m];
        expect(f.B.read().dataSync().every(v => v === 0), `${m} B = 0`).to.equal(true);
        const bound = 1 / Math.sqrt(f.A.shape[1] as number);
        expect(f.A.read().dataSync().every(v => Math.abs(v) <= bound), `${m} A within ±1/√in`).to.equal(true);
      }
    }
    x.dispose();
    attn.dispose();
    mlp.dispose();
  });

  it('attention with q_proj and o_proj adapters: forward and the gradients of A and B equal a float64 reference', () => {
    const [b, s, h, r] = [2, 3, 8, 2];
    const layer = attentionLayer(h);
    layer.lora.add({ name: 'default', modules: { q_proj: { r, alpha: 3 }, o_proj: { r: 1, alpha: 5 } }, rsLoRA: true }, 'random');
    const w = fill(layer, new Rng(4));
    const x = asF32(new Rng(5).array(b * s * h));
    const g = asF32(new Rng(6).array(b * s * h));
    const scaling = { q_proj: 3 / Math.sqrt(r), o_proj: 5 / Math.sqrt(1) };
    const rank = { q_proj: r, o_proj: 1 };
    const ref = (ws: Weights) => {
      const eff = { ...ws };
      for (const p of ['q_proj', 'o_proj'] as const) {
        eff[`${p}.weight`] = folded(ws[`${p}.weight`], ws[`lora_default_${p}_A`], ws[`lora_default_${p}_B`], rank[p], scaling[p]);
      }
      return attention64(x, eff, attnArgs, b, s, h);
    };
    const xt = tensorOf(x, [b, s, h]);
    const gt = tensorOf(g, [b, s, h]);
    expectNoLeak(() => {
      const y = layer.apply(xt) as tf.Tensor;
      expectClose(y, ref(w), 1e-5, 'forward');
      const vars = layer.trainableWeights.map(v => v.read() as tf.Variable);
      const { value, grads } = tf.variableGrads(() => tf.sum(tf.mul(layer.apply(xt) as tf.Tensor, gt)) as tf.Scalar, vars);
      expect(Object.keys(grads)).to.have.length(4);
      for (const v of layer.trainableWeights) {
        const name = v.originalName.slice('self_attn/'.length);
        const fd = finiteDifferences(p => ref({ ...w, [name]: p }).reduce((acc, t, i) => acc + t * g[i], 0), w[name]);
        expectClose(grads[(v.read() as tf.Variable).name], fd, 1e-4, `d ${name}`);
      }
      tf.dispose([y, value, ...Object.values(grads)]);
    });
    tf.dispose([xt, gt]);
    layer.dispose();
  });

  it('dense MLP adapters: forward and the gradients of A and B equal a float64 reference', () => {
    const [n, h, i] = [4, 6, 5];
    const layer = mlpLayer(h, i);
    layer.lora.add({ name: 'default', modules: { gate_proj: { r: 2, alpha: 4 }, down_proj: { r: 3, alpha: 2 } } }, 'random');
    const w = fill(layer, new Rng(7));
    const x = asF32(new Rng(8).array(n * h));
    const g = asF32(new Rng(9).array(n * h));
    const ref = (ws: Weights) => mlp64(x, n, ws, {
      gate_proj: { A: ws['lora_default_gate_proj_A'], B: ws['lora_default_gate_proj_B'], r: 2, s: 2 },
      down_proj: { A: ws['lora_default_down_proj_A'], B: ws['lora_default_down_proj_B'], r: 3, s: 2 / 3 },
    });
    const xt = tensorOf(x, [1, n, h]);
    const gt = tensorOf(g, [1, n, h]);
    expectNoLeak(() => {
      const y = layer.apply(xt) as tf.Tensor;
      expectClose(y, ref(w), 1e-5, 'forward');
      const vars = layer.trainableWeights.map(v => v.read() as tf.Variable);
      const { value, grads } = tf.variableGrads(() => tf.sum(tf.mul(layer.apply(xt) as tf.Tensor, gt)) as tf.Scalar, vars);
      for (const v of layer.trainableWeights) {
        const name = v.originalName.slice('mlp/'.length);
        const fd = finiteDifferences(p => ref({ ...w, [name]: p }).reduce((acc, t, k) => acc + t * g[k], 0), w[name]);
        expectClose(grads[(v.read() as tf.Variable).name], fd, 1e-4, `d ${name}`);
      }
      tf.dispose([y, value, ...Object.values(grads)]);
    });
    tf.dispose([xt, gt]);
    layer.dispose();
  });

  it('lora_dropout drops the branch input in training passes only, with masks seeded by the pass seed and the module', () => {
    const [n, h, i, p] = [5, 6, 4, 0.4];
    const layer = mlpLayer(h, i);
    layer.lora.add({ name: 'default', modules: { gate_proj: { r: 2, alpha: 4 }, up_proj: { r: 2, alpha: 4 } }, dropout: p }, 'random');
    const w = fill(layer, new Rng(10));
    const x = asF32(new Rng(11).array(n * h));
    const xt = tensorOf(x, [1, n, h]);
    const lora = (proj: string, mask?: Float64Array): Lora64 =>
      ({ A: w[`lora_default_${proj}_A`], B: w[`lora_default_${proj}_B`], r: 2, s: 2, mask });
    const run = (context: Parameters<typeof withSequenceContext>[0]) => withSequenceContext(context, () => {
      const y = layer.apply(xt) as tf.Tensor;
      const data = Float64Array.from(y.dataSync());
      y.dispose();
      return data;
    });
    const noDropout = mlp64(x, n, w, { gate_proj: lora('gate_proj'), up_proj: lora('up_proj') });
    expectNoLeak(() => {
      expectClose(run({}), noDropout, 1e-5, 'outside training');
      expectClose(run({ training: false, dropoutSeed: 3 }), noDropout, 1e-5, 'training: false');
      const trained = run({ training: true, dropoutSeed: 3 });
      expect(Array.from(run({ training: true, dropoutSeed: 3 }))).to.deep.equal(Array.from(trained));
      expect(Array.from(run({ training: true, dropoutSeed: 4 }))).not.to.deep.equal(Array.from(trained));
      const mask = (proj: string) => {
        const m = loraDropoutMask([n, h], p, dropoutSeedOf(3, `mlp.${proj}/default`));
        const data = Float64Array.from(m.dataSync());
        m.dispose();
        // PEFT's nn.Dropout: zero or 1/(1 − p), both masks dropping something
        expect([...new Set(data)].sort()).to.deep.equal([0, Math.fround(1 / (1 - p))].sort());
        return data;
      };
      const gateMask = mask('gate_proj');
      const upMask = mask('up_proj');
      expect(Array.from(gateMask)).not.to.deep.equal(Array.from(upMask));
      expectClose(trained, mlp64(x, n, w, { gate_proj: lora('gate_proj', gateMask), up_proj: lora('up_proj', upMask) }), 1e-5,
          'training with seed 3 vs the float64 reference with the same masks');
    });
    xt.dispose();
    layer.dispose();
  });

  it('merge folds ΔW = s·B·A into W (same outputs), unmerge restores W, and a saved config rebuilds the adapters', async () => {
    const layer = attentionLayer(8);
    layer.lora.add({ name: 'a1', modules: { k_proj: { r: 2, alpha: 2 }, v_proj: { r: 1, alpha: 8 } }, dropout: 0.1 }, 'random');
    fill(layer, new Rng(12));
    const x = tensorOf(new Rng(13).array(2 * 4 * 8), [2, 4, 8]);
    const withAdapter = layer.apply(x) as tf.Tensor;
    const k = tf.clone(layer.weights.find(v => v.originalName === 'self_attn/k_proj.weight')!.read());
    layer.lora.merge('a1');
    expect(layer.lora.mergedAdapters).to.deep.equal(['a1']);
    const merged = layer.apply(x) as tf.Tensor;
    expectClose(merged, withAdapter, 1e-5, 'merged');
    layer.lora.unmerge('a1');
    expectClose(layer.weights.find(v => v.originalName === 'self_attn/k_proj.weight')!.read(), k, 1e-6, 'unmerged k_proj');

    // through a model's JSON, as tfjs saves and loads it (it rewrites keys and strings)
    const input = tfl.input({ shape: [null, 8] });
    const model = tfl.model({ inputs: input, outputs: layer.apply(input) as tfl.SymbolicTensor });
    const copyModel = await tfl.models.modelFromJSON({ modelTopology: model.toJSON(null, false) as tf.io.ModelJSON['modelTopology'] });
    const copy = copyModel.getLayer('self_attn') as RotaryAttention;
    expect(copy.lora.config('a1')).to.deep.equal({ name: 'a1', modules: { k_proj: { r: 2, alpha: 2 }, v_proj: { r: 1, alpha: 8 } }, rsLoRA: false, dropout: 0.1 });
    expect(copy.lora.activeAdapters).to.deep.equal(['a1']);
    copyModel.dispose();
    tf.dispose([x, withAdapter, merged, k]);
    layer.dispose();
  });

  it('rejects bad adapters and calls with one clear message each', () => {
    const layer = attentionLayer(8);
    const add = (config: unknown) => () => layer.lora.add(config as never);
    expect(add(null)).to.throw(/`RotaryAttention.addAdapter\(\)`: 'config' must be \{name, modules\} but got null/);
    expect(add({ name: 'a b', modules: {} })).to.throw(/'name' must be letters, digits, '_' or '-' but got "a b"/);
    expect(add({ name: 'a', modules: {} })).to.throw(/'modules' must name at least one of 'q_proj', 'k_proj', 'v_proj', 'o_proj' but got \{\}/);
    expect(add({ name: 'a', modules: { gate_proj: { r: 1, alpha: 1 } } })).to.throw(/'modules' must name projections among 'q_proj', .* but got 'gate_proj'/);
    expect(add({ name: 'a', modules: { q_proj: { r: 1.5, alpha: 1 } } })).to.throw(/modules\.q_proj\.r/);
    expect(add({ name: 'a', modules: { q_proj: { r: 1, alpha: 0 } } })).to.throw(/'modules\.q_proj\.alpha' must be a finite number > 0 but got 0/);
    expect(add({ name: 'a', modules: { q_proj: { r: 1, alpha: 1 } }, dropout: 1 })).to.throw(/'dropout' must be a number in \[0, 1\) but got 1/);
    expect(add({ name: 'a', modules: { k_proj: { r: 5, alpha: 1 } } })).to.throw(/'modules\.k_proj\.r' must be <= min\(out, in\) = 4 of k_proj \[4, 8\] but got 5/);
    layer.lora.add({ name: 'a', modules: { q_proj: { r: 1, alpha: 1 } } });
    expect(add({ name: 'a', modules: { q_proj: { r: 1, alpha: 1 } } })).to.throw(/an adapter named 'a' already exists \(adapters: a\)/);
    expect(() => layer.lora.factors('zz')).to.throw(/`RotaryAttention.adapter\(\)`: no adapter 'zz'; adapters: a/);
    expect(() => layer.lora.deltaWeight('a', 'v_proj')).to.throw(/adapter 'a' does not adapt 'v_proj' \(it adapts q_proj\)/);
    expect(() => layer.lora.unmerge('a')).to.throw(/adapter 'a' is not merged/);
    expect(() => layer.lora.setActive(['b'])).to.throw(/unknown adapters b; adapters: a/);
    layer.lora.merge('a');
    expect(() => layer.lora.merge('a')).to.throw(/adapter 'a' is already merged/);
    expect(() => layer.lora.remove('a')).to.throw(/`RotaryAttention.removeAdapter\(\)`: adapter 'a' is merged; unmerge it first/);
    layer.lora.unmerge('a');
    layer.lora.remove('a');
    expect(layer.lora.names()).to.deep.equal([]);
    expect(layer.trainableWeights.length).to.equal(layer.weights.length);
    layer.dispose();
  });
});
