/**
 * W_eff = W + Σ_k s_k·B_k·A_k on a fused expert weight, differentiable w.r.t. the LoRA factors
 * only: W is frozen by construction (captured by closure, never an input of the custom gradient).
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor, Tensor2D, Tensor3D } from '@tensorflow/tfjs-core';
import type { LoRAFactors } from '../types.js';
import { assertOneOf, assertTensor, fail } from '../validate.js';
import { EXPERT_WEIGHT_LAYOUTS, expertDeltaSum, type ExpertWeightLayout } from './delta.js';
import { peftLayoutA, peftLayoutB, stackExpertFactors } from './layout.js';
import { assertAdapterList, checkExpertFactors } from './validate_lora.js';

export interface MaterializeOptions {
  /**
   * 'outIn' (default): W [E, out, in]. 'inOut': W stored transposed, [E, in, out] (gpt-oss);
   * A and B keep their (out, in) meaning (A [r·E, in], B [out, r·E]) and W_eff[e] = W[e] + (s·B_e·A_e)ᵀ.
   */
  layout?: ExpertWeightLayout;
}

/**
 * The effective fused expert weight with LoRA adapters applied, in PEFT's layout (>= 0.19.1):
 * W_eff[e] = W[e] + s·B_e·A_e with A [r·E, in] (expert-major rows) and B [out, r·E] (rank-major
 * columns). Several adapters add their deltas. Gradients flow to every A and B; W gets none (keep
 * it out of the trained variables as well) and the backward allocates nothing of W's size.
 *
 * With no adapters (the disabled state) the result is `tf.clone(W)`: it shares W's data (no copy)
 * but is a separate tensor, so the caller may dispose it without disposing W.
 *
 * ```js
 * const W = tf.randomNormal([8, 32, 64]);                 // E = 8, out = 32, in = 64
 * const A = tf.variable(tf.randomNormal([4 * 8, 64]));   // r = 4
 * const B = tf.variable(tf.zeros([32, 4 * 8]));
 * const Weff = materializeExpertLoRA(W, A, B, 8 / 4);     // [8, 32, 64]
 * const both = materializeExpertLoRA(W, [{A, B, scaling: 2}, other]);
 * ```
 */
export function materializeExpertLoRA(
    W: Tensor3D, A: Tensor2D, B: Tensor2D, scaling: number, options?: MaterializeOptions): Tensor3D;
export function materializeExpertLoRA(
    W: Tensor3D, adapters: readonly LoRAFactors[], options?: MaterializeOptions): Tensor3D;
export function materializeExpertLoRA(
    W: Tensor3D, first: Tensor2D | readonly LoRAFactors[], second?: Tensor2D | MaterializeOptions,
    scaling?: number, fourth?: MaterializeOptions): Tensor3D {
  const op = 'materializeExpertLoRA';
  const listForm = Array.isArray(first);
  const adapters = (listForm ? first : [{ A: first, B: second, scaling }]) as unknown[];
  const options = (listForm ? second : fourth) as MaterializeOptions | undefined;
  const prefix = (i: number) => (listForm ? `adapters[${i}].` : '');

  assertTensor(op, 'W', W, 3);
  if (options != null && (typeof options !== 'object' || Array.isArray(options))) {
    fail(op, `'options' must be an object like {layout: 'outIn'} but got ${typeof options}`);
  }
  const layout = options?.layout ?? 'outIn';
  assertOneOf(op, 'options.layout', layout, EXPERT_WEIGHT_LAYOUTS);
  assertAdapterList(op, 'adapters', adapters);
  const [E, d1, d2] = W.shape;
  const [outDim, inDim] = layout === 'outIn' ? [d1, d2] : [d2, d1];
  const context = `W is [${W.shape}], layout '${layout}': E = ${E}, out = ${outDim}, in = ${inDim}`;
  adapters.forEach((f, i) => checkExpertFactors(op, prefix(i), f, E, outDim, inDim, context));
  const valid = adapters as LoRAFactors[];
  if (valid.length === 0) return tf.clone(W);

  const scalings = valid.map(f => f.scaling);
  const pairUp = (factors: Tensor[]): LoRAFactors[] => scalings.map((s, k) => (
    { A: factors[2 * k] as Tensor2D, B: factors[2 * k + 1] as Tensor2D, scaling: s }));
  // customGrad takes a fixed list of tensors: A_0, B_0, A_1, B_1, ...
  const apply = tf.customGrad((...args: Array<Tensor | tf.GradSaveFunc>) => {
    const current = pairUp(args.slice(0, 2 * valid.length) as Tensor[]);
    return {
      value: materializeForward(W, current, E, layout),
      gradFunc: (dy: Tensor) => materializeBackward(dy as Tensor3D, current, E, layout),
    };
  });
  return apply(...valid.flatMap(f => [f.A, f.B])) as Tensor3D;
}

/** W + Σ_k ΔW_k: one W-sized delta (all adapters in one product) and the sum. */
function materializeForward(
    W: Tensor3D, adapters: LoRAFactors[], E: number, layout: ExpertWeightLayout): Tensor3D {
  return tf.tidy(() => tf.add(W, expertDeltaSum(adapters, E, layout)));  // [E, out, in] | [E, in, out]
}

/**
 * From G = dW_eff: dA_e = s·B_eᵀ·G_e, dB_e = s·G_e·A_eᵀ (for 'inOut', G holds G_eᵀ and the products
 * are taken transposed), returned as [dA_0, dB_0, dA_1, dB_1, ...] in PEFT's layouts. Two batched
 * products cover all adapters; every temporary is of the factors' size, none of W's.
 */
function materializeBackward(
    G: Tensor3D, adapters: LoRAFactors[], E: number, layout: ExpertWeightLayout): Tensor[] {
  return tf.tidy(() => {
    const { a, scaledB, ranks } = stackExpertFactors(adapters, E);  // [E, R, in], [E, out, R]
    let dA: Tensor3D[];   // per adapter [E, r, in], scaling applied
    let dBu: Tensor3D[];  // per adapter [E, out, r], scaling not yet applied
    if (layout === 'outIn') {
      dA = tf.split(tf.matMul(tf.transpose(scaledB, [0, 2, 1]), G), ranks, 1);  // [E, R, in]
      dBu = tf.split(tf.matMul(G, tf.transpose(a, [0, 2, 1])), ranks, 2);       // [E, out, R]
    } else {
      // G_e here is [in, out]: G_e·(s·B_e) = (s·B_eᵀ·G_eᵀ)ᵀ and A_e·G_e = (G_eᵀ·A_eᵀ)ᵀ.
      dA = tf.split(tf.matMul(G, scaledB), ranks, 2)                         // [E, in, R]
          .map(t => tf.transpose(t, [0, 2, 1]) as Tensor3D);
      dBu = tf.split(tf.matMul(a, G), ranks, 1)                              // [E, R, out]
          .map(t => tf.transpose(t, [0, 2, 1]) as Tensor3D);
    }
    return adapters.flatMap((f, k) => [
      peftLayoutA(dA[k]),                                    // [r·E, in]
      peftLayoutB(tf.mul(dBu[k], f.scaling) as Tensor3D),    // [out, r·E]
    ]);
  });
}
