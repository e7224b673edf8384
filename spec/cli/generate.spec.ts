/**
 * `tfjs-moe-lora generate`: the tokens the API gives (greedy and seeded sampling) on the example
 * model, stop strings, a chat prompt through an HF tokenizer's chat template with a PEFT adapter
 * applied and generation_config.json's EOS, and every bad argument.
 */
import { expect } from 'chai';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { GenerateReport } from '../../src/cli/commands/generate.js';
import { HFTokenizer } from '../../src/data/hf_tokenizer.js';
import type { CharTokenizer } from '../../src/data/tokenizer.js';
import { readTokenizer } from '../../src/data/tokenizer_file.js';
import { generate, type GenerationOptions, type GenerationPrompt } from '../../src/generate/generate.js';
import { readGenerationConfig } from '../../src/generate/generation_config_file.js';
import { loadModelDir } from '../../src/io/model_dir.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { writeChatModel } from '../helpers/chat_model.js';
import { cleanup, tempDir } from '../io/checkpoint_helpers.js';
import { runMain } from './run_cli.js';

const TALA = 'examples/models/tala-moe';
const MIXTRAL = 'spec/fixtures/hf/mixtral';  // the chat model's weights (helpers/chat_model.ts) and an adapter for them
/** the suite's backend (the command would otherwise switch to its default, cpu) */
const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';

/** What generate() gives for the folder (and adapter) as the CLI loads them. */
async function apiIds(dir: string, prompt: GenerationPrompt, options: GenerationOptions, adapter?: string): Promise<number[]> {
  const { model } = await loadModelDir(dir, { expertKernel: 'fused' });
  try {
    if (adapter !== undefined) await loadPeftAdapter(model, adapter);
    const r = await generate(model, prompt, { tokenizer: await readTokenizer(dir), generationConfig: await readGenerationConfig(dir), ...options });
    return Array.from(r.ids);
  } finally {
    model.dispose();
  }
}

async function runJSON(args: string[]): Promise<GenerateReport> {
  const r = await runMain(['generate', ...args, '--json', '--backend', BACKEND]);
  expect(r.code, r.stderr).to.equal(0);
  return JSON.parse(r.stdout) as GenerateReport;
}

describe('cli/generate', () => {
  let dir: string;
  before(async () => { dir = await tempDir('cli-generate-'); });
  after(cleanup);

  it('--prompt: the tokens of generate(), greedy and seeded; the text on stdout, a summary on stderr', async () => {
    const greedy = await runJSON(['--model', TALA, '--prompt', 'miro ', '--max-new-tokens', '16']);
    expect(greedy.ids).to.deep.equal(await apiIds(TALA, 'miro ', { maxNewTokens: 16 }));
    const tok = await readTokenizer(TALA) as CharTokenizer;
    expect(greedy).to.deep.include({ prompt: 'miro ', promptIds: Array.from(tok.encode('miro ')), finishReason: 'length', sampling: null });
    expect(greedy.text).to.equal(tok.decode(greedy.ids));
    const sampledArgs = ['--model', TALA, '--prompt', 'miro ', '--max-new-tokens', '16', '--temperature', '1.2', '--top-k', '8', '--top-p', '0.9', '--seed', '4'];
    const sampled = await runJSON(sampledArgs);
    expect(sampled.ids).to.deep.equal(await apiIds(TALA, 'miro ', { maxNewTokens: 16, temperature: 1.2, topK: 8, topP: 0.9, seed: 4 }));
    expect(sampled.sampling).to.deep.equal({ temperature: 1.2, topK: 8, topP: 0.9, seed: 4 });
    expect((await runJSON(sampledArgs)).ids, 'the same seed').to.deep.equal(sampled.ids);
    const plain = await runMain(['generate', '--model', TALA, '--prompt', 'miro ', '--max-new-tokens', '16', '--backend', BACKEND]);
    expect(plain.code, plain.stderr).to.equal(0);
    expect(plain.stdout).to.equal(`${greedy.text}\n`);
    expect(plain.stderr).to.match(/\[16 tokens in [\d.]+ s, greedy; stopped at the token limit\]\n$/);
  });

  it('--stop (repeatable): the text ends before the first stop string found', async () => {
    const full = await runJSON(['--model', TALA, '--prompt', 'miro ', '--max-new-tokens', '16']);
    const stop = full.text!.slice(5, 7);
    const r = await runJSON(['--model', TALA, '--prompt', 'miro ', '--max-new-tokens', '16', '--stop', 'QQ', '--stop', stop]);
    expect(r).to.deep.include({ finishReason: 'stop', stopString: stop, text: full.text!.slice(0, full.text!.indexOf(stop)) });
  });

  it('--chat --adapter: the chat template\'s prompt, the adapter applied, generation_config.json\'s EOS', async () => {
    // the mixtral fixture's weights (vocab 97) with a 31-token HF tokenizer that has a chat template
    const model = await writeChatModel(join(dir, 'chat-model'));
    const chat = join(dir, 'chat.json');
    const messages = [{ role: 'user', content: 'hello there' }];
    await writeFile(chat, JSON.stringify({ messages }));
    const tok = await readTokenizer(model);
    expect(tok).to.be.instanceOf(HFTokenizer);

    const base = await apiIds(model, messages, { maxNewTokens: 12 });
    const adapted = await apiIds(model, messages, { maxNewTokens: 12 }, `${MIXTRAL}/adapter`);
    expect(adapted, 'the adapter changes what is generated').to.not.deep.equal(base);
    const r = await runJSON(['--model', model, '--adapter', `${MIXTRAL}/adapter`, '--chat', chat, '--max-new-tokens', '12']);
    expect(r.prompt).to.equal('user: hello there<|im_end|>\nassistant:');
    expect(r.promptIds).to.deep.equal(Array.from(tok.encode(r.prompt, { addSpecialTokens: false })));
    expect(r.ids).to.deep.equal(adapted);
    // generation_config.json names the EOS id: generation ends at it
    const eos = adapted[2];
    await writeFile(join(model, 'generation_config.json'), JSON.stringify({ eos_token_id: [eos] }));
    const ended = await runJSON(['--model', model, '--adapter', `${MIXTRAL}/adapter`, '--chat', chat, '--max-new-tokens', '12']);
    expect(ended.finishReason).to.equal('eos');
    expect(ended.ids).to.deep.equal(adapted.slice(0, adapted.indexOf(eos) + 1));
  });

  it('refuses bad arguments before loading anything (exit 2)', async () => {
    const bad: Array<[string[], string]> = [
      [['--model', TALA], 'give --prompt or --chat'],
      [['--model', join(dir, 'none'), '--prompt', 'a'], `--model: '${join(dir, 'none')}' is not a directory`],
      [['--model', TALA, '--adapter', join(dir, 'none'), '--prompt', 'a'], `--adapter: '${join(dir, 'none')}' is not a directory`],
      [['--model', TALA, '--prompt', 'a', '--prompt', 'b'], '--prompt is given 2 times; give it once'],
      [['--model', TALA, '--prompt', 'a', '--chat', 'c.json'], 'Arguments prompt and chat are mutually exclusive'],
      [['--model', TALA, '--prompt', 'a', '--max-new-tokens', '-1'], '--max-new-tokens must be an integer >= 0 but got -1'],
      [['--model', TALA, '--prompt', 'a', '--top-k', '1.5'], '--top-k must be an integer >= 0 but got 1.5'],
      [['--model', TALA, '--prompt', 'a', '--seed', '-3'], '--seed must be an integer in [0, 2^32) but got -3'],
      [['--model', TALA, '--prompt', 'a', '--temperature', '-1'], '--temperature must be a number >= 0 (0: greedy) but got -1'],
      [['--model', TALA, '--prompt', 'a', '--top-p', '0'], '--top-p must be a number in (0, 1] but got 0'],
      [['--model', TALA, '--prompt', 'a', '--stop', ''], '--stop must be a non-empty string'],
    ];
    for (const [args, message] of bad) {
      const r = await runMain(['generate', ...args]);
      expect(r.code, args.join(' ')).to.equal(2);
      expect(r.stderr, args.join(' ')).to.include(message);
    }
    // a chat on a character tokenizer: the model folder has no chat template (exit 1)
    const chat = join(dir, 'chat-char.json');
    await writeFile(chat, JSON.stringify([{ role: 'user', content: 'miro' }]));
    const r = await runMain(['generate', '--model', TALA, '--chat', chat, '--backend', BACKEND]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.include("`generate()`: a chat prompt needs an HFTokenizer (with a chat template) as 'options.tokenizer'");
  });
});
