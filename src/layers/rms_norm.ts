/**
 * RMSNorm over the last axis: x · rsqrt(mean(x²) + eps) · weight, the T5 / Llama norm every
 * supported family uses (HF computes it in float32, as this does).
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type { LayerArgs } from '@tensorflow/tfjs-layers/dist/engine/topology.js';
import { rmsNorm } from '../ops/rms_norm.js';
import { assertFiniteNumber, fail } from '../ops/validate.js';

// the op (one customGrad, closed-form backward) and the plain composed formula it is checked against
export { rmsNorm, rmsNormReference, type RMSNormOptions } from '../ops/rms_norm.js';

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
      // a frozen weight (LoRA, freezeBaseLayers) gets no gradient work; as SparseMoE decides it
      const trainWeight = this.trainable && this.weight!.trainable;
      return rmsNorm(Array.isArray(inputs) ? inputs[0] : inputs, this.weight!.read(), this.epsilon,
          { zeroCentered: this.zeroCentered, trainWeight });
    });
  }

  override getConfig(): tf.serialization.ConfigDict {
    return { ...super.getConfig(), epsilon: this.epsilon, ...(this.zeroCentered ? { zeroCentered: true } : {}) };
  }
}
tf.serialization.registerClass(RMSNorm);
