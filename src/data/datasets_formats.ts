/**
 * One dataset line → token ids and the tokens the loss trains on, for each dataset type (axolotl's
 * names): `completion`, `prompt_completion`, `alpaca`, `chat_template`. No Node dependency.
 */
import { describeValue } from '../util/describe.js';
import type { ChatMessage, ChatTemplateOptions } from './chat_template.js';
import { DatasetError } from './datasets_error.js';
import type { TextTokenizer } from './text_tokenizer.js';

export type DatasetType = 'completion' | 'prompt_completion' | 'alpaca' | 'chat_template';
export const DATASET_TYPES: readonly DatasetType[] = ['completion', 'prompt_completion', 'alpaca', 'chat_template'];
/** The chat roles a `messages` line may use. */
export const CHAT_ROLES: readonly string[] = ['system', 'user', 'assistant', 'tool'];

/** A tokenizer that renders chats (HFTokenizer with a chat template). */
export interface ChatTokenizer extends TextTokenizer {
  applyChatTemplate(messages: ChatMessage[], options?: ChatTemplateOptions): string;
}

/** The tokens of one sample and, per token, whether the loss predicts it (1) or not (0). */
export interface SampleTokens {
  ids: Int32Array;
  trained: Uint8Array;
}

/**
 * axolotl's `alpaca` prompt (AlpacaPrompter, instruct style): a system sentence, the instruction,
 * the input when there is one, then "### Response:\n"; the output follows.
 */
export function alpacaPrompt(instruction: string, input: string): string {
  return input.length > 0
    ? 'Below is an instruction that describes a task, paired with an input that provides further context. ' +
      'Write a response that appropriately completes the request.\n\n' +
      `### Instruction:\n${instruction}\n\n### Input:\n${input}\n\n### Response:\n`
    : 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' +
      `### Instruction:\n${instruction}\n\n### Response:\n`;
}

function stringField(record: Record<string, unknown>, name: string, where: string, options: { empty?: boolean; optional?: boolean } = {}): string {
  const value = record[name];
  if (value === undefined && options.optional === true) return '';
  if (typeof value !== 'string') {
    throw new DatasetError(`${where}: expected a string field "${name}" but it is ${value === undefined ? 'missing' : describeValue(value)}`);
  }
  if (value.length === 0 && options.empty !== true) throw new DatasetError(`${where}: the field "${name}" is empty`);
  return value;
}

/**
 * The text's ids with the tokenizer's special tokens (BOS where it adds one), then its first EOS
 * id when it has one and the text does not already end with it: axolotl's completion and
 * prompt/response strategies (and TRL's SFTTrainer) append EOS so the model learns to stop.
 */
function withEos(tokenizer: TextTokenizer, text: string): number[] {
  const ids = Array.from(tokenizer.encode(text));
  const eos = tokenizer.eosTokenIds[0];
  if (eos !== undefined && ids[ids.length - 1] !== eos) ids.push(eos);
  return ids;
}

/**
 * A prompt and its answer as axolotl tokenizes them: the ids of prompt + answer (+ EOS), the
 * first len(ids of the prompt alone, without an EOS the tokenizer adds) of them masked unless
 * `trainOnInputs`.
 */
function promptAnswer(tokenizer: TextTokenizer, prompt: string, answer: string, trainOnInputs: boolean): SampleTokens {
  const ids = withEos(tokenizer, prompt + answer);
  const trained = new Uint8Array(ids.length).fill(1);
  if (!trainOnInputs) {
    const promptIds = tokenizer.encode(prompt);
    let n = promptIds.length;
    // a tokenizer that adds EOS to every text (add_eos_token) adds it to the prompt alone too: not a prompt token
    if (n > 0 && promptIds[n - 1] === tokenizer.eosTokenIds[0] && ids[n - 1] !== promptIds[n - 1]) n--;
    trained.fill(0, 0, Math.min(n, ids.length));
  }
  return { ids: Int32Array.from(ids), trained };
}

/** Starts with `prefix`, token by token. */
function startsWith(ids: Int32Array, prefix: Int32Array): boolean {
  if (prefix.length > ids.length) return false;
  for (let i = 0; i < prefix.length; i++) if (ids[i] !== prefix[i]) return false;
  return true;
}

function chatMessages(record: Record<string, unknown>, where: string): ChatMessage[] {
  const messages = record['messages'];
  if (!Array.isArray(messages) || messages.length === 0) {
    throw new DatasetError(`${where}: expected "messages", a non-empty array of {role, content}, but it is ` +
        `${messages === undefined ? 'missing' : describeValue(messages)}`);
  }
  messages.forEach((m, i) => {
    if (m === null || typeof m !== 'object' || Array.isArray(m)) {
      throw new DatasetError(`${where}: expected messages[${i}] to be an object {role, content} but it is ${describeValue(m)}`);
    }
    const { role, content } = m as Record<string, unknown>;
    if (typeof role !== 'string' || !CHAT_ROLES.includes(role)) {
      throw new DatasetError(`${where}: expected messages[${i}].role to be one of ${CHAT_ROLES.join(', ')} but it is ${describeValue(role)}`);
    }
    if (typeof content !== 'string') {
      throw new DatasetError(`${where}: expected messages[${i}].content to be a string but it is ${describeValue(content)}`);
    }
  });
  if (!messages.some(m => (m as ChatMessage).role === 'assistant')) {
    throw new DatasetError(`${where}: expected at least one assistant message (the loss trains on them) but there is none`);
  }
  return messages as ChatMessage[];
}

/**
 * A chat rendered by the model's template, trained on its assistant turns. Each assistant turn
 * starts where the template's prompt for it ends (the conversation before it rendered with
 * add_generation_prompt, whose ids must be a prefix of the whole conversation's ids, as axolotl
 * checks) and ends with the first end-of-turn token after that (an id of the tokenizer's
 * eosTokenIds, `<|im_end|>` for Qwen), which is trained too. Everything a template writes for the
 * assistant after its prompt (Qwen3's empty `<think>` block of the last turn) is the assistant's.
 */
function chatSample(tokenizer: TextTokenizer, messages: ChatMessage[], trainOnInputs: boolean, where: string): SampleTokens {
  const chat = tokenizer as Partial<ChatTokenizer>;
  if (typeof chat.applyChatTemplate !== 'function') {
    throw new DatasetError(`${where}: type chat_template needs a tokenizer with a chat template (an HFTokenizer) but the tokenizer has none`);
  }
  const render = (m: ChatMessage[], addGenerationPrompt: boolean) =>
    tokenizer.encode(chat.applyChatTemplate!(m, { addGenerationPrompt }), { addSpecialTokens: false });
  const ids = render(messages, false);
  const trained = new Uint8Array(ids.length).fill(trainOnInputs ? 1 : 0);
  if (trainOnInputs) return { ids, trained };
  const endOfTurn = new Set(tokenizer.eosTokenIds);
  messages.forEach((m, i) => {
    if (m.role !== 'assistant') return;
    if (i === 0) throw new DatasetError(`${where}: messages[0] is an assistant turn; expected a turn before it (system or user) that prompts it`);
    const prompt = render(messages.slice(0, i), true);
    if (!startsWith(ids, prompt)) {
      throw new DatasetError(`${where}: the chat template's prompt for messages[${i}] (the turns before it with ` +
          'add_generation_prompt) is not a prefix of the rendered conversation, so its tokens cannot be found');
    }
    let end = prompt.length;
    while (end < ids.length && !endOfTurn.has(ids[end])) end++;
    if (end === ids.length) {
      throw new DatasetError(`${where}: messages[${i}] (assistant) has no end-of-turn token (eos ids ${JSON.stringify([...endOfTurn])}) after it`);
    }
    trained.fill(1, prompt.length, end + 1);
  });
  return { ids, trained };
}

/**
 * The tokens of one dataset line and which of them the loss trains on. `trainOnInputs` false
 * (axolotl's train_on_inputs: false) trains on the completion / output / assistant turns only.
 *
 * ```js
 * const {ids, trained} = sampleTokens({prompt: 'Q: 2+2?', completion: ' 4'}, 'prompt_completion', tok, {where: 'a.jsonl:1'});
 * ```
 */
export function sampleTokens(
    record: Record<string, unknown>, type: DatasetType, tokenizer: TextTokenizer,
    options: { field?: string; trainOnInputs?: boolean; where: string }): SampleTokens {
  const { where } = options;
  const trainOnInputs = options.trainOnInputs === true;
  switch (type) {
    case 'completion': {
      const ids = withEos(tokenizer, stringField(record, options.field ?? 'text', where));
      return { ids: Int32Array.from(ids), trained: new Uint8Array(ids.length).fill(1) };
    }
    case 'prompt_completion':
      return promptAnswer(tokenizer, stringField(record, 'prompt', where), stringField(record, 'completion', where), trainOnInputs);
    case 'alpaca': {
      const prompt = alpacaPrompt(stringField(record, 'instruction', where),
          stringField(record, 'input', where, { empty: true, optional: true }));
      return promptAnswer(tokenizer, prompt, stringField(record, 'output', where), trainOnInputs);
    }
    case 'chat_template':
      return chatSample(tokenizer, chatMessages(record, where), trainOnInputs, where);
  }
}
