/**
 * Shared experts: a dense SwiGLU MLP every token goes through, added to the routed output.
 * Plain autodiff ops (2-D products); both the fused and the reference block use it as is.
 * LoRA on its projections is applied as extra thin products, never by forming W + ΔW.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { LoRAFactors, SharedExpertWeights } from './types.js';
import { checkLoRADropout, droppedInput } from './lora/dropout.js';
import { assertFiniteNumber, assertShape, assertTensor, fail } from './validate.js';

const PROJECTIONS = ['gate', 'up', 'down', 'sigmoidGate'] as const;

/** One plain 2-D adapter on W [out, in]: A [r, in], B [out, r], scaling finite. */
function checkDenseFactors(op: string, prefix: string, f: unknown, out: number, inSize: number, weight: string): void {
  if (f == null || typeof f !== 'object' || Array.isArray(f)) {
    const got = f === null ? 'null' : Array.isArray(f) ? 'an array' : `${String(f)} (${typeof f})`;
    fail(op, `'${prefix}' must be a LoRAFactors object {A, B, scaling} but got ${got}`);
  }
  const { A, B, scaling } = f as LoRAFactors;
  assertTensor(op, `${prefix}.A`, A, 2);
  const r = A.shape[0];
  if (r === 0) fail(op, `'${prefix}.A' must have r >= 1 rows but got shape [${A.shape}]`);
  assertShape(op, `${prefix}.A`, A, [r, inSize], `[r, in] with in = ${inSize} from ${weight}`);
  assertTensor(op, `${prefix}.B`, B, 2);
  assertShape(op, `${prefix}.B`, B, [out, r], `[out, r] with out = ${out} from ${weight} and r = ${r} from '${prefix}.A' [${A.shape}]`);
  assertFiniteNumber(op, `${prefix}.scaling`, scaling);
  checkLoRADropout(op, `${prefix}.`, (f as LoRAFactors).dropout);
}

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
  const lora = shared.lora;
  if (lora === undefined) return;
  if (lora === null || typeof lora !== 'object' || Array.isArray(lora)) {
    fail(op, `'weights.shared.lora' must be an object {gate?, up?, down?, sigmoidGate?} of LoRAFactors lists but got ` +
        `${lora === null ? 'null' : Array.isArray(lora) ? 'an array' : typeof lora}`);
  }
  const unknown = Object.keys(lora).filter(k => !(PROJECTIONS as readonly string[]).includes(k));
  if (unknown.length > 0) {
    fail(op, `'weights.shared.lora' may only have keys 'gate', 'up', 'down', 'sigmoidGate' but got '${unknown.join("', '")}'`);
  }
  if (lora.sigmoidGate !== undefined && shared.sigmoidGate === undefined) {
    fail(op, "'weights.shared.lora.sigmoidGate' adapts the shared expert's sigmoid gate but 'weights.shared.sigmoidGate' is absent");
  }
  for (const p of PROJECTIONS) {
    const list = lora[p];
    if (list === undefined) continue;
    if (!Array.isArray(list)) {
      fail(op, `'weights.shared.lora.${p}' must be an array of LoRAFactors but got ${list === null ? 'null' : typeof list}`);
    }
    const w = shared[p]!;
    list.forEach((f, i) => checkDenseFactors(op, `weights.shared.lora.${p}[${i}]`, f, w.shape[0], w.shape[1],
        `weights.shared.${p} [${w.shape}]`));
  }
}

/**
 * x·Wᵀ + Σ s·(dropout(x)·Aᵀ)·Bᵀ for W [out, in]: each adapter adds two thin products, on its own
 * dropped copy of x when it has dropout (as PEFT's lora.Linear). x [T, in] → [T, out]
 */
function projection(x: tf.Tensor2D, w: tf.Tensor2D, lora: LoRAFactors[] | undefined): tf.Tensor2D {
  let y: tf.Tensor2D = tf.matMul(x, w, false, true);                        // [T, out]
  for (const f of lora ?? []) {
    const { A, B, scaling } = f;
    const low = tf.mul(tf.matMul(droppedInput(x, f), A, false, true), scaling);  // [T, r]
    y = tf.add(y, tf.matMul(low, B, false, true));                           // [T, out]
  }
  return y;
}

/**
 * down(silu(x·gateᵀ) · (x·upᵀ)), times sigmoid(x·sigmoidGateᵀ) when present (Qwen2-MoE), with
 * each projection's active LoRA adapters (the sigmoid gate's too) added as s·(x·Aᵀ)·Bᵀ. x [T, H] → [T, H]
 *
 * ```js
 * const out = sharedExpert(x, {gate, up, down, lora: {down: [{A, B, scaling: 2}]}});
 * ```
 */
export function sharedExpert(x: tf.Tensor2D, shared: SharedExpertWeights): tf.Tensor2D {
  assertTensor('sharedExpert', 'x', x, 2);
  if (shared == null || typeof shared !== 'object') {
    fail('sharedExpert', `'shared' must be SharedExpertWeights {gate, up, down, sigmoidGate?, lora?} but got ${String(shared)}`);
  }
  checkSharedExpert('sharedExpert', shared, x.shape[1]);
  return tf.tidy((): tf.Tensor2D => {
    const gate = projection(x, shared.gate, shared.lora?.gate);              // [T, I_s]
    const up = projection(x, shared.up, shared.lora?.up);                    // [T, I_s]
    const h = tf.mul(tf.mul(gate, tf.sigmoid(gate)), up) as tf.Tensor2D;
    const out = projection(h, shared.down, shared.lora?.down);               // [T, H]
    if (!shared.sigmoidGate) return out;
    const gateLogit = projection(x, shared.sigmoidGate, shared.lora?.sigmoidGate);  // [T, 1]
    return tf.mul(out, tf.sigmoid(gateLogit)) as tf.Tensor2D;
  });
}
