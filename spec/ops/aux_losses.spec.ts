import * as tf from '@tensorflow/tfjs-core';
import type { Tensor, Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { loadBalancingLoss, routerZLoss } from '../../src/ops/aux_losses.js';
import { referenceRoute } from '../../src/ops/reference/routing.js';
import { route } from '../../src/ops/routing/index.js';
import type { RoutingConfig } from '../../src/ops/types.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { Rng, asF32, expectClose, expectNoLeak, finiteDifferences, tensorOf } from '../helpers/numeric.js';

// ---- float64 references -------------------------------------------------------------------------

function softmaxRow(x: Float64Array, t: number, E: number): number[] {
  const row = Array.from(x.subarray(t * E, (t + 1) * E));
  const m = Math.max(...row);
  const e = row.map(v => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map(v => v / s);
}

/** transformers' load_balancing_loss_func (no attention mask) with the experts given. */
function loadBalancing64(x: Float64Array, T: number, E: number, experts: Int32Array, K: number): number {
  const tokensPerExpert = new Float64Array(K * E);             // [K, E]
  for (let t = 0; t < T; t++) {
    for (let k = 0; k < K; k++) tokensPerExpert[k * E + experts[t * K + k]] += 1 / T;
  }
  const routerProb = new Float64Array(E);                      // [E]
  for (let t = 0; t < T; t++) softmaxRow(x, t, E).forEach((p, e) => { routerProb[e] += p / T; });
  let sum = 0;
  for (let k = 0; k < K; k++) for (let e = 0; e < E; e++) sum += tokensPerExpert[k * E + e] * routerProb[e];
  return E * sum;
}

function zLoss64(x: Float64Array, T: number, E: number): number {
  let sum = 0;
  for (let t = 0; t < T; t++) {
    const row = Array.from(x.subarray(t * E, (t + 1) * E));
    const m = Math.max(...row);
    const lse = m + Math.log(row.reduce((a, v) => a + Math.exp(v - m), 0));
    sum += lse * lse;
  }
  return sum / T;
}

/** K distinct random experts per token. */
function randomExperts(rng: Rng, T: number, E: number, K: number): Int32Array {
  const out = new Int32Array(T * K);
  for (let t = 0; t < T; t++) {
    const ids = Array.from({ length: E }, (_, i) => i);
    for (let k = 0; k < K; k++) {
      const j = k + rng.int(E - k);
      [ids[k], ids[j]] = [ids[j], ids[k]];
      out[t * K + k] = ids[k];
    }
  }
  return out;
}

/** Central differences at the indices `at` only (all of them when undefined), eps 1e-6. */
function sampledFD(f: (x: Float64Array) => number, x: Float64Array, at?: number[]): Float64Array {
  if (at === undefined) return finiteDifferences(f, x);
  const xp = Float64Array.from(x);
  return Float64Array.from(at, i => {
    const v = xp[i];
    xp[i] = v + 1e-6; const fp = f(xp);
    xp[i] = v - 1e-6; const fm = f(xp);
    xp[i] = v;
    return (fp - fm) / 2e-6;
  });
}

function pickAt(t: Tensor, at?: number[]): ArrayLike<number> {
  const data = t.dataSync();
  return at === undefined ? data : at.map(i => data[i]);
}

function expectArgError(fn: () => unknown, message: string): void {
  let thrown: unknown;
  expectNoLeak(() => {
    try { fn(); } catch (err) { thrown = err; }
  });
  expect(thrown, message).to.be.instanceOf(OpArgumentError);
  expect((thrown as Error).message).to.equal(message);
}

describe('aux losses', () => {
  // (K = E makes the load-balancing loss the constant E: see 'known values')
  const shapes: Array<[number, number, number]> = [[1, 5, 3], [7, 8, 2], [4, 2, 1], [5, 6, 5], [600, 8, 2]];

  for (const [T, E, K] of shapes) {
    it(`loadBalancingLoss and routerZLoss T=${T} E=${E} K=${K}: values and gradients vs float64`, () => {
      const rng = new Rng(100 + T + E + K);
      const x64 = asF32(rng.array(T * E, 2));
      const experts64 = randomExperts(rng, T, E, K);
      const x = tensorOf(x64, [T, E]) as Tensor2D;
      const experts = tf.tensor2d(experts64, [T, K], 'int32');
      // each loss evaluation costs O(T·E), so with T=600 only 48 sampled logits get differenced
      const at = T * E <= 200 ? undefined : Array.from({ length: 48 }, () => rng.int(T * E));
      const lbGrad = sampledFD(v => loadBalancing64(v, T, E, experts64, K), x64, at);
      const zGrad = sampledFD(v => zLoss64(v, T, E), x64, at);
      expectNoLeak(() => {
        const lb = loadBalancingLoss(x, experts);
        expect(lb.shape).to.deep.equal([]);
        expectClose(lb, [loadBalancing64(x64, T, E, experts64, K)], 1e-5, 'load balancing loss');
        const z = routerZLoss(x);
        expect(z.shape).to.deep.equal([]);
        expectClose(z, [zLoss64(x64, T, E)], 1e-5, 'z-loss');
        const gLb = tf.grad((v: Tensor) => loadBalancingLoss(v as Tensor2D, experts))(x);
        expectClose(pickAt(gLb, at), lbGrad, 1e-4, 'd loadBalancingLoss / d logits');
        const gZ = tf.grad((v: Tensor) => routerZLoss(v as Tensor2D))(x);
        expectClose(pickAt(gZ, at), zGrad, 1e-4, 'd routerZLoss / d logits');
        tf.dispose([lb, z, gLb, gZ]);
      });
      tf.dispose([x, experts]);
    });
  }

  it('known values: K when balanced with uniform probabilities, (ln E)² for zero logits, E when K = E', () => {
    const x = tf.zeros([4, 4]) as Tensor2D;
    const experts = tf.tensor2d([[0, 1], [1, 2], [2, 3], [3, 0]], [4, 2], 'int32');
    const y = tensorOf(new Rng(8).array(12, 2), [3, 4]) as Tensor2D;
    const all = tf.tensor2d([[3, 1, 0, 2], [0, 1, 2, 3], [2, 3, 1, 0]], [3, 4], 'int32');
    expectNoLeak(() => {
      const lb = loadBalancingLoss(x, experts);
      const z = routerZLoss(x);
      expectClose(lb, [2], 1e-6, 'balanced');
      expectClose(z, [Math.log(4) ** 2], 1e-6, 'z of zeros');
      // every expert chosen once per token: f sums to 1 over k, so the loss is E·ΣP = E, flat in the logits
      const lbAll = loadBalancingLoss(y, all);
      expectClose(lbAll, [4], 1e-6, 'K = E');
      const g = tf.grad((v: Tensor) => loadBalancingLoss(v as Tensor2D, all))(y);
      expect(Math.max(...Array.from(g.dataSync(), Math.abs)), 'K = E gradient').to.be.below(1e-6);
      tf.dispose([lb, z, lbAll, g]);
    });
    tf.dispose([x, experts, y, all]);
  });

  const routed: Array<[string, RoutingConfig, boolean]> = [
    ['softmaxTopK', { kind: 'softmaxTopK', topK: 2 }, false],
    ['sigmoidGroupTopK', { kind: 'sigmoidGroupTopK', topK: 4, nGroup: 4, topkGroup: 2, scalingFactor: 2.5 }, true],
  ];
  for (const [name, cfg, withBias] of routed) {
    for (const [implName, impl] of [['route', route], ['referenceRoute', referenceRoute]] as const) {
      it(`through ${implName} (${name}): the losses on routing.experts backpropagate into the logits`, () => {
        const T = 6;
        const E = 16;
        const rng = new Rng(9);
        const x64 = asF32(rng.array(T * E, 2));
        const x = tensorOf(x64, [T, E]) as Tensor2D;
        const bias = withBias ? tensorOf(rng.array(E, 0.1), [E]) as Tensor1D : undefined;
        expectNoLeak(() => {
          const r = impl(x, cfg, bias);
          const experts64 = Int32Array.from(r.experts.dataSync());
          tf.dispose([r.weights, r.experts]);
          const fd = finiteDifferences(
              v => loadBalancing64(v, T, E, experts64, cfg.topK) + 0.1 * zLoss64(v, T, E), x64);
          const g = tf.grad((v: Tensor) => {
            const routing = impl(v as Tensor2D, cfg, bias);
            return tf.add(loadBalancingLoss(routing.logits, routing.experts), tf.mul(routerZLoss(routing.logits), 0.1));
          })(x);
          expectClose(g, fd, 1e-4, 'd (lb + 0.1·z) / d logits');
          g.dispose();
        });
        tf.dispose(bias ? [x, bias] : [x]);
      });
    }
  }

  describe('argument errors', () => {
    let x: Tensor2D;
    let bad: Record<'rank3' | 'int' | 'noTokens' | 'oneExpert' | 'expertsF32' | 'experts1d' | 'expertsRows' | 'experts', Tensor>;
    before(() => {
      x = tf.zeros([5, 8]);
      bad = {
        rank3: tf.zeros([1, 2, 3]), int: tf.zeros([5, 8], 'int32'), noTokens: tf.zeros([0, 8]), oneExpert: tf.zeros([5, 1]),
        expertsF32: tf.zeros([5, 2]), experts1d: tf.zeros([5], 'int32'), expertsRows: tf.zeros([4, 2], 'int32'),
        experts: tf.zeros([5, 2], 'int32'),
      };
    });
    after(() => tf.dispose([x, ...Object.values(bad)]));
    const any = (v: unknown) => v as never;

    it('loadBalancingLoss', () => {
      const op = '`loadBalancingLoss()`';
      expectArgError(() => loadBalancingLoss(any([[1]]), any(bad.experts)),
          `${op}: 'logits' must be a 2-D float32 tensor but got an array of length 1`);
      expectArgError(() => loadBalancingLoss(any(bad.rank3), any(bad.experts)), `${op}: 'logits' must be 2-D but got shape [1,2,3]`);
      expectArgError(() => loadBalancingLoss(any(bad.int), any(bad.experts)),
          `${op}: 'logits' must be float32 but got int32 (shape [5,8])`);
      expectArgError(() => loadBalancingLoss(any(bad.noTokens), any(bad.experts)),
          `${op}: 'logits' must have at least one token and one expert but got shape [0,8]`);
      expectArgError(() => loadBalancingLoss(any(bad.oneExpert), any(bad.experts)),
          `${op}: 'logits' must have at least 2 experts but got shape [5,1]`);
      expectArgError(() => loadBalancingLoss(x, any(undefined)),
          `${op}: 'experts' must be a 2-D int32 tensor but got undefined (undefined)`);
      expectArgError(() => loadBalancingLoss(x, any(bad.expertsF32)),
          `${op}: 'experts' must be int32 but got float32 (shape [5,2])`);
      expectArgError(() => loadBalancingLoss(x, any(bad.experts1d)), `${op}: 'experts' must be 2-D but got shape [5]`);
      expectArgError(() => loadBalancingLoss(x, any(bad.expertsRows)),
          `${op}: 'experts' must have shape [5,*] but got [4,2] (logits [T,E] = [5,8])`);
    });

    it('routerZLoss', () => {
      const op = '`routerZLoss()`';
      expectArgError(() => routerZLoss(any(null)), `${op}: 'logits' must be a 2-D float32 tensor but got null`);
      expectArgError(() => routerZLoss(any(bad.rank3)), `${op}: 'logits' must be 2-D but got shape [1,2,3]`);
      expectArgError(() => routerZLoss(any(bad.int)), `${op}: 'logits' must be float32 but got int32 (shape [5,8])`);
      expectArgError(() => routerZLoss(any(bad.noTokens)),
          `${op}: 'logits' must have at least one token and one expert but got shape [0,8]`);
    });
  });
});
