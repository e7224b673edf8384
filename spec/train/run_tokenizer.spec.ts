/**
 * `train --model DIR` where DIR's tokenizer.json is a real byte-level BPE file (the layout every
 * Qwen/Mixtral/DeepSeek/gpt-oss checkpoint ships), not the character tokenizer: LoRA and full
 * fine-tuning train on its ids and save, the full save carries the tokenizer's own files, and a
 * tokenizer larger than the model's vocab_size is refused before training.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { HFTokenizer } from '../../src/data/hf_tokenizer.js';
import { readTokenizer } from '../../src/data/tokenizer_file.js';
import { saveHFCheckpoint } from '../../src/io/hf_save.js';
import { buildMoECausalLM } from '../../src/layers/moe_causal_lm.js';
import { seedModelInit } from '../../src/train/seeded_init.js';
import type { TrainRunResult } from '../../src/train/run.js';
import { runMain } from '../cli/run_cli.js';
import { END_OF_TEXT, smallBPETokenizerJSON } from '../data/small_bpe.js';
import { cleanup, tempDir } from '../io/checkpoint_helpers.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';
const TEXT = 'la miro vidi so tasel. ka en vora lupa la kemi?\n'.repeat(8);
const BPE = `${JSON.stringify(smallBPETokenizerJSON(TEXT, 30))}\n`;
const TOKENIZER_CONFIG = `${JSON.stringify({ eos_token: END_OF_TEXT, chat_template: '{{ messages[0].content }}' })}\n`;
const BPE_VOCAB = 256 + 30 + 1;
const TINY_CONFIG = {
  model_type: 'qwen3_moe', hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, num_key_value_heads: 1,
  head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8, intermediate_size: 16, norm_topk_prob: true,
  rms_norm_eps: 1e-6,
};

/** A tiny model folder whose tokenizer is the BPE file, with `vocabSize` output rows. */
async function bpeModelFolder(dir: string, vocabSize: number): Promise<string> {
  const model = buildMoECausalLM({ ...TINY_CONFIG, vocab_size: vocabSize });
  try {
    await seedModelInit(model, 3, 0.02);
    await saveHFCheckpoint(model, dir, { extraFiles: { 'tokenizer.json': BPE, 'tokenizer_config.json': TOKENIZER_CONFIG } });
  } finally {
    model.dispose();
  }
  return dir;
}

describe('train/run with a real BPE tokenizer', () => {
  let dir: string;
  let data: string;
  let model: string;
  let tokens: number;
  const common = () => ['--data', data, '--steps', '2', '--batch', '2', '--seq', '8', '--backend', BACKEND, '--json'];

  before(async () => {
    dir = await tempDir('bpe-train-');
    data = join(dir, 'data.txt');
    await writeFile(data, TEXT);
    model = await bpeModelFolder(join(dir, 'model'), 320);
    const tok = await readTokenizer(model);
    expect(tok).to.be.instanceOf(HFTokenizer);
    tokens = tok.encode(TEXT).length;
    expect(tokens).to.be.lessThan(TEXT.length / 2);  // BPE ids, not characters
  });
  after(cleanup);

  it('LoRA trains on the BPE ids and saves a PEFT adapter', async () => {
    const numTensors = tf.memory().numTensors;
    const out = join(dir, 'adapter');
    const r = await runMain(['train', '--model', model, ...common(), '--lora-rank', '2', '--lora-alpha', '4',
      '--lora-targets', 'experts.gate_up', '--out', out]);
    expect(r.code, r.stderr).to.equal(0);
    const result = JSON.parse(r.stdout) as TrainRunResult;
    expect(result).to.include({ mode: 'lora', steps: 2, vocabSize: BPE_VOCAB, trainTokens: tokens });
    expect(result.losses.every(Number.isFinite)).to.equal(true);
    // an untrained model spreads its guesses over its 320 outputs: the first loss is about ln(320)
    expect(result.firstLoss!).to.be.closeTo(Math.log(320), 0.5);
    expect((await readdir(out)).sort()).to.deep.equal(['adapter_config.json', 'adapter_model.safetensors']);
    expect(tf.memory().numTensors).to.equal(numTensors);
  });

  it('full fine-tuning saves the tokenizer\'s own files beside the weights, unchanged', async () => {
    const out = join(dir, 'full');
    const r = await runMain(['train', '--model', model, ...common(), '--out', out]);
    expect(r.code, r.stderr).to.equal(0);
    const result = JSON.parse(r.stdout) as TrainRunResult;
    expect(result).to.include({ mode: 'full', steps: 2, trainTokens: tokens });
    expect(result.files).to.deep.equal(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    expect((await readdir(out)).sort()).to.deep.equal(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    expect(await readFile(join(out, 'tokenizer.json'), 'utf8')).to.equal(BPE);
    expect(await readFile(join(out, 'tokenizer_config.json'), 'utf8')).to.equal(TOKENIZER_CONFIG);
  });

  it('refuses a tokenizer with more ids than the model\'s vocab_size, before training', async () => {
    const small = await bpeModelFolder(join(dir, 'small'), 200);
    const r = await runMain(['train', '--model', small, ...common(), '--out', join(dir, 'never')]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.equal(`tfjs-moe-lora: error: '${join(small, 'tokenizer.json')}' has ${BPE_VOCAB} tokens but the ` +
        "model's vocab_size is 200\n");
    expect(await readdir(dir)).to.not.include('never');
  });
});
