/**
 * Safetensors files in Node: the format (parse, encode, decode) from safetensors_bytes.ts, plus
 * reading a file header-first, writing one atomically, and streaming one of any size to disk.
 */
import { constants as bufferConstants } from 'node:buffer';
import { open } from 'node:fs/promises';
import * as tf from '@tensorflow/tfjs-core';
import { writeFileAtomically } from '../util/atomic.js';
import { describeValue } from '../util/describe.js';
import { openRegularFile, readFully } from '../util/files.js';
import {
  checkHeaderLength, describeSource, encodeSafetensors, encodeTensorData, parseHeader, safetensorsLayout,
  SafetensorsError, SafetensorsFile, type SafetensorsLayoutItem,
} from './safetensors_bytes.js';

export {
  SafetensorsError, SafetensorsFile, parseSafetensors, encodeSafetensors, decodeFloat16, decodeBFloat16,
  encodeFloat16, encodeBFloat16, MAX_HEADER_BYTES, WRITABLE_DTYPES, type WritableDtype, type SafetensorsTensorInfo,
  type SafetensorsLayoutItem,
} from './safetensors_bytes.js';

/**
 * Opens a safetensors file: reads and validates the length and the header (against the file
 * size), and keeps the path; each `tensor(name)` then reads exactly that tensor's bytes with a
 * positional read (the file is opened and closed per read, so no descriptor stays open). Memory
 * is the header plus the tensor being read, whatever the file's size. FIFOs, devices and folders
 * are refused without blocking; a file whose size changed since it was opened is refused at the
 * next read.
 *
 * ```js
 * const file = await readSafetensorsFile('adapter_model.safetensors');
 * for (const name of file.names()) console.log(name, file.info(name).shape);
 * const a = await file.tensor(file.names()[0]);
 * ```
 */
export async function readSafetensorsFile(path: string): Promise<SafetensorsFile> {
  if (typeof path !== 'string' || path.length === 0) {
    throw new SafetensorsError(`\`readSafetensorsFile()\`: 'path' must be a file path but got ${describeValue(path)}`);
  }
  const where = describeSource(path);
  const what = 'safetensors file';
  const { handle, size } = await openRegularFile(path, what);
  let header: ReturnType<typeof parseHeader>;
  let dataStart: number;
  try {
    const lengthBytes = new Uint8Array(Math.min(8, size));
    await readFully(handle, lengthBytes, 0, where);
    const n = checkHeaderLength(lengthBytes, size, where);
    const headerBytes = new Uint8Array(n);
    await readFully(handle, headerBytes, 8, where);
    dataStart = 8 + n;
    header = parseHeader(headerBytes, size - dataStart, where);
  } finally {
    await handle.close();
  }
  return new SafetensorsFile(header, async (begin, end, into) => {
    if (end - begin > bufferConstants.MAX_LENGTH) {
      throw new SafetensorsError(
          `${where}: a tensor of ${end - begin} bytes exceeds the largest buffer this runtime can hold ` +
          `(${bufferConstants.MAX_LENGTH} bytes)`);
    }
    const bytes = into ?? new Uint8Array(end - begin);
    if (bytes.byteLength === 0) return bytes;
    const file = await openRegularFile(path, what, { expectedSize: size });
    try {
      await readFully(file.handle, bytes, dataStart + begin, where);
    } finally {
      await file.handle.close();
    }
    return bytes;
  }, where);
}

/**
 * Writes `encodeSafetensors(tensors, metadata)` to `path` through a temporary file and a rename
 * (writeFileAtomically), so an interrupted write never leaves a truncated file under the final name.
 *
 * ```js
 * await writeSafetensorsFile('adapter_model.safetensors', loraTensors, {format: 'pt'});
 * ```
 */
export async function writeSafetensorsFile(
    path: string, tensors: Record<string, tf.Tensor>, metadata?: Record<string, string>): Promise<void> {
  await writeFileAtomically(path, await encodeSafetensors(tensors, metadata), '`writeSafetensorsFile()`');
}

/** One tensor for writeSafetensorsStream: name, file dtype, shape, and its values when its turn comes. */
export interface SafetensorsStreamTensor extends SafetensorsLayoutItem {
  /**
   * The row-major values (float32 for F32/BF16/F16, int32 for I32), asked for once, when the
   * tensor is written; so only the tensor being written needs to exist as an array.
   */
  values: () => Float32Array | Int32Array | Promise<Float32Array | Int32Array>;
}

/** Elements encoded and written per write call: bounds the 16-bit conversion buffer. */
const STREAM_CHUNK_ELEMENTS = 1 << 22;

/**
 * Writes a safetensors file of any size through a file handle: the header first (from names,
 * dtypes and shapes alone), then each tensor's bytes in turn, so memory is one tensor's values and
 * a chunk of encoded bytes, never the file. The layout is the reference implementation's (as
 * encodeSafetensors). BF16 and F16 are rounded to nearest even from float32 (exact for values that
 * came from those dtypes). Creates or truncates `path`: call it inside an atomic save
 * (writeArtifactFolder) so that an interrupted write never stands under the final name.
 * Resolves to the file's size in bytes.
 *
 * ```js
 * await writeArtifactFolder('out', async dir => {
 *   await writeSafetensorsStream(join(dir, 'model.safetensors'),
 *       [{name: 'w', dtype: 'BF16', shape: [2, 2], values: () => new Float32Array([1, 2, 3, 4])}], {format: 'pt'});
 * });
 * ```
 */
export async function writeSafetensorsStream(
    path: string, tensors: SafetensorsStreamTensor[], metadata?: Record<string, string>): Promise<number> {
  const op = 'writeSafetensorsStream';
  if (typeof path !== 'string' || path.length === 0) {
    throw new SafetensorsError(`\`${op}()\`: 'path' must be a file path but got ${describeValue(path)}`);
  }
  if (!Array.isArray(tensors)) {
    throw new SafetensorsError(`\`${op}()\`: 'tensors' must be an array of {name, dtype, shape, values} but got ${describeValue(tensors)}`);
  }
  for (const t of tensors) {
    if (typeof t?.values !== 'function') {
      throw new SafetensorsError(`\`${op}()\`: tensor '${String(t?.name)}' must have a values() function but has ${describeValue(t?.values)}`);
    }
  }
  const { header, entries, dataBytes } = safetensorsLayout(op, tensors, metadata);
  const byName = new Map(tensors.map(t => [t.name, t]));
  const handle = await open(path, 'w');
  try {
    await writeAll(handle, header, 0);
    for (const { name, dtype, shape, begin } of entries) {
      const values = await byName.get(name)!.values();
      const size = shape.reduce((a, b) => a * b, 1);
      const want = dtype === 'I32' ? Int32Array : Float32Array;
      if (!(values instanceof want) || values.length !== size) {
        throw new SafetensorsError(`\`${op}()\`: tensor '${name}' (${dtype}, shape [${shape}]) needs ${size} values ` +
            `(${want.name}) but values() gave ${values instanceof Float32Array || values instanceof Int32Array ?
              `${values.length} values (${values.constructor.name})` : describeValue(values)}`);
      }
      let at = header.byteLength + begin;
      for (let start = 0; start < size; start += STREAM_CHUNK_ELEMENTS) {
        const bytes = encodeTensorData(dtype, values.subarray(start, Math.min(size, start + STREAM_CHUNK_ELEMENTS)));
        await writeAll(handle, bytes, at);
        at += bytes.byteLength;
      }
    }
  } finally {
    await handle.close();
  }
  return header.byteLength + dataBytes;
}

/** Writes every byte of `bytes` at `position` (a write may take fewer bytes than asked). */
async function writeAll(handle: Awaited<ReturnType<typeof open>>, bytes: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < bytes.byteLength) {
    const { bytesWritten } = await handle.write(bytes, done, bytes.byteLength - done, position + done);
    done += bytesWritten;
  }
}
