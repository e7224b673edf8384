/**
 * Threads for moe_simd's row loops on tfjs-wasm's threaded build in Node (threads_node.ts): worker_threads,
 * each with an instance of the module on the build's shared heap, woken per call through
 * Atomics on a small shared control block. The calling thread runs the first part itself and
 * waits for the others; every worker answers every call (an idle one with nothing to run), so no
 * worker can lag a call behind and read the next call's arguments as its own.
 *
 * Control block (Int32Array): [generation, done, failed]. Per worker a slot of float64s:
 * [export index (−1 nothing, −2 stop), argument count, arguments …].
 */
import { Worker } from 'node:worker_threads';
import { BackendError } from '../errors.js';
import { ROW_SPLIT_EXPORTS, attachMoESimdThreads, moeSimdSettled, moeSimdSharedModule, type MoESimdThreads,
  type RowSplitExport } from './moe_simd.js';

const SLOT_FLOATS = 16;
const [GENERATION, DONE, FAILED] = [0, 1, 2];
const [NOTHING, STOP] = [-1, -2];
/**
 * Loads of the control block before a thread sleeps in Atomics.wait: the row loops come in bursts,
 * and a sleeping thread takes tens of µs to wake. The workers run on cores of their own
 * (useThreadedWasm's default), so their spinning takes nothing from XNNPACK's.
 */
const SPINS = 20000;

/** The workers' script (eval'd, so it travels in any bundle). */
const WORKER_SOURCE = `
const { parentPort, workerData } = require('node:worker_threads');
const { module, memory, control, slots, index, names, workers, spins } = workerData;
const exports = new WebAssembly.Instance(module, { env: { memory } }).exports;
const ctrl = new Int32Array(control);
const slot = new Float64Array(slots, index * ${SLOT_FLOATS} * 8, ${SLOT_FLOATS});
parentPort.postMessage('ready');
let seen = 0;
for (;;) {
  for (let i = 0; i < spins && Atomics.load(ctrl, ${GENERATION}) === seen; i++);
  Atomics.wait(ctrl, ${GENERATION}, seen);
  seen = Atomics.load(ctrl, ${GENERATION});
  const fn = slot[0];
  if (fn === ${STOP}) break;
  if (fn >= 0) {
    try { exports[names[fn]](...slot.subarray(2, 2 + slot[1])); } catch { Atomics.store(ctrl, ${FAILED}, 1); }
  }
  if (Atomics.add(ctrl, ${DONE}, 1) === workers - 1) Atomics.notify(ctrl, ${DONE});
}
`;

/** moe_simd's threads on a heap, and how to end them. */
export interface MoESimdThreadPool extends MoESimdThreads {
  /** Detaches the threads from the heap and ends them. */
  stop(): Promise<void>;
}

/**
 * Starts `workers` threads with moe_simd on the shared heap of tfjs-wasm module `wasm` and
 * attaches them (moeSimd then splits its row loops over workers + 1 parts). Null where the module
 * is not loaded on a shared heap (then the loops stay on the calling thread).
 */
export async function startMoESimdThreads(wasm: object, workers: number): Promise<MoESimdThreadPool | null> {
  if (!Number.isInteger(workers) || workers < 1) {
    throw new BackendError(`moe_simd's worker count must be a positive integer but got ${workers}`);
  }
  if (!(await moeSimdSettled(wasm))) return null;
  const shared = moeSimdSharedModule(wasm);
  if (shared === null) return null;
  const control = new SharedArrayBuffer(4 * 4);
  const slots = new SharedArrayBuffer(workers * SLOT_FLOATS * 8);
  const ctrl = new Int32Array(control);
  const slotOf = (w: number) => new Float64Array(slots, w * SLOT_FLOATS * 8, SLOT_FLOATS);
  const names = [...ROW_SPLIT_EXPORTS];
  const threads = Array.from({ length: workers }, (_, index) => new Worker(WORKER_SOURCE, {
    eval: true, workerData: { ...shared, control, slots, index, names, workers, spins: SPINS },
  }));
  try {
    await Promise.all(threads.map(t => new Promise<void>((resolve, reject) => {
      t.once('message', () => resolve());
      t.once('error', reject);
    })));
  } catch (e) {
    await Promise.all(threads.map(t => t.terminate()));
    throw new BackendError(`moe_simd's worker threads did not start: ${(e as Error)?.message ?? String(e)}`);
  }
  for (const t of threads) t.unref();   // a pool not stopped does not keep Node running

  const pool: MoESimdThreadPool = {
    parts: workers + 1,
    run(name: RowSplitExport, parts: readonly number[][], own: (...args: number[]) => void): void {
      const fn = names.indexOf(name);
      for (let w = 0; w < workers; w++) {
        const slot = slotOf(w);
        const args = parts[w + 1];
        if (args === undefined) {
          slot[0] = NOTHING;
        } else {
          slot[0] = fn;
          slot[1] = args.length;
          slot.set(args, 2);
        }
      }
      Atomics.store(ctrl, DONE, 0);
      Atomics.add(ctrl, GENERATION, 1);
      Atomics.notify(ctrl, GENERATION);
      let failed = 0;
      try {
        own(...parts[0]);
      } finally {
        // the workers write the heap until they answer: wait for them whatever this thread's part did
        for (let i = 0, done; (done = Atomics.load(ctrl, DONE)) < workers; i++) {
          if (i > SPINS) Atomics.wait(ctrl, DONE, done);
        }
        failed = Atomics.exchange(ctrl, FAILED, 0);
      }
      if (failed !== 0) {
        throw new BackendError(`moe_simd's ${name} failed on a worker thread (arguments ${JSON.stringify(parts.slice(1))})`);
      }
    },
    async stop(): Promise<void> {
      attachMoESimdThreads(wasm, null);
      for (let w = 0; w < workers; w++) slotOf(w)[0] = STOP;
      Atomics.add(ctrl, GENERATION, 1);
      Atomics.notify(ctrl, GENERATION);
      await Promise.all(threads.map(t => t.terminate()));
    },
  };
  attachMoESimdThreads(wasm, pool);
  return pool;
}
