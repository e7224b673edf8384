/**
 * Batched products of equal groups as one kernel where a backend has one: the composed attention
 * (attention_core.ts) multiplies per KV head scores = q·kᵀ, value = P·v and backward dV = Pᵀ·dO,
 * dP = dO·vᵀ, dQ = dS·k, dK = dSᵀ·q, [Nkv] products of rep·S rows each. webgpu's kernel runs them
 * on tensor cores (SubgroupMatrixMatMulProgram / SubgroupMatrixWeightGradProgram with uniform
 * groups: no plan, nothing uploaded per call) where they are on and the shape fits, else tfjs's
 * BatchMatMul; every other backend tf.matMul (the reference).
 *
 * No gradient of its own: with the tape on (a caller taking gradients through it) it is tf.matMul.
 * The attention's composed path calls it inside its customGrad's forward and backward, where the
 * tape is off.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor3D } from '@tensorflow/tfjs-core';
import { assertOneOf, assertTensor, fail } from './validate.js';

/**
 * MoEBatchProduct: inputs a and b, 3-D float32 with the same batch; attrs BatchProductAttrs;
 * output per batch b op(a_b)·op(b_b) [B, M, N] (op: transposed where the attribute says), summed in
 * float32 from operands a backend may round to f16 (tensor cores: ≤ 1e-2 relative to float32, issue 13).
 */
export const BATCH_PRODUCT = 'MoEBatchProduct';

/** Which operand holds gradients, scaled into f16's range on tensor cores (amax), or none. */
export const BATCH_PRODUCT_GRADIENT_OPERANDS = ['none', 'a', 'b'] as const;
export type BatchProductGradientOperand = typeof BATCH_PRODUCT_GRADIENT_OPERANDS[number];

/** MoEBatchProduct's attributes. */
export interface BatchProductAttrs {
  transposeA: boolean;
  transposeB: boolean;
  gradient: BatchProductGradientOperand;
}

/**
 * tf.matMul(a, b, transposeA, transposeB) for 3-D a and b of one batch, in one MoEBatchProduct
 * kernel where the backend registers one and the tape is off. `gradient` names the operand that
 * holds gradients (dO, dS): a backend computing in f16 scales it into range first.
 *
 * ```js
 * const scores = batchProduct(q, k, false, true);           // q [B, M, K], k [B, N, K] → [B, M, N]
 * const dV = batchProduct(p, dO, true, false, 'b');         // p [B, G, L], dO [B, G, D] → [B, L, D]
 * ```
 */
export function batchProduct(a: Tensor3D, b: Tensor3D, transposeA = false, transposeB = false,
    gradient: BatchProductGradientOperand = 'none'): Tensor3D {
  const op = 'batchProduct';
  assertTensor(op, 'a', a, 3);
  assertTensor(op, 'b', b, 3);
  assertOneOf(op, 'gradient', gradient, BATCH_PRODUCT_GRADIENT_OPERANDS);
  const shapes = `a [${a.shape}]${transposeA ? 'ᵀ' : ''}, b [${b.shape}]${transposeB ? 'ᵀ' : ''}`;
  if (a.shape[0] !== b.shape[0]) fail(op, `'b' must have a's batch ${a.shape[0]} but got ${b.shape[0]} (${shapes})`);
  const innerA = transposeA ? a.shape[1] : a.shape[2];
  const innerB = transposeB ? b.shape[2] : b.shape[1];
  if (innerA !== innerB) fail(op, `the inner sizes must agree but a gives ${innerA} and b ${innerB} (${shapes})`);
  if (tf.engine().isTapeOn() || tf.getKernel(BATCH_PRODUCT, tf.getBackend()) == null) {
    return tf.matMul(a, b, transposeA, transposeB);
  }
  const attrs: BatchProductAttrs = { transposeA, transposeB, gradient };
  return tf.engine().runKernel(BATCH_PRODUCT, { a, b }, attrs as unknown as tf.NamedAttrMap) as Tensor3D;
}
