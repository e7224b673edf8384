/** Tokenizers (real Hugging Face ones and the character one), chat templates, and synthetic training text (Tala). */
export { SeededRandom } from './random.js';
export {
  generateCorpus, accusative, perfective, BASE_LEXICON, TARGET_LEXICON, QUESTION_PARTICLE, CORPUS_STYLES,
  EXAMPLE_CORPORA, type Corpus, type CorpusOptions, type CorpusStyle, type Lexicon,
} from './synthetic.js';
export {
  CharTokenizer, TokenizerError, describeChar, TOKENIZER_FILE, UNKNOWN_TOKEN, type CharTokenizerJSON,
} from './tokenizer.js';
export { readTokenizer, writeTokenizer, tokenizerFiles } from './tokenizer_file.js';
export type { TextTokenizer, EncodeOptions, DecodeOptions } from './text_tokenizer.js';
export {
  HFTokenizer, TOKENIZER_CONFIG_FILE, CHAT_TEMPLATE_FILE, type HFTokenizerFiles, type HFTokenizerOptions,
} from './hf_tokenizer.js';
export { ChatTemplate, checkChatMessages, type ChatMessage, type ChatTemplateOptions } from './chat_template.js';
