/**
 * tfjs-backend-wasm's threaded SIMD build in Node, which tfjs itself never loads there
 * (WASM_HAS_MULTITHREAD_SUPPORT is false under Node, tfjs issue 3830): XNNPACK then runs every
 * product on a pool of worker_threads, in Node as in a cross-origin-isolated browser.
 *
 * The package ships what it needs (wasm-out/tfjs-backend-wasm-threaded-simd.{js,worker.js} and
 * dist/tfjs-backend-wasm-threaded-simd.wasm); what tfjs's loader does for browsers does not work
 * in Node (it hands the pthread workers Blob URLs), so this builds the module itself: the worker
 * script is written to a file in os.tmpdir() (removed by release), the main script is passed by
 * its path, and the module goes into tfjs-wasm's own BackendWasm, registered under the name
 * 'wasm', so every wasm kernel (tfjs's and this package's) runs on it unchanged.
 *
 * The package's own SIMD loops between the products (moe_simd.ts) get threads too: workers beside
 * the calling thread split their rows (moe_simd_threads_node.ts). By default as many as there are
 * cores beyond XNNPACK's threads, at most `threads` − 1: XNNPACK's workers spin for a while after
 * each product (pthreadpool's spin wait), so loop workers on the same cores would only take turns
 * with them (on a 2-core box the block was 10–30 % slower with one loop worker than with none; on
 * 16 cores, 8 threads and 7 loop workers gave 8–20 % over none: docs/benchmarks.md, run X).
 *
 * tfjs-wasm caps its pool at half the logical cores it sees (it assumes two hardware threads a
 * core) and at 8. While the module starts, the core count it reads (os.cpus()) is raised to
 * 2 × `threads` when lower, so that the pool gets the threads asked for; more threads than cores
 * only slow it down.
 *
 * Uses tfjs-backend-wasm 4.x internals (the wasm-out factory, BackendWasm, the C exports' names).
 */
import * as tf from '@tensorflow/tfjs-core';
import { rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { BackendError } from '../errors.js';
import { startMoESimdThreads } from './moe_simd_threads_node.js';

/** tfjs-wasm's pthread pool has this many workers (its build's PTHREAD_POOL_SIZE). */
export const MAX_WASM_THREADS = 8;

const WASM_PACKAGE = '@tensorflow/tfjs-backend-wasm';

/** What is used of the Emscripten module the threaded factory makes. */
interface ThreadedModule {
  cwrap(name: string, ret: string | null, types: string[]): (...args: unknown[]) => unknown;
  tfjs?: Record<string, unknown>;
}

/** What is used of tfjs-backend-wasm's exports. */
interface WasmPackage {
  BackendWasm: new (module: unknown) => tf.KernelBackend;
  setThreadsCount(n: number): void;
  getThreadsCount(): number;
}

/** useThreadedWasm's options. */
export interface ThreadedWasmOptions {
  /**
   * Worker threads for the package's loops between the products, beside the calling thread
   * (0: none). Default: the cores left beside XNNPACK's threads, at most threads − 1.
   */
  loopWorkers?: number;
}

/**
 * Makes 'wasm' the threaded SIMD build with `threads` XNNPACK threads and sets it as the backend.
 * Call it before the wasm backend has started. Returns the pool's thread count, the loop workers
 * started, and `release`, which removes the backend and ends its worker threads: until then they
 * keep Node running.
 *
 * ```js
 * const { threads, loopWorkers, release } = await useThreadedWasm(4);   // tf.getBackend() === 'wasm'
 * // ... train, bench ...
 * release();
 * ```
 */
export async function useThreadedWasm(threads: number, options: ThreadedWasmOptions = {}):
    Promise<{ threads: number; loopWorkers: number; release(): void }> {
  if (!Number.isInteger(threads) || threads < 1 || threads > MAX_WASM_THREADS) {
    throw new BackendError(`wasm threads must be an integer from 1 to ${MAX_WASM_THREADS} but got ${threads}`);
  }
  const { loopWorkers } = options;
  if (loopWorkers !== undefined && (!Number.isInteger(loopWorkers) || loopWorkers < 0 || loopWorkers > MAX_WASM_THREADS)) {
    throw new BackendError(`loopWorkers must be an integer from 0 to ${MAX_WASM_THREADS} but got ${loopWorkers}`);
  }
  if (tf.engine().registry.wasm != null) {
    throw new BackendError('the threaded wasm build must be chosen before the wasm backend starts, ' +
        'but it has started already');
  }
  const require = createRequire(import.meta.url);
  // a literal specifier: esbuild bundles it, so the bundle's BackendWasm and kernels are the ones used
  const wasmPackage = await import('@tensorflow/tfjs-backend-wasm') as unknown as WasmPackage;
  const wasmOut = path.dirname(require.resolve(`${WASM_PACKAGE}/wasm-out/tfjs-backend-wasm-threaded-simd.js`));
  const factoryExport = require(path.join(wasmOut, 'tfjs-backend-wasm-threaded-simd.js')) as
      ((config: object) => Promise<ThreadedModule>) | { default: (config: object) => Promise<ThreadedModule> };
  const factory = typeof factoryExport === 'function' ? factoryExport : factoryExport.default;
  const { wasmWorkerContents } = require(path.join(wasmOut, 'tfjs-backend-wasm-threaded-simd.worker.js')) as
      { wasmWorkerContents: string };
  // The contents are a JS string whose '\n' escapes were turned into newlines when it was embedded.
  const workerFile = path.join(os.tmpdir(), `tfjs-backend-wasm-threaded-simd-${process.pid}.worker.js`);
  writeFileSync(workerFile, wasmWorkerContents.replace(/\n/g, '\\n'));

  tf.removeBackend('wasm');
  tf.registerBackend('wasm', async () => {
    const cpus = os.cpus;
    const seen = cpus();
    if (seen.length < 2 * threads) os.cpus = () => Array.from({ length: 2 * threads }, (_, i) => seen[i % seen.length]);
    let module: ThreadedModule;
    try {
      module = await factory({
        locateFile: (file: string, prefix: string) =>
          file.endsWith('.worker.js') ? workerFile
            : file.endsWith('.wasm') ? path.join(wasmOut, '..', 'dist', 'tfjs-backend-wasm-threaded-simd.wasm')
            : prefix + file,
        mainScriptUrlOrBlob: path.join(wasmOut, 'tfjs-backend-wasm-threaded-simd.js'),
      });
    } finally {
      os.cpus = cpus;
    }
    // what tfjs-wasm's own init() adds (backend_wasm.js)
    module.tfjs = {
      init: module.cwrap('init', null, []),
      initWithThreadsCount: module.cwrap('init_with_threads_count', null, ['number']),
      getThreadsCount: module.cwrap('get_threads_count', 'number', []),
      registerTensor: module.cwrap('register_tensor', null, ['number', 'number', 'number']),
      disposeData: module.cwrap('dispose_data', null, ['number']),
      dispose: module.cwrap('dispose', null, []),
    };
    wasmPackage.setThreadsCount(threads);
    return new wasmPackage.BackendWasm(module);
  }, 2);
  if (!(await tf.setBackend('wasm'))) throw new BackendError('the threaded wasm build failed to initialize');
  await tf.ready();
  const count = wasmPackage.getThreadsCount();
  const workers = loopWorkers ?? Math.max(0, Math.min(count - 1, os.cpus().length - count));
  // loop workers are a speed-up: where they cannot start (a heap the module cannot share), the loops stay here
  const loops = workers > 0
    ? await startMoESimdThreads((tf.backend() as unknown as { wasm: object }).wasm, workers).catch(() => null) : null;
  return {
    threads: count,
    loopWorkers: loops === null ? 0 : workers,
    release: () => {
      void loops?.stop();
      // BackendWasm.dispose (through removeBackend) ends the pool's threads (PThread.terminateAllThreads)
      tf.removeBackend('wasm');
      rmSync(workerFile, { force: true });
    },
  };
}
