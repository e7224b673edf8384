/**
 * The MoE block: router (+ router LoRA) → routing → routed experts (+ shared experts).
 * Implementations sit in a registry with one signature: 'fused' (the customGrad ops) and
 * 'reference' (the plain per-expert loop, the oracle). Both take and return the same things.
 */
import type * as tf from '@tensorflow/tfjs-core';
import * as tfc from '@tensorflow/tfjs-core';
import { fusedExperts } from './experts/fused_experts.js';
import { routerLogits } from './lora/router_logits.js';
import { referenceMoEBlock } from './reference/moe_block.js';
import { route } from './routing/route.js';
import { checkSharedExpert, sharedExpert } from './shared_expert.js';
import type { ExpertKernel, LoRAMode, MoEBlockConfig, MoEBlockWeights, Routing } from './types.js';
import { assertShape, assertTensor, fail } from './validate.js';
import { describeValue } from '../util/describe.js';

export interface MoEBlockOptions {
  /** 'fused' (default) or 'reference', or a name given to registerMoEBlockKernel */
  expertKernel?: ExpertKernel | string;
  /** expert LoRA: 'materialize' | 'split' | 'auto' (default) */
  loraMode?: LoRAMode;
  /** gradients for the expert base weights; default: true when no expert LoRA is active */
  trainExpertWeights?: boolean;
}

export interface MoEBlockResult {
  /** [T, H] */
  out: tf.Tensor2D;
  /** weights [T, K], experts [T, K], logits [T, E]; dispose with the result */
  routing: Routing;
}

export type MoEBlockKernel = (
    x: tf.Tensor2D, weights: MoEBlockWeights, config: MoEBlockConfig, options: MoEBlockOptions) => MoEBlockResult;

/** A backend's own implementation of the routed experts, with fusedExperts' signature and contract. */
export type ExpertsImplementation = typeof fusedExperts;

const expertsByBackend = new Map<string, ExpertsImplementation>();

/**
 * Makes the 'fused' block use `impl` for the routed experts when `backend` is active (e.g. WebGPU
 * kernels that build the dispatch plan on the device); every other backend keeps the composed
 * fusedExperts. Returns the implementation it replaced, so it can be put back.
 */
export function registerExpertsImplementation(
    backend: string, impl: ExpertsImplementation | undefined): ExpertsImplementation | undefined {
  const previous = expertsByBackend.get(backend);
  if (impl === undefined) expertsByBackend.delete(backend);
  else expertsByBackend.set(backend, impl);
  return previous;
}

function fusedMoEBlock(
    x: tf.Tensor2D, weights: MoEBlockWeights, config: MoEBlockConfig, options: MoEBlockOptions): MoEBlockResult {
  const logits = routerLogits(x, weights.router);
  let routing: Routing | undefined;
  try {
    routing = route(logits, config.routing, weights.router.correctionBias);
    if (weights.router.expertScale) routing = scaledByExpert(routing, weights.router.expertScale);
    const chosen = routing;
    const out = tfc.tidy(() => {
      const experts = expertsByBackend.get(tfc.getBackend()) ?? fusedExperts;
      const settings = { loraMode: options.loraMode, trainExpertWeights: options.trainExpertWeights };
      const routed = config.weightedInput ?
        inputWeightedExperts(experts, x, chosen, weights, config, settings) :
        experts(x, chosen, weights.experts, config.activation, settings);
      return weights.shared ? tfc.add(routed, sharedExpert(x, weights.shared)) as tf.Tensor2D : routed;
    });
    return { out, routing };
  } catch (err) {
    // bad expert weights are found after routing ran: leave nothing behind
    tfc.dispose([logits, routing?.weights, routing?.experts].filter(t => t != null) as tf.Tensor[]);
    throw err;
  }
}

/**
 * Gemma 4's per_expert_scale: w[t, k] · expertScale[e[t, k]] (plain autodiff, so the scale gets its
 * gradient). The Routing's unscaled weights are replaced (disposed: the tape keeps its own copies).
 */
function scaledByExpert(routing: Routing, expertScale: tf.Tensor1D): Routing {
  const experts = routing.experts;
  const [T, K] = experts.shape;
  const E = expertScale.shape[0];
  // the scale at each chosen expert; the chosen experts are a constant here (no gradient reaches
  // them), saved because the caller may dispose the Routing before backprop
  const pick = tfc.customGrad((...args: Array<tf.Tensor | tf.GradSaveFunc>) => {
    const save = args[1] as tf.GradSaveFunc;
    save([experts]);
    return {
      value: tfc.gather(args[0] as tf.Tensor1D, experts),                                       // [T, K]
      gradFunc: (dy: tf.Tensor, saved: tf.Tensor[]) =>
        tfc.scatterND(tfc.reshape(saved[0], [T * K, 1]), tfc.reshape(dy, [T * K]), [E]),        // [E]
    };
  });
  const weights = tfc.tidy(() => tfc.mul(routing.weights, pick(expertScale)) as tf.Tensor2D);
  routing.weights.dispose();
  return { ...routing, weights };
}

/**
 * Llama 4's routed experts, Σ_k expert_k(w_k·x), through any experts implementation: every
 * (token, slot) pair becomes a row w[t,k]·x[t] (row t·K + k) routed to its one expert with weight
 * 1, and the K rows of a token are summed. The scaling and the sum are plain autodiff ops, so the
 * gradient reaches x and the routing weights through them; the implementation's own routing-weight
 * gradient (of the constant ones) is unused.
 */
function inputWeightedExperts(
    experts: ExpertsImplementation, x: tf.Tensor2D, routing: Routing, weights: MoEBlockWeights,
    config: MoEBlockConfig, settings: Parameters<ExpertsImplementation>[4]): tf.Tensor2D {
  const [T, K] = routing.experts.shape;
  const H = x.shape[1];
  const rows = tfc.reshape(tfc.mul(tfc.expandDims(x, 1), tfc.expandDims(routing.weights, 2)), [T * K, H]);  // [T·K, H]
  const pairs = { weights: tfc.ones([T * K, 1]) as tf.Tensor2D, experts: tfc.reshape(routing.experts, [T * K, 1]) as tf.Tensor2D };
  const y = experts(rows as tf.Tensor2D, pairs, weights.experts, config.activation, settings);               // [T·K, H]
  return tfc.sum(tfc.reshape(y, [T, K, H]), 1) as tf.Tensor2D;                                                // [T, H]
}

const kernels = new Map<string, MoEBlockKernel>([
  ['fused', fusedMoEBlock],
  ['reference', (x, weights, config) => referenceMoEBlock(x, weights, config)],
]);

/** Adds (or replaces) a block implementation under `name`, e.g. a backend-specific one. */
export function registerMoEBlockKernel(name: string, kernel: MoEBlockKernel): void {
  kernels.set(name, kernel);
}

export function moeBlockKernelNames(): string[] {
  return [...kernels.keys()];
}

/**
 * One MoE feed-forward block on x [T, H] (flatten batch and sequence first).
 *
 * ```js
 * const {out, routing} = moeBlock(x, {router: {weight: Wg}, experts: {gateUp: W1, down: W2}},
 *     {routing: {kind: 'softmaxTopK', topK: 2, renormalize: true}, activation: {kind: 'swiglu'}});
 * ```
 */
export function moeBlock(
    x: tf.Tensor2D, weights: MoEBlockWeights, config: MoEBlockConfig, options: MoEBlockOptions = {}): MoEBlockResult {
  const op = 'moeBlock';
  const name = options.expertKernel ?? 'fused';
  const kernel = kernels.get(name);
  if (kernel === undefined) {
    fail(op, `'options.expertKernel' must be one of ${[...kernels.keys()].map(k => `'${k}'`).join(', ')} but got '${name}'`);
  }
  assertTensor(op, 'x', x, 2);
  if (weights?.router == null || weights.experts == null) {
    fail(op, `'weights' must have 'router' and 'experts' but got keys ${Object.keys(weights ?? {}).join(', ') || 'none'}`);
  }
  if (config?.routing == null || config.activation == null) {
    fail(op, `'config' must have 'routing' and 'activation' but got keys ${Object.keys(config ?? {}).join(', ') || 'none'}`);
  }
  if (config.weightedInput !== undefined && typeof config.weightedInput !== 'boolean') {
    fail(op, `'config.weightedInput' must be a boolean but got ${describeValue(config.weightedInput)}`);
  }
  if (weights.shared) checkSharedExpert(op, weights.shared, x.shape[1]);
  const expertScale = weights.router.expertScale;
  if (expertScale !== undefined) {
    assertTensor(op, 'weights.router.weight', weights.router.weight, 2);
    assertTensor(op, 'weights.router.expertScale', expertScale, 1);
    assertShape(op, 'weights.router.expertScale', expertScale, [weights.router.weight.shape[0]],
        `E from router.weight [${weights.router.weight.shape}]`);
  }
  return kernel(x, weights, config, options);
}
