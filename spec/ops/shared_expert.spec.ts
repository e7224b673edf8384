import * as tf from '@tensorflow/tfjs-core';
import type { Tensor, Tensor2D } from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { moeBlock } from '../../src/ops/moe_block.js';
import { loraDropoutMask } from '../../src/ops/lora/dropout.js';
import { sharedExpert } from '../../src/ops/shared_expert.js';
import type { LoRAFactors, SharedExpertWeights } from '../../src/ops/types.js';
import { asF32, expectClose, expectNoLeak, finiteDifferences, Rng, tensorOf } from '../helpers/numeric.js';

// ---------------------------------------------------------------------------------------------
// float64 reference from the definition, with LoRA folded into the weight (the op never does
// that, so this is an independent formulation): W_eff = W + Σ s·B·A, W [out, in], A [r, in],
// B [out, r]; out = (silu(x·G_effᵀ) ⊙ (x·U_effᵀ))·D_effᵀ, times sigmoid(x·gᵀ) when gated.
// ---------------------------------------------------------------------------------------------

/** with `mask` [T, in] (LoRA dropout) the adapter's branch reads x ⊙ mask, the base x */
interface RefAdapter { A: Float64Array; B: Float64Array; r: number; s: number; mask?: Float64Array }
type Proj = 'gate' | 'up' | 'down';

function effective(W: Float64Array, out: number, inn: number, adapters: RefAdapter[]): Float64Array {
  const res = Float64Array.from(W);
  for (const { A, B, r, s } of adapters) {
    for (let o = 0; o < out; o++) {
      for (let i = 0; i < inn; i++) {
        let acc = 0;
        for (let j = 0; j < r; j++) acc += B[o * r + j] * A[j * inn + i];
        res[o * inn + i] += s * acc;
      }
    }
  }
  return res;
}

/** y [T, out] = x [T, in] · Wᵀ */
function matVecT(x: Float64Array, T: number, inn: number, W: Float64Array, out: number): Float64Array {
  const y = new Float64Array(T * out);
  for (let t = 0; t < T; t++) {
    for (let o = 0; o < out; o++) {
      let acc = 0;
      for (let i = 0; i < inn; i++) acc += x[t * inn + i] * W[o * inn + i];
      y[t * out + o] = acc;
    }
  }
  return y;
}

const sigmoid = (v: number) => 1 / (1 + Math.exp(-v));

interface RefShared { gate: Float64Array; up: Float64Array; down: Float64Array; sigmoidGate?: Float64Array;
  lora: Record<Proj, RefAdapter[]> & { sigmoidGate?: RefAdapter[] } }

/** x·W_effᵀ with the undropped adapters folded in, plus each dropped adapter's (x ⊙ mask)·(s·B·A)ᵀ */
function refProjection(x: Float64Array, T: number, inn: number, W: Float64Array, out: number, adapters: RefAdapter[]): Float64Array {
  const y = matVecT(x, T, inn, effective(W, out, inn, adapters.filter(a => !a.mask)), out);
  for (const a of adapters.filter(q => q.mask)) {
    const branch = matVecT(x.map((v, k) => v * a.mask![k]), T, inn, effective(new Float64Array(out * inn), out, inn, [a]), out);
    branch.forEach((v, k) => { y[k] += v; });
  }
  return y;
}

function refShared(x: Float64Array, T: number, H: number, I: number, w: RefShared): Float64Array {
  const g = refProjection(x, T, H, w.gate, I, w.lora.gate);
  const u = refProjection(x, T, H, w.up, I, w.lora.up);
  const h = g.map((v, k) => v * sigmoid(v) * u[k]);
  const out = refProjection(h, T, I, w.down, H, w.lora.down);
  if (w.sigmoidGate) {
    const gate = refProjection(x, T, H, w.sigmoidGate, 1, w.lora.sigmoidGate ?? []);
    for (let t = 0; t < T; t++) for (let o = 0; o < H; o++) out[t * H + o] *= sigmoid(gate[t]);
  }
  return out;
}

function dot(a: ArrayLike<number>, b: ArrayLike<number>): number {
  let acc = 0;
  for (let i = 0; i < a.length; i++) acc += a[i] * b[i];
  return acc;
}

/** A named float64 array and the float32 tensor of exactly its values. */
interface Param { name: string; data: Float64Array; tensor: Tensor; set: (w: RefShared, v: Float64Array) => void }

type Ranks = Partial<Record<Proj | 'sigmoidGate', Array<[number, number]>>>;

function setup(seed: number, gated: boolean, ranks: Ranks, dropout?: number) {
  const T = 5, H = 4, I = 3;
  const rng = new Rng(seed);
  const params: Param[] = [];
  const pair = (name: string, shape: number[], scale: number, set: Param['set']) => {
    const data = asF32(rng.array(shape.reduce((a, b) => a * b, 1), scale));
    const p = { name, data, tensor: tensorOf(data, shape), set };
    params.push(p);
    return p;
  };
  const x = pair('x', [T, H], 1, () => {});
  const ref: RefShared = { gate: new Float64Array(), up: new Float64Array(), down: new Float64Array(),
    lora: { gate: [], up: [], down: [] } };
  const shape: Record<Proj, [number, number]> = { gate: [I, H], up: [I, H], down: [H, I] };
  const weights: Partial<SharedExpertWeights> = { lora: {} };
  for (const p of ['gate', 'up', 'down'] as const) {
    const w = pair(`shared.${p}`, shape[p], 0.6, (acc, v) => { acc[p] = v; });
    ref[p] = w.data;
    weights[p] = w.tensor as Tensor2D;
    const [out, inn] = shape[p];
    weights.lora![p] = (ranks[p] ?? []).map(([r, s], k): LoRAFactors => {
      const a = pair(`lora.${p}[${k}].A`, [r, inn], 0.5, (acc, v) => { acc.lora[p][k].A = v; });
      const b = pair(`lora.${p}[${k}].B`, [out, r], 0.5, (acc, v) => { acc.lora[p][k].B = v; });
      // dropout: each adapter of each projection its own seed, so its own mask
      const d = dropout === undefined ? undefined : { p: dropout, seed: seed * 100 + ['gate', 'up', 'down'].indexOf(p) * 10 + k };
      const maskT = d && loraDropoutMask([T, inn], d.p, d.seed);
      const mask = maskT && Float64Array.from(maskT.dataSync());
      maskT?.dispose();
      ref.lora[p].push({ A: a.data, B: b.data, r, s, mask });
      return { A: a.tensor as Tensor2D, B: b.tensor as Tensor2D, scaling: s, ...(d ? { dropout: d } : {}) };
    });
  }
  if (gated) {
    const sg = pair('shared.sigmoidGate', [1, H], 0.6, (acc, v) => { acc.sigmoidGate = v; });
    ref.sigmoidGate = sg.data;
    weights.sigmoidGate = sg.tensor as Tensor2D;
    if (ranks.sigmoidGate !== undefined) {
      ref.lora.sigmoidGate = [];
      weights.lora!.sigmoidGate = ranks.sigmoidGate.map(([r, sc], k): LoRAFactors => {
        const a = pair(`lora.sigmoidGate[${k}].A`, [r, H], 0.5, (acc, v) => { acc.lora.sigmoidGate![k].A = v; });
        const b = pair(`lora.sigmoidGate[${k}].B`, [1, r], 0.5, (acc, v) => { acc.lora.sigmoidGate![k].B = v; });
        ref.lora.sigmoidGate!.push({ A: a.data, B: b.data, r, s: sc });
        return { A: a.tensor as Tensor2D, B: b.tensor as Tensor2D, scaling: sc };
      });
    }
  }
  const G = asF32(rng.array(T * H));
  return { T, H, I, x, params, ref, weights: weights as SharedExpertWeights, G, Gt: tensorOf(G, [T, H]) };
}

/** Rebuilds the op's weights with tensor replacements, in `params` order (x first). */
function rebuild(w: SharedExpertWeights, ts: Tensor[]): SharedExpertWeights {
  let i = 1;
  const next = () => ts[i++] as Tensor2D;
  const out: SharedExpertWeights = { gate: w.gate, up: w.up, down: w.down, lora: {} };
  for (const p of ['gate', 'up', 'down'] as const) {
    out[p] = next();
    out.lora![p] = (w.lora?.[p] ?? []).map(f => ({ A: next(), B: next(), scaling: f.scaling, dropout: f.dropout }));
  }
  if (w.sigmoidGate) out.sigmoidGate = next();
  if (w.lora?.sigmoidGate) out.lora!.sigmoidGate = w.lora.sigmoidGate.map(f => ({ A: next(), B: next(), scaling: f.scaling }));
  return out;
}

function checkAgainstReference(seed: number, gated: boolean, ranks: Ranks, dropout?: number) {
  const s = setup(seed, gated, ranks, dropout);
  expectNoLeak(() => {
    const out = sharedExpert(s.x.tensor as Tensor2D, s.weights);
    expectClose(out, refShared(s.x.data, s.T, s.H, s.I, s.ref), 1e-5, 'out');
    const grads = tf.grads((...ts: Tensor[]) =>
      tf.sum(tf.mul(sharedExpert(ts[0] as Tensor2D, rebuild(s.weights, ts)), s.Gt)))(s.params.map(p => p.tensor));
    s.params.forEach((p, k) => {
      const loss = (v: Float64Array) => {
        const w: RefShared = { ...s.ref, lora: { gate: s.ref.lora.gate.map(a => ({ ...a })),
          up: s.ref.lora.up.map(a => ({ ...a })), down: s.ref.lora.down.map(a => ({ ...a })),
          sigmoidGate: s.ref.lora.sigmoidGate?.map(a => ({ ...a })) } };
        p.set(w, v);
        return dot(refShared(p.name === 'x' ? v : s.x.data, s.T, s.H, s.I, w), s.G);
      };
      expectClose(grads[k], finiteDifferences(loss, p.data), 1e-4, `d${p.name}`);
    });
    tf.dispose([out, ...grads]);
  });
  tf.dispose([...s.params.map(p => p.tensor), s.Gt]);
}

describe('sharedExpert with LoRA on its projections', () => {
  it('no adapters: plain SwiGLU MLP, value and every gradient (float64 + finite differences)', () => {
    checkAgainstReference(11, false, {});
  });

  it('one adapter on each of gate, up, down: x·Wᵀ + s·(x·Aᵀ)·Bᵀ, value and gradients of W, A, B, x', () => {
    checkAgainstReference(12, false, { gate: [[2, 1.5]], up: [[1, 2]], down: [[2, 0.5]] });
  });

  it('Qwen2-MoE sigmoid gate, two adapters on down and one on gate (rsLoRA-like scaling): deltas add up', () => {
    checkAgainstReference(13, true, { gate: [[3, 1 / Math.sqrt(3)]], down: [[1, 2], [2, 0.75]] });
  });

  it('LoRA on the Qwen2-MoE sigmoid gate ([1, H], PEFT\'s shared_expert_gate) with rank 3 beside rank-2 down: value and gradients', () => {
    checkAgainstReference(19, true, { sigmoidGate: [[3, 0.7]], down: [[2, 1.5]] });
  });

  it('LoRA dropout (PEFT\'s lora_dropout): each adapter\'s branch reads its own dropped input, the base x; value and gradients', () => {
    checkAgainstReference(14, true, { gate: [[2, 1.5]], up: [[1, 0.5]], down: [[2, 2], [1, -1]] }, 0.4);
  });

  it('empty adapter lists equal no lora at all, bit for bit', () => {
    const s = setup(14, true, {});
    expectNoLeak(() => {
      const a = sharedExpert(s.x.tensor as Tensor2D, { ...s.weights, lora: undefined });
      const b = sharedExpert(s.x.tensor as Tensor2D, s.weights);
      expect(Array.from(b.dataSync())).to.deep.equal(Array.from(a.dataSync()));
      tf.dispose([a, b]);
    });
    tf.dispose([...s.params.map(p => p.tensor), s.Gt]);
  });

  it('moeBlock passes shared LoRA through on both kernels', () => {
    const s = setup(15, true, { up: [[2, 1]] });
    const rng = new Rng(3);
    const E = 3;
    const router = { weight: tensorOf(rng.array(E * s.H, 2), [E, s.H]) as Tensor2D };
    const experts = { gateUp: tensorOf(rng.array(E * 2 * s.I * s.H, 0.5), [E, 2 * s.I, s.H]) as tf.Tensor3D,
      down: tensorOf(rng.array(E * s.H * s.I, 0.5), [E, s.H, s.I]) as tf.Tensor3D };
    const config = { routing: { kind: 'softmaxTopK' as const, topK: 2 }, activation: { kind: 'swiglu' as const } };
    expectNoLeak(() => {
      const x = s.x.tensor as Tensor2D;
      const withLoRA = tf.tidy(() => {
        const fused = moeBlock(x, { router, experts, shared: s.weights }, config, { expertKernel: 'fused' });
        const ref = moeBlock(x, { router, experts, shared: s.weights }, config, { expertKernel: 'reference' });
        const base = moeBlock(x, { router, experts, shared: { ...s.weights, lora: undefined } }, config);
        expectClose(fused.out, ref.out, 1e-5, 'fused vs reference');
        // the difference is exactly the shared expert's change
        const delta = tf.sub(sharedExpert(x, s.weights), sharedExpert(x, { ...s.weights, lora: undefined }));
        expectClose(tf.sub(fused.out, base.out), delta, 1e-4, 'LoRA delta');
        return tf.max(tf.abs(delta));
      });
      expect(withLoRA.dataSync()[0]).to.be.above(1e-3);
      withLoRA.dispose();
    });
    tf.dispose([...s.params.map(p => p.tensor), s.Gt, router.weight, experts.gateUp, experts.down]);
  });

  describe('rejects bad shared LoRA factors', () => {
    type Make = (w: SharedExpertWeights, t: (shape: number[]) => Tensor2D) => SharedExpertWeights;
    const cases: Array<[string, Make, RegExp]> = [
      ['lora not an object', w => ({ ...w, lora: 3 as never }),
        /`sharedExpert\(\)`: 'weights.shared.lora' must be an object \{gate\?, up\?, down\?, sigmoidGate\?\} of LoRAFactors lists but got number/],
      ['unknown projection', w => ({ ...w, lora: { gate_proj: [] } as never }),
        /'weights.shared.lora' may only have keys 'gate', 'up', 'down', 'sigmoidGate' but got 'gate_proj'/],
      ['sigmoidGate LoRA without a sigmoid gate', (w, t) => ({ ...w, lora: { sigmoidGate: [{ A: t([1, 4]), B: t([1, 1]), scaling: 1 }] } }),
        /'weights.shared.lora.sigmoidGate' adapts the shared expert's sigmoid gate but 'weights.shared.sigmoidGate' is absent/],
      ['list not an array', w => ({ ...w, lora: { up: {} as never } }),
        /'weights.shared.lora.up' must be an array of LoRAFactors but got object/],
      ['factor not an object', w => ({ ...w, lora: { up: [null as never] } }),
        /'weights.shared.lora.up\[0\]' must be a LoRAFactors object \{A, B, scaling\} but got null/],
      ['A with the wrong in size', (w, t) => ({ ...w, lora: { gate: [{ A: t([2, 3]), B: t([3, 2]), scaling: 1 }] } }),
        /'weights.shared.lora.gate\[0\].A' must have shape \[2,4\] but got \[2,3\] \(\[r, in\] with in = 4 from weights.shared.gate \[3,4\]\)/],
      ['B with the wrong rank', (w, t) => ({ ...w, lora: { down: [{ A: t([2, 3]), B: t([4, 1]), scaling: 1 }] } }),
        /'weights.shared.lora.down\[0\].B' must have shape \[4,2\] but got \[4,1\] \(\[out, r\] with out = 4 from weights.shared.down \[4,3\] and r = 2/],
      ['scaling not finite', (w, t) => ({ ...w, lora: { up: [{ A: t([1, 4]), B: t([3, 1]), scaling: NaN }] } }),
        /'weights.shared.lora.up\[0\].scaling' must be a finite number but got NaN/],
    ];
    for (const [label, make, message] of cases) {
      it(label, () => {
        const s = setup(16, false, {});
        const made: Tensor[] = [];
        const t = (shape: number[]) => { const v = tf.zeros(shape as [number, number]) as Tensor2D; made.push(v); return v; };
        const bad = make(s.weights, t);
        expectNoLeak(() => expect(() => sharedExpert(s.x.tensor as Tensor2D, bad)).to.throw(message));
        tf.dispose([...s.params.map(p => p.tensor), s.Gt, ...made]);
      });
    }
    it('through moeBlock the message names moeBlock', () => {
      const s = setup(17, false, {});
      const A = tf.zeros([2, 5]) as Tensor2D;
      const B = tf.zeros([3, 2]) as Tensor2D;
      const router = { weight: tf.zeros([2, 4]) as Tensor2D };
      const experts = { gateUp: tf.zeros([2, 6, 4]) as tf.Tensor3D, down: tf.zeros([2, 4, 3]) as tf.Tensor3D };
      expectNoLeak(() => expect(() => moeBlock(s.x.tensor as Tensor2D, { router, experts,
        shared: { ...s.weights, lora: { up: [{ A, B, scaling: 1 }] } } },
      { routing: { kind: 'softmaxTopK', topK: 1 }, activation: { kind: 'swiglu' } }))
        .to.throw(/`moeBlock\(\)`: 'weights.shared.lora.up\[0\].A' must have shape \[2,4\] but got \[2,5\]/));
      tf.dispose([...s.params.map(p => p.tensor), s.Gt, A, B, router.weight, experts.gateUp, experts.down]);
    });
  });
});
