/**
 * What training, evaluation and generation need from a tokenizer, whichever kind a model folder
 * holds: a real Hugging Face tokenizer (HFTokenizer) or the character tokenizer used to train tiny
 * models from scratch (CharTokenizer). No Node dependency.
 */

export interface EncodeOptions {
  /**
   * add the special tokens the tokenizer adds around a text (BOS, ...), as transformers'
   * `encode(text, add_special_tokens=True)` does; default true
   */
  addSpecialTokens?: boolean;
}

export interface DecodeOptions {
  /** leave special tokens (BOS, EOS, chat markers) out of the text; default false */
  skipSpecialTokens?: boolean;
}

export interface TextTokenizer {
  /** ids are 0..vocabSize-1 (the largest id + 1); a model's vocab_size must be at least this */
  readonly vocabSize: number;
  /** the beginning-of-sequence id, null when the tokenizer has none */
  readonly bosTokenId: number | null;
  /** the ids that end a generation: the tokenizer's EOS first, then those of the model's config.json */
  readonly eosTokenIds: readonly number[];
  /** the padding id, null when the tokenizer has none */
  readonly padTokenId: number | null;
  encode(text: string, options?: EncodeOptions): Int32Array;
  decode(ids: ArrayLike<number>, options?: DecodeOptions): string;
}
