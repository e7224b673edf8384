/**
 * tfjs-backend-webgpu's buffer pool, seen and bounded. Its BufferManager keeps every buffer a
 * disposed tensor had in a free list keyed by exact byte size and usage, and hands one out again
 * only for that exact key; it never destroys one (numBytesAllocatedInGPU only grows). A load that
 * writes weights straight to their buffers (src/io/device_tensor.ts) leaves nothing free, but a
 * training step frees its activations, gradients and uniform buffers into the pool: after the
 * first step the pool holds the step's peak of temporaries, and, because a free buffer serves only
 * its own size, more than that peak (buffers of one phase's sizes that another phase cannot use).
 *
 * `limitWebGPUBufferPool(maxFreeBytes)` keeps the free part under a bound: when a buffer must be
 * created (no free one of its key), free buffers are destroyed first, largest first, until the
 * free bytes fit the bound, so the most ever allocated stays within the most ever in use plus the bound. Exact-size reuse (every step after the first) is
 * unchanged; what goes is the memory held in sizes that were not asked for again. Destroying a
 * buffer the GPU still reads in submitted work is allowed by WebGPU (freed when that work ends).
 */
import * as tf from '@tensorflow/tfjs-core';
import { assertInteger, fail } from '../../ops/validate.js';

/** What is used of tfjs-backend-webgpu's BufferManager (4.22), checked before use. */
interface BufferManagerLike {
  freeBuffers: Map<string, GPUBuffer[]>;
  numFreeBuffers: number;
  numBytesUsed: number;
  numBytesAllocated: number;
  acquireBuffer(size: number, usage: number, mappedAtCreation?: boolean, reuse?: boolean): GPUBuffer;
}

/** The pool as it is now. */
export interface WebGPUBufferPoolStats {
  /** bytes of buffers in use (tf.memory().numBytesInGPU) */
  usedBytes: number;
  /** bytes of every buffer the pool holds, used or free (tf.memory().numBytesAllocatedInGPU) */
  allocatedBytes: number;
  /** bytes of free buffers, by what they are for: storage (tensors), uniform, mapRead (staging for reads), other */
  freeBytes: { storage: number; uniform: number; mapRead: number; other: number };
  /** free buffers, and the distinct (size, usage) keys among them */
  freeBuffers: number;
  freeKeys: number;
}

const OP = 'webgpuBufferPool';

function bufferManager(op: string): BufferManagerLike {
  if (tf.getBackend() !== 'webgpu') fail(op, `needs the webgpu backend but the backend is '${tf.getBackend()}'`);
  const m = (tf.backend() as unknown as { bufferManager?: Partial<BufferManagerLike> }).bufferManager;
  if (!(m?.freeBuffers instanceof Map) || typeof m.acquireBuffer !== 'function' ||
      typeof m.numBytesAllocated !== 'number' || typeof m.numBytesUsed !== 'number' || typeof m.numFreeBuffers !== 'number') {
    fail(op, "needs tfjs-backend-webgpu's BufferManager (freeBuffers, acquireBuffer, numBytesUsed, numBytesAllocated) but this backend has none");
  }
  return m as BufferManagerLike;
}

// GPUBufferUsage's bits (the global is Dawn's; the values are the spec's)
const MAP_READ = 0x0001;
const UNIFORM = 0x0040;
const STORAGE = 0x0080;

/**
 * The webgpu backend's pool: bytes used, allocated, and free by kind.
 *
 * ```js
 * const { allocatedBytes, usedBytes, freeBytes } = webgpuBufferPoolStats();
 * ```
 */
export function webgpuBufferPoolStats(): WebGPUBufferPoolStats {
  const m = bufferManager(OP);
  const freeBytes = { storage: 0, uniform: 0, mapRead: 0, other: 0 };
  let freeBuffers = 0;
  let freeKeys = 0;
  for (const buffers of m.freeBuffers.values()) {
    if (buffers.length > 0) freeKeys++;
    for (const b of buffers) {
      const kind = b.usage & STORAGE ? 'storage' : b.usage & UNIFORM ? 'uniform' : b.usage & MAP_READ ? 'mapRead' : 'other';
      freeBytes[kind] += b.size;
      freeBuffers++;
    }
  }
  return { usedBytes: m.numBytesUsed, allocatedBytes: m.numBytesAllocated, freeBytes, freeBuffers, freeKeys };
}

/** Destroys free buffers, largest first, until at most `keepBytes` of them are left; returns the bytes destroyed. */
function destroyFree(m: BufferManagerLike, keepBytes: number): number {
  const free: GPUBuffer[] = [];
  for (const buffers of m.freeBuffers.values()) free.push(...buffers);
  let freeBytes = free.reduce((n, b) => n + b.size, 0);
  if (freeBytes <= keepBytes) return 0;
  free.sort((a, b) => b.size - a.size);
  const doomed = new Set<GPUBuffer>();
  for (const b of free) {
    if (freeBytes <= keepBytes) break;
    doomed.add(b);
    freeBytes -= b.size;
  }
  let destroyed = 0;
  // the keys stay in the map, emptied: releaseBuffer returns early (losing the buffer) on an empty map
  for (const buffers of m.freeBuffers.values()) {
    const kept = buffers.filter(b => !doomed.has(b));
    for (const b of buffers) {
      if (!doomed.has(b)) continue;
      b.destroy();
      destroyed += b.size;
    }
    buffers.splice(0, buffers.length, ...kept);
  }
  m.numFreeBuffers -= doomed.size;
  m.numBytesAllocated -= destroyed;
  return destroyed;
}

/**
 * Destroys every free buffer of the webgpu backend's pool (tensors in use keep theirs); returns the
 * bytes destroyed. After it tf.memory().numBytesAllocatedInGPU equals numBytesInGPU.
 *
 * ```js
 * const bytes = releaseFreeWebGPUBuffers();   // e.g. after training, before a long generation
 * ```
 */
export function releaseFreeWebGPUBuffers(): number {
  return destroyFree(bufferManager('releaseFreeWebGPUBuffers'), 0);
}

/** What limitWebGPUBufferPool returns. */
export interface WebGPUBufferPoolLimit {
  /** the most bytes in use seen since the limit was set (or since resetPeak) */
  peakUsedBytes(): number;
  /** the most bytes allocated seen since the limit was set (or since resetPeak) */
  peakAllocatedBytes(): number;
  /** starts both peaks again from now */
  resetPeak(): void;
  /** the bytes destroyed to keep the bound so far */
  destroyedBytes(): number;
  /** puts the backend's own acquireBuffer back (the bound and the peaks stop) */
  restore(): void;
}

/**
 * Bounds the free buffers of the webgpu backend's pool to `maxFreeBytes` (Infinity: no bound, the
 * peaks only): before a buffer is created, free ones are destroyed, largest first, until the free
 * bytes are within the bound: the peak allocated stays within the peak in use + `maxFreeBytes`. Buffers of a size asked for again are
 * reused as before. Also records the peaks of bytes in use and allocated (what tf.memory() shows
 * only between steps). One limit at a time.
 *
 * ```js
 * const limit = limitWebGPUBufferPool(256 * 2 ** 20);
 * await train();
 * limit.peakUsedBytes();   // the step's high-water mark of live buffers
 * limit.restore();
 * ```
 */
export function limitWebGPUBufferPool(maxFreeBytes: number): WebGPUBufferPoolLimit {
  const op = 'limitWebGPUBufferPool';
  if (maxFreeBytes !== Infinity) assertInteger(op, 'maxFreeBytes', maxFreeBytes, 0);
  const m = bufferManager(op);
  if (Object.prototype.hasOwnProperty.call(m, 'acquireBuffer')) {
    fail(op, 'the pool is limited already: restore() the earlier limit first');
  }
  const acquire = m.acquireBuffer;
  let peakUsed = m.numBytesUsed;
  let peakAllocated = m.numBytesAllocated;
  let destroyed = 0;
  m.acquireBuffer = function (size, usage, mappedAtCreation = false, reuse = true) {
    const hit = reuse && (m.freeBuffers.get(`${size}_${usage}`)?.length ?? 0) > 0;
    if (!hit && maxFreeBytes !== Infinity) destroyed += destroyFree(m, maxFreeBytes);
    const buffer = acquire.call(m, size, usage, mappedAtCreation, reuse);
    peakUsed = Math.max(peakUsed, m.numBytesUsed);
    peakAllocated = Math.max(peakAllocated, m.numBytesAllocated);
    return buffer;
  };
  return {
    peakUsedBytes: () => peakUsed,
    peakAllocatedBytes: () => peakAllocated,
    resetPeak: () => {
      peakUsed = m.numBytesUsed;
      peakAllocated = m.numBytesAllocated;
    },
    destroyedBytes: () => destroyed,
    restore: () => {
      delete (m as Partial<BufferManagerLike>).acquireBuffer;   // the prototype's again
    },
  };
}
