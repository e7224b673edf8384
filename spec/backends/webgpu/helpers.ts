/**
 * Helpers of the WebGPU specs: reads are asynchronous there (dataSync throws in Node), so the
 * closeness check awaits the data; random expert problems with their float64 twins.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { registerMoEKernels } from '../../../src/backends/register_all_kernels.js';
import { ownDispatchListeners } from '../../../src/backends/webgpu/own_dispatch.js';
import { maxRelativeError } from '../../../src/util/numeric.js';

/** Asserts max|a − e| / max|e| <= tol, reading the tensor asynchronously. */
export async function expectCloseAsync(
    actual: tf.Tensor, expected: ArrayLike<number>, tol: number, label: string, shape?: number[]): Promise<void> {
  if (shape) expect(actual.shape, `${label}: shape`).to.deep.equal(shape);
  const a = await actual.data();
  expect(a.length, `${label}: size`).to.equal(expected.length);
  const err = maxRelativeError(a, expected);
  expect(err, `${label}: max relative error ${err.toExponential(2)} > ${tol}`).to.be.at.most(tol);
}

/**
 * The exponent code maxAbsCodeInKernel gives for a largest magnitude m, in float64 (the reference):
 * ceil(log2 m) + 150, 0 for 0, 511 for an infinity or NaN.
 */
export function expectedMaxAbsCode(m: number): number {
  if (m === 0) return 0;
  if (!Number.isFinite(m)) return 511;
  return Math.ceil(Math.log2(m)) + 150;
}

/** Runs `fn` with the names of the own dispatches recorded meanwhile (recordOwnDispatch's), in order. */
export async function withOwnDispatches<T>(fn: (recorded: string[]) => Promise<T>): Promise<T> {
  const recorded: string[] = [];
  const listener = (program: string) => { recorded.push(program); };
  ownDispatchListeners.add(listener);
  try {
    return await fn(recorded);
  } finally {
    ownDispatchListeners.delete(listener);
  }
}

/**
 * Runs `fn`, letting through tfjs's one warning where the adapter has no timestamp queries (Mesa's GL
 * here; the H100 has them), which tf.time and tf.profile give there; any other warning fails.
 */
export async function allowingNoTimestampWarning<T>(fn: () => Promise<T>): Promise<T> {
  const warn = console.warn;
  const warnings: string[] = [];
  console.warn = (...args: unknown[]) => { warnings.push(args.join(' ')); };
  try {
    return await fn();
  } finally {
    console.warn = warn;
    for (const w of warnings) expect(w).to.match(/^This device doesn't support timestamp-query extension/);
  }
}

/** numTensors before and after `fn` (which must dispose what it makes) must agree. */
export async function expectNoLeakAsync(fn: () => Promise<void>, label = 'numTensors'): Promise<void> {
  const before = tf.memory().numTensors;
  await fn();
  expect(tf.memory().numTensors, label).to.equal(before);
}

/**
 * The error messages ('line:column message') of compiling WGSL on the active webgpu device, in an
 * error scope: an invalid module is the caller's finding, not an uncaptured device error.
 */
export async function compileErrors(code: string): Promise<string[]> {
  const device = (tf.backend() as unknown as { device: GPUDevice }).device;
  device.pushErrorScope('validation');
  const info = await device.createShaderModule({ code }).getCompilationInfo();
  await device.popErrorScope();
  return info.messages.filter(m => m.type === 'error').map(m => `${m.lineNum}:${m.linePos} ${m.message}`);
}

/**
 * The kernels `fn` runs (one entry per call, in order) and the most bytes it held beyond what was
 * there before (tf.profile); its result is disposed.
 */
export async function profileKernels(fn: () => tf.Tensor): Promise<{ kernels: string[]; peakBytes: number }> {
  const before = tf.memory().numBytes;
  // tf.profile warns once where the adapter has no timestamp queries (Mesa's GL): expected here
  const warn = console.warn;
  console.warn = () => {};
  let info: Awaited<ReturnType<typeof tf.profile>>;
  try {
    info = await tf.profile(() => fn());
  } finally {
    console.warn = warn;
  }
  tf.dispose(info.result as tf.Tensor);
  return { kernels: info.kernels.map(k => k.name), peakBytes: info.peakBytes - before };
}

/** float64 a·Wᵀ (transposeWeight) or a·W, + bias; W [rows, cols] row-major. */
export function productFloat64(a: Float32Array, n: number, w: Float32Array, rows: number, cols: number, transposeWeight: boolean,
    bias: Float32Array | null): Float64Array {
  const [inner, out] = transposeWeight ? [cols, rows] : [rows, cols];
  const y = new Float64Array(n * out);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < out; j++) {
      let s = bias === null ? 0 : bias[j];
      for (let k = 0; k < inner; k++) s += a[i * inner + k] * (transposeWeight ? w[j * cols + k] : w[k * cols + j]);
      y[i * out + j] = s;
    }
  }
  return y;
}

// the scoped flag, shader-key recorder and host-upload counter, shared with the device tools
export { type HostUploads, withEnvFlag, withHostUploads, withShaderKeys } from '../../../tools/webgpu_tc/scoped.js';

/** Runs `fn` on the cpu backend (the reference path), then makes webgpu active again. */
export async function onCpu<T>(fn: () => Promise<T>): Promise<T> {
  await tf.setBackend('cpu');
  registerMoEKernels('cpu');
  try {
    return await fn();
  } finally {
    await tf.setBackend('webgpu');
  }
}

export * from '../../helpers/expert_cases.js';
