/**
 * A character-level tokenizer: one token per Unicode code point seen in the text it was built
 * from, plus an unknown token at id 0 for anything else. Its tokenizer.json uses the layout of
 * Hugging Face `tokenizers` files, restricted to one shape: a WordLevel model over single
 * characters, a pre-tokenizer that isolates every character, and a Fuse decoder:
 *
 *   {"version": "1.0", "truncation": null, "padding": null,
 *    "added_tokens": [{"id": 0, "content": "<unk>", ..., "special": true}],
 *    "normalizer": null,
 *    "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[\\s\\S]"}, "behavior": "Isolated", "invert": false},
 *    "post_processor": null, "decoder": {"type": "Fuse"},
 *    "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "\n": 1, " ": 2, ...}, "unk_token": "<unk>"}}
 *
 * Ids are 0..n-1: the unknown token, then the characters by code point. This file has no Node
 * dependency (browsers use it too); tokenizer_file.ts reads and writes the file.
 */

import { MoELoraError } from '../errors.js';
import type { TextTokenizer } from './text_tokenizer.js';
export const TOKENIZER_FILE = 'tokenizer.json';
export const UNKNOWN_TOKEN = '<unk>';
/** The pre-tokenizer pattern: every code point its own piece. */
export const CHAR_PATTERN = '[\\s\\S]';

/** A tokenizer file that cannot be read or is not a character tokenizer of the layout above. */
export class TokenizerError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'TokenizerError';
    Object.setPrototypeOf(this, TokenizerError.prototype);
  }
}

/** The tokenizer.json object (the HF `tokenizers` layout; see the file comment). */
export interface CharTokenizerJSON {
  version: '1.0';
  truncation: null;
  padding: null;
  added_tokens: Array<{
    id: number; content: string; single_word: boolean; lstrip: boolean; rstrip: boolean; normalized: boolean; special: boolean;
  }>;
  normalizer: null;
  pre_tokenizer: { type: 'Split'; pattern: { Regex: string }; behavior: 'Isolated'; invert: false };
  post_processor: null;
  decoder: { type: 'Fuse' };
  model: { type: 'WordLevel'; vocab: Record<string, number>; unk_token: string };
}

const codePoint = (c: string) => c.codePointAt(0)!;

/** How a character is shown in messages: 'é' (U+00E9), or just (U+0009) when not printable. */
export function describeChar(c: string): string {
  const hex = codePoint(c).toString(16).toUpperCase().padStart(4, '0');
  const shown = /[\p{L}\p{N}\p{P}\p{S}]/u.test(c) ? `'${c}' ` : '';
  return `${shown}(U+${hex})`;
}

export class CharTokenizer implements TextTokenizer {
  /** no BOS, EOS or padding: a character tokenizer trains on running text */
  readonly bosTokenId = null;
  readonly eosTokenIds: readonly number[] = [];
  readonly padTokenId = null;
  /** tokens[id]: the unknown token at 0, then single characters */
  readonly tokens: readonly string[];
  private readonly ids: Map<string, number>;

  private constructor(tokens: string[]) {
    this.tokens = tokens;
    this.ids = new Map(tokens.map((t, i) => [t, i]));
  }

  /**
   * The tokenizer of every code point in `text`.
   *
   * ```js
   * const tok = CharTokenizer.fromText('la miro vidi.\n');
   * tok.decode(tok.encode('miro'));  // 'miro'
   * ```
   */
  static fromText(text: string): CharTokenizer {
    if (typeof text !== 'string' || text.length === 0) {
      throw new TokenizerError('`CharTokenizer.fromText()`: \'text\' must be a non-empty string');
    }
    const chars = [...new Set(text)].sort((a, b) => codePoint(a) - codePoint(b));
    return new CharTokenizer([UNKNOWN_TOKEN, ...chars]);
  }

  /**
   * The tokenizer a parsed tokenizer.json holds; `source` names it in messages. Anything but a
   * character-level WordLevel tokenizer (the layout in the file comment) is an error listing
   * every problem.
   */
  static fromJSON(json: unknown, source = 'tokenizer JSON'): CharTokenizer {
    const j = json as Partial<CharTokenizerJSON> | null;
    if (j === null || typeof j !== 'object' || Array.isArray(j)) {
      throw new TokenizerError(`${source}: must be a JSON object (a tokenizers file with a character-level WordLevel model)`);
    }
    const problems: string[] = [];
    const model = j.model;
    if (model == null || model.type !== 'WordLevel') {
      problems.push(`"model.type" must be "WordLevel" but is ${JSON.stringify(model?.type)}`);
    }
    const pre = j.pre_tokenizer;
    if (pre?.type !== 'Split' || pre.pattern?.Regex !== CHAR_PATTERN || pre.behavior !== 'Isolated' || pre.invert) {
      problems.push(`"pre_tokenizer" must split every character ({"type": "Split", "pattern": {"Regex": ` +
          `${JSON.stringify(CHAR_PATTERN)}}, "behavior": "Isolated", "invert": false}) but is ${JSON.stringify(pre)}`);
    }
    if (j.normalizer != null) problems.push(`"normalizer" must be null but is ${JSON.stringify(j.normalizer)}`);
    const unk = model?.unk_token;
    if (typeof unk !== 'string' || unk.length === 0) problems.push(`"model.unk_token" must be a non-empty string but is ${JSON.stringify(unk)}`);
    const vocab = model?.vocab;
    const tokens: string[] = [];
    if (vocab == null || typeof vocab !== 'object' || Array.isArray(vocab)) {
      problems.push(`"model.vocab" must be an object {token: id} but is ${JSON.stringify(vocab)}`);
    } else {
      const entries = Object.entries(vocab);
      for (const [token, id] of entries) {
        if (!Number.isInteger(id) || id < 0 || id >= entries.length) {
          problems.push(`"model.vocab" gives ${JSON.stringify(token)} the id ${JSON.stringify(id)}, not one of 0..${entries.length - 1}`);
        } else if (tokens[id] !== undefined) {
          problems.push(`"model.vocab" gives the id ${id} to both ${JSON.stringify(tokens[id])} and ${JSON.stringify(token)}`);
        } else {
          tokens[id] = token;
        }
      }
      if (typeof unk === 'string' && vocab[unk] !== 0) {
        problems.push(`the unknown token ${JSON.stringify(unk)} must have id 0 but has ${JSON.stringify(vocab[unk])}`);
      }
      tokens.forEach((t, id) => {
        if (id > 0 && [...t].length !== 1) problems.push(`token ${id} must be a single character but is ${JSON.stringify(t)}`);
      });
      if (entries.length < 2) problems.push('"model.vocab" must hold the unknown token and at least one character');
    }
    if (problems.length > 0) throw new TokenizerError(`${source}: ${problems.join('; ')}`);
    return new CharTokenizer(tokens);
  }

  toJSON(): CharTokenizerJSON {
    return {
      version: '1.0',
      truncation: null,
      padding: null,
      added_tokens: [{
        id: 0, content: this.tokens[0], single_word: false, lstrip: false, rstrip: false, normalized: false, special: true,
      }],
      normalizer: null,
      pre_tokenizer: { type: 'Split', pattern: { Regex: CHAR_PATTERN }, behavior: 'Isolated', invert: false },
      post_processor: null,
      decoder: { type: 'Fuse' },
      model: { type: 'WordLevel', vocab: Object.fromEntries(this.tokens.map((t, i) => [t, i])), unk_token: this.tokens[0] },
    };
  }

  get vocabSize(): number {
    return this.tokens.length;
  }

  /** The ids of `text`'s code points; a character outside the vocabulary becomes id 0. */
  encode(text: string): Int32Array {
    const chars = [...text];
    const out = new Int32Array(chars.length);
    chars.forEach((c, i) => { out[i] = this.ids.get(c) ?? 0; });
    return out;
  }

  /** The distinct characters of `text` outside the vocabulary, in order of appearance. */
  unknownChars(text: string): string[] {
    return [...new Set(text)].filter(c => !this.ids.has(c) || this.ids.get(c) === 0);
  }

  /** The text of `ids`; the unknown token decodes as U+FFFD. */
  decode(ids: ArrayLike<number>): string {
    let out = '';
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (!Number.isInteger(id) || id < 0 || id >= this.tokens.length) {
        throw new TokenizerError(`\`CharTokenizer.decode()\`: id ${id} at position ${i} is not in [0, ${this.tokens.length})`);
      }
      out += id === 0 ? '\uFFFD' : this.tokens[id];
    }
    return out;
  }
}
