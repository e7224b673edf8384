/**
 * GPUBindGroup objects reused across dispatches that bind the same buffers (issue 15: the host
 * records an OLMoE training step, ~2700 dispatches, about as long as the GPU runs it).
 * tfjs-backend-webgpu's recordAndSubmit (4.22) creates a bind group for every dispatch; through
 * npm `webgpu` that native call costs ~16–19 µs on this sandbox's Mesa device (its descriptor is
 * converted field by field), where building this cache's key and finding it costs ~1 µs. A
 * training step dispatches the same programs on the same pooled buffers at the same offsets step
 * after step (tfjs's buffer pool hands out released buffers in order, the uniform arena its chunks
 * likewise), so from the second step on most groups are found.
 *
 * The key is the layout and, per entry, the binding, the buffer's identity, offset and size: a bind
 * group made from the same descriptor again binds exactly the same. Buffers are told apart by object
 * identity, never by a value that a new buffer could share: a destroyed buffer's groups are never
 * found again and age out. At most MAX_GROUPS are kept, least recently used first out. Descriptors
 * with anything but buffer bindings (textures, samplers: tfjs's pixel programs) are created as before.
 *
 * The tf.env() flag WEBGPU_MOE_BIND_GROUP_CACHE (default true) is read per call: false creates every
 * group, as tfjs does (the comparison in one checkout).
 */
import * as tf from '@tensorflow/tfjs-core';

export const BIND_GROUP_CACHE_FLAG = 'WEBGPU_MOE_BIND_GROUP_CACHE';
tf.env().registerFlag(BIND_GROUP_CACHE_FLAG, () => true);

/** Groups kept: a few steps' distinct dispatches of a large model (OLMoE: ~2700 a step). */
const MAX_GROUPS = 16384;

/** What is used of tfjs-backend-webgpu's WebGPUBackend. */
interface BackendInternals { device: GPUDevice }

/** Counts of a device's cache, for tests and benchmarks. */
export interface BindGroupCacheStats { hits: number; misses: number; uncached: number; size: number }

interface Cache {
  groups: Map<string, GPUBindGroup>;
  ids: WeakMap<object, number>;
  nextId: number;
  stats: BindGroupCacheStats;
}

const caches = new WeakMap<GPUDevice, Cache>();

function idOf(cache: Cache, object: object): number {
  let id = cache.ids.get(object);
  if (id === undefined) {
    id = cache.nextId++;
    cache.ids.set(object, id);
  }
  return id;
}

/** The descriptor's key, or undefined when an entry binds something other than a buffer range. */
function keyOf(cache: Cache, descriptor: GPUBindGroupDescriptor): string | undefined {
  let key = String(idOf(cache, descriptor.layout));
  for (const entry of descriptor.entries) {
    const resource = entry.resource as Partial<GPUBufferBinding>;
    if (resource == null || typeof resource !== 'object' || resource.buffer == null) return undefined;
    key += `|${entry.binding}:${idOf(cache, resource.buffer)}:${resource.offset ?? 0}:${resource.size ?? -1}`;
  }
  return key;
}

/**
 * Makes `backend`'s device (a WebGPUBackend's) answer createBindGroup from a cache from now on.
 * Idempotent; returns whether the device took the wrapper.
 *
 * ```js
 * await tf.setBackend('webgpu');
 * installBindGroupCache(tf.backend());
 * ```
 */
export function installBindGroupCache(backend: unknown): boolean {
  const device = (backend as Partial<BackendInternals> | null)?.device;
  if (device == null || typeof device.createBindGroup !== 'function') return false;
  if (caches.has(device)) return true;
  const create = device.createBindGroup.bind(device);
  const cache: Cache = { groups: new Map(), ids: new WeakMap(), nextId: 0, stats: { hits: 0, misses: 0, uncached: 0, size: 0 } };
  const cached = (descriptor: GPUBindGroupDescriptor): GPUBindGroup => {
    const key = tf.env().getBool(BIND_GROUP_CACHE_FLAG) ? keyOf(cache, descriptor) : undefined;
    if (key === undefined) {
      cache.stats.uncached++;
      return create(descriptor);
    }
    let group = cache.groups.get(key);
    if (group !== undefined) {
      cache.stats.hits++;
      // most recently used last: Map keeps insertion order
      cache.groups.delete(key);
      cache.groups.set(key, group);
      return group;
    }
    cache.stats.misses++;
    group = create(descriptor);
    cache.groups.set(key, group);
    if (cache.groups.size > MAX_GROUPS) cache.groups.delete(cache.groups.keys().next().value!);
    cache.stats.size = cache.groups.size;
    return group;
  };
  try {
    device.createBindGroup = cached;
  } catch {
    return false;
  }
  if (device.createBindGroup !== cached) return false;
  caches.set(device, cache);
  return true;
}

/** The counts of `backend`'s device's cache since it was installed, or undefined where none is. */
export function bindGroupCacheStats(backend: unknown): BindGroupCacheStats | undefined {
  const device = (backend as Partial<BackendInternals> | null)?.device;
  const stats = device == null ? undefined : caches.get(device)?.stats;
  return stats && { ...stats };
}
