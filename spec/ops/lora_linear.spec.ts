/**
 * loraLinear (a frozen projection and its LoRA branches as one op) against float64 and finite
 * differences, and against the same projection composed of plain tfjs ops on the tape: values and
 * the gradients of x and of A and B of two adapters, with and without dropout masks and bias; then
 * LinearLoRA.apply, which trains with it, against its composed path. Reads with `await data()` so
 * the spec runs on webgpu too.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { RotaryAttention } from '../../src/layers/attention.js';
import { withSequenceContext } from '../../src/layers/sequence_context.js';
import { loraDropoutMask } from '../../src/ops/lora/dropout.js';
import { loraLinear, type LinearLoRABranch } from '../../src/ops/lora/linear.js';
import { asF32, expectClose, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

interface Branch64 { A: Float64Array; B: Float64Array; r: number; s: number; mask: Float64Array | null }

/** float64: x·Wᵀ + b + Σ s·((m ⊙ x)·Aᵀ)·Bᵀ, x [n, in], W [out, in]. */
function linear64(x: Float64Array, n: number, W: Float64Array, b: Float64Array | null, branches: Branch64[]): Float64Array {
  const inSize = x.length / n;
  const out = W.length / inSize;
  const y = new Float64Array(n * out);
  for (let t = 0; t < n; t++) {
    const downs = branches.map(br => {
      const u = new Float64Array(br.r);
      for (let k = 0; k < br.r; k++) {
        for (let i = 0; i < inSize; i++) u[k] += br.A[k * inSize + i] * x[t * inSize + i] * (br.mask ? br.mask[t * inSize + i] : 1);
      }
      return u;
    });
    for (let o = 0; o < out; o++) {
      let acc = b ? b[o] : 0;
      for (let i = 0; i < inSize; i++) acc += W[o * inSize + i] * x[t * inSize + i];
      branches.forEach((br, a) => { for (let k = 0; k < br.r; k++) acc += br.s * br.B[o * br.r + k] * downs[a][k]; });
      y[t * out + o] = acc;
    }
  }
  return y;
}

/** The same projection composed of plain tfjs ops, so tfjs's tape gives the gradients. */
function composed(x: tf.Tensor2D, W: tf.Tensor2D, b: tf.Tensor1D | null, branches: readonly LinearLoRABranch[]): tf.Tensor2D {
  let y = tf.matMul(x, W, false, true);
  if (b !== null) y = tf.add(y, b);
  for (const br of branches) {
    const input = br.mask === undefined ? x : tf.mul(x, br.mask);
    y = tf.add(y, tf.mul(tf.matMul(tf.matMul(input, br.A, false, true), br.B, false, true), br.scaling));
  }
  return y as tf.Tensor2D;
}

async function read(t: tf.Tensor): Promise<Float64Array> {
  return Float64Array.from(await t.data());
}

describe('ops/loraLinear', () => {
  const [n, inSize, out] = [5, 6, 4];
  const ranks = [2, 3];
  const scalings = [1.5, 0.75];
  const cases = [
    { label: 'two adapters', bias: false, masked: [false, false] },
    { label: 'two adapters, bias', bias: true, masked: [false, false] },
    { label: 'two adapters, the first with a dropout mask, bias', bias: true, masked: [true, false] },
    { label: 'two adapters, both with dropout masks', bias: false, masked: [true, true] },
  ];
  for (const c of cases) {
    it(`${c.label}: value and the gradients of x, A and B equal float64 (finite differences) and the composed tape version`, async () => {
      const rng = new Rng(11);
      const x = asF32(rng.array(n * inSize));
      const W = asF32(rng.array(out * inSize));
      const b = c.bias ? asF32(rng.array(out)) : null;
      const g = asF32(rng.array(n * out));
      const masks = await Promise.all(c.masked.map(async (m, a) => {
        if (!m) return null;
        const t = loraDropoutMask([n, inSize], 0.4, 20 + a);
        const data = await read(t);
        t.dispose();
        expect([...new Set(data)].sort(), 'the mask drops something').to.deep.equal([0, Math.fround(1 / 0.6)].sort());
        return data;
      }));
      const branches64: Branch64[] = ranks.map((r, a) => ({
        A: asF32(rng.array(r * inSize)), B: asF32(rng.array(out * r)), r, s: scalings[a], mask: masks[a],
      }));

      const xt = tensorOf(x, [n, inSize]) as tf.Tensor2D;
      const Wt = tensorOf(W, [out, inSize]) as tf.Tensor2D;
      const bt = b === null ? null : tensorOf(b, [out]) as tf.Tensor1D;
      const gt = tensorOf(g, [n, out]);
      const factors = branches64.map(br => [tensorOf(br.A, [br.r, inSize]) as tf.Tensor2D, tensorOf(br.B, [out, br.r]) as tf.Tensor2D]);
      const maskTensors = masks.map(m => (m === null ? undefined : tensorOf(m, [n, inSize]) as tf.Tensor2D));
      const branchesOf = (fs: tf.Tensor[]): LinearLoRABranch[] => branches64.map((br, a) => ({
        A: fs[2 * a] as tf.Tensor2D, B: fs[2 * a + 1] as tf.Tensor2D, scaling: br.s, mask: maskTensors[a],
      }));
      const inputs = [xt, ...factors.flat()];
      const loss = (op: typeof composed) => (...args: tf.Tensor[]) =>
        tf.sum(tf.mul(op(args[0] as tf.Tensor2D, Wt, bt, branchesOf(args.slice(1))), gt)) as tf.Scalar;

      const before = tf.memory().numTensors;
      const y = loraLinear(xt, Wt, bt, branchesOf(factors.flat()));
      const fused = tf.grads(loss(loraLinear))(inputs);
      const plain = tf.grads(loss(composed))(inputs);
      expect(tf.memory().numTensors - before, 'only the value and two sets of gradients are left').to.equal(1 + 2 * inputs.length);

      expectClose(await read(y), linear64(x, n, W, b, branches64), 1e-5, 'value vs float64');
      // L = Σ y ⊙ g, differentiated in float64 w.r.t. every input
      const lossOf = (xs: Float64Array, brs: Branch64[]) => linear64(xs, n, W, b, brs).reduce((acc, v, i) => acc + v * g[i], 0);
      const references = [
        finiteDifferences(p => lossOf(p, branches64), x),
        ...branches64.flatMap((br, a) => [
          finiteDifferences(p => lossOf(x, branches64.map((o, k) => (k === a ? { ...o, A: p } : o))), br.A),
          finiteDifferences(p => lossOf(x, branches64.map((o, k) => (k === a ? { ...o, B: p } : o))), br.B),
        ]),
      ];
      const names = ['x', 'A0', 'B0', 'A1', 'B1'];
      for (let i = 0; i < inputs.length; i++) {
        expect(fused[i].shape, `d ${names[i]} shape`).to.deep.equal(inputs[i].shape);
        expectClose(await read(fused[i]), references[i], 1e-4, `d ${names[i]} vs finite differences`);
        expectClose(await read(fused[i]), await read(plain[i]), 1e-5, `d ${names[i]} vs the composed tape version`);
      }
      tf.dispose([y, ...fused, ...plain, xt, Wt, gt, ...factors.flat()]);
      if (bt !== null) bt.dispose();
      tf.dispose(maskTensors.filter((m): m is tf.Tensor2D => m !== undefined));
    });
  }

  it('without adapters it is x·Wᵀ + b and passes dy·W to x; outside a gradient it leaves only its value', async () => {
    const rng = new Rng(12);
    const x = asF32(rng.array(n * inSize));
    const W = asF32(rng.array(out * inSize));
    const b = asF32(rng.array(out));
    const g = asF32(rng.array(n * out));
    const [xt, Wt, bt, gt] = [tensorOf(x, [n, inSize]) as tf.Tensor2D, tensorOf(W, [out, inSize]) as tf.Tensor2D, tensorOf(b, [out]) as tf.Tensor1D, tensorOf(g, [n, out])];
    const before = tf.memory().numTensors;
    const y = loraLinear(xt, Wt, bt, []);
    expect(tf.memory().numTensors - before).to.equal(1);
    expectClose(await read(y), linear64(x, n, W, b, []), 1e-5, 'value');
    const [dx] = tf.grads((v: tf.Tensor) => tf.sum(tf.mul(loraLinear(v as tf.Tensor2D, Wt, bt, []), gt)))([xt]);
    expect(tf.memory().numTensors - before).to.equal(2);
    expectClose(await read(dx), finiteDifferences(p => linear64(p, n, W, b, []).reduce((acc, v, i) => acc + v * g[i], 0), x), 1e-4, 'd x');
    tf.dispose([y, dx, xt, Wt, bt, gt]);
  });

  it('LinearLoRA.apply trains through it: two adapters (one with dropout in a training pass) and a bias, value and gradients as its composed path', async () => {
    const layer = new RotaryAttention({
      name: 'self_attn', numHeads: 2, numKeyValueHeads: 1, headDim: 4, ropeTheta: 50, qkvBias: true, outputBias: false,
      qkNorm: 'none', normEpsilon: 1e-6, clipQKV: null, slidingWindow: null,
    });
    layer.apply(tfl.input({ shape: [null, 8] }));
    layer.lora.add({ name: 'a1', modules: { q_proj: { r: 2, alpha: 3 } }, dropout: 0.3 }, 'random');
    layer.lora.add({ name: 'a2', modules: { q_proj: { r: 1, alpha: 2 } } }, 'random');
    const weight = layer.weights.find(v => v.originalName === 'self_attn/q_proj.weight')!;
    const bias = layer.weights.find(v => v.originalName === 'self_attn/q_proj.bias')!;
    const rng = new Rng(13);
    for (const v of [weight, bias]) v.write(tensorOf(rng.array(v.shape.reduce((p: number, q) => p * (q as number), 1)), v.shape as number[]));
    const x = tensorOf(rng.array(5 * 8), [5, 8]) as tf.Tensor2D;
    const g = tensorOf(rng.array(5 * 8), [5, 8]);
    const factors = ['a1', 'a2'].flatMap(name => [layer.lora.factors(name).q_proj.A.read(), layer.lora.factors(name).q_proj.B.read()]);
    // the same dropout seed: both paths draw the same mask for a1
    const pass = (trainableBase: boolean) => withSequenceContext({ training: true, dropoutSeed: 5 }, () => {
      weight.trainable = trainableBase;  // a trainable base takes the composed path
      bias.trainable = trainableBase;
      const { value, grads } = tf.valueAndGrads((...args: tf.Tensor[]) =>
        tf.sum(tf.mul(layer.lora.apply(args[0] as tf.Tensor2D, 'q_proj', bias), g)) as tf.Scalar)([x, ...factors]);
      weight.trainable = false;
      bias.trainable = false;
      return [value, ...grads];
    });
    const before = tf.memory().numTensors;
    const fused = pass(false);
    const plain = pass(true);
    expect(tf.memory().numTensors - before).to.equal(fused.length + plain.length);
    const names = ['loss', 'x', 'a1.A', 'a1.B', 'a2.A', 'a2.B'];
    for (let i = 0; i < fused.length; i++) expectClose(await read(fused[i]), await read(plain[i]), 1e-5, names[i]);
    // a dropped input element gets no branch gradient: a1's dA differs from the undropped one
    const undropped = tf.valueAndGrads((...args: tf.Tensor[]) =>
      tf.sum(tf.mul(layer.lora.apply(args[0] as tf.Tensor2D, 'q_proj', bias), g)) as tf.Scalar)([x, ...factors]);
    expect(Array.from(await read(undropped.grads[1]))).not.to.deep.equal(Array.from(await read(fused[2])));
    tf.dispose([...fused, ...plain, undropped.value, ...undropped.grads, x, g]);
    layer.dispose();
  });

  it('refuses bad arguments with one message each, naming the argument', () => tf.tidy(() => {
    const x = tf.zeros([3, 4]) as tf.Tensor2D;
    const W = tf.zeros([2, 4]) as tf.Tensor2D;
    const A = tf.zeros([1, 4]) as tf.Tensor2D;
    const B = tf.zeros([2, 1]) as tf.Tensor2D;
    const call = (...args: unknown[]) => () => (loraLinear as (...a: unknown[]) => tf.Tensor)(...args);
    expect(call(tf.zeros([3]), W, null, [])).to.throw(/`loraLinear\(\)`: 'x' must be 2-D but got shape \[3\]/);
    expect(call(x, tf.zeros([2, 5]), null, [])).to.throw(/'weight' must have shape \[\*,4\] but got \[2,5\] \(x \[N,in\] = \[3,4\], weight \[out,in\] = \[2,5\]\)/);
    expect(call(x, W, [1, 2], [])).to.throw(/'bias' must be a 1-D float32 tensor but got an array of length 2/);
    expect(call(x, W, tf.zeros([3]), [])).to.throw(/'bias' must have shape \[2\] but got \[3\]/);
    expect(call(x, W, null, null)).to.throw(/'adapters' must be an array of \{A, B, scaling, mask\?\} but got null/);
    expect(call(x, W, null, [{ A: tf.zeros([1, 5]), B, scaling: 1 }])).to.throw(/'adapters\[0\]\.A' must have shape \[\*,4\] but got \[1,5\]/);
    expect(call(x, W, null, [{ A, B: tf.zeros([2, 2]), scaling: 1 }])).to.throw(/'adapters\[0\]\.B' must have shape \[2,1\] but got \[2,2\] \(.*adapters\[0\]\.A \[r,in\] = \[1,4\]\)/);
    expect(call(x, W, null, [{ A, B, scaling: NaN }])).to.throw(/'adapters\[0\]\.scaling' must be a finite number but got NaN/);
    expect(call(x, W, null, [{ A, B, scaling: 1, mask: tf.zeros([2, 4]) }])).to.throw(/'adapters\[0\]\.mask' must have shape \[3,4\] but got \[2,4\]/);
  }));
});
