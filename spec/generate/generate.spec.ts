/**
 * generate(): with the KV cache it gives the tokens a full forward pass per step gives (greedy and
 * seeded sampling, GQA and a sliding window); seeds repeat; EOS ids, stop strings and max_new_tokens
 * end it; text and chat prompts go through the tokenizer; settings come from generation_config.json;
 * nothing is left behind; every bad argument is one clear error.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HFTokenizer } from '../../src/data/hf_tokenizer.js';
import { CharTokenizer } from '../../src/data/tokenizer.js';
import { generate, type GenerationOptions, type GenerationPrompt } from '../../src/generate/generate.js';
import { GenerationConfigError, generationConfigFromJSON } from '../../src/generate/generation_config.js';
import { readGenerationConfig } from '../../src/generate/generation_config_file.js';
import type { MoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { generateGreedy } from '../../src/train/evaluate.js';
import { smallBPETokenizerJSON } from '../data/small_bpe.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { cleanup, fixtureDir, tempDir } from '../io/checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';
import { MIXTRAL_WINDOW, QWEN3_TINY, seededModel } from './models.js';

const PROMPT = [3, 17, 5, 9, 22];
/** 22 characters + the unknown token: the 23 ids of the tiny models */
const CHARS = CharTokenizer.fromText('abcdefghijklmnopqrstuv');

async function ids(model: MoECausalLM, prompt: GenerationPrompt, options: GenerationOptions): Promise<number[]> {
  return Array.from((await generate(model, prompt, options)).ids);
}

describe('generate/generate', () => {
  const models = new Map<string, MoECausalLM>();
  let dir: string;
  before(async () => {
    models.set('qwen3', await seededModel(QWEN3_TINY, 5));
    models.set('mixtral', await seededModel(MIXTRAL_WINDOW, 5));
    // MLA (deepseek_v3) and partial rotary (glm4_moe) keep their own keys in the cache
    for (const arch of ['deepseek_v3', 'glm4_moe']) models.set(arch, await loadHFCheckpoint(fixtureDir(arch)));
    dir = await tempDir('generate-');
  });
  after(async () => {
    for (const m of models.values()) m.dispose();
    await cleanup();
  });

  for (const name of ['qwen3', 'mixtral', 'deepseek_v3', 'glm4_moe']) {
    it(`${name}: the KV cache gives the tokens of a full forward pass per step, greedy and sampled`, async () => {
      const model = models.get(name)!;
      const before = tf.memory().numTensors;
      const greedy = await ids(model, PROMPT, { maxNewTokens: 10 });
      expect(greedy).to.deep.equal(await ids(model, PROMPT, { maxNewTokens: 10, useCache: false }));
      // and those of the old greedy loop (one full pass a step, synchronous reads)
      expect(greedy).to.deep.equal(Array.from(await generateGreedy(model, Int32Array.from(PROMPT), { maxNewTokens: 10 })));
      expect(new Set(greedy).size, 'a sequence that shows a wrong step').to.be.above(1);
      const sampling = { maxNewTokens: 10, temperature: 1.5, topK: 10, topP: 0.95, seed: 3 };
      const sampled = await ids(model, PROMPT, sampling);
      expect(sampled).to.deep.equal(await ids(model, PROMPT, { ...sampling, useCache: false }));
      expect(sampled).to.not.deep.equal(greedy);
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    });
  }

  it('a seed gives the same tokens every time; other seeds give others', async () => {
    const model = models.get('qwen3')!;
    const run = (seed: number) => ids(model, PROMPT, { maxNewTokens: 6, temperature: 2, seed });
    const first = await run(1);
    expect(await run(1)).to.deep.equal(first);
    const others = await Promise.all([2, 3, 4].map(run));
    expect(others.some(o => JSON.stringify(o) !== JSON.stringify(first))).to.equal(true);
    const result = await generate(model, PROMPT, { maxNewTokens: 2, temperature: 2, seed: 1 });
    expect(result.sampling).to.deep.equal({ temperature: 2, topK: 50, topP: 1, seed: 1 });
    // temperature 0 is greedy
    expect((await generate(model, PROMPT, { maxNewTokens: 10, temperature: 0 })).sampling).to.equal(null);
    expect(await ids(model, PROMPT, { maxNewTokens: 6, temperature: 0 })).to.deep.equal(await ids(model, PROMPT, { maxNewTokens: 6 }));
  });

  it('stops at an EOS id (kept in ids, not in text), at a stop string (text ends before it), or at maxNewTokens', async () => {
    const model = models.get('mixtral')!;
    const full = await generate(model, PROMPT, { maxNewTokens: 12, tokenizer: CHARS });
    expect(full.finishReason).to.equal('length');
    expect(full.ids).to.have.length(12);
    expect(full.text).to.equal(CHARS.decode(full.ids));
    const g = Array.from(full.ids);
    const k = g.findIndex((id, i) => i >= 2 && !g.slice(0, i).includes(id));
    const eos = await generate(model, PROMPT, { maxNewTokens: 12, tokenizer: CHARS, eosTokenIds: [g[k]] });
    expect(eos).to.deep.include({ finishReason: 'eos', stopString: null, text: CHARS.decode(g.slice(0, k)) });
    expect(Array.from(eos.ids)).to.deep.equal(g.slice(0, k + 1));
    const stop = full.text!.slice(3, 5);
    const at = full.text!.indexOf(stop);
    const stopped = await generate(model, PROMPT, { maxNewTokens: 12, tokenizer: CHARS, stopStrings: ['zz-not-there', stop] });
    expect(stopped).to.deep.include({ finishReason: 'stop', stopString: stop, text: full.text!.slice(0, at) });
    expect(Array.from(stopped.ids)).to.deep.equal(g.slice(0, at + stop.length));
    // ids past the tokenizer's vocabulary (a padded model vocabulary) have no text, as in HF's decode
    const small = CharTokenizer.fromText('abcde');
    const padded = await generate(model, PROMPT, { maxNewTokens: 12, tokenizer: small });
    expect(Array.from(padded.ids)).to.deep.equal(g);
    expect(padded.text).to.equal(small.decode(g.filter(id => id < small.vocabSize)));
    // a text prompt is encoded by the tokenizer
    const text = await generate(model, CHARS.decode(PROMPT), { maxNewTokens: 12, tokenizer: CHARS });
    expect(Array.from(text.promptIds)).to.deep.equal(PROMPT);
    expect(text.text).to.equal(full.text);
  });

  it('a chat prompt is rendered by the chat template with the generation prompt', async () => {
    const tokenizer = HFTokenizer.fromFiles({
      tokenizer: JSON.stringify(smallBPETokenizerJSON('user assistant hello there', 4)),
      config: JSON.stringify({
        eos_token: '<|endoftext|>',
        chat_template: "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
      }),
    });
    const model = await seededModel({ ...QWEN3_TINY, vocab_size: tokenizer.vocabSize }, 1);
    try {
      const messages = [{ role: 'user', content: 'hello' }];
      const r = await generate(model, messages, { tokenizer, maxNewTokens: 3 });
      expect(tokenizer.decode(r.promptIds)).to.equal('user: hello\nassistant:');
      expect(r.ids).to.have.length.within(1, 3);
      // the tokenizer's EOS ends generation when nothing else names one
      const first = r.ids[0];
      const withEos = HFTokenizer.fromFiles({ tokenizer: tokenizer.files.tokenizer, config: tokenizer.files.config },
          { modelEosTokenIds: first });
      expect((await generate(model, messages, { tokenizer: withEos, maxNewTokens: 3 })).finishReason).to.equal('eos');
    } finally {
      model.dispose();
    }
  });

  it('takes EOS ids and sampling defaults from generation_config.json, else config.json', async () => {
    const model = models.get('qwen3')!;
    const folder = join(dir, 'gen-config');
    await mkdir(folder, { recursive: true });
    expect(await readGenerationConfig(folder)).to.deep.equal({});
    await writeFile(join(folder, 'config.json'), JSON.stringify({ eos_token_id: 4, temperature: 0.3 }));
    expect(await readGenerationConfig(folder)).to.deep.equal({ eosTokenIds: [4] });
    await writeFile(join(folder, 'generation_config.json'),
        JSON.stringify({ eos_token_id: [7, 8], do_sample: true, temperature: 0.6, top_k: 20, top_p: 0.9, max_new_tokens: 6 }));
    const config = await readGenerationConfig(folder);
    expect(config).to.deep.equal({ eosTokenIds: [7, 8], doSample: true, temperature: 0.6, topK: 20, topP: 0.9, maxNewTokens: 6 });
    const r = await generate(model, PROMPT, { generationConfig: { ...config, eosTokenIds: [] }, seed: 5 });
    expect(r.sampling).to.deep.equal({ temperature: 0.6, topK: 20, topP: 0.9, seed: 5 });
    expect(r.ids).to.have.length(6);
    // an option wins over the file; doSample false is greedy
    expect((await generate(model, PROMPT, { generationConfig: config, doSample: false, maxNewTokens: 1 })).sampling).to.equal(null);
    const greedy = await ids(model, PROMPT, { maxNewTokens: 6 });
    const eos = await generate(model, PROMPT, { generationConfig: { eosTokenIds: [greedy[1]] } });
    expect(eos.finishReason).to.equal('eos');
    expect(eos.ids).to.have.length(greedy.indexOf(greedy[1]) + 1);
  });

  it('refuses bad generation configs with the file and key', () => {
    const bad: Array<[unknown, string]> = [
      [[1], "'g' must hold a JSON object but holds"],
      [{ eos_token_id: 'x' }, "'g': 'eos_token_id' must be a token id or a list of token ids but is"],
      [{ eos_token_id: [1, -2] }, "'g': 'eos_token_id' must be a token id or a list of token ids but is"],
      [{ do_sample: 'yes' }, "'g': 'do_sample' must be a boolean but is"],
      [{ temperature: -1 }, "'g': 'temperature' must be a number >= 0 but is"],
      [{ top_p: 0 }, "'g': 'top_p' must be a number in (0, 1] but is"],
      [{ top_k: 2.5 }, "'g': 'top_k' must be an integer >= 0 but is"],
      [{ max_new_tokens: 0 }, "'g': 'max_new_tokens' must be an integer >= 1 but is"],
    ];
    for (const [json, message] of bad) {
      expect(() => generationConfigFromJSON(json, "'g'")).to.throw(GenerationConfigError, message);
    }
  });

  it('refuses bad arguments, each with one message naming it', async () => {
    const model = models.get('qwen3')!;
    const before = tf.memory().numTensors;
    const bad: Array<[GenerationPrompt, GenerationOptions, string]> = [
      ['hi', {}, "a text prompt needs 'options.tokenizer' (or give token ids)"],
      [[{ role: 'user', content: 'hi' }], {}, "a chat prompt needs 'options.tokenizer' (or give token ids)"],
      [[{ role: 'user', content: 'hi' }], { tokenizer: CHARS }, "a chat prompt needs an HFTokenizer (with a chat template) as 'options.tokenizer'"],
      [null as unknown as GenerationPrompt, {}, "'prompt' must be token ids, a text or chat messages but got null"],
      [[1, 2.5], {}, "'prompt' must hold integer token ids but prompt[1] is 2.5"],
      [[], {}, "'prompt' must hold at least one token"],
      [[1, 99], {}, "'prompt' must hold token ids in [0, 22] (vocab size 23) but holds 99 at index 1"],
      [PROMPT, { maxNewTokens: -1 }, "'maxNewTokens' must be >= 0 but got -1"],
      [PROMPT, { stopStrings: [''] }, "'stopStrings' must be a list of non-empty strings but got"],
      [PROMPT, { stopStrings: ['a'] }, "'stopStrings' need 'options.tokenizer' to decode the new tokens"],
      [PROMPT, { eosTokenIds: [0.5] }, "'eosTokenIds' must be a list of token ids but got"],
      [PROMPT, { doSample: 'yes' as unknown as boolean }, "'doSample' must be a boolean but got"],
      [PROMPT, { temperature: 1, topP: 2 }, "'topP' must be in (0, 1] but got 2"],
      [PROMPT, { temperature: 1, seed: -1 }, "'seed' must be >= 0 but got -1"],
    ];
    for (const [prompt, options, message] of bad) {
      const e = await rejection(generate(model, prompt, options));
      expect(e.message, message).to.include(`\`generate()\`: ${message}`);
    }
    expect((await rejection(generate(model, PROMPT, null as unknown as GenerationOptions))).message)
        .to.include("`generate()`: 'options' must be an object but got null");
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('a model without RotaryAttention generates without a cache; asking it for one is refused', async () => {
    const model = tfl.sequential({ layers: [tfl.layers.embedding({ inputDim: 5, outputDim: 5, inputShape: [null as unknown as number] })] });
    tf.tidy(() => model.setWeights([tf.reverse(tf.eye(5), 1)]));  // the logits favour id 4 − last id
    try {
      expect(await ids(model, [1], { maxNewTokens: 3 })).to.deep.equal([3, 1, 3]);
      expect((await rejection(generate(model, [1], { useCache: true }))).message).to.equal(
          `\`generate()\`: 'useCache' needs RotaryAttention or MLAAttention layers (they keep the cache) but the model '${model.name}' has none; pass useCache: false`);
    } finally {
      model.dispose();
    }
  });
});
