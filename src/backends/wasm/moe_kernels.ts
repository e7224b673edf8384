/**
 * The fused experts' kernels (src/ops/experts/kernels.ts) for the wasm backend. They work on the
 * wasm heap in place (tfjs's own wasm Slice, Gather and Concat copy the whole input to JS first)
 * and run the products through the backend's XNNPACK path, which tfjs takes only for a plain
 * untransposed 2-D product: the operand that would need a transpose is transposed into a scratch
 * block of one expert first, and the others are passed as views into the tensors (a temporary
 * tensor id registered at an offset inside them), so no expert's rows or weights are copied.
 * Products with a side of at most 16 (LoRA's rank-r products and weight gradients) and the loops
 * around the products (SwiGLU, combine, the pairs' dots, row gathers and transposes) run in the
 * package's SIMD module on the same heap (moe_simd.ts) where it loads, else XNNPACK and JS loops.
 *
 * Uses tfjs-backend-wasm 4.x internals (`wasm.tfjs.registerTensor`, `dataIdMap`, the exported
 * `BatchMatMul`); without them the products run on moe_math's JS gemm over the heap instead.
 * Scratch blocks are backend allocations outside the engine's tensor count: at most one expert's
 * rows and one expert's weight (W/E) per call, two when a packed weight is decoded and transposed.
 *
 * A frozen weight (`frozenW`: a base under LoRA, any packed weight) is the same tensor step after
 * step: its products keep their XNNPACK operator (which holds a packed float32 copy of the
 * expert's block, in the layout the product reads) under an id that stays registered, so after
 * the first step its blocks are never decoded, transposed or packed again. Those copies live on
 * the wasm heap outside tf.memory(), up to WASM_MOE_WEIGHT_CACHE_BYTES (see below).
 */
import * as tf from '@tensorflow/tfjs-core';
import {
  COMBINE_ROWS, EXPERT_ACTIVATION, EXPERT_ACTIVATION_GRAD, GROUPED_MATMUL, GROUPED_WEIGHT_GRAD, PAIR_ROW_DOT,
  type ExpertActivationAttrs, type GroupedMatMulAttrs, type GroupedWeightGradAttrs, type PairAttrs,
} from '../../ops/experts/kernels.js';
import { decodePackedExpertInto, layoutOf, type PackedFormat } from '../../ops/packed.js';
import {
  NARROW, activationBackward, activationForward, addRowVector, combineRows, gatherRowsInto, gatherTransposeInto, gemm,
  pairRowDot, scaleAdd,
} from '../cpu/moe_math.js';
import { moeSimd, type MoESimd } from './moe_simd.js';

/** What is used of tfjs-backend-wasm's BackendWasm and its Emscripten module (a dev dependency). */
interface WasmModuleLike {
  HEAPF32: Float32Array;
  HEAP32: Int32Array;
  cwrap?: (name: string, ret: null, types: string[]) => (...args: unknown[]) => void;
  tfjs?: { registerTensor?: (id: number, size: number, offset: number) => void; disposeData?: (id: number) => void };
}

interface WasmBackendLike {
  wasm: WasmModuleLike;
  dataIdMap: { get(dataId: tf.DataId): { id: number; memoryOffset: number }; has(dataId: tf.DataId): boolean };
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

/**
 * The products on the heap: `product` for operands given by index; with XNNPACK (tfjs-wasm's
 * exported BatchMatMul) also `productWithWeightId`, whose B is a tensor id that stays registered
 * (`register` / `unregister`): tfjs-wasm caches the XNNPACK operator, with its packed copy of B,
 * under B's id, so a later product with the same id neither reads nor packs B again.
 */
interface HeapProducts {
  product: HeapGemm;
  productWithWeightId: ((m: number, k: number, n: number, a: number, bId: number, c: number) => void) | null;
  register(index: number, size: number): number;
  unregister(id: number): void;
}

const productsOf = new WeakMap<WasmModuleLike, HeapProducts>();

function heapProducts(b: WasmBackendLike): HeapProducts {
  const wasm = b.wasm;
  const cached = productsOf.get(wasm);
  if (cached) return cached;
  let products: HeapProducts;
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
    const withIds = (m: number, k: number, n: number, aId: number, bId: number, cId: number) =>
      matMul(aId, shape(m, k), 3, bId, shape(k, n), 3, 0, 0, cId);
    products = {
      product: (m, k, n, a, bIdx, c) => {
        // Unregistering B's id also drops the XNNPACK operator cached for it (with its packed copy).
        const ids = [view(a, m * k), view(bIdx, k * n), view(c, m * n)];
        try {
          withIds(m, k, n, ids[0], ids[1], ids[2]);
        } finally {
          ids.forEach(id => unregister(id));
        }
      },
      productWithWeightId: (m, k, n, a, bId, c) => {
        const ids = [view(a, m * k), view(c, m * n)];
        try {
          withIds(m, k, n, ids[0], bId, ids[1]);
        } finally {
          ids.forEach(id => unregister(id));
        }
      },
      register: view,
      unregister: id => unregister(id),
    };
  } else {
    products = {
      product: (m, k, n, a, bIdx, c) => { const h = wasm.HEAPF32; gemm(m, k, n, h, a, h, bIdx, h, c); },
      productWithWeightId: null,
      register: () => 0,
      unregister: () => {},
    };
  }
  productsOf.set(wasm, products);
  return products;
}

/**
 * tf.env() flag: bytes of XNNPACK operators (each holds a packed float32 copy of one expert's
 * weight in one layout, about rows·cols·4 bytes) that the wasm kernels keep for frozen expert
 * weights between calls. A frozen base is used in two layouts per step (W_eᵀ forward, W_e for
 * dx), so keeping all of it costs 2× its float32 size (4× a packed bf16 weight); beyond the
 * budget the least recently used are dropped and rebuilt when needed (as every call did
 * before). 0 keeps none.
 */
export const WEIGHT_CACHE_BYTES_FLAG = 'WASM_MOE_WEIGHT_CACHE_BYTES';
tf.env().registerFlag(WEIGHT_CACHE_BYTES_FLAG, () => 128 * 2 ** 20);

interface CachedWeight {
  /** the weight tensor the operator was built from: when it is disposed the entry is dropped */
  dataId: tf.DataId;
  /** the registered id XNNPACK's operator is cached under */
  id: number;
  bytes: number;
}

/**
 * The frozen expert weights' operators, per wasm module: key `${tensor id}/${expert}/${layout}`,
 * in least-recently-used order (a Map keeps insertion order; a hit moves the entry to the end).
 * tfjs tensors never change their values, and wasm tensor ids are never reused, so an entry is
 * valid as long as its tensor lives.
 */
interface WeightCache {
  entries: Map<string, CachedWeight>;
  bytes: number;
}

const weightCaches = new WeakMap<WasmModuleLike, WeightCache>();

function weightCache(b: WasmBackendLike): WeightCache {
  let cache = weightCaches.get(b.wasm);
  if (!cache) {
    cache = { entries: new Map(), bytes: 0 };
    weightCaches.set(b.wasm, cache);
  }
  return cache;
}

function dropCached(cache: WeightCache, key: string, entry: CachedWeight, products: HeapProducts): void {
  products.unregister(entry.id);   // tfjs-wasm deletes the operator (and its packed copy) with the id
  cache.entries.delete(key);
  cache.bytes -= entry.bytes;
}

/**
 * Makes room for `bytes` more: drops the entries of disposed tensors, then the least recently
 * used. False when `bytes` alone is over the budget (the caller then runs the product uncached).
 */
function makeRoom(b: WasmBackendLike, cache: WeightCache, bytes: number, products: HeapProducts): boolean {
  const budget = tf.env().getNumber(WEIGHT_CACHE_BYTES_FLAG);
  if (bytes > budget) return false;
  for (const [key, entry] of cache.entries) {
    if (!b.dataIdMap.has(entry.dataId)) dropCached(cache, key, entry, products);
  }
  for (const [key, entry] of cache.entries) {
    if (cache.bytes + bytes <= budget) break;
    dropCached(cache, key, entry, products);
  }
  return true;
}

/** Drops every kept operator (specs; a model's weights can also just be disposed). */
export function clearWasmWeightCache(backend: {}): void {
  const b = backend as WasmBackendLike;
  const cache = weightCaches.get(b.wasm);
  if (!cache) return;
  const products = heapProducts(b);
  for (const [key, entry] of cache.entries) dropCached(cache, key, entry, products);
}

/** The number of kept operators and their bytes (specs, the benchmark's notes). */
export function wasmWeightCacheSize(backend: {}): { entries: number; bytes: number } {
  const cache = weightCaches.get((backend as WasmBackendLike).wasm);
  return { entries: cache?.entries.size ?? 0, bytes: cache?.bytes ?? 0 };
}

/** out = a + b elementwise over `size` floats, for heap tensor ids (out may be a): tfjs-wasm's XNNPACK add. */
type HeapAdd = (aId: number, bId: number, outId: number, size: number) => void;

const addOf = new WeakMap<WasmModuleLike, HeapAdd | null>();

/**
 * tfjs-wasm's exported `Add` on the heap, or null without it. A JS loop over the wasm heap adds
 * at ~3.5 ns an element on the benchmark machine, XNNPACK's at ~0.35: split LoRA adds its branch
 * to the base output four times a step ([2048, 256] at S), ~7 ms in JS.
 */
function heapAdd(b: WasmBackendLike): HeapAdd | null {
  const wasm = b.wasm;
  if (!addOf.has(wasm)) {
    if (typeof wasm.cwrap !== 'function') {
      addOf.set(wasm, null);
    } else {
      const add = wasm.cwrap('Add', null, ['number', 'array', 'number', 'number', 'array', 'number', 'number', 'number']);
      addOf.set(wasm, (aId, bId, outId, size) => {
        const shape = new Uint8Array(new Int32Array([size]).buffer);
        add(aId, shape, 1, bId, shape, 1, 0 /* float32 */, outId);
      });
    }
  }
  return addOf.get(wasm)!;
}

/**
 * dst[n, cols] = rows idx[start] … idx[start + n − 1] of src (rows start … with `idx` null), all
 * on the heap by HEAPF32 / HEAP32 index: moe_simd's loop, else moe_math's gatherRowsInto.
 */
function heapGatherRows(b: WasmBackendLike, n: number, cols: number, src: number, idx: number | null, start: number, dst: number): void {
  const simd = moeSimd(b.wasm);
  if (simd) {
    simd.gatherRows(n, cols, src * 4, idx === null ? 0 : 1, (idx ?? 0) * 4, start, dst * 4);
  } else {
    gatherRowsInto(n, cols, b.wasm.HEAPF32, src, idx === null ? null : b.wasm.HEAP32, idx ?? 0, start, b.wasm.HEAPF32, dst);
  }
}

/** dst[cols, n] = (the rows heapGatherRows gathers)ᵀ: moe_simd's 8×4 blocks, else moe_math's gatherTransposeInto. */
function heapGatherTranspose(b: WasmBackendLike, n: number, cols: number, src: number, idx: number | null, start: number, dst: number): void {
  const simd = moeSimd(b.wasm);
  if (simd) {
    simd.gatherTranspose(n, cols, src * 4, idx === null ? 0 : 1, (idx ?? 0) * 4, start, dst * 4);
  } else {
    gatherTransposeInto(n, cols, b.wasm.HEAPF32, src, idx === null ? null : b.wasm.HEAP32, idx ?? 0, start, b.wasm.HEAPF32, dst);
  }
}

/** A scratch block on the heap, freed by `free`. */
interface Scratch { index: number; free(): void }

function scratch(b: WasmBackendLike, size: number): Scratch {
  const t = b.makeOutput([Math.max(size, 1)], 'float32');
  return { index: at(b, t), free: () => { b.disposeData(t.dataId); } };
}

/**
 * groupedMatMul with a narrow inner dimension (k <= 16: LoRA's expansions u·B_eᵀ and gr·A_e, k = r)
 * on moe_simd's product_narrow_k, the row gather, alpha and the addend folded in: XNNPACK runs these
 * at 10–12 GFLOP/s at S with an operator built per call (bench/wasm_simd_kernels.ts times both).
 * A W_e stored [m, k] (transposeW) is transposed into a scratch block first (k·m floats).
 */
function narrowKMatMul(
    b: WasmBackendLike, simd: MoESimd, x: tf.TensorInfo, rows: tf.TensorInfo | undefined, w: tf.TensorInfo,
    addTo: tf.TensorInfo | undefined, attrs: GroupedMatMulAttrs, out: tf.TensorInfo): void {
  const [k, m] = attrs.transposeW ? [attrs.wShape[2], attrs.wShape[1]] : [attrs.wShape[1], attrs.wShape[2]];
  forEachExpertWeight(b, simd, w, attrs, attrs.transposeW, (start, n, wIdx) => {
    simd.productNarrowK(n, k, m, at(b, x) * 4, rows ? 1 : 0, rows ? at(b, rows) * 4 : 0, start, wIdx * 4, attrs.alpha,
        addTo ? 1 : 0, addTo ? (at(b, addTo) + start * m) * 4 : 0, (at(b, out) + start * m) * 4);
  });
}

/**
 * groupedMatMul with a narrow output (m <= 16: LoRA's u = s·x·A_eᵀ and gr = s·dy·B_e, m = r) on
 * moe_simd's product_narrow_m (dot products along k, the row gather and alpha folded in), against
 * XNNPACK's 10–13 GFLOP/s at S with an operator built per call (bench/wasm_simd_kernels.ts). A W_e
 * stored [k, m] (not transposeW) is transposed into a scratch block first (k·m floats).
 */
function narrowMMatMul(
    b: WasmBackendLike, simd: MoESimd, x: tf.TensorInfo, rows: tf.TensorInfo | undefined, w: tf.TensorInfo,
    attrs: GroupedMatMulAttrs, out: tf.TensorInfo): void {
  const [k, m] = attrs.transposeW ? [attrs.wShape[2], attrs.wShape[1]] : [attrs.wShape[1], attrs.wShape[2]];
  forEachExpertWeight(b, simd, w, attrs, !attrs.transposeW, (start, n, wIdx) => {
    simd.productNarrowM(n, k, m, at(b, x) * 4, rows ? 1 : 0, rows ? at(b, rows) * 4 : 0, start, wIdx * 4, attrs.alpha,
        (at(b, out) + start * m) * 4);
  });
}

/**
 * Calls `run` for each expert with rows: its first row, its row count and the heap index of its
 * W_e [p, q], or of W_eᵀ in a scratch block (p·q floats, reused) where `transposed` asks for it.
 */
function forEachExpertWeight(
    b: WasmBackendLike, simd: MoESimd, w: tf.TensorInfo, attrs: GroupedMatMulAttrs, transposed: boolean,
    run: (start: number, n: number, wIdx: number) => void): void {
  const [, p, q] = attrs.wShape;
  const wt = transposed ? scratch(b, p * q) : null;
  try {
    let start = 0;
    attrs.groupSizes.forEach((n, e) => {
      if (n === 0) return;
      let wIdx = at(b, w) + e * p * q;
      if (wt) {
        simd.gatherTranspose(p, q, wIdx * 4, 0, 0, 0, wt.index * 4);
        wIdx = wt.index;
      }
      run(start, n, wIdx);
      start += n;
    });
  } finally {
    wt?.free();
  }
}

function groupedMatMul({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const b = backend as unknown as WasmBackendLike;
  const { x, w, rows, bias, addTo } = inputs;
  const { groupSizes, transposeW, alpha, packed, wShape, frozenW, inputAxis, groupSize } = attrs as unknown as GroupedMatMulAttrs;
  const format: PackedFormat | null = packed !== 'none' ? { kind: packed, shape: wShape, inputAxis, groupSize } : null;
  const layout = format ? layoutOf(format) : null;
  const [, p, q] = wShape;
  const [k, m] = transposeW ? [q, p] : [p, q];
  const total = groupSizes.reduce((s, n) => s + n, 0);
  const out = b.makeOutput([total, m], 'float32');
  const simd = (k <= NARROW || (m <= NARROW && !addTo)) && packed === 'none' && !bias ? moeSimd(b.wasm) : null;
  if (simd && k <= NARROW) {
    narrowKMatMul(b, simd, x, rows, w, addTo, attrs as unknown as GroupedMatMulAttrs, out);
    return out;
  }
  if (simd) {
    narrowMMatMul(b, simd, x, rows, w, attrs as unknown as GroupedMatMulAttrs, out);
    return out;
  }
  const maxRows = Math.max(0, ...groupSizes);
  const products = heapProducts(b);
  const cache = frozenW && products.productWithWeightId ? weightCache(b) : null;
  if (cache && cache.bytes > tf.env().getNumber(WEIGHT_CACHE_BYTES_FLAG)) makeRoom(b, cache, 0, products);  // the budget was lowered
  const wId = cache ? b.dataIdMap.get(w.dataId).id : 0;
  // The addend goes in at the end, in one vectorized pass over the whole output (y + addTo rounds
  // the same in either order); with a scale or a bias it is added per expert as before.
  const add = addTo && alpha === 1 && !bias ? heapAdd(b) : null;
  const xs = rows ? scratch(b, maxRows * k) : null;        // one expert's gathered rows
  const blocks: { wt?: Scratch; dec?: Scratch } = {};      // one expert's W_eᵀ, its decoded packed weight
  const wordsPerExpert = w.shape[1] as number;
  /** HEAPF32 index of expert e's weight as the product reads it ([k, m]), decoded and transposed when needed */
  const weightBlock = (e: number): number => {
    let wIdx = at(b, w) + e * p * q;
    if (packed !== 'none') {
      blocks.dec ??= scratch(b, p * q);
      decodePackedExpertInto(format!, layout, b.wasm.HEAP32, at(b, w) + e * wordsPerExpert,
          b.wasm.HEAPF32, b.wasm.HEAP32, blocks.dec.index);
      wIdx = blocks.dec.index;
    }
    if (transposeW) {
      blocks.wt ??= scratch(b, k * m);
      heapGatherTranspose(b, p, q, wIdx, null, 0, blocks.wt.index);
      wIdx = blocks.wt.index;
    }
    return wIdx;
  };
  try {
    let start = 0;
    groupSizes.forEach((n, e) => {
      if (n === 0) return;
      let a = at(b, x) + start * k;
      if (xs) {
        heapGatherRows(b, n, k, at(b, x), at(b, rows), start, xs.index);
        a = xs.index;
      }
      const o = at(b, out) + start * m;
      const key = cache ? `${wId}/${e}/${transposeW ? 't' : 'n'}` : '';
      const hit = cache?.entries.get(key);
      if (cache && hit) {
        cache.entries.delete(key);    // most recently used: to the end
        cache.entries.set(key, hit);
        products.productWithWeightId!(n, k, m, a, hit.id, o);
      } else if (cache && makeRoom(b, cache, k * m * 4, products)) {
        // The operator packs B when it is built and never reads it again: the id may point at a
        // scratch block that is reused for the next expert.
        const entry: CachedWeight = { dataId: w.dataId, id: products.register(weightBlock(e), k * m), bytes: k * m * 4 };
        cache.entries.set(key, entry);
        cache.bytes += entry.bytes;
        products.productWithWeightId!(n, k, m, a, entry.id, o);
      } else {
        products.product(n, k, m, a, weightBlock(e), o);
      }
      const after = b.wasm.HEAPF32;   // the product may have grown the heap
      const oi = at(b, out) + start * m;
      if (alpha !== 1 || (addTo && !add)) scaleAdd(n * m, alpha, after, oi, addTo ? after : null, addTo ? at(b, addTo) + start * m : 0);
      if (bias) addRowVector(n, m, after, oi, after, at(b, bias) + e * m);
      start += n;
    });
    if (add && total > 0) {
      const outId = b.dataIdMap.get(out.dataId).id;
      add(outId, b.dataIdMap.get(addTo!.dataId).id, outId, total * m);
    }
  } finally {
    xs?.free();
    blocks.wt?.free();
    blocks.dec?.free();
  }
  return out;
}

/**
 * groupedWeightGrad with a narrow side (LoRA's dA = grᵀ·x and dB = dyᵀ·u, a bias's 1ᵀ·dy) as
 * moe_simd's rank-1 updates, the wide side along the vectors: no transpose of the wide operand and
 * no operand packed per call as on XNNPACK (bench/wasm_simd_kernels.ts times both at S). With the
 * wide side on the left it computes (bᵀ·a) and transposes that small block into place.
 */
function narrowWeightGrad(
    bk: WasmBackendLike, simd: MoESimd, a: tf.TensorInfo, b: tf.TensorInfo, aRows: tf.TensorInfo | undefined,
    bRows: tf.TensorInfo | undefined, groupSizes: number[], out: tf.TensorInfo): void {
  const p = a.shape[1];
  const q = b.shape[1];
  const swap = p > q;
  const swapped = swap ? scratch(bk, p * q) : null;   // one expert's [q, p]
  const side = (t: tf.TensorInfo, rows: tf.TensorInfo | undefined): [number, number, number] =>
    [at(bk, t) * 4, rows ? 1 : 0, rows ? at(bk, rows) * 4 : 0];
  const [left, right] = swap ? [side(b, bRows), side(a, aRows)] : [side(a, aRows), side(b, bRows)];
  const [rowsOut, colsOut] = swap ? [q, p] : [p, q];
  try {
    let start = 0;
    groupSizes.forEach((n, e) => {
      const o = (at(bk, out) + e * p * q) * 4;
      simd.weightGrad(n, rowsOut, colsOut, ...left, ...right, start, swapped ? swapped.index * 4 : o);   // zeros when n = 0
      if (swapped) simd.gatherTranspose(q, p, swapped.index * 4, 0, 0, 0, o);
      start += n;
    });
  } finally {
    swapped?.free();
  }
}

function groupedWeightGrad({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const bk = backend as unknown as WasmBackendLike;
  const { a, b, aRows, bRows } = inputs;
  const { groupSizes } = attrs as unknown as GroupedWeightGradAttrs;
  const p = a.shape[1];
  const q = b.shape[1];
  const out = bk.makeOutput([groupSizes.length, p, q], 'float32');
  const simd = Math.min(p, q) <= NARROW ? moeSimd(bk.wasm) : null;
  if (simd) {
    narrowWeightGrad(bk, simd, a, b, aRows, bRows, groupSizes, out);
    return out;
  }
  const maxRows = Math.max(0, ...groupSizes);
  // XNNPACK packs the product's right operand ([n, q] here) on every call, ~5 ns an element, more
  // than the product costs when the other side is narrow (LoRA's dA = grᵀ·x: p = r = 8 rows out
  // of [n, 256] packed). Then the product runs the other way round, (bᵀ·a)ᵀ, packing a [n, p].
  const swap = p < q;
  const [lead, packed] = swap ? [q, p] : [p, q];           // the product: [lead, n]·[n, packed]
  const leadT = scratch(bk, maxRows * lead);               // one expert's leading operand's rows, transposed
  const packedRows = (swap ? aRows : bRows) ? scratch(bk, maxRows * packed) : null;
  const swapped = swap ? scratch(bk, p * q) : null;        // one expert's [q, p] before its transpose
  const run = heapProducts(bk).product;
  try {
    const [ai, bi, oi] = [at(bk, a), at(bk, b), at(bk, out)];
    const ari = aRows ? at(bk, aRows) : 0;
    const bri = bRows ? at(bk, bRows) : 0;
    const [li, lri, lIndexed, pi, pri] = swap ? [bi, bri, bRows, ai, ari] : [ai, ari, aRows, bi, bri];
    let start = 0;
    groupSizes.forEach((n, e) => {
      const o = oi + e * p * q;
      if (n === 0) {
        bk.wasm.HEAPF32.fill(0, o, o + p * q);   // the heap is not zeroed
        return;
      }
      heapGatherTranspose(bk, n, lead, li, lIndexed ? lri : null, start, leadT.index);  // [lead, n]
      let pIdx = pi + start * packed;
      if (packedRows) {
        heapGatherRows(bk, n, packed, pi, pri, start, packedRows.index);
        pIdx = packedRows.index;
      }
      if (swapped) {
        run(q, n, p, leadT.index, pIdx, swapped.index);
        heapGatherTranspose(bk, q, p, swapped.index, null, 0, o);
      } else {
        run(p, n, q, leadT.index, pIdx, o);
      }
      start += n;
    });
  } finally {
    leadT.free();
    packedRows?.free();
    swapped?.free();
  }
  return out;
}

/** out = σ(x) elementwise for two tensors' heap ids (tfjs-wasm's XNNPACK sigmoid, SIMD), or null. */
type HeapSigmoid = (xId: number, outId: number) => void;

const sigmoidOf = new WeakMap<WasmModuleLike, HeapSigmoid | null>();

function heapSigmoid(b: WasmBackendLike): HeapSigmoid | null {
  const wasm = b.wasm;
  if (!sigmoidOf.has(wasm)) {
    sigmoidOf.set(wasm, typeof wasm.cwrap === 'function' ? wasm.cwrap('Sigmoid', null, ['number', 'number']) : null);
  }
  return sigmoidOf.get(wasm)!;
}

/**
 * σ of every element of h [n, 2I] into a scratch block, for SwiGLU with gate and up halves: in JS
 * Math.exp costs ~15 ns an element (three quarters of the activation's time), XNNPACK's
 * vectorized sigmoid ~1.3 ns. The up half's σ is computed too and not read: the call takes only
 * contiguous tensors, and it is cheaper than a gather of the gate columns. Null (the caller runs
 * the JS loop) for gpt-oss's clamped, interleaved GLU or without the export.
 */
function sigmoidOfH(b: WasmBackendLike, h: tf.TensorInfo, params: ExpertActivationAttrs):
    { index: number; free(): void } | null {
  const sigmoid = params.clamped || params.gelu || params.interleaved ? null : heapSigmoid(b);
  if (sigmoid === null) return null;
  const t = b.makeOutput([...h.shape], 'float32');
  sigmoid(b.dataIdMap.get(h.dataId).id, b.dataIdMap.get(t.dataId).id);
  return { index: at(b, t), free: () => { b.disposeData(t.dataId); } };
}

/**
 * moe_simd's SwiGLU: gate and up halves, at least 8 columns in each (its step). gpt-oss's clamped,
 * interleaved GLU, GELU and narrower rows run the JS loops.
 */
const simdSwiglu = (b: WasmBackendLike, params: ExpertActivationAttrs, inter: number) =>
  !params.clamped && !params.gelu && !params.interleaved && inter >= 8 ? moeSimd(b.wasm) : null;

function expertActivation({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo[] {
  const b = backend as unknown as WasmBackendLike;
  const { h, scale } = inputs;
  const params = attrs as unknown as ExpertActivationAttrs;
  const [n, twoI] = h.shape;
  const inter = twoI / 2;
  const outs = [b.makeOutput([n, inter], 'float32')];
  if (scale) outs.push(b.makeOutput([n, inter], 'float32'));
  const simd = simdSwiglu(b, params, inter);
  if (simd) {
    simd.swigluForward(n, inter, at(b, h) * 4, at(b, outs[0]) * 4, scale ? 1 : 0, scale ? at(b, scale) * 4 : 0, scale ? at(b, outs[1]) * 4 : 0);
    return outs;
  }
  const sig = sigmoidOfH(b, h, params);
  try {
    const heap = b.wasm.HEAPF32;   // after the allocations
    if (sig) {
      swigluForward(n, inter, heap, at(b, h), sig.index, at(b, outs[0]), scale ? at(b, scale) : -1, scale ? at(b, outs[1]) : 0);
    } else {
      activationForward(n, inter, params, heap, at(b, h), heap, at(b, outs[0]),
          scale ? heap : null, scale ? at(b, scale) : 0, scale ? heap : null, scale ? at(b, outs[1]) : 0);
    }
  } finally {
    sig?.free();
  }
  return outs;
}

/** activationForward's SwiGLU (halves) with σ(h) given at heap[sig …]; scale −1: none. */
function swigluForward(n: number, inter: number, heap: Float32Array, h: number, sig: number, a: number, scale: number, aScaled: number): void {
  for (let r = 0; r < n; r++) {
    const g0 = h + r * 2 * inter;
    const u0 = g0 + inter;
    const s0 = sig + r * 2 * inter;
    const a0 = a + r * inter;
    if (scale < 0) {
      for (let j = 0; j < inter; j++) heap[a0 + j] = (heap[g0 + j] * heap[u0 + j]) * heap[s0 + j];
    } else {
      const s = heap[scale + r];
      const as0 = aScaled + r * inter;
      for (let j = 0; j < inter; j++) {
        const v = Math.fround((heap[g0 + j] * heap[u0 + j]) * heap[s0 + j]);
        heap[a0 + j] = v;
        heap[as0 + j] = v * s;
      }
    }
  }
}

/** activationBackward's SwiGLU (halves) with σ(h) given at heap[sig …]; scale −1: none. */
function swigluBackward(n: number, inter: number, heap: Float32Array, h: number, sig: number, da: number, scale: number, dh: number): void {
  for (let r = 0; r < n; r++) {
    const g0 = h + r * 2 * inter;
    const s0 = sig + r * 2 * inter;
    const d0 = dh + r * 2 * inter;
    const a0 = da + r * inter;
    const s = scale < 0 ? 1 : heap[scale + r];
    for (let j = 0; j < inter; j++) {
      const g = heap[g0 + j];
      const u = heap[g0 + inter + j];
      const d = heap[a0 + j] * s;
      const sg = heap[s0 + j];
      // silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
      heap[d0 + j] = d * u * sg * (1 + g * (1 - sg));
      heap[d0 + inter + j] = d * g * sg;
    }
  }
}

function expertActivationGrad({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const b = backend as unknown as WasmBackendLike;
  const { h, da, scale } = inputs;
  const params = attrs as unknown as ExpertActivationAttrs;
  const [n, twoI] = h.shape;
  const out = b.makeOutput([n, twoI], 'float32');
  const simd = simdSwiglu(b, params, twoI / 2);
  if (simd) {
    simd.swigluBackward(n, twoI / 2, at(b, h) * 4, at(b, da) * 4, scale ? 1 : 0, scale ? at(b, scale) * 4 : 0, at(b, out) * 4);
    return out;
  }
  const sig = sigmoidOfH(b, h, params);
  try {
    const heap = b.wasm.HEAPF32;
    if (sig) {
      swigluBackward(n, twoI / 2, heap, at(b, h), sig.index, at(b, da), scale ? at(b, scale) : -1, at(b, out));
    } else {
      activationBackward(n, twoI / 2, params, heap, at(b, h), heap, at(b, da),
          scale ? heap : null, scale ? at(b, scale) : 0, heap, at(b, out));
    }
  } finally {
    sig?.free();
  }
  return out;
}

function combine({ inputs, backend, attrs }: KernelArgs): tf.TensorInfo {
  const b = backend as unknown as WasmBackendLike;
  const { y, rowOfPair, weights } = inputs;
  const { numTokens, topK } = attrs as unknown as PairAttrs;
  const cols = y.shape[1];
  const out = b.makeOutput([numTokens, cols], 'float32');
  const simd = topK > 0 ? moeSimd(b.wasm) : null;   // its slot loop runs at least once
  if (simd) {
    simd.combineRows(numTokens, topK, cols, at(b, y) * 4, at(b, rowOfPair) * 4, weights ? 1 : 0, weights ? at(b, weights) * 4 : 0, at(b, out) * 4);
    return out;
  }
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
  const simd = moeSimd(bk.wasm);
  if (simd) {
    simd.pairRowDot(numTokens * topK, a.shape[1], at(bk, a) * 4, at(bk, b) * 4, at(bk, rowOfPair) * 4, at(bk, out) * 4);
    return out;
  }
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
