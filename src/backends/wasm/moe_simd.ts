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
 */
import * as tf from '@tensorflow/tfjs-core';
import { MOE_SIMD_SHARED_WASM_BASE64, MOE_SIMD_WASM_BASE64 } from './moe_simd_bytes.js';

/** tf.env() flag: run the wasm kernels' loops in this module (true) or in JS (false, for A/B and specs). */
export const SIMD_KERNELS_FLAG = 'WASM_MOE_SIMD_KERNELS';
tf.env().registerFlag(SIMD_KERNELS_FLAG, () => true);

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

/** Per tfjs-wasm module: the instance, null (not available), or the asynchronous compile under way. */
const instances = new WeakMap<object, MoESimd | null | Promise<void>>();

function exportsOf(instance: WebAssembly.Instance): MoESimd {
  const e = instance.exports as Record<string, (...args: number[]) => void>;
  return {
    swigluForward: e.swiglu_forward,
    swigluBackward: e.swiglu_backward,
    combineRows: e.combine_rows,
    pairRowDot: e.pair_row_dot,
    gatherRows: e.gather_rows,
    gatherTranspose: e.gather_transpose,
    weightGrad: e.weight_grad,
    productNarrowK: e.product_narrow_k,
    productNarrowM: e.product_narrow_m,
  };
}

function instantiate(wasm: object): MoESimd | null | Promise<void> {
  const memory = (wasm as WasmModuleWithMemory).asm?.memory ?? (wasm as WasmModuleWithMemory).wasmMemory;
  if (typeof WebAssembly === 'undefined' || !(memory instanceof WebAssembly.Memory)) return null;
  // a shared memory is imported by the module's twin that declares it shared
  const shared = typeof SharedArrayBuffer !== 'undefined' && memory.buffer instanceof SharedArrayBuffer;
  const bytes = Uint8Array.from(atob(shared ? MOE_SIMD_SHARED_WASM_BASE64 : MOE_SIMD_WASM_BASE64), c => c.charCodeAt(0));
  if (!WebAssembly.validate(bytes)) return null;   // no SIMD in this engine
  const imports = { env: { memory } };
  try {
    return exportsOf(new WebAssembly.Instance(new WebAssembly.Module(bytes), imports));
  } catch {
    return WebAssembly.instantiate(bytes, imports).then(
        ({ instance }) => { instances.set(wasm, exportsOf(instance)); },
        () => { instances.set(wasm, null); });
  }
}

/** The module on this backend's heap (instantiated once per tfjs-wasm module), or null: see the file comment. */
export function moeSimd(wasm: object): MoESimd | null {
  if (!tf.env().getBool(SIMD_KERNELS_FLAG)) return null;
  if (!instances.has(wasm)) instances.set(wasm, instantiate(wasm));
  const state = instances.get(wasm)!;
  return state instanceof Promise ? null : state;
}

/** Resolves when the module for this tfjs-wasm module is loaded or known unavailable: true when loaded. */
export async function moeSimdSettled(wasm: object): Promise<boolean> {
  if (!instances.has(wasm)) instances.set(wasm, instantiate(wasm));
  await instances.get(wasm);
  return instances.get(wasm) != null;
}
