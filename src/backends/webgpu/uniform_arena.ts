/**
 * Every program's uniforms from a few long-lived buffers, written once per submit (issue 15: the
 * host records a training step about as long as the GPU runs it). tfjs-backend-webgpu's
 * makeUniforms (4.22) gives each dispatch a buffer from its pool and a queue.writeBuffer of its
 * own, both returned at the next submit: a pool lookup, an ArrayBuffer, typed-array views and a
 * native call per dispatch, 13 % of the recording host time of a LoRA step on Mesa
 * (bench/e2e/host_layer_ms.ts --cpu-profile). Here the same bytes, laid out by the same rules, go
 * into a host copy of a 64 KiB chunk at the device's uniform offset alignment, and the dispatch binds
 * its range of the chunk; a chunk is written to the GPU when it is full or when tfjs submits
 * (its submitQueue, the one place it calls queue.submit, which is wrapped). A writeBuffer is ordered before the submit that
 * follows it on the queue, so a chunk is reused after that submit, as tfjs reuses its uniform
 * buffers. What the shaders read is unchanged, byte for byte.
 *
 * The tf.env() flag WEBGPU_MOE_UNIFORM_ARENA (default true) is read per dispatch: false goes back
 * to tfjs's own makeUniforms (the comparison in host_layer_ms.ts --arena).
 */
import * as tf from '@tensorflow/tfjs-core';

export const UNIFORM_ARENA_FLAG = 'WEBGPU_MOE_UNIFORM_ARENA';
tf.env().registerFlag(UNIFORM_ARENA_FLAG, () => true);

/** One of tfjs-webgpu's program uniforms. */
interface UniformEntry { type: string; data: number[] }
interface UniformBinding { buffer: GPUBuffer; offset: number; size: number }

/** What is used of tfjs-backend-webgpu's WebGPUBackend (4.22). */
interface BackendInternals {
  device: GPUDevice;
  queue: GPUQueue;
  makeUniforms(entries: UniformEntry[]): UniformBinding;
}

/** Bytes a chunk holds: at 256-byte alignment, 256 dispatches' uniforms. */
const CHUNK_BYTES = 64 * 1024;
/** Free chunks kept between submits beyond this are destroyed (a record-only step can fill many). */
const MAX_FREE_CHUNKS = 16;
// GPUBufferUsage's bits (the spec's values)
const COPY_DST = 0x0008;
const UNIFORM = 0x0040;

/**
 * Where each entry goes and the struct's size: tfjs-webgpu's makeUniforms rules (WGSL alignof of
 * scalars and vecN, the vec5/vec6 structs at 16), which its generated uniform struct follows.
 */
function layout(entries: UniformEntry[], offsets: number[]): number {
  let current = 0;
  let preLength = 0;
  let maxAlignment = 1;
  for (const d of entries) {
    if (d.data.length === 0) d.data = [1];  // as tfjs does: an empty shape is [1]
    const n = d.data.length;
    if (n > 6) throw new Error(`Unsupported ${n}D shape`);
    let alignment = n === 1 ? 4 : n === 2 ? 8 : 16;
    if (preLength === 5 || preLength === 6) alignment = 16;
    if (alignment > maxAlignment) maxAlignment = alignment;
    current = Math.ceil(current / alignment) * alignment;
    preLength = n;
    offsets.push(current);
    current += n * 4;
  }
  return Math.ceil(current / maxAlignment) * maxAlignment;
}

class UniformArena {
  private readonly host = new ArrayBuffer(CHUNK_BYTES);
  private readonly i32 = new Int32Array(this.host);
  private readonly u32 = new Uint32Array(this.host);
  private readonly f32 = new Float32Array(this.host);
  private chunk: GPUBuffer | null = null;
  /** bytes of `chunk` handed out */
  private used = 0;
  /** chunks written since the last submit (the GPU reads them in it) */
  private readonly pending: GPUBuffer[] = [];
  private readonly free: GPUBuffer[] = [];
  private readonly offsets: number[] = [];
  private readonly alignment: number;

  constructor(private readonly b: BackendInternals) {
    this.alignment = Math.max(4, b.device.limits.minUniformBufferOffsetAlignment ?? 256);
  }

  /** The entries' bytes in the current chunk; undefined when they could never fit one. */
  place(entries: UniformEntry[]): UniformBinding | undefined {
    this.offsets.length = 0;
    const size = layout(entries, this.offsets);
    if (size > CHUNK_BYTES) return undefined;
    let start = Math.ceil(this.used / this.alignment) * this.alignment;
    if (this.chunk === null || start + size > CHUNK_BYTES) {
      this.writeChunk();
      this.chunk = this.free.pop() ?? this.b.device.createBuffer({ size: CHUNK_BYTES, usage: UNIFORM | COPY_DST });
      start = 0;
    }
    entries.forEach((d, i) => {
      const view = d.type === 'int32' ? this.i32 : d.type === 'uint32' ? this.u32 : this.f32;
      const at = (start + this.offsets[i]) / 4;
      for (let j = 0; j < d.data.length; j++) view[at + j] = d.data[j];
    });
    // the struct's padding bytes are not read by the shader: what is left there from an earlier dispatch is harmless
    this.used = start + size;
    return { buffer: this.chunk!, offset: start, size };
  }

  /** Sends the current chunk's bytes to the GPU; the chunk then waits for the submit. */
  private writeChunk(): void {
    if (this.chunk === null) return;
    if (this.used > 0) this.b.queue.writeBuffer(this.chunk, 0, this.host, 0, this.used);
    this.pending.push(this.chunk);
    this.chunk = null;
    this.used = 0;
  }

  /** Before tfjs submits: what was recorded reads its uniforms from the written chunks. */
  beforeSubmit(): void {
    this.writeChunk();
  }

  /** After the submit: the chunks may be written again (later writes are ordered after it). */
  afterSubmit(): void {
    for (const c of this.pending) {
      if (this.free.length < MAX_FREE_CHUNKS) this.free.push(c);
      else c.destroy();
    }
    this.pending.length = 0;
  }
}

const installed = new WeakSet<object>();

/**
 * Puts the arena on `backend` (a WebGPUBackend): its makeUniforms and its queue's submit are
 * wrapped on the instances. Idempotent; a backend without the methods (another tfjs-webgpu) is left as it is.
 *
 * ```js
 * await tf.setBackend('webgpu');
 * installUniformArena(tf.backend());
 * ```
 */
export function installUniformArena(backend: unknown): boolean {
  const b = backend as Partial<BackendInternals> | null;
  if (b == null || installed.has(b)) return b != null;
  if (b.device == null || b.queue == null || typeof b.makeUniforms !== 'function' || typeof b.queue.submit !== 'function' ||
      typeof b.queue.writeBuffer !== 'function') {
    return false;
  }
  installed.add(b);
  const internals = b as BackendInternals;
  const arena = new UniformArena(internals);
  const makeUniforms = internals.makeUniforms;
  internals.makeUniforms = function (this: BackendInternals, entries: UniformEntry[]) {
    if (tf.env().getBool(UNIFORM_ARENA_FLAG)) {
      const placed = arena.place(entries);
      if (placed !== undefined) return placed;
    }
    return makeUniforms.call(this, entries);
  };
  // the queue's own submit, not the backend's submitQueue: code that wraps submitQueue on the
  // instance and deletes its wrapper after (as specs do) would take a wrapper there with it
  const queue = internals.queue;
  const submit = queue.submit;
  queue.submit = function (this: GPUQueue, buffers: Iterable<GPUCommandBuffer>) {
    arena.beforeSubmit();
    submit.call(this, buffers);
    arena.afterSubmit();
  };
  return true;
}
