/**
 * One GPUBindGroup per distinct binding, made once and used again (issue 15: the host records an
 * OLMoE training step about as long as the GPU runs it, ~2500 dispatches a step). tfjs-backend-webgpu's
 * recordAndSubmit (4.22) calls device.createBindGroup on every dispatch, a native call that
 * validates the entries and allocates a descriptor set. A training step binds the same pipelines to
 * the same buffers in the same order every step, provided the buffers it gets from the pool are the
 * same. tfjs's BufferManager hands out the last buffer released of a size, so which one a tensor
 * gets depends on the order earlier tensors were freed, and it drifts from step to step. Here:
 *  - the pool's free lists of each (size, usage) are kept in the order their buffers were first seen
 *    (about their creation order), the oldest handed out first: what a tensor gets depends only on
 *    which buffers are free, and a step that frees and takes the same set in the same order gets the same buffers (on Mesa, after 3 warm-up steps, none
 *    of 5260 calls over 10 steps made a bind group: host_layer_ms.ts --native-timing on);
 *  - device.createBindGroup answers from a cache keyed by the layout and each entry's buffer, offset
 *    and size, where every entry binds a buffer; it keeps what was used within the last
 *    BIND_GROUP_CACHE_SIZE bind groups made or found again, and drops the rest.
 * What a bind group binds is fixed at creation and a cached one is the one that the same descriptor
 * would make again; a buffer destroyed later (the pool bound, buffer_pool.ts) is never bound again,
 * so its bind groups are never asked for again and go within two generations of the cache.
 *
 * On Mesa the host's CPU ms per decoder layer fell by about half forward and a quarter backward
 * (host_layer_ms.ts --bind-group-cache on|off, docs/benchmarks.md).
 *
 * The tf.env() flag WEBGPU_MOE_BIND_GROUP_CACHE (default true) is read per call: false creates each
 * bind group as tfjs does and releases buffers in tfjs's order (the comparison in one checkout).
 */
import * as tf from '@tensorflow/tfjs-core';

export const BIND_GROUP_CACHE_FLAG = 'WEBGPU_MOE_BIND_GROUP_CACHE';
tf.env().registerFlag(BIND_GROUP_CACHE_FLAG, () => true);

/**
 * Bind groups a generation of the cache holds (it holds two): at least a training step's distinct
 * ones, so that a step's working set stays whole (OLMoE: ~2500 a step; Qwen3-30B-A3B's 48 layers
 * about three times that).
 */
export const BIND_GROUP_CACHE_SIZE = 16384;

/** What is used of tfjs-backend-webgpu's WebGPUBackend and BufferManager (4.22). */
interface BufferManagerInternals {
  freeBuffers: Map<string, GPUBuffer[]>;
  releaseBuffer(buffer: GPUBuffer, reuse?: boolean): void;
}
interface BackendInternals { device: GPUDevice; bufferManager: BufferManagerInternals }

/** A number per object, in the order first seen (buffers: about their creation order), and its text for keys. */
class ObjectIds {
  private readonly ids = new WeakMap<object, { n: number; text: string }>();
  private next = 1;
  private get(o: object): { n: number; text: string } {
    let id = this.ids.get(o);
    if (id === undefined) {
      id = { n: this.next, text: String(this.next) };
      this.next++;
      this.ids.set(o, id);
    }
    return id;
  }
  of(o: object): number {
    return this.get(o).n;
  }
  textOf(o: object): string {
    return this.get(o).text;
  }
}

/**
 * The cache key of a descriptor whose every entry binds a buffer: the layout's id, then each
 * entry's buffer id (its binding where it is not its index) and, where given, offset and size
 * (tfjs's tensors bind whole buffers); undefined for any other entry (textures, samplers).
 */
function descriptorKey(descriptor: GPUBindGroupDescriptor, ids: ObjectIds): string | undefined {
  let key = ids.textOf(descriptor.layout);
  let index = 0;
  for (const entry of descriptor.entries) {
    const resource = entry.resource as Partial<GPUBufferBinding>;
    if (resource.buffer == null) return undefined;
    key += entry.binding === index++ ? ',' : `,@${entry.binding}=`;
    key += ids.textOf(resource.buffer);
    if (resource.offset !== undefined || resource.size !== undefined) key += `:${resource.offset ?? 0}:${resource.size ?? ''}`;
  }
  return key;
}

/**
 * Bind groups by key in two generations of at most `generationSize` each: a new one goes into the
 * current generation, and one found in the previous moves to the current. When the current is full
 * it becomes the previous and the previous is dropped, so what was used within the last
 * `generationSize` insertions stays, and what was not is dropped (buffers the pool destroyed, a
 * phase that ended), with one Map lookup per hit in the current generation and no cliff where a
 * step finds the cache empty.
 */
class BindGroupCache {
  private current = new Map<string, GPUBindGroup>();
  private previous = new Map<string, GPUBindGroup>();
  /** bind groups made (not found) and found since the cache was installed */
  made = 0;
  found = 0;
  constructor(private readonly generationSize: number) {}

  get(key: string): GPUBindGroup | undefined {
    let group = this.current.get(key);
    if (group === undefined) {
      group = this.previous.get(key);
      if (group === undefined) return undefined;
      this.previous.delete(key);
      this.add(key, group);
    }
    this.found++;
    return group;
  }

  set(key: string, group: GPUBindGroup): void {
    this.made++;
    this.add(key, group);
  }

  private add(key: string, group: GPUBindGroup): void {
    if (this.current.size >= this.generationSize) {
      this.previous = this.current;
      this.current = new Map();
    }
    this.current.set(key, group);
  }

  get size(): number {
    return this.current.size + this.previous.size;
  }

  clear(): void {
    this.current.clear();
    this.previous.clear();
  }
}

const installed = new WeakMap<object, BindGroupCache>();

/**
 * Puts the bind group cache on `backend` (a WebGPUBackend): its device's createBindGroup and its
 * pool's releaseBuffer are wrapped on the instances. Idempotent; returns whether it is on (a
 * backend without those methods, another tfjs-webgpu, is left as it is).
 *
 * ```js
 * await tf.setBackend('webgpu');
 * installBindGroupCache(tf.backend());
 * ```
 */
export function installBindGroupCache(backend: unknown): boolean {
  const b = backend as Partial<BackendInternals> | null;
  if (b == null) return false;
  if (installed.has(b)) return true;
  const device = b.device;
  const pool = b.bufferManager;
  if (device == null || typeof device.createBindGroup !== 'function' || pool == null ||
      !(pool.freeBuffers instanceof Map) || typeof pool.releaseBuffer !== 'function') {
    return false;
  }
  const ids = new ObjectIds();
  const cache = new BindGroupCache(BIND_GROUP_CACHE_SIZE);
  installed.set(b, cache);

  const release = pool.releaseBuffer;
  pool.releaseBuffer = function (this: BufferManagerInternals, buffer: GPUBuffer, reuse = true) {
    release.call(this, buffer, reuse);
    if (!tf.env().getBool(BIND_GROUP_CACHE_FLAG)) return;
    // tfjs pushed it last and pops the last: each free list is kept in descending id order, so the oldest goes first
    const free = this.freeBuffers.get(`${buffer.size}_${buffer.usage}`);
    if (free === undefined || free[free.length - 1] !== buffer) return;
    const id = ids.of(buffer);
    let at = free.length - 1;
    for (; at > 0 && ids.of(free[at - 1]) < id; at--) free[at] = free[at - 1];
    free[at] = buffer;
  };

  const create = device.createBindGroup.bind(device);
  device.createBindGroup = (descriptor: GPUBindGroupDescriptor) => {
    const key = tf.env().getBool(BIND_GROUP_CACHE_FLAG) ? descriptorKey(descriptor, ids) : undefined;
    if (key === undefined) return create(descriptor);
    let group = cache.get(key);
    if (group === undefined) {
      group = create(descriptor);
      cache.set(key, group);
    }
    return group;
  };
  return true;
}

/** Drops every bind group cached for `backend` (they hold their buffers' wrappers until then). */
export function emptyBindGroupCache(backend: unknown): void {
  installed.get(backend as object)?.clear();
}

/** Bind groups held for `backend` now, and made and found since the cache was installed (zeros where it is not). */
export function bindGroupCacheCounts(backend: unknown): { cached: number; made: number; found: number } {
  const cache = installed.get(backend as object);
  return cache === undefined ? { cached: 0, made: 0, found: 0 } : { cached: cache.size, made: cache.made, found: cache.found };
}
