/**
 * Token embedding and LM head with HF's [vocab, hidden] weight layout and names ('weight').
 * With tied word embeddings the model calls the one TokenEmbedding layer twice: on token ids
 * (rank 2, a lookup) and on hidden states (rank 3, logits against the same table), so the tie
 * survives serialization as a shared layer.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type { LayerArgs } from '@tensorflow/tfjs-layers/dist/engine/topology.js';
import { assertInteger, fail } from '../ops/validate.js';

export interface VocabLayerArgs extends LayerArgs {
  vocabSize: number;
  hiddenSize: number;
  /** std of the normal initializer (HF initializer_range); default 0.02 */
  initializerRange?: number;
}

/** x [B, S, H] · Wᵀ → [B, S, V] with W [V, H]. */
function projectToVocab(x: tf.Tensor, weight: tf.Tensor): tf.Tensor {
  const [b, s, h] = x.shape;
  const v = weight.shape[0];
  return tf.reshape(tf.matMul(tf.reshape(x, [b * s, h]), weight, false, true), [b, s, v]);  // [B, S, V]
}

abstract class VocabLayer extends tfl.layers.Layer {
  readonly vocabSize: number;
  readonly hiddenSize: number;
  readonly initializerRange: number;
  protected table: tfl.LayerVariable | null = null;

  constructor(args: VocabLayerArgs, op: string) {
    super(args);
    assertInteger(op, 'vocabSize', args.vocabSize, 1);
    assertInteger(op, 'hiddenSize', args.hiddenSize, 1);
    this.vocabSize = args.vocabSize;
    this.hiddenSize = args.hiddenSize;
    this.initializerRange = args.initializerRange ?? 0.02;
  }

  override build(): void {
    if (this.table !== null) return;
    this.table = this.addWeight('weight', [this.vocabSize, this.hiddenSize], 'float32',
        tfl.initializers.randomNormal({ mean: 0, stddev: this.initializerRange }));
    this.built = true;
  }

  override getConfig(): tf.serialization.ConfigDict {
    return {
      ...super.getConfig(), vocabSize: this.vocabSize, hiddenSize: this.hiddenSize,
      initializerRange: this.initializerRange,
    };
  }
}

/** ids int32 [B, S] → [B, S, H]; hidden [B, S, H] → logits [B, S, V] (the tied head). */
export class TokenEmbedding extends VocabLayer {
  static className = 'TokenEmbedding';

  constructor(args: VocabLayerArgs) {
    super(args, 'TokenEmbedding');
  }

  override computeOutputShape(inputShape: tfl.Shape | tfl.Shape[]): tfl.Shape {
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    return shape.length === 2 ? [...shape, this.hiddenSize] : [...shape.slice(0, -1), this.vocabSize];
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      if (x.rank === 3) return projectToVocab(x, this.table!.read());
      if (x.rank !== 2) fail('TokenEmbedding.call', `the input must be ids [batch, seq] or hidden states [batch, seq, hidden] but got shape [${x.shape}]`);
      const ids = x.dtype === 'int32' ? x : tf.cast(x, 'int32');
      return tf.reshape(tf.gather(this.table!.read(), tf.reshape(ids, [-1])), [...x.shape, this.hiddenSize]);  // [B, S, H]
    });
  }
}
tf.serialization.registerClass(TokenEmbedding);

/** hidden [B, S, H] → logits [B, S, V], no bias (HF lm_head). */
export class LMHead extends VocabLayer {
  static className = 'LMHead';

  constructor(args: VocabLayerArgs) {
    super(args, 'LMHead');
  }

  override computeOutputShape(inputShape: tfl.Shape | tfl.Shape[]): tfl.Shape {
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    return [...shape.slice(0, -1), this.vocabSize];
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => projectToVocab(Array.isArray(inputs) ? inputs[0] : inputs, this.table!.read()));
  }
}
tf.serialization.registerClass(LMHead);
