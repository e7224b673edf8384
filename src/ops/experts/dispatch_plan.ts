/**
 * The dispatch plan: the T·K (token, slot) pairs sorted by expert, computed once per layer call.
 *
 * Building it reads the chosen experts to the host (one `dataSync` per call, never inside a loop):
 * the per-expert row counts become the shapes of the grouped products, and tfjs has no ragged
 * shapes. Backends that cannot read synchronously (webgpu in Node) build it with
 * `buildDispatchPlanAsync` before the call and pass it in.
 */
import * as tf from '@tensorflow/tfjs-core';
import { assertInteger, assertTensor, fail } from '../validate.js';

export interface DispatchPlan {
  numTokens: number;                 // T
  topK: number;                      // K
  numExperts: number;                // E
  /** pair index p = t·K + k of each sorted row, stable within an expert; [N = T·K] */
  pairOfRow: Int32Array;
  /** token of each sorted row (pairOfRow / K); [N] */
  tokenOfRow: Int32Array;
  /** sorted row of each pair, the inverse permutation; [T·K] */
  rowOfPair: Int32Array;
  /** rows per expert, in expert order; sums to N */
  groupSizes: number[];
}

/** Counting sort of the pairs by expert: O(T·K + E), stable, no comparison sort. */
export function planFromExperts(
    experts: ArrayLike<number>, numTokens: number, topK: number, numExperts: number,
    op = 'buildDispatchPlan'): DispatchPlan {
  const n = numTokens * topK;
  const groupSizes = new Array<number>(numExperts).fill(0);
  for (let p = 0; p < n; p++) {
    const e = experts[p];
    if (!(e >= 0 && e < numExperts) || !Number.isInteger(e)) {
      fail(op, `'experts' must hold expert ids in [0, ${numExperts}) but got ${e} ` +
          `at token ${Math.floor(p / topK)}, slot ${p % topK}`);
    }
    groupSizes[e]++;
  }
  const next = new Int32Array(numExperts);
  for (let e = 1; e < numExperts; e++) next[e] = next[e - 1] + groupSizes[e - 1];
  const pairOfRow = new Int32Array(n);
  const tokenOfRow = new Int32Array(n);
  const rowOfPair = new Int32Array(n);
  for (let p = 0; p < n; p++) {
    const row = next[experts[p]]++;
    pairOfRow[row] = p;
    tokenOfRow[row] = Math.floor(p / topK);
    rowOfPair[p] = row;
  }
  return { numTokens, topK, numExperts, pairOfRow, tokenOfRow, rowOfPair, groupSizes };
}

function checkExperts(op: string, experts: unknown, numExperts: unknown): asserts experts is tf.Tensor2D {
  assertTensor(op, 'experts', experts, 2, 'int32');
  assertInteger(op, 'numExperts', numExperts, 1);
}

/** Reads `experts` [T, K] int32 synchronously (cpu, wasm, tensorflow backends). */
export function buildDispatchPlan(experts: tf.Tensor2D, numExperts: number): DispatchPlan {
  checkExperts('buildDispatchPlan', experts, numExperts);
  const [t, k] = experts.shape;
  return planFromExperts(experts.dataSync(), t, k, numExperts);
}

/** Same as `buildDispatchPlan`, reading asynchronously (webgpu, webgl). */
export async function buildDispatchPlanAsync(
    experts: tf.Tensor2D, numExperts: number): Promise<DispatchPlan> {
  checkExperts('buildDispatchPlanAsync', experts, numExperts);
  const [t, k] = experts.shape;
  return planFromExperts(await experts.data(), t, k, numExperts, 'buildDispatchPlanAsync');
}
