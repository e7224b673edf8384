/**
 * Shared experts: a dense SwiGLU MLP every token goes through, added to the routed output.
 * Plain autodiff ops (2-D products); both the fused and the reference block use it as is.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { SharedExpertWeights } from './types.js';
import { assertShape, assertTensor } from './validate.js';

export function checkSharedExpert(op: string, shared: SharedExpertWeights, hidden: number): void {
  assertTensor(op, 'weights.shared.gate', shared.gate, 2);
  const inter = shared.gate.shape[0];
  assertShape(op, 'weights.shared.gate', shared.gate, [inter, hidden], `H = ${hidden}`);
  assertTensor(op, 'weights.shared.up', shared.up, 2);
  assertShape(op, 'weights.shared.up', shared.up, [inter, hidden], `gate is [${shared.gate.shape}]`);
  assertTensor(op, 'weights.shared.down', shared.down, 2);
  assertShape(op, 'weights.shared.down', shared.down, [hidden, inter], `gate is [${shared.gate.shape}]`);
  if (shared.sigmoidGate !== undefined) {
    assertTensor(op, 'weights.shared.sigmoidGate', shared.sigmoidGate, 2);
    assertShape(op, 'weights.shared.sigmoidGate', shared.sigmoidGate, [1, hidden], `H = ${hidden}`);
  }
}

/** down(silu(x·gateᵀ) · (x·upᵀ)), times sigmoid(x·sigmoidGateᵀ) when present (Qwen2-MoE). x [T, H] → [T, H] */
export function sharedExpert(x: tf.Tensor2D, shared: SharedExpertWeights): tf.Tensor2D {
  return tf.tidy((): tf.Tensor2D => {
    const gate = tf.matMul(x, shared.gate, false, true);                     // [T, I_s]
    const up = tf.matMul(x, shared.up, false, true);                         // [T, I_s]
    const h = tf.mul(tf.mul(gate, tf.sigmoid(gate)), up);
    const out = tf.matMul(h, shared.down, false, true) as tf.Tensor2D;       // [T, H]
    if (!shared.sigmoidGate) return out;
    return tf.mul(out, tf.sigmoid(tf.matMul(x, shared.sigmoidGate, false, true))) as tf.Tensor2D;  // [T, 1] gate
  });
}
