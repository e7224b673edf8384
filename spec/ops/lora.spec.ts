import * as tf from '@tensorflow/tfjs-core';
import type { Tensor, Tensor1D, Tensor2D, Tensor3D } from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { expertLoRADelta, materializeExpertLoRA, routerLogits } from '../../src/ops/lora/index.js';
import { loraDropoutMask } from '../../src/ops/lora/dropout.js';
import type { LoRAFactors } from '../../src/ops/types.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { asF32, expectClose, expectNoLeak, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

// ---------------------------------------------------------------------------------------------
// float64 references, written from PEFT's definition with explicit index math:
//   A [r·E, in]: A_e[j, i] = A[(e·r + j)·in + i]          (expert-major rows)
//   B [out, r·E]: B_e[o, j] = B[o·(r·E) + j·E + e]        (rank-major columns)
//   W_eff[e] = W[e] + s·B_e·A_e
// ---------------------------------------------------------------------------------------------

interface RefAdapter { A: Float64Array; B: Float64Array; r: number; s: number }
type Layout = 'outIn' | 'inOut';

/** Flat index of (e, o, i) in a W of the given layout. */
function wIndex(layout: Layout, E: number, out: number, inn: number, e: number, o: number, i: number) {
  return layout === 'outIn' ? (e * out + o) * inn + i : (e * inn + i) * out + o;
}

function refWeff(W: Float64Array, adapters: RefAdapter[], E: number, out: number, inn: number,
                 layout: Layout = 'outIn'): Float64Array {
  const res = Float64Array.from(W);
  for (const { A, B, r, s } of adapters) {
    for (let e = 0; e < E; e++) {
      for (let o = 0; o < out; o++) {
        for (let i = 0; i < inn; i++) {
          let acc = 0;
          for (let j = 0; j < r; j++) acc += B[o * (r * E) + j * E + e] * A[(e * r + j) * inn + i];
          res[wIndex(layout, E, out, inn, e, o, i)] += s * acc;
        }
      }
    }
  }
  return res;
}

function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let acc = 0;
  for (let i = 0; i < a.length; i++) acc += a[i] * b[i];
  return acc;
}

/** Random float32-representable data: the float64 array and a tensor of exactly those values. */
function randomPair(rng: Rng, shape: number[], scale = 1): [Float64Array, Tensor] {
  const data = asF32(rng.array(shape.reduce((p, d) => p * d, 1), scale));
  return [data, tensorOf(data, shape)];
}

function makeAdapter(rng: Rng, E: number, out: number, inn: number, r: number, s: number) {
  const [A, At] = randomPair(rng, [r * E, inn]);
  const [B, Bt] = randomPair(rng, [out, r * E]);
  return { ref: { A, B, r, s } as RefAdapter, factors: { A: At, B: Bt, scaling: s } as LoRAFactors };
}

function disposeFactors(list: LoRAFactors[]) { for (const f of list) tf.dispose([f.A, f.B]); }

/** Checks value and every factor's gradient of sum(W_eff·G) against the float64 reference. */
function checkMaterialize(E: number, out: number, inn: number, specs: Array<[number, number]>,
                          layout: Layout, seed: number) {
  const rng = new Rng(seed);
  const wShape = layout === 'outIn' ? [E, out, inn] : [E, inn, out];
  const [W, Wt] = randomPair(rng, wShape);
  const [G, Gt] = randomPair(rng, wShape);
  const made = specs.map(([r, s]) => makeAdapter(rng, E, out, inn, r, s));
  const refs = made.map(m => m.ref);
  const factors = made.map(m => m.factors);
  expectNoLeak(() => {
    const inputs = factors.flatMap(f => [f.A, f.B]);
    const { value, grads } = tf.tidy(() => tf.valueAndGrads((...xs: Tensor[]) => {
      const current = factors.map((f, k) => ({ A: xs[2 * k] as Tensor2D, B: xs[2 * k + 1] as Tensor2D,
                                             scaling: f.scaling }));
      return tf.sum(tf.mul(materializeExpertLoRA(Wt as Tensor3D, current, { layout }), Gt));
    })(inputs));
    const weff = tf.tidy(() => materializeExpertLoRA(Wt as Tensor3D, factors, { layout }));
    expect(weff.shape).to.deep.equal(wShape);
    expectClose(weff, refWeff(W, refs, E, out, inn, layout), 1e-6, 'W_eff');
    const loss = (list: RefAdapter[]) => dot(refWeff(W, list, E, out, inn, layout), G);
    expectClose(value, [loss(refs)], 1e-5, 'sum(W_eff·G)');
    refs.forEach((ref, k) => {
      const withA = (A: Float64Array) => loss(refs.map((x, q) => (q === k ? { ...x, A } : x)));
      const withB = (B: Float64Array) => loss(refs.map((x, q) => (q === k ? { ...x, B } : x)));
      expect(grads[2 * k].shape).to.deep.equal(factors[k].A.shape);
      expect(grads[2 * k + 1].shape).to.deep.equal(factors[k].B.shape);
      expectClose(grads[2 * k], finiteDifferences(withA, ref.A), 1e-4, `dA[${k}]`);
      expectClose(grads[2 * k + 1], finiteDifferences(withB, ref.B), 1e-4, `dB[${k}]`);
    });
    tf.dispose([value, weff, ...grads]);
  });
  tf.dispose([Wt, Gt]);
  disposeFactors(factors);
}

describe('ops/lora', () => {
  describe('materializeExpertLoRA', () => {
    it('follows PEFT\'s index layout on a hand-computed case (E=2, r=2, out=1, in=1)', () => {
      // A rows: (e0 j0), (e0 j1), (e1 j0), (e1 j1); B columns: (j0 e0), (j0 e1), (j1 e0), (j1 e1)
      expectNoLeak(() => tf.tidy(() => {
        const W = tf.tensor3d([[[100]], [[200]]]);
        const A = tf.tensor2d([[1], [2], [3], [4]]);
        const B = tf.tensor2d([[10, 20, 30, 40]]);
        const weff = materializeExpertLoRA(W, A, B, 0.5);
        // e0: 100 + 0.5·(10·1 + 30·2) = 135; e1: 200 + 0.5·(20·3 + 40·4) = 310
        expect(Array.from(weff.dataSync())).to.deep.equal([135, 310]);
        expect(Array.from(expertLoRADelta(A, B, 0.5, 2).dataSync())).to.deep.equal([35, 110]);
      }));
    });

    it('equals W[e] + s·B_e·A_e per expert and its A/B gradients match finite differences ' +
       '(E=5, r=3, out=7, in=11)', () => {
      checkMaterialize(5, 7, 11, [[3, 0.75]], 'outIn', 1);
    });

    it('handles a single expert and rank 1 (E=1, r=1, out=4, in=3)', () => {
      checkMaterialize(1, 4, 3, [[1, 2]], 'outIn', 2);
    });

    it('layout \'inOut\': W [E, in, out] gets (s·B_e·A_e)ᵀ, gradients in PEFT\'s layout', () => {
      checkMaterialize(5, 7, 11, [[3, 1.5]], 'inOut', 3);
    });

    it('two adapters: the deltas add up and each gets its own gradient (both layouts)', () => {
      checkMaterialize(5, 7, 11, [[3, 0.75], [2, -1.25]], 'outIn', 4);
      checkMaterialize(3, 6, 5, [[2, 2], [1, 0.5]], 'inOut', 5);
    });

    it('the (W, A, B, scaling) form equals the one-adapter list form', () => {
      const rng = new Rng(6);
      const [, W] = randomPair(rng, [4, 6, 5]);
      const { factors } = makeAdapter(rng, 4, 6, 5, 2, 1.5);
      expectNoLeak(() => tf.tidy(() => {
        const single = materializeExpertLoRA(W as Tensor3D, factors.A, factors.B, factors.scaling);
        const list = materializeExpertLoRA(W as Tensor3D, [factors]);
        expect(Array.from(single.dataSync())).to.deep.equal(Array.from(list.dataSync()));
        const inOut = materializeExpertLoRA(tf.transpose(W, [0, 2, 1]) as Tensor3D, factors.A,
                                            factors.B, factors.scaling, { layout: 'inOut' });
        expectClose(tf.transpose(inOut, [0, 2, 1]), single, 1e-6, 'inOut vs outIn');
      }));
      tf.dispose(W);
      disposeFactors([factors]);
    });

    it('B = 0 gives W_eff bit-exactly equal to W (and dA = 0)', () => {
      const rng = new Rng(7);
      const [, W] = randomPair(rng, [5, 7, 11]);
      const [, A] = randomPair(rng, [15, 11]);
      const B = tf.zeros([7, 15]) as Tensor2D;
      const [, G] = randomPair(rng, [5, 7, 11]);
      expectNoLeak(() => tf.tidy(() => {
        const weff = materializeExpertLoRA(W as Tensor3D, A as Tensor2D, B, 2);
        expect(weff.dataSync()).to.deep.equal(W.dataSync());
        const [dA, dB] = tf.grads((a: Tensor, b: Tensor) =>
            materializeExpertLoRA(W as Tensor3D, a as Tensor2D, b as Tensor2D, 2))([A, B], G);
        expect(Array.from(dA.dataSync()).every(v => v === 0)).to.equal(true);
        expect(tf.max(tf.abs(dB)).dataSync()[0]).to.be.greaterThan(0);
      }));
      tf.dispose([W, A, B, G]);
    });

    it('an empty adapter list (disabled adapters) returns a clone of W', () => {
      const rng = new Rng(8);
      const [, W] = randomPair(rng, [3, 4, 5]);
      expectNoLeak(() => {
        const weff = materializeExpertLoRA(W as Tensor3D, []);
        expect(weff).to.not.equal(W);
        expect(weff.dataSync()).to.deep.equal(W.dataSync());
        weff.dispose();
        expect(W.isDisposed).to.equal(false);
      });
      W.dispose();
    });

    it('W gets no gradient: it is not an input of the custom gradient', () => {
      const rng = new Rng(9);
      const [, W] = randomPair(rng, [3, 4, 5]);
      const { factors } = makeAdapter(rng, 3, 4, 5, 2, 2);
      const [, G] = randomPair(rng, [3, 4, 5]);
      expectNoLeak(() => {
        // Differentiating w.r.t. (A, B) alone works ...
        const grads = tf.grads((a: Tensor, b: Tensor) =>
            materializeExpertLoRA(W as Tensor3D, a as Tensor2D, b as Tensor2D, 2))([factors.A, factors.B], G);
        expect(grads.map(g => g.shape)).to.deep.equal([[6, 5], [4, 6]]);
        tf.dispose(grads);
        // ... while W, even when passed through the differentiated function, has no path to W_eff.
        expect(() => tf.grads((w: Tensor, a: Tensor, b: Tensor) =>
            materializeExpertLoRA(w as Tensor3D, a as Tensor2D, b as Tensor2D, 2))([W, factors.A, factors.B], G))
            .to.throw(/Cannot compute gradient of y=f\(x\) with respect to x/);
      });
      tf.dispose([W, G]);
      disposeFactors([factors]);
    });

    it('the backward allocates only factor-sized tensors: nothing of W\'s size', async () => {
      const E = 4, out = 48, inn = 40, r = 2;
      const rng = new Rng(10);
      const [, W] = randomPair(rng, [E, out, inn]);
      const [, G] = randomPair(rng, [E, out, inn]);
      const { factors } = makeAdapter(rng, E, out, inn, r, 2);
      const wSize = E * out * inn;
      const wBytes = 4 * wSize;
      const factorSize = E * r * Math.max(out, inn);  // the largest per-adapter gradient or temporary
      const f = (a: Tensor, b: Tensor) => materializeExpertLoRA(W as Tensor3D, a as Tensor2D, b as Tensor2D, 2);

      // tf.profile returns one shared record object: read what is needed before the next call.
      const forwardKernels = (await tf.profile(() => { tf.tidy(() => f(factors.A, factors.B)); })).kernels.length;
      const start = tf.memory();
      const both = await tf.profile(() => tf.grads(f)([factors.A, factors.B], G));
      const [dA, dB] = both.result as Tensor[];
      expect(dA.shape).to.deep.equal([E * r, inn]);
      expect(dB.shape).to.deep.equal([out, E * r]);
      // What survives is exactly dA and dB.
      expect(both.newTensors).to.equal(2);
      expect(both.newBytes).to.equal(4 * (dA.size + dB.size));
      // Forward: one W-sized delta and W_eff at once; nothing else of that size, ever.
      expect(both.peakBytes - start.numBytes).to.be.at.most(2 * wBytes + 16 * 4 * factorSize);
      // The forward's kernels come first in the record; everything after is the backward.
      const backward = both.kernels.slice(forwardKernels);
      expect(backward.length).to.be.greaterThan(0);
      for (const k of backward) {
        for (const shape of k.outputShapes) {
          const size = (shape as number[]).reduce((p, d) => p * d, 1);
          expect(size, `${k.name} output [${shape}]`).to.be.at.most(factorSize);
        }
      }
      // While the backward runs only W_eff (kept for the tape) and small tensors are alive.
      const backwardPeak = Math.max(...backward.map(k => k.totalBytesSnapshot));
      expect(backwardPeak - start.numBytes).to.be.at.most(wBytes + 16 * 4 * factorSize);
      tf.dispose([dA, dB]);
      expect(tf.memory().numTensors).to.equal(start.numTensors);
      tf.dispose([W, G]);
      disposeFactors([factors]);
    });

    describe('validation', () => {
      const E = 5, out = 7, inn = 11, r = 3;
      let W: Tensor3D, A: Tensor2D, B: Tensor2D;
      beforeEach(() => {
        W = tf.zeros([E, out, inn]) as Tensor3D;
        A = tf.zeros([r * E, inn]) as Tensor2D;
        B = tf.zeros([out, r * E]) as Tensor2D;
      });
      afterEach(() => tf.dispose([W, A, B]));
      const op = '`materializeExpertLoRA()`: ';
      const throws = (fn: () => unknown, message: string) => expectNoLeak(() => {
        tf.tidy(() => { expect(fn).to.throw(OpArgumentError, op + message); });
      });

      it('W: rank and dtype', () => {
        throws(() => materializeExpertLoRA(tf.zeros([7, 11]) as never, A, B, 1),
               '\'W\' must be 3-D but got shape [7,11]');
        throws(() => materializeExpertLoRA(tf.zeros([E, out, inn], 'int32') as Tensor3D, A, B, 1),
               '\'W\' must be float32 but got int32 (shape [5,7,11])');
      });

      it('A: not a tensor, rank, dtype, rows not divisible by E, columns != in', () => {
        throws(() => materializeExpertLoRA(W, undefined as never, B, 1),
               '\'A\' must be a 2-D float32 tensor but got undefined (undefined)');
        throws(() => materializeExpertLoRA(W, tf.zeros([r, E, inn]) as never, B, 1),
               '\'A\' must be 2-D but got shape [3,5,11]');
        throws(() => materializeExpertLoRA(W, tf.zeros([r * E, inn], 'int32') as Tensor2D, B, 1),
               '\'A\' must be float32 but got int32 (shape [15,11])');
        throws(() => materializeExpertLoRA(W, tf.zeros([14, inn]) as Tensor2D, B, 1),
               '\'A\' must have r·E rows (expert-major, r >= 1) with E = 5 experts but got 14 rows, ' +
               'shape [14,11] (W is [5,7,11], layout \'outIn\': E = 5, out = 7, in = 11)');
        throws(() => materializeExpertLoRA(W, tf.zeros([0, inn]) as Tensor2D, B, 1),
               '\'A\' must have r·E rows (expert-major, r >= 1) with E = 5 experts but got 0 rows');
        throws(() => materializeExpertLoRA(W, tf.zeros([r * E, out]) as Tensor2D, B, 1),
               '\'A\' must have shape [15,11] but got [15,7]');
      });

      it('B: dtype and shape [out, r·E]', () => {
        throws(() => materializeExpertLoRA(W, A, tf.zeros([out, r * E], 'int32') as Tensor2D, 1),
               '\'B\' must be float32 but got int32 (shape [7,15])');
        throws(() => materializeExpertLoRA(W, A, tf.zeros([r * E, out]) as Tensor2D, 1),
               '\'B\' must have shape [7,15] but got [15,7] ([out, r·E] with r = 3 from \'A\' [15,11] and E = 5');
        throws(() => materializeExpertLoRA(W, A, tf.zeros([out, 2 * E]) as Tensor2D, 1),
               '\'B\' must have shape [7,15] but got [7,10]');
        throws(() => materializeExpertLoRA(W, A, tf.zeros([out]) as never, 1),
               '\'B\' must be 2-D but got shape [7]');
      });

      it('scaling must be finite', () => {
        throws(() => materializeExpertLoRA(W, A, B, NaN), '\'scaling\' must be a finite number but got NaN (number)');
        throws(() => materializeExpertLoRA(W, A, B, Infinity),
               '\'scaling\' must be a finite number but got Infinity (number)');
        throws(() => materializeExpertLoRA(W, A, B, '2' as never),
               '\'scaling\' must be a finite number but got \'2\'');
      });

      it('adapter lists name the adapter; options.layout is checked', () => {
        const good = { A, B, scaling: 1 };
        throws(() => materializeExpertLoRA(W, [good, { A: tf.zeros([16, inn]) as Tensor2D, B, scaling: 1 }]),
               '\'adapters[1].A\' must have r·E rows (expert-major, r >= 1) with E = 5 experts but got 16 rows');
        throws(() => materializeExpertLoRA(W, [{ ...good, scaling: -Infinity }]),
               '\'adapters[0].scaling\' must be a finite number but got -Infinity (number)');
        throws(() => materializeExpertLoRA(W, [good, null as never]),
               '\'adapters[1]\' must be a LoRAFactors object {A, B, scaling} but got null');
        throws(() => materializeExpertLoRA(W, [good], { layout: 'inOutInterleaved' as never }),
               '\'options.layout\' must be one of \'outIn\', \'inOut\' but got \'inOutInterleaved\'');
        // 'inOut' reads W as [E, in, out] = [5, 7, 11]: in = 7, out = 11.
        throws(() => materializeExpertLoRA(W, A, B, 1, { layout: 'inOut' }),
               '\'A\' must have shape [15,7] but got [15,11]');
      });

      it('a disposed factor is reported, not used', () => {
        const gone = tf.zeros([r * E, inn]) as Tensor2D;
        gone.dispose();
        throws(() => materializeExpertLoRA(W, gone, B, 1), '\'A\' was already disposed');
      });
    });
  });

  describe('expertLoRADelta', () => {
    it('equals s·B_e·A_e per expert in both layouts', () => {
      const E = 5, out = 7, inn = 11, r = 3, s = 0.75;
      const rng = new Rng(11);
      const { ref, factors } = makeAdapter(rng, E, out, inn, r, s);
      expectNoLeak(() => tf.tidy(() => {
        for (const layout of ['outIn', 'inOut'] as const) {
          const delta = expertLoRADelta(factors.A, factors.B, s, E, layout);
          expect(delta.shape).to.deep.equal(layout === 'outIn' ? [E, out, inn] : [E, inn, out]);
          expectClose(delta, refWeff(new Float64Array(E * out * inn), [ref], E, out, inn, layout), 1e-6, layout);
        }
      }));
      disposeFactors([factors]);
    });

    it('validates numExperts, layout and the factors', () => {
      const A = tf.zeros([6, 4]) as Tensor2D;
      const B = tf.zeros([5, 6]) as Tensor2D;
      const narrowB = tf.zeros([5, 3]) as Tensor2D;
      const op = '`expertLoRADelta()`: ';
      expectNoLeak(() => {
        expect(() => expertLoRADelta(A, B, 1, 2.5)).to.throw(OpArgumentError,
            op + '\'numExperts\' must be an integer but got 2.5 (number)');
        expect(() => expertLoRADelta(A, B, 1, 0)).to.throw(OpArgumentError, op + '\'numExperts\' must be >= 1 but got 0');
        expect(() => expertLoRADelta(A, B, 1, 4)).to.throw(OpArgumentError,
            op + '\'A\' must have r·E rows (expert-major, r >= 1) with E = 4 experts but got 6 rows');
        expect(() => expertLoRADelta(A, B, 1, 3, 'transposed' as never)).to.throw(OpArgumentError,
            op + '\'layout\' must be one of \'outIn\', \'inOut\' but got \'transposed\'');
        expect(() => expertLoRADelta(A, narrowB, 1, 3)).to.throw(OpArgumentError,
            op + '\'B\' must have shape [*,6] but got [5,3]');
        expect(() => expertLoRADelta(A, B, NaN, 3)).to.throw(OpArgumentError,
            op + '\'scaling\' must be a finite number but got NaN (number)');
      });
      tf.dispose([A, B, narrowB]);
    });
  });

  describe('routerLogits', () => {
    const T = 6, H = 7, E = 5;

    /** logits[t, e] = Σ_h x[t,h]·W[e,h] + bias[e] + Σ_k s_k·Σ_j (Σ_h x[t,h]·A_k[j,h])·B_k[e,j] */
    function refLogits(x: Float64Array, W: Float64Array, bias: Float64Array | null,
                       lora: RefAdapter[]): Float64Array {
      const res = new Float64Array(T * E);
      for (let t = 0; t < T; t++) {
        for (let e = 0; e < E; e++) {
          let acc = bias ? bias[e] : 0;
          for (let h = 0; h < H; h++) acc += x[t * H + h] * W[e * H + h];
          for (const { A, B, r, s, mask } of lora as Array<RefAdapter & { mask?: Float64Array }>) {
            for (let j = 0; j < r; j++) {
              let low = 0;
              for (let h = 0; h < H; h++) low += x[t * H + h] * (mask ? mask[t * H + h] : 1) * A[j * H + h];
              acc += s * low * B[e * r + j];
            }
          }
          res[t * E + e] = acc;
        }
      }
      return res;
    }

    it('equals x·W_gᵀ + bias + Σ s·(x·Aᵀ)·Bᵀ, gradients for x, W_g, bias, A, B match finite differences', () => {
      const rng = new Rng(12);
      const [x, xt] = randomPair(rng, [T, H]);
      const [W, Wt] = randomPair(rng, [E, H]);
      const [bias, biasT] = randomPair(rng, [E]);
      const [G, Gt] = randomPair(rng, [T, E]);
      const specs: Array<[number, number]> = [[3, 0.5], [2, -2]];
      const lora = specs.map(([r, s]) => {
        const [A, At] = randomPair(rng, [r, H]);
        const [B, Bt] = randomPair(rng, [E, r]);
        return { ref: { A, B, r, s }, factors: { A: At as Tensor2D, B: Bt as Tensor2D, scaling: s } };
      });
      const refs = lora.map(l => l.ref);
      expectNoLeak(() => tf.tidy(() => {
        const logits = routerLogits(xt as Tensor2D,
            { weight: Wt as Tensor2D, bias: biasT as Tensor1D, lora: lora.map(l => l.factors) });
        expect(logits.shape).to.deep.equal([T, E]);
        expectClose(logits, refLogits(x, W, bias, refs), 1e-6, 'logits');
        const plain = routerLogits(xt as Tensor2D, { weight: Wt as Tensor2D });
        expectClose(plain, refLogits(x, W, null, []), 1e-6, 'logits without bias and adapters');

        const inputs = [xt, Wt, biasT, ...lora.flatMap(l => [l.factors.A, l.factors.B])];
        const grads = tf.grads((...v: Tensor[]) => routerLogits(v[0] as Tensor2D, {
          weight: v[1] as Tensor2D, bias: v[2] as Tensor1D,
          lora: specs.map(([, s], k) => ({ A: v[3 + 2 * k] as Tensor2D, B: v[4 + 2 * k] as Tensor2D, scaling: s })),
        }))(inputs, Gt);
        const loss = (over: Partial<{ x: Float64Array; W: Float64Array; bias: Float64Array }>,
                      list = refs) => dot(refLogits(over.x ?? x, over.W ?? W, over.bias ?? bias, list), G);
        expectClose(grads[0], finiteDifferences(v => loss({ x: v }), x), 1e-4, 'dx');
        expectClose(grads[1], finiteDifferences(v => loss({ W: v }), W), 1e-4, 'dW_g');
        expectClose(grads[2], finiteDifferences(v => loss({ bias: v }), bias), 1e-4, 'dbias');
        refs.forEach((ref, k) => {
          const withA = (A: Float64Array) => loss({}, refs.map((q, i) => (i === k ? { ...q, A } : q)));
          const withB = (B: Float64Array) => loss({}, refs.map((q, i) => (i === k ? { ...q, B } : q)));
          expectClose(grads[3 + 2 * k], finiteDifferences(withA, ref.A), 1e-4, `dA[${k}]`);
          expectClose(grads[4 + 2 * k], finiteDifferences(withB, ref.B), 1e-4, `dB[${k}]`);
        });
      }));
      tf.dispose([xt, Wt, biasT, Gt]);
      disposeFactors(lora.map(l => l.factors));
    });

    it('LoRA dropout: the branch reads x ⊙ mask (its own per adapter), the base x; dx, dA, dB match finite differences', () => {
      const rng = new Rng(13);
      const [x, xt] = randomPair(rng, [T, H]);
      const [W, Wt] = randomPair(rng, [E, H]);
      const [G, Gt] = randomPair(rng, [T, E]);
      const lora = [[2, 0.5, 4], [3, -1.5, 5]].map(([r, s, seed]) => {
        const [A, At] = randomPair(rng, [r, H]);
        const [B, Bt] = randomPair(rng, [E, r]);
        const maskT = loraDropoutMask([T, H], 0.4, seed);
        const mask = Float64Array.from(maskT.dataSync());
        maskT.dispose();
        return { ref: { A, B, r, s, mask }, factors: { A: At as Tensor2D, B: Bt as Tensor2D, scaling: s, dropout: { p: 0.4, seed } } };
      });
      const refs = lora.map(l => l.ref);
      expectNoLeak(() => tf.tidy(() => {
        const logits = routerLogits(xt as Tensor2D, { weight: Wt as Tensor2D, lora: lora.map(l => l.factors) });
        expectClose(logits, refLogits(x, W, null, refs), 1e-6, 'logits');
        const inputs = [xt, ...lora.flatMap(l => [l.factors.A, l.factors.B])];
        const grads = tf.grads((...v: Tensor[]) => routerLogits(v[0] as Tensor2D, {
          weight: Wt as Tensor2D, lora: lora.map((l, k) => ({ ...l.factors, A: v[1 + 2 * k] as Tensor2D, B: v[2 + 2 * k] as Tensor2D })),
        }))(inputs, Gt);
        const loss = (xv: Float64Array, list = refs) => dot(refLogits(xv, W, null, list), G);
        expectClose(grads[0], finiteDifferences(v => loss(v), x), 1e-4, 'dx');
        refs.forEach((ref, k) => {
          expectClose(grads[1 + 2 * k], finiteDifferences(A => loss(x, refs.map((q, i) => (i === k ? { ...q, A } : q))), ref.A), 1e-4, `dA[${k}]`);
          expectClose(grads[2 + 2 * k], finiteDifferences(B => loss(x, refs.map((q, i) => (i === k ? { ...q, B } : q))), ref.B), 1e-4, `dB[${k}]`);
        });
      }));
      expect(() => routerLogits(xt as Tensor2D, { weight: Wt as Tensor2D, lora: [{ ...lora[0].factors, dropout: { p: -0.1 } }] }))
        .to.throw(/`routerLogits\(\)`: 'router\.lora\[0\]\.dropout\.p' must be a number in \[0, 1\) but got -0\.1/);
      tf.dispose([xt, Wt, Gt]);
      disposeFactors(lora.map(l => l.factors));
    });

    it('validates x, the router weight, bias and adapters', () => {
      const x = tf.zeros([T, H]) as Tensor2D;
      const weight = tf.zeros([E, H]) as Tensor2D;
      const A = tf.zeros([3, H]) as Tensor2D;
      const B = tf.zeros([E, 3]) as Tensor2D;
      const op = '`routerLogits()`: ';
      const throws = (fn: () => unknown, message: string) => expectNoLeak(() => {
        tf.tidy(() => { expect(fn).to.throw(OpArgumentError, op + message); });
      });
      throws(() => routerLogits(tf.zeros([2, T, H]) as never, { weight }), '\'x\' must be 2-D but got shape [2,6,7]');
      throws(() => routerLogits(tf.zeros([T, H], 'int32') as Tensor2D, { weight }),
             '\'x\' must be float32 but got int32 (shape [6,7])');
      throws(() => routerLogits(tf.zeros([T, 8]) as Tensor2D, { weight }),
             '\'x\' must have shape [*,7] but got [6,8] ([T, H] with H = 7 from router.weight [5,7])');
      throws(() => routerLogits(x, null as never),
             '\'router\' must be a RouterWeights object {weight, bias?, lora?} but got null');
      throws(() => routerLogits(x, { weight: tf.zeros([E, H], 'int32') as Tensor2D }),
             '\'router.weight\' must be float32 but got int32 (shape [5,7])');
      throws(() => routerLogits(x, { weight, bias: tf.zeros([4]) as Tensor1D }),
             '\'router.bias\' must have shape [5] but got [4]');
      throws(() => routerLogits(x, { weight, lora: {} as never }),
             '\'router.lora\' must be an array of LoRAFactors but got an object');
      throws(() => routerLogits(x, { weight, lora: [{ A: tf.zeros([3, 6]) as Tensor2D, B, scaling: 1 }] }),
             '\'router.lora[0].A\' must have shape [3,7] but got [3,6]');
      throws(() => routerLogits(x, { weight, lora: [{ A, B, scaling: 1 }, { A, B: tf.zeros([3, E]) as Tensor2D, scaling: 1 }] }),
             '\'router.lora[1].B\' must have shape [5,3] but got [3,5]');
      throws(() => routerLogits(x, { weight, lora: [{ A, B: tf.zeros([E, 3], 'int32') as Tensor2D, scaling: 1 }] }),
             '\'router.lora[0].B\' must be float32 but got int32');
      throws(() => routerLogits(x, { weight, lora: [{ A, B, scaling: Infinity }] }),
             '\'router.lora[0].scaling\' must be a finite number but got Infinity (number)');
      throws(() => routerLogits(x, { weight, lora: [{ A: tf.zeros([0, H]) as Tensor2D, B, scaling: 1 }] }),
             '\'router.lora[0].A\' must have r >= 1 rows but got shape [0,7]');
      tf.dispose([x, weight, A, B]);
    });
  });
});
