/**
 * Chat templates rendered as transformers' `apply_chat_template(messages, tokenize=False)` renders
 * them: the Jinja template of tokenizer_config.json (or chat_template.jinja) with @huggingface/jinja
 * (trim_blocks and lstrip_blocks, as transformers compiles it), given `messages`,
 * `add_generation_prompt`, `tools` and `documents` (None unless given), the special tokens the
 * tokenizer has (bos_token, eos_token, unk_token, pad_token); @huggingface/jinja itself provides
 * transformers' globals `raise_exception` and `strftime_now`. No Node dependency.
 */
import { Template } from '@huggingface/jinja';
import { describeValue } from '../util/describe.js';
import { TokenizerError } from './tokenizer.js';

/** One chat turn; tool calls and other keys the template reads pass through unchanged. */
export interface ChatMessage {
  role: string;
  content: string;
  [key: string]: unknown;
}

export interface ChatTemplateOptions {
  /** end with the opening of an assistant turn (for generation); default false */
  addGenerationPrompt?: boolean;
  /** tool definitions, for templates that describe tools; default none */
  tools?: unknown[];
}

/** Checks `messages` (an array of {role, content} objects); every problem in one error. */
export function checkChatMessages(messages: unknown, source: string): ChatMessage[] {
  if (!Array.isArray(messages) || messages.length === 0) {
    throw new TokenizerError(`${source}: 'messages' must be a non-empty array of {role, content} but is ${describeValue(messages)}`);
  }
  const problems: string[] = [];
  messages.forEach((m, i) => {
    if (m === null || typeof m !== 'object' || Array.isArray(m)) {
      problems.push(`messages[${i}] must be an object {role, content} but is ${describeValue(m)}`);
      return;
    }
    const { role, content } = m as Record<string, unknown>;
    if (typeof role !== 'string' || role.length === 0) problems.push(`messages[${i}].role must be a non-empty string but is ${describeValue(role)}`);
    if (typeof content !== 'string') problems.push(`messages[${i}].content must be a string but is ${describeValue(content)}`);
  });
  if (problems.length > 0) throw new TokenizerError(`${source}: ${problems.join('; ')}`);
  return messages as ChatMessage[];
}

/** A compiled chat template; `source` names it in messages. */
export class ChatTemplate {
  private readonly template: Template;

  constructor(readonly text: string, private readonly specialTokens: Record<string, string>, private readonly source: string) {
    try {
      this.template = new Template(text);
    } catch (e) {
      throw new TokenizerError(`${source}: the chat template does not parse: ${(e as Error).message}`);
    }
  }

  /**
   * The prompt text of `messages`, as transformers renders it.
   *
   * ```js
   * const tok = await readTokenizer('Qwen3-30B-A3B');
   * tok.chatTemplate.render([{role: 'user', content: 'Hi'}], {addGenerationPrompt: true});
   * // '<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n'
   * ```
   */
  render(messages: unknown, options: ChatTemplateOptions = {}): string {
    const checked = checkChatMessages(messages, this.source);
    try {
      return this.template.render({
        messages: checked,
        tools: options.tools ?? null,
        documents: null,
        add_generation_prompt: options.addGenerationPrompt === true,
        ...this.specialTokens,
      });
    } catch (e) {
      // raise_exception(message) in a template arrives here as an Error with that message
      throw new TokenizerError(`${this.source}: the chat template failed: ${(e as Error).message}`);
    }
  }
}
