/**
 * A Hugging Face tokenizer (any tokenizer.json: BPE, Unigram, WordPiece, ...) run by
 * @huggingface/tokenizers, with what tokenizer_config.json adds as transformers reads it: the
 * special tokens (bos/eos/pad/unk, a string or an {content} object), `add_bos_token` /
 * `add_eos_token`, and the chat template. No Node dependency (browsers use it too);
 * tokenizer_file.ts reads the files of a folder.
 */
import { Tokenizer } from '@huggingface/tokenizers';
import { describeValue } from '../util/describe.js';
import { ChatTemplate, type ChatMessage, type ChatTemplateOptions } from './chat_template.js';
import type { DecodeOptions, EncodeOptions, TextTokenizer } from './text_tokenizer.js';
import { TokenizerError } from './tokenizer.js';

export const TOKENIZER_CONFIG_FILE = 'tokenizer_config.json';
/** Where transformers v5 saves a chat template (it wins over tokenizer_config.json's chat_template). */
export const CHAT_TEMPLATE_FILE = 'chat_template.jinja';

/** The texts an HFTokenizer was built from, kept so a full fine-tune saves them unchanged beside its weights. */
export interface HFTokenizerFiles {
  /** tokenizer.json */
  tokenizer: string;
  /** tokenizer_config.json, when there is one */
  config?: string;
  /** chat_template.jinja, when there is one */
  chatTemplate?: string;
}

export interface HFTokenizerOptions {
  /** names the tokenizer in messages (the folder) */
  source?: string;
  /** the model's config.json eos_token_id (a number or a list): generation stops on these too */
  modelEosTokenIds?: unknown;
  /** tokenizer.json already parsed (by a loader that looked at it first): not parsed again */
  parsedTokenizer?: unknown;
}

const isObject = (v: unknown): v is Record<string, unknown> => v !== null && typeof v === 'object' && !Array.isArray(v);

/** A special token of tokenizer_config.json: a string, an AddedToken object {content}, or null. */
function tokenContent(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (isObject(value) && typeof value['content'] === 'string') return value['content'];
  return null;
}

/** tokenizer_config.json's chat_template: a string, or a list of {name, template} (the 'default' one). */
function chatTemplateText(value: unknown): string | null {
  if (typeof value === 'string') return value;
  if (Array.isArray(value)) {
    const found = value.find(t => isObject(t) && t['name'] === 'default');
    return found !== undefined && typeof found['template'] === 'string' ? found['template'] : null;
  }
  return null;
}

export class HFTokenizer implements TextTokenizer {
  readonly vocabSize: number;
  readonly bosTokenId: number | null;
  readonly eosTokenIds: readonly number[];
  readonly padTokenId: number | null;
  /** the special token strings the chat template sees (bos_token, eos_token, unk_token, pad_token) */
  readonly specialTokens: Readonly<Record<string, string>>;
  /** null when neither tokenizer_config.json nor chat_template.jinja has one */
  readonly chatTemplate: ChatTemplate | null;
  private readonly tokenizer: Tokenizer;
  private readonly addBos: boolean;
  private readonly addEos: boolean;
  private readonly source: string;

  private constructor(readonly files: HFTokenizerFiles, options: HFTokenizerOptions) {
    const source = this.source = options.source ?? 'tokenizer';
    const json = options.parsedTokenizer ?? parseJSON(files.tokenizer, `${source}: tokenizer.json`);
    const config = files.config === undefined ? {} : parseJSON(files.config, `${source}: ${TOKENIZER_CONFIG_FILE}`);
    if (!isObject(json) || !isObject(json['model']) || typeof json['model']['type'] !== 'string') {
      throw new TokenizerError(`${source}: tokenizer.json must be a tokenizers file (an object with "model": {"type": ...}) ` +
          `but its "model" is ${describeValue(isObject(json) ? json['model'] : json)}`);
    }
    if (!isObject(config)) throw new TokenizerError(`${source}: ${TOKENIZER_CONFIG_FILE} must hold an object but holds ${describeValue(config)}`);
    try {
      this.tokenizer = new Tokenizer(json, config);
    } catch (e) {
      throw new TokenizerError(`${source}: @huggingface/tokenizers cannot build the "${json['model']['type']}" tokenizer: ${(e as Error).message}`);
    }
    const vocab = this.tokenizer.get_vocab(true);
    let maxId = -1;
    for (const id of vocab.values()) maxId = Math.max(maxId, id);
    if (maxId < 0) throw new TokenizerError(`${source}: tokenizer.json has an empty vocabulary`);
    this.vocabSize = maxId + 1;

    const specialTokens: Record<string, string> = {};
    const idOf = (key: string): number | null => {
      const content = tokenContent(config[key]);
      if (content === null) return null;
      specialTokens[key] = content;
      const id = this.tokenizer.token_to_id(content);
      if (id === undefined) throw new TokenizerError(`${source}: ${TOKENIZER_CONFIG_FILE} names ${key} ${JSON.stringify(content)}, which is not in the vocabulary`);
      return id;
    };
    this.bosTokenId = idOf('bos_token');
    const eos = idOf('eos_token');
    this.padTokenId = idOf('pad_token');
    idOf('unk_token');
    this.specialTokens = specialTokens;
    this.eosTokenIds = [...new Set([...(eos === null ? [] : [eos]), ...modelEos(options.modelEosTokenIds, this.vocabSize, source)])];
    // transformers' Llama-style tokenizers rebuild the post-processor from add_bos_token / add_eos_token, so BOS
    // and EOS come once, before and after every text; @huggingface/tokenizers only runs the file's post-processor:
    // add what it does not already add
    const framed = this.tokenizer.encode('', { add_special_tokens: true }).ids;
    this.addBos = config['add_bos_token'] === true && this.bosTokenId !== null && framed[0] !== this.bosTokenId;
    this.addEos = config['add_eos_token'] === true && eos !== null && framed[framed.length - 1] !== eos;
    const template = files.chatTemplate ?? chatTemplateText(config['chat_template']);
    this.chatTemplate = template === null ? null : new ChatTemplate(template, specialTokens, source);
  }

  /**
   * The tokenizer of a tokenizer.json text and its tokenizer_config.json (and chat_template.jinja)
   * texts; readTokenizer(dir) reads them from a folder.
   *
   * ```js
   * const tok = HFTokenizer.fromFiles({tokenizer: await (await fetch(url + '/tokenizer.json')).text(),
   *     config: await (await fetch(url + '/tokenizer_config.json')).text()});
   * tok.encode('Hello world');  // Int32Array [9707, 1879]
   * ```
   */
  static fromFiles(files: HFTokenizerFiles, options: HFTokenizerOptions = {}): HFTokenizer {
    if (!isObject(files) || typeof files.tokenizer !== 'string') {
      throw new TokenizerError(`\`HFTokenizer.fromFiles()\`: 'files.tokenizer' must be the text of tokenizer.json but is ` +
          `${describeValue(isObject(files) ? files.tokenizer : files)}`);
    }
    return new HFTokenizer(files, options);
  }

  /** The ids of `text`, with the special tokens transformers adds unless `addSpecialTokens` is false. */
  encode(text: string, options: EncodeOptions = {}): Int32Array {
    if (typeof text !== 'string') throw new TokenizerError(`\`HFTokenizer.encode()\`: 'text' must be a string but is ${describeValue(text)}`);
    const special = options.addSpecialTokens !== false;
    const ids = this.tokenizer.encode(text, { add_special_tokens: special }).ids;
    if (special && this.addBos) ids.unshift(this.bosTokenId!);
    if (special && this.addEos) ids.push(this.eosTokenIds[0]);
    return Int32Array.from(ids);
  }

  /** The text of `ids`. */
  decode(ids: ArrayLike<number>, options: DecodeOptions = {}): string {
    const list = Array.from(ids ?? [], Number);
    list.forEach((id, i) => {
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) {
        throw new TokenizerError(`\`HFTokenizer.decode()\`: id ${id} at position ${i} is not in [0, ${this.vocabSize})`);
      }
    });
    if (list.length === 0) return '';  // @huggingface/tokenizers refuses an empty list
    return this.tokenizer.decode(list, { skip_special_tokens: options.skipSpecialTokens === true });
  }

  /** The token string of `id` (BPE pieces as stored, 'Ġworld'), undefined when the id is not in the vocabulary. */
  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }

  /**
   * The chat prompt of `messages` as transformers' apply_chat_template(tokenize=False) renders it.
   *
   * ```js
   * tok.applyChatTemplate([{role: 'user', content: 'Hi'}], {addGenerationPrompt: true});
   * ```
   */
  applyChatTemplate(messages: ChatMessage[], options: ChatTemplateOptions = {}): string {
    if (this.chatTemplate === null) {
      throw new TokenizerError(`${this.source}: the tokenizer has no chat template (no "chat_template" in ` +
          `${TOKENIZER_CONFIG_FILE} and no ${CHAT_TEMPLATE_FILE})`);
    }
    return this.chatTemplate.render(messages, options);
  }

  /** The ids of the rendered chat prompt (the template writes the special tokens: none are added, as transformers does). */
  encodeChat(messages: ChatMessage[], options: ChatTemplateOptions = {}): Int32Array {
    return this.encode(this.applyChatTemplate(messages, options), { addSpecialTokens: false });
  }
}

function parseJSON(text: string, what: string): unknown {
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new TokenizerError(`${what} is not valid JSON: ${(e as Error).message}`);
  }
}

/** config.json's eos_token_id: absent, one id or a list of ids. */
function modelEos(value: unknown, vocabSize: number, source: string): number[] {
  if (value === undefined || value === null) return [];
  const ids = Array.isArray(value) ? value : [value];
  for (const id of ids) {
    if (!Number.isInteger(id) || id < 0 || id >= vocabSize) {
      throw new TokenizerError(`${source}: config.json's eos_token_id must be an id in [0, ${vocabSize}) or a list of them but is ${describeValue(value)}`);
    }
  }
  return ids as number[];
}
