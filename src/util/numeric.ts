/**
 * Max-norm relative error, the one measure used by tests, `parity` and benchmarks:
 * max|a − e| / max|e| (absolute when e is all zeros), so values near zero do not blow it up.
 */
export function maxRelativeError(actual: ArrayLike<number>, expected: ArrayLike<number>): number {
  if (actual.length !== expected.length) {
    throw new Error(`maxRelativeError: lengths differ (${actual.length} vs ${expected.length})`);
  }
  let diff = 0;
  let scale = 0;
  for (let i = 0; i < expected.length; i++) {
    const d = Math.abs(actual[i] - expected[i]);
    if (!(d <= diff)) diff = d;  // NaN propagates: NaN <= x is false
    scale = Math.max(scale, Math.abs(expected[i]));
  }
  return scale > 0 ? diff / scale : diff;
}
