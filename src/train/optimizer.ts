/**
 * The training loop's optimizer: Adam with torch.optim.Adam's update (the optimizer transformers'
 * Trainer uses, AdamW with weight decay 0), a learning rate given per step (schedules), and a state
 * that can be saved and restored bit for bit (checkpoints, resume); and global-norm gradient
 * clipping with torch.nn.utils.clip_grad_norm_'s semantics.
 *
 * Not tf.train.adam: its epsilon sits differently (1e-7, added to the uncorrected √v), and its
 * setWeights() rebuilds β^t with a float32 pow instead of the product the steps accumulated, so a
 * restored optimizer would not continue a run exactly.
 */
import * as tf from '@tensorflow/tfjs-core';
import { assertFiniteNumber, assertInteger, fail } from '../ops/validate.js';
import { ADAM_UPDATE, ADAM_UPDATE_KERNEL_FLAG, adamUpdate, assertGradScale, groupedAdamUpdateFor } from './adam_update.js';
import { sumOfSquares } from './sum_of_squares.js';

/** What a checkpoint keeps of Adam: the step count and both moments of every variable, in order. */
export interface AdamSnapshot {
  /** optimizer steps taken (t) */
  step: number;
  /** the first moments, in the order of the variables */
  m: Float32Array[];
  /** the second moments */
  v: Float32Array[];
}

export interface AdamOptions {
  /** default 0.9 (torch, transformers) */
  beta1?: number;
  /** default 0.999 */
  beta2?: number;
  /** default 1e-8 */
  epsilon?: number;
}

/**
 * Adam over a fixed list of variables.
 *
 * ```js
 * const adam = new Adam(trainableVariables(model));
 * adam.apply(grads, 1e-3);   // grads in the variables' order
 * const saved = await adam.snapshot();
 * ```
 */
export class Adam {
  readonly beta1: number;
  readonly beta2: number;
  readonly epsilon: number;
  private t = 0;
  /** per variable [2, ...its shape]: m then v (one tensor: one program writes both, adam_update.ts) */
  private moments: tf.Tensor[];

  constructor(readonly variables: readonly tf.Variable[], options: AdamOptions = {}) {
    this.beta1 = options.beta1 ?? 0.9;
    this.beta2 = options.beta2 ?? 0.999;
    this.epsilon = options.epsilon ?? 1e-8;
    this.moments = variables.map(x => tf.zeros([2, ...x.shape]));
  }

  /** optimizer steps taken */
  get step(): number {
    return this.t;
  }

  /**
   * Whether apply() runs as the backend's Adam kernel (webgpu's), which takes a gradScale at no
   * cost. Elsewhere (cpu, wasm) the composed ops would add a multiply and two selects per variable
   * (a 224-adapter step 1.6× slower on wasm: train_loop_steps.ts --backend wasm, docs/webgpu.md),
   * and reading before apply() waits for nothing.
   */
  get scalesOnDevice(): boolean {
    return tf.env().getBool(ADAM_UPDATE_KERNEL_FLAG) && tf.getKernel(ADAM_UPDATE, tf.getBackend()) != null;
  }

  /**
   * One step: torch.optim.Adam's `exp_avg.lerp_(grad, 1 − β1)`, `exp_avg_sq·β2 + (1 − β2)·grad²`,
   * `denom = √exp_avg_sq / √(1 − β2^t) + ε`, `param −= lr / (1 − β1^t) · exp_avg / denom`. The bias
   * corrections are float64 numbers of t, so a restored state continues exactly.
   *
   * `gradScale`, a float32 scalar on the device (stepGradientScale), multiplies every gradient; where
   * it is 0 the device leaves the variables and moments as they were, and the caller, once it has
   * read why, calls `uncountStep()` so that t counts the steps applied.
   */
  apply(grads: readonly tf.Tensor[], lr: number, gradScale?: tf.Scalar): void {
    if (grads.length !== this.variables.length) {
      fail('Adam.apply', `'grads' must hold one gradient per variable (${this.variables.length}) but holds ${grads.length}`);
    }
    assertFiniteNumber('Adam.apply', 'lr', lr);
    if (gradScale !== undefined) assertGradScale('Adam.apply', gradScale);
    this.t++;
    const correction1 = 1 - this.beta1 ** this.t;
    const correction2Sqrt = Math.sqrt(1 - this.beta2 ** this.t);
    const attrs = { beta1: this.beta1, beta2: this.beta2, epsilon: this.epsilon, correction2Sqrt, stepSize: lr / correction1 };
    // one op per variable: webgpu runs it as 2 programs instead of ~14 (adam_update.ts)
    const perVariable = (i: number) => {
      const { param, moments } = adamUpdate(this.variables[i], grads[i], this.moments[i], attrs, gradScale);
      this.variables[i].assign(param);
      tf.dispose([param, this.moments[i]]);
      this.moments[i] = moments;
    };
    const grouped = groupedAdamUpdateFor(tf.getBackend());
    if (grouped === undefined) {
      this.variables.forEach((_, i) => perVariable(i));
      return;
    }
    // webgpu: many variables per dispatch, in place (issue 15); what it cannot take goes per variable
    grouped(this.variables.map((param, i) => ({ param, grad: grads[i], moments: this.moments[i] })), attrs, perVariable, gradScale);
  }

  /**
   * The last apply() was skipped on the device (its gradScale was 0): t goes back one, as if it had
   * not been called. Before the next apply(), whose bias corrections use t.
   */
  uncountStep(): void {
    if (this.t === 0) fail('Adam.uncountStep', 'no step to uncount: apply() has not run');
    this.t--;
  }

  /** The state, read back from the device (asynchronous: webgpu has no dataSync). */
  async snapshot(): Promise<AdamSnapshot> {
    const both = await Promise.all(this.moments.map(async t => await t.data() as Float32Array));
    const half = (values: Float32Array, which: number) => values.slice(which * values.length / 2, (which + 1) * values.length / 2);
    return { step: this.t, m: both.map(values => half(values, 0)), v: both.map(values => half(values, 1)) };
  }

  /** Replaces the state by a snapshot of an optimizer over variables of the same shapes. */
  restore(snapshot: AdamSnapshot): void {
    const op = 'Adam.restore';
    assertInteger(op, 'step', snapshot.step, 0);
    const n = this.variables.length;
    if (snapshot.m.length !== n || snapshot.v.length !== n) {
      fail(op, `the snapshot holds moments of ${snapshot.m.length} and ${snapshot.v.length} variables but the optimizer has ${n}`);
    }
    this.variables.forEach((x, i) => {
      for (const [which, values] of [['m', snapshot.m[i]], ['v', snapshot.v[i]]] as const) {
        if (values.length !== x.size) {
          fail(op, `'${which}[${i}]' must hold ${x.size} values (variable '${x.name}' [${x.shape}]) but holds ${values.length}`);
        }
      }
    });
    tf.dispose(this.moments);
    this.moments = this.variables.map((x, i) => {
      const both = new Float32Array(2 * x.size);
      both.set(snapshot.m[i]);
      both.set(snapshot.v[i], x.size);
      return tf.tensor(both, [2, ...x.shape], 'float32');
    });
    this.t = snapshot.step;
  }

  dispose(): void {
    tf.dispose(this.moments);
  }
}

/**
 * The global L2 norm of `grads` (all of them as one vector) and the gradients scaled so that norm
 * is at most `maxNorm`: torch.nn.utils.clip_grad_norm_, `clip_coef = max_norm / (total_norm + 1e-6)`,
 * applied when below 1. `maxNorm` null: the norm only, the gradients unchanged (same tensors).
 * Returns new tensors (the caller disposes them) and the norm before clipping.
 *
 * ```js
 * const {grads: clipped, norm} = await clipByGlobalNorm(grads, 1.0);
 * ```
 */
export async function clipByGlobalNorm(
    grads: readonly tf.Tensor[], maxNorm: number | null): Promise<{ grads: tf.Tensor[]; norm: number }> {
  checkMaxNorm('clipByGlobalNorm', maxNorm);
  if (grads.length === 0) return { grads: [], norm: 0 };
  const normTensor = globalNorm(grads);
  const norm = (await normTensor.data())[0];
  normTensor.dispose();
  return { grads: clipToNorm(grads, norm, maxNorm), norm };
}

/**
 * The global L2 norm of `grads` as a scalar on their device, not read: the training loop records it
 * right after the backward pass and reads it with the loss, in one wait for the GPU a step.
 */
export function globalNorm(grads: readonly tf.Tensor[]): tf.Scalar {
  const sum = sumOfSquares(grads);
  try {
    return tf.sqrt(sum);
  } finally {
    sum.dispose();
  }
}

/**
 * `grads` clipped to `maxNorm` given their global norm `norm` (read from globalNorm), as
 * clipByGlobalNorm: new tensors, scaled by max / (norm + 1e-6) only when that is below 1.
 */
export function clipToNorm(grads: readonly tf.Tensor[], norm: number, maxNorm: number | null): tf.Tensor[] {
  checkMaxNorm('clipToNorm', maxNorm);
  const coefficient = maxNorm === null ? 1 : maxNorm / (norm + 1e-6);
  // torch multiplies by the clamped coefficient even when it is 1; skipping that multiply changes nothing
  if (coefficient >= 1 || !Number.isFinite(norm)) return grads.map(g => tf.clone(g));
  return grads.map(g => tf.mul(g, coefficient));
}

/**
 * The training loop's gradScale for Adam.apply where it scales on the device (Adam.scalesOnDevice),
 * so that the optimizer is recorded before anything is read: 0 where the loss or the gradients' norm is not finite (the step is
 * skipped), else clip_grad_norm_'s coefficient min(1, maxNorm / (norm + 1e-6)) in float32 as torch
 * computes it on the GPU, or 1 without clipping.
 */
export function stepGradientScale(loss: tf.Scalar, norm: tf.Scalar, maxNorm: number | null): tf.Scalar {
  checkMaxNorm('stepGradientScale', maxNorm);
  return tf.tidy(() => {
    const finite = tf.logicalAnd(tf.isFinite(loss), tf.isFinite(norm));
    const coefficient = maxNorm === null ? tf.scalar(1) : tf.minimum(tf.div(tf.scalar(maxNorm), tf.add(norm, 1e-6)), 1);
    return tf.where(finite, coefficient, tf.scalar(0)) as tf.Scalar;
  });
}

function checkMaxNorm(op: string, maxNorm: number | null): void {
  if (maxNorm === null) return;
  assertFiniteNumber(op, 'maxNorm', maxNorm);
  if (maxNorm <= 0) fail(op, `'maxNorm' must be > 0 (or null: no clipping) but got ${maxNorm}`);
}
