/** Test helpers: seeded random data, float64 finite differences, closeness and leak checks. */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { maxRelativeError } from '../../src/util/numeric.js';

/** Deterministic PRNG (mulberry32) with a normal sampler. */
export class Rng {
  private state: number;
  constructor(seed: number) { this.state = seed >>> 0; }
  uniform(): number {
    let t = (this.state = (this.state + 0x6d2b79f5) >>> 0);
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  normal(): number {
    const u = Math.max(this.uniform(), 1e-12);
    return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * this.uniform());
  }
  /** float64 values, N(0, scale²) */
  array(n: number, scale = 1): Float64Array {
    const out = new Float64Array(n);
    for (let i = 0; i < n; i++) out[i] = this.normal() * scale;
    return out;
  }
  int(n: number): number { return Math.floor(this.uniform() * n); }
}

/** A float32 tensor from float64 data (the float64 copy stays the reference's input). */
export function tensorOf(data: ArrayLike<number>, shape: number[]): tf.Tensor {
  return tf.tensor(Float32Array.from(data), shape, 'float32');
}

/** Round float64 data through float32, so the float64 reference sees exactly the tensor's values. */
export function asF32(data: ArrayLike<number>): Float64Array {
  return Float64Array.from(Float32Array.from(data));
}

/**
 * Central finite differences of a float64 scalar function: d f / d x[i] for every i.
 * eps 1e-6 on float64 gives ~1e-9 accuracy for smooth functions of O(1) values.
 */
export function finiteDifferences(
    f: (x: Float64Array) => number, x: Float64Array, eps = 1e-6): Float64Array {
  const g = new Float64Array(x.length);
  const xp = Float64Array.from(x);
  for (let i = 0; i < x.length; i++) {
    const v = xp[i];
    xp[i] = v + eps; const fp = f(xp);
    xp[i] = v - eps; const fm = f(xp);
    xp[i] = v;
    g[i] = (fp - fm) / (2 * eps);
  }
  return g;
}

/** Asserts max|a − e| / max|e| <= tol, reading the tensor synchronously. */
export function expectClose(
    actual: tf.Tensor | ArrayLike<number>, expected: tf.Tensor | ArrayLike<number>,
    tol: number, label: string): void {
  const a = actual instanceof tf.Tensor ? actual.dataSync() : actual;
  const e = expected instanceof tf.Tensor ? expected.dataSync() : expected;
  if (actual instanceof tf.Tensor && expected instanceof tf.Tensor) {
    expect(actual.shape, `${label}: shape`).to.deep.equal(expected.shape);
  }
  const err = maxRelativeError(a, e);
  expect(err, `${label}: max relative error ${err.toExponential(2)} > ${tol}`).to.be.at.most(tol);
}

/** Runs fn and asserts that it leaves no tensor behind (fn must dispose what it returns). */
export function expectNoLeak(fn: () => void, label = 'numTensors'): void {
  const before = tf.memory().numTensors;
  fn();
  expect(tf.memory().numTensors, label).to.equal(before);
}

/** How many times `fn` runs the kernel `name` (tf.profile warns on webgpu without timestamps). */
export function countKernels(name: string, fn: () => void): number {
  const engine = tf.engine() as unknown as { runKernel: (kernel: string, ...rest: unknown[]) => unknown };
  const runKernel = engine.runKernel;
  let count = 0;
  engine.runKernel = function (this: unknown, kernel: string, ...rest: unknown[]) {
    if (kernel === name) count++;
    return runKernel.call(this, kernel, ...rest);
  };
  try {
    fn();
  } finally {
    delete (engine as Partial<typeof engine>).runKernel;  // the prototype's again
  }
  return count;
}
