/**
 * Token embedding and LM head with HF's [vocab, hidden] weight layout and names ('weight').
 * With tied word embeddings the model calls the one TokenEmbedding layer twice: on token ids
 * (rank 2, a lookup) and on hidden states (rank 3, logits against the same table), so the tie
 * survives serialization as a shared layer.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type { LayerArgs } from '@tensorflow/tfjs-layers/dist/engine/topology.js';
import { describeValue } from '../util/describe.js';
import { assertInteger, assertOneOf, fail } from '../ops/validate.js';
import { denseWeightMatMul, gatherDenseRows, PackedDenseWeight, type DenseWeightTensor } from '../ops/packed.js';
import { DENSE_STORAGES, addDenseWeight, denseWeightOf, type DenseStorage } from './dense_storage.js';
import { normalInitializer } from './initializers.js';

type Kwargs = Parameters<tfl.layers.Layer['apply']>[1];

/** Backends whose tensors live in host memory: reading ids there needs no GPU round trip. */
/** Backends whose tensors can be read back synchronously, cheaply: their token ids are range-checked. */
export const HOST_BACKENDS: readonly string[] = ['cpu', 'wasm'];

/**
 * Token ids must be int32 (a float id is a caller's mistake, never rounded silently) and, where
 * `ids` is a host array or lives on a host backend (cpu, wasm), in [0, vocabSize). On a GPU
 * backend a tensor's range is not read back (that would stall every step); host arrays
 * (evaluateLoss's tokens, generateGreedy's prompt) are checked there too.
 *
 * ```js
 * assertTokenIds('generateGreedy', 'prompt', Int32Array.from([5, 1]), 97);
 * ```
 */
export function assertTokenIds(op: string, arg: string, ids: tf.Tensor | Int32Array, vocabSize: number): void {
  if (ids instanceof tf.Tensor) {
    if (ids.dtype !== 'int32') fail(op, `'${arg}' must be int32 token ids but got ${ids.dtype} (shape [${ids.shape}])`);
    if (!HOST_BACKENDS.includes(tf.getBackend())) return;
  } else if (!(ids instanceof Int32Array)) {
    fail(op, `'${arg}' must be an Int32Array of token ids but got ${describeValue(ids)}`);
  }
  const values = ids instanceof tf.Tensor ? ids.dataSync() : ids;
  for (let i = 0; i < values.length; i++) {
    const id = values[i];
    if (id < 0 || id >= vocabSize) {
      fail(op, `'${arg}' must hold token ids in [0, ${vocabSize - 1}] (vocab size ${vocabSize}) but holds ${id} at index ${i}`);
    }
  }
}

export interface VocabLayerArgs extends LayerArgs {
  vocabSize: number;
  hiddenSize: number;
  /** std of the normal initializer (HF initializer_range); default 0.02 */
  initializerRange?: number;
  /**
   * how the table is held: 'float32' (default), or packed 'bf16' / 'f16' halves in a frozen int32
   * variable [V, ceil(H/2)] (src/layers/dense_storage.ts)
   */
  denseStorage?: DenseStorage;
}

/**
 * x [B, S, H] · Wᵀ → [B, S, V] with W [V, H], float32 or packed 16-bit (frozen). A packed W has its
 * own gradient (dx = dy · W, W none): read in each product (denseWeightMatMul), so the tape never
 * keeps a float32 copy of the head for the backward pass.
 */
function projectToVocab(x: tf.Tensor, weight: DenseWeightTensor): tf.Tensor {
  const [b, s, h] = x.shape;
  const v = weight.shape[0];
  const flat = tf.reshape(x, [b * s, h]) as tf.Tensor2D;
  if (!(weight instanceof PackedDenseWeight)) return tf.reshape(tf.matMul(flat, weight, false, true), [b, s, v]);  // [B, S, V]
  const project = tf.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => ({
    value: denseWeightMatMul(args[0] as tf.Tensor2D, weight, true, null),                  // [BS, V]
    gradFunc: (dy: tf.Tensor) => denseWeightMatMul(dy as tf.Tensor2D, weight, false, null, 'gradient'),  // [BS, H]
  }));
  return tf.reshape(project(flat), [b, s, v]);  // [B, S, V]
}

abstract class VocabLayer extends tfl.layers.Layer {
  readonly vocabSize: number;
  readonly hiddenSize: number;
  readonly initializerRange: number;
  protected table: tfl.LayerVariable | null = null;
  /** how the table is held: float32, or packed 16-bit (frozen) */
  readonly denseStorage: DenseStorage;

  constructor(args: VocabLayerArgs, op: string) {
    super(args);
    assertInteger(op, 'vocabSize', args.vocabSize, 1);
    assertInteger(op, 'hiddenSize', args.hiddenSize, 1);
    this.vocabSize = args.vocabSize;
    this.hiddenSize = args.hiddenSize;
    this.initializerRange = args.initializerRange ?? 0.02;
    this.denseStorage = args.denseStorage ?? 'float32';
    assertOneOf(op, 'denseStorage', this.denseStorage, DENSE_STORAGES);
  }

  override build(): void {
    if (this.table !== null) return;
    this.table = addDenseWeight(this.addWeight.bind(this), 'weight', [this.vocabSize, this.hiddenSize], this.denseStorage,
        normalInitializer(this.initializerRange));
    this.built = true;
  }

  override getConfig(): tf.serialization.ConfigDict {
    return {
      ...super.getConfig(), vocabSize: this.vocabSize, hiddenSize: this.hiddenSize,
      initializerRange: this.initializerRange,
      ...(this.denseStorage !== 'float32' ? { denseStorage: this.denseStorage } : {}),
    };
  }
}

export interface TokenEmbeddingArgs extends VocabLayerArgs {
  /**
   * how the table is held: 'float32' (default), or packed 'bf16' / 'f16' halves in a frozen int32
   * variable [V, ceil(H/2)] (src/layers/dense_storage.ts): a lookup gathers the ids' packed rows
   * and decodes only those
   */
  denseStorage?: DenseStorage;
}

/** ids int32 [B, S] → [B, S, H]; hidden [B, S, H] → logits [B, S, V] (the tied head). */
export class TokenEmbedding extends VocabLayer {
  static className = 'TokenEmbedding';

  constructor(args: TokenEmbeddingArgs) {
    super(args, 'TokenEmbedding');
  }

  override computeOutputShape(inputShape: tfl.Shape | tfl.Shape[]): tfl.Shape {
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    return shape.length === 2 ? [...shape, this.hiddenSize] : [...shape.slice(0, -1), this.vocabSize];
  }

  /**
   * tfjs-layers counts one reference per symbolic call, but a model disposes each of its layers
   * once; the tied head's second call (on hidden states) would keep the table alive after
   * `model.dispose()`, so that call adds no reference.
   */
  override apply(inputs: tf.Tensor | tf.Tensor[] | tfl.SymbolicTensor | tfl.SymbolicTensor[],
      kwargs?: Kwargs): tf.Tensor | tf.Tensor[] | tfl.SymbolicTensor | tfl.SymbolicTensor[] {
    const refsBefore = this._refCount;
    const out = super.apply(inputs, kwargs);
    const x = Array.isArray(inputs) ? inputs[0] : inputs;
    if (x instanceof tfl.SymbolicTensor && x.rank === 3 && refsBefore !== null && this._refCount === refsBefore + 1) {
      this._refCount = refsBefore;
    }
    return out;
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const op = 'TokenEmbedding.call';
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      const table = denseWeightOf(this.table!);
      if (x.rank === 3) return projectToVocab(x, table);  // the tied head (the loader keeps tied tables float32)
      if (x.rank !== 2) fail(op, `the input must be ids [batch, seq] or hidden states [batch, seq, hidden] but got shape [${x.shape}]`);
      assertTokenIds(op, 'input_ids', x, this.vocabSize);
      // packed: only the looked-up rows are decoded
      return tf.reshape(gatherDenseRows(table, tf.reshape(x, [-1]) as tf.Tensor1D), [...x.shape, this.hiddenSize]);  // [B, S, H]
    });
  }
}
tf.serialization.registerClass(TokenEmbedding);

/**
 * hidden [B, S, H] → logits [B, S, V], no bias (HF lm_head). With a 16-bit denseStorage the
 * weight is packed and frozen (LoRA training; denseDtype 'stored'): half the bytes, logits those
 * of the float32 head holding the same 16-bit values.
 */
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
    return tf.tidy(() => projectToVocab(Array.isArray(inputs) ? inputs[0] : inputs, denseWeightOf(this.table!)));
  }
}
tf.serialization.registerClass(LMHead);
