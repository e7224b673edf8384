/** Argument checks shared by the fused and the reference experts: the weights' shapes must agree. */
import type * as tf from '@tensorflow/tfjs-core';
import { assertAdapterList, checkExpertFactors } from '../lora/validate_lora.js';
import type { ExpertActivation, ExpertWeights, LoRAFactors, LoRAMode } from '../types.js';
import type { DispatchPlan } from './dispatch_plan.js';
import { assertExpertWeight, isPackedExpertWeight } from '../packed.js';
import { assertFiniteNumber, assertOneOf, assertShape, assertTensor, fail } from '../validate.js';

export interface ExpertDims {
  numTokens: number;    // T
  hidden: number;       // H
  inter: number;        // I
  numExperts: number;   // E
  topK: number;         // K
  transposed: boolean;  // W stored [E, in, out]: gpt-oss, Llama 4
  interleaved: boolean; // gate/up columns alternate (gpt-oss); else gate half then up half
}

function checkLoRA(op: string, arg: string, adapters: unknown, e: number, inSize: number, outSize: number): void {
  if (adapters === undefined) return;
  assertAdapterList(op, arg, adapters);
  adapters.forEach((f, i) => checkExpertFactors(op, `${arg}[${i}].`, f, e, outSize, inSize, `in = ${inSize}, out = ${outSize}`));
}

/** Like assertShape, on a shape (a packed weight's is its logical shape). */
function assertLogicalShape(op: string, arg: string, actual: readonly number[], shape: number[], context: string): void {
  if (actual.length !== shape.length || !shape.every((d, i) => d === actual[i])) {
    fail(op, `'${arg}' must have shape [${shape}] but got [${actual}]${context ? ` (${context})` : ''}`);
  }
}

export function checkExpertArgs(
    op: string, x: unknown, routingWeights: unknown, experts: unknown,
    weights: ExpertWeights, activation: ExpertActivation): ExpertDims {
  assertTensor(op, 'x', x, 2);
  assertTensor(op, 'routing.weights', routingWeights, 2);
  assertTensor(op, 'routing.experts', experts, 2, 'int32');
  if (weights == null || typeof weights !== 'object') fail(op, `'weights' must be an ExpertWeights object but got ${weights}`);
  const layout = weights.layout ?? 'outIn';
  assertOneOf(op, 'weights.layout', layout, ['outIn', 'inOutInterleaved', 'inOut'] as const);
  assertExpertWeight(op, 'weights.gateUp', weights.gateUp);
  assertExpertWeight(op, 'weights.down', weights.down);
  const [numTokens, hidden] = (x as tf.Tensor2D).shape;
  if (numTokens < 1) fail(op, `'x' must have at least one token but got shape [${(x as tf.Tensor).shape}]`);
  const transposed = layout !== 'outIn';
  const interleaved = layout === 'inOutInterleaved';
  const [numExperts, a, b] = weights.gateUp.shape;
  const twoI = transposed ? b : a;
  if (twoI % 2 !== 0) fail(op, `'weights.gateUp' must have an even gate+up size (2I) but got shape [${weights.gateUp.shape}]`);
  const inter = twoI / 2;
  assertLogicalShape(op, 'weights.gateUp', weights.gateUp.shape,
      transposed ? [numExperts, hidden, twoI] : [numExperts, twoI, hidden], `x is [${(x as tf.Tensor).shape}]`);
  assertLogicalShape(op, 'weights.down', weights.down.shape,
      transposed ? [numExperts, inter, hidden] : [numExperts, hidden, inter],
      `gateUp is [${weights.gateUp.shape}], x is [${(x as tf.Tensor).shape}]`);
  const topK = (routingWeights as tf.Tensor2D).shape[1];
  assertShape(op, 'routing.weights', routingWeights as tf.Tensor, [numTokens, null], `x is [${(x as tf.Tensor).shape}]`);
  assertShape(op, 'routing.experts', experts as tf.Tensor, [numTokens, topK],
      `routing.weights is [${(routingWeights as tf.Tensor).shape}]`);
  if (topK < 1 || topK > numExperts) fail(op, `top-k (${topK}) must be in [1, num experts (${numExperts})]`);
  if (weights.gateUpBias !== undefined) {
    assertTensor(op, 'weights.gateUpBias', weights.gateUpBias, 2);
    assertShape(op, 'weights.gateUpBias', weights.gateUpBias, [numExperts, twoI]);
  }
  if (weights.downBias !== undefined) {
    assertTensor(op, 'weights.downBias', weights.downBias, 2);
    assertShape(op, 'weights.downBias', weights.downBias, [numExperts, hidden]);
  }
  checkLoRA(op, 'weights.gateUpLoRA', weights.gateUpLoRA, numExperts, hidden, twoI);
  checkLoRA(op, 'weights.downLoRA', weights.downLoRA, numExperts, inter, hidden);
  assertOneOf(op, 'activation.kind', activation?.kind, ['swiglu', 'clampedSwiglu', 'gegluTanh'] as const);
  if (activation.kind === 'clampedSwiglu') {
    assertFiniteNumber(op, 'activation.alpha', activation.alpha);
    assertFiniteNumber(op, 'activation.limit', activation.limit);
  }
  return { numTokens, hidden, inter, numExperts, topK, transposed, interleaved };
}

/** The options of a routed-experts call, resolved the same way by every implementation. */
export interface ExpertCallSettings {
  dims: ExpertDims;
  loraMode: LoRAMode;
  upLoRA: LoRAFactors[];
  downLoRA: LoRAFactors[];
  /** base weights get gradients: asked for, or by default when no expert adapter is active */
  train: boolean;
}

/**
 * Checks a routed-experts call (arguments and, when given, a prebuilt dispatch plan) and resolves
 * its options; shared by fusedExperts and the backend implementations registered beside it.
 */
export function resolveExpertCall(
    op: string, x: unknown, routing: { weights: unknown; experts: unknown } | undefined, weights: ExpertWeights,
    activation: ExpertActivation,
    options: { loraMode?: LoRAMode; trainExpertWeights?: boolean; plan?: Pick<DispatchPlan, 'numTokens' | 'topK' | 'numExperts'> }): ExpertCallSettings {
  const dims = checkExpertArgs(op, x, routing?.weights, routing?.experts, weights, activation);
  const loraMode = options.loraMode ?? 'auto';
  assertOneOf(op, 'options.loraMode', loraMode, ['materialize', 'split', 'auto'] as const);
  const plan = options.plan;
  if (plan !== undefined && (plan.numTokens !== dims.numTokens || plan.topK !== dims.topK || plan.numExperts !== dims.numExperts)) {
    fail(op, `'options.plan' is for T=${plan.numTokens}, K=${plan.topK}, E=${plan.numExperts} ` +
        `but the call has T=${dims.numTokens}, K=${dims.topK}, E=${dims.numExperts}`);
  }
  const upLoRA = weights.gateUpLoRA ?? [];
  const downLoRA = weights.downLoRA ?? [];
  const packed = isPackedExpertWeight(weights.gateUp) || isPackedExpertWeight(weights.down);
  // packed 16-bit experts are frozen: no f32 master to update (load with expertDtype 'float32')
  if (packed && options.trainExpertWeights === true) {
    fail(op, `'options.trainExpertWeights' is true but the expert weights are packed ` +
        `(${isPackedExpertWeight(weights.gateUp) ? weights.gateUp.kind : (weights.down as { kind: string }).kind}), which are frozen; ` +
        `load the model with expertDtype 'float32' to train the experts themselves`);
  }
  const train = options.trainExpertWeights ?? (!packed && upLoRA.length === 0 && downLoRA.length === 0);
  return { dims, loraMode, upLoRA, downLoRA, train };
}
