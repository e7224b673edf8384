import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { buildDispatchPlan, planFromExperts } from '../../src/ops/experts/dispatch_plan.js';
import { chooseLoRAMode, fusedExperts } from '../../src/ops/experts/fused_experts.js';
import { splitExpertLoRA } from '../../src/ops/lora/split.js';
import { loraDropoutMask } from '../../src/ops/lora/dropout.js';
import { referenceExperts } from '../../src/ops/reference/moe_block.js';
import type { ExpertActivation, ExpertWeights, LoRADropout, LoRAFactors, LoRAMode } from '../../src/ops/types.js';
import { type ExpertCase as Case, type ExpertCaseSpec, loss64, makeExpertCase as makeCase, trainedOf, weightsWith } from '../helpers/expert_cases.js';
import { Rng, asF32, expectClose, expectNoLeak, finiteDifferences } from '../helpers/numeric.js';
import { experts64 } from './expert_reference64.js';

/** Checks the fused op's output and every gradient against the float64 reference and finite differences. */
function checkAgainstReference(c: Case, opts: { trainBase: boolean; loraMode?: LoRAMode }, seed: number): void {
  const { m } = c;
  const G = asF32(new Rng(seed).array(m.T * m.H));
  const gT = tf.tensor2d(Float32Array.from(G), [m.T, m.H]);
  const trained = trainedOf(c, opts.trainBase);
  const f = (...inputs: tf.Tensor[]) => {
    // the trained tensors arrive as inputs; rebuild the call from them
    const { x, weights, w } = weightsWith(c, trained, inputs);
    const out = fusedExperts(x, { weights, experts: c.experts }, w, c.activation,
        { trainExpertWeights: opts.trainBase, loraMode: opts.loraMode });
    return tf.sum(tf.mul(out, gT));
  };
  const out = fusedExperts(c.x, { weights: c.weights, experts: c.experts }, c.w, c.activation,
      { trainExpertWeights: opts.trainBase, loraMode: opts.loraMode });
  expectClose(out.dataSync(), experts64(m), 1e-5, 'out');
  out.dispose();
  const grads = tf.grads(f)(trained.map(p => p.t));
  trained.forEach((p, i) => {
    const fd = finiteDifferences(v => loss64(p.set(m, v), G), p.get(m));
    expectClose(grads[i].dataSync(), fd, 1e-4, `d${p.name}`);
  });
  tf.dispose([...grads, gT]);
}

describe('fusedExperts', () => {
  const cases: Array<[string, ExpertCaseSpec]> = [
    ['odd sizes, E=5 K=3', { T: 7, H: 6, I: 3, E: 5, K: 3 }],
    ['one token, K = E', { T: 1, H: 5, I: 2, E: 4, K: 4 }],
    ['every token to one expert, K=1', { T: 9, H: 4, I: 3, E: 3, K: 1, routing: 'one' }],
    ['experts with no tokens', { T: 6, H: 5, I: 2, E: 6, K: 2, routing: 'skip' }],
    ['gpt-oss layout, biases, clamped GLU', { T: 5, H: 6, I: 4, E: 4, K: 2, layout: 'inOutInterleaved', bias: true,
      activation: { kind: 'clampedSwiglu', alpha: 1.702, limit: 0.8 } }],
    ['Llama 4 layout (W stored [E, in, out], gate half then up half)', { T: 6, H: 5, I: 3, E: 4, K: 2, layout: 'inOut' }],
    ['Gemma 4 geglu (tanh GELU)', { T: 6, H: 5, I: 3, E: 4, K: 2, activation: { kind: 'gegluTanh' } }],
  ];
  for (const [name, spec] of cases) {
    it(`matches float64 and finite differences: ${name}`, () => {
      const c = makeCase(spec, 11);
      checkAgainstReference(c, { trainBase: true }, 12);
      c.dispose();
    });
  }

  for (const mode of ['split', 'materialize', 'auto'] as const) {
    it(`expert LoRA (${mode}): two adapters on W1, one on W2, frozen base; dx, dweights, dA, dB`, () => {
      const c = makeCase({ T: 8, H: 6, I: 3, E: 5, K: 2, lora1: [2, 1], lora2: [3], routing: 'skip' }, 21);
      checkAgainstReference(c, { trainBase: false, loraMode: mode }, 22);
      c.dispose();
    });
    it(`expert LoRA (${mode}) on the gpt-oss transposed layout`, () => {
      const c = makeCase({ T: 5, H: 4, I: 3, E: 3, K: 2, layout: 'inOutInterleaved', bias: true, lora1: [2], lora2: [1],
        activation: { kind: 'clampedSwiglu', alpha: 1.702, limit: 1.2 } }, 31);
      checkAgainstReference(c, { trainBase: false, loraMode: mode }, 32);
      c.dispose();
    });
    it(`expert LoRA (${mode}) on the Llama 4 transposed layout`, () => {
      const c = makeCase({ T: 5, H: 4, I: 3, E: 3, K: 2, layout: 'inOut', lora1: [2], lora2: [1] }, 33);
      checkAgainstReference(c, { trainBase: false, loraMode: mode }, 34);
      c.dispose();
    });
  }

  it('trains base and LoRA together in split mode (auto picks split)', () => {
    const c = makeCase({ T: 6, H: 5, I: 2, E: 3, K: 2, lora1: [1], lora2: [2] }, 41);
    checkAgainstReference(c, { trainBase: true, loraMode: 'auto' }, 42);
    c.dispose();
  });

  it('H=100, T=600, E=5, K=3: forward matches float64', () => {
    const c = makeCase({ T: 600, H: 100, I: 16, E: 5, K: 3, lora1: [2] }, 51);
    const out = fusedExperts(c.x, { weights: c.weights, experts: c.experts }, c.w, c.activation);
    expectClose(out.dataSync(), experts64(c.m), 1e-5, 'out');
    tf.dispose([out]);
    c.dispose();
  });

  it('B = 0 gives the base output exactly, in every LoRA mode', () => {
    const c = makeCase({ T: 7, H: 6, I: 3, E: 4, K: 2 }, 61);
    const zeroLoRA = (inSize: number, outSize: number): LoRAFactors =>
      ({ A: tf.randomNormal([2 * 4, inSize]), B: tf.zeros([outSize, 2 * 4]), scaling: 4 });
    const withLoRA: ExpertWeights = { ...c.w, gateUpLoRA: [zeroLoRA(6, 6)], downLoRA: [zeroLoRA(3, 6)] };
    const base = fusedExperts(c.x, c, c.w, c.activation);
    for (const loraMode of ['split', 'materialize', 'auto'] as const) {
      const adapted = fusedExperts(c.x, c, withLoRA, c.activation, { loraMode });
      expect(Array.from(adapted.dataSync()), loraMode).to.deep.equal(Array.from(base.dataSync()));
      adapted.dispose();
    }
    tf.dispose([base, ...withLoRA.gateUpLoRA!.flatMap(f => [f.A, f.B]), ...withLoRA.downLoRA!.flatMap(f => [f.A, f.B])]);
    c.dispose();
  });

  it('split LoRA backward allocates no gradient of the base weights\' size', () => {
    // W1 and W2 dominate: 8·128·64 + 8·64·64 floats vs a handful of token rows
    const c = makeCase({ T: 4, H: 64, I: 64, E: 8, K: 2, lora1: [2], lora2: [2] }, 71);
    const weightBytes = 4 * (c.w.gateUp.size + c.w.down.size);
    const peakOf = (trainExpertWeights: boolean) => {
      const before = tf.memory().numBytes;
      let peak = 0;
      const inputs = trainExpertWeights ? [c.x, c.w.gateUp, c.w.down] : [c.x, c.w.gateUpLoRA![0].A, c.w.downLoRA![0].B];
      const f = (...ins: tf.Tensor[]) => {
        const w = trainExpertWeights ? { ...c.w, gateUp: ins[1] as tf.Tensor3D, down: ins[2] as tf.Tensor3D }
          : { ...c.w, gateUpLoRA: [{ ...c.w.gateUpLoRA![0], A: ins[1] as tf.Tensor2D }], downLoRA: [{ ...c.w.downLoRA![0], B: ins[2] as tf.Tensor2D }] };
        return tf.sum(fusedExperts(ins[0] as tf.Tensor2D, c, w, c.activation, { trainExpertWeights, loraMode: 'split' }));
      };
      return tf.profile(() => { tf.dispose(tf.grads(f)(inputs)); }).then(info => { peak = info.peakBytes - before; return peak; });
    };
    return peakOf(false).then(frozen => peakOf(true).then(trained => {
      expect(frozen, 'peak bytes with the base frozen').to.be.below(weightBytes / 2);
      expect(trained, 'peak bytes when the base trains (the check can fail)').to.be.at.least(weightBytes);
      c.dispose();
    }));
  });

  it('leaves no tensor behind across forward + backward', () => {
    const c = makeCase({ T: 7, H: 6, I: 3, E: 5, K: 2, lora1: [2], lora2: [1] }, 81);
    expectNoLeak(() => {
      const f = (x: tf.Tensor, a: tf.Tensor) => tf.sum(fusedExperts(x as tf.Tensor2D, c,
          { ...c.w, gateUpLoRA: [{ ...c.w.gateUpLoRA![0], A: a as tf.Tensor2D }] }, c.activation));
      for (let step = 0; step < 3; step++) tf.dispose(tf.grads(f)([c.x, c.w.gateUpLoRA![0].A]));
      tf.dispose(fusedExperts(c.x, c, c.w, c.activation));
    });
    c.dispose();
  });

  it('auto picks split for training-sized rows and materialize when rows are many', () => {
    expect(chooseLoRAMode(2048, 256, 256, 8, 8)).to.equal('split');
    expect(chooseLoRAMode(2, 16, 16, 64, 1)).to.equal('split');
    // a huge rank against few rows of few experts: building W_eff is cheaper
    expect(chooseLoRAMode(4096, 64, 64, 1, 64)).to.equal('materialize');
  });

  describe('LoRA dropout (PEFT\'s lora_dropout, one mask per (token, expert) pair)', () => {
    const spec: ExpertCaseSpec = { T: 8, H: 6, I: 3, E: 5, K: 2, lora1: [2, 1], lora2: [3], routing: 'skip', dropout: 0.4, dropoutSeed: 7 };
    for (const mode of ['split', 'auto'] as const) {
      it(`out, dx, dweights, dA, dB equal float64 with the same masks and finite differences (${mode})`, () => {
        const c = makeCase(spec, 21);
        checkAgainstReference(c, { trainBase: false, loraMode: mode }, 22);
        c.dispose();
      });
    }
    it('gpt-oss transposed layout with biases; base and LoRA trained together', () => {
      const c = makeCase({ T: 5, H: 4, I: 3, E: 3, K: 2, layout: 'inOutInterleaved', bias: true, lora1: [2], lora2: [1],
        activation: { kind: 'clampedSwiglu', alpha: 1.702, limit: 1.2 }, dropout: 0.3, dropoutSeed: 3 }, 31);
      checkAgainstReference(c, { trainBase: true, loraMode: 'split' }, 32);
      c.dispose();
    });
    it('same seed: the same output; another seed or no dropout: a different one; p = 0 is no dropout; no leaks', () => {
      const c = makeCase({ ...spec, dropout: undefined }, 21);
      const run = (dropout?: LoRADropout) => {
        const w = { ...c.w, gateUpLoRA: c.w.gateUpLoRA!.map(f => ({ ...f, dropout })), downLoRA: c.w.downLoRA!.map(f => ({ ...f, dropout })) };
        const out = fusedExperts(c.x, { weights: c.weights, experts: c.experts }, w, c.activation, { loraMode: 'split' });
        const values = Array.from(out.dataSync());
        out.dispose();
        return values;
      };
      expectNoLeak(() => {
        const none = run();
        const a = run({ p: 0.4, seed: 1 });
        expect(run({ p: 0.4, seed: 1 })).to.deep.equal(a);
        expect(run({ p: 0.4, seed: 2 })).to.not.deep.equal(a);
        expect(a).to.not.deep.equal(none);
        expect(run({ p: 0, seed: 1 })).to.deep.equal(none);
        const [dA] = tf.grads((A: tf.Tensor) => tf.sum(fusedExperts(c.x, { weights: c.weights, experts: c.experts },
          { ...c.w, gateUpLoRA: [{ ...c.w.gateUpLoRA![0], A: A as tf.Tensor2D, dropout: { p: 0.4, seed: 1 } }] }, c.activation)))([c.w.gateUpLoRA![0].A]);
        dA.dispose();
      });
      c.dispose();
    });
    it('the reference block draws the same masks: its output and gradients equal the fused op\'s', () => {
      const c = makeCase(spec, 41);
      const G = tf.tensor2d(Float32Array.from(asF32(new Rng(42).array(c.m.T * c.m.H))), [c.m.T, c.m.H]);
      const factors = [c.w.gateUpLoRA![0].A, c.w.gateUpLoRA![1].B, c.w.downLoRA![0].A, c.w.downLoRA![0].B];
      const loss = (impl: typeof fusedExperts) => (x: tf.Tensor, a1: tf.Tensor, b2: tf.Tensor, a3: tf.Tensor, b3: tf.Tensor) => {
        const w = { ...c.w,
          gateUpLoRA: [{ ...c.w.gateUpLoRA![0], A: a1 as tf.Tensor2D }, { ...c.w.gateUpLoRA![1], B: b2 as tf.Tensor2D }],
          downLoRA: [{ ...c.w.downLoRA![0], A: a3 as tf.Tensor2D, B: b3 as tf.Tensor2D }] };
        return tf.sum(tf.mul(impl(x as tf.Tensor2D, { weights: c.weights, experts: c.experts }, w, c.activation), G));
      };
      const ref = referenceExperts(c.x, { weights: c.weights, experts: c.experts }, c.w, c.activation);
      expectClose(ref.dataSync(), experts64(c.m), 1e-5, 'reference out');
      const fused = tf.grads(loss(fusedExperts))([c.x, ...factors]);
      const plain = tf.grads(loss(referenceExperts as typeof fusedExperts))([c.x, ...factors]);
      fused.forEach((g, i) => expectClose(g.dataSync(), plain[i].dataSync(), 1e-4, `grad ${i}`));
      tf.dispose([ref, G, ...fused, ...plain]);
      c.dispose();
    });
    it('loraMode \'materialize\' is refused: it has no separate branch input', () => {
      const c = makeCase(spec, 21);
      expect(() => fusedExperts(c.x, { weights: c.weights, experts: c.experts }, c.w, c.activation, { loraMode: 'materialize' }))
        .to.throw(/`fusedExperts\(\)`: expert LoRA dropout needs loraMode 'split' or 'auto' but got loraMode 'materialize': materialize folds the adapter into W_eff/);
      c.dispose();
    });
  });

  describe('bad input', () => {
    let c: Case;
    before(() => { c = makeCase({ T: 4, H: 6, I: 3, E: 5, K: 2 }, 91); });
    after(() => c.dispose());
    const call = (over: Partial<{ x: unknown; weights: unknown; experts: unknown; w: Partial<ExpertWeights>; act: unknown; opts: unknown }>) => () =>
      fusedExperts((over.x ?? c.x) as tf.Tensor2D,
          { weights: (over.weights ?? c.weights) as tf.Tensor2D, experts: (over.experts ?? c.experts) as tf.Tensor2D },
          { ...c.w, ...over.w } as ExpertWeights, (over.act ?? c.activation) as ExpertActivation, (over.opts ?? {}) as object);
    const cases: Array<[string, () => unknown, RegExp]> = [];
    it('throws one clear error per problem and leaks nothing', () => {
      const x3 = tf.zeros([2, 4, 6]);
      const xInt = tf.zeros([4, 6], 'int32');
      const w1Bad = tf.zeros([5, 7, 6]);
      const w2Bad = tf.zeros([5, 6, 4]);
      const expFloat = tf.zeros([4, 2]);
      const expOut = tf.tensor2d([0, 1, 2, 5, 1, 1, 0, 4], [4, 2], 'int32');
      const aBad = tf.zeros([7, 6]);
      const bBad = tf.zeros([6, 10]);
      const wK = tf.zeros([4, 6]);
      const eK = tf.zeros([4, 6], 'int32');
      cases.push(
        ['x rank', call({ x: x3 }), /`fusedExperts\(\)`: 'x' must be 2-D but got shape \[2,4,6\]/],
        ['x dtype', call({ x: xInt }), /'x' must be float32 but got int32/],
        ['odd gateUp', call({ w: { gateUp: w1Bad as tf.Tensor3D } }), /'weights.gateUp' must have an even gate\+up size \(2I\) but got shape \[5,7,6\]/],
        ['down shape', call({ w: { down: w2Bad as tf.Tensor3D } }), /'weights.down' must have shape \[5,6,3\] but got \[5,6,4\]/],
        ['experts dtype', call({ experts: expFloat }), /'routing.experts' must be int32 but got float32/],
        ['experts range', call({ experts: expOut }), /'experts' must hold expert ids in \[0, 5\) but got 5 at token 1, slot 1/],
        ['A rows', call({ w: { gateUpLoRA: [{ A: aBad as tf.Tensor2D, B: bBad as tf.Tensor2D, scaling: 1 }] } }),
          /'weights.gateUpLoRA\[0\].A' must have r·E rows \(expert-major, r >= 1\) with E = 5 experts but got 7 rows/],
        ['B shape', call({ w: { gateUpLoRA: [{ A: tf.zeros([5, 6]) as tf.Tensor2D, B: bBad as tf.Tensor2D, scaling: 1 }] } }),
          /'weights.gateUpLoRA\[0\].B' must have shape \[6,5\] but got \[6,10\] \(\[out, r·E\] with r = 1/],
        ['scaling', call({ w: { downLoRA: [{ A: tf.zeros([5, 3]) as tf.Tensor2D, B: tf.zeros([6, 5]) as tf.Tensor2D, scaling: NaN }] } }),
          /'weights.downLoRA\[0\].scaling' must be a finite number but got NaN/],
        ['K > E', call({ weights: wK, experts: eK }), /top-k \(6\) must be in \[1, num experts \(5\)\]/],
        ['activation', call({ act: { kind: 'gelu' } }), /'activation.kind' must be one of 'swiglu', 'clampedSwiglu', 'gegluTanh' but got 'gelu'/],
        ['lora mode', call({ opts: { loraMode: 'fast' } }), /'options.loraMode' must be one of 'materialize', 'split', 'auto' but got 'fast'/],
      );
      for (const [label, fn, re] of cases) {
        expectNoLeak(() => expect(fn, label).to.throw(re), label);
      }
      tf.dispose([x3, xInt, w1Bad, w2Bad, expFloat, expOut, aBad, bBad, wK, eK]);
    });
  });
});

/**
 * splitExpertLoRA against float64 and finite differences; with `dropout`, the branch input of each
 * row is x ⊙ mask (the mask drawn [N, in] over x's rows from the seed), the base product sees x.
 */
function checkSplit(dropout?: LoRADropout): void {
  const rng = new Rng(5);
  const E = 3, inSize = 4, outSize = 5, r = 2, s = 1.7;
  const groupSizes = [3, 0, 4];
  const N = 7;
  const x = asF32(rng.array(N * inSize)), W = asF32(rng.array(E * outSize * inSize)),
    A = asF32(rng.array(r * E * inSize)), B = asF32(rng.array(outSize * r * E)), G = asF32(rng.array(N * outSize));
  const maskT = dropout && loraDropoutMask([N, inSize], dropout.p, dropout.seed);
  const mask = maskT ? Float64Array.from(maskT.dataSync()) : new Float64Array(N * inSize).fill(1);
  maskT?.dispose();
  if (dropout) expect(mask.some(v => v === 0) && mask.some(v => v !== 0)).to.equal(true);
  const ref = (xv: Float64Array, Av: Float64Array, Bv: Float64Array) => {
    const y = new Float64Array(N * outSize);
    let row = 0;
    groupSizes.forEach((n, e) => {
      for (let q = 0; q < n; q++, row++) {
        for (let o = 0; o < outSize; o++) {
          let v = 0;
          for (let i = 0; i < inSize; i++) {
            let d = 0;
            for (let j = 0; j < r; j++) d += Bv[o * r * E + j * E + e] * Av[(e * r + j) * inSize + i];
            v += xv[row * inSize + i] * (W[(e * outSize + o) * inSize + i] + s * d * mask[row * inSize + i]);
          }
          y[row * outSize + o] = v;
        }
      }
    });
    return y;
  };
  const lossRef = (xv: Float64Array, Av: Float64Array, Bv: Float64Array) => ref(xv, Av, Bv).reduce((acc, v, i) => acc + v * G[i], 0);
  const [xT, WT, AT, BT, GT] = [tf.tensor2d(Float32Array.from(x), [N, inSize]), tf.tensor3d(Float32Array.from(W), [E, outSize, inSize]),
    tf.tensor2d(Float32Array.from(A), [r * E, inSize]), tf.tensor2d(Float32Array.from(B), [outSize, r * E]), tf.tensor2d(Float32Array.from(G), [N, outSize])];
  const adapter = (a: tf.Tensor, b: tf.Tensor): LoRAFactors => ({ A: a as tf.Tensor2D, B: b as tf.Tensor2D, scaling: s, ...(dropout ? { dropout } : {}) });
  expectNoLeak(() => {
    const y = splitExpertLoRA(xT as tf.Tensor2D, groupSizes, WT as tf.Tensor3D, [adapter(AT, BT)]);
    expectClose(y.dataSync(), ref(x, A, B), 1e-5, 'y');
    const [dx, dA, dB] = tf.grads((xi: tf.Tensor, ai: tf.Tensor, bi: tf.Tensor) =>
      tf.sum(tf.mul(splitExpertLoRA(xi as tf.Tensor2D, groupSizes, WT as tf.Tensor3D, [adapter(ai, bi)]), GT)))([xT, AT, BT]);
    expectClose(dx.dataSync(), finiteDifferences(v => lossRef(v, A, B), x), 1e-4, 'dx');
    expectClose(dA.dataSync(), finiteDifferences(v => lossRef(x, v, B), A), 1e-4, 'dA');
    expectClose(dB.dataSync(), finiteDifferences(v => lossRef(x, A, v), B), 1e-4, 'dB');
    // rows of the empty expert 1 give zero gradient
    expect(Array.from(dA.dataSync().subarray(r * inSize, 2 * r * inSize)).every(v => v === 0)).to.equal(true);
    tf.dispose([y, dx, dA, dB]);
  });
  tf.dispose([xT, WT, AT, BT, GT]);
}

describe('splitExpertLoRA', () => {
  it('equals x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ per group; dx, dA, dB match finite differences; W gets none', () => {
    checkSplit();
  });
  it('with LoRA dropout: x·W_eᵀ + s·((x ⊙ mask)·A_eᵀ)·B_eᵀ; dx, dA, dB match finite differences', () => {
    checkSplit({ p: 0.4, seed: 9 });
  });
  it('checks the group sizes and the dropout', () => {
    const x = tf.zeros([7, 4]) as tf.Tensor2D, W = tf.zeros([3, 5, 4]) as tf.Tensor3D;
    const A = tf.zeros([6, 4]) as tf.Tensor2D, B = tf.zeros([5, 6]) as tf.Tensor2D;
    expect(() => splitExpertLoRA(x, [3, 0, 3], W, []))
      .to.throw(/`splitExpertLoRA\(\)`: 'groupSizes' must sum to the rows of x \(7\) but sum to 6/);
    expect(() => splitExpertLoRA(x, [7, 0], W, []))
      .to.throw(/'groupSizes' must be an array of 3 \(num experts\) row counts but got \[7,0\]/);
    expect(() => splitExpertLoRA(x, [3, 0, 4], W, [{ A, B, scaling: 1, dropout: { p: 1 } }]))
      .to.throw(/'adapters\[0\]\.dropout\.p' must be a number in \[0, 1\) but got 1/);
    expect(() => splitExpertLoRA(x, [3, 0, 4], W, [{ A, B, scaling: 1, dropout: { p: 0.1, seed: 0.5 } }]))
      .to.throw(/'adapters\[0\]\.dropout\.seed' must be an integer but got 0\.5/);
    expect(() => splitExpertLoRA(x, [3, 0, 4], W, [{ A, B, scaling: 1, dropout: null as unknown as LoRADropout }]))
      .to.throw(/'adapters\[0\]\.dropout' must be \{p, seed\?\} but got null/);
    tf.dispose([x, W, A, B]);
  });
});

describe('dispatch plan', () => {
  it('sorts pairs by expert stably and inverts the permutation', () => {
    const experts = [2, 0, 1, 2, 0, 2];   // T=3, K=2
    const plan = planFromExperts(experts, 3, 2, 4);
    expect(plan.groupSizes).to.deep.equal([2, 1, 3, 0]);
    expect(Array.from(plan.pairOfRow)).to.deep.equal([1, 4, 2, 0, 3, 5]);
    expect(Array.from(plan.tokenOfRow)).to.deep.equal([0, 2, 1, 0, 1, 2]);
    for (let p = 0; p < 6; p++) expect(plan.pairOfRow[plan.rowOfPair[p]]).to.equal(p);
  });
  it('reads the experts tensor once and checks its dtype', () => {
    const e = tf.tensor2d([[1, 0], [0, 1]], [2, 2], 'int32');
    expect(buildDispatchPlan(e as tf.Tensor2D, 2).groupSizes).to.deep.equal([2, 2]);
    const f = tf.zeros([2, 2]);
    expect(() => buildDispatchPlan(f as tf.Tensor2D, 2)).to.throw(/`buildDispatchPlan\(\)`: 'experts' must be int32 but got float32/);
    tf.dispose([e, f]);
  });
});
