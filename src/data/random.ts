/**
 * A small seeded PRNG (mulberry32) for the data generator and the training batches: the same
 * seed gives the same corpus and the same batch order on every machine and Node version, which
 * Math.random cannot promise.
 */
import { assertInteger } from '../ops/validate.js';

export class SeededRandom {
  private state: number;

  /**
   * ```js
   * const rng = new SeededRandom(7);
   * rng.int(10);  // the same integer in [0, 10) on every run
   * ```
   */
  constructor(seed: number) {
    assertInteger('SeededRandom', 'seed', seed, 0, 2 ** 32 - 1);
    this.state = seed >>> 0;
  }

  /** A float in [0, 1). */
  next(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }

  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.next() * n);
  }

  /** true with probability p. */
  chance(p: number): boolean {
    return this.next() < p;
  }

  /** One element, uniformly. */
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)];
  }

  /** One element with probability proportional to its weight. */
  weighted<T>(items: ReadonlyArray<readonly [T, number]>): T {
    const total = items.reduce((s, [, w]) => s + w, 0);
    let u = this.next() * total;
    for (const [item, w] of items) {
      u -= w;
      if (u < 0) return item;
    }
    return items[items.length - 1][0];
  }
}
