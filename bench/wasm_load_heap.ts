/**
 * The wasm heap while loadHFCheckpoint loads an OLMoE-shaped checkpoint on the wasm backend
 * (the browser run's loader, in Node): how far the heap grows past the tensors it holds.
 *
 *   npx tsx bench/wasm_load_heap.ts [layers=2] [expertDtype=int4] [narrow]
 *
 * Writes OLMoE-1B-7B's config cut to `layers` decoder layers (2: 1.05 B parameters, 2.09 GB of
 * bf16, one model.safetensors; `narrow`: narrowOlmoeConfig's widths, 275 MB at 4 layers) into a
 * folder in os.tmpdir() with writeRandomBF16Checkpoint, loads it with `expertDtype`, and removes
 * the folder. Every _malloc of the wasm module is traced: a line is printed whenever the heap
 * (the module's HEAPU8.buffer.byteLength, which only grows) grows, with the allocation that grew
 * it and the live tensor bytes (tf.memory().numBytes) at that moment. Ends with one JSON line:
 * heap MB at the end of the load (= its peak: an emscripten heap never shrinks), tensors MB after
 * the load, the largest single allocation and the estimate (estimateLoadMemory).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-wasm';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { registerMoEKernels } from '../src/backends/register_all_kernels.js';
import { narrowOlmoeConfig, olmoeConfig, writeRandomBF16Checkpoint } from '../src/bench/load_bench.js';
import { loadHFCheckpoint } from '../src/io/hf_checkpoint.js';
import type { ExpertDtype } from '../src/io/hf_block.js';
import { estimateLoadMemory } from '../src/models/memory.js';

interface WasmModule {
  HEAPU8: Uint8Array;
  _malloc(bytes: number): number;
  _free(at: number): void;
}

const layers = Number(process.argv[2] ?? 2);
const expertDtype = (process.argv[3] ?? 'int4') as ExpertDtype;
const narrow = process.argv.includes('narrow');
const MB = 1e6;

await tf.setBackend('wasm');
registerMoEKernels();
const wasm = (tf.backend() as unknown as { wasm: WasmModule }).wasm;
const heapBytes = () => wasm.HEAPU8.buffer.byteLength;

const config = narrow ? narrowOlmoeConfig(layers) : olmoeConfig(layers);
const dir = await mkdtemp(join(tmpdir(), 'moe-lora-wasm-heap-'));
try {
  const t0 = Date.now();
  const written = await writeRandomBF16Checkpoint(dir, config, { seed: 1 });
  console.log(`wrote ${(written.totalBytes / MB).toFixed(0)} MB of bf16 in ${((Date.now() - t0) / 1000).toFixed(1)} s`);

  const heapBefore = heapBytes();
  let largestMalloc = 0;
  let mallocs = 0;
  // emscripten's first call of an export replaces Module._malloc with the real one: call it once before wrapping
  wasm._free(wasm._malloc(8));
  const originalMalloc = wasm._malloc;
  wasm._malloc = (bytes: number) => {
    const before = heapBytes();
    const at = originalMalloc(bytes);
    mallocs++;
    largestMalloc = Math.max(largestMalloc, bytes);
    const after = heapBytes();
    if (after !== before) {
      console.log(`heap ${(before / MB).toFixed(0)} → ${(after / MB).toFixed(0)} MB on a malloc of ${(bytes / MB).toFixed(1)} MB ` +
          `at ${((at >>> 0) / MB).toFixed(0)} MB; tensors ${(tf.memory().numBytes / MB).toFixed(0)} MB`);
    }
    return at;
  };
  const started = Date.now();
  const model = await loadHFCheckpoint(dir, { expertDtype });
  const loadSeconds = (Date.now() - started) / 1000;
  wasm._malloc = originalMalloc;
  const estimate = estimateLoadMemory(config, { expertStorage: expertDtype === 'stored' ? 'bf16' : expertDtype as 'int4' });
  console.log(JSON.stringify({
    layers, narrow, expertDtype, loadSeconds,
    heapBeforeMB: +(heapBefore / MB).toFixed(1), heapAfterLoadMB: +(heapBytes() / MB).toFixed(1),
    tensorsMB: +(tf.memory().numBytes / MB).toFixed(1), largestMallocMB: +(largestMalloc / MB).toFixed(1), mallocs,
    estimateMB: +(estimate.bytes / MB).toFixed(1), estimatePeakMB: +(estimate.peakBytes / MB).toFixed(1),
  }));
  model.dispose();
} finally {
  await rm(dir, { recursive: true, force: true });
}
