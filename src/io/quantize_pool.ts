/**
 * Quantizing experts on load on several cores (Node): a pool of worker_threads
 * (quantize_worker.ts), each quantizing one expert at a time from its 16-bit halves. The loader
 * reads expert tensors in order on the main thread and keeps at most `threads + 1` experts in
 * flight, so the host holds that many experts' halves and words, not more. Browsers load without
 * it (one thread: src/io/hf_block.ts). The words are bit for bit the main thread's (the same
 * functions); a value the quantizer refuses is re-quantized on the main thread, which throws the
 * loader's own error.
 */
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import { quantizeExpertInto, type QuantizedLayout } from '../ops/quantized.js';
import { decodeBFloat16Into, decodeFloat16Into } from '../util/half.js';
import type { QuantizeReply, QuantizeRequest } from './quantize_worker.js';

/** What the loader asks of a pool (src/io/hf_block.ts: `LoadMoEBlockOptions.quantizer`). */
export interface ExpertQuantizer {
  /** experts quantized at once; the loader keeps threads + 1 in flight */
  readonly threads: number;
  /**
   * One expert's words in `layout` from its parts' halves (gate rows, then up rows, …); the
   * halves are copied, so the caller may reuse them. Rejects with the main thread's error
   * (naming `op` and `arg`) when a value cannot be quantized.
   */
  quantize(layout: QuantizedLayout, parts: Array<{ dtype: string; halves: Uint16Array }>, op: string, arg: string): Promise<Int32Array>;
  /** experts quantized so far on the workers, and on this thread (a refused value, a failed worker) */
  readonly counts: { onWorkers: number; onThisThread: number };
  /** Ends the workers. */
  close(): Promise<void>;
}

/** Workers by default: one a core but the main thread's (it reads the files), at most 8. */
export function defaultQuantizeThreads(): number {
  return Math.max(1, Math.min(8, availableParallelism() - 1));
}

/**
 * A pool of `threads` workers, started at the first `quantize` (a load that quantizes nothing
 * starts none). Close it when the load ends.
 *
 * ```js
 * const pool = quantizeWorkerPool();
 * try { await loadMoEBlockWeights(file, config, 0, {expertDtype: 'nf4', quantizer: pool}); } finally { await pool.close(); }
 * ```
 */
export function quantizeWorkerPool(
    threads = defaultQuantizeThreads(),
    // the worker's file beside this one: .ts under tsx (specs, tools), .js once built
    workerUrl = new URL(`./quantize_worker${import.meta.url.endsWith('.ts') ? '.ts' : '.js'}`, import.meta.url)): ExpertQuantizer {
  const workers: Worker[] = [];
  const idle: Worker[] = [];
  const waiting: Array<(w: Worker | null) => void> = [];
  const replies = new Map<number, (reply: QuantizeReply) => void>();
  let nextId = 0;
  let broken = false;
  const counts = { onWorkers: 0, onThisThread: 0 };

  const start = () => {
    for (let i = 0; i < threads; i++) {
      const w = startWorker(workerUrl);
      w.on('message', (reply: QuantizeReply) => {
        w.unref();
        replies.get(reply.id)?.(reply);
        replies.delete(reply.id);
        release(w);
      });
      w.on('error', () => {
        // a worker that dies (out of memory, failed to start): the rest of the load runs on the
        // main thread, what was in flight included
        broken = true;
        for (const [id, resolve] of replies) resolve({ id, failed: true });
        replies.clear();
        for (const resolve of waiting.splice(0)) resolve(null);
      });
      w.unref();   // an idle worker of an unclosed pool must not keep Node running (a busy one must: ref'd while it works)
      workers.push(w);
      idle.push(w);
    }
  };
  const release = (w: Worker) => {
    const next = waiting.shift();
    if (next) next(w);
    else idle.push(w);
  };
  const acquire = () => new Promise<Worker | null>(resolve => {
    if (broken) return resolve(null);
    if (workers.length === 0) start();
    const w = idle.pop();
    if (w) resolve(w);
    else waiting.push(resolve);
  });

  const here = (layout: QuantizedLayout, parts: Array<{ dtype: string; halves: Uint16Array }>, op: string, arg: string) => {
    counts.onThisThread++;
    return quantizeHere(layout, parts, op, arg);
  };
  return {
    threads,
    counts,
    async quantize(layout, parts, op, arg) {
      const worker = await acquire();
      if (worker === null) return here(layout, parts, op, arg);
      // one owned copy of the halves, moved to the worker (the caller's may be views of a larger buffer)
      const halves = new Uint16Array(parts.reduce((n, p) => n + p.halves.length, 0));
      let at = 0;
      for (const p of parts) {
        halves.set(p.halves, at);
        at += p.halves.length;
      }
      const id = nextId++;
      const reply = await new Promise<QuantizeReply>(resolve => {
        replies.set(id, resolve);
        const request: QuantizeRequest = { id, layout, parts: parts.map(p => ({ dtype: p.dtype, count: p.halves.length })), halves };
        worker.ref();
        worker.postMessage(request, [halves.buffer]);
      });
      if (!('words' in reply)) return here(layout, parts, op, arg);
      counts.onWorkers++;
      return reply.words;
    },
    async close() {
      await Promise.all(workers.map(w => w.terminate()));
      workers.length = 0;
      idle.length = 0;
    },
  };
}

/** A worker running `url`; a .ts file (under tsx: specs, tools) first registers tsx's loader, which workers do not inherit. */
function startWorker(url: URL): Worker {
  if (!url.pathname.endsWith('.ts')) return new Worker(url);
  // tsx's ESM entry: its CommonJS one (what require resolves to) imports a path that does not exist from a worker
  const tsx = pathToFileURL(createRequire(import.meta.url).resolve('tsx/esm/api').replace(/\.cjs$/, '.mjs')).href;
  return new Worker(`import(${JSON.stringify(tsx)}).then(m => { m.register(); return import(${JSON.stringify(url.href)}); })`, { eval: true });
}

/** The expert quantized on this thread: what a refused value or a failed worker falls back to. */
function quantizeHere(layout: QuantizedLayout, parts: Array<{ dtype: string; halves: Uint16Array }>, op: string, arg: string): Int32Array {
  const block = new Float32Array(parts.reduce((n, p) => n + p.halves.length, 0));
  let at = 0;
  for (const { dtype, halves } of parts) {
    if (dtype === 'BF16') decodeBFloat16Into(halves, block, at);
    else decodeFloat16Into(halves, block, at);
    at += halves.length;
  }
  const words = new Int32Array(layout.wordsPerExpert);
  quantizeExpertInto(layout, block, 0, words, 0, op, arg);
  return words;
}
