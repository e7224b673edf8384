/**
 * The fused experts' kernels (src/ops/experts/kernels.ts) for the wasm backend. They work on the
 * wasm heap in place (tfjs's own wasm Slice, Gather and Concat copy the whole input to JS first)
 * and run every product through the backend's XNNPACK path, which tfjs takes only for a plain
 * untransposed 2-D product: the operand that would need a transpose is transposed into a scratch
 * block of one expert first, and the others are passed as views into the tensors (a temporary
 * tensor id registered at an offset inside them), so no expert's rows or weights are copied.
 *
 * Uses tfjs-backend-wasm 4.x internals (`wasm.tfjs.registerTensor`, `dataIdMap`, the exported
 * `BatchMatMul`); without them the products run on moe_math's JS gemm over the heap instead.
 * Scratch blocks are backend allocations outside the engine's tensor count: at most one expert's
 * rows and one expert's weight (W/E) per call, two when a packed weight is decoded and transposed.
 */
import * as tf from '@tensorflow/tfjs-core';
import {
  COMBINE_ROWS, EXPERT_ACTIVATION, EXPERT_ACTIVATION_GRAD, GROUPED_MATMUL, GROUPED_WEIGHT_GRAD, PAIR_ROW_DOT,
  type ExpertActivationAttrs, type GroupedMatMulAttrs, type GroupedWeightGradAttrs, type PairAttrs,
} from '../../ops/experts/kernels.js';
import { decodeExpertInto } from '../../ops/packed.js';
import {
  activationBackward, activationForward, addRowVector, combineRows, gatherRowsInto, gatherTransposeInto, gemm,
  pairRowDot, scaleAdd, transposeInto,
} from '../cpu/moe_math.js';

/** What is used of tfjs-backend-wasm's BackendWasm and its Emscripten module (a dev dependency). */
interface WasmModuleLike {
  HEAPF32: Float32Array;
  HEAP32: Int32Array;
  cwrap?: (name: string, ret: null, types: string[]) => (...args: unknown[]) => void;
  tfjs?: { registerTensor?: (id: number, size: number, offset: number) => void; disposeData?: (id: number) => void };
}

interface WasmBackendLike {
  wasm: WasmModuleLike;
  dataIdMap: { get(dataId: tf.DataId): { id: number; memoryOffset: number } };
  dataIdNextNumber: number;
  makeOutput(shape: number[], dtype: tf.DataType): tf.TensorInfo;
  disposeData(dataId: tf.DataId, force?: boolean): boolean;
}

interface KernelArgs {
  /** optional inputs (a row index, a bias, a scale) are absent keys */
  inputs: Record<string, tf.TensorInfo>;
  backend: {};
  attrs?: tf.NamedAttrMap;
}

/** Index of a tensor's first element in HEAPF32 / HEAP32 (the heap may move: never keep views). */
function at(b: WasmBackendLike, t: tf.TensorInfo): number {
  return b.dataIdMap.get(t.dataId).memoryOffset >>> 2;
}

/** C[m, n] = A[m, k]·B[k, n], operands given by their HEAPF32 index. */
type HeapGemm = (m: number, k: number, n: number, a: number, bIdx: number, c: number) => void;

const gemmOf = new WeakMap<WasmModuleLike, HeapGemm>();

function heapGemm(b: WasmBackendLike): HeapGemm {
  const wasm = b.wasm;
  const cached = gemmOf.get(wasm);
  if (cached) return cached;
  let fn: HeapGemm;
  const register = wasm.tfjs?.registerTensor;
  const unregister = wasm.tfjs?.disposeData;
  if (typeof wasm.cwrap === 'function' && register && unregister) {
    const matMul = wasm.cwrap('BatchMatMul', null,
        ['number', 'array', 'number', 'number', 'array', 'number', 'number', 'number', 'number']);
    const shape = (d0: number, d1: number) => new Uint8Array(new Int32Array([1, d0, d1]).buffer);
    const view = (index: number, size: number): number => {
      const id = b.dataIdNextNumber++;
      register(id, size, index * 4);
      return id;
    };
    fn = (m, k, n, a, bIdx, c) => {
      // Unregistering B's id also drops the XNNPACK operator cached for it (with its packed copy).
      const ids = [view(a, m * k), view(bIdx, k * n), view(c, m * n)];
      try {
        matMul(ids[0], shape(m, k), 3, ids[1], shape(k, n), 3, 0, 0, ids[2]);
      } finally {
        ids.forEach(id => unregister(id));
      }
    };
  } else {
    fn = (m, k, n, a, bIdx, c) => { const h = wasm.HEAPF32; gemm(m, k, n, h, a, h, bIdx, h, c); };
  }
  gemmOf.set(wasm, fn);
  return fn;
}

/** A scratch block on the heap, freed by `free`. */
function scratch(b: WasmBackendLike, size: number): { index: number; free(): void } {
  const t = b.makeOutput([Math.max(size, 1)], 'float32');
  return { index: at(b, t), free: () => { b.disposeData(t.dataId); } };
}

function groupedMatMul({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const b = backend as unknown as WasmBackendLike;
  const { x, w, rows, bias, addTo } = inputs;
  const { groupSizes, transposeW, alpha, packed, wShape } = attrs as unknown as GroupedMatMulAttrs;
  const [, p, q] = wShape;
  const [k, m] = transposeW ? [q, p] : [p, q];
  const total = groupSizes.reduce((s, n) => s + n, 0);
  const out = b.makeOutput([total, m], 'float32');
  const maxRows = Math.max(0, ...groupSizes);
  const xs = rows ? scratch(b, maxRows * k) : null;        // one expert's gathered rows
  const wt = transposeW ? scratch(b, k * m) : null;        // one expert's W_eᵀ
  // a packed weight (int32 words of bf16/f16 halves) is decoded one expert at a time
  const dec = packed !== 'none' ? scratch(b, p * q) : null;
  const wordsPerExpert = w.shape[1] as number;
  const run = heapGemm(b);
  try {
    const [xi, wi, oi] = [at(b, x), at(b, w), at(b, out)];
    const ri = rows ? at(b, rows) : 0;
    const bi = bias ? at(b, bias) : 0;
    const addi = addTo ? at(b, addTo) : 0;
    let start = 0;
    groupSizes.forEach((n, e) => {
      if (n === 0) return;
      const heap = b.wasm.HEAPF32;
      let a = xi + start * k;
      if (xs) {
        gatherRowsInto(n, k, heap, xi, b.wasm.HEAP32, ri, start, heap, xs.index);
        a = xs.index;
      }
      let wIdx = wi + e * p * q;
      if (dec) {
        decodeExpertInto(packed as 'bf16' | 'f16', p * q, b.wasm.HEAP32, wi + e * wordsPerExpert, heap, b.wasm.HEAP32, dec.index);
        wIdx = dec.index;
      }
      if (wt) {
        transposeInto(p, q, heap, wIdx, heap, wt.index);
        wIdx = wt.index;
      }
      run(n, k, m, a, wIdx, oi + start * m);
      const after = b.wasm.HEAPF32;   // the product may have grown the heap
      if (alpha !== 1 || addTo) scaleAdd(n * m, alpha, after, oi + start * m, addTo ? after : null, addi + start * m);
      if (bias) addRowVector(n, m, after, oi + start * m, after, bi + e * m);
      start += n;
    });
  } finally {
    xs?.free();
    wt?.free();
    dec?.free();
  }
  return out;
}

function groupedWeightGrad({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const bk = backend as unknown as WasmBackendLike;
  const { a, b, aRows, bRows } = inputs;
  const { groupSizes } = attrs as unknown as GroupedWeightGradAttrs;
  const p = a.shape[1];
  const q = b.shape[1];
  const out = bk.makeOutput([groupSizes.length, p, q], 'float32');
  const maxRows = Math.max(0, ...groupSizes);
  const at_ = scratch(bk, maxRows * p);                    // one expert's a rows, transposed
  const bs = bRows ? scratch(bk, maxRows * q) : null;
  const run = heapGemm(bk);
  try {
    const [ai, bi, oi] = [at(bk, a), at(bk, b), at(bk, out)];
    const ari = aRows ? at(bk, aRows) : 0;
    const bri = bRows ? at(bk, bRows) : 0;
    let start = 0;
    groupSizes.forEach((n, e) => {
      const o = oi + e * p * q;
      const heap = bk.wasm.HEAPF32;
      if (n === 0) {
        heap.fill(0, o, o + p * q);   // the heap is not zeroed
        return;
      }
      const idx = bk.wasm.HEAP32;
      gatherTransposeInto(n, p, heap, ai, aRows ? idx : null, ari, start, heap, at_.index);  // [p, n]
      let bIdx = bi + start * q;
      if (bs) {
        gatherRowsInto(n, q, heap, bi, idx, bri, start, heap, bs.index);
        bIdx = bs.index;
      }
      run(p, n, q, at_.index, bIdx, o);
      start += n;
    });
  } finally {
    at_.free();
    bs?.free();
  }
  return out;
}

function expertActivation({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo[] {
  const b = backend as unknown as WasmBackendLike;
  const { h, scale } = inputs;
  const params = attrs as unknown as ExpertActivationAttrs;
  const [n, twoI] = h.shape;
  const inter = twoI / 2;
  const outs = [b.makeOutput([n, inter], 'float32')];
  if (scale) outs.push(b.makeOutput([n, inter], 'float32'));
  const heap = b.wasm.HEAPF32;   // after the allocations
  activationForward(n, inter, params, heap, at(b, h), heap, at(b, outs[0]),
      scale ? heap : null, scale ? at(b, scale) : 0, scale ? heap : null, scale ? at(b, outs[1]) : 0);
  return outs;
}

function expertActivationGrad({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const b = backend as unknown as WasmBackendLike;
  const { h, da, scale } = inputs;
  const params = attrs as unknown as ExpertActivationAttrs;
  const [n, twoI] = h.shape;
  const out = b.makeOutput([n, twoI], 'float32');
  const heap = b.wasm.HEAPF32;
  activationBackward(n, twoI / 2, params, heap, at(b, h), heap, at(b, da),
      scale ? heap : null, scale ? at(b, scale) : 0, heap, at(b, out));
  return out;
}

function combine({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const b = backend as unknown as WasmBackendLike;
  const { y, rowOfPair, weights } = inputs;
  const { numTokens, topK } = attrs as unknown as PairAttrs;
  const cols = y.shape[1];
  const out = b.makeOutput([numTokens, cols], 'float32');
  const heap = b.wasm.HEAPF32;
  combineRows(numTokens, topK, cols, heap, at(b, y), b.wasm.HEAP32, at(b, rowOfPair),
      weights ? heap : null, weights ? at(b, weights) : 0, heap, at(b, out));
  return out;
}

function rowDot({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const bk = backend as unknown as WasmBackendLike;
  const { a, b, rowOfPair } = inputs;
  const { numTokens, topK } = attrs as unknown as PairAttrs;
  const out = bk.makeOutput([numTokens, topK], 'float32');
  const heap = bk.wasm.HEAPF32;
  pairRowDot(numTokens * topK, a.shape[1], heap, at(bk, a), heap, at(bk, b), bk.wasm.HEAP32, at(bk, rowOfPair),
      heap, at(bk, out));
  return out;
}

const config = (kernelName: string, kernelFunc: (args: KernelArgs) => tf.TensorInfo | tf.TensorInfo[]): tf.KernelConfig =>
  ({ kernelName, backendName: 'wasm', kernelFunc: kernelFunc as unknown as tf.KernelFunc });

export const wasmMoEKernelConfigs: tf.KernelConfig[] = [
  config(GROUPED_MATMUL, groupedMatMul),
  config(GROUPED_WEIGHT_GRAD, groupedWeightGrad),
  config(EXPERT_ACTIVATION, expertActivation),
  config(EXPERT_ACTIVATION_GRAD, expertActivationGrad),
  config(COMBINE_ROWS, combine),
  config(PAIR_ROW_DOT, rowDot),
];
