/** The page's tokenizer.json reader: character vocabularies, word vocabularies, unknowns. */
import { expect } from 'chai';
import { tokenizerFromJSON } from '../../examples/browser/tokenizer.js';

describe('examples/browser/tokenizer.ts', () => {
  it('encodes a character vocabulary character by character, WordLevel type or not, and decodes back', () => {
    const vocab = { '<unk>': 0, a: 1, b: 2, ' ': 3, '.': 4, '\n': 5 };
    for (const type of ['WordLevel', 'BPE']) {
      const tok = tokenizerFromJSON({ model: { type, vocab, unk_token: '<unk>' } });
      expect(tok.vocabSize).to.equal(6);
      expect(tok.encode('ab ba.\n')).to.deep.equal([1, 2, 3, 2, 1, 4, 5]);
      expect(tok.encode('axb')).to.deep.equal([1, 0, 2]);
      expect(tok.decode([1, 2, 3, 2, 1, 4])).to.equal('ab ba.');
    }
  });

  it('splits words and punctuation runs for a WordLevel vocabulary of words', () => {
    const tok = tokenizerFromJSON({
      model: { type: 'WordLevel', vocab: { '[UNK]': 0, miro: 1, vidi: 2, '.': 3 }, unk_token: '[UNK]' },
      added_tokens: [{ id: 4, content: '[PAD]' }],
    });
    expect(tok.vocabSize).to.equal(5);
    expect(tok.encode('miro vidi kemi.')).to.deep.equal([1, 2, 0, 3]);
    expect(tok.decode([1, 2, 3])).to.equal('miro vidi .');
  });

  it('takes the longest vocabulary match first, and a vocabulary given as a list', () => {
    const tok = tokenizerFromJSON({ model: { type: 'Unigram', vocab: [['a', 0], ['ab', 0], ['abc', 0], ['c', 0]] } });
    expect(tok.encode('abcab')).to.deep.equal([2, 1]);
    expect(tok.encode('cxa')).to.deep.equal([3, 0]);  // no unk token: unknown characters are dropped
  });

  it('names what it cannot read', () => {
    expect(() => tokenizerFromJSON({ model: { type: 'BPE' } }))
        .to.throw('tokenizer.json: expected model.vocab (an object or a list) but got undefined');
    expect(() => tokenizerFromJSON(null)).to.throw('tokenizer.json: expected model.vocab');
  });
});
