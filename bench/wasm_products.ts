/**
 * What bounds the fused block on wasm: tfjs-wasm's XNNPACK product (its exported BatchMatMul,
 * called on the heap as src/backends/wasm/moe_kernels.ts calls it) at config S's per-expert
 * shapes, with the operator built per call (a weight id registered and dropped, as for a trained
 * weight) and kept (a frozen one), and its vectorized sigmoid against Math.exp in JS; then the
 * data moves around the products: moe_math's transpose (JS) against tfjs-wasm's Transpose, and an
 * elementwise add in JS against tfjs-wasm's Add (XNNPACK), both on the heap.
 * `npx tsx bench/wasm_products.ts`; medians of 40 calls (20 for the sigmoid).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-wasm';
import { scaleAdd, transposeInto } from '../src/backends/cpu/moe_math.js';

interface WasmBackendInternals {
  wasm: {
    HEAPF32: Float32Array;
    cwrap(name: string, ret: null, types: string[]): (...args: unknown[]) => void;
    tfjs: { registerTensor(id: number, size: number, offset: number): void; disposeData(id: number): void };
  };
  dataIdMap: { get(dataId: tf.DataId): { id: number; memoryOffset: number } };
  dataIdNextNumber: number;
  makeOutput(shape: number[], dtype: tf.DataType): tf.TensorInfo;
}

await tf.setBackend('wasm');
const b = tf.backend() as unknown as WasmBackendInternals;
const wasm = b.wasm;
const matMul = wasm.cwrap('BatchMatMul', null, ['number', 'array', 'number', 'number', 'array', 'number', 'number', 'number', 'number']);
const sigmoid = wasm.cwrap('Sigmoid', null, ['number', 'number']);
const shape = (d0: number, d1: number) => new Uint8Array(new Int32Array([1, d0, d1]).buffer);
const median = (v: number[]) => [...v].sort((x, y) => x - y)[v.length >> 1];

function block(size: number): { id: number; index: number } {
  const info = b.dataIdMap.get(b.makeOutput([size], 'float32').dataId);
  wasm.HEAPF32.fill(0.5, info.memoryOffset / 4, info.memoryOffset / 4 + size);
  return { id: info.id, index: info.memoryOffset / 4 };
}

function product(m: number, k: number, n: number, operatorPerCall: boolean): void {
  const [a, w, c] = [block(m * k), block(k * n), block(m * n)];
  const times: number[] = [];
  for (let r = 0; r < 40; r++) {
    const t0 = performance.now();
    let wId = w.id;
    if (operatorPerCall) {
      wId = b.dataIdNextNumber++;
      wasm.tfjs.registerTensor(wId, k * n, w.index * 4);
    }
    matMul(a.id, shape(m, k), 3, wId, shape(k, n), 3, 0, 0, c.id);
    if (operatorPerCall) wasm.tfjs.disposeData(wId);
    times.push(performance.now() - t0);
  }
  const ms = median(times);
  console.log(`${m}x${k}·${k}x${n}, operator ${operatorPerCall ? 'built per call' : 'kept'}: ` +
      `${ms.toFixed(3)} ms, ${(2 * m * k * n / ms / 1e6).toFixed(1)} GFLOP/s`);
}

for (const perCall of [true, false]) {
  for (const [m, k, n] of [[256, 256, 256], [256, 128, 256], [256, 256, 128], [2048, 256, 256], [256, 256, 8], [256, 8, 256]]) {
    product(m, k, n, perCall);
  }
}
const size = 2048 * 256;
const x = block(size);
const y = block(size);
const xnn: number[] = [];
const js: number[] = [];
for (let r = 0; r < 20; r++) {
  for (let i = 0; i < size; i++) wasm.HEAPF32[x.index + i] = Math.sin(i) * 4;   // values Math.exp cannot shortcut
  let t0 = performance.now();
  sigmoid(x.id, y.id);
  xnn.push(performance.now() - t0);
  const heap = wasm.HEAPF32;
  t0 = performance.now();
  for (let i = 0; i < size; i++) heap[y.index + i] = 1 / (1 + Math.exp(-heap[x.index + i]));
  js.push(performance.now() - t0);
}
console.log(`sigmoid of [2048, 256]: XNNPACK ${median(xnn).toFixed(3)} ms, JS Math.exp ${median(js).toFixed(3)} ms`);

const bytes = (values: number[]) => new Uint8Array(new Int32Array(values).buffer);
const transpose = wasm.cwrap('Transpose', null, ['number', 'array', 'number', 'number', 'number', 'array', 'number']);
const [rows, cols] = [256, 256];
const tSrc = block(rows * cols);
const tDst = block(rows * cols);
const jsT: number[] = [];
const wasmT: number[] = [];
for (let r = 0; r < 40; r++) {
  let t0 = performance.now();
  transposeInto(rows, cols, wasm.HEAPF32, tSrc.index, wasm.HEAPF32, tDst.index);
  jsT.push(performance.now() - t0);
  t0 = performance.now();
  transpose(tSrc.id, bytes([rows, cols]), 2, 0 /* float32 */, tDst.id, bytes([1, 0]), 2);
  wasmT.push(performance.now() - t0);
}
const perElement = (ms: number, n: number) => (ms * 1e6 / n).toFixed(2);
console.log(`transpose [${rows}, ${cols}]: moe_math ${perElement(median(jsT), rows * cols)} ns an element, ` +
    `tfjs-wasm Transpose ${perElement(median(wasmT), rows * cols)}`);
const add = wasm.cwrap('Add', null, ['number', 'array', 'number', 'number', 'array', 'number', 'number', 'number']);
const addSize = 2048 * 256;
const [sum, addend] = [block(addSize), block(addSize)];
const jsAdd: number[] = [];
const wasmAdd: number[] = [];
for (let r = 0; r < 40; r++) {
  let t0 = performance.now();
  scaleAdd(addSize, 1, wasm.HEAPF32, sum.index, wasm.HEAPF32, addend.index);
  jsAdd.push(performance.now() - t0);
  t0 = performance.now();
  add(sum.id, bytes([addSize]), 1, addend.id, bytes([addSize]), 1, 0 /* float32 */, sum.id);
  wasmAdd.push(performance.now() - t0);
}
console.log(`y += addend over [2048, 256]: JS ${perElement(median(jsAdd), addSize)} ns an element, ` +
    `tfjs-wasm Add ${perElement(median(wasmAdd), addSize)}`);
