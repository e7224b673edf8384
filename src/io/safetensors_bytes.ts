/**
 * The safetensors format: an 8-byte little-endian u64 header length N, N bytes of UTF-8 JSON
 * `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__"?: {str: str}}`, then the data
 * buffer (offsets are relative to its start). Everything in the header is checked before the data
 * is read or any tensor is made, so a corrupt or hostile file fails with one clear message instead
 * of a huge allocation or garbage weights.
 *
 * This file is the format itself, free of Node modules so that browsers can bundle it
 * (src/browser.ts); safetensors.ts adds reading and writing files in Node.
 */
import * as tf from '@tensorflow/tfjs-core';
import { MoELoraError } from '../errors.js';
import { describeValue } from '../util/describe.js';
import { decodeFloat8E4M3 } from '../util/float8.js';
import { decodeBFloat16, decodeFloat16, encodeBFloat16, encodeFloat16 } from '../util/half.js';

/** Thrown for a malformed file, an unknown tensor name, or a dtype this reader cannot decode. */
export class SafetensorsError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'SafetensorsError';
    Object.setPrototypeOf(this, SafetensorsError.prototype);
  }
}

/** The reference implementation's header limit; a larger length means a corrupt file. */
export const MAX_HEADER_BYTES = 100_000_000;

/** Bits per element of every dtype the format defines (F4/F6 pack several elements per byte). */
const DTYPE_BITS: Readonly<Record<string, number>> = {
  BOOL: 8, U8: 8, I8: 8, F8_E5M2: 8, F8_E4M3: 8, F8_E8M0: 8, F4: 4, F6_E2M3: 6, F6_E3M2: 6,
  I16: 16, U16: 16, F16: 16, BF16: 16, I32: 32, U32: 32, F32: 32, C64: 64, F64: 64, I64: 64,
  U64: 64,
};

/** The dtypes `tensor()` decodes (the float ones to float32, the integer ones to int32). */
const DECODABLE = ['F32', 'F16', 'BF16', 'F8_E4M3', 'I32', 'I64'];

export interface SafetensorsTensorInfo {
  /** The file's dtype string, e.g. 'F32', 'BF16', 'I64'. */
  dtype: string;
  shape: number[];
}

interface Entry extends SafetensorsTensorInfo {
  begin: number;
  end: number;
}

/** @internal */
export interface Header {
  entries: Map<string, Entry>;
  metadata: Record<string, string>;
}

/**
 * @internal The bytes [begin, end) of a file's data section (offsets as in `data_offsets`): a view
 * of bytes in memory (parseSafetensors) or a positional read of the file (readSafetensorsFile).
 * Bytes that are a whole ArrayBuffer are the reader's own (a view of a file in memory never is:
 * its header comes first) and may be kept as they are; any other bytes are copied out. Given
 * `into` (end − begin bytes), a reader may read straight into it and resolve to it; whatever else
 * it resolves to is copied into it.
 */
export type DataRangeReader = (begin: number, end: number, into?: Uint8Array) => Promise<Uint8Array>;

/**
 * A parsed file: the validated header, and a way to read one tensor's byte range. `tensor()`
 * reads and decodes on each call and resolves to a new tensor that the caller owns (and disposes);
 * a file on disk is never held whole, only the tensor being read.
 */
export class SafetensorsFile {
  /** `__metadata__` of the header ({} when it has none). */
  readonly metadata: Readonly<Record<string, string>>;
  private readonly entries: Map<string, Entry>;

  /** @internal Use `parseSafetensors` or `readSafetensorsFile`. */
  constructor(header: Header, private readonly readData: DataRangeReader, private readonly where: string) {
    this.entries = header.entries;
    this.metadata = Object.freeze({ ...header.metadata });
  }

  /** Tensor names, sorted. */
  names(): string[] {
    return [...this.entries.keys()].sort(compareNames);
  }

  has(name: string): boolean {
    return this.entries.has(name);
  }

  info(name: string): SafetensorsTensorInfo {
    const e = this.entry(name);
    return { dtype: e.dtype, shape: [...e.shape] };
  }

  /**
   * Decodes one tensor: F32, F16, BF16 and F8_E4M3 to float32 (F8 as stored: a block-scaled FP8
   * checkpoint's scales are applied by src/io/fp8_checkpoint.ts); I32 and I64 to int32 (an I64
   * value outside the int32 range is an error, not a silent wrap).
   *
   * ```js
   * const file = await readSafetensorsFile('model.safetensors');
   * const w = await file.tensor('lm_head.weight');  // float32 [V, H]
   * ```
   */
  async tensor(name: string): Promise<tf.Tensor> {
    const e = this.entry(name);
    if (!DECODABLE.includes(e.dtype)) {
      throw new SafetensorsError(
          `${this.where}: tensor '${name}' has dtype ${e.dtype}, which cannot be decoded; ` +
          `supported: ${DECODABLE.join(', ')}`);
    }
    const bytes = await this.readData(e.begin, e.end);
    switch (e.dtype) {
      case 'F32': return tf.tensor(readFloat32(bytes), e.shape, 'float32');
      case 'I32': return tf.tensor(readInt32(bytes), e.shape, 'int32');
      case 'F16': return tf.tensor(decodeFloat16(readUint16(bytes)), e.shape, 'float32');
      case 'BF16': return tf.tensor(decodeBFloat16(readUint16(bytes)), e.shape, 'float32');
      case 'F8_E4M3': return tf.tensor(decodeFloat8E4M3(bytes), e.shape, 'float32');
      default: return tf.tensor(this.decodeInt64(name, e, bytes), e.shape, 'int32');  // I64
    }
  }

  /**
   * The raw values of a BF16 or F16 tensor as 16-bit patterns (no decoding): what packed expert
   * weights are made of (src/ops/packed.ts).
   *
   * ```js
   * const bits = await file.halfBits('model.layers.0.mlp.experts.0.down_proj.weight');  // Uint16Array
   * ```
   */
  async halfBits(name: string): Promise<Uint16Array> {
    const e = this.halfEntry(name, 'halfBits');
    return readUint16(await this.readData(e.begin, e.end));
  }

  /**
   * halfBits' elements [from, from + into.length) read into `into`. From a file they are read
   * straight into it: a loader that reuses `into` for every expert makes no array per tensor (a
   * fresh one is memory the system must zero and map, then collect).
   *
   * ```js
   * const halves = new Uint16Array(rows * cols);
   * await file.halfBitsInto('model.layers.0.mlp.experts.0.down_proj.weight', halves);
   * ```
   */
  async halfBitsInto(name: string, into: Uint16Array, from = 0): Promise<void> {
    const e = this.halfEntry(name, 'halfBitsInto');
    const count = (e.end - e.begin) / 2;
    if (!(into instanceof Uint16Array)) {
      throw new SafetensorsError(`${this.where}: halfBitsInto('${name}'): 'into' must be a Uint16Array but got ${describeValue(into)}`);
    }
    if (!Number.isInteger(from) || from < 0 || from + into.length > count) {
      throw new SafetensorsError(`${this.where}: halfBitsInto('${name}'): 'from' and 'into' must stay within the tensor's ` +
          `${count} elements but got from ${describeValue(from)} and ${into.length} elements`);
    }
    const bytes = new Uint8Array(into.buffer, into.byteOffset, into.byteLength);
    const begin = e.begin + 2 * from;
    const read = await this.readData(begin, begin + bytes.byteLength, bytes);
    if (read !== bytes) bytes.set(read);
    if (!HOST_LITTLE_ENDIAN) {
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      for (let i = 0; i < into.length; i++) into[i] = view.getUint16(2 * i, true);
    }
  }

  /**
   * The raw bytes of a U8 or I8 tensor (MXFP4 blocks and scales, src/io/mxfp4.ts; bitsandbytes'
   * codes, src/io/bnb_checkpoint.ts).
   *
   * ```js
   * const scales = await file.uint8Values('model.layers.0.mlp.experts.down_proj_scales');  // Uint8Array
   * ```
   */
  async uint8Values(name: string): Promise<Uint8Array> {
    const e = this.entry(name);
    if (e.dtype !== 'U8' && e.dtype !== 'I8') {
      throw new SafetensorsError(`${this.where}: tensor '${name}' has dtype ${e.dtype}; uint8Values reads U8 and I8 tensors only`);
    }
    return this.readData(e.begin, e.end);
  }

  /** The entry of a BF16 or F16 tensor (`method` names the reader in the error). */
  private halfEntry(name: string, method: string): Entry {
    const e = this.entry(name);
    if (e.dtype !== 'BF16' && e.dtype !== 'F16') {
      throw new SafetensorsError(`${this.where}: tensor '${name}' has dtype ${e.dtype}; ${method} reads BF16 and F16 tensors only`);
    }
    return e;
  }

  private entry(name: string): Entry {
    const e = this.entries.get(name);
    if (e === undefined) {
      const names = this.names();
      const some = names.slice(0, 5).map(n => `'${n}'`).join(', ');
      throw new SafetensorsError(
          `${this.where}: no tensor named '${name}'; it has ${names.length} tensor(s)` +
          (names.length > 0 ? `, e.g. ${some}${names.length > 5 ? ', ...' : ''}` : ''));
    }
    return e;
  }

  private decodeInt64(name: string, e: Entry, bytes: Uint8Array): Int32Array {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const out = new Int32Array(bytes.byteLength / 8);
    for (let i = 0; i < out.length; i++) {
      const lo = view.getInt32(8 * i, true);
      const hi = view.getInt32(8 * i + 4, true);
      // An int64 fits in int32 exactly when its high word is the sign extension of the low word.
      if (hi !== (lo >> 31)) {
        const value = view.getBigInt64(8 * i, true);
        throw new SafetensorsError(
            `${this.where}: tensor '${name}' (I64, shape [${e.shape}]): element ${i} is ${value}, ` +
            `outside the int32 range [-2147483648, 2147483647] it is decoded to`);
      }
      out[i] = lo;
    }
    return out;
  }
}

/**
 * Parses a whole safetensors file held in memory. The returned file keeps a view of `bytes`
 * (no copy), so do not modify them afterwards. `source` names the file in error messages.
 *
 * ```js
 * const file = parseSafetensors(new Uint8Array(await (await fetch(url)).arrayBuffer()));
 * file.info('model.embed_tokens.weight');  // {dtype: 'F32', shape: [V, H]}
 * ```
 */
export function parseSafetensors(bytes: Uint8Array, source?: string): SafetensorsFile {
  if (!(bytes instanceof Uint8Array)) {
    throw new SafetensorsError(
        `\`parseSafetensors()\`: 'bytes' must be a Uint8Array holding a safetensors file but got ${describeValue(bytes)}`);
  }
  if (source !== undefined && typeof source !== 'string') {
    throw new SafetensorsError(
        `\`parseSafetensors()\`: 'source' must be a string naming the file but got ${describeValue(source)}`);
  }
  const where = describeSource(source);
  const n = checkHeaderLength(bytes.subarray(0, 8), bytes.byteLength, where);
  const dataLength = bytes.byteLength - 8 - n;
  const header = parseHeader(bytes.subarray(8, 8 + n), dataLength, where);
  const data = bytes.subarray(8 + n);
  return new SafetensorsFile(header, async (begin, end) => data.subarray(begin, end), where);
}

/** The dtypes this package writes: F32 and I32 as they are, BF16 and F16 rounded from float32. */
export const WRITABLE_DTYPES = ['F32', 'I32', 'BF16', 'F16'] as const;
export type WritableDtype = typeof WRITABLE_DTYPES[number];

/**
 * The reference implementation's data order: dtypes in descending order of its Dtype enum (F32,
 * I32, BF16, F16 of those written here), then names; files written here then match the bytes
 * safetensors (and so transformers' save_pretrained) writes for the same tensors.
 */
const WRITE_ORDER: Readonly<Record<WritableDtype, number>> = { F32: 0, I32: 1, BF16: 2, F16: 3 };
const WRITE_BYTES: Readonly<Record<WritableDtype, number>> = { F32: 4, I32: 4, BF16: 2, F16: 2 };

/** A tensor to write: its name, the dtype it gets in the file, and its shape. */
export interface SafetensorsLayoutItem {
  name: string;
  dtype: WritableDtype;
  shape: number[];
}

/** @internal Where each tensor's bytes go, relative to the start of the data section. */
export interface SafetensorsLayoutEntry extends SafetensorsLayoutItem {
  begin: number;
  end: number;
}

/**
 * @internal The header bytes (8-byte length, JSON padded with spaces to a multiple of 8) and the
 * data order of a file holding `items`, laid out as the reference implementation does; the data
 * itself is written by the caller, entry by entry (encodeSafetensors in memory,
 * writeSafetensorsStream through a file handle).
 */
export function safetensorsLayout(op: string, items: SafetensorsLayoutItem[], metadata?: Record<string, string>):
    { header: Uint8Array; entries: SafetensorsLayoutEntry[]; dataBytes: number } {
  const seen = new Set<string>();
  for (const { name, dtype, shape } of items) {
    if (typeof name !== 'string') throw new SafetensorsError(`\`${op}()\`: tensor names must be strings but got ${describeValue(name)}`);
    if (name === '__metadata__') {
      throw new SafetensorsError(`\`${op}()\`: '__metadata__' is reserved and cannot name a tensor`);
    }
    if (seen.has(name)) throw new SafetensorsError(`\`${op}()\`: tensor '${name}' is given twice`);
    seen.add(name);
    if (!(WRITABLE_DTYPES as readonly string[]).includes(dtype)) {
      throw new SafetensorsError(`\`${op}()\`: tensor '${name}' has dtype ${describeValue(dtype)}; ` +
          `writable: ${WRITABLE_DTYPES.join(', ')}`);
    }
    if (!Array.isArray(shape) || !shape.every(isNonNegativeInteger)) {
      throw new SafetensorsError(`\`${op}()\`: tensor '${name}' must have a shape of non-negative integers but got ${describeValue(shape)}`);
    }
  }
  const sorted = [...items].sort((a, b) => WRITE_ORDER[a.dtype] - WRITE_ORDER[b.dtype] || compareNames(a.name, b.name));

  // No prototype, so a tensor named '__proto__' is stored like any other name.
  const header: Record<string, unknown> = Object.create(null);
  if (metadata !== undefined) {
    for (const [key, value] of Object.entries(metadata)) {
      if (typeof value !== 'string') {
        throw new SafetensorsError(
            `\`${op}()\`: metadata '${key}' must be a string but got ${typeof value}`);
      }
    }
    header['__metadata__'] = { ...metadata };
  }
  let offset = 0;
  const entries = sorted.map(({ name, dtype, shape }) => {
    const bytes = WRITE_BYTES[dtype] * shape.reduce((a, b) => a * b, 1);
    header[name] = { dtype, shape, data_offsets: [offset, offset + bytes] };
    const entry = { name, dtype, shape: [...shape], begin: offset, end: offset + bytes };
    offset += bytes;
    return entry;
  });
  const json = new TextEncoder().encode(JSON.stringify(header));
  const headerLength = Math.ceil(json.byteLength / 8) * 8;
  const out = new Uint8Array(8 + headerLength);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerLength), true);
  out.set(json, 8);
  out.fill(0x20, 8 + json.byteLength);
  return { header: out, entries, dataBytes: offset };
}

/**
 * @internal The little-endian bytes of `values` in `dtype`: F32 and I32 as they are (a view, no
 * copy, on a little-endian host), BF16 and F16 rounded to nearest even from float32.
 */
export function encodeTensorData(dtype: WritableDtype, values: Float32Array | Int32Array): Uint8Array {
  let out: Float32Array | Int32Array | Uint16Array;
  if (dtype === 'BF16') out = encodeBFloat16(values as Float32Array);
  else if (dtype === 'F16') out = encodeFloat16(values as Float32Array);
  else out = values;
  if (HOST_LITTLE_ENDIAN) return new Uint8Array(out.buffer, out.byteOffset, out.byteLength);
  const bytes = new Uint8Array(out.byteLength);
  const view = new DataView(bytes.buffer);
  for (let i = 0; i < out.length; i++) {
    if (out instanceof Uint16Array) view.setUint16(2 * i, out[i], true);
    else if (out instanceof Float32Array) view.setFloat32(4 * i, out[i], true);
    else view.setInt32(4 * i, out[i], true);
  }
  return bytes;
}

/**
 * Encodes float32 tensors as F32 and int32 tensors as I32, laid out as the reference
 * implementation does: data ordered by dtype (F32 before I32), then by name; header keys in data
 * order after `__metadata__`; the header padded with spaces to a multiple of 8 bytes. Reads each
 * tensor asynchronously, so it runs on webgpu too.
 *
 * ```js
 * const bytes = await encodeSafetensors({'lora_A.weight': a, 'lora_B.weight': b}, {format: 'pt'});
 * ```
 */
export async function encodeSafetensors(
    tensors: Record<string, tf.Tensor>, metadata?: Record<string, string>): Promise<Uint8Array> {
  const op = 'encodeSafetensors';
  const items = Object.entries(tensors).map(([name, t]) => {
    if (name === '__metadata__') {
      throw new SafetensorsError(`\`${op}()\`: '__metadata__' is reserved and cannot name a tensor`);
    }
    if (!(t instanceof tf.Tensor)) {
      throw new SafetensorsError(`\`${op}()\`: tensor '${name}' must be a tf.Tensor but got ${typeof t}`);
    }
    if (t.isDisposed) throw new SafetensorsError(`\`${op}()\`: tensor '${name}' was already disposed`);
    if (t.dtype !== 'float32' && t.dtype !== 'int32') {
      throw new SafetensorsError(
          `\`${op}()\`: tensor '${name}' must be float32 or int32 but got ${t.dtype} (shape [${t.shape}])`);
    }
    return { name, dtype: (t.dtype === 'float32' ? 'F32' : 'I32') as WritableDtype, shape: t.shape };
  });
  const { header, entries, dataBytes } = safetensorsLayout(op, items, metadata);
  const out = new Uint8Array(header.byteLength + dataBytes);
  out.set(header, 0);
  for (const { name, dtype, begin } of entries) {
    out.set(encodeTensorData(dtype, await tensors[name].data() as Float32Array | Int32Array), header.byteLength + begin);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Header validation

/** @internal */
export function describeSource(source: string | undefined): string {
  return source === undefined ? 'safetensors data' : `safetensors file '${source}'`;
}

function compareNames(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** @internal Returns N from the first 8 bytes, checked against the limit and the total size. */
export function checkHeaderLength(first8: Uint8Array, totalSize: number, where: string): number {
  if (totalSize < 8 || first8.byteLength < 8) {
    throw new SafetensorsError(
        `${where}: is ${totalSize} bytes long, shorter than the 8-byte header length that starts the format`);
  }
  const n = new DataView(first8.buffer, first8.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(MAX_HEADER_BYTES)) {
    throw new SafetensorsError(
        `${where}: header length ${n} exceeds the limit of ${MAX_HEADER_BYTES} bytes (corrupt file?)`);
  }
  if (n > BigInt(totalSize - 8)) {
    throw new SafetensorsError(
        `${where}: header length ${n} exceeds the ${totalSize - 8} bytes that follow the length ` +
        `field (file size ${totalSize} - 8); the file is truncated or not safetensors`);
  }
  return Number(n);
}

/** @internal */
export function parseHeader(bytes: Uint8Array, dataLength: number, where: string): Header {
  let text: string;
  try {
    text = new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    throw new SafetensorsError(`${where}: header (${bytes.byteLength} bytes) is not valid UTF-8`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new SafetensorsError(
        `${where}: header (${bytes.byteLength} bytes) is not valid JSON: ${(e as Error).message}`);
  }
  if (!isPlainObject(json)) {
    throw new SafetensorsError(`${where}: header must be a JSON object but got ${jsonKind(json)}`);
  }
  const duplicate = firstDuplicateKey(text);
  if (duplicate !== null) {
    throw new SafetensorsError(
        `${where}: header names ${duplicate === '__metadata__' ? "'__metadata__'" : `tensor '${duplicate}'`} ` +
        'more than once (a JSON parser would silently keep the last one)');
  }
  const entries = new Map<string, Entry>();
  let metadata: Record<string, string> = {};
  for (const [name, value] of Object.entries(json)) {
    if (name === '__metadata__') {
      metadata = parseMetadata(value, where);
    } else {
      entries.set(name, parseEntry(name, value, dataLength, `${where}: tensor '${name}'`));
    }
  }
  checkTiling(entries, dataLength, where);
  return { entries, metadata };
}

/**
 * The reference implementation's rule (safetensors `Metadata::validate`): sorted by offsets, the
 * tensors tile the data section exactly, the first beginning at 0, each where the previous ends,
 * the last at the end of the section. So no two tensors share bytes (aliased weights that change
 * together) and no bytes are left unreferenced (a tail that would be read or carried for nothing).
 */
function checkTiling(entries: Map<string, Entry>, dataLength: number, where: string): void {
  const sorted = [...entries].sort(([, a], [, b]) => a.begin - b.begin || a.end - b.end);
  let at = 0;
  let previous: string | null = null;
  for (const [name, e] of sorted) {
    if (e.begin < at) {
      throw new SafetensorsError(
          `${where}: tensor '${name}' (data_offsets [${e.begin}, ${e.end}]) overlaps tensor '${previous}', ` +
          `which ends at ${at}; tensors must not share bytes`);
    }
    if (e.begin > at) {
      throw new SafetensorsError(
          `${where}: bytes [${at}, ${e.begin}) of the data buffer belong to no tensor (a gap before ` +
          `tensor '${name}'); tensors must cover the data buffer exactly`);
    }
    at = e.end;
    previous = name;
  }
  if (at !== dataLength) {
    throw new SafetensorsError(
        `${where}: the tensors end at byte ${at} but the data buffer is ${dataLength} bytes; ` +
        `bytes [${at}, ${dataLength}) belong to no tensor`);
  }
}

/**
 * The first top-level key that occurs twice in the (valid) JSON object `text`, or null.
 * `JSON.parse` keeps the last of duplicate keys without a word, so they are found in the text.
 */
function firstDuplicateKey(text: string): string | null {
  const seen = new Set<string>();
  let depth = 0;
  let expectKey = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      let j = i + 1;
      while (text[j] !== '"') j += text[j] === '\\' ? 2 : 1;
      if (depth === 1 && expectKey) {
        const key = JSON.parse(text.slice(i, j + 1)) as string;
        if (seen.has(key)) return key;
        seen.add(key);
        expectKey = false;
      }
      i = j;
    } else if (c === '{' || c === '[') {
      depth++;
      if (depth === 1) expectKey = true;
    } else if (c === '}' || c === ']') {
      depth--;
    } else if (c === ',' && depth === 1) {
      expectKey = true;
    }
  }
  return null;
}

function parseMetadata(value: unknown, where: string): Record<string, string> {
  if (!isPlainObject(value)) {
    throw new SafetensorsError(`${where}: '__metadata__' must be an object but got ${jsonKind(value)}`);
  }
  for (const [key, v] of Object.entries(value)) {
    if (typeof v !== 'string') {
      throw new SafetensorsError(
          `${where}: '__metadata__' value '${key}' must be a string but got ${jsonKind(v)}`);
    }
  }
  return value as Record<string, string>;
}

function parseEntry(name: string, value: unknown, dataLength: number, where: string): Entry {
  if (!isPlainObject(value)) {
    throw new SafetensorsError(
        `${where}: header entry must be an object with dtype, shape and data_offsets but got ${jsonKind(value)}`);
  }
  for (const field of ['dtype', 'shape', 'data_offsets']) {
    if (!(field in value)) {
      throw new SafetensorsError(`${where}: header entry is missing '${field}'`);
    }
  }
  const { dtype, shape, data_offsets: offsets } = value;
  if (typeof dtype !== 'string' || !(dtype in DTYPE_BITS)) {
    throw new SafetensorsError(
        `${where}: unknown dtype ${JSON.stringify(dtype)}; the format defines ${Object.keys(DTYPE_BITS).join(', ')}`);
  }
  if (!Array.isArray(shape) || !shape.every(isNonNegativeInteger)) {
    throw new SafetensorsError(
        `${where}: 'shape' must be an array of non-negative integers but got ${JSON.stringify(shape)}`);
  }
  if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegativeInteger)) {
    throw new SafetensorsError(
        `${where}: 'data_offsets' must be [begin, end] with non-negative integers but got ${JSON.stringify(offsets)}`);
  }
  const [begin, end] = offsets as [number, number];
  if (end < begin) {
    throw new SafetensorsError(`${where}: data_offsets [${begin}, ${end}] end before they begin`);
  }
  if (end > dataLength) {
    throw new SafetensorsError(
        `${where}: data_offsets [${begin}, ${end}] lie outside the data buffer of ${dataLength} bytes`);
  }
  const numel = (shape as number[]).reduce((a, b) => a * b, 1);
  const bits = numel * DTYPE_BITS[dtype];
  if (bits % 8 !== 0 || bits / 8 !== end - begin) {
    throw new SafetensorsError(
        `${where}: data_offsets [${begin}, ${end}] span ${end - begin} bytes but dtype ${dtype} ` +
        `with shape [${shape}] needs ${bits / 8} bytes`);
  }
  return { dtype, shape: [...(shape as number[])], begin, end };
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function isNonNegativeInteger(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

function jsonKind(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  return typeof v === 'object' ? 'an object' : `${typeof v} ${JSON.stringify(v)}`;
}

// ---------------------------------------------------------------------------------------------
// Little-endian element access. Bytes that are a whole buffer are a read of the reader's own
// (DataRangeReader) and are viewed in place: a copy of every tensor would double the bytes a
// checkpoint load moves and leaves as garbage. Any other bytes, a view of a file in memory
// (parseSafetensors) or part of a larger read, are copied: they are rarely aligned for a typed
// array, and the result must neither alias the caller's bytes nor keep a larger buffer alive. On
// a big-endian host the elements go through a DataView.

const HOST_LITTLE_ENDIAN = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

type ElementArray = Float32Array | Int32Array | Uint16Array;
interface ElementArrayType<T extends ElementArray> {
  new (buffer: ArrayBufferLike, byteOffset?: number, length?: number): T;
  new (length: number): T;
  readonly BYTES_PER_ELEMENT: number;
}

/** `bytes` as little-endian elements of `type`: in place when they are a whole buffer, else copied. */
function readElements<T extends ElementArray>(type: ElementArrayType<T>, bytes: Uint8Array,
    get: (view: DataView, at: number) => number): T {
  const size = type.BYTES_PER_ELEMENT;
  const count = bytes.byteLength / size;
  if (HOST_LITTLE_ENDIAN) {
    const whole = bytes.byteOffset === 0 && bytes.byteLength === bytes.buffer.byteLength;
    return whole ? new type(bytes.buffer, 0, count) : new type(bytes.slice().buffer);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = new type(count);
  for (let i = 0; i < count; i++) out[i] = get(view, size * i);
  return out;
}

const readFloat32 = (bytes: Uint8Array) => readElements(Float32Array, bytes, (v, at) => v.getFloat32(at, true));
const readInt32 = (bytes: Uint8Array) => readElements(Int32Array, bytes, (v, at) => v.getInt32(at, true));
const readUint16 = (bytes: Uint8Array) => readElements(Uint16Array, bytes, (v, at) => v.getUint16(at, true));


export { decodeBFloat16, decodeFloat16, encodeBFloat16, encodeFloat16 } from '../util/half.js';
