/**
 * The Tala corpora: deterministic, held out, and each register exactly its grammar (checked with
 * recognizers written here from the grammar in the file comment, not with the generator's code).
 */
import { expect } from 'chai';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { SeededRandom } from '../../src/data/random.js';
import {
  accusative, BASE_LEXICON, EXAMPLE_CORPORA, generateCorpus, perfective, QUESTION_PARTICLE, TARGET_LEXICON,
  type CorpusStyle,
} from '../../src/data/synthetic.js';

const any = (words: readonly string[]) => `(?:${words.join('|')})`;

/** The base register's line grammar as a regular expression. */
function baseLineRegExp(): RegExp {
  const L = BASE_LEXICON;
  const np = `${any(L.determiners)} (?:${any(L.adjectives)} )?${any(L.nouns)}`;
  const clause = `${np} ${any(L.verbs)} ${np}(?: ${any(L.prepositions)} ${any(L.determiners)} ${any(L.nouns)})?`;
  const statement = `${clause}(?:, ${any(L.conjunctions)} ${clause})?\\.`;
  const question = `${QUESTION_PARTICLE} ${np} ${any(L.verbs)} ${np}\\?`;
  const sentence = `(?:${statement}|${question})`;
  return new RegExp(`^${sentence}(?: ${sentence})?$`);
}

/** The target register's: verb-final, -n / -en on the object, -ta on the verb. */
function targetLineRegExp(): RegExp {
  const L = TARGET_LEXICON;
  const objects = L.nouns.map(n => ('aeiou'.includes(n[n.length - 1]) ? `${n}n` : `${n}en`));
  const clause = `${any(L.nouns)}(?: ${any(L.adjectives)})? ${any(objects)}(?: ${any(L.adjectives)})? ${any(L.verbs.map(v => `${v}ta`))}`;
  return new RegExp(`^${clause}(?: i ${clause})?\\.$`);
}

const lines = (text: string) => {
  expect(text.endsWith('\n'), 'the text ends with a newline').to.equal(true);
  return text.slice(0, -1).split('\n');
};

const SMALL = { seed: 5, trainChars: 20_000, valChars: 3_000 };

describe('data/synthetic: the Tala corpora', () => {
  it('is deterministic: the same seed gives the same text, another seed another text', () => {
    for (const style of ['base', 'target'] as const) {
      const a = generateCorpus(style, SMALL);
      const b = generateCorpus(style, SMALL);
      expect(b).to.deep.equal(a);
      const c = generateCorpus(style, { ...SMALL, seed: 6 });
      expect(c.train).to.not.equal(a.train);
      expect(c.val).to.not.equal(a.val);
    }
  });

  it('writes at least the asked-for characters, stopping at the first line that reaches them', () => {
    for (const style of ['base', 'target'] as const) {
      const { train, val } = generateCorpus(style, SMALL);
      expect(train.length).to.be.at.least(SMALL.trainChars);
      expect(train.length - (lines(train).pop()!.length + 1)).to.be.below(SMALL.trainChars);
      expect(val.length).to.be.at.least(SMALL.valChars);
      expect(val.length - (lines(val).pop()!.length + 1)).to.be.below(SMALL.valChars);
    }
  });

  it('holds the validation lines out: none occurs in the training text', () => {
    for (const style of ['base', 'target'] as const) {
      const { train, val } = generateCorpus(style, SMALL);
      const seen = new Set(lines(train));
      expect(lines(val).filter(l => seen.has(l))).to.deep.equal([]);
    }
  });

  it('writes every base line in the base grammar and none in the target grammar', () => {
    const base = baseLineRegExp();
    const target = targetLineRegExp();
    const { train, val } = generateCorpus('base', SMALL);
    for (const l of [...lines(train), ...lines(val)]) {
      expect(base.test(l), `base grammar: ${l}`).to.equal(true);
      expect(target.test(l), `not target grammar: ${l}`).to.equal(false);
    }
  });

  it('writes every target line in the target grammar and none in the base grammar', () => {
    const base = baseLineRegExp();
    const target = targetLineRegExp();
    const { train, val } = generateCorpus('target', SMALL);
    for (const l of [...lines(train), ...lines(val)]) {
      expect(target.test(l), `target grammar: ${l}`).to.equal(true);
      expect(base.test(l), `not base grammar: ${l}`).to.equal(false);
    }
  });

  it('uses every production: questions, compounds, prepositions, adjectives, and only a subset of the words in the target', () => {
    const base = lines(generateCorpus('base', SMALL).train).join('\n');
    expect(base).to.match(/(^|\s)ka /).and.to.match(/\?/).and.to.match(/, (i|mas) /);
    for (const p of BASE_LEXICON.prepositions) expect(base).to.include(` ${p} `);
    for (const w of [...BASE_LEXICON.nouns, ...BASE_LEXICON.verbs, ...BASE_LEXICON.adjectives]) expect(base).to.include(w);
    const targetWords = new Set(lines(generateCorpus('target', SMALL).train).join(' ').replace(/\./g, '').split(' '));
    const unused = BASE_LEXICON.nouns.filter(n => !TARGET_LEXICON.nouns.includes(n));
    expect(unused.length).to.equal(12);
    for (const n of unused) {
      expect(targetWords.has(n) || targetWords.has(`${n}n`) || targetWords.has(`${n}en`), n).to.equal(false);
    }
    for (const d of BASE_LEXICON.determiners) expect(targetWords.has(d), `no determiner '${d}'`).to.equal(false);
  });

  it('shares one alphabet: every character of the target text occurs in the base text', () => {
    const base = new Set(generateCorpus('base', SMALL).train);
    const target = new Set(generateCorpus('target', SMALL).train);
    expect([...target].filter(c => !base.has(c))).to.deep.equal([]);
  });

  it('marks objects and verbs with the suffixes of the grammar', () => {
    expect(accusative('miro')).to.equal('miron');
    expect(accusative('tasel')).to.equal('taselen');
    expect(perfective('vidi')).to.equal('vidita');
  });

  it('rejects a bad style, seed or size', () => {
    expect(() => generateCorpus('poem' as CorpusStyle, SMALL))
        .to.throw("`generateCorpus()`: 'style' must be one of 'base', 'target' but got 'poem'");
    expect(() => generateCorpus('base', { ...SMALL, seed: -1 })).to.throw("`generateCorpus()`: 'seed' must be >= 0 but got -1");
    expect(() => generateCorpus('base', { ...SMALL, trainChars: 0 })).to.throw("`generateCorpus()`: 'trainChars' must be >= 1 but got 0");
    expect(() => generateCorpus('base', { ...SMALL, valChars: 1.5 }))
        .to.throw("`generateCorpus()`: 'valChars' must be an integer but got 1.5 (number)");
  });

  it('the files in examples/data are what examples/make_data.ts generates', () => {
    for (const style of ['base', 'target'] as const) {
      const corpus = generateCorpus(style, EXAMPLE_CORPORA[style]);
      for (const split of ['train', 'val'] as const) {
        const path = join('examples', 'data', `${style}_${split}.txt`);
        // base_train.txt is not committed (only retraining the shipped model needs it)
        if (style === 'base' && split === 'train' && !existsSync(path)) continue;
        expect(readFileSync(path, 'utf8') === corpus[split], `${path} is up to date`).to.equal(true);
      }
    }
  });
});

describe('data/random: SeededRandom', () => {
  it('repeats its stream for a seed and spreads int(n) over [0, n)', () => {
    const a = new SeededRandom(42);
    const b = new SeededRandom(42);
    const xs = Array.from({ length: 2000 }, () => a.int(10));
    expect(Array.from({ length: 2000 }, () => b.int(10))).to.deep.equal(xs);
    const counts = Array<number>(10).fill(0);
    xs.forEach(x => counts[x]++);
    for (const c of counts) expect(c).to.be.within(150, 250);
  });

  it('weighted() follows the weights', () => {
    const rng = new SeededRandom(3);
    const picks = Array.from({ length: 4000 }, () => rng.weighted([['a', 3], ['b', 1]] as const));
    expect(picks.filter(p => p === 'a').length / 4000).to.be.within(0.72, 0.78);
  });

  it('rejects a seed that is not a 32-bit unsigned integer', () => {
    expect(() => new SeededRandom(2 ** 32)).to.throw("`SeededRandom()`: 'seed' must be <= 4294967295 but got 4294967296");
    expect(() => new SeededRandom(0.5)).to.throw("`SeededRandom()`: 'seed' must be an integer but got 0.5 (number)");
  });
});
