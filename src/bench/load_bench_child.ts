/**
 * One load of the load benchmark, in a process of its own (started by load_bench.ts), so that its
 * peak RSS is the load's: argv[2] is `{dir, backend, expertDtype, denseDtype}` as JSON; the last line of
 * stdout is the LoadChildResult as JSON, or `{error}` (exit code 1).
 *
 * Besides the peak RSS, the child samples every millisecond of the load the RSS minus the bytes of
 * the device buffers the backend has allocated (tf.memory().numBytesAllocatedInGPU, webgpu only):
 * on Mesa's software GPU the device's memory is the process's own, so RSS alone cannot tell a
 * weight on the device from one left on the host. The loader awaits a file read per tensor, so
 * the sampler runs between tensors.
 */
import * as tf from '@tensorflow/tfjs-core';
import { readFileSync } from 'node:fs';
import { loadHFCheckpoint } from '../io/hf_checkpoint.js';
import type { LoadHFCheckpointOptions } from '../io/hf_checkpoint_core.js';
import { hostValueBytes } from '../io/device_tensor.js';
import { selectBenchBackend } from './backend.js';
import type { LoadChildResult } from './load_bench.js';

/**
 * This process's peak resident bytes since it started. On Linux getrusage's maxRSS
 * (process.resourceUsage) is not it: execve folds the forked copy of the parent's address space
 * into it, so a child of a large parent (the spec runner, ~0.8 GB after the webgpu specs) reports
 * the parent's RSS. VmHWM in /proc/self/status is the high-water mark of this program's own
 * memory; maxRSS where there is no /proc.
 */
function peakRssBytes(): number {
  try {
    const kB = /^VmHWM:\s*(\d+)\s*kB/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1];
    if (kB !== undefined) return Number(kB) * 1024;
  } catch {
    // no /proc (macOS, Windows)
  }
  return process.resourceUsage().maxRSS * 1024;
}

const { dir, backend, expertDtype, denseDtype } = JSON.parse(process.argv[2] ?? '{}') as
    { dir: string; backend: string; expertDtype: string; denseDtype?: string };
try {
  const release = await selectBenchBackend(backend);
  try {
    const rssBefore = process.memoryUsage().rss;
    const hostBytes = () => process.memoryUsage().rss - ((tf.memory() as { numBytesAllocatedInGPU?: number }).numBytesAllocatedInGPU ?? 0);
    const hostBefore = hostBytes();
    let peakHost = hostBefore;
    const sampler = setInterval(() => { peakHost = Math.max(peakHost, hostBytes()); }, 1);
    const began = performance.now();
    let model;
    try {
      // `expertDtype` is passed through as is: 'stored' keeps 16-bit experts packed where the loader supports it
      model = await loadHFCheckpoint(dir, { expertDtype, denseDtype } as LoadHFCheckpointOptions);
    } finally {
      clearInterval(sampler);
    }
    const seconds = (performance.now() - began) / 1000;
    peakHost = Math.max(peakHost, hostBytes());
    const weights = model.weights.map(w => w.read());
    const result: LoadChildResult = {
      numBytes: tf.memory().numBytes, rssBefore, peakRss: peakRssBytes(), seconds,
      largestWeightBytes: Math.max(...weights.map(w => w.size * 4)),
      peakHostBytes: peakHost - hostBefore,
      hostValueBytesAfter: weights.reduce((sum, w) => sum + (hostValueBytes(w) ?? 0), 0),
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
