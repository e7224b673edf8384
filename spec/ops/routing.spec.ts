import * as tf from '@tensorflow/tfjs-core';
import type { Tensor, Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { referenceRoute } from '../../src/ops/reference/routing.js';
import {
  registerRouting, registeredRoutingKinds, route, routeSigmoidGroupTopK, routeSoftmaxBiasedTopK,
  routeSoftmaxGroupLimitedGreedy, routeSoftmaxGroupTopK, routeSoftmaxTopK, routeTopKSigmoid, routeTopKSoftmax,
} from '../../src/ops/routing/index.js';
import type { Routing, RoutingConfig, RoutingKind } from '../../src/ops/types.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { Rng, asF32, expectClose, expectNoLeak, tensorOf } from '../helpers/numeric.js';
import { gradFD, routeRows64, separatedLogits, sigmoid64, softmax64 } from '../helpers/routing64.js';

// ---- the ops under test -------------------------------------------------------------------------

type Impl = (logits: Tensor2D, cfg: RoutingConfig, bias?: Tensor1D) => Routing;

/** The fused ops called directly (not through route()), by kind. */
const FUSED: Record<RoutingKind, Impl> = {
  softmaxTopK: (x, c) => routeSoftmaxTopK(x, c.topK, { renormalize: c.renormalize }),
  topKSoftmax: (x, c) => routeTopKSoftmax(x, c.topK),
  sigmoidGroupTopK: (x, c, b) => routeSigmoidGroupTopK(x, c.topK, {
    correctionBias: b, nGroup: c.nGroup, topkGroup: c.topkGroup, renormalize: c.renormalize,
    scalingFactor: c.scalingFactor,
  }),
  softmaxGroupTopK: (x, c) => routeSoftmaxGroupTopK(x, c.topK, {
    nGroup: c.nGroup, topkGroup: c.topkGroup, renormalize: c.renormalize, scalingFactor: c.scalingFactor,
  }),
  softmaxGroupLimitedGreedy: (x, c) => routeSoftmaxGroupLimitedGreedy(x, c.topK, {
    nGroup: c.nGroup, topkGroup: c.topkGroup, scalingFactor: c.scalingFactor,
  }),
  softmaxBiasedTopK: (x, c, b) => routeSoftmaxBiasedTopK(x, c.topK, { correctionBias: b, normMin: c.normMin }),
  topKSigmoid: (x, c) => routeTopKSigmoid(x, c.topK),
};

const IMPLS: Array<[string, (kind: RoutingKind) => Impl]> = [
  ['fused', kind => FUSED[kind]],
  ['referenceRoute', () => referenceRoute],
];

function weightGrad(impl: Impl, x: Tensor2D, cfg: RoutingConfig, G: Tensor, bias?: Tensor1D): Tensor {
  return tf.grad((z: Tensor) => tf.sum(tf.mul(impl(z as Tensor2D, cfg, bias).weights, G)))(x);
}

function describeCfg(cfg: RoutingConfig): string {
  return Object.entries(cfg).filter(([k]) => k !== 'kind').map(([k, v]) => `${k}=${v}`).join(' ');
}

/** Checks both implementations of one case against the float64 reference and each other. */
function checkCase(x64: Float64Array, T: number, E: number, cfg: RoutingConfig, G64: Float64Array,
    bias64?: Float64Array, expectedExperts?: number[]): void {
  const ref = routeRows64(x64, T, cfg, bias64);
  if (expectedExperts) expect(Array.from(ref.experts), 'float64 reference experts').to.deep.equal(expectedExperts);
  const fd = gradFD(x64, T, cfg, G64, bias64);
  const x = tensorOf(x64, [T, E]) as Tensor2D;
  const G = tensorOf(G64, [T, cfg.topK]);
  const bias = bias64 ? tensorOf(bias64, [E]) as Tensor1D : undefined;
  const results: Array<{ weights: Float32Array; grad: Float32Array }> = [];
  for (const [name, pick] of IMPLS) {
    const impl = pick(cfg.kind);
    expectNoLeak(() => {
      const r = impl(x, cfg, bias);
      expect(r.logits, `${name}: logits`).to.equal(x);
      expect(r.weights.dtype).to.equal('float32');
      expect(r.weights.shape).to.deep.equal([T, cfg.topK]);
      expect(r.experts.dtype).to.equal('int32');
      expect(r.experts.shape).to.deep.equal([T, cfg.topK]);
      expect(Array.from(r.experts.dataSync()), `${name}: experts`).to.deep.equal(Array.from(ref.experts));
      expectClose(r.weights, ref.weights, 1e-5, `${name}: weights`);
      const g = weightGrad(impl, x, cfg, G, bias);
      expectClose(g, fd, 1e-4, `${name}: d sum(weights·G)/d logits vs finite differences`);
      results.push({ weights: r.weights.dataSync() as Float32Array, grad: g.dataSync() as Float32Array });
      tf.dispose([r.weights, r.experts, g]);
    }, `${name}: numTensors after forward and backward`);
  }
  expectClose(results[0].weights, results[1].weights, 1e-5, 'fused vs reference: weights');
  // where the true gradient is 0 (K=1 renormalized: w ≡ 1) both carry float32 noise; measure
  // against the cotangent's scale then, which bounds the gradient's
  const gScale = Math.max(...Array.from(G64, Math.abs)) * (cfg.scalingFactor ?? 1);
  const gradErr = maxAbsDiff(results[0].grad, results[1].grad) /
      Math.max(gScale, ...Array.from(results[1].grad, Math.abs));
  expect(gradErr, 'fused vs reference: gradient').to.be.at.most(1e-5);
  tf.dispose([x, G, bias].filter((t): t is Tensor => t != null));
}

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

interface Case { cfg: RoutingConfig; T: number; E: number; bias?: boolean }

const CASES: Case[] = [
  { cfg: { kind: 'softmaxTopK', topK: 3 }, T: 1, E: 5 },
  { cfg: { kind: 'softmaxTopK', topK: 3, renormalize: false }, T: 1, E: 5 },
  { cfg: { kind: 'softmaxTopK', topK: 1 }, T: 7, E: 8 },
  { cfg: { kind: 'softmaxTopK', topK: 6 }, T: 4, E: 6 },
  { cfg: { kind: 'softmaxTopK', topK: 6, renormalize: false }, T: 4, E: 6 },
  { cfg: { kind: 'softmaxTopK', topK: 2 }, T: 600, E: 8 },
  { cfg: { kind: 'softmaxTopK', topK: 1 }, T: 3, E: 1 },
  { cfg: { kind: 'topKSoftmax', topK: 3 }, T: 1, E: 5 },
  { cfg: { kind: 'topKSoftmax', topK: 1 }, T: 7, E: 8 },
  { cfg: { kind: 'topKSoftmax', topK: 6 }, T: 4, E: 6 },
  { cfg: { kind: 'topKSoftmax', topK: 4 }, T: 600, E: 32 },
  { cfg: { kind: 'sigmoidGroupTopK', topK: 3 }, T: 1, E: 5 },
  { cfg: { kind: 'sigmoidGroupTopK', topK: 1, renormalize: false }, T: 3, E: 1, bias: true },
  { cfg: { kind: 'sigmoidGroupTopK', topK: 3, renormalize: false, scalingFactor: 1.5 }, T: 3, E: 5, bias: true },
  { cfg: { kind: 'sigmoidGroupTopK', topK: 4, nGroup: 4, topkGroup: 2, scalingFactor: 2.5 }, T: 9, E: 16, bias: true },
  { cfg: { kind: 'sigmoidGroupTopK', topK: 1, nGroup: 4, topkGroup: 1 }, T: 5, E: 16, bias: true },
  { cfg: { kind: 'sigmoidGroupTopK', topK: 16, nGroup: 4, topkGroup: 4 }, T: 3, E: 16, bias: true },
  { cfg: { kind: 'sigmoidGroupTopK', topK: 3, nGroup: 8, topkGroup: 4 }, T: 6, E: 8, bias: true },
  { cfg: { kind: 'sigmoidGroupTopK', topK: 4, nGroup: 4, topkGroup: 2, scalingFactor: 2.5 }, T: 600, E: 16, bias: true },
  { cfg: { kind: 'softmaxGroupTopK', topK: 3 }, T: 1, E: 5 },
  { cfg: { kind: 'softmaxGroupTopK', topK: 4, nGroup: 4, topkGroup: 2, scalingFactor: 1.5 }, T: 9, E: 16 },
  { cfg: { kind: 'softmaxGroupTopK', topK: 4, nGroup: 4, topkGroup: 2, renormalize: false }, T: 9, E: 16 },
  { cfg: { kind: 'softmaxGroupTopK', topK: 2, nGroup: 8, topkGroup: 3 }, T: 6, E: 8 },
  { cfg: { kind: 'softmaxGroupTopK', topK: 8, nGroup: 2, topkGroup: 2 }, T: 3, E: 8 },
  { cfg: { kind: 'softmaxGroupTopK', topK: 4, nGroup: 4, topkGroup: 2 }, T: 600, E: 16 },
  { cfg: { kind: 'softmaxGroupLimitedGreedy', topK: 3 }, T: 1, E: 5 },
  { cfg: { kind: 'softmaxGroupLimitedGreedy', topK: 4, nGroup: 4, topkGroup: 2, scalingFactor: 16 }, T: 9, E: 16 },
  { cfg: { kind: 'softmaxGroupLimitedGreedy', topK: 8, nGroup: 4, topkGroup: 2 }, T: 5, E: 16 },
  { cfg: { kind: 'softmaxGroupLimitedGreedy', topK: 1, nGroup: 4, topkGroup: 1 }, T: 5, E: 16 },
  { cfg: { kind: 'softmaxGroupLimitedGreedy', topK: 4, nGroup: 4, topkGroup: 2 }, T: 600, E: 16 },
  { cfg: { kind: 'softmaxBiasedTopK', topK: 3 }, T: 1, E: 5 },
  { cfg: { kind: 'softmaxBiasedTopK', topK: 1 }, T: 3, E: 1, bias: true },
  { cfg: { kind: 'softmaxBiasedTopK', topK: 3 }, T: 9, E: 16, bias: true },
  { cfg: { kind: 'softmaxBiasedTopK', topK: 6 }, T: 4, E: 6, bias: true },
  { cfg: { kind: 'softmaxBiasedTopK', topK: 4 }, T: 600, E: 16, bias: true },
  // a floor above the sum of the chosen probabilities: the divisor is the constant normMin
  { cfg: { kind: 'softmaxBiasedTopK', topK: 2, normMin: 1.5 }, T: 5, E: 8, bias: true },
  { cfg: { kind: 'topKSigmoid', topK: 1 }, T: 7, E: 16 },
  { cfg: { kind: 'topKSigmoid', topK: 3 }, T: 4, E: 5 },
  { cfg: { kind: 'topKSigmoid', topK: 1 }, T: 3, E: 1 },
  { cfg: { kind: 'topKSigmoid', topK: 2 }, T: 600, E: 16 },
];

function expectArgError(fn: () => unknown, message: string): void {
  let thrown: unknown;
  expectNoLeak(() => {
    try { fn(); } catch (err) { thrown = err; }
  }, `numTensors after the error '${message}'`);
  expect(thrown, message).to.be.instanceOf(OpArgumentError);
  expect((thrown as Error).message).to.equal(message);
}

describe('routing ops', () => {
  describe('against float64 references and finite differences (fused op and referenceRoute)', () => {
    CASES.forEach(({ cfg, T, E, bias }, i) => {
      it(`${cfg.kind} T=${T} E=${E} ${describeCfg(cfg)}${bias ? ' with correction bias' : ''}`, () => {
        const rng = new Rng(1000 + i);
        // biases of ±0.1 make some biased scores negative, so masked 0.0 experts sometimes compete
        const bias64 = bias ? asF32(rng.array(E, 0.1)) : undefined;
        const x64 = separatedLogits(rng, T, E, cfg, bias64);
        checkCase(x64, T, E, cfg, rng.array(T * cfg.topK), bias64);
      });
    });
  });

  describe("transformers' 0.0 group mask (sigmoidGroupTopK)", () => {
    // E=16 in 4 groups of 4. Target biased scores c = sigmoid(z) + bias per group:
    //   G0 [0.4, -0.1, -0.3, -0.4] (top-2 sum 0.3)    G1 [0.2, -0.05, -0.5, -0.6] (0.15)
    //   G2 [-0.2, -0.2, -0.3, -0.3] (-0.4)             G3 [-0.1, -0.15, -0.6, -0.7] (-0.25)
    // With topkGroup 2, G2 and G3 are masked to 0.0, which beats the kept experts 5 (-0.05) and 1 (-0.1).
    const target = [0.4, -0.1, -0.3, -0.4, 0.2, -0.05, -0.5, -0.6, -0.2, -0.2, -0.3, -0.3, -0.1, -0.15, -0.6, -0.7];
    const rng = new Rng(7);
    const x64 = asF32(rng.array(16, 0.5));
    const bias64 = asF32(target.map((c, e) => c - sigmoid64(x64[e])));

    it('topkGroup 2, K 4: two masked experts (0.0) beat the negative kept ones', () => {
      const cfg: RoutingConfig = { kind: 'sigmoidGroupTopK', topK: 4, nGroup: 4, topkGroup: 2, scalingFactor: 2.5 };
      // 0 and 4 first; then eight masked experts tie at 0.0 and tf.topk takes the lowest ids, 8 and 9
      // (transformers' torch.topk picks some two of them); never 5 or 1, as a -inf mask would.
      checkCase(x64, 1, 16, cfg, rng.array(4), bias64, [0, 4, 8, 9]);
    });

    it('topkGroup 3, K 6: the whole masked group is chosen, no tie involved', () => {
      const cfg: RoutingConfig = { kind: 'sigmoidGroupTopK', topK: 6, nGroup: 4, topkGroup: 3 };
      checkCase(x64, 1, 16, cfg, rng.array(6), bias64, [0, 4, 8, 9, 10, 11]);
    });
  });

  describe('gradient paths', () => {
    const kinds = Object.keys(FUSED) as RoutingKind[];
    const cfgOf = (kind: RoutingKind): RoutingConfig =>
      kind.includes('Group') ? { kind, topK: 2, nGroup: 2, topkGroup: 1 } : { kind, topK: 2 };

    for (const [name, pick] of IMPLS) {
      for (const kind of kinds) {
        it(`${name} ${kind}: no gradient flows through the experts (and none reaches TopK)`, () => {
          const x = tensorOf(new Rng(3).array(24), [4, 6]) as Tensor2D;
          const c = tensorOf(new Rng(4).array(4 * 2 * 6), [4, 2, 6]);
          const d = tensorOf(new Rng(5).array(24), [4, 6]);
          // an aux-loss-like use: one_hot(experts) next to a differentiable term of the logits
          const smooth = (z: Tensor) => tf.sum(tf.mul(tf.softmax(z), d));
          expectNoLeak(() => {
            const g = tf.grad((z: Tensor) => tf.add(smooth(z),
                tf.sum(tf.mul(tf.oneHot(pick(kind)(z as Tensor2D, cfgOf(kind)).experts, 6), c))))(x);
            const expected = tf.grad(smooth)(x);
            expect(Array.from(g.dataSync())).to.deep.equal(Array.from(expected.dataSync()));
            tf.dispose([g, expected]);
          });
          tf.dispose([x, c, d]);
        });
      }

      for (const cfg of [
        { kind: 'sigmoidGroupTopK', topK: 4, nGroup: 4, topkGroup: 2 },
        { kind: 'softmaxBiasedTopK', topK: 4 },
      ] as RoutingConfig[]) it(`${name} ${cfg.kind}: the correction bias gets no gradient`, () => {
        const x = tensorOf(new Rng(5).array(32), [2, 16]) as Tensor2D;
        const bias = tensorOf(new Rng(6).array(16, 0.1), [16]) as Tensor1D;
        const impl = pick(cfg.kind);
        expectNoLeak(() => {
          expect(() => tf.grads((z: Tensor, b: Tensor) => tf.sum(impl(z as Tensor2D, cfg, b as Tensor1D).weights))([x, bias]))
              .to.throw(/Cannot compute gradient of y=f\(x\) with respect to x/);
        });
        tf.dispose([x, bias]);
      });
    }
  });

  it('the Routing takes over the logits: disposing its three tensors frees everything', () => {
    for (const [, pick] of IMPLS) {
      const before = tf.memory().numTensors;
      const x = tensorOf([1, 2, 3, 4, 5, 6], [2, 3]) as Tensor2D;
      const r = pick('softmaxTopK')(x, { kind: 'softmaxTopK', topK: 2 });
      expect(r.logits).to.equal(x);
      tf.dispose([r.weights, r.experts, r.logits]);
      expect(x.isDisposed).to.equal(true);
      expect(tf.memory().numTensors).to.equal(before);
    }
  });

  it('the docs examples give what they say', () => {
    const x = tf.tensor2d([[2, 0, 1, -1]]);
    const correctionBias = tf.tensor1d([0, 0, 0, 1]);
    const biased = routeSoftmaxBiasedTopK(x, 2, { correctionBias });
    expect(Array.from(biased.experts.dataSync())).to.deep.equal([3, 0]);
    const p = softmax64([2, 0, 1, -1]);
    expectClose(biased.weights, [p[3] / (p[3] + p[0]), p[0] / (p[3] + p[0])], 1e-6, 'biased weights');
    expectClose(biased.weights, [0.047, 0.953], 5e-4, 'the example\'s rounded weights');
    tf.dispose([biased.weights, biased.experts, correctionBias]);
    for (const r of [routeSoftmaxTopK(x, 2), routeTopKSoftmax(x, 2)]) {
      expect(Array.from(r.experts.dataSync())).to.deep.equal([0, 2]);
      expectClose(r.weights, [0.7310586, 0.2689414], 1e-6, 'weights');
      tf.dispose([r.weights, r.experts]);
    }
    const llama4 = routeTopKSigmoid(x, 1);
    expect(Array.from(llama4.experts.dataSync())).to.deep.equal([0]);
    expectClose(llama4.weights, [0.8807971], 1e-6, 'topKSigmoid weights');
    tf.dispose([llama4.weights, llama4.experts]);
    x.dispose();
  });

  describe('route() and its registry', () => {
    const x64 = asF32(new Rng(11).array(3 * 16, 1.5));
    const bias64 = asF32(new Rng(12).array(16, 0.1));
    const configs: RoutingConfig[] = [
      { kind: 'softmaxTopK', topK: 2, renormalize: false },
      { kind: 'topKSoftmax', topK: 3 },
      { kind: 'sigmoidGroupTopK', topK: 4, nGroup: 4, topkGroup: 2, scalingFactor: 2.5 },
      { kind: 'softmaxGroupTopK', topK: 4, nGroup: 4, topkGroup: 2, renormalize: false, scalingFactor: 2 },
      { kind: 'softmaxGroupLimitedGreedy', topK: 4, nGroup: 4, topkGroup: 2, scalingFactor: 16 },
      { kind: 'softmaxBiasedTopK', topK: 4, normMin: 1e-9 },
      { kind: 'topKSigmoid', topK: 2 },
    ];
    const withBias: RoutingKind[] = ['sigmoidGroupTopK', 'softmaxBiasedTopK'];

    it('lists the seven built-in kinds', () => {
      expect(registeredRoutingKinds()).to.have.members(configs.map(c => c.kind));
    });

    for (const cfg of configs) {
      it(`route(${cfg.kind}) is the op of that kind`, () => {
        const x = tensorOf(x64, [3, 16]) as Tensor2D;
        const bias = withBias.includes(cfg.kind) ? tensorOf(bias64, [16]) as Tensor1D : undefined;
        expectNoLeak(() => {
          const a = route(x, cfg, bias);
          const b = FUSED[cfg.kind](x, cfg, bias);
          expect(Array.from(a.experts.dataSync())).to.deep.equal(Array.from(b.experts.dataSync()));
          expect(Array.from(a.weights.dataSync())).to.deep.equal(Array.from(b.weights.dataSync()));
          expectClose(a.weights, routeRows64(x64, 3, cfg, bias ? bias64 : undefined).weights, 1e-5, 'weights vs float64');
          tf.dispose([a.weights, a.experts, b.weights, b.experts]);
        });
        tf.dispose(bias ? [x, bias] : [x]);
      });
    }

    it('registerRouting replaces a kind and returns the previous implementation', () => {
      const x = tensorOf(x64, [3, 16]) as Tensor2D;
      let calls = 0;
      const previous = registerRouting('topKSoftmax', (logits, config) => {
        calls++;
        return routeSoftmaxTopK(logits, config.topK);
      });
      try {
        const r = route(x, { kind: 'topKSoftmax', topK: 2 });
        expect(calls).to.equal(1);
        const s = routeSoftmaxTopK(x, 2);
        expect(Array.from(r.weights.dataSync())).to.deep.equal(Array.from(s.weights.dataSync()));
        tf.dispose([r.weights, r.experts, s.weights, s.experts]);
      } finally {
        expect(previous).to.be.a('function');
        registerRouting('topKSoftmax', previous!);
      }
      const r = route(x, { kind: 'topKSoftmax', topK: 2 });
      expect(calls).to.equal(1);
      expectClose(r.weights, routeRows64(x64, 3, { kind: 'topKSoftmax', topK: 2 }).weights, 1e-5, 'restored');
      tf.dispose([r.weights, r.experts, x]);
    });
  });

  describe('argument errors', () => {
    let x: Tensor2D;
    let x8: Tensor2D;
    let bias8: Tensor1D;
    let bias16: Tensor1D;
    let disposed: Tensor2D;
    let bad: Record<'rank3' | 'int' | 'noTokens' | 'noExperts' | 'rank1' | 'bias2d' | 'biasInt', Tensor>;
    before(() => {
      bad = {
        rank3: tf.zeros([1, 2, 3]), int: tf.zeros([2, 3], 'int32'), noTokens: tf.zeros([0, 4]),
        noExperts: tf.zeros([3, 0]), rank1: tf.zeros([4]), bias2d: tf.zeros([1, 16]), biasInt: tf.zeros([16], 'int32'),
      };
      x = tf.tensor2d(Array.from({ length: 32 }, (_, i) => Math.sin(i)), [2, 16]);
      x8 = tf.tensor2d(Array.from({ length: 16 }, (_, i) => Math.cos(i)), [2, 8]);
      bias8 = tf.zeros([8]);
      bias16 = tf.zeros([16]);
      disposed = tf.tensor2d([[1, 2]]);
      disposed.dispose();
    });
    after(() => tf.dispose([x, x8, bias8, bias16, ...Object.values(bad)]));
    const any = (v: unknown) => v as never;

    const ops: Array<[string, (logits: Tensor2D, k: number) => unknown]> = [
      ['routeSoftmaxTopK', (l, k) => routeSoftmaxTopK(l, k)],
      ['routeTopKSoftmax', (l, k) => routeTopKSoftmax(l, k)],
      ['routeSigmoidGroupTopK', (l, k) => routeSigmoidGroupTopK(l, k)],
      ['routeSoftmaxGroupTopK', (l, k) => routeSoftmaxGroupTopK(l, k)],
      ['routeSoftmaxGroupLimitedGreedy', (l, k) => routeSoftmaxGroupLimitedGreedy(l, k)],
    ];
    for (const [op, call] of ops) {
      it(`${op}: logits and k`, () => {
        expectArgError(() => call(any([[1, 2]]), 1),
            `\`${op}()\`: 'logits' must be a 2-D float32 tensor but got an array of length 1`);
        expectArgError(() => call(any(undefined), 1),
            `\`${op}()\`: 'logits' must be a 2-D float32 tensor but got undefined (undefined)`);
        expectArgError(() => call(any(bad.rank3), 1), `\`${op}()\`: 'logits' must be 2-D but got shape [1,2,3]`);
        expectArgError(() => call(any(bad.int), 1),
            `\`${op}()\`: 'logits' must be float32 but got int32 (shape [2,3])`);
        expectArgError(() => call(disposed, 1), `\`${op}()\`: 'logits' was already disposed`);
        expectArgError(() => call(any(bad.noTokens), 1),
            `\`${op}()\`: 'logits' must have at least one token and one expert but got shape [0,4]`);
        expectArgError(() => call(any(bad.noExperts), 1),
            `\`${op}()\`: 'logits' must have at least one token and one expert but got shape [3,0]`);
        expectArgError(() => call(x8, 1.5), `\`${op}()\`: 'k' must be an integer but got 1.5 (number)`);
        expectArgError(() => call(x8, any('2')), `\`${op}()\`: 'k' must be an integer but got '2'`);
        expectArgError(() => call(x8, 0), `\`${op}()\`: 'k' must be >= 1 but got 0`);
        expectArgError(() => call(x8, 9), `\`${op}()\`: 'k' must be <= num experts (8) but got 9`);
      });
    }

    it('options must be an object', () => {
      expectArgError(() => routeSoftmaxTopK(x8, 2, any(null)), "`routeSoftmaxTopK()`: 'options' must be an object but got null");
      expectArgError(() => routeSigmoidGroupTopK(x8, 2, any(true)),
          "`routeSigmoidGroupTopK()`: 'options' must be an object but got true (boolean)");
      expectArgError(() => routeSoftmaxGroupTopK(x8, 2, any([4, 2])),
          "`routeSoftmaxGroupTopK()`: 'options' must be an object but got an array");
      expectArgError(() => routeSoftmaxGroupLimitedGreedy(x8, 2, any(4)),
          "`routeSoftmaxGroupLimitedGreedy()`: 'options' must be an object but got 4 (number)");
    });

    it('renormalize must be a boolean', () => {
      expectArgError(() => routeSoftmaxTopK(x8, 2, { renormalize: any('yes') }),
          "`routeSoftmaxTopK()`: 'renormalize' must be a boolean but got 'yes' (string)");
      expectArgError(() => routeSigmoidGroupTopK(x8, 2, { renormalize: any(1) }),
          "`routeSigmoidGroupTopK()`: 'renormalize' must be a boolean but got 1 (number)");
      expectArgError(() => routeSoftmaxGroupTopK(x8, 2, { renormalize: any(null) }),
          "`routeSoftmaxGroupTopK()`: 'renormalize' must be a boolean but got null (object)");
    });

    const groupOps: Array<[string, (k: number, o: Record<string, unknown>) => unknown]> = [
      ['routeSigmoidGroupTopK', (k, o) => routeSigmoidGroupTopK(x, k, o)],
      ['routeSoftmaxGroupTopK', (k, o) => routeSoftmaxGroupTopK(x, k, o)],
      ['routeSoftmaxGroupLimitedGreedy', (k, o) => routeSoftmaxGroupLimitedGreedy(x, k, o)],
    ];
    for (const [op, call] of groupOps) {
      it(`${op}: groups and scalingFactor`, () => {
        expectArgError(() => call(2, { nGroup: 3 }), `\`${op}()\`: 'nGroup' must divide num experts (16) but got 3`);
        expectArgError(() => call(2, { nGroup: 0 }), `\`${op}()\`: 'nGroup' must be >= 1 but got 0`);
        expectArgError(() => call(2, { nGroup: 2.5 }), `\`${op}()\`: 'nGroup' must be an integer but got 2.5 (number)`);
        expectArgError(() => call(2, { nGroup: 4, topkGroup: 5 }), `\`${op}()\`: 'topkGroup' must be <= nGroup (4) but got 5`);
        expectArgError(() => call(2, { nGroup: 4, topkGroup: 0 }), `\`${op}()\`: 'topkGroup' must be >= 1 but got 0`);
        expectArgError(() => call(2, { nGroup: 4, topkGroup: any('2') }),
            `\`${op}()\`: 'topkGroup' must be an integer but got '2'`);
        expectArgError(() => call(9, { nGroup: 4, topkGroup: 2 }),
            `\`${op}()\`: 'k' must be <= topkGroup·(E/nGroup) = 2·4 = 8 (the experts in the kept groups) but got 9`);
        // topkGroup defaults to 1
        expectArgError(() => call(5, { nGroup: 4 }),
            `\`${op}()\`: 'k' must be <= topkGroup·(E/nGroup) = 1·4 = 4 (the experts in the kept groups) but got 5`);
        expectArgError(() => call(2, { scalingFactor: NaN }), `\`${op}()\`: 'scalingFactor' must be a finite number but got NaN (number)`);
        expectArgError(() => call(2, { scalingFactor: Infinity }),
            `\`${op}()\`: 'scalingFactor' must be a finite number but got Infinity (number)`);
        expectArgError(() => call(2, { scalingFactor: '2' }), `\`${op}()\`: 'scalingFactor' must be a finite number but got '2'`);
      });
    }

    it('routeSoftmaxBiasedTopK: correctionBias and normMin', () => {
      const op = '`routeSoftmaxBiasedTopK()`';
      expectArgError(() => routeSoftmaxBiasedTopK(x, 2, { correctionBias: bias8 }),
          `${op}: 'correctionBias' must have shape [16] but got [8] (logits [T,E] = [2,16])`);
      expectArgError(() => routeSoftmaxBiasedTopK(x, 2, { correctionBias: any(bad.bias2d) }),
          `${op}: 'correctionBias' must be 1-D but got shape [1,16]`);
      expectArgError(() => routeSoftmaxBiasedTopK(x, 2, { normMin: 0 }), `${op}: 'normMin' must be > 0 but got 0`);
      expectArgError(() => routeSoftmaxBiasedTopK(x, 2, { normMin: any('1') }),
          `${op}: 'normMin' must be a finite number but got '1'`);
      expectArgError(() => routeSoftmaxBiasedTopK(x, 17), `${op}: 'k' must be <= num experts (16) but got 17`);
      expectArgError(() => routeSoftmaxBiasedTopK(x, 2, any(null)), `${op}: 'options' must be an object but got null`);
    });

    it('routeSigmoidGroupTopK: correctionBias', () => {
      const op = '`routeSigmoidGroupTopK()`';
      expectArgError(() => routeSigmoidGroupTopK(x, 2, { correctionBias: bias8 }),
          `${op}: 'correctionBias' must have shape [16] but got [8] (logits [T,E] = [2,16])`);
      expectArgError(() => routeSigmoidGroupTopK(x, 2, { correctionBias: any(bad.bias2d) }),
          `${op}: 'correctionBias' must be 1-D but got shape [1,16]`);
      expectArgError(() => routeSigmoidGroupTopK(x, 2, { correctionBias: any(bad.biasInt) }),
          `${op}: 'correctionBias' must be float32 but got int32 (shape [16])`);
      expectArgError(() => routeSigmoidGroupTopK(x, 2, { correctionBias: any([0, 1]) }),
          `${op}: 'correctionBias' must be a 1-D float32 tensor but got an array of length 2`);
    });

    it('route()', () => {
      const kinds = "'softmaxTopK', 'topKSoftmax', 'sigmoidGroupTopK', 'softmaxGroupTopK', 'softmaxGroupLimitedGreedy', " +
          "'softmaxBiasedTopK', 'topKSigmoid'";
      expectArgError(() => route(x, any(null)), "`route()`: 'config' must be a RoutingConfig object but got null");
      expectArgError(() => route(x, any('softmaxTopK')), "`route()`: 'config' must be a RoutingConfig object but got string");
      expectArgError(() => route(x, any({ kind: 'mixtral', topK: 2 })),
          `\`route()\`: 'config.kind' must be one of ${kinds} but got 'mixtral'`);
      expectArgError(() => route(x, any({ topK: 2 })), `\`route()\`: 'config.kind' must be one of ${kinds} but got undefined (undefined)`);
      expectArgError(() => route(x, { kind: 'softmaxTopK', topK: 2, nGroup: 2 }),
          "`route()`: 'config.nGroup' is not used by routing kind 'softmaxTopK' (it uses topK, renormalize) but got 2");
      expectArgError(() => route(x, { kind: 'topKSoftmax', topK: 2, renormalize: true }),
          "`route()`: 'config.renormalize' is not used by routing kind 'topKSoftmax' (it uses topK) but got true");
      expectArgError(() => route(x, { kind: 'softmaxGroupLimitedGreedy', topK: 2, renormalize: false }),
          "`route()`: 'config.renormalize' is not used by routing kind 'softmaxGroupLimitedGreedy' " +
          '(it uses topK, nGroup, topkGroup, scalingFactor) but got false');
      expectArgError(() => route(x, { kind: 'softmaxTopK', topK: 2, scalingFactor: 2 }),
          "`route()`: 'config.scalingFactor' is not used by routing kind 'softmaxTopK' (it uses topK, renormalize) but got 2");
      expectArgError(() => route(x, { kind: 'topKSoftmax', topK: 2, topkGroup: 1 }),
          "`route()`: 'config.topkGroup' is not used by routing kind 'topKSoftmax' (it uses topK) but got 1");
      expectArgError(() => route(x, { kind: 'topKSigmoid', topK: 1, renormalize: true }),
          "`route()`: 'config.renormalize' is not used by routing kind 'topKSigmoid' (it uses topK) but got true");
      expectArgError(() => route(x, { kind: 'softmaxGroupTopK', topK: 2 }, bias16),
          "`route()`: 'correctionBias' is only used by routing kinds 'sigmoidGroupTopK', 'softmaxBiasedTopK' but config.kind is 'softmaxGroupTopK'");
      expectArgError(() => route(x, { kind: 'softmaxBiasedTopK', topK: 2, renormalize: true }),
          "`route()`: 'config.renormalize' is not used by routing kind 'softmaxBiasedTopK' (it uses topK, normMin) but got true");
      expectArgError(() => route(x, { kind: 'softmaxTopK', topK: 2, normMin: 1e-12 }),
          "`route()`: 'config.normMin' is not used by routing kind 'softmaxTopK' (it uses topK, renormalize) but got 1e-12");
      expectArgError(() => route(x, { kind: 'softmaxBiasedTopK', topK: 2, normMin: 0 }),
          "`routeSoftmaxBiasedTopK()`: 'normMin' must be > 0 but got 0");
      // the op checks the numbers and names itself
      expectArgError(() => route(x8, { kind: 'softmaxTopK', topK: 9 }),
          "`routeSoftmaxTopK()`: 'k' must be <= num experts (8) but got 9");
      expectArgError(() => route(x, { kind: 'sigmoidGroupTopK', topK: 2, nGroup: 5 }),
          "`routeSigmoidGroupTopK()`: 'nGroup' must divide num experts (16) but got 5");
      expectArgError(() => route(x, { kind: 'sigmoidGroupTopK', topK: 2 }, bias8),
          "`routeSigmoidGroupTopK()`: 'correctionBias' must have shape [16] but got [8] (logits [T,E] = [2,16])");
    });

    it('registerRouting()', () => {
      expectArgError(() => registerRouting(any(''), FUSED.softmaxTopK),
          "`registerRouting()`: 'kind' must be a non-empty string but got  (string)");
      expectArgError(() => registerRouting(any(3), FUSED.softmaxTopK),
          "`registerRouting()`: 'kind' must be a non-empty string but got 3 (number)");
      expectArgError(() => registerRouting('softmaxTopK', any(null)),
          "`registerRouting()`: 'fn' must be a function but got null (object)");
      expect(registeredRoutingKinds()).to.have.length(7);
    });

    it('referenceRoute()', () => {
      const op = '`referenceRoute()`';
      const kinds = "'softmaxTopK', 'topKSoftmax', 'sigmoidGroupTopK', 'softmaxGroupTopK', 'softmaxGroupLimitedGreedy', " +
          "'softmaxBiasedTopK', 'topKSigmoid'";
      const cases: Array<[() => unknown, string]> = [
        [() => referenceRoute(any([[1]]), { kind: 'softmaxTopK', topK: 1 }),
          `${op}: 'logits' must be a 2-D float32 tensor but got an array of length 1`],
        [() => referenceRoute(any(bad.int), { kind: 'softmaxTopK', topK: 1 }),
          `${op}: 'logits' must be float32 but got int32 (shape [2,3])`],
        [() => referenceRoute(any(bad.rank1), { kind: 'softmaxTopK', topK: 1 }), `${op}: 'logits' must be 2-D but got shape [4]`],
        [() => referenceRoute(disposed, { kind: 'softmaxTopK', topK: 1 }), `${op}: 'logits' was already disposed`],
        [() => referenceRoute(any(bad.noTokens), { kind: 'softmaxTopK', topK: 1 }),
          `${op}: 'logits' must have at least one token and one expert but got shape [0,4]`],
        [() => referenceRoute(x, any(undefined)), `${op}: 'config' must be a RoutingConfig object but got undefined`],
        [() => referenceRoute(x, any({ kind: 'olmoe', topK: 1 })), `${op}: 'config.kind' must be one of ${kinds} but got 'olmoe'`],
        [() => referenceRoute(x, { kind: 'softmaxTopK', topK: 2, nGroup: 2 }),
          `${op}: 'config.nGroup' is not used by routing kind 'softmaxTopK' (it uses topK, renormalize) but got 2`],
        [() => referenceRoute(x, { kind: 'topKSoftmax', topK: 2, scalingFactor: 1 }),
          `${op}: 'config.scalingFactor' is not used by routing kind 'topKSoftmax' (it uses topK) but got 1`],
        [() => referenceRoute(x, { kind: 'softmaxTopK', topK: 0 }), `${op}: 'config.topK' must be >= 1 but got 0`],
        [() => referenceRoute(x, { kind: 'softmaxTopK', topK: 2.5 }), `${op}: 'config.topK' must be an integer but got 2.5 (number)`],
        [() => referenceRoute(x8, { kind: 'softmaxTopK', topK: 9 }), `${op}: 'config.topK' must be <= num experts (8) but got 9`],
        [() => referenceRoute(x, { kind: 'softmaxTopK', topK: 2, renormalize: any('no') }),
          `${op}: 'config.renormalize' must be a boolean but got 'no' (string)`],
        [() => referenceRoute(x, { kind: 'softmaxGroupTopK', topK: 2, nGroup: 3 }),
          `${op}: 'config.nGroup' must divide num experts (16) but got 3`],
        [() => referenceRoute(x, { kind: 'softmaxGroupTopK', topK: 2, nGroup: 0 }), `${op}: 'config.nGroup' must be >= 1 but got 0`],
        [() => referenceRoute(x, { kind: 'softmaxGroupTopK', topK: 2, nGroup: 4, topkGroup: 5 }),
          `${op}: 'config.topkGroup' must be <= nGroup (4) but got 5`],
        [() => referenceRoute(x, { kind: 'softmaxGroupTopK', topK: 2, nGroup: 4, topkGroup: 0 }),
          `${op}: 'config.topkGroup' must be >= 1 but got 0`],
        [() => referenceRoute(x, { kind: 'softmaxGroupLimitedGreedy', topK: 9, nGroup: 4, topkGroup: 2 }),
          `${op}: 'config.topK' must be <= topkGroup·(E/nGroup) = 2·4 = 8 (the experts in the kept groups) but got 9`],
        [() => referenceRoute(x, { kind: 'sigmoidGroupTopK', topK: 2, scalingFactor: NaN }),
          `${op}: 'config.scalingFactor' must be a finite number but got NaN (number)`],
        [() => referenceRoute(x, { kind: 'softmaxTopK', topK: 2 }, bias16),
          `${op}: 'correctionBias' is only used by routing kinds 'sigmoidGroupTopK', 'softmaxBiasedTopK' but config.kind is 'softmaxTopK'`],
        [() => referenceRoute(x, { kind: 'softmaxTopK', topK: 2, normMin: 1 }),
          `${op}: 'config.normMin' is not used by routing kind 'softmaxTopK' (it uses topK, renormalize) but got 1`],
        [() => referenceRoute(x, { kind: 'softmaxBiasedTopK', topK: 2, normMin: -1 }),
          `${op}: 'config.normMin' must be > 0 but got -1`],
        [() => referenceRoute(x, { kind: 'softmaxBiasedTopK', topK: 2, normMin: NaN }),
          `${op}: 'config.normMin' must be a finite number but got NaN (number)`],
        [() => referenceRoute(x, { kind: 'sigmoidGroupTopK', topK: 2 }, bias8),
          `${op}: 'correctionBias' must have shape [16] but got [8] (logits [T,E] = [2,16])`],
        [() => referenceRoute(x, { kind: 'sigmoidGroupTopK', topK: 2 }, any(bad.biasInt)),
          `${op}: 'correctionBias' must be float32 but got int32 (shape [16])`],
      ];
      for (const [fn, message] of cases) expectArgError(fn, message);
    });
  });

  describe('on the transformers fixtures (router of the golden block)', () => {
    const archs = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'deepseek_v3'];
    for (const arch of archs) {
      it(`${arch}: routing of block.x matches the float64 formula with the checkpoint's config`, async () => {
        const dir = new URL(`../fixtures/hf/${arch}/`, import.meta.url);
        const config = JSON.parse(readFileSync(new URL('config.json', dir), 'utf8'));
        const block: string = JSON.parse(readFileSync(new URL('golden.json', dir), 'utf8')).block;
        const golden = await readSafetensorsFile(new URL('golden.safetensors', dir).pathname);
        const model = await readSafetensorsFile(new URL('model.safetensors', dir).pathname);
        // 'model.layers.N.mlp' in golden.json; Mixtral's checkpoint calls the block 'block_sparse_moe'
        const layer = block.split('.').slice(0, 3).join('.');
        const gateName = model.names().find(n => n.startsWith(`${layer}.`) && /\.(mlp|block_sparse_moe)\.gate\.weight$/.test(n))!;
        const biasName = gateName.replace(/weight$/, 'e_score_correction_bias');
        const cfg: RoutingConfig = arch === 'deepseek_v3'
          ? { kind: 'sigmoidGroupTopK', topK: config.num_experts_per_tok, nGroup: config.n_group,
            topkGroup: config.topk_group, renormalize: config.norm_topk_prob, scalingFactor: config.routed_scaling_factor }
          : { kind: 'softmaxTopK', topK: config.num_experts_per_tok, renormalize: config.norm_topk_prob ?? true };
        const xs = await golden.tensor('block.x');
        const w = await model.tensor(gateName);
        const bias = model.has(biasName) ? await model.tensor(biasName) as Tensor1D : undefined;
        expect(bias !== undefined, 'e_score_correction_bias present').to.equal(arch === 'deepseek_v3');
        const H = w.shape[1]!;
        const logits = tf.tidy(() => tf.matMul(tf.reshape(xs, [-1, H]), w, false, true)) as Tensor2D;  // [T, E]
        const [T, E] = logits.shape;
        const x64 = Float64Array.from(logits.dataSync());
        const bias64 = bias ? Float64Array.from(bias.dataSync()) : undefined;
        const ref = routeRows64(x64, T, cfg, bias64);
        // every decision gap is far above float32 rounding of the scores (~1e-7) and the effect of
        // the finite-difference step (~1e-6), so transformers' float32 decisions are these too
        expect(ref.margin, 'smallest decision gap').to.be.greaterThan(1e-5);
        checkCase(x64, T, E, cfg, new Rng(21).array(T * cfg.topK), bias64);
        tf.dispose([xs, w, logits, bias].filter((t): t is Tensor => t != null));
      });
    }
  });
});
