/**
 * Llama 4's MoE block (MoEBlockConfig.weightedInput with 'topKSigmoid' routing and a shared expert)
 * against a float64 JS transcription of transformers' Llama4TextMoe and finite differences, and
 * the fused block against the reference block with expert and router LoRA.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { moeBlock } from '../../src/ops/moe_block.js';
import type { MoEBlockConfig, MoEBlockWeights } from '../../src/ops/types.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { Rng, asF32, expectClose, expectNoLeak, finiteDifferences, tensorOf } from '../helpers/numeric.js';
import { type Dims, type Params64, NAMES, llama4Block64, params64 } from './llama4_reference64.js';

/** The block's tensors; with layout 'inOut' the experts are stored [E, in, out] as Llama 4's checkpoints hold them. */
function blockInputs(p: Params64, d: Dims, layout: 'outIn' | 'inOut' = 'outIn'): { x: tf.Tensor2D; weights: MoEBlockWeights } {
  const { T, H, I, E, Is } = d;
  const expert = (data: Float64Array, shape: number[]) => {
    const w = tensorOf(data, shape);
    if (layout === 'outIn') return w as tf.Tensor3D;
    const t = tf.transpose(w, [0, 2, 1]) as tf.Tensor3D;
    w.dispose();
    return t;
  };
  return {
    x: tensorOf(p.x, [T, H]) as tf.Tensor2D,
    weights: {
      router: { weight: tensorOf(p.router, [E, H]) as tf.Tensor2D },
      experts: { gateUp: expert(p.W1, [E, 2 * I, H]), down: expert(p.W2, [E, H, I]), layout },
      shared: {
        gate: tensorOf(p.sg, [Is, H]) as tf.Tensor2D, up: tensorOf(p.su, [Is, H]) as tf.Tensor2D,
        down: tensorOf(p.sd, [H, Is]) as tf.Tensor2D,
      },
    },
  };
}

const configOf = (K: number): MoEBlockConfig =>
  ({ routing: { kind: 'topKSigmoid', topK: K }, activation: { kind: 'swiglu' }, weightedInput: true });

describe('moeBlock with weightedInput (Llama 4: Σ_k expert_k(sigmoid(z_k)·x) + shared expert)', () => {
  for (const [K, layout] of [[1, 'inOut'], [2, 'outIn']] as const) {
    for (const kernel of ['fused', 'reference']) {
      it(`${kernel}, K=${K}, experts '${layout}': output, routing and every gradient vs float64 and finite differences`, () => {
        const d: Dims = { T: 5, H: 6, I: 3, E: 4, K, Is: 4 };
        const rng = new Rng(40 + K);
        let p: Params64;
        do p = params64(rng, d); while (llama4Block64(p, d).margin < 1e-2);
        const g64 = asF32(rng.array(d.T * d.H));
        const ref = llama4Block64(p, d);
        const { x, weights } = blockInputs(p, d, layout);
        const g = tensorOf(g64, [d.T, d.H]);
        const flat = (w: MoEBlockWeights) =>
          [w.router.weight, w.experts.gateUp as tf.Tensor, w.experts.down as tf.Tensor, w.shared!.gate, w.shared!.up, w.shared!.down];
        expectNoLeak(() => {
          const { out, routing } = moeBlock(x, weights, configOf(K), { expertKernel: kernel, trainExpertWeights: true });
          expect(Array.from(routing.experts.dataSync()), 'experts').to.deep.equal(Array.from(ref.experts));
          expectClose(out, ref.out, 1e-5, 'out');
          const loss = (xIn: tf.Tensor, wg: tf.Tensor, w1: tf.Tensor, w2: tf.Tensor, sg: tf.Tensor, su: tf.Tensor, sd: tf.Tensor) => {
            const r = moeBlock(xIn as tf.Tensor2D, {
              router: { weight: wg as tf.Tensor2D },
              experts: { gateUp: w1 as tf.Tensor3D, down: w2 as tf.Tensor3D, layout },
              shared: { gate: sg as tf.Tensor2D, up: su as tf.Tensor2D, down: sd as tf.Tensor2D },
            }, configOf(K), { expertKernel: kernel, trainExpertWeights: true });
            tf.dispose([r.routing.weights, r.routing.experts, r.routing.logits]);
            return tf.sum(tf.mul(r.out, g));
          };
          const grads = tf.grads(loss)([x, ...flat(weights)]);
          NAMES.forEach((name, i) => {
            const f = (v: Float64Array) => {
              const o = llama4Block64({ ...p, [name]: v }, d).out;
              return o.reduce((s, value, j) => s + value * g64[j], 0);
            };
            // the experts' gradients come in the layout of the weights; the float64 ones are [E, out, in]
            const grad = layout === 'inOut' && (name === 'W1' || name === 'W2') ?
              tf.transpose(grads[i], [0, 2, 1]) : tf.clone(grads[i]);
            expectClose(grad, finiteDifferences(f, Float64Array.from(p[name])), 1e-4, `d${name}`);
            grad.dispose();
          });
          tf.dispose([out, routing.weights, routing.experts, routing.logits, ...grads]);
        });
        tf.dispose([x, g, ...flat(weights)]);
      });
    }
  }

  for (const loraMode of ['split', 'materialize'] as const) {
    it(`fused = reference with router and expert LoRA (${loraMode}), K=2: output and every LoRA gradient`, () => {
      const d: Dims = { T: 9, H: 8, I: 4, E: 6, K: 2, Is: 5 };
      const rng = new Rng(77);
      const p = params64(rng, d);
      const { x, weights } = blockInputs(p, d, 'inOut');
      const r = 2;
      const t = (shape: number[]) => tensorOf(rng.array(shape.reduce((a, b) => a * b, 1), 0.3), shape) as tf.Tensor2D;
      const factors = [t([r * d.E, d.H]), t([2 * d.I, r * d.E]), t([r * d.E, d.I]), t([d.H, r * d.E]), t([r, d.H]), t([d.E, r])];
      const g = tensorOf(rng.array(d.T * d.H), [d.T, d.H]);
      const run = (kernel: string) => {
        const f = (xIn: tf.Tensor, ...fs: tf.Tensor[]) => {
          const [a1, b1, a2, b2, ar, br] = fs as tf.Tensor2D[];
          const res = moeBlock(xIn as tf.Tensor2D, {
            router: { ...weights.router, lora: [{ A: ar, B: br, scaling: 2 }] },
            experts: { ...weights.experts, gateUpLoRA: [{ A: a1, B: b1, scaling: 2 }], downLoRA: [{ A: a2, B: b2, scaling: 2 }] },
            shared: weights.shared,
          }, configOf(2), { expertKernel: kernel, loraMode });
          tf.dispose([res.routing.weights, res.routing.experts, res.routing.logits]);
          return tf.sum(tf.mul(res.out, g));
        };
        return tf.valueAndGrads(f)([x, ...factors]);
      };
      expectNoLeak(() => {
        const fused = run('fused');
        const ref = run('reference');
        expectClose(fused.value, ref.value, 1e-5, 'loss');
        fused.grads.forEach((gr, i) => expectClose(gr, ref.grads[i], 1e-5, `grad ${i}`));
        tf.dispose([fused.value, ref.value, ...fused.grads, ...ref.grads]);
      });
      tf.dispose([x, g, ...factors, weights.router.weight, weights.experts.gateUp as tf.Tensor,
        weights.experts.down as tf.Tensor, weights.shared!.gate, weights.shared!.up, weights.shared!.down]);
    });
  }

  it('refuses a weightedInput that is not a boolean', () => {
    const x = tf.zeros([2, 4]) as tf.Tensor2D;
    const weights: MoEBlockWeights = {
      router: { weight: tf.zeros([2, 4]) }, experts: { gateUp: tf.zeros([2, 6, 4]), down: tf.zeros([2, 4, 3]) },
    };
    const bad = { ...configOf(1), weightedInput: 'yes' } as unknown as MoEBlockConfig;
    expect(() => moeBlock(x, weights, bad)).to.throw(OpArgumentError,
        "`moeBlock()`: 'config.weightedInput' must be a boolean but got \"yes\" (string)");
    tf.dispose([x, weights.router.weight, weights.experts.gateUp as tf.Tensor, weights.experts.down as tf.Tensor]);
  });
});
