/**
 * A tensor made from host values goes to the GPU by queue.writeBuffer into a pooled buffer (issue 15:
 * the host bounds an OLMoE training step). tfjs-backend-webgpu's uploadToGPU (4.22) takes a pooled
 * buffer too, but once the pool is warm that buffer is never mapped, so it creates a new
 * MAP_WRITE staging buffer for every upload (mapped at creation, destroyed after the submit) and
 * records a copy from it: on the H100 the step's createBuffer calls took ~28 ms of host time a step
 * (T4's V8 profile, docs/benchmarks.md), for the scalars of `x * 2`, rotary tables, masks and the
 * like. writeBuffer copies into Dawn's own staging ring instead.
 *
 * Ordering: a writeBuffer runs on the queue before every submit that follows it, so before the
 * commands recorded so far; the buffer comes from the pool's free list, which holds no buffer those
 * commands read (tfjs returns a tensor's buffer to the pool only after the submit of the commands
 * that use it: commandQueueOwnedIds), and the commands that read the new tensor are recorded after
 * this, so they run after the write. The uniform arena rests on the same order (uniform_arena.ts).
 *
 * The tf.env() flag WEBGPU_MOE_WRITTEN_UPLOADS (default true) is read per upload: false goes back to
 * tfjs's staging buffers (the comparison in one checkout).
 */
import * as tf from '@tensorflow/tfjs-core';

export const WRITTEN_UPLOADS_FLAG = 'WEBGPU_MOE_WRITTEN_UPLOADS';
tf.env().registerFlag(WRITTEN_UPLOADS_FLAG, () => true);

/** One entry of tfjs-backend-webgpu's tensorMap, as far as used here. */
interface TensorData {
  dtype: tf.DataType;
  shape: number[];
  values: tf.backend_util.BackendValues | null;
  resource?: unknown;
}

/** What is used of tfjs-backend-webgpu's WebGPUBackend (4.22). */
interface BackendInternals {
  queue: GPUQueue;
  tensorMap: { get(dataId: object): TensorData | undefined };
  bufferManager: { acquireBuffer(size: number, usage: number, mappedAtCreation?: boolean, reuse?: boolean): GPUBuffer };
  uploadToGPU(dataId: object): void;
}

// GPUBufferUsage's bits (the spec's values), those of tfjs's tensor buffers
const COPY_SRC = 0x0004;
const COPY_DST = 0x0008;
const STORAGE = 0x0080;

/**
 * The values as the 4-byte words the GPU buffer holds (tfjs's upload converts the same way: a
 * float32 tensor made on the host by a cast from bool holds a Uint8Array), or null for the dtypes
 * tfjs uploads otherwise.
 */
function wordsOf(data: TensorData): Float32Array | Int32Array | null {
  const { dtype, values } = data;
  if (!ArrayBuffer.isView(values)) return null;
  if (dtype === 'float32') return values instanceof Float32Array ? values : Float32Array.from(values as ArrayLike<number>);
  // tfjs stores bool as int32 on the GPU
  if (dtype === 'int32' || dtype === 'bool') return values instanceof Int32Array ? values : Int32Array.from(values as ArrayLike<number>);
  return null;
}

const installed = new WeakSet<object>();

/**
 * Makes `backend` (a WebGPUBackend) upload host values by queue.writeBuffer: its uploadToGPU is
 * wrapped on the instance. Idempotent; returns whether it is installed (a backend without the
 * internals used here, another tfjs-webgpu, is left as it is).
 *
 * ```js
 * await tf.setBackend('webgpu');
 * installWrittenUploads(tf.backend());
 * ```
 */
export function installWrittenUploads(backend: unknown): boolean {
  const b = backend as Partial<BackendInternals> | null;
  if (b == null) return false;
  if (installed.has(b)) return true;
  if (typeof b.uploadToGPU !== 'function' || typeof b.tensorMap?.get !== 'function' ||
      typeof b.bufferManager?.acquireBuffer !== 'function' || typeof b.queue?.writeBuffer !== 'function') {
    return false;
  }
  installed.add(b);
  const internals = b as BackendInternals;
  const upload = internals.uploadToGPU;
  internals.uploadToGPU = function (this: BackendInternals, dataId: object) {
    const data = this.tensorMap.get(dataId);
    const words = data != null && data.resource == null && data.values != null && tf.env().getBool(WRITTEN_UPLOADS_FLAG)
      ? wordsOf(data) : null;
    if (words === null || words.length === 0 || words.length !== tf.util.sizeFromShape(data!.shape)) {
      upload.call(this, dataId);
      return;
    }
    const buffer = this.bufferManager.acquireBuffer(words.byteLength, STORAGE | COPY_SRC | COPY_DST);
    // (the DOM typings take views of an ArrayBuffer only; Dawn's writeBuffer takes any view)
    this.queue.writeBuffer(buffer, 0, words as unknown as GPUAllowSharedBufferSource);
    data!.resource = buffer;
    // once uploaded, the values are not kept on the host (as tfjs's upload)
    data!.values = null;
  };
  return true;
}
