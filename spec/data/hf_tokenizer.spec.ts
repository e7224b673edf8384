/**
 * HFTokenizer and readTokenizer on a small byte-level BPE file: special tokens from
 * tokenizer_config.json, add_bos_token / add_eos_token, config.json's eos ids, chat templates
 * (string, list, chat_template.jinja), which tokenizer a folder gives, and every error for bad input.
 */
import { expect } from 'chai';
import { mkdir, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { checkChatMessages } from '../../src/data/chat_template.js';
import { HFTokenizer } from '../../src/data/hf_tokenizer.js';
import { CharTokenizer, TokenizerError } from '../../src/data/tokenizer.js';
import { readTokenizer, tokenizerFiles, writeTokenizer } from '../../src/data/tokenizer_file.js';
import { FileError } from '../../src/util/files.js';
import { tempDir } from '../io/checkpoint_helpers.js';
import { END_OF_TEXT, smallBPETokenizerJSON } from './small_bpe.js';

const TEXT = 'la miro vidi so tasel. ka en vora lupa la kemi?\n'.repeat(8);
const MERGES = 30;
const BPE = JSON.stringify(smallBPETokenizerJSON(TEXT, MERGES));
const EOT_ID = 256 + MERGES;
const BOS_ID = EOT_ID + 1;
const BOS = '<s>';
/** the BPE file with a BOS added token after <|endoftext|> */
const BPE_WITH_BOS = (() => {
  const json = JSON.parse(BPE) as { added_tokens: Array<Record<string, unknown>> };
  const last = json.added_tokens[0].id as number;
  json.added_tokens.push({ ...json.added_tokens[0], id: last + 1, content: BOS });
  return JSON.stringify(json);
})();
const TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}" +
  '{% if add_generation_prompt %}<assistant>{% endif %}';
const config = (extra: Record<string, unknown> = {}) => JSON.stringify({ eos_token: END_OF_TEXT, ...extra });
const ids = (a: Int32Array) => Array.from(a);

describe('data/hf_tokenizer', () => {
  it('encodes and decodes a BPE text, unicode and emoji through byte symbols, round trip exact', () => {
    const tok = HFTokenizer.fromFiles({ tokenizer: BPE, config: config() });
    for (const text of [TEXT, 'Zürich 😀 中文\t\n  x', '']) expect(tok.decode(tok.encode(text))).to.equal(text);
    // merges fire: the training text needs far fewer ids than bytes
    expect(tok.encode(TEXT).length).to.be.lessThan(new TextEncoder().encode(TEXT).length / 2);
    expect(tok.vocabSize).to.equal(EOT_ID + 1);
  });

  it('takes the special tokens of tokenizer_config.json (strings or {content}) and writes them as one id', () => {
    const tok = HFTokenizer.fromFiles({ tokenizer: BPE_WITH_BOS,
      config: config({ bos_token: { __type: 'AddedToken', content: BOS }, pad_token: END_OF_TEXT }) });
    expect(tok.bosTokenId).to.equal(BOS_ID);
    expect(tok.eosTokenIds).to.deep.equal([EOT_ID]);
    expect(tok.padTokenId).to.equal(EOT_ID);
    expect(ids(tok.encode(`a${END_OF_TEXT}`, { addSpecialTokens: false }))).to.deep.equal([...ids(tok.encode('a')), EOT_ID]);
    expect(tok.decode([...tok.encode('miro'), EOT_ID], { skipSpecialTokens: true })).to.equal('miro');
    expect(tok.decode([...tok.encode('miro'), EOT_ID])).to.equal(`miro${END_OF_TEXT}`);
  });

  it('adds BOS and EOS when add_bos_token / add_eos_token say so, and only with special tokens', () => {
    const plain = HFTokenizer.fromFiles({ tokenizer: BPE_WITH_BOS, config: config({ bos_token: BOS }) });
    const tok = HFTokenizer.fromFiles({ tokenizer: BPE_WITH_BOS, config: config({ bos_token: BOS, add_bos_token: true, add_eos_token: true }) });
    const body = ids(plain.encode('miro vidi'));
    expect(ids(tok.encode('miro vidi'))).to.deep.equal([BOS_ID, ...body, EOT_ID]);
    expect(ids(tok.encode('miro vidi', { addSpecialTokens: false }))).to.deep.equal(body);
    // as transformers' post-processor: a text that starts with BOS gets a second one
    expect(ids(tok.encode(`${BOS}miro vidi`))).to.deep.equal([BOS_ID, BOS_ID, ...body, EOT_ID]);
    // a file whose post-processor adds BOS already gets no second one from add_bos_token
    const framing = JSON.parse(BPE_WITH_BOS) as Record<string, unknown>;
    framing['post_processor'] = { type: 'TemplateProcessing', single: [{ SpecialToken: { id: BOS, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [{ Sequence: { id: 'A', type_id: 0 } }, { Sequence: { id: 'B', type_id: 1 } }],
      special_tokens: { [BOS]: { id: BOS, ids: [BOS_ID], tokens: [BOS] } } };
    const framed = HFTokenizer.fromFiles({ tokenizer: JSON.stringify(framing), config: config({ bos_token: BOS, add_bos_token: true }) });
    expect(ids(framed.encode('miro vidi'))).to.deep.equal([BOS_ID, ...body]);
    expect(ids(framed.encode('miro vidi', { addSpecialTokens: false }))).to.deep.equal(body);
  });

  it('adds config.json eos ids after the tokenizer\'s own', async () => {
    const dir = await tempDir('hf-tok-');
    try {
      await writeFile(join(dir, 'tokenizer.json'), BPE_WITH_BOS);
      await writeFile(join(dir, 'tokenizer_config.json'), config());
      await writeFile(join(dir, 'config.json'), JSON.stringify({ eos_token_id: [BOS_ID, EOT_ID] }));
      expect((await readTokenizer(dir)).eosTokenIds).to.deep.equal([EOT_ID, BOS_ID]);
      await writeFile(join(dir, 'config.json'), JSON.stringify({ eos_token_id: 5000 }));
      await expectRejected(readTokenizer(dir), `config.json's eos_token_id must be an id in [0, ${BOS_ID + 1}) or a list of them but is 5000`);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('renders chat templates: the config string, a list with "default", chat_template.jinja first', async () => {
    const messages = [{ role: 'user', content: 'miro?' }, { role: 'assistant', content: 'vidi.' }];
    const expected = `<user>miro?${END_OF_TEXT}<assistant>vidi.${END_OF_TEXT}`;
    const tok = HFTokenizer.fromFiles({ tokenizer: BPE, config: config({ chat_template: TEMPLATE }) });
    expect(tok.applyChatTemplate(messages)).to.equal(expected);
    expect(tok.applyChatTemplate(messages, { addGenerationPrompt: true })).to.equal(`${expected}<assistant>`);
    expect(ids(tok.encodeChat(messages))).to.deep.equal(ids(tok.encode(expected, { addSpecialTokens: false })));
    const listed = HFTokenizer.fromFiles({ tokenizer: BPE,
      config: config({ chat_template: [{ name: 'tool_use', template: 'x' }, { name: 'default', template: TEMPLATE }] }) });
    expect(listed.applyChatTemplate(messages)).to.equal(expected);
    const dir = await tempDir('hf-tok-');
    try {
      await writeFile(join(dir, 'tokenizer.json'), BPE);
      await writeFile(join(dir, 'tokenizer_config.json'), config({ chat_template: 'from the config' }));
      await writeFile(join(dir, 'chat_template.jinja'), TEMPLATE);
      const read = await readTokenizer(dir) as HFTokenizer;
      expect(read.applyChatTemplate(messages)).to.equal(expected);
      // a full fine-tune saves the tokenizer's own files unchanged
      expect(tokenizerFiles(read)).to.deep.equal({
        'tokenizer.json': BPE, 'tokenizer_config.json': config({ chat_template: 'from the config' }), 'chat_template.jinja': TEMPLATE,
      });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('gives the template bos_token only when the tokenizer has one (as transformers\' special_tokens_map)', () => {
    const template = '{% if bos_token is defined %}[{{ bos_token }}]{% endif %}{{ messages[0].content }}';
    const without = HFTokenizer.fromFiles({ tokenizer: BPE, config: config({ chat_template: template }) });
    expect(without.applyChatTemplate([{ role: 'user', content: 'x' }])).to.equal('x');
    const withBos = HFTokenizer.fromFiles({ tokenizer: BPE_WITH_BOS, config: config({ bos_token: BOS, chat_template: template }) });
    expect(withBos.applyChatTemplate([{ role: 'user', content: 'x' }])).to.equal(`[${BOS}]x`);
  });

  it('readTokenizer gives the character tokenizer for its own file and the HF one for any other', async () => {
    const dir = await tempDir('hf-tok-');
    try {
      await writeTokenizer(dir, CharTokenizer.fromText(TEXT));
      expect(await readTokenizer(dir)).to.be.instanceOf(CharTokenizer);
      await writeFile(join(dir, 'tokenizer.json'), BPE);
      const tok = await readTokenizer(dir);
      expect(tok).to.be.instanceOf(HFTokenizer);
      expect(tok.eosTokenIds).to.deep.equal([]);  // no tokenizer_config.json: no special tokens named
      expect(tokenizerFiles(tok)).to.deep.equal({ 'tokenizer.json': BPE });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  describe('errors', () => {
    it('names a bad tokenizer.json, tokenizer_config.json or files argument', () => {
      expect(() => HFTokenizer.fromFiles(null as never)).to.throw(TokenizerError,
          "`HFTokenizer.fromFiles()`: 'files.tokenizer' must be the text of tokenizer.json but is null");
      expect(() => HFTokenizer.fromFiles({ tokenizer: '{', config: '{}' }, { source: "'m'" })).to.throw(TokenizerError,
          /^'m': tokenizer.json is not valid JSON: /);
      expect(() => HFTokenizer.fromFiles({ tokenizer: '{"model": 3}' })).to.throw(TokenizerError,
          'tokenizer: tokenizer.json must be a tokenizers file (an object with "model": {"type": ...}) but its "model" is 3');
      expect(() => HFTokenizer.fromFiles({ tokenizer: BPE, config: '[1]' })).to.throw(TokenizerError,
          'tokenizer: tokenizer_config.json must hold an object but holds');
      expect(() => HFTokenizer.fromFiles({ tokenizer: BPE, config: '{' })).to.throw(TokenizerError,
          /^tokenizer: tokenizer_config.json is not valid JSON/);
      expect(() => HFTokenizer.fromFiles({ tokenizer: '{"model": {"type": "Nope"}}' })).to.throw(TokenizerError,
          /^tokenizer: @huggingface\/tokenizers cannot build the "Nope" tokenizer: /);
      expect(() => HFTokenizer.fromFiles({ tokenizer: BPE, config: config({ bos_token: '<nope>' }) })).to.throw(TokenizerError,
          'tokenizer: tokenizer_config.json names bos_token "<nope>", which is not in the vocabulary');
    });

    it('refuses an empty vocabulary', () => {
      const empty = JSON.stringify({ ...JSON.parse(BPE), added_tokens: [], model: { ...JSON.parse(BPE).model, vocab: {}, merges: [] } });
      expect(() => HFTokenizer.fromFiles({ tokenizer: empty })).to.throw(TokenizerError, 'tokenizer: tokenizer.json has an empty vocabulary');
    });

    it('names bad encode and decode arguments', () => {
      const tok = HFTokenizer.fromFiles({ tokenizer: BPE });
      expect(() => tok.encode(7 as never)).to.throw(TokenizerError, "`HFTokenizer.encode()`: 'text' must be a string but is 7");
      expect(() => tok.decode([1, EOT_ID + 1])).to.throw(TokenizerError, `\`HFTokenizer.decode()\`: id ${EOT_ID + 1} at position 1 is not in [0, ${EOT_ID + 1})`);
      expect(() => tok.decode([0.5])).to.throw(TokenizerError, 'id 0.5 at position 0');
    });

    it('says when there is no chat template, and when the template fails, parses badly or raises', () => {
      const tok = HFTokenizer.fromFiles({ tokenizer: BPE }, { source: "'m'" });
      expect(() => tok.applyChatTemplate([{ role: 'user', content: 'x' }])).to.throw(TokenizerError,
          "'m': the tokenizer has no chat template (no \"chat_template\" in tokenizer_config.json and no chat_template.jinja)");
      expect(() => HFTokenizer.fromFiles({ tokenizer: BPE, config: config({ chat_template: '{% for %}' }) })).to.throw(TokenizerError,
          /^tokenizer: the chat template does not parse: /);
      const raising = HFTokenizer.fromFiles({ tokenizer: BPE,
        config: config({ chat_template: "{% if messages[0].role != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}" }) });
      expect(() => raising.applyChatTemplate([{ role: 'user', content: 'x' }])).to.throw(TokenizerError,
          'tokenizer: the chat template failed: a system message must come first');
    });

    it('lists every problem of bad chat messages', () => {
      expect(() => checkChatMessages([], 'chat')).to.throw(TokenizerError,
          "chat: 'messages' must be a non-empty array of {role, content} but is");
      expect(() => checkChatMessages([{ role: '', content: 1 }, 'x'], 'chat')).to.throw(TokenizerError,
          'chat: messages[0].role must be a non-empty string but is "" (string); messages[0].content must be a string but ' +
          'is 1 (number); messages[1] must be an object {role, content} but is "x" (string)');
      const tok = HFTokenizer.fromFiles({ tokenizer: BPE, config: config({ chat_template: TEMPLATE }) });
      expect(() => tok.applyChatTemplate([{ role: 'user' }] as never)).to.throw(TokenizerError, 'messages[0].content must be a string');
    });

    it('refuses a tokenizer.json that is a folder, and a model folder without one', async () => {
      const dir = await tempDir('hf-tok-');
      try {
        await expectRejected(readTokenizer(dir), `'${join(dir, 'tokenizer.json')}' is missing`);
        await mkdir(join(dir, 'tokenizer.json'));
        await expectRejected(readTokenizer(dir), FileError);
        await rm(join(dir, 'tokenizer.json'), { recursive: true });
        await writeFile(join(dir, 'tokenizer.json'), BPE);
        await mkdir(join(dir, 'tokenizer_config.json'));
        await expectRejected(readTokenizer(dir), FileError);
      } finally {
        await rm(dir, { recursive: true, force: true });
      }
    });
  });
});

async function expectRejected(promise: Promise<unknown>, expected: string | RegExp | typeof FileError): Promise<void> {
  let error: unknown = null;
  try {
    await promise;
  } catch (e) {
    error = e;
  }
  expect(error, 'expected a rejection').to.not.equal(null);
  if (typeof expected === 'function') expect(error).to.be.instanceOf(expected);
  else if (typeof expected === 'string') expect((error as Error).message).to.include(expected);
  else expect((error as Error).message).to.match(expected);
}
