/**
 * `tfjs-moe-lora train`: from scratch, LoRA and full fine-tuning on a tiny config (3 steps),
 * bad arguments (exit 2, one line), failed runs (exit 1, no stack trace) and Ctrl-C (exit 130,
 * state saved). Most runs call main() in this process; --help and Ctrl-C start the CLI.
 */
import { expect } from 'chai';
import { spawn } from 'node:child_process';
import { readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { CharTokenizer } from '../../src/data/tokenizer.js';
import { readTokenizer } from '../../src/data/tokenizer_file.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import type { TrainRunResult } from '../../src/train/run.js';
import { cleanup, fixtureDir, tempDir } from '../io/checkpoint_helpers.js';
import { writeChatModel } from '../helpers/chat_model.js';
import { runMain, spawnCli, type CliRun } from './run_cli.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';

const TINY_CONFIG = {
  model_type: 'qwen3_moe', hidden_size: 16, num_hidden_layers: 2, num_attention_heads: 2, num_key_value_heads: 1,
  head_dim: 8, num_experts: 4, num_experts_per_tok: 2, moe_intermediate_size: 8, norm_topk_prob: true,
  rms_norm_eps: 1e-6,
};
const TEXT = 'la miro vidi so tasel. ka en vora lupa la kemi?\n'.repeat(8);
const VAL = 'so kemi lupa la miro.\n'.repeat(3);

/** One line on stderr with exit code 2: "tfjs-moe-lora: <message> (see tfjs-moe-lora --help)". */
function expectUsageError(r: CliRun, message: string | RegExp): void {
  expect(r.code, r.stderr).to.equal(2);
  expect(r.stdout).to.equal('');
  const lines = r.stderr.trimEnd().split('\n');
  expect(lines, r.stderr).to.have.length(1);
  expect(lines[0]).to.match(/^tfjs-moe-lora: .* \(see tfjs-moe-lora --help\)$/);
  if (typeof message === 'string') expect(lines[0]).to.include(message);
  else expect(lines[0]).to.match(message);
}

/** Exit code 1 and the message, without a stack trace. */
function expectFailure(r: CliRun, message: string | RegExp): void {
  expect(r.code, r.stderr).to.equal(1);
  expect(r.stderr).to.not.match(/\n\s+at /);
  if (typeof message === 'string') expect(r.stderr).to.include(`tfjs-moe-lora: error: ${message}`);
  else expect(r.stderr).to.match(message);
}

describe('cli/train', () => {
  let dir: string;
  let data: string;
  let val: string;
  let config: string;
  let scratchOut: string;
  /** --data, --steps 3, --batch 2, --seq 8 and --backend, with some replaced */
  const common = (over: Record<string, string> = {}) =>
    Object.entries({ data, steps: '3', batch: '2', seq: '8', backend: BACKEND, ...over }).flatMap(([k, v]) => [`--${k}`, v]);

  before(async () => {
    dir = await tempDir('cli-train-');
    data = join(dir, 'data.txt');
    val = join(dir, 'val.txt');
    config = join(dir, 'config.json');
    await writeFile(data, TEXT);
    await writeFile(val, VAL);
    await writeFile(config, JSON.stringify(TINY_CONFIG));
    scratchOut = join(dir, 'scratch');
  });
  after(cleanup);

  describe('success', () => {
    it('from scratch: writes an HF checkpoint and the tokenizer built from the data, and reports in JSON', async () => {
      const r = await runMain(['train', '--init-config', config, ...common(), '--val', val, '--out', scratchOut, '--json']);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.equal('');
      const result = JSON.parse(r.stdout) as TrainRunResult;
      expect(result).to.include({ mode: 'scratch', modelType: 'qwen3_moe', backend: BACKEND, steps: 3, stopped: false });
      expect(result.losses).to.have.length(3);
      expect(result.losses.every(Number.isFinite)).to.equal(true);
      expect(result.valLossBefore).to.be.a('number');
      expect(result.valLossAfter).to.be.a('number');
      expect(result.trainableParams).to.equal(result.params);
      expect((await readdir(scratchOut)).sort()).to.deep.equal(['config.json', 'model.safetensors', 'tokenizer.json']);
      const tokenizer = await readTokenizer(scratchOut) as CharTokenizer;
      expect(tokenizer.tokens.slice(1).join('')).to.equal([...new Set(TEXT)].sort().join(''));
      const saved = JSON.parse(await readFile(join(scratchOut, 'config.json'), 'utf8'));
      // dtype: what saveHFCheckpoint wrote (float32: a model built from a config)
      expect(saved).to.deep.equal({ ...TINY_CONFIG, vocab_size: tokenizer.vocabSize, dtype: 'float32' });
      const model = await loadHFCheckpoint(scratchOut);
      expect(model.outputs[0].shape[2]).to.equal(tokenizer.vocabSize);
      model.dispose();
    });

    it('from scratch twice with one seed gives the same losses; a preset works too', async () => {
      const again = await runMain(['train', '--init-config', config, ...common(), '--out', join(dir, 'again'), '--json']);
      const first = JSON.parse((await runMain(['train', '--init-config', config, ...common(), '--out', join(dir, 'again2'), '--json'])).stdout);
      expect(JSON.parse(again.stdout).losses).to.deep.equal(first.losses);
      const preset = await runMain(['train', '--init-config', 'mixtral', ...common({ steps: '1' }), '--out', join(dir, 'preset'), '--json']);
      expect(preset.code, preset.stderr).to.equal(0);
      expect(JSON.parse(preset.stdout)).to.include({ mode: 'scratch', modelType: 'mixtral', steps: 1 });
    });

    it('LoRA on the trained model: writes a PEFT adapter that loads back, with a readable report', async () => {
      const out = join(dir, 'adapter');
      const r = await runMain(['train', '--model', scratchOut, ...common(), '--val', val, '--lora-rank', '2', '--lora-alpha', '4',
        '--lora-targets', 'experts.gate_up,router', '--out', out]);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.match(new RegExp(`^training qwen3_moe \\(LoRA\\) on ${BACKEND}: [\\d,]+ of [\\d,]+ weights trainable, ` +
          '3 steps of 2 × 8 tokens \\(Ctrl-C stops and saves\\)\\n'));
      const lines = r.stdout.trimEnd().split('\n');
      expect(lines[0]).to.match(new RegExp(`^trained qwen3_moe \\(LoRA\\) on ${BACKEND}: 3 steps on ${TEXT.length} training tokens in [\\d.]+ s \\(\\d+ tok/s\\)$`));
      expect(lines[1]).to.match(/^ {2}train loss {7}\d+\.\d{4} \(first step\) → \d+\.\d{4} \(mean of the last 3\)$/);
      expect(lines[2]).to.match(/^ {2}validation loss {2}\d+\.\d{4} → \d+\.\d{4}$/);
      expect(lines[4]).to.equal(`  wrote            ${out}/adapter_config.json, ${out}/adapter_model.safetensors`);
      const model = await loadHFCheckpoint(scratchOut);
      const loaded = await loadPeftAdapter(model, out);
      expect(loaded).to.include({ r: 2, alpha: 4 });
      expect(loaded.targets).to.have.members(['experts.gate_up', 'router']);
      const b = sparseMoELayers(model)[0].adapter('default').factors.router!.B;
      expect(Math.max(...Array.from(b.read().dataSync()).map(Math.abs)), 'the adapter was trained').to.be.above(0);
      model.dispose();
    });

    it('without LoRA flags fine-tunes every weight of the model and writes a checkpoint', async () => {
      const out = join(dir, 'full');
      const r = await runMain(['train', '--model', scratchOut, ...common(), '--out', out, '--json']);
      expect(r.code, r.stderr).to.equal(0);
      expect(JSON.parse(r.stdout)).to.include({ mode: 'full', steps: 3 });
      const [before, after] = [await loadHFCheckpoint(scratchOut), await loadHFCheckpoint(out)];
      const changed = before.weights.filter((w, k) =>
        Buffer.compare(Buffer.from(w.read().dataSync().buffer), Buffer.from(after.weights[k].read().dataSync().buffer)) !== 0);
      expect(changed.length).to.equal(before.weights.length);
      before.dispose();
      after.dispose();
    });

    it('LoRA with checkpoints: --resume from checkpoint-2 repeats the uninterrupted run\'s steps 3 and 4 exactly', async () => {
      const lora = ['--lora-rank', '2', '--lora-alpha', '4', '--lora-targets', 'experts.gate_up,router'];
      const loop = ['--lr-scheduler', 'cosine', '--warmup-steps', '1', '--grad-accum', '2', '--max-grad-norm', '0.5', '--save-every', '2'];
      const out = join(dir, 'lora-ckpt');
      const full = await runMain(['train', '--model', scratchOut, ...common({ steps: '4' }), ...lora, ...loop, '--out', out, '--json']);
      expect(full.code, full.stderr).to.equal(0);
      expect((await readdir(join(out, 'checkpoint-2'))).sort())
          .to.deep.equal(['adapter_config.json', 'adapter_model.safetensors', 'optimizer.safetensors', 'trainer_state.json']);
      const metrics = join(dir, 'lora-metrics.jsonl');
      const resumed = await runMain(['train', '--model', scratchOut, ...common({ steps: '4' }), ...lora, ...loop,
        '--resume', join(out, 'checkpoint-2'), '--out', join(dir, 'lora-resumed'), '--metrics', metrics, '--json']);
      expect(resumed.code, resumed.stderr).to.equal(0);
      const [a, b] = [JSON.parse(full.stdout) as TrainRunResult, JSON.parse(resumed.stdout) as TrainRunResult];
      expect(b.steps).to.equal(4);
      expect(b.losses).to.deep.equal(a.losses.slice(2));
      const lines = (await readFile(metrics, 'utf8')).trimEnd().split('\n').map(l => JSON.parse(l));
      expect(lines.map(l => [l.step, l.loss])).to.deep.equal([[3, a.losses[2]], [4, a.losses[3]]]);
      expect(await readFile(join(dir, 'lora-resumed', 'adapter_model.safetensors')))
          .to.deep.equal(await readFile(join(out, 'adapter_model.safetensors')));
    });

    it('--gradient-checkpointing: the same losses and adapter, bit for bit, as the run without it', async () => {
      const lora = ['--lora-rank', '2', '--lora-alpha', '4', '--lora-targets', 'experts.gate_up,router,q_proj'];
      const runs = [];
      for (const flag of [[], ['--gradient-checkpointing']]) {
        const out = join(dir, `ckpt-${flag.length}`);
        const r = await runMain(['train', '--model', scratchOut, ...common(), ...lora, ...flag, '--out', out, '--json']);
        expect(r.code, r.stderr).to.equal(0);
        runs.push({ losses: (JSON.parse(r.stdout) as TrainRunResult).losses, adapter: await readFile(join(out, 'adapter_model.safetensors')) });
      }
      expect(runs[1].losses).to.deep.equal(runs[0].losses);
      expect(runs[1].adapter.equals(runs[0].adapter), 'the trained adapters are the same bytes').to.equal(true);
    });

    it('--config run.yaml: axolotl keys set the run, flags given on the command line win', async () => {
      const yaml = join(dir, 'run.yaml');
      await writeFile(yaml, [
        `base_model: ${scratchOut}`, `data: ${data}`, 'adapter: lora', 'lora_r: 2', 'lora_alpha: 4', 'lora_target_modules: [router]',
        'sequence_len: 8', 'micro_batch_size: 2', 'gradient_accumulation_steps: 2', 'max_steps: 5', 'learning_rate: 0.005',
        'lr_scheduler: linear', `output_dir: ${join(dir, 'from-yaml')}`, 'seed: 3', `backend: ${BACKEND}`,
      ].join('\n'));
      const r = await runMain(['train', '--config', yaml, '--steps', '2', '--json']);
      expect(r.code, r.stderr).to.equal(0);
      expect(JSON.parse(r.stdout)).to.include({ mode: 'lora', steps: 2, out: join(dir, 'from-yaml') });
      const adapter = JSON.parse(await readFile(join(dir, 'from-yaml', 'adapter_config.json'), 'utf8'));
      expect(adapter).to.include({ r: 2, lora_alpha: 4 });
      // the same run from flags only: the same losses
      const flags = await runMain(['train', '--model', scratchOut, '--data', data, '--seq', '8', '--batch', '2', '--grad-accum', '2',
        '--steps', '2', '--lr', '0.005', '--lr-scheduler', 'linear', '--seed', '3', '--backend', BACKEND, '--lora-rank', '2',
        '--lora-alpha', '4', '--lora-targets', 'router', '--out', join(dir, 'from-flags'), '--json']);
      expect(JSON.parse(flags.stdout).losses).to.deep.equal(JSON.parse(r.stdout).losses);
    });

    it('--config with bad keys: exit 2, every problem on the line, with did-you-mean', async () => {
      const yaml = join(dir, 'bad.yaml');
      await writeFile(yaml, `base_model: ${scratchOut}\ndata: ${data}\nlearning_rat: 0.1\nmicro_batch_size: 0\noutput_dir: x\n`);
      expectUsageError(await runMain(['train', '--config', yaml]),
          `--config: the run config '${yaml}' has 2 problems: - learning_rat: unknown key; did you mean 'learning_rate'? - ` +
          'micro_batch_size: expected an integer >= 1 but got 0 (number)');
    });

    it('--config with a chat dataset, then generate with the adapter: the axolotl-style run a user starts from', async () => {
      const model = await writeChatModel(join(dir, 'chat-model'));
      const chats = join(dir, 'chats.jsonl');
      const turns = ['rain', 'snow', 'wind', 'sun', 'fog', 'hail'].map(t => JSON.stringify({
        messages: [{ role: 'user', content: `what is ${t}` }, { role: 'assistant', content: `${t} is weather` }] }));
      await writeFile(chats, turns.join('\n'));
      const yaml = join(dir, 'chat.yaml');
      const out = join(dir, 'chat-adapter');
      await writeFile(yaml, [`base_model: ${model}`, 'datasets:', `  - path: ${chats}`, '    type: chat_template',
        'sample_packing: true', 'val_set_size: 2', 'eval_steps: 2', 'adapter: lora', 'lora_r: 2', 'lora_alpha: 4',
        'lora_target_modules: [q_proj, v_proj, experts.gate_up]', 'sequence_len: 64', 'micro_batch_size: 2', 'max_steps: 4',
        'learning_rate: 0.005', `output_dir: ${out}`, 'seed: 3', `backend: ${BACKEND}`].join('\n'));
      const r = await runMain(['train', '--config', yaml, '--json']);
      expect(r.code, r.stderr).to.equal(0);
      const result = JSON.parse(r.stdout) as TrainRunResult;
      expect(result).to.include({ mode: 'lora', steps: 4 });
      expect(result.valLossAfter).to.be.below(result.valLossBefore!);
      // the same run from flags: --data-type makes --data a dataset
      const flags = await runMain(['train', '--model', model, '--data', chats, '--data-type', 'chat_template', '--sample-packing',
        '--val-set-size', '2', '--eval-every', '2', '--lora-rank', '2', '--lora-alpha', '4', '--lora-targets', 'q_proj,v_proj,experts.gate_up',
        '--seq', '64', '--batch', '2', '--steps', '4', '--lr', '0.005', '--out', join(dir, 'chat-flags'), '--seed', '3', '--backend', BACKEND, '--json']);
      expect(flags.code, flags.stderr).to.equal(0);
      expect((JSON.parse(flags.stdout) as TrainRunResult).losses).to.deep.equal(result.losses);
      const chat = join(dir, 'ask.json');
      await writeFile(chat, JSON.stringify({ messages: [{ role: 'user', content: 'what is rain' }] }));
      const g = await runMain(['generate', '--model', model, '--adapter', out, '--chat', chat, '--max-new-tokens', '6', '--backend', BACKEND, '--json']);
      expect(g.code, g.stderr).to.equal(0);
      expect(JSON.parse(g.stdout).prompt).to.equal('user: what is rain<|im_end|>\nassistant:');
    });

    it('dataset flags on a text file, --tokenizer without --init-config, and --val with a dataset are refused (exit 2)', async () => {
      expectUsageError(await runMain(['train', '--model', scratchOut, ...common(), '--sample-packing', '--out', join(dir, 'x')]),
          '--sample-packing is for JSON Lines datasets (--data-type), not a text file');
      expectUsageError(await runMain(['train', '--model', scratchOut, ...common(), '--tokenizer', dir, '--out', join(dir, 'x')]),
          '--tokenizer is for --init-config: a --model folder brings its own tokenizer');
      expectUsageError(await runMain(['train', '--model', scratchOut, ...common(), '--data-type', 'alpaca', '--val', val, '--out', join(dir, 'x')]),
          '--val is a held-out text file; with a dataset, split validation samples off with --val-set-size');
      expectUsageError(await runMain(['train', '--model', scratchOut, ...common(), '--data-type', 'chat', '--out', join(dir, 'x')]),
          "--data-type must be one of text, completion, prompt_completion, alpaca, chat_template but got 'chat'");
    });

    it('notes characters outside the tokenizer, which train as <unk>', async () => {
      const odd = join(dir, 'odd.txt');
      await writeFile(odd, `${TEXT}ÄÄ#\n`);
      const r = await runMain(['train', '--model', scratchOut, ...common({ data: odd }), '--lora-rank', '1', '--lora-alpha', '1',
        '--out', join(dir, 'odd'), '--json']);
      expect(r.code, r.stderr).to.equal(0);
      expect(r.stderr).to.equal("note: training data: 2 characters not in the tokenizer became <unk>: 'Ä' (U+00C4), '#' (U+0023)\n");
    });

    it('a dead model (lr 1000): a warning on stderr, in the summary and the metrics, exit 0; --stop-on-no-gradient stops, saves, exits 1', async () => {
      const metrics = join(dir, 'dead-metrics.jsonl');
      const run = ['train', '--init-config', config, ...common({ steps: '25', lr: '1000' })];
      const r = await runMain([...run, '--metrics', metrics, '--out', join(dir, 'dead')]);
      expect(r.code, r.stderr).to.equal(0);
      const warning = /^warning: no gradient: the gradients' global norm was exactly 0 for the last 10 steps \(steps (\d+)–(\d+)\) with the loss at \d\.\d{4} = ln\(vocab\), .* it is 1000\)$/m;
      const [line, from, at] = r.stderr.match(warning)!;
      expect(Number(at) - Number(from)).to.equal(9);
      expect(r.stderr.split('\n').filter(l => l.startsWith('warning:')), 'warned once').to.deep.equal([line]);
      expect(r.stdout.trimEnd().split('\n').at(-1), 'the summary repeats it').to.equal(line);
      const records = (await readFile(metrics, 'utf8')).trimEnd().split('\n').map(l => JSON.parse(l));
      expect(records.filter(l => l.type === 'warning')).to.deep.equal([{ type: 'warning', step: Number(at), kind: 'noGradient', message: line.slice(9) }]);
      expect(records.filter(l => l.type === 'train').slice(Number(from) - 1).every(l => l.grad_norm === 0)).to.equal(true);

      const stopped = await runMain([...run, '--stop-on-no-gradient', '--out', join(dir, 'dead-stopped'), '--json']);
      expect(stopped.code, stopped.stderr).to.equal(1);
      expect(stopped.stderr).to.equal(`${line}\n`);
      const result = JSON.parse(stopped.stdout) as TrainRunResult;
      expect(result).to.include({ steps: Number(at), stopped: false, stoppedNoGradient: true });
      expect(result.warnings.map(w => w.message)).to.deep.equal([line.slice(9)]);
      expect(await readdir(join(dir, 'dead-stopped'))).to.include('model.safetensors');
    });

    it('--help lists the model, data and plugin flags', () => {
      const r = spawnCli(['train', '--help']);
      expect(r.code).to.equal(0);
      for (const flag of ['--init-config', '--model', '--data', '--val', '--steps', '--lr', '--batch', '--seq', '--seed',
        '--backend', '--out', '--json', '--lora-rank', '--lora-alpha', '--lora-targets', '--stop-on-no-gradient']) {
        expect(r.stdout).to.include(flag);
      }
    });
  });

  describe('bad arguments: exit 2 with one line', () => {
    // built when the test runs: the paths exist only after before()
    const cases: Array<[string, () => [string[], string | RegExp]]> = [
      ['no model', () => [['--data', data, '--out', join(dir, 'x')],
        'give exactly one of --init-config (from scratch) and --model DIR']],
      ['two models', () => [['--init-config', 'qwen3_moe', '--model', scratchOut, '--data', data, '--out', join(dir, 'x')],
        'give exactly one of --init-config (from scratch) and --model DIR']],
      ['LoRA from scratch', () => [['--init-config', 'qwen3_moe', '--lora-rank', '4', '--lora-alpha', '8', '--data', data, '--out', join(dir, 'x')],
        '--lora-rank needs --model: LoRA adapts a trained model, a from-scratch run trains every weight']],
      ['an unknown preset', () => [['--init-config', 'llama', '--data', data, '--out', join(dir, 'x')],
        "--init-config: 'llama' is neither a preset (mixtral, qwen2_moe, qwen3_moe, olmoe) nor a file"]],
      ['a missing data file', () => [['--init-config', 'qwen3_moe', '--data', join(dir, 'none.txt'), '--out', join(dir, 'x')],
        `--data: '${join(dir, 'none.txt')}' is not a file`]],
      ['a model that is not a folder', () => [['--model', data, '--data', data, '--out', join(dir, 'x')],
        `--model: '${data}' is not a directory`]],
      ['zero steps', () => [['--init-config', 'qwen3_moe', '--data', data, '--steps', '0', '--out', join(dir, 'x')],
        '--steps must be an integer >= 1 but got 0']],
      ['a negative learning rate', () => [['--init-config', 'qwen3_moe', '--data', data, '--lr', '-1', '--out', join(dir, 'x')],
        '--lr must be a number > 0 but got -1']],
      ['no --out', () => [['--init-config', 'qwen3_moe', '--data', data], 'Missing required argument: out']],
      ['no --data', () => [['--init-config', 'qwen3_moe', '--out', join(dir, 'x')], 'Missing required argument: data']],
      ['--eval-every without --val', () => [['--init-config', 'qwen3_moe', '--data', data, '--eval-every', '2', '--out', join(dir, 'x')],
        '--eval-every needs validation data: --val (a held-out text) or --val-set-size (with a dataset)']],
      ['--resume that is not a folder', () => [['--init-config', 'qwen3_moe', '--data', data, '--resume', data, '--out', join(dir, 'x')],
        `--resume: '${data}' is not a directory`]],
      ['a negative warm-up', () => [['--init-config', 'qwen3_moe', '--data', data, '--warmup-steps', '-1', '--out', join(dir, 'x')],
        '--warmup-steps must be an integer >= 0 but got -1']],
      ['a zero --max-grad-norm', () => [['--init-config', 'qwen3_moe', '--data', data, '--max-grad-norm', '0', '--out', join(dir, 'x')],
        '--max-grad-norm must be a number > 0 but got 0']],
      ['a fractional --grad-accum', () => [['--init-config', 'qwen3_moe', '--data', data, '--grad-accum', '1.5', '--out', join(dir, 'x')],
        '--grad-accum must be an integer >= 1 but got 1.5']],
      ['an unknown --lr-scheduler', () => [['--init-config', 'qwen3_moe', '--data', data, '--lr-scheduler', 'step', '--out', join(dir, 'x')],
        'Invalid values']],
      ['a bad LoRA rank', () => [['--model', scratchOut, '--data', data, '--lora-rank', 'abc', '--lora-alpha', '8', '--out', join(dir, 'x')],
        /--lora-rank: lora\.r: expected an integer >= 1 but got 'abc'/]],
      ['an unknown backend', () => [['--init-config', 'qwen3_moe', '--data', data, '--backend', 'tpu', '--out', join(dir, 'x')],
        'Invalid values']],
    ];
    for (const [label, make] of cases) {
      it(label, async () => {
        const [args, message] = make();
        expectUsageError(await runMain(['train', ...args]), message);
      });
    }

    it('a LoRA rank the model cannot take (checked by register())', async () => {
      const r = await runMain(['train', '--model', scratchOut, ...common(), '--lora-rank', '64', '--lora-alpha', '8', '--out', join(dir, 'x')]);
      expectUsageError(r, /register\(\): 4 problems with the plugin args: .*lora\.r: expected <= min\(in, out\) = 8 of experts\.down .* but got 64/);
    });
  });

  describe('failed runs: exit 1 with a message', () => {
    it('a checkpoint folder without tokenizer.json', async () => {
      const r = await runMain(['train', '--model', fixtureDir('mixtral'), ...common(), '--lora-rank', '2', '--lora-alpha', '4', '--out', join(dir, 'x')]);
      expectFailure(r, `'${join(fixtureDir('mixtral'), 'tokenizer.json')}' is missing (the model folder needs the tokenizer it was trained with)`);
    });

    it('a config whose vocab_size is smaller than the tokenizer', async () => {
      const small = join(dir, 'small_vocab.json');
      await writeFile(small, JSON.stringify({ ...TINY_CONFIG, vocab_size: 5 }));
      const r = await runMain(['train', '--init-config', small, ...common(), '--out', join(dir, 'x')]);
      expectFailure(r, `--init-config '${small}' sets vocab_size 5 but the tokenizer built from the data has ${new Set(TEXT).size + 1} tokens; ` +
          'raise vocab_size or leave it out');
    });

    it('a config that is not JSON, or of an unknown family', async () => {
      const bad = join(dir, 'bad.json');
      await writeFile(bad, '{"model_type": ');
      expectFailure(await runMain(['train', '--init-config', bad, ...common(), '--out', join(dir, 'x')]),
          new RegExp(`tfjs-moe-lora: error: --init-config '${bad}' is not valid JSON: `));
      const llama = join(dir, 'llama.json');
      await writeFile(llama, JSON.stringify({ ...TINY_CONFIG, model_type: 'llama' }));
      expectFailure(await runMain(['train', '--init-config', llama, ...common(), '--out', join(dir, 'x')]),
          "`familyOf()`: config 'model_type' must be one of 'mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', " +
          "'glm4_moe', 'gpt_oss', 'ernie4_5_moe', 'hunyuan_v1_moe', 'minimax_m2', 'llama4_text', 'mistral4', 'gemma4_text', " +
          "'qwen3_5_moe_text', 'glm_moe_dsa', 'qwen3_next' (the supported MoE families) but got 'llama'");
    });

    it('--batch 1e9: one line naming batch, seq and the vocabulary, before anything is allocated', async () => {
      const r = await runMain(['train', '--init-config', config, ...common({ batch: '1e9' }), '--out', join(dir, 'huge-batch')]);
      // the run's header line, then the error in one line
      expect(r.stderr.trimEnd().split('\n').slice(1), r.stderr).to.have.length(1);
      expectFailure(r, `\`trainLoop()\`: 'batch' × 'seq' × vocab (1000000000 × 8 × ${new Set(TEXT).size + 1} = `);
      expect(r.stderr).to.include('logits) must be at most 1073741824 (2^30, 4 GiB of float32); use a smaller batch or seq');
    });

    it('a text shorter than one window', async () => {
      const tiny = join(dir, 'tiny.txt');
      await writeFile(tiny, 'la miro.');
      const r = await runMain(['train', '--init-config', config, ...common({ data: tiny }), '--out', join(dir, 'x')]);
      expectFailure(r, 'the training text has 8 tokens but one window of seq 8 needs 9; use more text or a smaller seq');
    });
  });

  it('Ctrl-C stops after the current step, saves the model and exits with 130', async function () {
    this.timeout(60_000);
    const out = join(dir, 'interrupted');
    const child = spawn(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'train', '--init-config', config,
      ...common({ steps: '100000' }), '--out', out], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => { stdout += String(d); });
    let sent = false;
    child.stderr.on('data', (d: Buffer) => {
      stderr += String(d);
      // once: a second Ctrl-C quits without saving
      if (!sent && stderr.includes('(Ctrl-C stops and saves)')) {
        sent = true;
        child.kill('SIGINT');
      }
    });
    const code = await new Promise<number | null>(resolve => child.on('close', resolve));
    expect(code, stderr).to.equal(130);
    expect(stderr).to.include('interrupted: stopping after this step and saving');
    expect(stdout).to.match(/\ninterrupted: saved the state after step \d+\n$/);
    expect((await readdir(out)).sort()).to.deep.equal(['config.json', 'model.safetensors', 'tokenizer.json']);
  });
});
