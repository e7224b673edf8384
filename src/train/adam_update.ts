/**
 * One Adam update of one variable (torch.optim.Adam's, see optimizer.ts) as one op. Composed from
 * tfjs ops it is about a dozen small kernels per variable: with LoRA on every expert, router and
 * attention projection of a 16-layer model (224 variables) that is ~3000 GPU dispatches a step,
 * each recorded by the host, which is what webgpu's training step spent much of its time on (issue
 * 15). A backend may register MoEAdamUpdate to do it in one pass over the elements (webgpu: one
 * program per output); elsewhere the composed ops run, so cpu and wasm compute exactly what they
 * always did.
 */
import * as tf from '@tensorflow/tfjs-core';
import { assertFiniteNumber, assertTensor, fail } from '../ops/validate.js';
import { describeValue } from '../util/describe.js';

/**
 * MoEAdamUpdate: inputs param, grad (float32, one shape) and moments (float32, [2, ...that shape]:
 * m then v), and optionally gradScale (a float32 scalar); outputs [param', moments']. The moments
 * travel as one tensor so that a backend can write them in one program: two programs per variable
 * instead of three (issue 15). A backend's kernel must compute, in float32 and in this order, with
 * g = grad·gradScale where gradScale is given (else grad):
 *   m' = m·β1 + g·(1 − β1);  v' = v·β2 + g²·(1 − β2);
 *   param' = param − (m' / (√v' / correction2Sqrt + ε)) · stepSize
 * and where gradScale is 0, param' = param and moments' = moments (the step skipped).
 */
export const ADAM_UPDATE = 'MoEAdamUpdate';

/**
 * tf.env() flag: false runs the composed ops even where MoEAdamUpdate is registered (to compare
 * the two, or count what the kernel saves: bench/e2e/profile_narrow.ts --composed-adam on).
 */
export const ADAM_UPDATE_KERNEL_FLAG = 'MOE_ADAM_UPDATE_KERNEL';
tf.env().registerFlag(ADAM_UPDATE_KERNEL_FLAG, () => true);

/** The scalars of one step (the same for every variable of the step). */
export interface AdamUpdateAttrs {
  beta1: number;
  beta2: number;
  epsilon: number;
  /** √(1 − β2^t) */
  correction2Sqrt: number;
  /** lr / (1 − β1^t) */
  stepSize: number;
}

/** The two new tensors of one update (the caller owns them). */
export interface AdamUpdated {
  param: tf.Tensor;
  /** [2, ...param's shape]: m' then v' */
  moments: tf.Tensor;
}

/**
 * The new value and moments of one variable after one Adam step (the variable is not assigned).
 * `moments` is [2, ...param's shape]: the first moment m, then the second v. `gradScale`, a float32
 * scalar on the device, multiplies the gradient (gradient clipping's coefficient); 0 gives param
 * and moments back unchanged, so that the training loop can skip a step whose loss or norm is not
 * finite without reading them first (stepGradientScale, optimizer.ts).
 *
 * ```js
 * const {param, moments} = adamUpdate(w, g, tf.zeros([2, ...w.shape]), {beta1: 0.9, beta2: 0.999,
 *   epsilon: 1e-8, correction2Sqrt: Math.sqrt(1 - 0.999), stepSize: 1e-3 / (1 - 0.9)});
 * w.assign(param);
 * ```
 */
export function adamUpdate(param: tf.Tensor, grad: tf.Tensor, moments: tf.Tensor, attrs: AdamUpdateAttrs, gradScale?: tf.Tensor): AdamUpdated {
  const op = 'adamUpdate';
  if (!(param instanceof tf.Tensor)) fail(op, `'param' must be a float32 tensor but got ${describeValue(param)}`);
  assertTensor(op, 'param', param, param.rank);
  assertTensor(op, 'grad', grad, param.rank);
  if (!tf.util.arraysEqual(grad.shape, param.shape)) fail(op, `'grad' must have the shape of 'param' [${param.shape}] but has [${grad.shape}]`);
  assertTensor(op, 'moments', moments, param.rank + 1);
  if (!tf.util.arraysEqual(moments.shape, [2, ...param.shape])) {
    fail(op, `'moments' must be [2, ...param's shape] = [${[2, ...param.shape]}] but has [${moments.shape}]`);
  }
  for (const k of ['beta1', 'beta2', 'epsilon', 'correction2Sqrt', 'stepSize'] as const) assertFiniteNumber(op, k, attrs[k]);
  if (gradScale !== undefined) assertGradScale(op, gradScale);
  if (tf.env().getBool(ADAM_UPDATE_KERNEL_FLAG) && tf.getKernel(ADAM_UPDATE, tf.getBackend()) != null) {
    const { beta1, beta2, epsilon, correction2Sqrt, stepSize } = attrs;
    const [p2, moments2] = tf.engine().runKernel(ADAM_UPDATE, { param, grad, moments, ...(gradScale !== undefined ? { gradScale } : {}) },
        { beta1, beta2, epsilon, correction2Sqrt, stepSize }) as tf.Tensor[];
    return { param: p2, moments: moments2 };
  }
  return tf.tidy(() => {
    const g = gradScale === undefined ? grad : tf.mul(grad, gradScale);
    const [m, v] = tf.unstack(moments);
    const m2 = tf.add(tf.mul(m, attrs.beta1), tf.mul(g, 1 - attrs.beta1));
    const v2 = tf.add(tf.mul(v, attrs.beta2), tf.mul(tf.square(g), 1 - attrs.beta2));
    const denom = tf.add(tf.div(tf.sqrt(v2), attrs.correction2Sqrt), attrs.epsilon);
    const updated = { param: tf.sub(param, tf.mul(tf.div(m2, denom), attrs.stepSize)), moments: tf.stack([m2, v2]) };
    if (gradScale === undefined) return updated;
    const skip = tf.equal(gradScale, 0);
    return { param: tf.where(skip, param, updated.param), moments: tf.where(skip, moments, updated.moments) };
  });
}

/** `gradScale` of an update: a float32 scalar (one value), on the device. */
export function assertGradScale(op: string, gradScale: tf.Tensor): void {
  if (!(gradScale instanceof tf.Tensor) || gradScale.isDisposed || gradScale.dtype !== 'float32' || gradScale.rank !== 0) {
    fail(op, `'gradScale' must be a float32 scalar tensor but got ${describeValue(gradScale)}`);
  }
}

/**
 * tf.env() flag: false keeps Adam per variable (adamUpdate) even where the backend updates many
 * variables in one dispatch (webgpu: src/backends/webgpu/grouped_adam.ts), to compare the two.
 */
export const ADAM_GROUPED_FLAG = 'MOE_ADAM_GROUPED';
tf.env().registerFlag(ADAM_GROUPED_FLAG, () => true);

/** One variable of a grouped update: the variable, its gradient, and the optimizer's own moments. */
export interface AdamEntry {
  param: tf.Variable;
  grad: tf.Tensor;
  /** [2, ...param's shape]: m then v; owned by the optimizer (nothing else holds them) */
  moments: tf.Tensor;
}

/**
 * A backend's Adam over many variables at once, in place: it updates the variables' and the
 * moments' own buffers, with adamUpdate's float32 expression (bit for bit), `gradScale` (validated
 * by the caller) as adamUpdate's. An entry it cannot update in place (a buffer shared with another
 * tensor, a gradient that aliases a written buffer, a bad argument) it hands to `perVariable`
 * (which runs adamUpdate and validates), before its own dispatches.
 */
export type GroupedAdamUpdate = (entries: readonly AdamEntry[], attrs: AdamUpdateAttrs, perVariable: (index: number) => void,
    gradScale?: tf.Tensor) => void;

const groupedByBackend = new Map<string, GroupedAdamUpdate>();

/** Registers `update` as `backendName`'s grouped Adam (the optimizer uses it when the flags allow). */
export function registerGroupedAdamUpdate(backendName: string, update: GroupedAdamUpdate): void {
  groupedByBackend.set(backendName, update);
}

/**
 * The active backend's grouped Adam, or undefined: none registered, or the flags say per variable
 * (ADAM_GROUPED_FLAG false, or ADAM_UPDATE_KERNEL_FLAG false: the composed ops).
 *
 * ```js
 * const grouped = groupedAdamUpdateFor(tf.getBackend());   // webgpu: in-place, K variables per dispatch
 * ```
 */
export function groupedAdamUpdateFor(backendName: string): GroupedAdamUpdate | undefined {
  if (!tf.env().getBool(ADAM_GROUPED_FLAG) || !tf.env().getBool(ADAM_UPDATE_KERNEL_FLAG)) return undefined;
  return groupedByBackend.get(backendName);
}
