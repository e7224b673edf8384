/** route(): the routing registry, keyed by RoutingKind. */
import type { Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import type { Routing, RoutingConfig, RoutingKind } from '../types.js';
import { assertOneOf, fail } from '../validate.js';
import { routeSigmoidGroupTopK } from './sigmoid_group_topk.js';
import { routeSoftmaxBiasedTopK } from './softmax_biased_topk.js';
import { routeSoftmaxGroupLimitedGreedy } from './softmax_group_limited_greedy.js';
import { routeSoftmaxGroupTopK } from './softmax_group_topk.js';
import { routeSoftmaxTopK } from './softmax_topk.js';
import { routeTopKSoftmax } from './topk_softmax.js';

/** A routing implementation: validates its own arguments and returns a fresh Routing. */
export type RoutingFn =
    (logits: Tensor2D, config: RoutingConfig, correctionBias?: Tensor1D) => Routing;

const registry = new Map<RoutingKind, RoutingFn>();

/**
 * Registers (or replaces) the implementation of a routing kind, e.g. a backend-specific kernel.
 * Returns the implementation it replaced, if any, so that it can be put back.
 *
 * ```js
 * const previous = registerRouting('softmaxTopK', (logits, config) => myFusedSoftmaxTopK(logits, config.topK));
 * ```
 */
export function registerRouting(kind: RoutingKind, fn: RoutingFn): RoutingFn | undefined {
  if (typeof kind !== 'string' || kind.length === 0) {
    fail('registerRouting', `'kind' must be a non-empty string but got ${String(kind)} (${typeof kind})`);
  }
  if (typeof fn !== 'function') {
    fail('registerRouting', `'fn' must be a function but got ${String(fn)} (${typeof fn})`);
  }
  const previous = registry.get(kind);
  registry.set(kind, fn);
  return previous;
}

/** The kinds `route()` accepts, in registration order. */
export function registeredRoutingKinds(): RoutingKind[] {
  return [...registry.keys()];
}

/**
 * Routes router logits [T, E] with the registered implementation of `config.kind`; see the
 * routeXxx ops for each family's formula. `correctionBias` [E] is DeepSeek-V3's (ERNIE-4.5's)
 * e_score_correction_bias, used by 'sigmoidGroupTopK' and 'softmaxBiasedTopK' only. Config fields (and a bias) that the
 * kind does not use are rejected rather than ignored. The numeric fields are checked by the op,
 * whose name appears in the message.
 *
 * ```js
 * const r = route(logits, {kind: 'softmaxTopK', topK: 2});
 * tf.dispose(r);  // weights, experts and the logits, which the result took over
 * ```
 */
export function route(logits: Tensor2D, config: RoutingConfig, correctionBias?: Tensor1D): Routing {
  if (config === null || typeof config !== 'object' || Array.isArray(config)) {
    fail('route', `'config' must be a RoutingConfig object but got ${config === null ? 'null' : typeof config}`);
  }
  assertOneOf('route', 'config.kind', config.kind, registeredRoutingKinds());
  return registry.get(config.kind)!(logits, config, correctionBias);
}

type ConfigField = Exclude<keyof RoutingConfig, 'kind' | 'topK'>;

/** The kinds that take a correction bias (selection only). */
export const CORRECTION_BIAS_KINDS: readonly RoutingKind[] = ['sigmoidGroupTopK', 'softmaxBiasedTopK'];

/** Rejects the config fields (and the bias) that `kind` does not use instead of ignoring them. */
function rejectUnused(
    config: RoutingConfig, used: ConfigField[], correctionBias: Tensor1D | undefined,
    usesBias = false): void {
  const all: ConfigField[] = ['renormalize', 'nGroup', 'topkGroup', 'scalingFactor', 'normMin'];
  for (const field of all) {
    if (!used.includes(field) && config[field] !== undefined) {
      fail('route', `'config.${field}' is not used by routing kind '${config.kind}' ` +
          `(it uses topK${used.map(u => `, ${u}`).join('')}) but got ${String(config[field])}`);
    }
  }
  if (!usesBias && correctionBias !== undefined) {
    fail('route', `'correctionBias' is only used by routing kinds ${CORRECTION_BIAS_KINDS.map(k => `'${k}'`).join(', ')} ` +
        `but config.kind is '${config.kind}'`);
  }
}

registerRouting('softmaxTopK', (logits, config, bias) => {
  rejectUnused(config, ['renormalize'], bias);
  return routeSoftmaxTopK(logits, config.topK, { renormalize: config.renormalize });
});
registerRouting('topKSoftmax', (logits, config, bias) => {
  rejectUnused(config, [], bias);
  return routeTopKSoftmax(logits, config.topK);
});
registerRouting('sigmoidGroupTopK', (logits, config, bias) => {
  rejectUnused(config, ['renormalize', 'nGroup', 'topkGroup', 'scalingFactor'], bias, true);
  return routeSigmoidGroupTopK(logits, config.topK, {
    correctionBias: bias, nGroup: config.nGroup, topkGroup: config.topkGroup,
    renormalize: config.renormalize, scalingFactor: config.scalingFactor,
  });
});
registerRouting('softmaxGroupTopK', (logits, config, bias) => {
  rejectUnused(config, ['renormalize', 'nGroup', 'topkGroup', 'scalingFactor'], bias);
  return routeSoftmaxGroupTopK(logits, config.topK, {
    nGroup: config.nGroup, topkGroup: config.topkGroup,
    renormalize: config.renormalize, scalingFactor: config.scalingFactor,
  });
});
registerRouting('softmaxGroupLimitedGreedy', (logits, config, bias) => {
  rejectUnused(config, ['nGroup', 'topkGroup', 'scalingFactor'], bias);
  return routeSoftmaxGroupLimitedGreedy(logits, config.topK, {
    nGroup: config.nGroup, topkGroup: config.topkGroup, scalingFactor: config.scalingFactor,
  });
});
registerRouting('softmaxBiasedTopK', (logits, config, bias) => {
  rejectUnused(config, ['normMin'], bias, true);
  return routeSoftmaxBiasedTopK(logits, config.topK, { correctionBias: bias, normMin: config.normMin });
});
