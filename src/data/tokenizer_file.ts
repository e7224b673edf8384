/** The tokenizer of a model folder (Node): read whichever kind it holds; write a CharTokenizer. */
import { join } from 'node:path';
import { writeFileAtomically } from '../util/atomic.js';
import { confinedPath, openArtifactFolder, pathKind, readJSONFile, readTextFile } from '../util/files.js';
import { CHAT_TEMPLATE_FILE, HFTokenizer, TOKENIZER_CONFIG_FILE } from './hf_tokenizer.js';
import type { TextTokenizer } from './text_tokenizer.js';
import { CHAR_PATTERN, CharTokenizer, TOKENIZER_FILE, TokenizerError } from './tokenizer.js';

/** The model's config.json, where generation settings such as eos_token_id live. */
const MODEL_CONFIG_FILE = 'config.json';

/** True when a parsed tokenizer.json is this package's character tokenizer (see tokenizer.ts). */
function isCharTokenizerJSON(json: unknown): boolean {
  const j = json as { model?: { type?: unknown }; pre_tokenizer?: { type?: unknown; pattern?: { Regex?: unknown } } } | null;
  return j?.model?.type === 'WordLevel' && j.pre_tokenizer?.type === 'Split' && j.pre_tokenizer.pattern?.Regex === CHAR_PATTERN;
}

/** The text of `dir`/`name` when that file exists (confined to `dir`), else undefined. */
async function optionalText(dir: string, name: string, what: string): Promise<string | undefined> {
  if (await pathKind(join(dir, name)) === 'missing') return undefined;
  return readTextFile(await confinedPath(dir, name, what), what);
}

/**
 * Reads the tokenizer of the model folder `dir`: the character tokenizer this package trains
 * tiny models with, or any Hugging Face tokenizer.json (with tokenizer_config.json,
 * chat_template.jinja and config.json's eos_token_id when the folder has them).
 *
 * ```js
 * const tok = await readTokenizer('Qwen3-30B-A3B');  // an HFTokenizer
 * tok.encode('Hello world');
 * ```
 */
export async function readTokenizer(dir: string): Promise<CharTokenizer | HFTokenizer> {
  await openArtifactFolder(dir, 'model folder');
  const path = join(dir, TOKENIZER_FILE);
  if (await pathKind(path) === 'missing') {
    throw new TokenizerError(`'${path}' is missing (the model folder needs the tokenizer it was trained with)`);
  }
  const text = await readTextFile(await confinedPath(dir, TOKENIZER_FILE, 'tokenizer'), 'tokenizer');  // a FIFO is refused, never blocks
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new TokenizerError(`'${path}' is not valid JSON: ${(e as Error).message}`);
  }
  if (isCharTokenizerJSON(json)) return CharTokenizer.fromJSON(json, `'${path}'`);
  const config = await optionalText(dir, TOKENIZER_CONFIG_FILE, 'tokenizer config');
  const chatTemplate = await optionalText(dir, CHAT_TEMPLATE_FILE, 'chat template');
  let modelEosTokenIds: unknown;
  if (await pathKind(join(dir, MODEL_CONFIG_FILE)) !== 'missing') {
    const modelConfig = await readJSONFile(await confinedPath(dir, MODEL_CONFIG_FILE, 'model config'), 'model config');
    modelEosTokenIds = (modelConfig as Record<string, unknown> | null)?.['eos_token_id'];
  }
  return HFTokenizer.fromFiles({ tokenizer: text, config, chatTemplate },
      { source: `'${dir}'`, modelEosTokenIds, parsedTokenizer: json });
}

/**
 * The files that carry `tokenizer` in a model folder, name → text: a full fine-tune saves them
 * beside its weights in the same atomic save (the HF tokenizer's own files, unchanged).
 */
export function tokenizerFiles(tokenizer: TextTokenizer): Record<string, string> {
  if (tokenizer instanceof CharTokenizer) return { [TOKENIZER_FILE]: tokenizerFileText(tokenizer) };
  if (tokenizer instanceof HFTokenizer) {
    const { tokenizer: json, config, chatTemplate } = tokenizer.files;
    return {
      [TOKENIZER_FILE]: json,
      ...(config === undefined ? {} : { [TOKENIZER_CONFIG_FILE]: config }),
      ...(chatTemplate === undefined ? {} : { [CHAT_TEMPLATE_FILE]: chatTemplate }),
    };
  }
  throw new TokenizerError('`tokenizerFiles()`: \'tokenizer\' must be a CharTokenizer or an HFTokenizer');
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
