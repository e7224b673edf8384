/**
 * Safetensors files in Node: the format (parse, encode, decode) from safetensors_bytes.ts, plus
 * reading a file header-first and writing one atomically.
 */
import { constants as bufferConstants } from 'node:buffer';
import { open } from 'node:fs/promises';
import * as tf from '@tensorflow/tfjs-core';
import { writeFileAtomically } from '../util/atomic.js';
import {
  checkHeaderLength, describeSource, encodeSafetensors, parseHeader, SafetensorsError, SafetensorsFile,
} from './safetensors_bytes.js';

export {
  SafetensorsError, SafetensorsFile, parseSafetensors, encodeSafetensors, decodeFloat16, decodeBFloat16,
  MAX_HEADER_BYTES, type SafetensorsTensorInfo,
} from './safetensors_bytes.js';

/**
 * Reads a safetensors file: the length and the header first, validated against the file size,
 * then the data buffer in one read.
 *
 * ```js
 * const file = await readSafetensorsFile('adapter_model.safetensors');
 * for (const name of file.names()) console.log(name, file.info(name).shape);
 * ```
 */
export async function readSafetensorsFile(path: string): Promise<SafetensorsFile> {
  const where = describeSource(path);
  const handle = await open(path, 'r');
  try {
    const size = (await handle.stat()).size;
    const lengthBytes = new Uint8Array(Math.min(8, size));
    await readExactly(handle, lengthBytes, 0, where);
    const n = checkHeaderLength(lengthBytes, size, where);
    const headerBytes = new Uint8Array(n);
    await readExactly(handle, headerBytes, 8, where);
    const dataLength = size - 8 - n;
    const header = parseHeader(headerBytes, dataLength, where);
    if (dataLength > bufferConstants.MAX_LENGTH) {
      throw new SafetensorsError(
          `${where}: its data buffer of ${dataLength} bytes exceeds the largest buffer this ` +
          `runtime can hold (${bufferConstants.MAX_LENGTH} bytes)`);
    }
    const data = new Uint8Array(dataLength);
    await readExactly(handle, data, 8 + n, where);
    return new SafetensorsFile(header, data, where);
  } finally {
    await handle.close();
  }
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

async function readExactly(
    handle: import('node:fs/promises').FileHandle, into: Uint8Array, position: number,
    where: string): Promise<void> {
  let done = 0;
  while (done < into.byteLength) {
    const { bytesRead } = await handle.read(into, done, into.byteLength - done, position + done);
    if (bytesRead === 0) {
      throw new SafetensorsError(
          `${where}: ended after ${position + done} bytes while reading ${into.byteLength} bytes at ` +
          `offset ${position} (was the file changed while it was read?)`);
    }
    done += bytesRead;
  }
}

