/**
 * Reading files named by other files, safely (Node). A path that comes from a file (a TF.js
 * weights manifest, an HF shard index, a folder's own file names) is confined to the folder it was
 * named from, symbolic links resolved; only regular files are read (a FIFO or a device would block
 * or never end); sizes are checked against what the caller expects before a byte is read. One
 * helper for the whole package, so every loader behaves the same.
 */
import { constants } from 'node:fs';
import { lstat, open, readdir, realpath, rename, stat, type FileHandle } from 'node:fs/promises';
import { basename, dirname, isAbsolute, join, relative, resolve, sep } from 'node:path';
import { MoELoraError } from '../errors.js';
import { describeValue } from './describe.js';

/** A path that is missing, outside its folder, not a regular file, or not of the expected size. */
export class FileError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'FileError';
    Object.setPrototypeOf(this, FileError.prototype);
  }
}

/** The largest JSON or text file read whole (config.json, tokenizer.json, manifests). */
export const MAX_TEXT_FILE_BYTES = 1 << 30;

function kindOf(info: { isDirectory(): boolean; isFIFO(): boolean; isCharacterDevice(): boolean;
    isBlockDevice(): boolean; isSocket(): boolean }): string {
  if (info.isDirectory()) return 'a directory';
  if (info.isFIFO()) return 'a FIFO (named pipe)';
  if (info.isCharacterDevice() || info.isBlockDevice()) return 'a device';
  if (info.isSocket()) return 'a socket';
  return 'not a regular file';
}

/**
 * `name` (a relative path read from a file in `dir`) resolved inside `dir`: absolute paths, `..`
 * that leaves the folder, and symbolic links that point outside it are refused. The file must
 * exist; the returned path is the real one.
 *
 * ```js
 * await confinedPath('./model', 'group1-shard1of2.bin', "weightsManifest path of 'model/model.json'");
 * ```
 */
export async function confinedPath(dir: string, name: unknown, what: string): Promise<string> {
  if (typeof name !== 'string' || name.length === 0 || name.includes('\0')) {
    throw new FileError(`${what} must be a file name relative to '${dir}' but is ${describeValue(name)}`);
  }
  if (isAbsolute(name)) {
    throw new FileError(`${what} must be relative to its folder '${dir}' but is the absolute path '${name}'`);
  }
  const realDir = await realpath(dir).catch(() => {
    throw new FileError(`${what}: the folder '${dir}' does not exist`);
  });
  const joined = resolve(realDir, name);
  if (!isInside(realDir, joined)) {
    throw new FileError(`${what} '${name}' leads outside its folder '${dir}'`);
  }
  const real = await realpath(joined).catch((e: NodeJS.ErrnoException) => {
    throw new FileError(e.code === 'ENOENT' ? `${what} '${join(dir, name)}' does not exist` :
      `${what} '${join(dir, name)}' cannot be resolved: ${e.message}`);
  });
  if (!isInside(realDir, real)) {
    throw new FileError(`${what} '${join(dir, name)}' is a link to '${real}', outside its folder '${dir}'`);
  }
  return real;
}

/** True when `path` is `dir` itself or lies under it (both absolute and resolved). */
export function isInside(dir: string, path: string): boolean {
  const rel = relative(dir, path);
  return rel === '' || (!rel.startsWith(`..${sep}`) && rel !== '..' && !isAbsolute(rel));
}

export interface OpenRegularFileOptions {
  /** the size the file must have (from a header or a manifest) */
  expectedSize?: number;
  /** the largest size accepted */
  maxBytes?: number;
}

/**
 * Opens `path` for reading if it is a regular file, without blocking on a FIFO (the open is
 * non-blocking and the type is checked on the open handle, so a swapped-in FIFO is refused too).
 * The caller closes the handle.
 */
export async function openRegularFile(
    path: string, what: string, options: OpenRegularFileOptions = {}): Promise<{ handle: FileHandle; size: number }> {
  let handle: FileHandle;
  try {
    handle = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  } catch (e) {
    const err = e as NodeJS.ErrnoException;
    throw new FileError(err.code === 'ENOENT' ? `${what} '${path}' does not exist` :
      `${what} '${path}' cannot be opened: ${err.code ?? err.message}`);
  }
  try {
    const info = await handle.stat();
    if (!info.isFile()) throw new FileError(`${what} '${path}' is ${kindOf(info)}, not a regular file`);
    if (options.expectedSize !== undefined && info.size !== options.expectedSize) {
      throw new FileError(`${what} '${path}' is ${info.size} bytes but must be ${options.expectedSize}`);
    }
    if (options.maxBytes !== undefined && info.size > options.maxBytes) {
      throw new FileError(`${what} '${path}' is ${info.size} bytes, more than the ${options.maxBytes} accepted`);
    }
    return { handle, size: info.size };
  } catch (e) {
    await handle.close();
    throw e;
  }
}

/**
 * The bytes of a regular file (see openRegularFile), read whole; `maxBytes` defaults to
 * MAX_TEXT_FILE_BYTES.
 */
export async function readRegularFile(path: string, what: string, options: OpenRegularFileOptions = {}): Promise<Uint8Array> {
  const { handle, size } = await openRegularFile(path, what, { maxBytes: MAX_TEXT_FILE_BYTES, ...options });
  try {
    const bytes = new Uint8Array(size);
    await readFully(handle, bytes, 0, `${what} '${path}'`);
    return bytes;
  } finally {
    await handle.close();
  }
}

/** A regular UTF-8 text file, read whole. */
export async function readTextFile(path: string, what: string, options: OpenRegularFileOptions = {}): Promise<string> {
  return Buffer.from(await readRegularFile(path, what, options)).toString('utf8');
}

/** Parses a regular JSON file; an unreadable or malformed one is a FileError naming it. */
export async function readJSONFile(path: string, what: string): Promise<unknown> {
  return parseJSONText(await readTextFile(path, what), path, what);
}

/** JSON.parse of the text of the file at `path`; malformed JSON is a FileError naming the file. */
export function parseJSONText(text: string, path: string, what: string): unknown {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new FileError(`${what} '${path}' is not valid JSON: ${(e as Error).message}`);
  }
}

/** Fills `into` from `position`; a file that ends first (changed while read) is a FileError. */
export async function readFully(handle: FileHandle, into: Uint8Array, position: number, where: string): Promise<void> {
  let done = 0;
  while (done < into.byteLength) {
    const { bytesRead } = await handle.read(into, done, into.byteLength - done, position + done);
    if (bytesRead === 0) {
      throw new FileError(`${where} ended after ${position + done} bytes while ${into.byteLength} bytes at offset ` +
          `${position} were read (was it changed while it was read?)`);
    }
    done += bytesRead;
  }
}

/** True when `path` is a regular file (a stat, no open: safe on FIFOs). */
export async function isRegularFile(path: string): Promise<boolean> {
  return (await stat(path).catch(() => null))?.isFile() ?? false;
}

/** What is at `path`: 'missing', 'file', 'directory' or the kind of a special file. */
export async function pathKind(path: string): Promise<'missing' | 'file' | 'directory' | string> {
  const info = await stat(path).catch(() => null);
  if (info === null) return 'missing';
  if (info.isFile()) return 'file';
  if (info.isDirectory()) return 'directory';
  return kindOf(info);
}

/**
 * Checks that `dir` is a folder an artifact can be read from, after finishing a save that was
 * interrupted at its last step (see writeArtifactFolder in atomic.ts): a reader then sees the new
 * artifact, as the interrupted writer meant. Returns `dir`.
 */
export async function openArtifactFolder(dir: unknown, what: string): Promise<string> {
  if (typeof dir !== 'string' || dir.length === 0) {
    throw new FileError(`${what} must be a folder path but got ${describeValue(dir)}`);
  }
  await settleArtifactFolder(dir);
  const kind = await pathKind(dir);
  if (kind === 'missing') throw new FileError(`${what} '${dir}' does not exist`);
  if (kind !== 'directory') throw new FileError(`${what} '${dir}' is ${kind === 'file' ? 'a file' : kind}, not a folder`);
  return dir;
}

/** The sibling names the atomic folder save uses for `target` (atomic.ts). */
export function artifactSiblings(target: string): { next: string; previous: string; tmpPrefix: string } {
  const parent = dirname(resolve(target));
  const name = basename(resolve(target));
  return {
    next: join(parent, `.${name}.next`),
    previous: join(parent, `.${name}.previous`),
    tmpPrefix: join(parent, `.${name}.tmp-`),
  };
}

/**
 * Finishes a folder save that was killed between moving the old folder aside and moving the new
 * one in: `target` is missing and its complete successor waits beside it. Anything else is left
 * as it is.
 */
export async function settleArtifactFolder(target: string): Promise<void> {
  const { next } = artifactSiblings(target);
  if (await lstat(target).then(() => true, () => false)) return;
  const waiting = await stat(next).catch(() => null);
  if (waiting?.isDirectory()) {
    await rename(next, target).catch((e: NodeJS.ErrnoException) => {
      if (e.code !== 'ENOENT' && e.code !== 'EEXIST' && e.code !== 'ENOTEMPTY') throw e;  // another reader did it
    });
  }
}

/** The names in a folder ([] when it does not exist). */
export async function folderEntries(dir: string): Promise<string[]> {
  return readdir(dir).catch(() => []);
}
