/**
 * Addresses of the tensors inside `MoEBlockWeights`, so that code which differentiates a block
 * (parity, training) can list its parameters, hand them to tf.grads as inputs and put the
 * traced copies back, without knowing the family.
 */
import type * as tf from '@tensorflow/tfjs-core';
import type {
  ExpertWeights, MoEBlockWeights, RouterWeights, SharedExpertWeights,
} from '../ops/types.js';

export type WeightField =
  | 'router.weight' | 'router.bias' | 'router.correctionBias' | 'router.inputScale' | 'router.expertScale'
  | 'experts.gateUp' | 'experts.down' | 'experts.gateUpBias' | 'experts.downBias'
  | 'shared.gate' | 'shared.up' | 'shared.down' | 'shared.sigmoidGate';

/** The trainable fields in a fixed order (correctionBias is a buffer: selection only, no gradient). */
export const TRAINABLE_FIELDS: readonly WeightField[] = [
  'router.weight', 'router.bias', 'router.inputScale', 'router.expertScale',
  'experts.gateUp', 'experts.down', 'experts.gateUpBias', 'experts.downBias',
  'shared.gate', 'shared.up', 'shared.down', 'shared.sigmoidGate',
];

type Part = 'router' | 'experts' | 'shared';

function split(field: WeightField): [Part, string] {
  const dot = field.indexOf('.');
  return [field.slice(0, dot) as Part, field.slice(dot + 1)];
}

/** The tensor at `field`, or undefined when the block has none there. */
export function getWeightField(weights: MoEBlockWeights, field: WeightField): tf.Tensor | undefined {
  const [part, key] = split(field);
  const holder = weights[part] as unknown as Record<string, unknown> | undefined;
  return holder?.[key] as tf.Tensor | undefined;
}

/** A shallow copy of `weights` with the given fields replaced (the inputs are not mutated). */
export function withWeightFields(
    weights: MoEBlockWeights, replace: ReadonlyArray<[WeightField, tf.Tensor]>): MoEBlockWeights {
  const router: RouterWeights = { ...weights.router };
  const experts: ExpertWeights = { ...weights.experts };
  const shared: SharedExpertWeights | undefined = weights.shared ? { ...weights.shared } : undefined;
  const parts: Record<Part, Record<string, unknown> | undefined> = {
    router: router as unknown as Record<string, unknown>,
    experts: experts as unknown as Record<string, unknown>,
    shared: shared as unknown as Record<string, unknown> | undefined,
  };
  for (const [field, tensor] of replace) {
    const [part, key] = split(field);
    const holder = parts[part];
    if (holder === undefined || holder[key] === undefined) {
      throw new Error(`withWeightFields: the block has no '${field}' to replace`);
    }
    holder[key] = tensor;
  }
  return shared ? { router, experts, shared } : { router, experts };
}

/** The trainable tensors present in `weights`, in TRAINABLE_FIELDS order. */
export function trainableWeightFields(weights: MoEBlockWeights): Array<[WeightField, tf.Tensor]> {
  const out: Array<[WeightField, tf.Tensor]> = [];
  for (const field of TRAINABLE_FIELDS) {
    const t = getWeightField(weights, field);
    if (t !== undefined) out.push([field, t]);
  }
  return out;
}

/** Disposes every tensor of a loaded block (LoRA factors included). */
export function disposeMoEBlockWeights(weights: MoEBlockWeights): void {
  const all: tf.Tensor[] = [];
  for (const field of [...TRAINABLE_FIELDS, 'router.correctionBias'] as WeightField[]) {
    const t = getWeightField(weights, field);
    if (t) all.push(t);
  }
  for (const lora of [
    ...(weights.router.lora ?? []), ...(weights.experts.gateUpLoRA ?? []),
    ...(weights.experts.downLoRA ?? [])]) {
    all.push(lora.A, lora.B);
  }
  for (const t of all) t.dispose();
}
