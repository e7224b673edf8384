/**
 * The package's own small WebAssembly module with SIMD loops for the fused experts' work around
 * the products on the wasm backend: SwiGLU forward and backward, combine, the pairs' row dots and
 * the row gathers / transposes that feed the weight gradients. Its source is
 * tools/wasm_simd/moe_simd.wat (what each function computes, and how its results compare with
 * the JS loops it replaces); the bytes are generated into moe_simd_bytes.ts.
 *
 * The module imports tfjs-backend-wasm's own memory (the Emscripten module's `asm.memory`, or the
 * threaded build's shared `wasmMemory`, which a twin of the module imports as shared), so it
 * works on the tensors in place: no copy in or out, and a heap that grows stays visible to it. Its
 * loops run on the calling thread, between tfjs-wasm's kernels, never beside XNNPACK's workers.
 * Where that memory is not reachable (another tfjs-wasm build), the engine has no wasm SIMD, or the
 * flag below is off, `moeSimd` returns null and the kernels run their JS loops. The module is over 4 KB, which
 * Chrome's main thread refused to compile synchronously (a RangeError; headless Chromium 156 no
 * longer does): where the synchronous compile throws, the first call starts an asynchronous one
 * and the kernels run their JS loops until it is done (`moeSimdSettled` waits for it).
 *
 * On a shared heap, threads of the module's own may be attached (`attachMoESimdThreads`: Node's
 * worker_threads, moe_simd_threads_node.ts): every loop then runs on parts of its rows at once
 * (weight_grad: of its output's rows), each part on one thread, with the same results bit for bit
 * (an output row is computed by the same code, in the same order, whichever thread runs it).
 * XNNPACK's products already run on the threaded build's pool; without this the loops between
 * them ran on the calling thread alone.
 */
import * as tf from '@tensorflow/tfjs-core';
import { MOE_SIMD_SHARED_WASM_BASE64, MOE_SIMD_WASM_BASE64 } from './moe_simd_bytes.js';

/** tf.env() flag: run the wasm kernels' loops in this module (true) or in JS (false, for A/B and specs). */
export const SIMD_KERNELS_FLAG = 'WASM_MOE_SIMD_KERNELS';
tf.env().registerFlag(SIMD_KERNELS_FLAG, () => true);

/** tf.env() flag: split the loops' rows over attached threads (true) or run them on the calling thread (false, for A/B and specs). */
export const SIMD_THREADS_FLAG = 'WASM_MOE_SIMD_THREADS';
tf.env().registerFlag(SIMD_THREADS_FLAG, () => true);

/**
 * The module's exports. Every address is a byte offset on the wasm heap (a HEAPF32 index · 4);
 * a flag argument is 1 or 0 and says whether the optional operand after it is read.
 */
export interface MoESimd {
  swigluForward(n: number, inter: number, h: number, a: number, scaled: number, scale: number, aScaled: number): void;
  swigluBackward(n: number, inter: number, h: number, da: number, scaled: number, scale: number, dh: number): void;
  combineRows(t: number, k: number, cols: number, y: number, rowOfPair: number, weighted: number, w: number, out: number): void;
  pairRowDot(pairs: number, cols: number, a: number, b: number, rowOfPair: number, out: number): void;
  gatherRows(n: number, cols: number, src: number, indexed: number, idx: number, start: number, dst: number): void;
  gatherTranspose(n: number, cols: number, src: number, indexed: number, idx: number, start: number, dst: number): void;
  weightGrad(n: number, p: number, q: number, a: number, aIndexed: number, aIdx: number, b: number, bIndexed: number,
             bIdx: number, start: number, out: number): void;
  productNarrowK(n: number, k: number, m: number, x: number, xIndexed: number, xIdx: number, start: number, w: number,
                 alpha: number, added: number, add: number, out: number): void;
  productNarrowM(n: number, k: number, m: number, x: number, xIndexed: number, xIdx: number, start: number, wt: number,
                 alpha: number, out: number): void;
}

/**
 * What is read of tfjs-backend-wasm's Emscripten module: the single-threaded build exports its
 * memory (`asm.memory`); the threaded build creates a shared one and keeps it as `wasmMemory`.
 */
interface WasmModuleWithMemory {
  asm?: { memory?: unknown };
  wasmMemory?: unknown;
}

/** The loops that `MoESimdThreads` may split by rows, by their export names in the module. */
export const ROW_SPLIT_EXPORTS = [
  'swiglu_forward', 'swiglu_backward', 'combine_rows', 'pair_row_dot', 'gather_rows', 'gather_transpose', 'weight_grad',
  'product_narrow_k', 'product_narrow_m',
] as const;
export type RowSplitExport = typeof ROW_SPLIT_EXPORTS[number];

/**
 * Threads with instances of the module on the same shared heap, which run one export on several
 * argument lists at once.
 */
export interface MoESimdThreads {
  /** How many argument lists run at once: the threads and the calling thread. */
  readonly parts: number;
  /**
   * Runs export `name` once per argument list: `own` (the calling thread's instance) on the first,
   * the threads on the others; returns when all are done.
   */
  run(name: RowSplitExport, parts: readonly number[][], own: (...args: number[]) => void): void;
}

/** The module's exports by name. */
type RawExports = Record<RowSplitExport, (...args: number[]) => void>;

/** A loaded module on one tfjs-wasm module's heap, and the threads attached to it. */
interface Loaded {
  simd: MoESimd;
  raw: RawExports;
  module: WebAssembly.Module;
  memory: WebAssembly.Memory;
  threads?: { pool: MoESimdThreads; split: MoESimd };
}

/** Per tfjs-wasm module: the loaded module, null (not available), or the asynchronous compile under way. */
const instances = new WeakMap<object, Loaded | null | Promise<void>>();

/**
 * The interface on an instance's exports: gather_transpose's destination row and weight_grad's
 * row of a are the whole ones (what a thread's part moves: splitRows).
 */
function exportsOf(e: RawExports): MoESimd {
  return {
    swigluForward: e.swiglu_forward,
    swigluBackward: e.swiglu_backward,
    combineRows: e.combine_rows,
    pairRowDot: e.pair_row_dot,
    gatherRows: e.gather_rows,
    gatherTranspose: (n, cols, src, indexed, idx, start, dst) => e.gather_transpose(n, cols, src, indexed, idx, start, dst, n),
    weightGrad: (n, p, q, a, aIndexed, aIdx, b, bIndexed, bIdx, start, out) =>
      e.weight_grad(n, p, q, a, aIndexed, aIdx, b, bIndexed, bIdx, start, out, p),
    productNarrowK: e.product_narrow_k,
    productNarrowM: e.product_narrow_m,
  };
}

function instantiate(wasm: object): Loaded | null | Promise<void> {
  const memory = (wasm as WasmModuleWithMemory).asm?.memory ?? (wasm as WasmModuleWithMemory).wasmMemory;
  if (typeof WebAssembly === 'undefined' || !(memory instanceof WebAssembly.Memory)) return null;
  // a shared memory is imported by the module's twin that declares it shared
  const shared = typeof SharedArrayBuffer !== 'undefined' && memory.buffer instanceof SharedArrayBuffer;
  const bytes = Uint8Array.from(atob(shared ? MOE_SIMD_SHARED_WASM_BASE64 : MOE_SIMD_WASM_BASE64), c => c.charCodeAt(0));
  if (!WebAssembly.validate(bytes)) return null;   // no SIMD in this engine
  const imports = { env: { memory } };
  try {
    const module = new WebAssembly.Module(bytes);
    const raw = new WebAssembly.Instance(module, imports).exports as unknown as RawExports;
    return { simd: exportsOf(raw), raw, module, memory };
  } catch {
    return WebAssembly.instantiate(bytes, imports).then(
        ({ module, instance }) => {
          const raw = instance.exports as unknown as RawExports;
          instances.set(wasm, { simd: exportsOf(raw), raw, module, memory });
        },
        () => { instances.set(wasm, null); });
  }
}

/** The loaded module for this tfjs-wasm module, null where it is not (yet) available. */
function loaded(wasm: object): Loaded | null {
  if (!instances.has(wasm)) instances.set(wasm, instantiate(wasm));
  const state = instances.get(wasm)!;
  return state instanceof Promise ? null : state;
}

/**
 * The module on this backend's heap (instantiated once per tfjs-wasm module), with its row loops
 * split over attached threads where the flag says so, or null: see the file comment.
 */
export function moeSimd(wasm: object): MoESimd | null {
  if (!tf.env().getBool(SIMD_KERNELS_FLAG)) return null;
  const state = loaded(wasm);
  if (state === null) return null;
  return state.threads !== undefined && tf.env().getBool(SIMD_THREADS_FLAG) ? state.threads.split : state.simd;
}

/** Resolves when the module for this tfjs-wasm module is loaded or known unavailable: true when loaded. */
export async function moeSimdSettled(wasm: object): Promise<boolean> {
  if (!instances.has(wasm)) instances.set(wasm, instantiate(wasm));
  await instances.get(wasm);
  return instances.get(wasm) != null;
}

/**
 * The compiled module and the shared heap it imports, for threads to instantiate it on: null
 * where the module is not loaded or the heap is not shared.
 */
export function moeSimdSharedModule(wasm: object): { module: WebAssembly.Module; memory: WebAssembly.Memory } | null {
  const state = loaded(wasm);
  if (state === null || typeof SharedArrayBuffer === 'undefined' || !(state.memory.buffer instanceof SharedArrayBuffer)) return null;
  return { module: state.module, memory: state.memory };
}

/** The threads attached to the module on this tfjs-wasm module's heap, or null. */
export function attachedMoESimdThreads(wasm: object): MoESimdThreads | null {
  return loaded(wasm)?.threads?.pool ?? null;
}

/** Attaches threads to the module on this tfjs-wasm module's heap (null detaches them). */
export function attachMoESimdThreads(wasm: object, pool: MoESimdThreads | null): void {
  const state = loaded(wasm);
  if (state === null) throw new Error('attachMoESimdThreads: the module is not loaded on this heap');
  state.threads = pool === null ? undefined : { pool, split: splitRows(state.simd, state.raw, pool) };
}

/** A part below this many floats read and written costs less than waking a thread for it. */
const PART_MIN_FLOATS = 1 << 14;

/**
 * Calls `own` on rows 0 … n − 1, or `pool` on up to pool.parts ranges of them, where each part
 * has at least PART_MIN_FLOATS (rowFloats a row; for weight_grad, whose rows are out's, the
 * products of one). `args(first, rows)` is the argument list of a range: the row count and the
 * pointers moved to its first row. Ranges start at multiples of `align` rows (gather_transpose's
 * blocks of eight).
 */
function byRows(pool: MoESimdThreads, name: RowSplitExport, own: (...args: number[]) => void, n: number, rowFloats: number,
    args: (first: number, rows: number) => number[], align = 1): void {
  const parts = Math.min(pool.parts, Math.floor(n / align), Math.floor(n * rowFloats / PART_MIN_FLOATS));
  if (parts <= 1) {
    own(...args(0, n));
    return;
  }
  const lists: number[][] = [];
  const startOf = (p: number) => (p === parts ? n : Math.floor(n * p / parts / align) * align);
  for (let p = 0; p < parts; p++) lists.push(args(startOf(p), startOf(p + 1) - startOf(p)));
  pool.run(name, lists, own);
}

/**
 * `simd` with its row loops split over `pool`: each range's pointers move to its first row (by the
 * row's bytes; an index array by its entries; `start` by rows). Optional operands stay 0 when
 * their flag is off. gather_transpose's rows become destination columns (a part writes columns of
 * the whole destination rows); weight_grad sums over its rows, so its parts take rows of out (and
 * columns of a).
 */
function splitRows(simd: MoESimd, raw: RawExports, pool: MoESimdThreads): MoESimd {
  return {
    ...simd,
    gatherTranspose: (n, cols, src, indexed, idx, start, dst) =>
      byRows(pool, 'gather_transpose', raw.gather_transpose, n, 2 * cols, (r, rows) =>
        [rows, cols, src, indexed, idx, start + r, dst + r * 4, n], 8),
    weightGrad: (n, p, q, a, aIndexed, aIdx, b, bIndexed, bIdx, start, out) =>
      byRows(pool, 'weight_grad', raw.weight_grad, p, n * q, (i, rows) =>
        [n, rows, q, a + i * 4, aIndexed, aIdx, b, bIndexed, bIdx, start, out + i * 4 * q, p]),
    swigluForward: (n, inter, h, a, scaled, scale, aScaled) =>
      byRows(pool, 'swiglu_forward', simd.swigluForward, n, (3 + scaled * 2) * inter, (r, rows) =>
        [rows, inter, h + r * 8 * inter, a + r * 4 * inter, scaled, scaled ? scale + r * 4 : 0, scaled ? aScaled + r * 4 * inter : 0]),
    swigluBackward: (n, inter, h, da, scaled, scale, dh) =>
      byRows(pool, 'swiglu_backward', simd.swigluBackward, n, 5 * inter, (r, rows) =>
        [rows, inter, h + r * 8 * inter, da + r * 4 * inter, scaled, scaled ? scale + r * 4 : 0, dh + r * 8 * inter]),
    combineRows: (t, k, cols, y, rowOfPair, weighted, w, out) =>
      byRows(pool, 'combine_rows', simd.combineRows, t, (k + 1) * cols, (r, rows) =>
        [rows, k, cols, y, rowOfPair + r * 4 * k, weighted, weighted ? w + r * 4 * k : 0, out + r * 4 * cols]),
    pairRowDot: (pairs, cols, a, b, rowOfPair, out) =>
      byRows(pool, 'pair_row_dot', simd.pairRowDot, pairs, 2 * cols, (r, rows) =>
        [rows, cols, a, b, rowOfPair + r * 4, out + r * 4]),
    gatherRows: (n, cols, src, indexed, idx, start, dst) =>
      byRows(pool, 'gather_rows', simd.gatherRows, n, 2 * cols, (r, rows) =>
        [rows, cols, src, indexed, idx, start + r, dst + r * 4 * cols]),
    productNarrowK: (n, k, m, x, xIndexed, xIdx, start, w, alpha, added, add, out) =>
      byRows(pool, 'product_narrow_k', simd.productNarrowK, n, k + (1 + added) * m, (r, rows) =>
        [rows, k, m, x, xIndexed, xIdx, start + r, w, alpha, added, added ? add + r * 4 * m : 0, out + r * 4 * m]),
    productNarrowM: (n, k, m, x, xIndexed, xIdx, start, wt, alpha, out) =>
      byRows(pool, 'product_narrow_m', simd.productNarrowM, n, k + m, (r, rows) =>
        [rows, k, m, x, xIndexed, xIdx, start + r, wt, alpha, out + r * 4 * m]),
  };
}
