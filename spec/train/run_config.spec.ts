/**
 * Run configs in YAML (axolotl's key names): a good file maps to the `train` flags it sets, a bad
 * one gives every problem at once, with "did you mean" for misspelt keys, and the lora_* values are
 * checked by register()'s own schema.
 */
import { expect } from 'chai';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parse } from 'yaml';
import { BACKENDS } from '../../src/cli/backend.js';
import { readRunConfig, RUN_CONFIG_KEYS, RunConfigError, runConfigFlags } from '../../src/train/run_config.js';
import { cleanup, tempDir } from '../io/checkpoint_helpers.js';

const GOOD = `
base_model: ./my-moe
datasets:
  - path: chat.jsonl
    type: chat_template
    field: messages
adapter: lora
lora_r: 8
lora_alpha: 16
lora_dropout: 0
lora_target_modules:
  - experts.gate_up
  - experts.down
sequence_len: 512
sample_packing: true
train_on_inputs: false
micro_batch_size: 2
gradient_accumulation_steps: 4
num_epochs: 2
max_steps: 100
learning_rate: 2.0e-4
lr_scheduler: cosine
warmup_steps: 10
max_grad_norm: 1.0
gradient_checkpointing: true
val_set_size: 0.05
eval_steps: 20
save_steps: 50
save_total_limit: 2
output_dir: ./out
seed: 42
stop_on_no_gradient: true
`;

describe('train/run_config: axolotl-style YAML', () => {
  after(cleanup);

  it('maps every key of a good file to its train flag (and the lora keys to register() args)', () => {
    expect(runConfigFlags(parse(GOOD), 'run.yaml')).to.deep.equal({
      model: './my-moe', datasets: [{ path: 'chat.jsonl', type: 'chat_template', field: 'messages' }],
      seq: 512, samplePacking: true, trainOnInputs: false, batch: 2, gradAccum: 4, numEpochs: 2, steps: 100, lr: 2e-4,
      lrScheduler: 'cosine', warmupSteps: 10, maxGradNorm: 1, gradientCheckpointing: true, valSetSize: 0.05, evalEvery: 20, saveEvery: 50,
      saveTotalLimit: 2, out: './out', seed: 42, stopOnNoGradient: true,
      'lora.r': 8, 'lora.alpha': 16, 'lora.dropout': 0, 'lora.targets': ['experts.gate_up', 'experts.down'],
    });
  });

  it('adapter null trains every weight; lora_target_linear adds PEFT\'s all-linear to the targets', () => {
    expect(runConfigFlags({ adapter: null, warmup_ratio: 0.1, data: 'a.txt' }, 'run.yaml')).to.deep.equal({ warmupRatio: 0.1, data: 'a.txt' });
    // what 'all-linear' may target is register()'s to say: only the mapping is checked here
    let flags: Record<string, unknown> | Error;
    try {
      flags = runConfigFlags({ adapter: 'lora', lora_r: 4, lora_alpha: 8, lora_target_linear: true }, 'run.yaml');
    } catch (e) {
      flags = e as Error;
    }
    if (flags instanceof Error) expect(flags.message).to.match(/lora_target_modules: lora\.targets\[0\]: expected one of .* but got 'all-linear'/);
    else expect(flags['lora.targets']).to.deep.equal(['all-linear']);
  });

  it('a bad file: every problem at once, did-you-mean for misspelt keys, lora values checked by register()\'s schema', () => {
    const bad = {
      learning_rat: 1e-3, micro_batchsize: 2, lr: 1, base_model: 7, adapter: 'qlora', lora_r: 0,
      lora_target_modules: ['experts.gate_upp'], lr_scheduler: 'step', warmup_steps: 5, warmup_ratio: 0.1,
      datasets: [{ path: 'a.jsonl', typ: 'alpaca' }, { path: 'b.jsonl', type: 'chat_templat' }], seed: -1, zzz: true,
      gradient_checkpointing: 'yes',
    };
    let error: RunConfigError | undefined;
    try {
      runConfigFlags(bad, 'run.yaml');
    } catch (e) {
      error = e as RunConfigError;
    }
    expect(error).to.be.instanceOf(RunConfigError);
    expect(error!.problems).to.deep.equal([
      "learning_rat: unknown key; did you mean 'learning_rate'?",
      "micro_batchsize: unknown key; did you mean 'micro_batch_size'?",
      "lr: unknown key; did you mean 'learning_rate'?",
      `zzz: unknown key (the keys: ${['base_model', 'init_config', 'data', 'val', 'tokenizer_config', 'datasets', 'adapter', 'lora_r', 'lora_alpha',
        'lora_dropout', 'lora_target_modules', 'lora_target_linear', 'sequence_len', 'sample_packing', 'train_on_inputs',
        'micro_batch_size', 'gradient_accumulation_steps', 'num_epochs', 'max_steps', 'learning_rate', 'lr_scheduler',
        'warmup_steps', 'warmup_ratio', 'max_grad_norm', 'gradient_checkpointing', 'val_set_size', 'eval_steps', 'save_steps', 'save_total_limit',
        'output_dir', 'seed', 'backend', 'metrics', 'stop_on_no_gradient'].join(', ')})`,
      'base_model: expected a non-empty string but got 7',
      "datasets[0].typ: unknown key (expected one of path, type, field); did you mean 'type'?",
      'datasets[0].type: expected a non-empty string but got nothing',
      "datasets[1].type: expected one of completion, prompt_completion, alpaca, chat_template but got 'chat_templat'; did you mean 'chat_template'?",
      "adapter: expected 'lora' or null (full fine-tuning) but got 'qlora'",
      "lr_scheduler: expected one of 'constant', 'linear', 'cosine' but got 'step' (string)",
      'gradient_checkpointing: expected a boolean but got \'yes\' (string)',
      'seed: expected an integer >= 0 but got -1 (number)',
      'lora_r, lora_target_modules: need adapter: lora (without it every weight is trained)',
      'warmup_steps, warmup_ratio: give one of them, not both',
    ]);
    expect(error!.message).to.match(/^the run config 'run\.yaml' has 14 problems:\n {2}- learning_rat: /);
  });

  it('with adapter: lora, register()\'s schema checks the lora values and names the YAML key', () => {
    let error: RunConfigError | undefined;
    try {
      runConfigFlags({ adapter: 'lora', lora_r: 0, lora_target_modules: 'experts.gate_upp' }, 'run.yaml');
    } catch (e) {
      error = e as RunConfigError;
    }
    expect(error!.problems).to.deep.equal([
      'lora_r: lora.r: expected an integer >= 1 but got 0 (number)',
      "lora_alpha: lora.alpha: expected a finite number > 0 but got nothing (required when 'lora' is given)",
      error!.problems[2],
    ]);
    expect(error!.problems[2]).to.match(/^lora_target_modules: lora\.targets\[0\]: expected one of .* but got 'experts\.gate_upp' \(string\); did you mean 'experts\.gate_up'\?$/);
  });

  it('backend takes the CLI\'s backends', () => {
    expect(RUN_CONFIG_KEYS.find(k => k.key === 'backend')!.values).to.deep.equal(BACKENDS);
  });

  it('reads a file; YAML syntax errors and a top level that is not a mapping are one problem each', async () => {
    const dir = await tempDir('run-config-');
    const path = join(dir, 'run.yaml');
    await writeFile(path, 'data: a.txt\nmax_steps: 3\n');
    expect(await readRunConfig(path)).to.deep.equal({ data: 'a.txt', steps: 3 });
    await writeFile(path, 'data: [a.txt\n');
    let error: Error | undefined;
    try {
      await readRunConfig(path);
    } catch (e) {
      error = e as Error;
    }
    expect(error).to.be.instanceOf(RunConfigError);
    expect(error!.message).to.match(new RegExp(`^the run config '${path}' has 1 problem:\\n {2}- not valid YAML: `));
    expect(() => runConfigFlags(['a'], 'run.yaml')).to.throw(RunConfigError,
        "the run config 'run.yaml' has 1 problem:\n  - expected a mapping of keys (base_model, datasets, ...) but got ['a']");
  });
});
