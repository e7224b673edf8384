/**
 * Frozen non-expert weights (attention q/k/v/o, the token embedding) held in their stored 16-bit
 * precision: an int32 layer variable [rows, ceil(cols/2)] of bf16/f16 halves (the words of a
 * PackedDenseWeight, src/ops/packed.ts), non-trainable, with its kind and logical shape kept here
 * for the readers outside the layer (saving, merging, inspect, the loader). The ops decode it in
 * the product that uses it; nothing holds a float32 copy.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { HALF_KINDS, PackedDenseWeight, packDenseWeight, packedDenseWordsPerRow, unpackDenseWeight, type DenseWeightTensor, type HalfKind } from '../ops/packed.js';

/** How a layer holds its frozen dense weights: 'float32' (default), or packed 'bf16' / 'f16'. */
export type DenseStorage = 'float32' | HalfKind;
export const DENSE_STORAGES: readonly DenseStorage[] = ['float32', ...HALF_KINDS];

const packedDenseVariables = new WeakMap<tfl.LayerVariable, { kind: HalfKind; shape: [number, number] }>();

type AddWeight = (name: string, shape: number[], dtype: tf.DataType, initializer: ReturnType<typeof tfl.initializers.zeros>,
  regularizer?: undefined, trainable?: boolean) => tfl.LayerVariable;

/**
 * Adds a 2-D weight [rows, cols] to a layer (inside its build): float32 as usual, or, with a
 * 16-bit `storage`, a frozen int32 variable of packed halves (zeros until a checkpoint fills it).
 *
 * ```js
 * const v = addDenseWeight(this.addWeight.bind(this), 'q_proj.weight', [q, h], 'bf16', normal);
 * ```
 */
export function addDenseWeight(add: AddWeight, name: string, shape: [number, number], storage: DenseStorage,
    initializer: ReturnType<typeof tfl.initializers.zeros>): tfl.LayerVariable {
  if (storage === 'float32') return add(name, shape, 'float32', initializer);
  const v = add(name, [shape[0], packedDenseWordsPerRow(shape[1])], 'int32', tfl.initializers.zeros(), undefined, false);
  packedDenseVariables.set(v, { kind: storage, shape: [shape[0], shape[1]] });
  return v;
}

/** The packed dense weight a variable holds (a wrapper over its value), or undefined for any other variable. */
export function packedDenseOf(variable: tfl.LayerVariable): PackedDenseWeight | undefined {
  const p = packedDenseVariables.get(variable);
  return p && new PackedDenseWeight(p.kind, p.shape, variable.read());
}

/** The 16-bit kind and logical shape of a packed dense variable, or undefined. */
export function packedDenseFormat(variable: tfl.LayerVariable): { kind: HalfKind; shape: [number, number] } | undefined {
  const p = packedDenseVariables.get(variable);
  return p && { kind: p.kind, shape: [...p.shape] };
}

/** A 2-D weight variable as the dense ops take it: its float32 value, or the PackedDenseWeight over its words. */
export function denseWeightOf(variable: tfl.LayerVariable): DenseWeightTensor {
  return packedDenseOf(variable) ?? variable.read() as tf.Tensor2D;
}

/**
 * W ← W + sign·delta for a 2-D weight variable (delta not disposed): a packed one is decoded,
 * added to in float32 and packed again, rounded to its 16-bit kind (as PEFT's merge into a bf16
 * model).
 */
export function addToDenseWeight(variable: tfl.LayerVariable, delta: tf.Tensor, sign: 1 | -1): void {
  const packed = packedDenseOf(variable);
  tf.tidy(() => {
    if (packed === undefined) {
      variable.write(sign > 0 ? tf.add(variable.read(), delta) : tf.sub(variable.read(), delta));
      return;
    }
    const w = unpackDenseWeight(packed);
    const sum = (sign > 0 ? tf.add(w, delta) : tf.sub(w, delta)) as tf.Tensor2D;
    const repacked = packDenseWeight(sum, packed.kind);
    variable.write(repacked.packed);
  });
}
