/**
 * Grouped products over expert-sorted rows: rows [offset_e, offset_e + n_e) go through expert e.
 * One matMul per non-empty expert, no dense all-experts compute. The forward/backward pair is
 * shared by the fused experts op and the split-LoRA op, which wrap it in their own customGrad.
 *
 * LoRA adapters on the weight are applied split: y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ, so W_eff is never
 * built and the base weight gets a gradient only when asked for.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expertFactorA, expertFactorB } from '../lora/layout.js';
import type { LoRAFactors } from '../types.js';

export interface GroupedWeight {
  /** [E, out, in], or [E, in, out] when `transposed` (gpt-oss) */
  weight: tf.Tensor3D;
  transposed: boolean;
  /** [E, out] */
  bias?: tf.Tensor2D;
  /** split adapters: A [r·E, in] expert-major rows, B [out, r·E] rank-major columns */
  lora: LoRAFactors[];
}

export interface GroupedGrads {
  dx: tf.Tensor2D;                 // [N, in]
  dWeight?: tf.Tensor3D;           // like `weight`, when asked for
  dBias?: tf.Tensor2D;             // [E, out], when asked for and there is a bias
  dA: tf.Tensor2D[];               // per adapter, [r·E, in]
  dB: tf.Tensor2D[];               // per adapter, [out, r·E]
}

/** Per-expert views of one adapter's factors; B is re-laid out once per call, not per expert. */
interface ExpertFactors {
  rank: number;
  scaling: number;
  A: (e: number) => tf.Tensor2D;   // [r, in]
  B: (e: number) => tf.Tensor2D;   // [out, r]
}

function expertFactors(f: LoRAFactors, numExperts: number): ExpertFactors {
  const a = expertFactorA(f.A, numExperts);   // [E, r, in]
  const b = expertFactorB(f.B, numExperts);   // [E, out, r], re-laid out once per call
  const [, rank, inSize] = a.shape;
  const out = b.shape[1];
  return {
    rank,
    scaling: f.scaling,
    A: e => tf.reshape(tf.slice(a, [e, 0, 0], [1, rank, inSize]), [rank, inSize]),
    B: e => tf.reshape(tf.slice(b, [e, 0, 0], [1, out, rank]), [out, rank]),
  };
}

function expertSlice(w: tf.Tensor3D, e: number): tf.Tensor2D {
  const [, a, b] = w.shape;
  return tf.reshape(tf.slice(w, [e, 0, 0], [1, a, b]), [a, b]);
}

interface ExpertGrads {
  dxe: tf.Tensor2D; dWe: tf.Tensor2D | null; dBiasE: tf.Tensor1D | null; dAe: tf.Tensor2D[]; dBe: tf.Tensor2D[];
}

/** tf.tidy for one expert's gradients (its container has nulls where a gradient is not asked for). */
function tidyExpert(fn: () => ExpertGrads): ExpertGrads {
  return tf.tidy(fn as unknown as () => tf.TensorContainer) as unknown as ExpertGrads;
}

/** y [N, out] = per-expert x·W_eᵀ (+ b_e) (+ Σ s·(x·A_eᵀ)·B_eᵀ). */
export function groupedMatMulForward(
    x: tf.Tensor2D, groupSizes: number[], w: GroupedWeight): tf.Tensor2D {
  return tf.tidy(() => {
    const adapters = w.lora.map(f => expertFactors(f, groupSizes.length));
    const parts: tf.Tensor2D[] = [];
    let offset = 0;
    groupSizes.forEach((n, e) => {
      if (n === 0) return;
      const start = offset;
      offset += n;
      // one expert's weight slice (a copy on most backends) lives only inside its own scope
      parts.push(tf.tidy(() => {
        const xe = tf.slice(x, [start, 0], [n, -1]);                                        // [n, in]
        let ye: tf.Tensor = tf.matMul(xe, expertSlice(w.weight, e), false, !w.transposed);  // [n, out]
        if (w.bias) ye = tf.add(ye, tf.slice(w.bias, [e, 0], [1, -1]));
        for (const f of adapters) {
          const u = tf.mul(tf.matMul(xe, f.A(e), false, true), f.scaling);                  // [n, r]
          ye = tf.add(ye, tf.matMul(u, f.B(e), false, true));
        }
        return ye as tf.Tensor2D;
      }));
    });
    return parts.length === 1 ? parts[0] : tf.concat(parts, 0);
  });
}

/**
 * Gradients of groupedMatMulForward for the cotangent dy [N, out]: dx always, the adapters' dA/dB
 * always, dW (and db) only when `weightGrads`; experts with no rows get zeros.
 */
export function groupedMatMulBackward(
    dy: tf.Tensor2D, x: tf.Tensor2D, groupSizes: number[], w: GroupedWeight,
    weightGrads: boolean): GroupedGrads {
  return tf.tidy(() => {
    const numExperts = groupSizes.length;
    const adapters = w.lora.map(f => expertFactors(f, numExperts));
    const [, wa, wb] = w.weight.shape;
    const inSize = x.shape[1];
    const outSize = dy.shape[1];
    const dxParts: tf.Tensor2D[] = [];
    const dW: tf.Tensor2D[] = [];
    const dBias: tf.Tensor1D[] = [];
    const dA: tf.Tensor2D[][] = adapters.map(() => []);
    const dB: tf.Tensor2D[][] = adapters.map(() => []);
    let offset = 0;
    groupSizes.forEach((n, e) => {
      if (n === 0) {
        if (weightGrads) {
          dW.push(tf.zeros([wa, wb]));
          if (w.bias) dBias.push(tf.zeros([outSize]));
        }
        adapters.forEach((f, i) => {
          dA[i].push(tf.zeros([f.rank, inSize]));
          dB[i].push(tf.zeros([outSize, f.rank]));
        });
        return;
      }
      const start = offset;
      offset += n;
      const g = tidyExpert(() => {
        const xe = tf.slice(x, [start, 0], [n, -1]);     // [n, in]
        const dye = tf.slice(dy, [start, 0], [n, -1]);   // [n, out]
        let dxe: tf.Tensor = tf.matMul(dye, expertSlice(w.weight, e), false, w.transposed);  // [n, in]
        const dWe = weightGrads ? (w.transposed ? tf.matMul(xe, dye, true, false) : tf.matMul(dye, xe, true, false)) : null;
        const dBiasE = weightGrads && w.bias ? tf.sum(dye, 0) : null;
        const dAe: tf.Tensor2D[] = [];
        const dBe: tf.Tensor2D[] = [];
        for (const f of adapters) {
          const a = f.A(e);                                                    // [r, in]
          const gr = tf.mul(tf.matMul(dye, f.B(e)), f.scaling);                // [n, r]
          dxe = tf.add(dxe, tf.matMul(gr, a));
          dAe.push(tf.matMul(gr, xe, true, false));                            // [r, in]
          const u = tf.mul(tf.matMul(xe, a, false, true), f.scaling);          // [n, r]
          dBe.push(tf.matMul(dye, u, true, false));                            // [out, r]
        }
        return { dxe: dxe as tf.Tensor2D, dWe: dWe as tf.Tensor2D | null, dBiasE: dBiasE as tf.Tensor1D | null, dAe, dBe };
      });
      dxParts.push(g.dxe);
      if (g.dWe) dW.push(g.dWe);
      if (g.dBiasE) dBias.push(g.dBiasE);
      g.dAe.forEach((t, i) => dA[i].push(t));
      g.dBe.forEach((t, i) => dB[i].push(t));
    });
    const grads: GroupedGrads = {
      dx: dxParts.length === 1 ? dxParts[0] : tf.concat(dxParts, 0),
      dA: dA.map(parts => tf.concat(parts, 0)),
      dB: dB.map((parts, i) => tf.reshape(tf.stack(parts, 2), [outSize, adapters[i].rank * numExperts])),
    };
    if (weightGrads) {
      grads.dWeight = tf.stack(dW, 0) as tf.Tensor3D;
      if (w.bias) grads.dBias = tf.stack(dBias, 0) as tf.Tensor2D;
    }
    return grads as unknown as tf.TensorContainer;
  }) as unknown as GroupedGrads;
}
