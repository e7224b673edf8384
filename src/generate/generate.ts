/**
 * Text generation: greedy or sampled (temperature, top-k, top-p, seeded) next tokens until an EOS
 * id, a stop string or max_new_tokens, with a KV cache so each step runs the model on its one new
 * token. Reads from the device only asynchronously (`await t.data()`), so it runs on webgpu too.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import type { ChatMessage } from '../data/chat_template.js';
import { HFTokenizer } from '../data/hf_tokenizer.js';
import { SeededRandom } from '../data/random.js';
import type { TextTokenizer } from '../data/text_tokenizer.js';
import { RotaryAttention } from '../layers/attention.js';
import { MLAAttention } from '../layers/mla_attention.js';
import { assertTokenIds } from '../layers/embedding.js';
import { hfConfigOf } from '../layers/moe_causal_lm.js';
import { withSequenceContext } from '../layers/sequence_context.js';
import { assertInteger, fail } from '../ops/validate.js';
import { vocabSizeOf } from '../train/loss.js';
import { describeValue } from '../util/describe.js';
import { generationConfigFromJSON, type GenerationConfig } from './generation_config.js';
import { KVCache } from './kv_cache.js';
import { checkSamplingSettings, drawToken, processLogits, type SamplingSettings } from './sampling.js';

/** token ids, a text (encoded by the tokenizer) or chat messages (rendered by its chat template) */
export type GenerationPrompt = ArrayLike<number> | string | ChatMessage[];

export interface GenerationOptions {
  /** encodes a text or chat prompt, decodes the result, and gives the EOS ids when nothing else does */
  tokenizer?: TextTokenizer;
  /** the model folder's settings (readGenerationConfig): defaults for everything below */
  generationConfig?: GenerationConfig;
  /** tokens to add at most; default generationConfig.maxNewTokens, else 128 */
  maxNewTokens?: number;
  /**
   * sample (true) or take the most likely token (false). Default: false when temperature is 0,
   * true when temperature, topK or topP is given, else generationConfig.doSample, else false.
   */
  doSample?: boolean;
  /** default generationConfig.temperature, else 1; 0 means greedy */
  temperature?: number;
  /** default generationConfig.topK, else 50 (transformers' default); 0 = off */
  topK?: number;
  /** default generationConfig.topP, else 1 (off) */
  topP?: number;
  /** the sampling seed (an integer in [0, 2^32)): the same seed, the same tokens; default a random one */
  seed?: number;
  /** the ids that end generation; default generationConfig's, else config.json's, else the tokenizer's */
  eosTokenIds?: readonly number[];
  /** stop once the decoded new text contains one of these (needs the tokenizer); the text ends before it */
  stopStrings?: readonly string[];
  /** leave special tokens out of `text`; default true (as transformers' pipelines decode) */
  skipSpecialTokens?: boolean;
  /** keep keys and values between steps (default true when the model has a RotaryAttention layer) */
  useCache?: boolean;
}

/** Why generation stopped: an EOS id, a stop string, or maxNewTokens. */
export type FinishReason = 'eos' | 'stop' | 'length';

export interface GenerationResult {
  /** the prompt's ids as the model saw them */
  promptIds: Int32Array;
  /** the new ids (an ending EOS id included, as transformers returns it) */
  ids: Int32Array;
  /** the new text (without the EOS token and without the stop string and what followed it); null without a tokenizer */
  text: string | null;
  finishReason: FinishReason;
  /** the stop string that ended generation, else null */
  stopString: string | null;
  /** the sampling settings used, or null for greedy */
  sampling: (SamplingSettings & { seed: number }) | null;
}

const OP = 'generate';

/** The prompt's ids: ids as given, a text encoded (with the special tokens), a chat rendered with its generation prompt. */
function promptIdsOf(prompt: GenerationPrompt, tokenizer: TextTokenizer | undefined): Int32Array {
  const needTokenizer = (what: string) => {
    if (tokenizer === undefined) fail(OP, `a ${what} prompt needs 'options.tokenizer' (or give token ids)`);
    return tokenizer;
  };
  if (typeof prompt === 'string') return needTokenizer('text').encode(prompt);
  if (Array.isArray(prompt) && prompt.length > 0 && typeof prompt[0] === 'object') {
    const tok = needTokenizer('chat');
    if (!(tok instanceof HFTokenizer)) fail(OP, "a chat prompt needs an HFTokenizer (with a chat template) as 'options.tokenizer'");
    return tok.encodeChat(prompt as ChatMessage[], { addGenerationPrompt: true });
  }
  if (prompt === null || typeof prompt !== 'object' || typeof (prompt as ArrayLike<number>).length !== 'number') {
    fail(OP, `'prompt' must be token ids, a text or chat messages but got ${describeValue(prompt)}`);
  }
  const ids = prompt as ArrayLike<number>;
  for (let i = 0; i < ids.length; i++) {
    if (!Number.isInteger(ids[i])) fail(OP, `'prompt' must hold integer token ids but prompt[${i}] is ${describeValue(ids[i])}`);
  }
  return Int32Array.from(ids);
}

/** The EOS ids: given, else the generation config's, else config.json's (kept with the model), else the tokenizer's. */
function eosIdsOf(model: tfl.LayersModel, options: GenerationOptions): readonly number[] {
  if (options.eosTokenIds !== undefined) {
    if (!Array.isArray(options.eosTokenIds) || options.eosTokenIds.some(id => !Number.isInteger(id))) {
      fail(OP, `'eosTokenIds' must be a list of token ids but got ${describeValue(options.eosTokenIds)}`);
    }
    return options.eosTokenIds;
  }
  if (options.generationConfig?.eosTokenIds !== undefined) return options.generationConfig.eosTokenIds;
  const config = hfConfigOf(model);
  if (config?.['eos_token_id'] != null) return generationConfigFromJSON(config, 'the model\'s config.json').eosTokenIds!;
  return options.tokenizer?.eosTokenIds ?? [];
}

/** Greedy (null) or the sampling settings, from the options and the generation config (see GenerationOptions). */
function samplingOf(options: GenerationOptions): (SamplingSettings & { seed: number }) | null {
  const g = options.generationConfig ?? {};
  const temperature = options.temperature ?? g.temperature ?? 1;
  const explicit = options.temperature !== undefined || options.topK !== undefined || options.topP !== undefined;
  const doSample = options.doSample ?? (explicit ? true : g.doSample ?? false);
  if (typeof doSample !== 'boolean') fail(OP, `'doSample' must be a boolean but got ${describeValue(doSample)}`);
  if (temperature === 0 || !doSample) return null;
  const settings = { temperature, topK: options.topK ?? g.topK ?? 50, topP: options.topP ?? g.topP ?? 1 };
  checkSamplingSettings(OP, settings);
  const seed = options.seed ?? Math.floor(Math.random() * 2 ** 32);
  assertInteger(OP, 'seed', seed, 0, 2 ** 32 - 1);
  return { ...settings, seed };
}

/**
 * Generates up to `maxNewTokens` tokens after `prompt`: greedy, or sampled as transformers samples
 * (temperature, top-k, top-p, in that order; seeded), until an EOS id or a stop string. The KV cache
 * is released when it returns (or throws).
 *
 * ```js
 * const tokenizer = await readTokenizer('./Qwen3-30B-A3B');
 * const generationConfig = await readGenerationConfig('./Qwen3-30B-A3B');
 * const r = await generate(model, [{role: 'user', content: 'Hi'}], {tokenizer, generationConfig, seed: 1});
 * r.text;          // the assistant's answer
 * r.finishReason;  // 'eos'
 * ```
 */
export async function generate(model: tfl.LayersModel, prompt: GenerationPrompt, options: GenerationOptions = {}): Promise<GenerationResult> {
  if (options === null || typeof options !== 'object') fail(OP, `'options' must be an object but got ${describeValue(options)}`);
  const { tokenizer } = options;
  const promptIds = promptIdsOf(prompt, tokenizer);
  if (promptIds.length === 0) fail(OP, "'prompt' must hold at least one token");
  assertTokenIds(OP, 'prompt', promptIds, vocabSizeOf(model));
  const maxNewTokens = options.maxNewTokens ?? options.generationConfig?.maxNewTokens ?? 128;
  assertInteger(OP, 'maxNewTokens', maxNewTokens, 0);
  const stopStrings = options.stopStrings ?? [];
  if (!Array.isArray(stopStrings) || stopStrings.some(s => typeof s !== 'string' || s.length === 0)) {
    fail(OP, `'stopStrings' must be a list of non-empty strings but got ${describeValue(options.stopStrings)}`);
  }
  if (stopStrings.length > 0 && tokenizer === undefined) fail(OP, "'stopStrings' need 'options.tokenizer' to decode the new tokens");
  const eos = new Set(eosIdsOf(model, options));
  const sampling = samplingOf(options);
  const hasAttention = model.layers.some(l => l instanceof RotaryAttention || l instanceof MLAAttention);
  const useCache = options.useCache ?? hasAttention;
  if (useCache && !hasAttention) {
    fail(OP, `'useCache' needs RotaryAttention or MLAAttention layers (they keep the cache) but the model '${model.name}' has none; pass useCache: false`);
  }
  const rng = sampling === null ? null : new SeededRandom(sampling.seed);
  // a model's vocabulary is often padded past the tokenizer's: those ids have no text (HF's decode skips them too)
  const decode = (ids: number[]) => tokenizer!.decode(ids.filter(id => id < tokenizer!.vocabSize),
      { skipSpecialTokens: options.skipSpecialTokens !== false });

  const cache = useCache ? new KVCache() : null;
  const ids: number[] = [];
  let finishReason: FinishReason = 'length';
  let stopString: string | null = null;
  let text: string | null = null;
  try {
    let input = promptIds;
    while (ids.length < maxNewTokens) {
      const last = nextTokenLogits(model, input, cache);                 // [V]
      let next: number;
      try {
        next = rng === null ? await argMaxOnDevice(last) : drawToken(processLogits(await last.data(), sampling!), rng);
      } finally {
        last.dispose();
      }
      ids.push(next);
      if (eos.has(next)) {
        finishReason = 'eos';
        break;
      }
      if (stopStrings.length > 0) {
        const sofar = decode(ids);
        const found = firstStop(sofar, stopStrings);
        if (found !== null) {
          finishReason = 'stop';
          stopString = found.stop;
          text = sofar.slice(0, found.index);
          break;
        }
      }
      input = cache === null ? Int32Array.from([...promptIds, ...ids]) : Int32Array.of(next);
    }
  } finally {
    cache?.dispose();
  }
  if (tokenizer !== undefined && text === null) text = decode(finishReason === 'eos' ? ids.slice(0, -1) : ids);
  return { promptIds, ids: Int32Array.from(ids), text, finishReason, stopString, sampling };
}

/** The logits [V] of the token after `input`: one forward pass (over the new tokens only with a cache). */
function nextTokenLogits(model: tfl.LayersModel, input: Int32Array, cache: KVCache | null): tf.Tensor1D {
  return tf.tidy(() => {
    const x = tf.tensor2d(input, [1, input.length], 'int32');
    const logits = withSequenceContext({ kvCache: cache, training: false },
        () => model.apply(x, { training: false })) as tf.Tensor3D;  // [1, S, V]
    const v = logits.shape[2];
    return tf.reshape(tf.slice(logits, [0, input.length - 1, 0], [1, 1, v]), [v]) as tf.Tensor1D;
  });
}

async function argMaxOnDevice(logits: tf.Tensor1D): Promise<number> {
  const index = tf.argMax(logits);
  try {
    return (await index.data())[0];
  } finally {
    index.dispose();
  }
}

/** The stop string that occurs first in `text` (the longest at one index), or null. */
function firstStop(text: string, stops: readonly string[]): { stop: string; index: number } | null {
  let best: { stop: string; index: number } | null = null;
  for (const stop of stops) {
    const index = text.indexOf(stop);
    if (index >= 0 && (best === null || index < best.index || (index === best.index && stop.length > best.stop.length))) best = { stop, index };
  }
  return best;
}
