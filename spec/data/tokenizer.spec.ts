/** The character tokenizer and its tokenizer.json. */
import { expect } from 'chai';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CharTokenizer, describeChar, TokenizerError } from '../../src/data/tokenizer.js';
import { readTokenizer, writeTokenizer } from '../../src/data/tokenizer_file.js';

const TEXT = 'la miro vidi.\nka so vora lupa?\n';

describe('data/tokenizer: CharTokenizer', () => {
  let dir: string;
  before(async () => { dir = await mkdtemp(join(tmpdir(), 'tokenizer-')); });
  after(async () => { await rm(dir, { recursive: true, force: true }); });

  it('has the unknown token at 0, then each character of the text once, by code point', () => {
    const tok = CharTokenizer.fromText(TEXT);
    expect(tok.tokens).to.deep.equal(['<unk>', '\n', ' ', '.', '?', 'a', 'd', 'i', 'k', 'l', 'm', 'o', 'p', 'r', 's', 'u', 'v']);
    expect(tok.vocabSize).to.equal(17);
  });

  it('round-trips text of its own characters, astral code points included', () => {
    const text = 'a\u{1D11E}b é\n\u{1D11E}';
    const tok = CharTokenizer.fromText(text);
    const ids = tok.encode(text);
    expect(ids.length).to.equal(7);
    expect(tok.decode(ids)).to.equal(text);
    expect(Array.from(tok.encode('ba'))).to.deep.equal([tok.tokens.indexOf('b'), tok.tokens.indexOf('a')]);
  });

  it('encodes characters outside the vocabulary as 0, which decodes as U+FFFD', () => {
    const tok = CharTokenizer.fromText(TEXT);
    expect(Array.from(tok.encode('mX!'))).to.deep.equal([tok.tokens.indexOf('m'), 0, 0]);
    expect(tok.decode(tok.encode('mX!'))).to.equal('m\uFFFD\uFFFD');
    expect(tok.unknownChars('mXaX!')).to.deep.equal(['X', '!']);
  });

  it('survives tokenizer.json, written in the HF tokenizers layout of a character-level WordLevel model', async () => {
    const tok = CharTokenizer.fromText(TEXT);
    await writeTokenizer(dir, tok);
    const json = JSON.parse(await readFile(join(dir, 'tokenizer.json'), 'utf8'));
    expect(json).to.deep.equal({
      version: '1.0', truncation: null, padding: null,
      added_tokens: [{ id: 0, content: '<unk>', single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }],
      normalizer: null,
      pre_tokenizer: { type: 'Split', pattern: { Regex: '[\\s\\S]' }, behavior: 'Isolated', invert: false },
      post_processor: null,
      decoder: { type: 'Fuse' },
      model: { type: 'WordLevel', vocab: Object.fromEntries(tok.tokens.map((t, i) => [t, i])), unk_token: '<unk>' },
    });
    expect(json.model.vocab).to.include({ '<unk>': 0, '\n': 1, ' ': 2, v: 16 });
    const again = await readTokenizer(dir) as CharTokenizer;
    expect(again.tokens).to.deep.equal(tok.tokens);
    expect(again.decode(again.encode(TEXT))).to.equal(TEXT);
  });

  it('rejects a tokenizer JSON that is not a character-level WordLevel model, naming every problem', () => {
    const good = CharTokenizer.fromText('ab').toJSON();
    const edit = (change: (j: Record<string, any>) => void) => {
      const j = JSON.parse(JSON.stringify(good));
      change(j);
      return j;
    };
    expect(() => CharTokenizer.fromJSON(edit(j => { j.model.type = 'BPE'; j.normalizer = { type: 'NFC' }; }), 'tok.json'))
        .to.throw(TokenizerError, 'tok.json: "model.type" must be "WordLevel" but is "BPE"; "normalizer" must be null but is {"type":"NFC"}');
    expect(() => CharTokenizer.fromJSON(edit(j => { j.pre_tokenizer = { type: 'Whitespace' }; })))
        .to.throw('tokenizer JSON: "pre_tokenizer" must split every character ({"type": "Split", "pattern": {"Regex": ' +
            '"[\\\\s\\\\S]"}, "behavior": "Isolated", "invert": false}) but is {"type":"Whitespace"}');
    expect(() => CharTokenizer.fromJSON(edit(j => { j.model.vocab = { '<unk>': 1, ab: 0, c: 0 }; })))
        .to.throw('tokenizer JSON: "model.vocab" gives the id 0 to both "ab" and "c"; the unknown token "<unk>" must have id 0 ' +
            'but has 1; token 1 must be a single character but is "<unk>"');
    expect(() => CharTokenizer.fromJSON(edit(j => { j.model.vocab = { '<unk>': 0, a: 5 }; delete j.model.unk_token; })))
        .to.throw('tokenizer JSON: "model.unk_token" must be a non-empty string but is undefined; ' +
            '"model.vocab" gives "a" the id 5, not one of 0..1');
    expect(() => CharTokenizer.fromJSON([1])).to.throw('tokenizer JSON: must be a JSON object');
    expect(() => CharTokenizer.fromText('')).to.throw("`CharTokenizer.fromText()`: 'text' must be a non-empty string");
  });

  it('reports a missing or unreadable tokenizer.json and an id outside the vocabulary', async () => {
    const nowhere = join(dir, 'nothing');
    let error: unknown;
    try { await readTokenizer(nowhere); } catch (e) { error = e; }
    expect((error as Error).message).to.equal(`model folder '${nowhere}' does not exist`);
    const bad = await mkdtemp(join(tmpdir(), 'tokenizer-bad-'));
    error = undefined;
    try { await readTokenizer(bad); } catch (e) { error = e; }
    expect(error).to.be.instanceOf(TokenizerError);
    expect((error as Error).message).to.equal(`'${join(bad, 'tokenizer.json')}' is missing (the model folder needs the tokenizer it was trained with)`);
    await writeFile(join(bad, 'tokenizer.json'), '{"type": ');
    error = undefined;
    try { await readTokenizer(bad); } catch (e) { error = e; }
    expect(error).to.be.instanceOf(TokenizerError);
    expect((error as Error).message).to.match(new RegExp(`^'${join(bad, 'tokenizer.json')}' is not valid JSON: `));
    await rm(bad, { recursive: true, force: true });
    const tok = CharTokenizer.fromText('ab');
    expect(() => tok.decode([1, 3])).to.throw('`CharTokenizer.decode()`: id 3 at position 1 is not in [0, 3)');
  });

  it('describes characters for messages', () => {
    expect(describeChar('é')).to.equal("'é' (U+00E9)");
    expect(describeChar('\t')).to.equal('(U+0009)');
    expect(describeChar('\u{1D11E}')).to.equal("'\u{1D11E}' (U+1D11E)");
  });
});
