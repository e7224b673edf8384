/** tokenizer.json in a model folder (Node): read and write a CharTokenizer. */
import { join } from 'node:path';
import { writeFileAtomically } from '../util/atomic.js';
import { openArtifactFolder, pathKind, readTextFile } from '../util/files.js';
import { CharTokenizer, TOKENIZER_FILE, TokenizerError } from './tokenizer.js';

/**
 * Reads `dir`/tokenizer.json.
 *
 * ```js
 * const tok = await readTokenizer('examples/models/tala-moe');
 * ```
 */
export async function readTokenizer(dir: string): Promise<CharTokenizer> {
  await openArtifactFolder(dir, 'model folder');
  const path = join(dir, TOKENIZER_FILE);
  if (await pathKind(path) === 'missing') {
    throw new TokenizerError(`'${path}' is missing (the model folder needs the tokenizer it was trained with)`);
  }
  const text = await readTextFile(path, 'tokenizer');  // a folder or a FIFO is refused, never blocks
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new TokenizerError(`'${path}' is not valid JSON: ${(e as Error).message}`);
  }
  return CharTokenizer.fromJSON(json, `'${path}'`);
}

/**
 * Writes `dir`/tokenizer.json (the folder is created when missing) through a temporary file and a
 * rename, so a reader finds the old tokenizer or the new one, never a truncated file.
 *
 * ```js
 * await writeTokenizer('my-model', CharTokenizer.fromText(text));
 * ```
 */
export async function writeTokenizer(dir: string, tokenizer: CharTokenizer): Promise<void> {
  await writeFileAtomically(join(dir, TOKENIZER_FILE), tokenizerFileText(tokenizer), '`writeTokenizer()`');
}

/** The text of tokenizer.json for `tokenizer` (what writeTokenizer writes). */
export function tokenizerFileText(tokenizer: CharTokenizer): string {
  return `${JSON.stringify(tokenizer.toJSON(), null, 2)}\n`;
}
