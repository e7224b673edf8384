/**
 * Grouped products over expert-sorted rows: rows [offset_e, offset_e + n_e) go through expert e.
 * One product per non-empty expert, no dense all-experts compute. The forward/backward pair is
 * shared by the fused experts op and the split-LoRA op, which wrap it in their own customGrad.
 *
 * Every product is a grouped kernel call (./kernels.ts) whose weight operand is used untransposed
 * or transposed as the layout asks; the kernels turn each into an untransposed product on the
 * backends where only that one is fast. Operands may be given through a row index (`Rows`), which
 * the kernels fold into the product instead of materializing the gathered rows.
 *
 * LoRA adapters on the weight are applied split: y = x·W_eᵀ + s·(x·A_eᵀ)·B_eᵀ, so W_eff is never
 * built and the base weight gets a gradient only when asked for. An adapter with a dropout mask
 * (rows in the same order as x) reads (x ⊙ mask) as its branch input, PEFT's lora_dropout: the
 * base product still sees x, and the branch's part of dx is multiplied by the mask.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expertFactorA, expertFactorB, peftLayoutA, peftLayoutB } from '../lora/layout.js';
import type { ExpertWeightTensor } from '../packed.js';
import type { LoRAFactors } from '../types.js';
import { groupedProduct, groupedWeightGrad, type Rows } from './kernels.js';

export interface GroupedWeight {
  /** [E, out, in], or [E, in, out] when `transposed` (gpt-oss); packed only when frozen */
  weight: ExpertWeightTensor;
  transposed: boolean;
  /** [E, out] */
  bias?: tf.Tensor2D;
  /** split adapters: A [r·E, in] expert-major rows, B [out, r·E] rank-major columns */
  lora: GroupedLoRA[];
  /** `weight` is a frozen base, the same tensor from step to step (kernels may cache forms of it) */
  frozen?: boolean;
}

/** A split adapter of a grouped weight; `rowMask` is its dropout mask [N, in] in the rows' order. */
export interface GroupedLoRA extends LoRAFactors {
  rowMask?: tf.Tensor2D;
}

/** The adapter's branch input: the rows themselves, or the gathered rows times the dropout mask. */
function branchRows(x: Rows, l: GroupedLoRA): Rows {
  if (l.rowMask === undefined) return x;
  return { t: tf.mul(x.index ? tf.gather(x.t, x.index) : x.t, l.rowMask) as tf.Tensor2D };
}

export interface GroupedGrads {
  dx: tf.Tensor2D;                 // [N, in]
  dWeight?: tf.Tensor3D;           // like `weight`, when asked for
  dBias?: tf.Tensor2D;             // [E, out], when asked for and there is a bias
  dA: tf.Tensor2D[];               // per adapter, [r·E, in]
  dB: tf.Tensor2D[];               // per adapter, [out, r·E]
}

/** One adapter's factors as per-expert 3-D weights: A [E, r, in] (a reshape), B [E, out, r]. */
interface ExpertFactors {
  a: tf.Tensor3D;
  b: tf.Tensor3D;
  scaling: number;
}

function expertFactors(f: LoRAFactors, numExperts: number): ExpertFactors {
  return { a: expertFactorA(f.A, numExperts), b: expertFactorB(f.B, numExperts), scaling: f.scaling };
}

/** x·W_eᵀ over each group ('outIn' W [E, out, in]), x·W_e for the transposed layout. */
function baseProduct(x: Rows, groupSizes: number[], w: GroupedWeight): tf.Tensor2D {
  return groupedProduct(x, w.weight, groupSizes, !w.transposed, { bias: w.bias, frozenW: w.frozen });
}

/** u [N, r] = s·x·A_eᵀ per group: the adapter's low-rank activations. */
function loraDown(x: Rows, groupSizes: number[], f: ExpertFactors): tf.Tensor2D {
  return groupedProduct(x, f.a, groupSizes, true, { alpha: f.scaling });
}

/**
 * Forward through the grouped weight for expert-sorted rows given through `x` (possibly an
 * index into another tensor): y [N, out] = per-expert x·W_eᵀ (+ b_e) (+ Σ s·(x·A_eᵀ)·B_eᵀ).
 */
export function groupedRowsForward(x: Rows, groupSizes: number[], w: GroupedWeight): tf.Tensor2D {
  const { y, loraDown } = groupedRowsForwardWithLoRADown(x, groupSizes, w);
  tf.dispose(loraDown);
  return y;
}

/**
 * groupedRowsForward that also returns each adapter's low-rank activations u = s·x·A_eᵀ [N, r]
 * (adapter order). Backward needs them for dB; passed back to groupedRowsBackward they spare it
 * a second pass over x's rows (a gather of [N, in] and a product) for N·r floats kept.
 */
export function groupedRowsForwardWithLoRADown(
    x: Rows, groupSizes: number[], w: GroupedWeight): { y: tf.Tensor2D; loraDown: tf.Tensor2D[] } {
  return tf.tidy(() => {
    let y = baseProduct(x, groupSizes, w);                                      // [N, out]
    const kept: tf.Tensor2D[] = [];
    for (const l of w.lora) {
      const f = expertFactors(l, groupSizes.length);
      const u = loraDown(branchRows(x, l), groupSizes, f);                      // [N, r]
      kept.push(u);
      y = groupedProduct({ t: u }, f.b, groupSizes, true, { addTo: y });
    }
    return { y, loraDown: kept };
  });
}

/** What groupedRowsBackward computes besides dx. */
export interface GroupedBackwardOptions {
  /** dW (the base weight's gradient) */
  weight: boolean;
  /** db = Σ_rows dy per expert, when there is a bias */
  bias: boolean;
  /** the adapters' u = s·x·A_eᵀ from groupedRowsForwardWithLoRADown, for these x (else recomputed) */
  loraDown?: tf.Tensor2D[];
}

/**
 * Gradients of groupedRowsForward for the cotangent rows dy [N, out] (possibly through an index):
 * dx always, the adapters' dA/dB always, dW and db when asked for; experts with no rows get zeros.
 */
export function groupedRowsBackward(
    dy: Rows, x: Rows, groupSizes: number[], w: GroupedWeight, options: GroupedBackwardOptions): GroupedGrads {
  return tf.tidy(() => {
    const numExperts = groupSizes.length;
    // dx = dy·W_e ('outIn'), dy·W_eᵀ (transposed)
    let dx = groupedProduct(dy, w.weight, groupSizes, w.transposed, { frozenW: w.frozen });  // [N, in]
    const dA: tf.Tensor2D[] = [];
    const dB: tf.Tensor2D[] = [];
    w.lora.forEach((l, i) => {
      const f = expertFactors(l, numExperts);
      const xb = branchRows(x, l);                                              // dropout(x)
      const gr = groupedProduct(dy, f.b, groupSizes, false, { alpha: f.scaling });  // [N, r]
      dx = l.rowMask === undefined ? groupedProduct({ t: gr }, f.a, groupSizes, false, { addTo: dx }) :
        tf.add(dx, tf.mul(groupedProduct({ t: gr }, f.a, groupSizes, false), l.rowMask)) as tf.Tensor2D;
      dA.push(peftLayoutA(groupedWeightGrad({ t: gr }, xb, groupSizes)));      // [r·E, in]
      const u = options.loraDown?.[i] ?? loraDown(xb, groupSizes, f);           // [N, r]
      dB.push(peftLayoutB(groupedWeightGrad(dy, { t: u }, groupSizes)));       // [out, r·E]
    });
    const grads: GroupedGrads = { dx, dA, dB };
    if (options.weight) {
      grads.dWeight = w.transposed ? groupedWeightGrad(x, dy, groupSizes) : groupedWeightGrad(dy, x, groupSizes);
    }
    if (options.bias && w.bias) {
      const ones = tf.ones([dx.shape[0], 1]) as tf.Tensor2D;
      grads.dBias = tf.reshape(groupedWeightGrad({ t: ones }, dy, groupSizes), [numExperts, -1]);  // [E, out]
    }
    return grads as unknown as tf.TensorContainer;
  }) as unknown as GroupedGrads;
}

/** y [N, out] = per-expert x·W_eᵀ (+ b_e) (+ Σ s·(x·A_eᵀ)·B_eᵀ) for expert-sorted rows x [N, in]. */
export function groupedMatMulForward(
    x: tf.Tensor2D, groupSizes: number[], w: GroupedWeight): tf.Tensor2D {
  return groupedRowsForward({ t: x }, groupSizes, w);
}

/**
 * Gradients of groupedMatMulForward for the cotangent dy [N, out]: dx always, the adapters' dA/dB
 * always, dW (and db) only when `weightGrads`; experts with no rows get zeros.
 */
export function groupedMatMulBackward(
    dy: tf.Tensor2D, x: tf.Tensor2D, groupSizes: number[], w: GroupedWeight,
    weightGrads: boolean): GroupedGrads {
  return groupedRowsBackward({ t: dy }, { t: x }, groupSizes, w, { weight: weightGrads, bias: weightGrads });
}
