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
import { LinearLoRA, MLP_PROJECTIONS, type SavedLinearAdapter } from './linear_lora.js';

export interface SwiGLUMLPArgs extends LayerArgs {
  /** I of the dense MLP (HF intermediate_size) */
  intermediateSize: number;
  /** std of the normal initializer (HF initializer_range); default 0.02 */
  initializerRange?: number;
  /** LoRA adapters on gate/up/down_proj to create in build(), as getConfig() writes them */
  loraAdapters?: SavedLinearAdapter[];
  activeLoraAdapters?: string[];
}

export class SwiGLUMLP extends tfl.layers.Layer {
  static className = 'SwiGLUMLP';
  readonly intermediateSize: number;
  readonly initializerRange: number;
  private readonly vars = new Map<string, tfl.LayerVariable>();
  /** LoRA adapters on gate_proj, up_proj and down_proj (PEFT's lora.Linear state) */
  readonly lora: LinearLoRA;

  constructor(args: SwiGLUMLPArgs) {
    super(args);
    const saved = LinearLoRA.savedAdapters(args.loraAdapters, args.activeLoraAdapters);
    this.lora = new LinearLoRA({
      layer: this, projections: MLP_PROJECTIONS,
      weight: p => this.vars.get(`${p}.weight`)!,
      baseWeights: () => [...this.vars.values()],
    }, saved.adapters, saved.active);
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
    this.lora.buildPending();
  }

  override computeOutputShape(inputShape: tfl.Shape | tfl.Shape[]): tfl.Shape | tfl.Shape[] {
    return inputShape;
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      const h = x.shape[x.rank - 1];
      const x2 = tf.reshape(x, [-1, h]) as tf.Tensor2D;                  // [N, H]
      if (this.lora.names().length === 0) {
        const w = (name: string) => this.vars.get(name)!.read() as tf.Tensor2D;
        // the same computation as an (ungated) shared expert
        const out = sharedExpert(x2, { gate: w('gate_proj.weight'), up: w('up_proj.weight'), down: w('down_proj.weight') });
        return tf.reshape(out, x.shape);
      }
      // with adapters each projection goes through the LoRA linear (its branch input may be dropped)
      const gate = this.lora.apply(x2, 'gate_proj', null);              // [N, I]
      const up = this.lora.apply(x2, 'up_proj', null);                  // [N, I]
      const out = this.lora.apply(tf.mul(tf.mul(gate, tf.sigmoid(gate)), up) as tf.Tensor2D, 'down_proj', null);  // [N, H]
      return tf.reshape(out, x.shape);
    });
  }

  override getConfig(): tf.serialization.ConfigDict {
    return {
      ...super.getConfig(), intermediateSize: this.intermediateSize, initializerRange: this.initializerRange,
      ...this.lora.getConfig(),
    } as unknown as tf.serialization.ConfigDict;
  }
}
tf.serialization.registerClass(SwiGLUMLP);
