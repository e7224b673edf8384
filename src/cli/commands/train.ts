/**
 * `tfjs-moe-lora train`: a model from scratch (--init-config) or LoRA / full fine-tuning of a
 * checkpoint folder (--model), on a text file, with next-token cross-entropy and Adam. The logic is
 * src/train/run.ts. Exit codes: 0 done, 1 failed, 2 bad arguments, 130 interrupted (Ctrl-C;
 * what was trained so far is saved).
 */
import { existsSync, statSync } from 'node:fs';
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { PluginArgsError } from '../../args/errors.js';
import { TokenizerError } from '../../data/tokenizer.js';
import { TrainError } from '../../train/errors.js';
import { onInterrupt } from '../../train/interrupt.js';
import { INIT_PRESET_NAMES } from '../../train/presets.js';
import { runTraining, type TrainMode, type TrainRunResult } from '../../train/run.js';
import { FileError } from '../../util/files.js';
import { checkOutputFolder } from '../../util/output_folder.js';
import { BACKENDS, selectBackend } from '../backend.js';
import { ExitCode, UsageError } from '../errors.js';
import type { ExpertDtype } from '../../io/hf_block.js';
import { expertDtypeOption, pluginArgsFromArgv, pluginOptions } from '../plugin_options.js';

interface TrainArgs {
  initConfig?: string;
  model?: string;
  data: string;
  val?: string;
  steps: number;
  lr: number;
  batch: number;
  seq: number;
  seed: number;
  backend: string;
  out: string;
  overwrite: boolean;
  json: boolean;
  expertDtype?: ExpertDtype;
}

export const command = 'train';
export const describe = 'Train an MoE model from scratch or fine-tune one (LoRA with the --lora-* flags) on a text file';

/** Default learning rates: LoRA adapters start at zero and take a larger step. */
export const DEFAULT_LR = { full: 3e-3, lora: 1e-2 } as const;

const isFile = (p: string) => existsSync(p) && statSync(p).isFile();
const isDir = (p: string) => existsSync(p) && statSync(p).isDirectory();

const LORA_FLAG = /^lora-(?!mode$)/;
const SINGLE_FLAGS = ['init-config', 'model', 'data', 'val', 'steps', 'lr', 'batch', 'seq', 'seed', 'backend', 'out', 'overwrite', 'expert-dtype'];

export function builder(yargs: Argv): Argv<TrainArgs> {
  const y = yargs
      .option('init-config', {
        type: 'string', requiresArg: true, group: 'Model (one of):',
        describe: `train from scratch: a family preset (${INIT_PRESET_NAMES.join(', ')}: hidden 64, 2 layers, ` +
            '8 experts, top-2) or an HF config.json; the tokenizer is built from --data',
      })
      .option('model', {
        type: 'string', requiresArg: true, group: 'Model (one of):',
        describe: 'fine-tune this HF checkpoint folder (config.json, model.safetensors, tokenizer.json): LoRA with ' +
            'the --lora-* flags, else every weight',
      })
      .option('data', { type: 'string', demandOption: true, requiresArg: true, describe: 'the training text (UTF-8)' })
      .option('val', { type: 'string', requiresArg: true, describe: 'held-out text: its loss is reported before and after' })
      .option('steps', { type: 'number', default: 200, requiresArg: true, describe: 'Adam steps' })
      .option('lr', {
        type: 'number', requiresArg: true,
        describe: `learning rate (default ${DEFAULT_LR.full} without LoRA, ${DEFAULT_LR.lora} with LoRA)`,
      })
      .option('batch', { type: 'number', default: 8, requiresArg: true, describe: 'windows per step' })
      .option('seq', { type: 'number', default: 64, requiresArg: true, describe: 'tokens per window' })
      .option('seed', { type: 'number', default: 1, requiresArg: true, describe: 'seed of the initial weights (from scratch) or of LoRA\'s A, and of the window order' })
      .option('backend', { type: 'string', choices: BACKENDS, default: 'wasm', requiresArg: true, describe: 'tfjs backend' })
      .option('out', {
        type: 'string', demandOption: true, requiresArg: true,
        describe: 'output folder: an HF checkpoint + tokenizer.json, or with LoRA a PEFT adapter (checked before ' +
            'training; never the --model folder nor inside it)',
      })
      .option('overwrite', { type: 'boolean', default: false, describe: 'replace a model or adapter already in --out' })
      .option('json', { type: 'boolean', default: false, describe: 'print one JSON object (with every step\'s loss), no progress' });
  return pluginOptions(expertDtypeOption(y, "--model's routed experts stored BF16/F16: 'stored' keeps them 16-bit " +
      "(packed, frozen; default with LoRA), 'float32' widens them (default for full fine-tuning, which trains them)"))
      .check(argv => {
        // yargs collects a repeated flag into a list
        const repeated = SINGLE_FLAGS.find(f => Array.isArray(argv[f]));
        if (repeated !== undefined) return `--${repeated} is given ${(argv[repeated] as unknown[]).length} times; give it once`;
        const scratch = argv['init-config'] as string | undefined;
        const model = argv.model as string | undefined;
        if ((scratch === undefined) === (model === undefined)) return 'give exactly one of --init-config (from scratch) and --model DIR';
        const loraFlag = Object.keys(argv).find(k => LORA_FLAG.test(k) && argv[k] !== undefined);
        if (scratch !== undefined && loraFlag !== undefined) {
          return `--${loraFlag} needs --model: LoRA adapts a trained model, a from-scratch run trains every weight`;
        }
        if (scratch !== undefined && !(INIT_PRESET_NAMES as string[]).includes(scratch) && !isFile(scratch)) {
          return `--init-config: '${scratch}' is neither a preset (${INIT_PRESET_NAMES.join(', ')}) nor a file`;
        }
        if (model !== undefined && !isDir(model)) return `--model: '${model}' is not a directory`;
        for (const name of ['data', 'val'] as const) {
          const path = argv[name] as string | undefined;
          if (path !== undefined && !isFile(path)) return `--${name}: '${path}' is not a file`;
        }
        for (const name of ['steps', 'batch', 'seq'] as const) {
          const v = argv[name] as number;
          if (!Number.isInteger(v) || v < 1) return `--${name} must be an integer >= 1 but got ${v}`;
        }
        const seed = argv.seed as number;
        if (!Number.isInteger(seed) || seed < 0 || seed > 2 ** 32 - 1) return `--seed must be an integer in [0, 2^32) but got ${seed}`;
        const lr = argv.lr as number | undefined;
        if (lr !== undefined && !(Number.isFinite(lr) && lr > 0)) return `--lr must be a number > 0 but got ${lr}`;
        // last, as it creates --out's parent folders: the output is checked before any work
        try {
          checkOutputFolder(argv.out, { name: '--out', overwrite: argv.overwrite === true, inputs: { '--model': model } });
        } catch (e) {
          if (e instanceof FileError) return e.message;
          throw e;
        }
        return true;
      })
      .example('$0 train --init-config qwen3_moe --data base.txt --steps 600 --out my-model', 'from scratch')
      .example('$0 train --model my-model --data target.txt --lora-rank 4 --lora-alpha 8 ' +
          '--lora-targets experts.gate_up,experts.down,router --out my-adapter', 'LoRA on the experts and the router') as
      unknown as Argv<TrainArgs>;
}

const MODE_NAMES: Readonly<Record<TrainMode, string>> = { scratch: 'from scratch', lora: 'LoRA', full: 'full fine-tuning' };

function formatResult(r: TrainRunResult): string {
  const what = MODE_NAMES[r.mode];
  const loss = (v: number | null) => (v === null ? '-' : v.toFixed(4));
  const lines = [
    `trained ${r.modelType} (${what}) on ${r.backend}: ${r.steps} steps on a ${r.trainTokens}-token text in ` +
        `${r.seconds.toFixed(1)} s (${Math.round(r.tokensPerSecond)} tok/s)`,
    `  train loss       ${loss(r.firstLoss)} (first step) → ${loss(r.finalLoss)} (mean of the last ${Math.min(10, r.losses.length)})`,
  ];
  if (r.valLossBefore !== null) lines.push(`  validation loss  ${loss(r.valLossBefore)} → ${loss(r.valLossAfter)}`);
  lines.push(`  parameters       ${r.params.toLocaleString('en-US')} (trainable ${r.trainableParams.toLocaleString('en-US')})`);
  lines.push(`  wrote            ${r.files.map(f => `${r.out}/${f}`).join(', ')}`);
  if (r.stopped) lines.push(`interrupted: saved the state after step ${r.steps}`);
  return `${lines.join('\n')}\n`;
}

export async function handler(argv: ArgumentsCamelCase<TrainArgs>): Promise<void> {
  const plugin = pluginArgsFromArgv(argv as unknown as Record<string, unknown>);
  await selectBackend(argv.backend);
  const interrupt = onInterrupt(() => process.stderr.write('\ninterrupted: stopping after this step and saving (Ctrl-C again quits now)\n'));
  let result: TrainRunResult;
  try {
    result = await runTraining({
      initConfig: argv.initConfig, model: argv.model, data: argv.data, val: argv.val,
      steps: argv.steps, lr: argv.lr ?? (plugin.lora !== null ? DEFAULT_LR.lora : DEFAULT_LR.full),
      batch: argv.batch, seq: argv.seq, seed: argv.seed, out: argv.out, overwrite: argv.overwrite, plugin,
      expertDtype: argv.expertDtype,
      progress: { quiet: argv.json },
      shouldStop: () => interrupt.requested,
      note: line => process.stderr.write(`note: ${line}\n`),
      onStart: info => {
        if (argv.json) return;
        process.stderr.write(`training ${info.modelType} (${MODE_NAMES[info.mode]}) on ${argv.backend}: ` +
            `${info.trainableParams.toLocaleString('en-US')} of ${info.params.toLocaleString('en-US')} weights trainable, ` +
            `${argv.steps} steps of ${argv.batch} × ${argv.seq} tokens (Ctrl-C stops and saves)\n`);
      },
    });
  } catch (err) {
    // the model and the args did not fit together (e.g. a rank above a weight's size): bad arguments
    if (err instanceof PluginArgsError) throw new UsageError(err.message);
    if (err instanceof TrainError || err instanceof TokenizerError) {
      process.stderr.write(`tfjs-moe-lora: error: ${err.message}\n`);
      throw new ExitCode(1);
    }
    throw err;
  } finally {
    interrupt.dispose();
  }
  process.stdout.write(argv.json ? `${JSON.stringify(result)}\n` : formatResult(result));
  if (result.stopped) throw new ExitCode(130);
}
