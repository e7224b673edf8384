/**
 * The check every command that writes an artifact folder runs before any work (loading,
 * training, converting), so that a bad output path costs nothing and nothing is overwritten by
 * accident: the folder's parent exists or is created, a save beside it can be made (a temporary
 * folder is created and removed: a path under /proc fails here at once), a model or adapter
 * already in it is replaced only when asked, and it is never one of the run's input folders nor
 * inside one (real paths, so a symbolic link does not hide it). Synchronous, so yargs' `check`
 * can run it and report a bad path as a usage error.
 */
import { mkdtempSync, readdirSync, realpathSync, rmdirSync, statSync, type Stats } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { makeFolders } from './atomic.js';
import { describeValue } from './describe.js';
import { artifactSiblings, FileError, isInside } from './files.js';

/**
 * True for the names of a model's or an adapter's files (HF checkpoint, TF.js folder, PEFT
 * adapter, tokenizer): a folder holding one already holds an artifact.
 */
export function isModelOrAdapterFile(name: string): boolean {
  return ['config.json', 'model.json', 'adapter_config.json', 'tokenizer.json', 'model.safetensors.index.json']
      .includes(name) || name.endsWith('.safetensors') || name.endsWith('.bin');
}

export interface OutputFolderCheck {
  /** how messages name the output, e.g. '--out' */
  name: string;
  /** replace a model or adapter that is in the folder already */
  overwrite: boolean;
  /** the folders the run reads, by how messages name them ('--model'); undefined ones are skipped */
  inputs?: Record<string, string | undefined>;
}

/** The real path `path` has or would have: its nearest existing ancestor resolved, the rest appended. */
function realPathOf(path: string): string {
  const missing: string[] = [];
  let at = resolve(path);
  for (;;) {
    try {
      return join(realpathSync(at), ...missing.reverse());
    } catch {
      const parent = dirname(at);
      if (parent === at) return resolve(path);
      missing.push(basename(at));
      at = parent;
    }
  }
}

function statOrNull(path: string): Stats | null {
  try {
    return statSync(path);
  } catch {
    return null;
  }
}

/**
 * Checks that `out` can receive an artifact folder (see the file comment); throws a FileError
 * naming the path otherwise. Creates the parent folders of `out`, not `out` itself.
 *
 * ```js
 * checkOutputFolder('runs/adapter', {name: '--out', overwrite: false, inputs: {'--model': 'my-model'}});
 * ```
 */
export function checkOutputFolder(out: unknown, check: OutputFolderCheck): void {
  const { name } = check;
  if (typeof out !== 'string' || out.length === 0 || out.includes('\0')) {
    throw new FileError(`${name} must be a folder path but got ${describeValue(out)}`);
  }
  const realOut = realPathOf(out);
  for (const [inputName, input] of Object.entries(check.inputs ?? {})) {
    if (input === undefined) continue;
    const realInput = realPathOf(input);
    if (isInside(realInput, realOut)) {
      throw new FileError(`${name}: '${out}' is ${realInput === realOut ? '' : 'inside '}the ${inputName} folder ` +
          `'${input}', which the run reads; write somewhere else`);
    }
  }
  const info = statOrNull(out);
  if (info !== null) {
    if (!info.isDirectory()) throw new FileError(`${name}: '${out}' exists and is not a folder`);
    const held = readdirSync(out).filter(isModelOrAdapterFile).sort();
    if (held.length > 0 && !check.overwrite) {
      throw new FileError(`${name}: '${out}' already holds a model or adapter (${held.join(', ')}); ` +
          'pass --overwrite to replace it');
    }
  }
  makeFolders(dirname(realOut), name);
  // the save writes a temporary folder beside `out` and renames it: make sure that works now
  let probe: string;
  try {
    probe = mkdtempSync(artifactSiblings(realOut).tmpPrefix);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new FileError(`${name}: cannot write in '${dirname(realOut)}' (for '${out}'): ${code ?? (e as Error).message}`);
  }
  rmdirSync(probe);
}

/**
 * checkOutputFolder for an argument check that reports problems as text (yargs' `.check`): the
 * FileError's message, or true.
 *
 * ```js
 * outputFolderProblem(argv.out, {name: '--out', overwrite: argv.overwrite, inputs: {'--model': argv.model}});
 * ```
 */
export function outputFolderProblem(out: unknown, check: OutputFolderCheck): string | true {
  try {
    checkOutputFolder(out, check);
  } catch (e) {
    if (e instanceof FileError) return e.message;
    throw e;
  }
  return true;
}
