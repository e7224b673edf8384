/**
 * Text in Tala, a small language invented for this project (every word below is made up here),
 * in two registers that share one alphabet but differ in grammar and vocabulary, so a model
 * trained on the first has something to learn from the second:
 *
 * - 'base' (the story register), subject–verb–object with determiners:
 *     line      := sentence (' ' sentence)?
 *     sentence  := clause (', ' conj ' ' clause)? '.'  |  'ka ' np ' ' verb ' ' np '?'
 *     clause    := np ' ' verb ' ' np (' ' prep ' ' det ' ' noun)?
 *     np        := det (' ' adj)? ' ' noun
 *   "la kali miro vidi so tasel ap en reso. ka en vora lupa la kemi?"
 *
 * - 'target' (the ledger register), verb-final, no determiners, adjectives after their noun, the
 *   object marked with the accusative suffix (-n after a vowel, -en after a consonant), the verb
 *   with the perfective suffix -ta, and only a subset of the words (TARGET_LEXICON):
 *     line      := clause (' i ' clause)? '.'
 *     clause    := noun (' ' adj)? ' ' noun-ACC (' ' adj)? ' ' verb-ta
 *   "miro kali taselen vidita i vora kemin musa lupata."
 *
 * Every character of the target register occurs in the base register, so a tokenizer built
 * from base text covers target text. Lines end with '\n'.
 */
import { assertInteger, assertOneOf } from '../ops/validate.js';
import { SeededRandom } from './random.js';

export const CORPUS_STYLES = ['base', 'target'] as const;
export type CorpusStyle = typeof CORPUS_STYLES[number];

export interface Lexicon {
  determiners: readonly string[];
  nouns: readonly string[];
  verbs: readonly string[];
  adjectives: readonly string[];
  prepositions: readonly string[];
  conjunctions: readonly string[];
}

/** The base register's words. */
export const BASE_LEXICON: Lexicon = {
  determiners: ['la', 'so', 'en'],
  nouns: [
    'miro', 'tasel', 'vora', 'kemi', 'dunal', 'pesa', 'lorin', 'safu', 'nimel', 'boro',
    'teka', 'ulan', 'gima', 'reso', 'falin', 'hoda', 'zemi', 'kavo', 'wesa', 'jonu',
  ],
  verbs: ['vidi', 'takar', 'mosen', 'lupa', 'ferin', 'golo', 'sitak', 'namu', 'ravel', 'bekal', 'hisu', 'dorem'],
  adjectives: ['kali', 'musa', 'tiren', 'vasko', 'pelu', 'runda', 'sefi', 'gonar', 'lita', 'bovi'],
  prepositions: ['ap', 'nel', 'ostu', 'ri'],
  conjunctions: ['i', 'mas'],
};

/** The question particle of the base register. */
export const QUESTION_PARTICLE = 'ka';

/** The target register's words: a subset of the base lexicon, used in other forms. */
export const TARGET_LEXICON: Lexicon = {
  determiners: [],
  nouns: BASE_LEXICON.nouns.slice(0, 8),
  verbs: BASE_LEXICON.verbs.slice(0, 5),
  adjectives: BASE_LEXICON.adjectives.slice(0, 4),
  prepositions: [],
  conjunctions: ['i'],
};

/** A noun marked as the object: -n after a vowel, -en after a consonant. */
export function accusative(noun: string): string {
  return /[aeiou]$/.test(noun) ? `${noun}n` : `${noun}en`;
}

/** A verb in the perfective (-ta). */
export function perfective(verb: string): string {
  return `${verb}ta`;
}

function baseNounPhrase(rng: SeededRandom): string {
  const L = BASE_LEXICON;
  const adj = rng.chance(0.35) ? `${rng.pick(L.adjectives)} ` : '';
  return `${rng.pick(L.determiners)} ${adj}${rng.pick(L.nouns)}`;
}

function baseClause(rng: SeededRandom): string {
  const L = BASE_LEXICON;
  let clause = `${baseNounPhrase(rng)} ${rng.pick(L.verbs)} ${baseNounPhrase(rng)}`;
  if (rng.chance(0.4)) clause += ` ${rng.pick(L.prepositions)} ${rng.pick(L.determiners)} ${rng.pick(L.nouns)}`;
  return clause;
}

function baseSentence(rng: SeededRandom): string {
  if (rng.chance(0.2)) {
    return `${QUESTION_PARTICLE} ${baseNounPhrase(rng)} ${rng.pick(BASE_LEXICON.verbs)} ${baseNounPhrase(rng)}?`;
  }
  const first = baseClause(rng);
  return rng.chance(0.25) ? `${first}, ${rng.pick(BASE_LEXICON.conjunctions)} ${baseClause(rng)}.` : `${first}.`;
}

function baseLine(rng: SeededRandom): string {
  return rng.chance(0.35) ? `${baseSentence(rng)} ${baseSentence(rng)}` : baseSentence(rng);
}

function targetClause(rng: SeededRandom): string {
  const L = TARGET_LEXICON;
  const adj = () => (rng.chance(0.3) ? ` ${rng.pick(L.adjectives)}` : '');
  const subject = `${rng.pick(L.nouns)}${adj()}`;
  const object = `${accusative(rng.pick(L.nouns))}${adj()}`;
  return `${subject} ${object} ${perfective(rng.pick(L.verbs))}`;
}

function targetLine(rng: SeededRandom): string {
  return rng.chance(0.3) ? `${targetClause(rng)} i ${targetClause(rng)}.` : `${targetClause(rng)}.`;
}

const LINE: Readonly<Record<CorpusStyle, (rng: SeededRandom) => string>> = { base: baseLine, target: targetLine };

export interface CorpusOptions {
  /** PRNG seed (integer >= 0); the same seed gives the same text */
  seed: number;
  /** the training text's length: lines are added until it has at least this many characters */
  trainChars: number;
  /** the validation text's length, likewise */
  valChars: number;
}

export interface Corpus {
  style: CorpusStyle;
  train: string;
  /** held-out text: no line of it occurs in `train` */
  val: string;
}

/**
 * A training text and a held-out validation text in one register of Tala. Both come from one
 * PRNG stream (train first); a validation line that also occurs in the training text is drawn
 * again, so the validation loss measures the grammar learnt, not lines remembered.
 *
 * ```js
 * const {train, val} = generateCorpus('target', {seed: 2, trainChars: 40000, valChars: 6000});
 * train.split('\n')[0];  // e.g. 'kemi boron musa lupata.'
 * ```
 */
export function generateCorpus(style: CorpusStyle, options: CorpusOptions): Corpus {
  const op = 'generateCorpus';
  assertOneOf(op, 'style', style, CORPUS_STYLES);
  assertInteger(op, 'seed', options.seed, 0, 2 ** 32 - 1);
  assertInteger(op, 'trainChars', options.trainChars, 1);
  assertInteger(op, 'valChars', options.valChars, 0);
  const rng = new SeededRandom(options.seed);
  const line = LINE[style];
  const seen = new Set<string>();
  const train: string[] = [];
  let length = 0;
  while (length < options.trainChars) {
    const l = line(rng);
    seen.add(l);
    train.push(l);
    length += l.length + 1;
  }
  const val: string[] = [];
  length = 0;
  while (length < options.valChars) {
    const l = line(rng);
    if (seen.has(l)) continue;
    val.push(l);
    length += l.length + 1;
  }
  const text = (lines: string[]) => lines.map(l => `${l}\n`).join('');
  return { style, train: text(train), val: text(val) };
}

/** The corpora the shipped model and the example use (examples/make_data.ts writes them). */
export const EXAMPLE_CORPORA: Readonly<Record<CorpusStyle, CorpusOptions>> = {
  base: { seed: 1, trainChars: 400_000, valChars: 8_000 },
  target: { seed: 2, trainChars: 40_000, valChars: 6_000 },
};
