/**
 * Loaded weights go straight to the device. On webgpu, tf.tensor(values) only records the host
 * array: tfjs-backend-webgpu uploads it at the tensor's first use (uploadToGPU) and keeps it until
 * then, so a model loaded with tf.tensor holds every weight on the host until its first forward
 * pass. Here a weight's device buffer is allocated empty and filled a piece at a time (a fused
 * expert stack one expert at a time) through a few upload buffers reused from piece to piece, so
 * the host holds one piece and the upload buffers, never the stack or the model. On cpu and wasm
 * the tensor's memory is the host's: one array, filled in place.
 */
import * as tf from '@tensorflow/tfjs-core';
import { decodeBFloat16Into, decodeFloat16Into } from '../util/half.js';
import type { TensorSource } from './hf_block.js';
import type * as tfl from '@tensorflow/tfjs-layers';

/** What is used of tfjs-backend-webgpu's WebGPUBackend (4.22), checked before use. */
interface WebGPUBackendLike {
  device: GPUDevice;
  tensorMap: { get(dataId: object): { values?: ArrayLike<number> | null; resource?: unknown } | undefined };
  makeTensorInfo(shape: number[], dtype: tf.DataType): tf.TensorInfo;
  uploadToGPU(dataId: object): void;
  disposeData(dataId: object, force?: boolean): boolean;
}

/** The bytes of each upload buffer: a longer write is copied a buffer's worth at a time. */
const UPLOAD_BUFFER_BYTES = 16 * 2 ** 20;
/** Upload buffers per device: copies from the others are under way while one is filled. */
const UPLOAD_BUFFERS = 4;
// GPUBufferUsage's and GPUMapMode's bits (the spec's values)
const MAP_WRITE = 0x0002;
const COPY_SRC = 0x0004;
const MAP_MODE_WRITE = 0x0002;

/** The webgpu backend when it is the active one and has what this file uses, else null. */
function activeWebGPU(): WebGPUBackendLike | null {
  if (tf.getBackend() !== 'webgpu') return null;
  const b = tf.backend() as unknown as Partial<WebGPUBackendLike>;
  const usable = typeof b.makeTensorInfo === 'function' && typeof b.uploadToGPU === 'function' &&
      typeof b.disposeData === 'function' && typeof b.tensorMap?.get === 'function' &&
      typeof b.device?.createBuffer === 'function';
  return usable ? b as WebGPUBackendLike : null;
}

/**
 * Mapped upload buffers (MAP_WRITE | COPY_SRC) that loaded weights are copied through, the same
 * few for every write: a write fills one (its mapped range is the buffer's memory, no copy
 * between), submits a copy from it into the tensor's buffer and maps it again, which resolves
 * once the copy is done. queue.writeBuffer would stage every write over 4 MiB (Dawn's ring size;
 * some Dawn versions add the copy alignment to the request, so 4 MiB itself) in a host-visible
 * buffer made for it and freed after it: an OLMoE-1B-7B load (an 8 MiB gate_up and a 4 MiB down
 * per expert, 16 MiB pieces of the dense weights) made and freed 1100 to 2100 of them. At most
 * UPLOAD_BUFFERS are in flight, which bounds the host memory a load stages in.
 */
class UploadBuffers {
  private readonly free: GPUBuffer[] = [];
  private readonly waiting: Array<(buffer: GPUBuffer) => void> = [];
  private made = 0;

  constructor(private readonly device: GPUDevice) {}

  /**
   * Fills `byteLength` bytes of `target` from byte `targetOffset` on (both multiples of 4): for
   * each upload buffer's worth, `fill(into, at)` writes bytes [at, at + into.byteLength) into
   * `into`, the upload buffer's mapped memory, and a copy into `target` is submitted. A fill that
   * throws submits nothing, and its upload buffer goes back as it is.
   */
  async fill(target: GPUBuffer, targetOffset: number, byteLength: number,
      fill: (into: Uint8Array, at: number) => void | Promise<void>): Promise<void> {
    for (let at = 0; at < byteLength; at += UPLOAD_BUFFER_BYTES) {
      const count = Math.min(UPLOAD_BUFFER_BYTES, byteLength - at);
      const upload = await this.take();
      try {
        await fill(new Uint8Array(upload.getMappedRange(0, count)), at);
      } catch (e) {
        upload.unmap();   // the range given out is detached; mapped again below, as after a copy
        this.mapAgain(upload);
        throw e;
      }
      upload.unmap();
      const encoder = this.device.createCommandEncoder();
      encoder.copyBufferToBuffer(upload, 0, target, targetOffset + at, count);
      this.device.queue.submit([encoder.finish()]);
      this.mapAgain(upload);
    }
  }

  /** Maps `upload` again; it is free once its copies are done. */
  private mapAgain(upload: GPUBuffer): void {
    upload.mapAsync(MAP_MODE_WRITE).then(() => this.give(upload), () => {
      // the device is lost or destroyed: a buffer that never comes back is made again for whoever waits
      upload.destroy();
      this.made--;
      const next = this.waiting.shift();
      if (next !== undefined) void this.take().then(next);
    });
  }

  /** A mapped buffer: a free one, a new one while fewer than UPLOAD_BUFFERS exist, else the next to come back. */
  private take(): Promise<GPUBuffer> {
    const free = this.free.pop();
    if (free !== undefined) return Promise.resolve(free);
    if (this.made < UPLOAD_BUFFERS) {
      this.made++;
      return Promise.resolve(this.device.createBuffer({ size: UPLOAD_BUFFER_BYTES, usage: MAP_WRITE | COPY_SRC, mappedAtCreation: true }));
    }
    return new Promise(resolve => this.waiting.push(resolve));
  }

  private give(upload: GPUBuffer): void {
    const next = this.waiting.shift();
    if (next !== undefined) next(upload);
    else this.free.push(upload);
  }
}

const uploadBuffers = new WeakMap<GPUDevice, UploadBuffers>();

/** The device's upload buffers (made at its first load, kept for the next). */
function uploadBuffersOf(device: GPUDevice): UploadBuffers {
  let buffers = uploadBuffers.get(device);
  if (buffers === undefined) uploadBuffers.set(device, buffers = new UploadBuffers(device));
  return buffers;
}

/**
 * A float32 or int32 tensor of `shape` filled piece by piece: `write` copies a piece into its
 * place (on webgpu into the tensor's device buffer, through UploadBuffers), `finish` gives the tensor. Every
 * element must be written once before `finish` (a reused device buffer is not zeroed).
 *
 * ```js
 * const stack = new TensorBuilder([E, rows, cols], 'float32');
 * for (let e = 0; e < E; e++) await stack.write(await expertValues(e), e * rows * cols);
 * const w = await stack.finish();
 * ```
 */
export class TensorBuilder {
  private readonly backend: WebGPUBackendLike | null;
  private readonly host: Float32Array | Int32Array | null = null;
  private info: tf.TensorInfo | null = null;
  private buffer: GPUBuffer | null = null;

  constructor(readonly shape: number[], readonly dtype: 'float32' | 'int32') {
    const size = shape.reduce((a, b) => a * b, 1);
    const webgpu = size > 0 ? activeWebGPU() : null;
    this.backend = webgpu;
    if (webgpu === null) {
      this.host = dtype === 'int32' ? new Int32Array(size) : new Float32Array(size);
      return;
    }
    // no values: uploadToGPU only allocates the device buffer
    this.info = webgpu.makeTensorInfo(shape, dtype);
    webgpu.uploadToGPU(this.info.dataId);
    this.buffer = webgpu.tensorMap.get(this.info.dataId)!.resource as GPUBuffer;
  }

  /** Copies `values` to elements [offset, offset + values.length); `values` may be reused afterwards. */
  async write(values: Float32Array | Int32Array, offset: number): Promise<void> {
    const bytes = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
    await this.fill(offset, values.length, (into, at) => {
      new Uint8Array(into.buffer, into.byteOffset, into.byteLength).set(bytes.subarray(4 * at, 4 * (at + into.length)));
    });
  }

  /**
   * Elements [offset, offset + count) filled by `fill(into, at)`, which writes elements
   * [offset + at, offset + at + into.length) into `into` (every one of them: nothing is zeroed)
   * before it resolves. `into` is where the elements go next: on webgpu an upload buffer's mapped
   * memory (a call per 16 MiB), elsewhere the tensor's own memory (one call). So a file is read
   * straight into what the GPU copies from, with no array between. Calls for other ranges may
   * run at once (each fills its own upload buffer).
   */
  async fill(offset: number, count: number, fill: (into: Float32Array | Int32Array, at: number) => void | Promise<void>): Promise<void> {
    if (this.host !== null) {
      if (count > 0) await fill(this.host.subarray(offset, offset + count), 0);
      return;
    }
    const int32 = this.dtype === 'int32';
    await uploadBuffersOf(this.backend!.device).fill(this.buffer!, offset * 4, count * 4, (into, at) => {
      const [buffer, from, length] = [into.buffer as ArrayBuffer, into.byteOffset, into.byteLength / 4];
      return fill(int32 ? new Int32Array(buffer, from, length) : new Float32Array(buffer, from, length), at / 4);
    });
  }

  /** The tensor (the caller owns it); the builder is spent. */
  async finish(): Promise<tf.Tensor> {
    if (this.host !== null) return tf.tensor(this.host, this.shape, this.dtype);
    // the copies are on the queue before anything that will read the tensor
    const info = this.info!;
    this.info = null;
    return tf.engine().makeTensorFromTensorInfo(info, this.backend as unknown as tf.KernelBackend);
  }

  /** Frees the device buffer of a builder that will not be finished (an error while loading). */
  dispose(): void {
    if (this.info !== null) this.backend!.disposeData(this.info.dataId, true);
    this.info = null;
  }
}

/**
 * `values` as a tensor on the active backend's device: on webgpu written to a device buffer now
 * (tf.tensor would keep `values` on the host until the tensor's first use); elsewhere tf.tensor.
 *
 * ```js
 * const w = await deviceTensor(decodeBFloat16(bits), [V, H], 'float32');
 * ```
 */
export async function deviceTensor(values: Float32Array | Int32Array, shape: number[], dtype: 'float32' | 'int32'): Promise<tf.Tensor> {
  return buildTensor(shape, dtype, builder => builder.write(values, 0));
}

/**
 * A tensor of `shape` that `fill` writes through a TensorBuilder: finished when `fill` resolves,
 * its device buffer freed when `fill` throws (which must not throw before its writes have settled).
 *
 * ```js
 * const w = await buildTensor([rows, cols], 'float32', b => fillDecodedHalves(b, 0, file, name));
 * ```
 */
export async function buildTensor(shape: number[], dtype: 'float32' | 'int32', fill: (builder: TensorBuilder) => Promise<void>): Promise<tf.Tensor> {
  const builder = new TensorBuilder(shape, dtype);
  try {
    await fill(builder);
    return await builder.finish();
  } catch (e) {
    builder.dispose();
    throw e;
  }
}

/**
 * `t` on the device: on webgpu, a tensor whose values are still only on the host (made by
 * tf.tensor, not used yet) is replaced by a device copy and disposed; anything else is `t`.
 *
 * ```js
 * const w = await onDevice(await file.tensor('lm_head.weight'));
 * ```
 */
export async function onDevice(t: tf.Tensor): Promise<tf.Tensor> {
  const webgpu = activeWebGPU();
  if (webgpu === null || (t.dtype !== 'float32' && t.dtype !== 'int32')) return t;
  const data = webgpu.tensorMap.get(t.dataId);
  const values = data?.values;
  if (values == null || data!.resource != null || !(values instanceof Float32Array || values instanceof Int32Array)) return t;
  const moved = await deviceTensor(values, t.shape, t.dtype);
  t.dispose();
  return moved;
}

/**
 * Bytes of `t`'s values held on the host by the webgpu backend (0 once on the device); null on
 * other backends, where every tensor lives on the host. The load bench reports it.
 */
export function hostValueBytes(t: tf.Tensor): number | null {
  const webgpu = activeWebGPU();
  if (webgpu === null) return null;
  const values = webgpu.tensorMap.get(t.dataId)?.values as ArrayLike<number> & { byteLength?: number } | null | undefined;
  return values == null ? 0 : values.byteLength ?? values.length * 4;
}

/** Elements decoded per piece when a 16-bit tensor is read into a wasm variable: 16 MiB of float32. */
const DECODE_CHUNK_ELEMENTS = 1 << 22;

/**
 * The 16-bit values `halves` (BF16 or F16 bits, as stored) decoded to float32 into dst[dOff …]: a
 * buffer reused across pieces and tensors (fillDecodedHalves, the quantizing loaders).
 */
export function decodeHalvesInto(dtype: string, halves: Uint16Array, dst: Float32Array, dOff: number): void {
  if (dtype === 'BF16') decodeBFloat16Into(halves, dst, dOff);
  else decodeFloat16Into(halves, dst, dOff);
}

/**
 * `source`'s 16-bit tensor `name`, elements [from, from + into.length), into `into`: straight from
 * the file where the source reads into a caller's array (halfBitsInto), else copied out of halfBits.
 */
export async function readHalvesInto(source: TensorSource, name: string, into: Uint16Array, from = 0): Promise<void> {
  if (typeof source.halfBitsInto === 'function') return source.halfBitsInto(name, into, from);
  into.set((await source.halfBits!(name)).subarray(from, from + into.length));
}

/** The array halfPieces reads pieces into, kept by a caller that reads tensor after tensor (grown as needed). */
export interface HalfScratch { halves: Uint16Array }

/**
 * Reads the 16-bit tensor `name` a piece at a time: `read(at, count)` gives elements [at, at + count)
 * in a view that the next call reuses. Where the source reads into a caller's array (halfBitsInto)
 * each piece is read into `scratch`, so the host never holds the tensor as stored; else the pieces
 * are cut from halfBits' array, read once.
 */
function halfPieces(source: TensorSource, name: string, scratch: HalfScratch = { halves: new Uint16Array(0) }):
    (at: number, count: number) => Promise<Uint16Array> {
  let whole: Promise<Uint16Array> | null = null;
  return async (at, count) => {
    if (typeof source.halfBitsInto !== 'function') return (await (whole ??= source.halfBits!(name))).subarray(at, at + count);
    if (scratch.halves.length < count) scratch.halves = new Uint16Array(count);
    const view = scratch.halves.subarray(0, count);
    await source.halfBitsInto(name, view, at);
    return view;
  };
}

/**
 * Elements [offset, offset + size of `name`) of `builder` (float32) filled with the 16-bit
 * checkpoint tensor `name` (BF16 or F16) decoded: read a piece at a time (halfPieces, into
 * `scratch`) and decoded straight into where the builder's elements go (on webgpu an upload
 * buffer's memory), so no array of the tensor is made as float32.
 */
export async function fillDecodedHalves(builder: TensorBuilder, offset: number, source: TensorSource, name: string,
    scratch?: HalfScratch): Promise<void> {
  const { dtype, shape } = source.info(name);
  const read = halfPieces(source, name, scratch);
  await builder.fill(offset, tf.util.sizeFromShape(shape), async (into, at) =>
    decodeHalvesInto(dtype, await read(at, into.length), into as Float32Array, 0));
}

/**
 * The checkpoint tensor `name` as a float32 (or int32) tensor on the device. On webgpu a BF16 or
 * F16 tensor is decoded straight into the upload buffer its device buffer is filled from
 * (fillDecodedHalves), so the host holds a piece as stored, not the tensor (from a source without
 * halfBitsInto: the tensor as stored); anything else is `source.tensor(name)` moved with onDevice.
 *
 * ```js
 * const embed = await readToDevice(file, 'model.embed_tokens.weight');
 * ```
 */
export async function readToDevice(source: TensorSource, name: string): Promise<tf.Tensor> {
  const { dtype, shape } = source.info(name);
  if (activeWebGPU() === null || typeof source.halfBits !== 'function' || (dtype !== 'BF16' && dtype !== 'F16')) {
    return onDevice(await source.tensor(name));
  }
  return buildTensor(shape, 'float32', builder => fillDecodedHalves(builder, 0, source, name));
}

/**
 * The 16-bit checkpoint tensor `name` ([rows, cols], cols even) as int32 words [rows, cols / 2], two
 * halves a word, low first, as stored: the packed dense layout of an even row (packedDenseWordsOf).
 * The halves are read from the file straight into where the builder's elements go (on webgpu an
 * upload buffer's mapped memory), so the host holds no array of the tensor. For a source that reads
 * into a caller's array (halfBitsInto); others would read the whole tensor once per piece.
 */
export async function readHalfWordsToDevice(source: TensorSource, name: string, [rows, cols]: [number, number]): Promise<tf.Tensor> {
  if (cols % 2 !== 0 || typeof source.halfBitsInto !== 'function') {
    throw new Error(`readHalfWordsToDevice: '${name}' needs an even row and a source with halfBitsInto but has ${cols} columns` +
        `${typeof source.halfBitsInto === 'function' ? '' : ' and no halfBitsInto'}`);
  }
  return buildTensor([rows, cols / 2], 'int32', builder => builder.fill(0, rows * cols / 2, (into, at) =>
    source.halfBitsInto!(name, new Uint16Array(into.buffer, into.byteOffset, 2 * into.length), 2 * at)));
}

/** What is used of tfjs-backend-wasm's BackendWasm (4.22): a tensor's place on the heap and its sharers. */
interface WasmBackendLike {
  wasm: { HEAPU8: Uint8Array };
  dataIdMap: { get(dataId: object): { memoryOffset: number | null } | undefined };
  refCount(dataId: object): number;
}

/** The wasm backend when it is the active one and has what this file uses, else null. */
function activeWasm(): WasmBackendLike | null {
  if (tf.getBackend() !== 'wasm') return null;
  const b = tf.backend() as unknown as Partial<WasmBackendLike>;
  const usable = b.wasm?.HEAPU8 instanceof Uint8Array && typeof b.dataIdMap?.get === 'function' &&
      typeof b.refCount === 'function';
  return usable ? b as WasmBackendLike : null;
}

/**
 * The heap offset of `variable`'s values when the wasm backend is active and the variable alone
 * holds them (no other tensor shares its buffer, so writing into it changes nothing else), of
 * `dtype` and `shape`; else null.
 */
function ownWasmOffset(b: WasmBackendLike, variable: tf.Tensor, dtype: tf.DataType, shape: readonly number[]): number | null {
  if (variable.dtype !== dtype || !tf.util.arraysEqual(variable.shape, shape as number[]) || variable.size === 0) return null;
  if (b.refCount(variable.dataId) !== 1) return null;
  const offset = b.dataIdMap.get(variable.dataId)?.memoryOffset;
  return typeof offset === 'number' ? offset : null;
}

/**
 * `variable.write(t)`, except on wasm, where `t`'s values are copied into the buffer the variable
 * already has. Assigning would keep `t`'s buffer and free the variable's: on the wasm heap, which
 * never shrinks, each loaded weight then leaves a hole of its size that the next, differently
 * sized allocations split, and the heap of a 1B-parameter load grew to 2.5× its tensors. The
 * caller still owns (and disposes) `t`.
 *
 * ```js
 * const t = await readToDevice(file, name);
 * writeVariable(layerVariable, t);
 * t.dispose();
 * ```
 */
export function writeVariable(variable: tfl.LayerVariable, t: tf.Tensor): void {
  const b = activeWasm();
  const target = variable.read();
  const to = b === null ? null : ownWasmOffset(b, target, t.dtype, t.shape);
  const from = to === null ? undefined : b!.dataIdMap.get(t.dataId)?.memoryOffset;
  if (to === null || typeof from !== 'number') {
    variable.write(t);
    return;
  }
  if (from !== to) b!.wasm.HEAPU8.copyWithin(to, from, from + t.size * tf.util.bytesPerElement(t.dtype));
}

/**
 * The checkpoint tensor `name` written into `variable` (as readToDevice then writeVariable). On
 * wasm a BF16 or F16 tensor is read and decoded a piece at a time straight into the variable's
 * buffer on the heap: the heap never holds a second copy of it.
 *
 * ```js
 * await readIntoVariable(file, 'model.embed_tokens.weight', embedding.embeddings);
 * ```
 */
export async function readIntoVariable(source: TensorSource, name: string, variable: tfl.LayerVariable): Promise<void> {
  const { dtype, shape } = source.info(name);
  const b = activeWasm();
  const to = b === null || typeof source.halfBits !== 'function' || (dtype !== 'BF16' && dtype !== 'F16') ? null :
    ownWasmOffset(b, variable.read(), 'float32', shape);
  if (to === null) {
    const t = await readToDevice(source, name);
    try {
      writeVariable(variable, t);
    } finally {
      t.dispose();
    }
    return;
  }
  const size = tf.util.sizeFromShape(shape);
  const read = halfPieces(source, name);
  for (let at = 0; at < size; at += DECODE_CHUNK_ELEMENTS) {
    const halves = await read(at, Math.min(DECODE_CHUNK_ELEMENTS, size - at));
    // a fresh view each piece: other work may run while a piece is read, and a view must never outlive a heap growth
    const heap = new Float32Array(b!.wasm.HEAPU8.buffer, to, size);
    decodeHalvesInto(dtype, halves, heap, at);
  }
}
