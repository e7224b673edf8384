/**
 * The dense SwiGLU MLP of decoder layers without an MoE block: down(silu(gate(x)) · up(x)),
 * weights in [out, in] layout under HF's names ('gate_proj.weight', 'up_proj.weight',
 * 'down_proj.weight').
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type { LayerArgs } from '@tensorflow/tfjs-layers/dist/engine/topology.js';
import { sharedExpert } from '../ops/shared_expert.js';
import { assertInteger, fail } from '../ops/validate.js';
import { normalInitializer } from './initializers.js';

export interface SwiGLUMLPArgs extends LayerArgs {
  /** I of the dense MLP (HF intermediate_size) */
  intermediateSize: number;
  /** std of the normal initializer (HF initializer_range); default 0.02 */
  initializerRange?: number;
}

export class SwiGLUMLP extends tfl.layers.Layer {
  static className = 'SwiGLUMLP';
  readonly intermediateSize: number;
  readonly initializerRange: number;
  private readonly vars = new Map<string, tfl.LayerVariable>();

  constructor(args: SwiGLUMLPArgs) {
    super(args);
    assertInteger('SwiGLUMLP', 'intermediateSize', args.intermediateSize, 1);
    this.intermediateSize = args.intermediateSize;
    this.initializerRange = args.initializerRange ?? 0.02;
  }

  override build(inputShape: tfl.Shape | tfl.Shape[]): void {
    if (this.vars.size > 0) return;
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    const h = shape[shape.length - 1];
    if (h == null) fail('SwiGLUMLP.build', `the input's last dimension must be known but got shape [${shape}]`);
    const i = this.intermediateSize;
    const init = normalInitializer(this.initializerRange);
    for (const [name, dims] of [['gate_proj.weight', [i, h]], ['up_proj.weight', [i, h]], ['down_proj.weight', [h, i]]] as const) {
      this.vars.set(name, this.addWeight(name, [...dims], 'float32', init));
    }
    this.built = true;
  }

  override computeOutputShape(inputShape: tfl.Shape | tfl.Shape[]): tfl.Shape | tfl.Shape[] {
    return inputShape;
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      const h = x.shape[x.rank - 1];
      const w = (name: string) => this.vars.get(name)!.read() as tf.Tensor2D;
      // the same computation as an (ungated) shared expert
      const out = sharedExpert(tf.reshape(x, [-1, h]) as tf.Tensor2D,
          { gate: w('gate_proj.weight'), up: w('up_proj.weight'), down: w('down_proj.weight') });
      return tf.reshape(out, x.shape);
    });
  }

  override getConfig(): tf.serialization.ConfigDict {
    return { ...super.getConfig(), intermediateSize: this.intermediateSize, initializerRange: this.initializerRange };
  }
}
tf.serialization.registerClass(SwiGLUMLP);
