/**
 * W_eff = W + Σ s·B_e·A_e for the fused experts' 'materialize' mode, on the grouped kernels: the
 * per-expert products B_e·A_e are one grouped product over the rows of B (E groups of `out` rows)
 * with W added in the same pass, and the backward's dA = s·B_eᵀ·G_e, dB = s·G_e·A_eᵀ are one
 * grouped weight gradient and one grouped product. Same values and gradients as
 * materializeExpertLoRA (src/ops/lora/materialize.ts), without its batched matMuls, which run on
 * tfjs's slow paths on cpu and wasm. W is frozen: captured, never an input of the custom gradient;
 * a packed W is decoded (W_eff is float32 of W's size in any case).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expertFactorA, expertFactorB, peftLayoutA, peftLayoutB } from '../lora/layout.js';
import { isPackedExpertWeight, unpackExpertWeight, type ExpertWeightTensor } from '../packed.js';
import type { LoRAFactors } from '../types.js';
import { groupedProduct, groupedWeightGrad } from './kernels.js';

/** Per adapter: A_e as [E, r, in], B_e as [E, out, r], and for the transposed layout A_eᵀ [E, in, r]. */
function factors(f: LoRAFactors, e: number, transposed: boolean) {
  const a = expertFactorA(f.A, e);                                   // [E, r, in]
  const b = expertFactorB(f.B, e);                                   // [E, out, r]
  const at = transposed ? tf.transpose(a, [0, 2, 1]) as tf.Tensor3D : undefined;  // [E, in, r]
  return { a, b, at, rank: a.shape[1], scaling: f.scaling };
}

/**
 * W [E, out, in] (or [E, in, out] when `transposed`) plus every adapter's delta, differentiable
 * w.r.t. each adapter's A and B (in PEFT's layouts) only. At least one adapter.
 */
export function materializeGrouped(W: ExpertWeightTensor, adapters: LoRAFactors[], transposed: boolean): tf.Tensor3D {
  const [e, d1, d2] = W.shape;
  const groups = new Array<number>(e).fill(d1);      // the rows of W_e: out ('outIn') or in
  const apply = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
    const current = adapters.map((f, i) => ({ A: args[2 * i] as tf.Tensor2D, B: args[2 * i + 1] as tf.Tensor2D, scaling: f.scaling }));
    const value = tf.tidy(() => {
      // a packed W is decoded whole here: W_eff is a float32 tensor of W's size anyway
      // (loraMode 'auto' never materializes a packed weight)
      let acc = tf.reshape(isPackedExpertWeight(W) ? unpackExpertWeight(W) : W, [e * d1, d2]) as tf.Tensor2D;
      for (const f of current.map(c => factors(c, e, transposed))) {
        acc = transposed ?
          // W_e [in, out] + s·A_eᵀ·B_eᵀ: rows of A_eᵀ times B_eᵀ
          groupedProduct({ t: tf.reshape(f.at!, [e * d1, f.rank]) }, f.b, groups, true, { alpha: f.scaling, addTo: acc }) :
          // W_e [out, in] + s·B_e·A_e: rows of B_e times A_e
          groupedProduct({ t: tf.reshape(f.b, [e * d1, f.rank]) }, f.a, groups, false, { alpha: f.scaling, addTo: acc });
      }
      return tf.reshape(acc, [e, d1, d2]) as tf.Tensor3D;
    });
    const gradFunc = (dy: tf.Tensor): tf.Tensor[] => tf.tidy(() => {
      const g = tf.reshape(dy, [e * d1, d2]) as tf.Tensor2D;      // rows of G_e
      return current.flatMap(c => {
        const f = factors(c, e, transposed);
        if (!transposed) {
          const dA = groupedWeightGrad({ t: tf.reshape(f.b, [e * d1, f.rank]) }, { t: g }, groups);  // [E, r, in] = B_eᵀ·G_e
          const dB = groupedProduct({ t: g }, f.a, groups, true, { alpha: f.scaling });           // [E·out, r] = s·G_e·A_eᵀ
          return [peftLayoutA(tf.mul(dA, f.scaling) as tf.Tensor3D), peftLayoutB(tf.reshape(dB, [e, d1, f.rank]))];
        }
        // G_e [in, out]: dA_e = s·(G_e·B_e)ᵀ, dB_e = s·G_eᵀ·A_eᵀ
        const gb = groupedProduct({ t: g }, f.b, groups, false, { alpha: f.scaling });           // [E·in, r]
        const dA = tf.transpose(tf.reshape(gb, [e, d1, f.rank]), [0, 2, 1]) as tf.Tensor3D;       // [E, r, in]
        const dB = groupedWeightGrad({ t: g }, { t: tf.reshape(f.at!, [e * d1, f.rank]) }, groups);  // [E, out, r]
        return [peftLayoutA(dA), peftLayoutB(tf.mul(dB, f.scaling) as tf.Tensor3D)];
      });
    });
    return { value, gradFunc };
  });
  return apply(...adapters.flatMap(f => [f.A, f.B])) as tf.Tensor3D;
}
