/**
 * Constants of one forward pass, built once and shared by its layers. Every attention layer of a
 * pass builds the same causal mask and rotary tables, and every norm and LoRA branch turns the same
 * JS numbers (ε, the LoRA scaling) into scalar tensors: each a host computation and, on webgpu, an
 * upload (a buffer created and mapped). In a V8 profile of a training step on an H100 (OLMoE-1B-7B,
 * docs/benchmarks.md run G) these uploads took 82 ms of a 620 ms step. A pass is what
 * `withSequenceContext` runs (batchLoss, generate) and, when none is open, a model's own top-level
 * call (`model.apply`, `predict`: passPerCall, src/layers/sequence_context.ts); outside one nothing
 * is shared.
 */
import * as tf from '@tensorflow/tfjs-core';

/** per active pass, its constants by key, disposed when the pass ends */
const passes: Map<string, { value: unknown; tensors: tf.Tensor[] }>[] = [];

/** Runs `fn` as a pass: the constants built during it are disposed when it returns. Passes nest. */
export function withPassConstants<T>(fn: () => T): T {
  passes.push(new Map());
  try {
    return fn();
  } finally {
    for (const { tensors } of passes.pop()!.values()) tf.dispose(tensors);
  }
}

/** Whether a pass is running (withPassConstants, withSequenceContext): passConstant then shares. */
export function insidePass(): boolean {
  return passes.length > 0;
}

/**
 * A constant of the current pass: `build` runs on the first request for `key` in the innermost
 * pass, later requests get the same tensors, and they are disposed when that pass returns (what a
 * backward pass needs of them, the tape or a customGrad's save keeps by its own references). Outside
 * a pass `build` runs every time and the caller owns the result, as without this. `key` must name
 * everything the tensors depend on. Build outside a customGrad's forward: a tensor that outlives a
 * kernel is what tfjs's leak check (IS_TEST) reports.
 *
 * ```js
 * const mask = passConstant(`causalMask/${s}`, () => causalMask(s, null));
 * ```
 */
export function passConstant<T extends tf.Tensor | Record<string, tf.Tensor>>(key: string, build: () => T): T {
  const shared = passes.at(-1);
  if (shared === undefined) return build();
  const held = shared.get(key);
  if (held !== undefined) return held.value as T;
  const value = build();
  const tensors = value instanceof tf.Tensor ? [value] : Object.values(value);
  for (const t of tensors) tf.keep(t);
  shared.set(key, { value, tensors });
  return value;
}

/**
 * `value` as an operand of tfjs ops: inside a pass one shared scalar tensor per value, outside
 * the number itself (tfjs makes a scalar of it, owned by the op, as without this).
 *
 * ```js
 * const y = tf.add(variance, passScalar(1e-6));
 * ```
 */
export function passScalar(value: number): tf.Scalar | number {
  return !insidePass() ? value : passConstant(`scalar/${Object.is(value, -0) ? '-0' : value}`, () => tf.scalar(value));
}
