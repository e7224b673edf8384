/** Tokenizers (real Hugging Face ones and the character one), chat templates, jsonl datasets, and synthetic training text (Tala). */
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
export {
  loadDatasets, datasetBatches, evaluationBatches, epochBatchCount,
  type DatasetSpec, type LoadDatasetsOptions, type TokenizedDataset, type DatasetBatchSource,
} from './datasets.js';
export { DatasetError } from './datasets_error.js';
export { DATASET_TYPES, type DatasetType } from './datasets_formats.js';
export type { TokenizedSample } from './datasets_rows.js';
