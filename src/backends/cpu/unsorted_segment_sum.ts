/**
 * A linear-time 'UnsortedSegmentSum' for the cpu backend. tfjs-cpu's own kernel builds a mask
 * and a full product for every segment (O(numSegments · n · rowSize), thousands of small tensors),
 * and tf.gather's gradient is that kernel: a per-expert gather of T tokens costs O(T²·H) in
 * backward. This one is a single pass. It is not registered by registerMoEKernels (tfjs's kernel
 * stays the default); `tfjs-moe-lora bench --cpu-segment-sum linear` swaps it in for a run, so
 * that the reference path is measured without that quadratic term as well as with it.
 */
import * as tf from '@tensorflow/tfjs-core';

interface CpuBackendLike {
  readSync(dataId: tf.DataId): tf.BackendValues;
  makeTensorInfo(shape: number[], dtype: tf.DataType, values?: tf.BackendValues): tf.TensorInfo;
}

/** out[s] = Σ_{i: ids[i] = s} x[i]; ids outside [0, numSegments) are dropped, as tfjs-cpu drops them. */
function unsortedSegmentSum(
    args: { inputs: tf.NamedTensorInfoMap; backend: {}; attrs?: tf.NamedAttrMap }): tf.TensorInfo {
  const backend = args.backend as CpuBackendLike;
  const { x, segmentIds } = args.inputs as { x: tf.TensorInfo; segmentIds: tf.TensorInfo };
  const { numSegments } = args.attrs as unknown as tf.UnsortedSegmentSumAttrs;
  const n = x.shape[0];
  const rowSize = tf.util.sizeFromShape(x.shape.slice(1));
  const xv = backend.readSync(x.dataId) as Float32Array | Int32Array;
  const ids = backend.readSync(segmentIds.dataId) as Int32Array;
  const sums = new Float64Array(numSegments * rowSize);
  for (let i = 0; i < n; i++) {
    const s = ids[i];
    if (s < 0 || s >= numSegments) continue;
    const from = i * rowSize;
    const to = s * rowSize;
    for (let j = 0; j < rowSize; j++) sums[to + j] += xv[from + j];
  }
  const out = x.dtype === 'int32' ? Int32Array.from(sums) : Float32Array.from(sums);
  return backend.makeTensorInfo([numSegments, ...x.shape.slice(1)], x.dtype, out);
}

export const cpuLinearUnsortedSegmentSumConfig: tf.KernelConfig = {
  kernelName: tf.UnsortedSegmentSum,
  backendName: 'cpu',
  kernelFunc: unsortedSegmentSum as unknown as tf.KernelFunc,
};

/**
 * Runs `fn` with the linear kernel in place of tfjs-cpu's UnsortedSegmentSum, then puts tfjs's
 * back (also when `fn` throws).
 */
export async function withLinearCpuSegmentSum<T>(fn: () => Promise<T>): Promise<T> {
  const stock = tf.getKernel(tf.UnsortedSegmentSum, 'cpu');
  if (stock != null) tf.unregisterKernel(tf.UnsortedSegmentSum, 'cpu');
  tf.registerKernel(cpuLinearUnsortedSegmentSumConfig);
  try {
    return await fn();
  } finally {
    tf.unregisterKernel(tf.UnsortedSegmentSum, 'cpu');
    if (stock != null) tf.registerKernel(stock);
  }
}
