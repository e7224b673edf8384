/**
 * `tfjs-moe-lora tokenize --model DIR (--text T | --chat FILE) [--json]`: the ids the model
 * folder's tokenizer gives a text, or a chat (a JSON file with `messages`) rendered by its chat
 * template, so users can check what training and generation will see.
 */
import type { ArgumentsCamelCase, Argv } from 'yargs';
import type { ChatMessage } from '../../data/chat_template.js';
import { HFTokenizer } from '../../data/hf_tokenizer.js';
import { CharTokenizer, TokenizerError } from '../../data/tokenizer.js';
import { readTokenizer } from '../../data/tokenizer_file.js';
import { readJSONFile } from '../../util/files.js';

interface TokenizeArgs {
  model: string;
  text?: string;
  chat?: string;
  generationPrompt: boolean;
  specialTokens: boolean;
  json: boolean;
}

/** What `tokenize --json` prints. */
export interface TokenizeReport {
  /** 'hf' (a tokenizer.json run by @huggingface/tokenizers) or 'char' (this package's character tokenizer) */
  tokenizer: 'hf' | 'char';
  /** the text that was encoded: --text, or the chat rendered by the chat template */
  text: string;
  ids: number[];
  /** the vocabulary entry of each id */
  tokens: string[];
  vocabSize: number;
}

export const command = 'tokenize';
export const describe = "Print the ids a model folder's tokenizer gives a text or a chat (rendered by its chat template)";

export function builder(yargs: Argv): Argv<TokenizeArgs> {
  return yargs
      .option('model', {
        type: 'string', demandOption: true, requiresArg: true,
        describe: 'model folder with tokenizer.json (and tokenizer_config.json for special tokens and the chat template)',
      })
      .option('text', { type: 'string', requiresArg: true, describe: 'the text to encode' })
      .option('chat', {
        type: 'string', requiresArg: true,
        describe: 'a JSON file {"messages": [{"role", "content"}, ...]} (or the array alone) to render with the chat template and encode',
      })
      .option('generation-prompt', {
        type: 'boolean', default: false, describe: 'with --chat: end with the opening of an assistant turn, as for generation',
      })
      .option('special-tokens', {
        type: 'boolean', default: true, describe: 'with --text: add the special tokens the tokenizer adds (BOS...); --no-special-tokens leaves them out',
      })
      .option('json', { type: 'boolean', default: false, describe: 'print one JSON object {tokenizer, text, ids, tokens, vocabSize}' })
      .conflicts('text', 'chat')
      .check(argv => {
        if (argv.text === undefined && argv.chat === undefined) return 'give --text or --chat';
        if (argv['generation-prompt'] === true && argv.chat === undefined) return '--generation-prompt needs --chat';
        return true;
      })
      .example('$0 tokenize --model ./Qwen3-30B-A3B --text "Hello world"', '')
      .example('$0 tokenize --model ./Qwen3-30B-A3B --chat chat.json --generation-prompt --json', '')
      .strict() as unknown as Argv<TokenizeArgs>;
}

/** The messages of a --chat file: {messages: [...]} or the array itself (checked by the template). */
export async function readChat(path: string): Promise<unknown> {
  const json = await readJSONFile(path, '--chat file');
  if (Array.isArray(json)) return json;
  if (json !== null && typeof json === 'object' && 'messages' in json) return (json as { messages: unknown }).messages;
  throw new TokenizerError(`--chat file '${path}' must hold {"messages": [...]} or an array of messages`);
}

/**
 * The ids of --text or --chat under the tokenizer of `argv.model`.
 *
 * ```js
 * const report = await tokenizeReport({model: './Qwen3-30B-A3B', text: 'Hello world'});
 * report.ids;  // [9707, 1879]
 * ```
 */
export async function tokenizeReport(argv: Partial<TokenizeArgs> & { model: string }): Promise<TokenizeReport> {
  const tokenizer = await readTokenizer(argv.model);
  let text: string;
  let ids: Int32Array;
  if (argv.chat !== undefined) {
    if (!(tokenizer instanceof HFTokenizer)) {
      throw new TokenizerError(`--chat: the tokenizer of '${argv.model}' is a character tokenizer, which has no chat template`);
    }
    const messages = await readChat(argv.chat);
    // the template checks the messages (role and content of each) before rendering
    text = tokenizer.applyChatTemplate(messages as ChatMessage[], { addGenerationPrompt: argv.generationPrompt === true });
    ids = tokenizer.encode(text, { addSpecialTokens: false });
  } else {
    text = argv.text ?? '';
    ids = tokenizer.encode(text, { addSpecialTokens: argv.specialTokens !== false });
  }
  const tokenOf = (id: number) => tokenizer instanceof CharTokenizer ? tokenizer.tokens[id] : tokenizer.idToToken(id) ?? '';
  return {
    tokenizer: tokenizer instanceof CharTokenizer ? 'char' : 'hf',
    text, ids: Array.from(ids), tokens: Array.from(ids, tokenOf), vocabSize: tokenizer.vocabSize,
  };
}

export async function handler(argv: ArgumentsCamelCase<TokenizeArgs>): Promise<void> {
  const report = await tokenizeReport(argv);
  if (argv.json) {
    process.stdout.write(`${JSON.stringify(report)}\n`);
    return;
  }
  const lines = argv.chat !== undefined ? ['prompt:', report.text, ''] : [];
  lines.push(`ids (${report.ids.length}): ${report.ids.join(' ')}`);
  lines.push(`tokens: ${report.tokens.map(t => JSON.stringify(t)).join(' ')}`);
  process.stdout.write(`${lines.join('\n')}\n`);
}
