/**
 * How one expert projection (gate+up or down) takes part in a routed-experts call: whether its
 * expert LoRA is applied split or materialized, and which of its tensors get gradients, in what
 * order. Shared by the composed fusedExperts and the WebGPU implementation: both must make the
 * same split/materialize choice and pass the trainables to customGrad (and read them back in
 * backward) in the same order, so that they give the same results and gradients. Only the
 * materializer differs between them.
 */
import type * as tf from '@tensorflow/tfjs-core';
import { isPackedExpertWeight, type ExpertWeightTensor } from '../packed.js';
import type { LoRAFactors, LoRAMode } from '../types.js';
import { fail } from '../validate.js';
import { hasDropout } from '../lora/dropout.js';

/**
 * Extra multiply-adds of LoRA in one training step (forward + backward) for rows N through a
 * weight [out, in] per expert: split adds two rank-r products per pass; materialize builds
 * W_eff (E·out·in·r), needs dW_eff (N·out·in) and turns it into dA, dB (2·E·out·in·r).
 */
export function chooseLoRAMode(
    rows: number, inSize: number, outSize: number, numExperts: number, rank: number): 'split' | 'materialize' {
  const split = 3 * rows * rank * (inSize + outSize);
  const materialize = 3 * numExperts * outSize * inSize * rank + rows * inSize * outSize;
  return split <= materialize ? 'split' : 'materialize';
}

/** One projection's weight as the grouped products see it, and which of its tensors get gradients. */
export interface ProjectionPlan {
  /**
   * [E, out, in], or [E, in, out] when transposed; W_eff when the adapters were materialized;
   * packed (frozen, never trained) only as the base of a split projection
   */
  weight: ExpertWeightTensor;
  bias?: tf.Tensor2D;
  /** the adapters still applied split (none once materialized) */
  lora: LoRAFactors[];
  trainWeight: boolean;
  trainBias: boolean;
}

/** W_eff = W + Σ s·B_e·A_e in W's layout, with gradients to every A and B (none to W). */
export type ExpertMaterializer = (weight: ExpertWeightTensor, lora: LoRAFactors[], transposed: boolean) => tf.Tensor3D;

/**
 * Decides how a projection's adapters are applied: `mode` as given, or for 'auto' split when the
 * base is trained, an adapter has dropout, or the base is packed (materializing would build a float32 copy of the whole weight, which
 * is what packing avoids) and otherwise the cheaper of the two by chooseLoRAMode for `rows` = T·K rows.
 */
export function planProjection(
    weight: ExpertWeightTensor, bias: tf.Tensor2D | undefined, lora: LoRAFactors[], transposed: boolean,
    train: boolean, mode: LoRAMode, rows: number, materialize: ExpertMaterializer): ProjectionPlan {
  const split: ProjectionPlan = { weight, bias, lora, trainWeight: train, trainBias: train && bias != null };
  if (lora.length === 0) return split;
  const [e, a, b] = weight.shape;
  const [inSize, outSize] = transposed ? [a, b] : [b, a];
  const rank = lora.reduce((sum, f) => sum + f.A.shape[0] / e, 0);
  // Training the base and its adapters together needs dW itself, which only the split form gives.
  // Dropout acts on the branch input, which only the split form has.
  const dropped = lora.some(hasDropout);
  const chosen = mode !== 'auto' ? mode : train || dropped || isPackedExpertWeight(weight) ? 'split' :
    chooseLoRAMode(rows, inSize, outSize, e, rank);
  if (chosen === 'split') return split;
  if (dropped) {
    fail('fusedExperts', `expert LoRA dropout needs loraMode 'split' or 'auto' but got loraMode 'materialize': ` +
        'materialize folds the adapter into W_eff, so there is no separate branch input to drop');
  }
  if (train) fail('fusedExperts', `'trainExpertWeights' with loraMode 'materialize' would train W and its adapters on the same weight; use loraMode 'split'`);
  // W_eff is the output of the materializer's own customGrad: its gradient reaches A and B
  // through that op, so here it is a trainable input even when the base W is frozen.
  return { weight: materialize(weight, lora, transposed), bias, lora: [], trainWeight: true, trainBias: false };
}

/**
 * The tensors of a projection that get gradients, in a fixed order: W?, b?, A0, B0, A1, B1, ...
 * They are the customGrad inputs and also what backward must keep (they may be intermediates,
 * like W_eff). A frozen base is read through the closure instead: saving it would register a
 * W-sized clone for nothing.
 */
export function projectionTrainables(p: ProjectionPlan): tf.Tensor[] {
  return [...(p.trainWeight ? [p.weight as tf.Tensor3D] : []), ...(p.trainBias ? [p.bias!] : []), ...p.lora.flatMap(f => [f.A, f.B])];
}

/**
 * The projection with its trainables read back from backward's `saved`, starting at `at` (in
 * projectionTrainables order); returns it and the index after them.
 */
export function restoreProjection<P extends ProjectionPlan>(p: P, saved: tf.Tensor[], at: number): [P, number] {
  const weight = p.trainWeight ? saved[at++] as tf.Tensor3D : p.weight;  // a packed base is never trained
  const bias = p.trainBias ? saved[at++] as tf.Tensor2D : p.bias;
  const lora = p.lora.map(f => ({ A: saved[at++] as tf.Tensor2D, B: saved[at++] as tf.Tensor2D, scaling: f.scaling }));
  return [{ ...p, weight, bias, lora }, at];
}
