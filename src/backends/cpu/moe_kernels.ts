/**
 * The fused experts' kernels (src/ops/experts/kernels.ts) for the cpu backend, in JS on the
 * tensors' own arrays. Against the stock composition they save the per-expert slice copies, the
 * split/concat of the activation (tfjs-cpu's strided slice walks a generic index per element)
 * and tfjs-cpu's matMul, which runs at a quarter of moe_math's gemm here.
 */
import * as tf from '@tensorflow/tfjs-core';
import {
  COMBINE_ROWS, EXPERT_ACTIVATION, EXPERT_ACTIVATION_GRAD, GROUPED_MATMUL, GROUPED_WEIGHT_GRAD, PAIR_ROW_DOT,
  type ExpertActivationAttrs, type GroupedMatMulAttrs, type GroupedWeightGradAttrs, type PairAttrs,
} from '../../ops/experts/kernels.js';
import { decodePackedExpertInto, layoutOf, type PackedFormat } from '../../ops/packed.js';
import {
  NARROW, activationBackward, activationForward, addRowVector, combineRows, gatherRowsInto, gatherTransposeInto,
  gemm, gemmNT, pairRowDot, transposeInto,
} from './moe_math.js';

/** The two methods of tfjs-backend-cpu's MathBackendCPU used here. */
interface CpuBackendLike {
  readSync(dataId: tf.DataId): tf.BackendValues;
  makeTensorInfo(shape: number[], dtype: tf.DataType, values?: tf.BackendValues): tf.TensorInfo;
}

interface KernelArgs {
  /** optional inputs (a row index, a bias, a scale) are absent keys */
  inputs: Record<string, tf.TensorInfo>;
  backend: {};
  attrs?: tf.NamedAttrMap;
}

function f32(b: CpuBackendLike, t: tf.TensorInfo): Float32Array {
  return b.readSync(t.dataId) as Float32Array;
}

function i32(b: CpuBackendLike, t: tf.TensorInfo | undefined): Int32Array | null {
  return t === undefined ? null : b.readSync(t.dataId) as Int32Array;
}

function groupedMatMul({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const b = backend as CpuBackendLike;
  const { x, w, rows, bias, addTo } = inputs;
  const { groupSizes, transposeW, alpha, packed, wShape, inputAxis, groupSize } = attrs as unknown as GroupedMatMulAttrs;
  const [, p, q] = wShape;
  const [k, m] = transposeW ? [q, p] : [p, q];
  const total = groupSizes.reduce((s, n) => s + n, 0);
  const xv = f32(b, x);
  // a packed weight (int32 words: bf16/f16 halves or quantized) is decoded one expert at a time into `decoded`
  const words = packed !== 'none' ? b.readSync(w.dataId) as Int32Array : null;
  const format: PackedFormat | null = packed !== 'none' ? { kind: packed, shape: wShape, inputAxis, groupSize } : null;
  const layout = format ? layoutOf(format) : null;
  const wordsPerExpert = w.shape[1] as number;
  const decoded = words ? new Float32Array(p * q) : null;
  const decodedBits = decoded ? new Int32Array(decoded.buffer) : null;
  const wv = decoded ?? f32(b, w);
  const idx = i32(b, rows);
  const bv = bias ? f32(b, bias) : null;
  const out = addTo ? Float32Array.from(f32(b, addTo)) : new Float32Array(total * m);
  // wide outputs: gemm on W_e as [k, m]; narrow ones (rank r): dot products with W_e as [m, k]
  const narrow = m <= NARROW;
  const needsTranspose = narrow !== transposeW;
  const maxRows = Math.max(0, ...groupSizes);
  const xs = idx ? new Float32Array(maxRows * k) : null;          // one expert's gathered rows
  const wt = needsTranspose ? new Float32Array(k * m) : null;      // one expert's W_e, transposed
  let start = 0;
  groupSizes.forEach((n, e) => {
    if (n === 0) return;
    let aArr = xv;
    let aOff = start * k;
    if (xs) {
      gatherRowsInto(n, k, xv, 0, idx, 0, start, xs, 0);
      aArr = xs;
      aOff = 0;
    }
    let bArr = wv;
    let bOff = e * p * q;
    if (words) {
      decodePackedExpertInto(format!, layout, words, e * wordsPerExpert, decoded!, decodedBits!, 0);
      bOff = 0;
    }
    if (wt) {
      transposeInto(p, q, bArr, bOff, wt, 0);
      bArr = wt;
      bOff = 0;
    }
    if (narrow) gemmNT(n, k, m, aArr, aOff, bArr, bOff, out, start * m, addTo !== undefined, alpha);
    else gemm(n, k, m, aArr, aOff, bArr, bOff, out, start * m, addTo !== undefined, alpha);
    if (bv) addRowVector(n, m, out, start * m, bv, e * m);
    start += n;
  });
  return b.makeTensorInfo([total, m], 'float32', out);
}

function groupedWeightGrad({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const bk = backend as CpuBackendLike;
  const { a, b, aRows, bRows } = inputs;
  const { groupSizes } = attrs as unknown as GroupedWeightGradAttrs;
  const p = a.shape[1];
  const q = b.shape[1];
  const av = f32(bk, a);
  const bv = f32(bk, b);
  const ai = i32(bk, aRows);
  const bi = i32(bk, bRows);
  const out = new Float32Array(groupSizes.length * p * q);  // zeros for experts with no rows
  const narrow = q <= NARROW;
  const maxRows = Math.max(0, ...groupSizes);
  const at = new Float32Array(maxRows * p);
  const bs = bi || narrow ? new Float32Array(maxRows * q) : null;
  let start = 0;
  groupSizes.forEach((n, e) => {
    if (n === 0) return;
    gatherTransposeInto(n, p, av, 0, ai, 0, start, at, 0);         // [p, n]
    if (narrow) {
      gatherTransposeInto(n, q, bv, 0, bi, 0, start, bs!, 0);      // [q, n]
      gemmNT(p, n, q, at, 0, bs!, 0, out, e * p * q);
    } else {
      let bArr = bv;
      let bOff = start * q;
      if (bs) {
        gatherRowsInto(n, q, bv, 0, bi, 0, start, bs, 0);
        bArr = bs;
        bOff = 0;
      }
      gemm(p, n, q, at, 0, bArr, bOff, out, e * p * q);
    }
    start += n;
  });
  return bk.makeTensorInfo([groupSizes.length, p, q], 'float32', out);
}

function expertActivation({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo[] {
  const b = backend as CpuBackendLike;
  const { h, scale } = inputs;
  const params = attrs as unknown as ExpertActivationAttrs;
  const [n, twoI] = h.shape;
  const inter = twoI / 2;
  const a = new Float32Array(n * inter);
  const scaled = scale ? new Float32Array(n * inter) : null;
  activationForward(n, inter, params, f32(b, h), 0, a, 0, scale ? f32(b, scale) : null, 0, scaled, 0);
  const outs = [b.makeTensorInfo([n, inter], 'float32', a)];
  if (scaled) outs.push(b.makeTensorInfo([n, inter], 'float32', scaled));
  return outs;
}

function expertActivationGrad({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const b = backend as CpuBackendLike;
  const { h, da, scale } = inputs;
  const params = attrs as unknown as ExpertActivationAttrs;
  const [n, twoI] = h.shape;
  const dh = new Float32Array(n * twoI);
  activationBackward(n, twoI / 2, params, f32(b, h), 0, f32(b, da), 0, scale ? f32(b, scale) : null, 0, dh, 0);
  return b.makeTensorInfo([n, twoI], 'float32', dh);
}

function combine({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const b = backend as CpuBackendLike;
  const { y, rowOfPair, weights } = inputs;
  const { numTokens, topK } = attrs as unknown as PairAttrs;
  const cols = y.shape[1];
  const out = new Float32Array(numTokens * cols);
  combineRows(numTokens, topK, cols, f32(b, y), 0, i32(b, rowOfPair)!, 0, weights ? f32(b, weights) : null, 0, out, 0);
  return b.makeTensorInfo([numTokens, cols], 'float32', out);
}

function rowDot({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const bk = backend as CpuBackendLike;
  const { a, b, rowOfPair } = inputs;
  const { numTokens, topK } = attrs as unknown as PairAttrs;
  const out = new Float32Array(numTokens * topK);
  pairRowDot(numTokens * topK, a.shape[1], f32(bk, a), 0, f32(bk, b), 0, i32(bk, rowOfPair)!, 0, out, 0);
  return bk.makeTensorInfo([numTokens, topK], 'float32', out);
}

const config = (kernelName: string, kernelFunc: (args: KernelArgs) => tf.TensorInfo | tf.TensorInfo[]): tf.KernelConfig =>
  ({ kernelName, backendName: 'cpu', kernelFunc: kernelFunc as unknown as tf.KernelFunc });

export const cpuMoEKernelConfigs: tf.KernelConfig[] = [
  config(GROUPED_MATMUL, groupedMatMul),
  config(GROUPED_WEIGHT_GRAD, groupedWeightGrad),
  config(EXPERT_ACTIVATION, expertActivation),
  config(EXPERT_ACTIVATION_GRAD, expertActivationGrad),
  config(COMBINE_ROWS, combine),
  config(PAIR_ROW_DOT, rowDot),
];
