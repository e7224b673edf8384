/**
 * 'UnsortedSegmentSum' for the wasm backend, which does not ship one: without it
 * tf.unsortedSegmentSum throws there and tf.gather has no gradient (its gradient is a segment sum
 * of dy over the gathered indices).
 *
 * It runs in JS on copies of the inputs and hands the result to the backend as a new tensor: the
 * segment sum is a single pass over x, so a wasm build of it would gain little, and reusing the
 * backend's ScatterNd would trust its C++ code with unchecked indices.
 */
import * as tf from '@tensorflow/tfjs-core';
import { fail } from '../../ops/validate.js';

/** The two methods of tfjs-backend-wasm's BackendWasm used here (not imported: a dev dependency). */
interface WasmBackendLike {
  readSync(dataId: tf.DataId): tf.BackendValues;
  makeOutput(shape: number[], dtype: tf.DataType, memoryOffset?: number,
             values?: tf.BackendValues): tf.TensorInfo;
}

/**
 * out[s, ...] = Σ_{i : segmentIds[i] = s} x[i, ...] for x [n, ...rest] and segmentIds [n], giving
 * [numSegments, ...rest]. Ids outside [0, numSegments) are dropped, as tfjs's cpu kernel drops
 * them. A segment that no id names is zero.
 */
function unsortedSegmentSum(
    args: {inputs: tf.NamedTensorInfoMap, backend: {}, attrs?: tf.NamedAttrMap}): tf.TensorInfo {
  const op = 'unsortedSegmentSum';
  const backend = args.backend as WasmBackendLike;
  const { x, segmentIds } = args.inputs as {x: tf.TensorInfo, segmentIds: tf.TensorInfo};
  const { numSegments } = args.attrs as unknown as tf.UnsortedSegmentSumAttrs;

  if (x.dtype !== 'float32' && x.dtype !== 'int32') {
    fail(op, `'x' must be float32 or int32 on the wasm backend but got ${x.dtype}`);
  }
  if (x.shape.length < 1 || segmentIds.shape.length !== 1 || segmentIds.shape[0] !== x.shape[0]) {
    fail(op, `'segmentIds' must have shape [${x.shape.length > 0 ? x.shape[0] : 'n'}] ` +
         `(x.shape[0] of x [${x.shape}]) but got [${segmentIds.shape}]`);
  }
  if (!Number.isInteger(numSegments) || numSegments < 0) {
    fail(op, `'numSegments' must be a non-negative integer but got ${numSegments}`);
  }

  const n = x.shape[0];
  const rowSize = tf.util.sizeFromShape(x.shape.slice(1));
  const xValues = backend.readSync(x.dataId) as Float32Array | Int32Array;  // [n, ...rest]
  const ids = backend.readSync(segmentIds.dataId) as Int32Array;             // [n]
  // float64 sums: exact for int32 and no worse than float32 accumulation for float32.
  const sums = new Float64Array(numSegments * rowSize);                     // [numSegments, ...rest]
  for (let i = 0; i < n; i++) {
    const s = ids[i];
    if (s < 0 || s >= numSegments) continue;
    const from = i * rowSize;
    const to = s * rowSize;
    for (let j = 0; j < rowSize; j++) sums[to + j] += xValues[from + j];
  }
  const out = x.dtype === 'float32' ? Float32Array.from(sums) : Int32Array.from(sums);
  return backend.makeOutput([numSegments, ...x.shape.slice(1)], x.dtype, undefined, out);
}

export const unsortedSegmentSumConfig: tf.KernelConfig = {
  kernelName: tf.UnsortedSegmentSum,
  backendName: 'wasm',
  kernelFunc: unsortedSegmentSum as unknown as tf.KernelFunc,
};
