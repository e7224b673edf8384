/**
 * The next-token choice of sampling, as transformers' logits processors make it, in their order:
 * temperature (scores / T), top-k (scores below the k-th largest → −∞), top-p (the smallest set of
 * most likely tokens whose probability reaches p is kept: a token goes when the tokens more likely
 * than it already hold p), then a draw from the softmax. On the host, in float64, on one row of
 * logits (the last position's), so the random draw is seeded and the same on every backend.
 */
import { SeededRandom } from '../data/random.js';
import { assertFiniteNumber, assertInteger, fail } from '../ops/validate.js';

export interface SamplingSettings {
  /** divides the logits; 1 leaves them (HF's TemperatureLogitsWarper) */
  temperature: number;
  /** keep the k most likely tokens (ties with the k-th kept too); 0 = off (HF's TopKLogitsWarper) */
  topK: number;
  /** keep the most likely tokens until their probability reaches p; 1 = off (HF's TopPLogitsWarper) */
  topP: number;
}

/** Checks sampling settings (op names the caller in messages). */
export function checkSamplingSettings(op: string, s: SamplingSettings): void {
  assertFiniteNumber(op, 'temperature', s.temperature);
  if (s.temperature <= 0) fail(op, `'temperature' must be > 0 when sampling but got ${s.temperature} (0 means greedy: doSample false)`);
  assertInteger(op, 'topK', s.topK, 0);
  assertFiniteNumber(op, 'topP', s.topP);
  if (!(s.topP > 0 && s.topP <= 1)) fail(op, `'topP' must be in (0, 1] but got ${s.topP}`);
}

/**
 * The processed scores of one row of logits: temperature, then top-k, then top-p; a removed token
 * has −Infinity. float64 throughout.
 *
 * ```js
 * processLogits(Float32Array.from([2, 1, 0, -1]), {temperature: 0.5, topK: 3, topP: 0.9});
 * // Float64Array [4, 2, -Infinity, -Infinity]
 * ```
 */
export function processLogits(logits: ArrayLike<number>, settings: SamplingSettings): Float64Array {
  const op = 'processLogits';
  checkSamplingSettings(op, settings);
  const n = logits.length;
  if (n === 0) fail(op, "'logits' must hold at least one value");
  const scores = Float64Array.from(logits);
  if (settings.temperature !== 1) for (let i = 0; i < n; i++) scores[i] /= settings.temperature;
  if (settings.topK > 0 && settings.topK < n) {
    const kth = Float64Array.from(scores).sort()[n - settings.topK];  // the k-th largest
    for (let i = 0; i < n; i++) if (scores[i] < kth) scores[i] = -Infinity;
  }
  if (settings.topP < 1) {
    const probs = softmax(scores);
    // most likely first; among equal probabilities the higher index first, the reverse of the stable
    // ascending sort HF's TopPLogitsWarper removes from (so of tied tokens the lowest index goes first)
    const order = Array.from(probs.keys()).sort((a, b) => probs[b] - probs[a] || b - a);
    let before = 0;  // the probability of the tokens more likely than this one
    for (let r = 0; r < n; r++) {
      // the most likely token always stays (HF's min_tokens_to_keep = 1)
      if (r > 0 && before >= settings.topP) scores[order[r]] = -Infinity;
      before += probs[order[r]];
    }
  }
  return scores;
}

/** softmax in float64; −Infinity scores get probability 0. */
export function softmax(scores: ArrayLike<number>): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < scores.length; i++) max = Math.max(max, scores[i]);
  const p = new Float64Array(scores.length);
  let sum = 0;
  for (let i = 0; i < scores.length; i++) sum += (p[i] = Math.exp(scores[i] - max));
  for (let i = 0; i < p.length; i++) p[i] /= sum;
  return p;
}

/**
 * One token drawn from softmax(scores) with `rng`: the first id whose cumulative probability (in
 * id order) exceeds a uniform draw.
 *
 * ```js
 * drawToken(processLogits(logits, settings), new SeededRandom(7));  // the same id on every run
 * ```
 */
export function drawToken(scores: ArrayLike<number>, rng: SeededRandom): number {
  const probs = softmax(scores);
  const u = rng.next();
  let cumulative = 0;
  let last = 0;
  for (let i = 0; i < probs.length; i++) {
    if (probs[i] === 0) continue;
    last = i;
    cumulative += probs[i];
    if (u < cumulative) return i;
  }
  return last;  // u within rounding of 1
}
