/**
 * Atomic saves (Node): a file, or a whole multi-file artifact (an adapter folder, a checkpoint with
 * its shards, index, config and tokenizer files, a TF.js model folder), so that a process killed at
 * any instant leaves either the previous complete artifact or the new one, never a mix.
 *
 * A folder is written into a temporary folder beside the target, flushed, renamed to
 * `.<name>.next` (complete from then on), the old folder renamed to `.<name>.previous`, the new one
 * renamed to the target, and the old one removed. The only instant with no target is between the
 * last two renames; every reader opens folders through `openArtifactFolder` (files.ts), which
 * finishes such a save first. Files in the old folder that the new artifact neither writes nor
 * `owns` (a README the user put there) are carried over. Temporary names carry the writer's process
 * id, so the next save removes what a killed one left.
 */
import { constants, mkdirSync, statSync, type Stats } from 'node:fs';
import { cp, link, lstat, mkdir, mkdtemp, open, readdir, rename, rm, stat, writeFile } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { artifactSiblings, FileError, settleArtifactFolder } from './files.js';

async function fsyncPath(path: string, flags = constants.O_RDONLY): Promise<void> {
  const handle = await open(path, flags);
  try {
    await handle.sync();
  } catch (e) {
    // some file systems cannot sync a directory; the renames are still atomic there
    if ((e as NodeJS.ErrnoException).code !== 'EINVAL' && (e as NodeJS.ErrnoException).code !== 'EISDIR') throw e;
  } finally {
    await handle.close();
  }
}

/**
 * Creates `dir` and its missing parents, one level at a time. Not `mkdir(dir, {recursive: true})`:
 * Node's recursive mkdir retries forever where a parent exists but refuses children with ENOENT
 * (anything under /proc), and a save must fail there, not hang. Synchronous, so the CLI's
 * argument checks can use it too (output_folder.ts).
 *
 * ```js
 * makeFolders('out/runs/1', '`train`');
 * ```
 */
export function makeFolders(dir: string, what: string): void {
  const path = resolve(dir);
  let info: Stats | undefined;
  try {
    info = statSync(path);
  } catch {
    info = undefined;
  }
  if (info !== undefined) {
    if (!info.isDirectory()) throw new FileError(`${what}: '${path}' exists and is not a folder`);
    return;
  }
  const parent = dirname(path);
  if (parent !== path) makeFolders(parent, what);
  try {
    mkdirSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    // EEXIST: made meanwhile by someone else
    if (code !== 'EEXIST') throw new FileError(`${what}: cannot create the folder '${path}': ${code ?? (e as Error).message}`);
  }
}

async function ensureParent(target: string, what: string): Promise<string> {
  const parent = dirname(resolve(target));
  makeFolders(parent, what);
  return parent;
}

/**
 * Writes one file through a temporary file beside it and a rename.
 *
 * ```js
 * await writeFileAtomically('out/tokenizer.json', JSON.stringify(tok));
 * ```
 */
export async function writeFileAtomically(path: string, data: string | Uint8Array, what = 'save'): Promise<void> {
  const parent = await ensureParent(path, what);
  const existing = await stat(path).catch(() => null);
  if (existing !== null && !existing.isFile()) {
    throw new FileError(`${what}: '${path}' exists and is not a regular file; it is not replaced`);
  }
  await removeAbandonedTemporaries(path);
  const tmp = join(parent, `.${basename(path)}.tmp-${process.pid}-${Math.random().toString(36).slice(2)}`);
  try {
    await writeFile(tmp, data);
    await fsyncPath(tmp);
    await rename(tmp, path);
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
  await fsyncPath(parent);
}

/**
 * Removes the temporary files and folders that saves of `target` killed earlier left beside it:
 * their names carry the writer's process id, and only those of processes no longer running go
 * (a save in progress elsewhere keeps its own).
 */
async function removeAbandonedTemporaries(target: string): Promise<void> {
  const parent = dirname(resolve(target));
  const prefix = `.${basename(resolve(target))}.tmp-`;
  for (const name of await readdir(parent).catch(() => [] as string[])) {
    if (!name.startsWith(prefix)) continue;
    const pid = Number(/^(\d+)-/.exec(name.slice(prefix.length))?.[1]);
    if (Number.isInteger(pid) && pid > 0 && !isRunning(pid)) await rm(join(parent, name), { recursive: true, force: true });
  }
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';  // running, owned by another user
  }
}

export interface ArtifactFolderOptions {
  /**
   * Names of the old folder that belong to this kind of artifact and go away with it even when
   * the new one does not write them (old shards, an old index). Default: none.
   */
  owns?: (name: string) => boolean;
  /** how errors name the save, e.g. '`savePeftAdapter()`' */
  what?: string;
}

/**
 * Writes a whole folder atomically: `write(dir)` fills a fresh temporary folder, which then
 * replaces `target` (created when missing) as described in the file comment. When `write` throws,
 * the target is untouched and the temporary folder removed.
 *
 * ```js
 * await writeArtifactFolder('my-adapter', async dir => {
 *   await writeFile(join(dir, 'adapter_config.json'), json);
 *   await writeSafetensorsFile(join(dir, 'adapter_model.safetensors'), tensors);
 * }, {owns: name => name.startsWith('adapter_model.')});
 * ```
 */
export async function writeArtifactFolder(
    target: string, write: (dir: string) => Promise<void>, options: ArtifactFolderOptions = {}): Promise<void> {
  const what = options.what ?? 'save';
  if (typeof target !== 'string' || target.length === 0) {
    throw new FileError(`${what}: the folder must be a non-empty path but got ${JSON.stringify(target)}`);
  }
  const parent = await ensureParent(target, what);
  await settleArtifactFolder(target);
  const existing = await lstat(target).catch(() => null);
  if (existing !== null && !existing.isDirectory()) {
    throw new FileError(`${what}: '${target}' exists and is not a folder; it is not replaced`);
  }
  const { next, previous, tmpPrefix } = artifactSiblings(target);
  await removeAbandonedTemporaries(target);
  const tmp = await mkdtemp(`${tmpPrefix}${process.pid}-`);
  try {
    await write(tmp);
    const written = new Set(await readdir(tmp));
    if (existing !== null) await carryOver(target, tmp, written, options.owns ?? (() => false));
    for (const name of written) {
      if ((await stat(join(tmp, name))).isFile()) await fsyncPath(join(tmp, name));
    }
    await fsyncPath(tmp);
    await rm(next, { recursive: true, force: true });
    await rename(tmp, next);
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
  // from here on the new artifact is complete: a reader finishes the swap if this process dies
  if (existing !== null) {
    await rm(previous, { recursive: true, force: true });
    await rename(target, previous);
  }
  await rename(next, target);
  await fsyncPath(parent);
  await rm(previous, { recursive: true, force: true });
}

/** Links (or copies) the old folder's entries that the new artifact neither wrote nor owns. */
async function carryOver(from: string, to: string, written: Set<string>, owns: (name: string) => boolean): Promise<void> {
  for (const name of await readdir(from)) {
    if (written.has(name) || owns(name)) continue;
    await linkTree(join(from, name), join(to, name));
  }
}

/**
 * Hard-links a file, or a folder's files one by one into new folders: the carried-over entry costs
 * a link per file, not a copy of its bytes (a training run's checkpoint folders beside its final
 * save can be many GB). Copies where a link is refused (another file system); links as links.
 */
async function linkTree(source: string, dest: string): Promise<void> {
  const info = await lstat(source);
  if (info.isDirectory()) {
    await mkdir(dest);
    for (const name of await readdir(source)) await linkTree(join(source, name), join(dest, name));
  } else if (info.isFile()) {
    await link(source, dest).catch(() => cp(source, dest));
  } else {
    await cp(source, dest, { verbatimSymlinks: true });
  }
}
