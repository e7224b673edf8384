/** Synthetic training text (the Tala language) and the character tokenizer saved with models. */
export { SeededRandom } from './random.js';
export {
  generateCorpus, accusative, perfective, BASE_LEXICON, TARGET_LEXICON, QUESTION_PARTICLE, CORPUS_STYLES,
  EXAMPLE_CORPORA, type Corpus, type CorpusOptions, type CorpusStyle, type Lexicon,
} from './synthetic.js';
export {
  CharTokenizer, TokenizerError, describeChar, TOKENIZER_FILE, UNKNOWN_TOKEN, type CharTokenizerJSON,
} from './tokenizer.js';
export { readTokenizer, writeTokenizer } from './tokenizer_file.js';
