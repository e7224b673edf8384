/**
 * A model folder with an HF tokenizer that has a chat template, for specs of chat data: the mixtral
 * fixture's weights (vocab 97) with a 31-token tokenizer (lower-case letters, space, ':', newline,
 * <unk> and <|im_end|>) whose template writes `role: content<|im_end|>\n` a turn.
 */
import { copyFile, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { CharTokenizer } from '../../src/data/tokenizer.js';

export const CHAT_FIXTURE = 'spec/fixtures/hf/mixtral';
export const CHAT_TEMPLATE =
  '{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}';

/** Writes the folder `dir` (made here) and returns it. */
export async function writeChatModel(dir: string): Promise<string> {
  await mkdir(dir);
  for (const f of ['config.json', 'model.safetensors']) await copyFile(join(CHAT_FIXTURE, f), join(dir, f));
  const json = CharTokenizer.fromText('abcdefghijklmnopqrstuvwxyz :\n').toJSON() as unknown as Record<string, any>;
  const imEnd = Object.keys(json.model.vocab).length;
  json.model.vocab['<|im_end|>'] = imEnd;
  json.added_tokens.push({ ...json.added_tokens[0], id: imEnd, content: '<|im_end|>' });
  json.pre_tokenizer.pattern.Regex = '[^\\x00]|\\x00';  // every code point, but not the character tokenizer's file
  await writeFile(join(dir, 'tokenizer.json'), JSON.stringify(json));
  await writeFile(join(dir, 'tokenizer_config.json'), JSON.stringify({ eos_token: '<|im_end|>', chat_template: CHAT_TEMPLATE }));
  return dir;
}
