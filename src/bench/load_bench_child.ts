/**
 * One load of the load benchmark, in a process of its own (started by load_bench.ts), so that its
 * peak RSS is the load's: argv[2] is `{dir, backend, expertDtype}` as JSON; the last line of
 * stdout is the LoadChildResult as JSON, or `{error}` (exit code 1).
 */
import * as tf from '@tensorflow/tfjs-core';
import { loadHFCheckpoint } from '../io/hf_checkpoint.js';
import type { LoadHFCheckpointOptions } from '../io/hf_checkpoint_core.js';
import { selectBenchBackend } from './backend.js';
import type { LoadChildResult } from './load_bench.js';

const { dir, backend, expertDtype } = JSON.parse(process.argv[2] ?? '{}') as { dir: string; backend: string; expertDtype: string };
try {
  const release = await selectBenchBackend(backend);
  try {
    const rssBefore = process.memoryUsage().rss;
    const began = performance.now();
    // `expertDtype` is passed through as is: 'stored' keeps 16-bit experts packed where the loader supports it
    const model = await loadHFCheckpoint(dir, { expertDtype } as LoadHFCheckpointOptions);
    const seconds = (performance.now() - began) / 1000;
    const result: LoadChildResult = {
      numBytes: tf.memory().numBytes, rssBefore, peakRss: process.resourceUsage().maxRSS * 1024, seconds,
      largestWeightBytes: Math.max(...model.weights.map(w => w.read().size * 4)),
    };
    model.dispose();
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    release();
  }
} catch (e) {
  // the parent names the load; the message is what it needs from here
  process.stdout.write(`${JSON.stringify({ error: (e as Error)?.message ?? String(e) })}\n`);
  process.exitCode = 1;
}
