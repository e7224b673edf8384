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
 * m then v); outputs [param', moments']. The moments travel as one tensor so that a backend can
 * write them in one program: two programs per variable instead of three (issue 15). A backend's
 * kernel must compute, in float32 and in this order:
 *   m' = m·β1 + g·(1 − β1);  v' = v·β2 + g²·(1 − β2);
 *   param' = param − (m' / (√v' / correction2Sqrt + ε)) · stepSize
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
 * `moments` is [2, ...param's shape]: the first moment m, then the second v.
 *
 * ```js
 * const {param, moments} = adamUpdate(w, g, tf.zeros([2, ...w.shape]), {beta1: 0.9, beta2: 0.999,
 *   epsilon: 1e-8, correction2Sqrt: Math.sqrt(1 - 0.999), stepSize: 1e-3 / (1 - 0.9)});
 * w.assign(param);
 * ```
 */
export function adamUpdate(param: tf.Tensor, grad: tf.Tensor, moments: tf.Tensor, attrs: AdamUpdateAttrs): AdamUpdated {
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
  if (tf.env().getBool(ADAM_UPDATE_KERNEL_FLAG) && tf.getKernel(ADAM_UPDATE, tf.getBackend()) != null) {
    const { beta1, beta2, epsilon, correction2Sqrt, stepSize } = attrs;
    const [p2, moments2] = tf.engine().runKernel(ADAM_UPDATE, { param, grad, moments },
        { beta1, beta2, epsilon, correction2Sqrt, stepSize }) as tf.Tensor[];
    return { param: p2, moments: moments2 };
  }
  return tf.tidy(() => {
    const [m, v] = tf.unstack(moments);
    const m2 = tf.add(tf.mul(m, attrs.beta1), tf.mul(grad, 1 - attrs.beta1));
    const v2 = tf.add(tf.mul(v, attrs.beta2), tf.mul(tf.square(grad), 1 - attrs.beta2));
    const denom = tf.add(tf.div(tf.sqrt(v2), attrs.correction2Sqrt), attrs.epsilon);
    return { param: tf.sub(param, tf.mul(tf.div(m2, denom), attrs.stepSize)), moments: tf.stack([m2, v2]) };
  });
}
