/**
 * The plain routing oracle: every routing family written with ordinary tfjs ops and plain
 * autodiff (no customGrad, no gather), independently of src/ops/routing/. The fused ops are
 * tested against it, and the reference MoE block uses it.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { Tensor, Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import { indexCounts } from '../index_counts.js';
import type { Routing, RoutingConfig, RoutingKind } from '../types.js';
import { assertFiniteNumber, assertInteger, assertOneOf, assertShape, assertTensor, fail } from '../validate.js';

const OP = 'referenceRoute';

const KINDS: readonly RoutingKind[] =
    ['softmaxTopK', 'topKSoftmax', 'sigmoidGroupTopK', 'softmaxGroupTopK', 'softmaxGroupLimitedGreedy',
      'softmaxBiasedTopK', 'topKSigmoid'];

/** The kinds that take a correction bias (selection only). */
const BIAS_KINDS: readonly RoutingKind[] = ['sigmoidGroupTopK', 'softmaxBiasedTopK'];

/** The config fields each kind reads besides kind and topK. */
const FIELDS: Record<RoutingKind, ReadonlyArray<keyof RoutingConfig>> = {
  softmaxTopK: ['renormalize'],
  topKSoftmax: [],
  sigmoidGroupTopK: ['renormalize', 'nGroup', 'topkGroup', 'scalingFactor'],
  softmaxGroupTopK: ['renormalize', 'nGroup', 'topkGroup', 'scalingFactor'],
  softmaxGroupLimitedGreedy: ['nGroup', 'topkGroup', 'scalingFactor'],
  softmaxBiasedTopK: ['normMin'],
  topKSigmoid: [],
};

/**
 * Routes router logits [T, E] like `route()` does, plainly: the experts come from tf.topk on a
 * tape-free view of the logits, and the weights are ordinary differentiable ops of the logits
 * that pick the chosen experts' scores with a one-hot product instead of a gather (wasm has no
 * gather gradient). Same families, formulas, defaults, checks and result as `route()`:
 * `experts` in descending order of the selection score, and `logits` is the input tensor itself
 * (the result takes it over; disposing its three tensors frees everything).
 *
 * ```js
 * const r = referenceRoute(logits, {kind: 'sigmoidGroupTopK', topK: 4, nGroup: 4, topkGroup: 2,
 *     scalingFactor: 2.5}, correctionBias);
 * tf.dispose(r);
 * ```
 */
export function referenceRoute(logits: Tensor2D, config: RoutingConfig, correctionBias?: Tensor1D): Routing {
  checkArgs(logits, config, correctionBias);
  const numExperts = logits.shape[1];
  const k = config.topK;
  const renormalize = config.renormalize ?? true;
  const nGroup = config.nGroup ?? 1;
  const topkGroup = config.topkGroup ?? 1;
  const scale = config.scalingFactor ?? 1;

  const experts = chooseExperts(logits, config.kind, k, nGroup, topkGroup, correctionBias);   // [T, K]
  const weights = tf.tidy(() => {
    // one-hot by comparison (tf.oneHot refuses depth 1); experts has no tape path, so Equal needs no gradient
    const ids = tf.range(0, numExperts, 1, 'int32');                                             // [E]
    const chosen = tf.cast(tf.equal(tf.expandDims(experts, 2), ids), 'float32');                 // [T, K, E]
    const pick = (v: Tensor): Tensor => tf.sum(tf.mul(tf.expandDims(v, 1), chosen), 2);      // [T, K]
    const normalize = (sel: Tensor, epsilon: number): Tensor =>
      renormalize ? tf.div(sel, tf.add(tf.sum(sel, 1, true), epsilon)) : sel;
    switch (config.kind) {
      case 'softmaxTopK':
        return normalize(pick(tf.softmax(logits)), 0);
      case 'topKSoftmax':
        return tf.softmax(pick(logits));
      case 'sigmoidGroupTopK':
        return tf.mul(normalize(pick(tf.sigmoid(logits)), 1e-20), scale);
      case 'softmaxGroupTopK':
        return tf.mul(normalize(pick(tf.softmax(logits)), 1e-20), scale);
      case 'softmaxGroupLimitedGreedy':
        return tf.mul(pick(tf.softmax(logits)), scale);
      case 'softmaxBiasedTopK': {
        const sel = pick(tf.softmax(logits));
        return tf.div(sel, tf.maximum(tf.sum(sel, 1, true), config.normMin ?? 1e-12));
      }
      case 'topKSigmoid':
        return tf.sigmoid(pick(logits));
    }
  }) as Tensor2D;                                                                                // [T, K]
  return { weights, experts, logits };
}

/**
 * The experts, int32 [T, K]. They are computed from non-trainable variables sharing the data of
 * the logits and the bias: a variable is not the output of any recorded op, so no tape path leads
 * from the logits or the bias to the experts, and nothing downstream of them (an aux loss's
 * one_hot) reaches TopK, which has no gradient. The bias thus gets no gradient at all.
 */
function chooseExperts(
    logits: Tensor2D, kind: RoutingKind, k: number, nGroup: number, topkGroup: number,
    correctionBias: Tensor1D | undefined): Tensor2D {
  const detached = tf.variable(logits, false);
  const bias = correctionBias ? tf.variable(correctionBias, false) : undefined;
  try {
    return tf.tidy(() => {
      let scores: Tensor2D;                                                                      // [T, E]
      if (kind === 'topKSoftmax' || kind === 'topKSigmoid') return tf.topk(detached, k).indices as Tensor2D;
      if (kind === 'sigmoidGroupTopK') {
        scores = tf.sigmoid(detached);
        if (bias) scores = tf.add(scores, bias);
      } else {
        scores = tf.softmax(detached);
        if (bias) scores = tf.add(scores, bias);   // softmaxBiasedTopK (checkArgs refuses a bias elsewhere)
      }
      if (kind !== 'softmaxTopK' && topkGroup < nGroup) {
        scores = keepBestGroups(scores, nGroup, topkGroup, kind === 'softmaxGroupLimitedGreedy' ? 'max' : 'top2');
      }
      return tf.topk(scores, k).indices as Tensor2D;                                            // [T, K]
    });
  } finally {
    detached.dispose();
    bias?.dispose();
  }
}

/** Zeroes (exactly 0.0, like transformers' masked_fill) the scores outside each token's best groups. */
function keepBestGroups(scores: Tensor2D, nGroup: number, topkGroup: number, rank: 'max' | 'top2'): Tensor2D {
  const [T, E] = scores.shape;
  const size = E / nGroup;
  const grouped = tf.reshape(scores, [T, nGroup, size]);                                        // [T, G, E/G]
  let groupScore: Tensor;                                                                        // [T, G]
  if (rank === 'max') groupScore = tf.max(grouped, -1);
  else if (size === 1) groupScore = tf.reshape(grouped, [T, nGroup]);
  else groupScore = tf.sum(tf.topk(grouped, 2).values, -1);
  const best = tf.topk(groupScore, topkGroup).indices;                                          // [T, topkGroup]
  // not tf.oneHot: summed over axis 1 it is all zeros on webgpu (src/ops/index_counts.ts says why)
  const keptGroups = indexCounts(best, nGroup);                                                 // [T, G]
  const groupOf = tf.floorDiv(tf.range(0, E, 1, 'int32'), tf.scalar(size, 'int32'));           // [E]
  const membership = indexCounts(tf.reshape(groupOf, [E, 1]), nGroup);                         // [E, G]
  const keptExperts = tf.matMul(keptGroups, membership, false, true);                           // [T, E]
  return tf.where(tf.greater(keptExperts, 0.5), scores, tf.zerosLike(scores));
}

function checkArgs(logits: unknown, config: unknown, correctionBias: unknown): asserts logits is Tensor2D {
  assertTensor(OP, 'logits', logits, 2);
  const numExperts = logits.shape[1]!;
  if (logits.shape[0]! < 1 || numExperts < 1) {
    fail(OP, `'logits' must have at least one token and one expert but got shape [${logits.shape}]`);
  }
  if (config === null || typeof config !== 'object' || Array.isArray(config)) {
    fail(OP, `'config' must be a RoutingConfig object but got ${config === null ? 'null' : typeof config}`);
  }
  const c = config as RoutingConfig;
  assertOneOf(OP, 'config.kind', c.kind, KINDS);
  const used = FIELDS[c.kind];
  for (const field of ['renormalize', 'nGroup', 'topkGroup', 'scalingFactor', 'normMin'] as const) {
    if (!used.includes(field) && c[field] !== undefined) {
      fail(OP, `'config.${field}' is not used by routing kind '${c.kind}' ` +
          `(it uses topK${used.map(u => `, ${u}`).join('')}) but got ${String(c[field])}`);
    }
  }
  assertInteger(OP, 'config.topK', c.topK, 1);
  if (c.topK > numExperts) fail(OP, `'config.topK' must be <= num experts (${numExperts}) but got ${c.topK}`);
  if (c.renormalize !== undefined && typeof c.renormalize !== 'boolean') {
    const v: unknown = c.renormalize;
    fail(OP, `'config.renormalize' must be a boolean but got ${typeof v === 'string' ? `'${v}'` : String(v)} (${typeof v})`);
  }
  if (used.includes('nGroup')) {
    const nGroup = c.nGroup ?? 1;
    const topkGroup = c.topkGroup ?? 1;
    assertInteger(OP, 'config.nGroup', nGroup, 1);
    if (numExperts % nGroup !== 0) fail(OP, `'config.nGroup' must divide num experts (${numExperts}) but got ${nGroup}`);
    assertInteger(OP, 'config.topkGroup', topkGroup, 1);
    if (topkGroup > nGroup) fail(OP, `'config.topkGroup' must be <= nGroup (${nGroup}) but got ${topkGroup}`);
    const inKeptGroups = topkGroup * (numExperts / nGroup);
    if (c.topK > inKeptGroups) {
      fail(OP, `'config.topK' must be <= topkGroup·(E/nGroup) = ${topkGroup}·${numExperts / nGroup} = ` +
          `${inKeptGroups} (the experts in the kept groups) but got ${c.topK}`);
    }
  }
  if (c.scalingFactor !== undefined) assertFiniteNumber(OP, 'config.scalingFactor', c.scalingFactor);
  if (c.normMin !== undefined) {
    assertFiniteNumber(OP, 'config.normMin', c.normMin);
    if (!(c.normMin > 0)) fail(OP, `'config.normMin' must be > 0 but got ${c.normMin}`);
  }
  if (correctionBias !== undefined) {
    if (!BIAS_KINDS.includes(c.kind)) {
      fail(OP, `'correctionBias' is only used by routing kinds ${BIAS_KINDS.map(k => `'${k}'`).join(', ')} ` +
          `but config.kind is '${c.kind}'`);
    }
    assertTensor(OP, 'correctionBias', correctionBias, 1);
    assertShape(OP, 'correctionBias', correctionBias, [numExperts], `logits [T,E] = [${logits.shape}]`);
  }
}
