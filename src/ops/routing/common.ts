/**
 * Pieces shared by the fused routing ops: argument checks, the gradient-free expert selection,
 * the group mask of the group-limited kinds, and the weight computations with their analytic
 * backward passes (forward/backward pairs side by side). Internal: not re-exported by index.ts.
 *
 * Every routing op has the same structure: `select` picks the experts as a tape leaf (no
 * gradient reaches the logits through it, so an aux loss fed with `experts` never meets the
 * missing TopK gradient), then one tf.customGrad computes the K weights from the logits and the
 * chosen experts and returns their gradient analytically.
 */
import * as tf from '@tensorflow/tfjs-core';
import type { GradSaveFunc, Tensor, Tensor1D, Tensor2D } from '@tensorflow/tfjs-core';
import { indexCounts } from '../index_counts.js';
import type { Routing } from '../types.js';
import { assertFiniteNumber, assertInteger, assertShape, assertTensor, fail } from '../validate.js';

// ---- argument checks ----------------------------------------------------------------------

/** logits must be a 2-D float32 tensor [T, E] with T, E >= 1 (empty batches are not supported). */
export function checkLogits(op: string, logits: unknown): asserts logits is Tensor2D {
  assertTensor(op, 'logits', logits, 2);
  if (logits.shape[0]! < 1 || logits.shape[1]! < 1) {
    fail(op, `'logits' must have at least one token and one expert but got shape [${logits.shape}]`);
  }
}

/** An options argument must be an object (or left out). */
export function checkOptions(op: string, options: unknown): void {
  if (options === null || typeof options !== 'object' || Array.isArray(options)) {
    const got = options === null ? 'null' : Array.isArray(options) ? 'an array' : `${String(options)} (${typeof options})`;
    fail(op, `'options' must be an object but got ${got}`);
  }
}

export function checkTopK(op: string, k: unknown, numExperts: number): asserts k is number {
  assertInteger(op, 'k', k, 1);
  if (k > numExperts) fail(op, `'k' must be <= num experts (${numExperts}) but got ${k}`);
}

export function checkBoolean(op: string, arg: string, value: unknown, fallback: boolean): boolean {
  if (value === undefined) return fallback;
  if (typeof value !== 'boolean') {
    fail(op, `'${arg}' must be a boolean but got ${typeof value === 'string' ? `'${value}'` : String(value)} (${typeof value})`);
  }
  return value;
}

export function checkScalingFactor(op: string, value: unknown): number {
  if (value === undefined) return 1;
  assertFiniteNumber(op, 'scalingFactor', value);
  return value;
}

/** nGroup divides E, 1 <= topkGroup <= nGroup, and the kept groups hold at least k experts. */
export function checkGroups(
    op: string, nGroup: unknown, topkGroup: unknown, numExperts: number, k: number): void {
  assertInteger(op, 'nGroup', nGroup, 1);
  if (numExperts % nGroup !== 0) {
    fail(op, `'nGroup' must divide num experts (${numExperts}) but got ${nGroup}`);
  }
  assertInteger(op, 'topkGroup', topkGroup, 1);
  if (topkGroup > nGroup) fail(op, `'topkGroup' must be <= nGroup (${nGroup}) but got ${topkGroup}`);
  const kept = topkGroup * (numExperts / nGroup);
  if (kept < k) {
    fail(op, `'k' must be <= topkGroup·(E/nGroup) = ${topkGroup}·${numExperts / nGroup} = ${kept} ` +
        `(the experts in the kept groups) but got ${k}`);
  }
}

export function checkCorrectionBias(
    op: string, bias: unknown, logits: Tensor2D): asserts bias is Tensor1D {
  assertTensor(op, 'correctionBias', bias, 1);
  assertShape(op, 'correctionBias', bias, [logits.shape[1]], `logits [T,E] = [${logits.shape}]`);
}

// ---- selection ----------------------------------------------------------------------------

/**
 * Runs `select(logits)` (int32 [T, K]) inside a customGrad whose gradient is zero, so the chosen
 * experts are a leaf of the tape: later ops on them (one_hot in an aux loss) backpropagate into
 * the logits as zeros instead of reaching TopK, which has no gradient in tfjs.
 */
export function selectExperts(logits: Tensor2D, select: (logits: Tensor2D) => Tensor2D): Tensor2D {
  const shape = logits.shape;
  const leaf = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => ({
    value: select(args[0] as Tensor2D),                 // [T, K] int32
    gradFunc: () => tf.zeros(shape, 'float32'),          // [T, E]
  }));
  return leaf(logits) as Tensor2D;
}

/** Indices of the k largest scores per row, descending (tf.topk order, ties to the lower index). */
export function topKIndices(scores: Tensor2D, k: number): Tensor2D {
  return tf.tidy(() => tf.topk(scores, k).indices as Tensor2D);   // [T, K] int32
}

/** How a group of experts is scored when choosing groups. */
export type GroupScore =
  /** sum of the two largest scores of the group (the only one if the group has one expert) */
  | 'sumOfTop2'
  /** the largest score of the group */
  | 'max';

/**
 * Keeps, per token, the `topkGroup` best of `nGroup` contiguous expert groups and sets the scores
 * of the other groups to exactly 0.0, as transformers' masked_fill does: a masked expert can
 * therefore still beat kept experts whose (biased) score is negative.
 */
export function maskToTopGroups(
    scores: Tensor2D, nGroup: number, topkGroup: number, groupScore: GroupScore): Tensor2D {
  if (topkGroup === nGroup) return scores.clone();
  return tf.tidy(() => {
    const [T, E] = scores.shape;
    const size = E / nGroup;
    const grouped = tf.reshape(scores, [T, nGroup, size]);                     // [T, G, E/G]
    let perGroup: Tensor;                                                      // [T, G]
    if (groupScore === 'max') perGroup = tf.max(grouped, 2);
    else if (size === 1) perGroup = tf.reshape(grouped, [T, nGroup]);
    else perGroup = tf.sum(tf.topk(grouped, 2).values, 2);
    const keptGroups = tf.topk(perGroup, topkGroup).indices;                   // [T, topkGroup]
    // not tf.sum(tf.oneHot(keptGroups, nGroup), 1): all zeros on webgpu (index_counts.ts says why)
    const groupKept = indexCounts(keptGroups, nGroup);                         // [T, G] 0/1
    const kept = tf.greater(tf.tile(tf.reshape(groupKept, [T, nGroup, 1]), [1, 1, size]), 0);
    return tf.reshape(tf.where(kept, grouped, tf.zerosLike(grouped)), [T, E]) as Tensor2D;
  });
}

// ---- weights: forward/backward pairs --------------------------------------------------------

/** Row offsets t·E added to expert ids: flat indices into a [T·E] view. */
function flatIndices(experts: Tensor2D, numExperts: number): Tensor {
  const [T, K] = experts.shape;
  const rows = tf.mul(tf.range(0, T, 1, 'int32'), tf.scalar(numExperts, 'int32'));   // [T]
  return tf.reshape(tf.add(experts, tf.reshape(rows, [T, 1])), [T * K]);             // [T*K]
}

/** out[t, k] = values[t, experts[t, k]]. */
export function gatherSelected(values: Tensor2D, experts: Tensor2D): Tensor2D {
  return tf.tidy(() => {
    const [T, E] = values.shape;
    const flat = tf.gather(tf.reshape(values, [T * E]), flatIndices(experts, E));     // [T*K]
    return tf.reshape(flat, experts.shape) as Tensor2D;                                // [T, K]
  });
}

/** The adjoint of gatherSelected: dSel [T, K] scattered into zeros [T, E]. */
export function gatherSelectedBackward(dSel: Tensor2D, experts: Tensor2D, numExperts: number): Tensor2D {
  return tf.tidy(() => {
    const [T, K] = experts.shape;
    const indices = tf.reshape(flatIndices(experts, numExperts), [T * K, 1]);        // [T*K, 1]
    const flat = tf.scatterND(indices, tf.reshape(dSel, [T * K]), [T * numExperts]); // [T*E]
    return tf.reshape(flat, [T, numExperts]) as Tensor2D;                              // [T, E]
  });
}

/** What happens to the K gathered scores q: w = s·q / (Σq + ε) if renormalize, else w = s·q. */
export interface WeightNormalization {
  renormalize: boolean;
  /** added to Σq (1e-20 in DeepSeek-V3 / Mistral4, 0 in Mixtral / Qwen) */
  epsilon: number;
  scalingFactor: number;
}

export function normalizeSelected(selected: Tensor2D, norm: WeightNormalization): Tensor2D {
  return tf.tidy(() => {
    let w: Tensor = selected;                                                         // [T, K]
    if (norm.renormalize) {
      const denom = tf.add(tf.sum(selected, 1, true), norm.epsilon);                  // [T, 1]
      w = tf.div(w, denom);
    }
    return (norm.scalingFactor === 1 ? w.clone() : tf.mul(w, norm.scalingFactor)) as Tensor2D;
  });
}

/** dq = (s·dy − Σ(dy·w)) / D with D = Σq + ε when renormalizing, else s·dy. */
export function normalizeSelectedBackward(
    dy: Tensor2D, selected: Tensor2D, norm: WeightNormalization): Tensor2D {
  return tf.tidy(() => {
    if (!norm.renormalize) return tf.mul(dy, norm.scalingFactor) as Tensor2D;        // [T, K]
    const denom = tf.add(tf.sum(selected, 1, true), norm.epsilon);                    // [T, 1]
    const w = tf.mul(tf.div(selected, denom), norm.scalingFactor);                    // [T, K]
    const dyDotW = tf.sum(tf.mul(dy, w), 1, true);                                    // [T, 1]
    return tf.div(tf.sub(tf.mul(dy, norm.scalingFactor), dyDotW), denom) as Tensor2D;
  });
}

/** Backward of p = softmax(z) along the last axis: dz = p·(dp − Σ dp·p). */
export function softmaxBackward(p: Tensor2D, dp: Tensor2D): Tensor2D {
  return tf.tidy(() => tf.mul(p, tf.sub(dp, tf.sum(tf.mul(dp, p), 1, true))) as Tensor2D);
}

/** Backward of s = sigmoid(z): dz = ds·s·(1 − s). */
export function sigmoidBackward(s: Tensor2D, ds: Tensor2D): Tensor2D {
  return tf.tidy(() => tf.mul(ds, tf.mul(s, tf.sub(1, s))) as Tensor2D);
}

/** The score every expert gets before selection: softmax or sigmoid of its logit. */
export type ExpertScore = 'softmax' | 'sigmoid';

/**
 * weights = normalize(score(logits) at the chosen experts), as one customGrad of the logits:
 * the gradient reaches the logits through the K chosen scores only.
 */
export function selectedScoreWeights(
    logits: Tensor2D, experts: Tensor2D, score: ExpertScore, norm: WeightNormalization): Tensor2D {
  const numExperts = logits.shape[1];
  const weigh = tf.customGrad((...args: Array<Tensor | GradSaveFunc>) => {
    const [x, save] = args as [Tensor, GradSaveFunc];
    const scores = (score === 'softmax' ? tf.softmax(x) : tf.sigmoid(x)) as Tensor2D;  // [T, E]
    const selected = gatherSelected(scores, experts);                                    // [T, K]
    // experts is saved (cloned) too: the caller may dispose the Routing before backprop.
    save([scores, selected, experts]);
    return {
      value: normalizeSelected(selected, norm),                                          // [T, K]
      gradFunc: (dy: Tensor, saved: Tensor[]) => {
        const [s, sel, chosen] = saved as Tensor2D[];
        const dSel = normalizeSelectedBackward(dy as Tensor2D, sel, norm);              // [T, K]
        const dScores = gatherSelectedBackward(dSel, chosen, numExperts);               // [T, E]
        return score === 'softmax' ? softmaxBackward(s, dScores) : sigmoidBackward(s, dScores);
      },
    };
  });
  return weigh(logits) as Tensor2D;
}

/**
 * Runs `compute` in a tidy and assembles the op result. `logits` in the result is the input
 * tensor itself (not a copy): the Routing takes it over, so disposing the Routing's three
 * tensors frees everything, and callers must not expect the logits to outlive it (disposing them
 * twice is harmless in tfjs).
 */
export function tidyRouting(
    logits: Tensor2D, compute: () => { weights: Tensor2D; experts: Tensor2D }): Routing {
  const [weights, experts] = tf.tidy(() => {
    const r = compute();
    return [r.weights, r.experts];
  }) as [Tensor2D, Tensor2D];
  return { weights, experts, logits };
}
