/**
 * Safetensors files in Node: the format (parse, encode, decode) from safetensors_bytes.ts, plus
 * reading a file header-first and writing one atomically.
 */
import { constants as bufferConstants } from 'node:buffer';
import * as tf from '@tensorflow/tfjs-core';
import { writeFileAtomically } from '../util/atomic.js';
import { describeValue } from '../util/describe.js';
import { openRegularFile, readFully } from '../util/files.js';
import {
  checkHeaderLength, describeSource, encodeSafetensors, parseHeader, SafetensorsError, SafetensorsFile,
} from './safetensors_bytes.js';

export {
  SafetensorsError, SafetensorsFile, parseSafetensors, encodeSafetensors, decodeFloat16, decodeBFloat16,
  MAX_HEADER_BYTES, type SafetensorsTensorInfo,
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
  return new SafetensorsFile(header, async (begin, end) => {
    if (end - begin > bufferConstants.MAX_LENGTH) {
      throw new SafetensorsError(
          `${where}: a tensor of ${end - begin} bytes exceeds the largest buffer this runtime can hold ` +
          `(${bufferConstants.MAX_LENGTH} bytes)`);
    }
    const bytes = new Uint8Array(end - begin);
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
  await writeFileAtomically(path, encodeSafetensors(tensors, metadata), '`writeSafetensorsFile()`');
}
