/**
 * The fused experts' building blocks as tfjs kernels: grouped products over expert-sorted rows
 * (with the token gather folded into the product), the grouped weight gradient, the activation
 * and its backward with the routing weight folded in, the weighted combine back to tokens and the
 * per-pair row dot of the routing-weight gradient.
 *
 * cpu and wasm register JS kernels for them (src/backends/{cpu,wasm}/moe_kernels.ts): no
 * per-expert slice copies, no transposed products on wasm (its transposed matMul is 10-50x slower
 * than its untransposed one), no split/concat. Any other backend runs the stock-op composition
 * below, which computes the same thing. All of them are forward-only: the fused ops call them
 * inside their own custom gradients.
 */
import * as tf from '@tensorflow/tfjs-core';
import { isPackedExpertWeight, packedExpertGroup, type ExpertWeightTensor, type PackedKind } from '../packed.js';
import type { ExpertActivation } from '../types.js';
import { activationBackward, activationForward } from './activation.js';

export const GROUPED_MATMUL = 'MoEGroupedMatMul';
export const GROUPED_WEIGHT_GRAD = 'MoEGroupedWeightGrad';
export const EXPERT_ACTIVATION = 'MoEExpertActivation';
export const EXPERT_ACTIVATION_GRAD = 'MoEExpertActivationGrad';
export const COMBINE_ROWS = 'MoECombineRows';
export const PAIR_ROW_DOT = 'MoEPairRowDot';

export const MOE_KERNEL_NAMES = [
  GROUPED_MATMUL, GROUPED_WEIGHT_GRAD, EXPERT_ACTIVATION, EXPERT_ACTIVATION_GRAD, COMBINE_ROWS, PAIR_ROW_DOT,
] as const;

/**
 * MoEGroupedMatMul: inputs x [R, k], w [E, p, q], rows? int32 [N], bias? [E, m], addTo? [N, m];
 * out [N, m] with rows [o_e, o_e + n_e) = alpha·X_e·op(W_e) (+ bias[e]) (+ addTo's rows), where
 * X_e are the rows rows[o_e …] of x (or x's own rows o_e … without `rows`) and op(W_e) = W_e
 * (k = p, m = q) or W_eᵀ when transposeW (k = q, m = p). With `packed` a PackedKind (16-bit or
 * quantized), w is the int32 tensor of a PackedExpertWeight of logical shape `wShape` [E, p, q]
 * (src/ops/packed.ts, src/ops/quantized.ts), decoded by the kernel one expert at a time.
 */
export interface GroupedMatMulAttrs {
  groupSizes: number[];
  transposeW: boolean;
  alpha: number;
  packed: PackedKind | 'none';
  /** the logical [E, p, q] of w (its own shape unless packed) */
  wShape: number[];
  /** a quantized w's input axis (1 or 2) and group size (src/ops/quantized.ts); 2 and 0 otherwise */
  inputAxis: 1 | 2;
  groupSize: number;
  /**
   * w is a frozen base whose values stay the same from step to step (packed weights always are):
   * a backend may keep per-expert forms of it across calls (wasm keeps XNNPACK's packed copy)
   */
  frozenW: boolean;
}

/** MoEGroupedWeightGrad: inputs a [Ra, p], b [Rb, q], aRows?, bRows?; out [E, p, q] = Σ_{rows of e} aᵀ·b. */
export interface GroupedWeightGradAttrs {
  groupSizes: number[];
}

/** MoEExpertActivation(h [N, 2I], scale? [N]) → a [N, I] (and a·scale); the Grad takes h, da, scale? → dh. */
export interface ExpertActivationAttrs {
  clamped: boolean;
  alpha: number;
  limit: number;
  interleaved: boolean;
}

/** MoECombineRows(y [N, C], rowOfPair [T·K], weights? [T, K]) → [T, C]; MoEPairRowDot(a, b, rowOfPair) → [T, K]. */
export interface PairAttrs {
  numTokens: number;
  topK: number;
}

function hasKernel(name: string): boolean {
  return tf.getKernel(name, tf.getBackend()) != null;
}

function run<T extends tf.Tensor | tf.Tensor[]>(
    name: string, inputs: Record<string, tf.Tensor | undefined>, attrs: object): T {
  const present: tf.NamedTensorMap = {};
  for (const [key, t] of Object.entries(inputs)) if (t !== undefined) present[key] = t;
  return tf.engine().runKernel(name, present, attrs as unknown as tf.NamedAttrMap) as unknown as T;
}

/** Expert-sorted rows: a tensor's own rows, or its rows picked through an index (a fused gather). */
export interface Rows {
  t: tf.Tensor2D;
  /** int32 [N]: row r of the operand is t[index[r]] */
  index?: tf.Tensor1D;
}

function gathered(r: Rows): tf.Tensor2D {
  return r.index ? tf.gather(r.t, r.index) : r.t;
}

function expertSlice(w: ExpertWeightTensor, e: number): tf.Tensor2D {
  if (isPackedExpertWeight(w)) return packedExpertGroup(w, e);  // one expert group decoded
  const [, a, b] = w.shape;
  return tf.reshape(tf.slice(w, [e, 0, 0], [1, a, b]), [a, b]);
}

/** What groupedProduct adds to the plain product. */
export interface GroupedProductOptions {
  /** [E, m], added to every row of expert e (not scaled by alpha) */
  bias?: tf.Tensor2D;
  /** [N, m], added to the result (saves a separate add of that size) */
  addTo?: tf.Tensor2D;
  /** scales the product (default 1) */
  alpha?: number;
  /** w is a frozen base, the same tensor step after step (see GroupedMatMulAttrs.frozenW) */
  frozenW?: boolean;
}

/**
 * Per expert e, alpha·X_e·W_e (or alpha·X_e·W_eᵀ with `transposeW`) over its rows, plus bias[e],
 * plus `addTo`; [N, m]. `w` may be packed (bf16/f16): the kernels decode one expert at a time,
 * the composition one expert group at a time (through the host).
 *
 * ```js
 * // rows 0-2 through expert 0, rows 3-4 through expert 2
 * groupedProduct({t: x}, w, [3, 0, 2], true);
 * ```
 */
export function groupedProduct(
    x: Rows, w: ExpertWeightTensor, groupSizes: number[], transposeW: boolean,
    options: GroupedProductOptions = {}): tf.Tensor2D {
  const { bias, addTo } = options;
  const alpha = options.alpha ?? 1;
  if (hasKernel(GROUPED_MATMUL)) {
    const packed = isPackedExpertWeight(w);
    const attrs: GroupedMatMulAttrs = {
      groupSizes, transposeW, alpha, packed: packed ? w.kind : 'none', wShape: [...w.shape],
      inputAxis: packed ? w.inputAxis : 2, groupSize: packed ? w.groupSize ?? 0 : 0,
      frozenW: packed || options.frozenW === true,
    };
    return run(GROUPED_MATMUL, { x: x.t, w: packed ? w.packed : w, rows: x.index, bias, addTo }, attrs);
  }
  return tf.tidy(() => {
    const xs = gathered(x);
    const parts: tf.Tensor2D[] = [];
    let offset = 0;
    groupSizes.forEach((n, e) => {
      if (n === 0) return;
      let ye: tf.Tensor2D = tf.matMul(tf.slice(xs, [offset, 0], [n, -1]), expertSlice(w, e), false, transposeW);
      if (alpha !== 1) ye = tf.mul(ye, alpha);
      if (bias) ye = tf.add(ye, tf.slice(bias, [e, 0], [1, -1]));
      parts.push(ye);
      offset += n;
    });
    const m = transposeW ? w.shape[1] : w.shape[2];
    const y = parts.length === 0 ? tf.zeros([0, m]) as tf.Tensor2D : parts.length === 1 ? parts[0] : tf.concat(parts, 0);
    return addTo ? tf.add(y, addTo) : y;
  });
}

/** Per expert e, Σ over its rows of a_rᵀ·b_r: [E, p, q] (zeros for an expert with no rows). */
export function groupedWeightGrad(a: Rows, b: Rows, groupSizes: number[]): tf.Tensor3D {
  if (hasKernel(GROUPED_WEIGHT_GRAD)) {
    const attrs: GroupedWeightGradAttrs = { groupSizes };
    return run(GROUPED_WEIGHT_GRAD, { a: a.t, b: b.t, aRows: a.index, bRows: b.index }, attrs);
  }
  return tf.tidy(() => {
    const as = gathered(a);
    const bs = gathered(b);
    const p = as.shape[1];
    const q = bs.shape[1];
    let offset = 0;
    const parts = groupSizes.map(n => {
      if (n === 0) return tf.zeros([p, q]) as tf.Tensor2D;
      const g = tf.matMul(tf.slice(as, [offset, 0], [n, -1]), tf.slice(bs, [offset, 0], [n, -1]), true, false);
      offset += n;
      return g;
    });
    return tf.stack(parts, 0) as tf.Tensor3D;
  });
}

function activationAttrs(activation: ExpertActivation, interleaved: boolean): ExpertActivationAttrs {
  return activation.kind === 'swiglu' ?
    { clamped: false, alpha: 1, limit: 0, interleaved } :
    { clamped: true, alpha: activation.alpha, limit: activation.limit, interleaved };
}

/** a [N, I] = act(h [N, 2I]); with `scale` [N] also a·scale (row-wise), as a second tensor. */
export function expertActivation(
    h: tf.Tensor2D, activation: ExpertActivation, interleaved: boolean): tf.Tensor2D;
export function expertActivation(
    h: tf.Tensor2D, activation: ExpertActivation, interleaved: boolean, scale: tf.Tensor1D): [tf.Tensor2D, tf.Tensor2D];
export function expertActivation(
    h: tf.Tensor2D, activation: ExpertActivation, interleaved: boolean,
    scale?: tf.Tensor1D): tf.Tensor2D | [tf.Tensor2D, tf.Tensor2D] {
  if (hasKernel(EXPERT_ACTIVATION)) {
    const out = run<tf.Tensor[]>(EXPERT_ACTIVATION, { h, scale }, activationAttrs(activation, interleaved));
    return scale ? [out[0] as tf.Tensor2D, out[1] as tf.Tensor2D] : out[0] as tf.Tensor2D;
  }
  const a = activationForward(h, activation, interleaved);
  if (!scale) return a;
  return [a, tf.tidy(() => tf.mul(a, tf.reshape(scale, [-1, 1])) as tf.Tensor2D)];
}

/** dh [N, 2I] from h and da [N, I], the rows of da multiplied by `scale` [N] first when given. */
export function expertActivationGrad(
    h: tf.Tensor2D, da: tf.Tensor2D, activation: ExpertActivation, interleaved: boolean,
    scale?: tf.Tensor1D): tf.Tensor2D {
  if (hasKernel(EXPERT_ACTIVATION_GRAD)) {
    return run(EXPERT_ACTIVATION_GRAD, { h, da, scale }, activationAttrs(activation, interleaved));
  }
  return tf.tidy(() => activationBackward(
      h, scale ? tf.mul(da, tf.reshape(scale, [-1, 1])) as tf.Tensor2D : da, activation, interleaved));
}

/** out [T, C]: out[t] = Σ_k weights[t, k]·y[rowOfPair[t·K + k]] (weights 1 when absent). */
export function combineRows(
    y: tf.Tensor2D, rowOfPair: tf.Tensor1D, numTokens: number, topK: number, weights?: tf.Tensor2D): tf.Tensor2D {
  if (hasKernel(COMBINE_ROWS)) {
    const attrs: PairAttrs = { numTokens, topK };
    return run(COMBINE_ROWS, { y, rowOfPair, weights }, attrs);
  }
  return tf.tidy(() => {
    const cols = y.shape[1];
    let byPair: tf.Tensor = tf.reshape(tf.gather(y, rowOfPair), [numTokens, topK, cols]);  // [T, K, C]
    if (weights) byPair = tf.mul(byPair, tf.reshape(weights, [numTokens, topK, 1]));
    return tf.sum(byPair, 1) as tf.Tensor2D;
  });
}

/** [T, K]: ⟨a[row], b[row]⟩ at row = rowOfPair[t·K + k]. */
export function pairRowDot(
    a: tf.Tensor2D, b: tf.Tensor2D, rowOfPair: tf.Tensor1D, numTokens: number, topK: number): tf.Tensor2D {
  if (hasKernel(PAIR_ROW_DOT)) {
    const attrs: PairAttrs = { numTokens, topK };
    return run(PAIR_ROW_DOT, { a, b, rowOfPair }, attrs);
  }
  return tf.tidy(() => tf.reshape(tf.gather(tf.sum(tf.mul(a, b), 1), rowOfPair), [numTokens, topK]) as tf.Tensor2D);
}
