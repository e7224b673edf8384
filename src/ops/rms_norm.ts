/**
 * RMSNorm over the last axis as one op with its own gradient. Composed of plain ops on tfjs's
 * tape (`rmsNormReference`), each of its six kernels saves its inputs and each tfjs gradient adds
 * its own casts, reshapes and uploaded scalars (Rsqrt's builds a pow and a division): 35 kernel
 * calls (19 webgpu programs) per norm in a training step, four norms per OLMoE layer. Here the
 * forward pass runs off the tape and the backward pass is the closed form: 15 kernel calls (12
 * programs); with a trained weight 17 (15) against 39 (22). A backend may register MoERMSNorm and
 * MoERMSNormGradX to do a frozen-weight norm (LoRA's case) in one pass each way (webgpu: one
 * program each, issue 15); elsewhere, and for a trained weight, the composed ops run.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Tensor } from '@tensorflow/tfjs-core';
import { describeValue } from '../util/describe.js';
import { passScalar } from './pass_constants.js';
import { assertFiniteNumber, assertShape, fail } from './validate.js';

/**
 * MoERMSNorm: inputs x (float32, rank ≥ 1, last axis D) and scale [D], attr epsilon; output
 * (x·r)·scale with r = 1 / √(mean(x²) + ε) over the last axis. MoERMSNormGradX: inputs dy, x,
 * scale, attr epsilon; output dx = (g − x̂·mean(g·x̂))·r with g = dy·scale, x̂ = x·r (r recomputed
 * from x). Float32.
 */
export const RMS_NORM = 'MoERMSNorm';
export const RMS_NORM_GRAD_X = 'MoERMSNormGradX';

export interface RMSNormOptions {
  /** scale by (1 + weight) (Qwen3-Next's zero-centred norms); default false: scale by weight */
  zeroCentered?: boolean;
  /**
   * whether `weight` gets a gradient. Default: yes, unless it is a tf.Variable whose `trainable`
   * is false (a frozen layer's weight, as `freezeBaseLayers` and LoRA leave them). When false the
   * weight is read through the closure: tf.grads gives it none, and backward does no work for it.
   */
  trainWeight?: boolean;
}

/**
 * y = x̂ · w with x̂ = x · r, r = rsqrt(mean(x²) + eps) over the last axis (w = 1 + weight when
 * zeroCentered), for x of any rank ≥ 1 and weight [D], D = x's last axis. The gradient, with
 * g = dy · w: dx = r · (g − x̂ · mean(g · x̂)); dweight = Σ over all rows of dy · x̂.
 *
 * ```js
 * const y = rmsNorm(x, normWeight, 1e-6);                          // same shape as x
 * const q = rmsNorm(q4, qNormWeight, 1e-6, {trainWeight: false});  // LoRA: the norm is frozen
 * ```
 */
export function rmsNorm(x: Tensor, weight: Tensor, epsilon: number, options: RMSNormOptions = {}): Tensor {
  const op = 'rmsNorm';
  if (!(x instanceof tf.Tensor) || x.dtype !== 'float32' || x.rank < 1) {
    fail(op, `'x' must be a float32 tensor of rank >= 1 but got ${describeValue(x)}`);
  }
  if (x.isDisposed) fail(op, "'x' was already disposed");
  const d = x.shape[x.rank - 1];
  if (!(weight instanceof tf.Tensor) || weight.dtype !== 'float32') {
    fail(op, `'weight' must be a float32 tensor of shape [${d}] but got ${describeValue(weight)}`);
  }
  if (weight.isDisposed) fail(op, "'weight' was already disposed");
  assertShape(op, 'weight', weight, [d], `x [${x.shape}]`);
  assertFiniteNumber(op, 'epsilon', epsilon);
  if (epsilon < 0) fail(op, `'epsilon' must be >= 0 but got ${epsilon}`);
  const zeroCentered = options.zeroCentered ?? false;
  const trainWeight = options.trainWeight ?? !(weight instanceof tf.Variable && !weight.trainable);
  const rowAxes = Array.from({ length: x.rank - 1 }, (_, i) => i);  // every axis but the last
  const backend = tf.getBackend();
  if (!trainWeight && tf.getKernel(RMS_NORM, backend) != null && tf.getKernel(RMS_NORM_GRAD_X, backend) != null) {
    return rmsNormKernels(x, weight, epsilon, zeroCentered);
  }
  // inside a pass, one uploaded scalar for every norm of it (made here, outside the op's kernel)
  const eps = passScalar(epsilon);
  const one = zeroCentered ? passScalar(1) : 1;

  // a frozen weight is captured, not an input: one input, one gradient, no weight-gradient work
  const inputs = trainWeight ? [x, weight] : [x];
  return tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const save = args[inputs.length] as GradSaveFunc;
    const w = trainWeight ? args[1] as Tensor : weight;
    const scale = zeroCentered ? tf.add(w, one) : w;                  // [D]
    const { value, normed, inverseRms } = rmsNormForward(args[0] as Tensor, scale, eps);
    // kept for backward (the caller's tidy may dispose a weight it built, such as ones or 1 + w)
    save([normed, inverseRms, scale]);
    return {
      value,
      gradFunc: (dy: Tensor, saved: Tensor[]) => {
        const [normed, inverseRms, scale] = saved;
        const dx = rmsNormBackwardX(dy, normed, inverseRms, scale);
        if (!trainWeight) return [dx];
        // d(1 + w)/dw = 1: zero-centred or not, the weight's gradient is the same sum
        const dWeight = tf.tidy(() => {
          const perRow = tf.mul(dy, normed);                             // [..., D]
          return rowAxes.length === 0 ? perRow : tf.sum(perRow, rowAxes);  // [D]
        });
        return [dx, dWeight];
      },
    };
  })(...inputs);
}

/**
 * A frozen-weight norm through the backend's MoERMSNorm / MoERMSNormGradX: x is kept for backward,
 * which recomputes r in its one pass; ε travels as an attribute (no scalar upload).
 */
function rmsNormKernels(x: Tensor, weight: Tensor, epsilon: number, zeroCentered: boolean): Tensor {
  return tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const xs = args[0] as Tensor;
    const scale = zeroCentered ? tf.add(weight, passScalar(1)) : weight;  // [D]
    (args[1] as GradSaveFunc)([xs, scale]);  // a zero-centred scale is this pass's own tensor
    return {
      value: tf.engine().runKernel(RMS_NORM, { x: xs, scale }, { epsilon }) as Tensor,
      gradFunc: (dy: Tensor, saved: Tensor[]) =>
        [tf.engine().runKernel(RMS_NORM_GRAD_X, { dy, x: saved[0], scale: saved[1] }, { epsilon }) as Tensor],
    };
  })(x);
}

/** The forward pass: y, and what backward needs (x̂ and r; x itself is not kept). */
function rmsNormForward(x: Tensor, scale: Tensor, epsilon: number | Tensor): { value: Tensor; normed: Tensor; inverseRms: Tensor } {
  const inverseRms = tf.rsqrt(tf.add(tf.mean(tf.square(x), -1, true), epsilon));  // [..., 1]
  const normed = tf.mul(x, inverseRms);                                            // [..., D]
  return { value: tf.mul(normed, scale), normed, inverseRms };
}

/** dx = r · (g − x̂ · mean(g · x̂)) with g = dy · scale. */
function rmsNormBackwardX(dy: Tensor, normed: Tensor, inverseRms: Tensor, scale: Tensor): Tensor {
  return tf.tidy(() => {
    const g = tf.mul(dy, scale);                                       // [..., D]
    const projection = tf.mean(tf.mul(g, normed), -1, true);           // [..., 1]
    return tf.mul(tf.sub(g, tf.mul(normed, projection)), inverseRms);  // [..., D]
  });
}

/**
 * The same norm composed of plain ops on tfjs's tape (its gradients are tfjs's): the reference
 * `rmsNorm` is checked against, and what it computes written out.
 *
 * ```js
 * const y = rmsNormReference(x, tf.ones([64]), 1e-6);  // same shape as x
 * ```
 */
export function rmsNormReference(x: Tensor, weight: Tensor, epsilon: number): Tensor {
  return tf.tidy(() => {
    const variance = tf.mean(tf.square(x), -1, true);                  // [..., 1]
    return tf.mul(tf.mul(x, tf.rsqrt(tf.add(variance, epsilon))), weight);
  });
}
