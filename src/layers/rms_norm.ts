/**
 * RMSNorm over the last axis: x · rsqrt(mean(x²) + eps) · weight, the T5 / Llama norm every
 * supported family uses (HF computes it in float32, as this does).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type { LayerArgs } from '@tensorflow/tfjs-layers/dist/engine/topology.js';
import { assertFiniteNumber, fail } from '../ops/validate.js';

/**
 * The norm as a plain differentiable function; `weight` has the size of x's last axis.
 *
 * ```js
 * const y = rmsNorm(x, tf.ones([64]), 1e-6);  // same shape as x
 * ```
 */
export function rmsNorm(x: tf.Tensor, weight: tf.Tensor, epsilon: number): tf.Tensor {
  return tf.tidy(() => {
    const variance = tf.mean(tf.square(x), -1, true);          // [..., 1]
    return tf.mul(tf.mul(x, tf.rsqrt(tf.add(variance, epsilon))), weight);
  });
}

export interface RMSNormArgs extends LayerArgs {
  /** added to the mean square; HF's rms_norm_eps (default 1e-6) */
  epsilon?: number;
  /**
   * scale by (1 + weight), the weight zeros at init (Qwen3-Next's zero-centred norms); default
   * false: scale by weight, ones at init
   */
  zeroCentered?: boolean;
}

/** A tfjs layer around `rmsNorm` with a weight 'weight' [D] (ones at init; zeros when zeroCentered). */
export class RMSNorm extends tfl.layers.Layer {
  static className = 'RMSNorm';
  readonly epsilon: number;
  readonly zeroCentered: boolean;
  private weight: tfl.LayerVariable | null = null;

  constructor(args: RMSNormArgs = {}) {
    super(args);
    this.epsilon = args.epsilon ?? 1e-6;
    assertFiniteNumber('RMSNorm', 'epsilon', this.epsilon);
    if (this.epsilon < 0) fail('RMSNorm', `'epsilon' must be >= 0 but got ${this.epsilon}`);
    this.zeroCentered = args.zeroCentered ?? false;
  }

  override build(inputShape: tfl.Shape | tfl.Shape[]): void {
    if (this.weight !== null) return;
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    const size = shape[shape.length - 1];
    if (size == null) fail('RMSNorm.build', `the input's last dimension must be known but got shape [${shape}]`);
    this.weight = this.addWeight('weight', [size], 'float32', this.zeroCentered ? tfl.initializers.zeros() : tfl.initializers.ones());
    this.built = true;
  }

  override computeOutputShape(inputShape: tfl.Shape | tfl.Shape[]): tfl.Shape | tfl.Shape[] {
    return inputShape;
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const weight = this.zeroCentered ? tf.add(this.weight!.read(), 1) : this.weight!.read();
      return rmsNorm(Array.isArray(inputs) ? inputs[0] : inputs, weight, this.epsilon);
    });
  }

  override getConfig(): tf.serialization.ConfigDict {
    return { ...super.getConfig(), epsilon: this.epsilon, ...(this.zeroCentered ? { zeroCentered: true } : {}) };
  }
}
tf.serialization.registerClass(RMSNorm);
