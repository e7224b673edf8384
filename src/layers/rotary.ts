/**
 * Rotary position embeddings: rotate-half pairs (i, i + D/2) by the angle position · f_i, with
 * f_i = theta^(−2i/D) for the default rope ("rope_type": "default") or YaRN's blend of f_i and
 * f_i / factor (gpt-oss), whose cos and sin are also scaled by its attention factor.
 */
import * as tf from '@tensorflow/tfjs-core';
import { assertFiniteNumber, assertInteger, fail } from '../ops/validate.js';
import { HOST_BACKENDS } from './embedding.js';

/**
 * YaRN ("rope_type": "yarn", arXiv 2309.00071) as transformers computes it: dimensions that turn
 * more than betaFast times over the original context keep theta's frequency, those that turn less
 * than betaSlow times are divided by `factor`, a linear ramp in between; cos and sin are multiplied
 * by `attentionFactor` (0.1·ln(factor) + 1 unless config.json sets attention_factor).
 */
export interface YarnRope {
  kind: 'yarn';
  factor: number;
  originalMaxPositionEmbeddings: number;
  betaFast: number;
  betaSlow: number;
  /** round the ramp's ends to whole dimensions (floor / ceil), transformers' default */
  truncate: boolean;
  attentionFactor: number;
}

/**
 * Llama 3's rope scaling ("rope_type": "llama3", Llama 4's Hub configs) as transformers computes
 * it: frequencies whose wavelength 2π/f exceeds original/lowFreqFactor are divided by `factor`,
 * those below original/highFreqFactor kept, the ones between blended by
 * s = (original/wavelength − lowFreqFactor) / (highFreqFactor − lowFreqFactor); cos and sin unscaled.
 */
export interface Llama3Rope {
  kind: 'llama3';
  factor: number;
  lowFreqFactor: number;
  highFreqFactor: number;
  originalMaxPositionEmbeddings: number;
}

/** How the rotary frequencies are scaled; null: the default rope. */
export type RopeScaling = YarnRope | Llama3Rope | null;

/**
 * The D/2 rotary frequencies (float64) and the factor on cos and sin.
 *
 * ```js
 * ropeFrequencies(16, 150000, null).inverseFrequencies[1];  // 150000 ** (-2 / 16)
 * ```
 */
export function ropeFrequencies(headDim: number, theta: number, scaling: RopeScaling): {
  inverseFrequencies: Float64Array; attentionFactor: number;
} {
  const half = headDim / 2;
  const base = Float64Array.from({ length: half }, (_, i) => 1 / Math.pow(theta, (2 * i) / headDim));
  if (scaling === null) return { inverseFrequencies: base, attentionFactor: 1 };
  if (scaling.kind === 'llama3') return { inverseFrequencies: base.map(f => llama3Frequency(f, scaling)), attentionFactor: 1 };
  const { factor, originalMaxPositionEmbeddings: context, betaFast, betaSlow, truncate } = scaling;
  // the dimension whose frequency turns `turns` times over the original context
  const dimensionOf = (turns: number) =>
    (headDim * Math.log(context / (turns * 2 * Math.PI))) / (2 * Math.log(theta));
  let low = dimensionOf(betaFast);
  let high = dimensionOf(betaSlow);
  if (truncate) { low = Math.floor(low); high = Math.ceil(high); }
  low = Math.max(low, 0);
  high = Math.min(high, headDim - 1);
  if (low === high) high += 0.001;  // as transformers: no division by zero
  const inverseFrequencies = base.map((f, i) => {
    const ramp = Math.min(1, Math.max(0, (i - low) / (high - low)));  // 0: keep f, 1: f / factor
    return (f / factor) * ramp + f * (1 - ramp);
  });
  return { inverseFrequencies, attentionFactor: scaling.attentionFactor };
}

/** One frequency under Llama 3's scaling (transformers' _compute_llama3_parameters). */
function llama3Frequency(f: number, s: Llama3Rope): number {
  const wavelength = 2 * Math.PI / f;
  const lowWavelength = s.originalMaxPositionEmbeddings / s.lowFreqFactor;
  const highWavelength = s.originalMaxPositionEmbeddings / s.highFreqFactor;
  if (wavelength > lowWavelength) return f / s.factor;
  if (wavelength < highWavelength) return f;
  // between the two (only reached when highFreqFactor > lowFreqFactor or at the boundary itself)
  const smooth = (s.originalMaxPositionEmbeddings / wavelength - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
  return (1 - smooth) * f / s.factor + smooth * f;
}

/**
 * cos and sin tables [S, D] for positions first..first+S−1 (first 0 unless given: a generation
 * step's new tokens come after the cached ones), computed in float64 and rounded once; with a
 * `scaling` (YaRN), of its frequencies and times its attention factor.
 *
 * ```js
 * const {cos, sin} = rotaryTables(11, 16, 10000);  // each [11, 16]
 * ```
 */
export function rotaryTables(seqLen: number, headDim: number, theta: number, first = 0,
    scaling: RopeScaling = null): { cos: tf.Tensor2D; sin: tf.Tensor2D } {
  const op = 'rotaryTables';
  assertInteger(op, 'seqLen', seqLen, 1);
  assertInteger(op, 'headDim', headDim, 2);
  if (headDim % 2 !== 0) fail(op, `'headDim' must be even but got ${headDim}`);
  assertFiniteNumber(op, 'theta', theta);
  if (theta <= 0) fail(op, `'theta' must be > 0 but got ${theta}`);
  assertInteger(op, 'first', first, 0);
  const half = headDim / 2;
  const cos = new Float32Array(seqLen * headDim);
  const sin = new Float32Array(seqLen * headDim);
  const { inverseFrequencies, attentionFactor } = ropeFrequencies(headDim, theta, scaling);
  for (let i = 0; i < half; i++) {
    const invFreq = inverseFrequencies[i];
    for (let p = 0; p < seqLen; p++) {
      const angle = (first + p) * invFreq;
      const c = Math.cos(angle) * attentionFactor;
      const s = Math.sin(angle) * attentionFactor;
      cos[p * headDim + i] = c; cos[p * headDim + i + half] = c;
      sin[p * headDim + i] = s; sin[p * headDim + i + half] = s;
    }
  }
  return { cos: tf.tensor2d(cos, [seqLen, headDim]), sin: tf.tensor2d(sin, [seqLen, headDim]) };
}

/** (x1, x2) → (−x2, x1) on the halves of the last axis. */
function rotateHalf<T extends tf.Tensor>(x: T): T {
  const axis = x.rank - 1;
  const half = x.shape[axis] / 2;
  const [x1, x2] = tf.split(x, [half, half], axis);
  return tf.concat([tf.neg(x2), x1], axis) as T;
}

/**
 * cos and sin [B, S, D] of each token's own position (packed samples restart at 0): rows of the
 * tables of positions 0..tableLength−1 gathered by `positionIds` (int32 [B, S], each in
 * [0, tableLength), checked on host backends).
 *
 * ```js
 * const {cos, sin} = rotaryTablesAt(tf.tensor2d([[0, 1, 0, 1]], [1, 4], 'int32'), 16, 10000, 4);  // [1, 4, 16]
 * ```
 */
export function rotaryTablesAt(positionIds: tf.Tensor2D, headDim: number, theta: number, tableLength: number,
    scaling: RopeScaling = null): { cos: tf.Tensor3D; sin: tf.Tensor3D } {
  const [b, s] = positionIds.shape;
  if (HOST_BACKENDS.includes(tf.getBackend())) {
    const values = positionIds.dataSync();
    const bad = values.findIndex(p => p < 0 || p >= tableLength);
    if (bad >= 0) fail('rotaryTablesAt', `'positionIds' must hold positions in [0, ${tableLength - 1}] but holds ${values[bad]} at index ${bad}`);
  }
  return tf.tidy(() => {
    const { cos, sin } = rotaryTables(tableLength, headDim, theta, 0, scaling);
    const flat = tf.reshape(positionIds, [b * s]) as tf.Tensor1D;
    const at = (table: tf.Tensor2D) => tf.reshape(tf.gather(table, flat), [b, s, headDim]) as tf.Tensor3D;
    return { cos: at(cos), sin: at(sin) };
  });
}

// the op (one customGrad, closed-form backward); applyRotaryReference below is what it computes
export { applyRotary } from '../ops/rotary.js';

/**
 * x · cos + rotateHalf(x) · sin composed of plain ops on tfjs's tape, for x [N, S, D] (heads
 * folded into N: N = B·heads) and tables [S, D] shared by every row, or [B, S, D] per row
 * (rotaryTablesAt): the reference `applyRotary` is checked against.
 *
 * ```js
 * const q = applyRotaryReference(q3d, cos, sin);  // [N, S, D]
 * ```
 */
export function applyRotaryReference(x: tf.Tensor3D, cos: tf.Tensor2D | tf.Tensor3D, sin: tf.Tensor2D | tf.Tensor3D): tf.Tensor3D {
  return tf.tidy(() => {
    if (cos.rank === 2) return tf.add(tf.mul(x, cos), tf.mul(rotateHalf(x), sin)) as tf.Tensor3D;
    const [n, s, d] = x.shape;
    const b = cos.shape[0];
    const x4 = tf.reshape(x, [b, n / b, s, d]);                       // [B, heads, S, D]
    const [c4, s4] = [cos, sin].map(t => tf.expandDims(t, 1));        // [B, 1, S, D]
    return tf.reshape(tf.add(tf.mul(x4, c4), tf.mul(rotateHalf(x4), s4)), [n, s, d]) as tf.Tensor3D;
  });
}

/**
 * [N, S, D] with rope pairs at (2i, 2i+1) (GPT-J style, HF rope_interleave) → pairs at (i, i + D/2):
 * the evens, then the odds. Rotating the result with applyRotary and leaving it so is GPT-J's
 * rope up to a permutation of the D axis, which q·k does not see when q and k both take it.
 *
 * ```js
 * const q = applyRotary(deinterleavePairs(q3d), cos, sin);  // [N, S, D]
 * ```
 */
export function deinterleavePairs(x: tf.Tensor3D): tf.Tensor3D {
  const [n, s, d] = x.shape;
  return tf.reshape(tf.transpose(tf.reshape(x, [n, s, d / 2, 2]), [0, 1, 3, 2]), [n, s, d]) as tf.Tensor3D;
}
