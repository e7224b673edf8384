/**
 * `tfjs-moe-lora train`: a model from scratch (--init-config) or LoRA / full fine-tuning of a
 * checkpoint folder (--model), on a text file or JSON Lines datasets, with next-token cross-entropy and Adam. The logic is
 * src/train/run.ts. Exit codes: 0 done, 1 failed (also a run that --stop-on-no-gradient stopped: what
 * was trained is saved), 2 bad arguments, 130 interrupted (Ctrl-C; what was trained so far is saved).
 */
import type { DenseDtype } from '../../io/hf_checkpoint_core.js';
import { existsSync, statSync } from 'node:fs';
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { PluginArgsError } from '../../args/errors.js';
import { TokenizerError } from '../../data/tokenizer.js';
import type { DatasetSpec } from '../../data/datasets.js';
import { DatasetError } from '../../data/datasets_error.js';
import { DATASET_TYPES, type DatasetType } from '../../data/datasets_formats.js';
import { TrainError } from '../../train/errors.js';
import { onInterrupt } from '../../train/interrupt.js';
import { DIVERGENCE_PATIENCE } from '../../train/loop.js';
import { INIT_PRESET_NAMES } from '../../train/presets.js';
import { runTraining, type TrainMode, type TrainRunResult } from '../../train/run.js';
import { FileError } from '../../util/files.js';
import { outputFolderProblem } from '../../util/output_folder.js';
import { MAX_WASM_THREADS } from '../../backends/wasm/threads_node.js';
import { BACKENDS, selectBackend } from '../backend.js';
import { limitHeapGrowthForTraining } from '../heap_growth.js';
import { ExitCode, UsageError } from '../errors.js';
import type { ExpertDtype } from '../../io/hf_block.js';
import {
  denseDtypeOption, expertDtypeOption, flagOf, pluginArgsFromArgv, pluginOptions, tensorCoresFlagProblem, tensorCoresNote,
  tensorCoresOption, wasmThreadsFlagProblem,
} from '../plugin_options.js';
import type { TensorCoreMode } from '../../args/tensor_cores.js';
import { RunConfigError, readRunConfig } from '../../train/run_config.js';
import { LR_SCHEDULERS, type LRScheduler } from '../../train/schedule.js';

interface TrainArgs {
  config?: string;
  initConfig?: string;
  model?: string;
  data: string;
  val?: string;
  steps: number;
  numEpochs?: number;
  lr: number;
  batch: number;
  seq: number;
  seed: number;
  backend: string;
  tensorCores?: TensorCoreMode;
  wasmThreads?: number;
  out: string;
  lrScheduler?: LRScheduler;
  warmupSteps?: number;
  warmupRatio?: number;
  gradAccum?: number;
  maxGradNorm?: number;
  gradientCheckpointing?: boolean;
  evalEvery?: number;
  saveEvery?: number;
  saveTotalLimit?: number;
  metrics?: string;
  resume?: string;
  datasets?: DatasetSpec[];
  dataType?: string;
  tokenizer?: string;
  samplePacking?: boolean;
  trainOnInputs?: boolean;
  valSetSize?: number;
  overwrite: boolean;
  json: boolean;
  expertDtype?: ExpertDtype;
  int4GroupSize?: number;
  denseDtype?: DenseDtype;
  stopOnNoGradient?: boolean;
}

export const command = 'train';
export const describe = 'Train an MoE model from scratch or fine-tune one (LoRA with the --lora-* flags) on a text file or a JSON Lines dataset';

/** Default learning rates: LoRA adapters start at zero and take a larger step. */
export const DEFAULT_LR = { full: 3e-3, lora: 1e-2 } as const;

/** --data-type's values: a text file, or a dataset type */
const DATA_TYPES: readonly string[] = ['text', ...DATASET_TYPES];

const isFile = (p: string) => existsSync(p) && statSync(p).isFile();
const isDir = (p: string) => existsSync(p) && statSync(p).isDirectory();

const LORA_FLAG = /^lora-(?!mode$)/;
const SINGLE_FLAGS = ['config', 'init-config', 'model', 'data', 'val', 'steps', 'lr', 'batch', 'seq', 'seed', 'backend', 'out',
  'overwrite', 'expert-dtype', 'int4-group-size', 'lr-scheduler', 'warmup-steps', 'grad-accum', 'max-grad-norm', 'eval-every', 'save-every',
  'save-total-limit', 'metrics', 'resume', 'data-type', 'tokenizer', 'val-set-size',
  'stop-on-no-gradient', 'tensor-cores', 'wasm-threads'];

/** The defaults of the flags a run config may set too (yargs gets none: a given flag must be told from a default). */
const TRAIN_DEFAULTS = { steps: 200, batch: 8, seq: 64, seed: 1, backend: 'wasm' } as const;

/** Flags as yargs gives them: the dashed name and the camelCase one. */
const camel = (flag: string) => flag.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
const dashed = (field: string) => field.replace(/[A-Z]/g, c => `-${c.toLowerCase()}`);

/** The checks of the parsed (and, with --config, merged) flags: a message for the first problem, or true. */
function checkTrainArgs(argv: Record<string, unknown>): string | true {
  // yargs collects a repeated flag into a list
  const repeated = SINGLE_FLAGS.find(f => Array.isArray(argv[f]));
  if (repeated !== undefined) return `--${repeated} is given ${(argv[repeated] as unknown[]).length} times; give it once`;
  if (argv.data === undefined && argv.datasets === undefined) return 'Missing required argument: data';
  if (argv.data !== undefined && argv.datasets !== undefined) return 'give --data or a run config\'s datasets, not both';
  const dataType = argv['data-type'] as string | undefined;
  if (dataType !== undefined && !DATA_TYPES.includes(dataType)) {
    return `--data-type must be one of ${DATA_TYPES.join(', ')} but got '${dataType}'`;
  }
  const onText = argv.datasets === undefined && (dataType ?? 'text') === 'text';
  const datasetFlag = ['sample-packing', 'train-on-inputs', 'val-set-size'].find(f => argv[f] !== undefined);
  if (onText && datasetFlag !== undefined) return `--${datasetFlag} is for JSON Lines datasets (--data-type), not a text file`;
  if (!onText && argv.val !== undefined) return '--val is a held-out text file; with a dataset, split validation samples off with --val-set-size';
  if (argv.out === undefined) return 'Missing required argument: out';
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
  if (argv.resume !== undefined && !isDir(argv.resume as string)) return `--resume: '${argv.resume}' is not a directory`;
  for (const name of ['steps', 'batch', 'seq', 'grad-accum', 'eval-every', 'save-every', 'save-total-limit'] as const) {
    const v = argv[name] as number | undefined;
    if (v !== undefined && (!Number.isInteger(v) || v < 1)) return `--${name} must be an integer >= 1 but got ${v}`;
  }
  const warmup = argv['warmup-steps'] as number | undefined;
  if (warmup !== undefined && (!Number.isInteger(warmup) || warmup < 0)) return `--warmup-steps must be an integer >= 0 but got ${warmup}`;
  const seed = argv.seed as number;
  if (!Number.isInteger(seed) || seed < 0 || seed > 2 ** 32 - 1) return `--seed must be an integer in [0, 2^32) but got ${seed}`;
  for (const name of ['lr', 'max-grad-norm'] as const) {
    const v = argv[name] as number | undefined;
    if (v !== undefined && !(Number.isFinite(v) && v > 0)) return `--${name} must be a number > 0 but got ${v}`;
  }
  const tensorCores = tensorCoresFlagProblem(argv['tensor-cores'], argv.backend as string);
  if (tensorCores !== null) return tensorCores;
  const wasmThreads = wasmThreadsFlagProblem(argv['wasm-threads'] as number | undefined, argv.backend as string);
  if (wasmThreads !== null) return wasmThreads;
  if (argv['eval-every'] !== undefined && argv.val === undefined && argv['val-set-size'] === undefined) {
    return '--eval-every needs validation data: --val (a held-out text) or --val-set-size (with a dataset)';
  }
  const tokenizer = argv.tokenizer as string | undefined;
  if (tokenizer !== undefined && scratch === undefined) return '--tokenizer is for --init-config: a --model folder brings its own tokenizer';
  if (tokenizer !== undefined && !isDir(tokenizer)) return `--tokenizer: '${tokenizer}' is not a directory`;
  if (scratch !== undefined && tokenizer === undefined && !onText) {
    return 'a from-scratch run on a dataset needs --tokenizer DIR (the character tokenizer is built from a text file)';
  }
  // last, as it creates --out's parent folders: the output is checked before any work
  // a resumed run writes into the folder that holds its checkpoints
  return outputFolderProblem(argv.out, { name: '--out', overwrite: argv.overwrite === true || argv.resume !== undefined, inputs: { '--model': model } });
}

/**
 * With --config: the file's values under the flags given on the command line (flags win), then
 * the defaults. Throws a UsageError with every problem of the file.
 */
async function mergeRunConfig(argv: Record<string, unknown>): Promise<void> {
  let fromFile: Record<string, unknown>;
  try {
    fromFile = await readRunConfig(argv.config as string);
  } catch (e) {
    if (e instanceof RunConfigError || e instanceof FileError) throw new UsageError(`--config: ${e.message}`);
    throw e;
  }
  for (const [field, value] of Object.entries(fromFile)) {
    // lora.r → --lora-rank: the plugin flags' names come from the one schema
    const flag = field.startsWith('lora.') ? flagOf(field)!.slice(2) : dashed(field);
    if (argv[flag] !== undefined) continue;
    argv[flag] = value;
    argv[camel(flag)] = value;
  }
}

function applyDefaults(argv: Record<string, unknown>): void {
  for (const [flag, value] of Object.entries(TRAIN_DEFAULTS)) {
    // num_epochs from a run config sets the length when no step count was given (max_steps wins, as in transformers)
    if (flag === 'steps' && argv.numEpochs !== undefined) continue;
    if (argv[flag] === undefined) argv[flag] = argv[camel(flag)] = value;
  }
}

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
      .option('config', {
        type: 'string', requiresArg: true,
        describe: 'a YAML run config with axolotl\'s keys (base_model, adapter, lora_r, micro_batch_size, learning_rate, ' +
            'lr_scheduler, output_dir, ...; see docs/training.md); flags given here win over it',
      })
      .option('data', { type: 'string', requiresArg: true, describe: 'the training text (UTF-8); required' })
      .option('val', { type: 'string', requiresArg: true, describe: 'held-out text: its loss is reported before and after' })
      .option('data-type', {
        type: 'string', requiresArg: true, group: 'Data:',
        describe: `what --data holds: 'text' (default: random windows of a text file) or a JSON Lines dataset type ` +
            `(${DATASET_TYPES.join(', ')}; docs/datasets.md)`,
      })
      .option('sample-packing', { type: 'boolean', group: 'Data:', describe: 'pack several samples a row (a dataset; no attention across samples)' })
      .option('train-on-inputs', { type: 'boolean', group: 'Data:', describe: 'train on prompts and user turns too (default: answers only)' })
      .option('val-set-size', {
        type: 'number', requiresArg: true, group: 'Data:', describe: 'validation samples split off a dataset: a fraction in (0, 1) or a count',
      })
      .option('tokenizer', {
        type: 'string', requiresArg: true, group: 'Model (one of):',
        describe: 'with --init-config: a folder whose tokenizer.json the new model uses (default: characters of --data)',
      })
      .option('steps', { type: 'number', requiresArg: true, describe: `optimizer steps (default ${TRAIN_DEFAULTS.steps})` })
      .option('lr', {
        type: 'number', requiresArg: true,
        describe: `learning rate (default ${DEFAULT_LR.full} without LoRA, ${DEFAULT_LR.lora} with LoRA)`,
      })
      .option('batch', { type: 'number', requiresArg: true, describe: `windows per micro-batch (default ${TRAIN_DEFAULTS.batch})` })
      .option('seq', { type: 'number', requiresArg: true, describe: `tokens per window (default ${TRAIN_DEFAULTS.seq})` })
      .option('seed', {
        type: 'number', requiresArg: true,
        describe: `seed of the initial weights (from scratch) or of LoRA's A, the window order and dropout (default ${TRAIN_DEFAULTS.seed})`,
      })
      .option('lr-scheduler', {
        type: 'string', choices: LR_SCHEDULERS, requiresArg: true, group: 'Schedule:',
        describe: "learning-rate schedule after the warm-up, transformers' formulas (default constant)",
      })
      .option('warmup-steps', { type: 'number', requiresArg: true, group: 'Schedule:', describe: 'linear warm-up from 0 (default 0)' })
      .option('grad-accum', {
        type: 'number', requiresArg: true, group: 'Schedule:',
        describe: 'micro-batches per optimizer step (gradient accumulation; default 1)',
      })
      .option('max-grad-norm', { type: 'number', requiresArg: true, group: 'Schedule:', describe: 'clip the gradients\' global norm (default: no clipping)' })
      .option('gradient-checkpointing', {
        type: 'boolean', group: 'Schedule:',
        describe: 'recompute each decoder layer in the backward pass instead of keeping its activations: one more ' +
            'forward per step, a much lower peak (default off; the same loss and gradients)',
      })
      .option('eval-every', { type: 'number', requiresArg: true, group: 'Checkpoints and metrics:', describe: 'evaluate on --val every N steps' })
      .option('save-every', { type: 'number', requiresArg: true, group: 'Checkpoints and metrics:', describe: 'write --out/checkpoint-<step>/ every N steps' })
      .option('save-total-limit', { type: 'number', requiresArg: true, group: 'Checkpoints and metrics:', describe: 'keep only the newest N checkpoints' })
      .option('metrics', {
        type: 'string', requiresArg: true, group: 'Checkpoints and metrics:',
        describe: 'write a JSON line per step, per evaluation and per warning to this file',
      })
      .option('stop-on-no-gradient', {
        type: 'boolean', group: 'Checkpoints and metrics:',
        describe: 'stop (exit 1, what was trained is saved) when the gradient norm has been 0 for ' +
            `${DIVERGENCE_PATIENCE} steps: a dead model, which is otherwise a warning`,
      })
      .option('resume', {
        type: 'string', requiresArg: true, group: 'Checkpoints and metrics:',
        describe: 'continue from a checkpoint folder (--out/checkpoint-<step>) with the same flags: the same loss curve as an uninterrupted run',
      })
      .option('backend', { type: 'string', choices: BACKENDS, requiresArg: true, describe: `tfjs backend (default ${TRAIN_DEFAULTS.backend})` })
      .option('wasm-threads', {
        type: 'number', requiresArg: true,
        describe: `wasm: tfjs-wasm's threaded SIMD build with this many XNNPACK threads (1 to ${MAX_WASM_THREADS}), the ` +
            "package's loops between the products split over the cores left beside them (default: the single-threaded build tfjs loads in Node)",
      })
      .option('out', {
        type: 'string', requiresArg: true,
        describe: 'output folder: an HF checkpoint + tokenizer.json, or with LoRA a PEFT adapter (checked before ' +
            'training; never the --model folder nor inside it)',
      })
      .option('overwrite', { type: 'boolean', default: false, describe: 'replace a model or adapter already in --out' })
      .option('json', { type: 'boolean', default: false, describe: 'print one JSON object (with every step\'s loss), no progress' });
  return pluginOptions(tensorCoresOption(denseDtypeOption(expertDtypeOption(y, "--model's routed experts: 'stored' keeps BF16/F16 ones 16-bit and MXFP4 " +
      "ones MXFP4 (packed, frozen; default with LoRA), 'float32' widens them (default for full fine-tuning, which trains them), " +
      'int8/int4/nf4/mxfp4 quantize them on load (frozen: QLoRA)'), "--model's attention q/k/v/o and untied token embedding and LM head: " +
      "'stored' keeps BF16/F16 ones 16-bit (packed, frozen, decoded per product: the same results at half their memory; default " +
      "with LoRA), 'float32' widens them (default for full fine-tuning, which trains them)")))
      .check(argv => {
        // with --config the file fills in flags first: the handler checks the merged flags
        if (argv.config !== undefined) return true;
        applyDefaults(argv as Record<string, unknown>);
        return checkTrainArgs(argv as Record<string, unknown>);
      })
      .example('$0 train --init-config qwen3_moe --data base.txt --steps 600 --out my-model', 'from scratch')
      .example('$0 train --model my-model --data target.txt --lora-rank 4 --lora-alpha 8 ' +
          '--lora-targets experts.gate_up,experts.down,router --out my-adapter', 'LoRA on the experts and the router')
      .example('$0 train --config run.yaml --lr 1e-3', 'a YAML run config, its learning rate replaced') as
      unknown as Argv<TrainArgs>;
}

const MODE_NAMES: Readonly<Record<TrainMode, string>> = { scratch: 'from scratch', lora: 'LoRA', full: 'full fine-tuning' };

function formatResult(r: TrainRunResult): string {
  const what = MODE_NAMES[r.mode];
  const loss = (v: number | null) => (v === null ? '-' : v.toFixed(4));
  const lines = [
    `trained ${r.modelType} (${what}) on ${r.backend}: ${r.steps} steps on ${r.trainTokens} training tokens in ` +
        `${r.seconds.toFixed(1)} s (${Math.round(r.tokensPerSecond)} tok/s)`,
    `  train loss       ${loss(r.firstLoss)} (first step) → ${loss(r.finalLoss)} (mean of the last ${Math.min(10, r.losses.length)})`,
  ];
  if (r.valLossBefore !== null) lines.push(`  validation loss  ${loss(r.valLossBefore)} → ${loss(r.valLossAfter)}`);
  lines.push(`  parameters       ${r.params.toLocaleString('en-US')} (trainable ${r.trainableParams.toLocaleString('en-US')})`);
  lines.push(`  wrote            ${r.files.map(f => `${r.out}/${f}`).join(', ')}`);
  for (const w of r.warnings) lines.push(`warning: ${w.message}`);
  if (r.stoppedNoGradient) lines.push(`stopped: no gradient (--stop-on-no-gradient); saved what step ${r.steps} left`);
  if (r.stopped) lines.push(`interrupted: saved the state after step ${r.steps}`);
  return `${lines.join('\n')}\n`;
}

export async function handler(argv: ArgumentsCamelCase<TrainArgs>): Promise<void> {
  if (argv.config !== undefined) {
    const flags = argv as unknown as Record<string, unknown>;
    await mergeRunConfig(flags);
    applyDefaults(flags);
    const problem = checkTrainArgs(flags);
    if (problem !== true) throw new UsageError(problem);
  }
  let plugin;
  try {
    plugin = pluginArgsFromArgv(argv as unknown as Record<string, unknown>);
  } catch (e) {
    if (e instanceof PluginArgsError) throw new UsageError(e.message);
    throw e;
  }
  const started = await selectBackend(argv.backend, { tensorCores: argv.tensorCores, wasmThreads: argv.wasmThreads });
  // on stderr in every mode, before the first step: a user sees at once whether they are in use
  if (started.backend === 'webgpu') {
    process.stderr.write(`note: ${tensorCoresNote(started.tensorCores)}\n`);
    // a mark-compact every few steps inside the wait for the GPU, not a long one every ~35 (heap_growth.ts)
    limitHeapGrowthForTraining();
  }
  if (started.wasmThreads !== undefined) {
    process.stderr.write(`note: wasm threaded SIMD build, ${started.wasmThreads.threads} XNNPACK threads, ` +
        `${started.wasmThreads.loopWorkers} loop workers\n`);
  }
  const interrupt = onInterrupt(() => process.stderr.write('\ninterrupted: stopping after this step and saving (Ctrl-C again quits now)\n'));
  let result: TrainRunResult;
  try {
    result = await runTraining({
      initConfig: argv.initConfig, model: argv.model, val: argv.val, tokenizer: argv.tokenizer,
      // --data-type makes --data a dataset; a run config gives datasets
      ...(argv.data !== undefined && (argv.dataType ?? 'text') !== 'text' ?
        { datasets: [{ path: argv.data, type: argv.dataType as DatasetType }] } :
        { data: argv.data, datasets: argv.datasets }),
      // a run config's num_epochs applies when no step count was given (max_steps wins, as in transformers)
      steps: argv.steps,
      numEpochs: argv.numEpochs,
      lr: argv.lr ?? (plugin.lora !== null ? DEFAULT_LR.lora : DEFAULT_LR.full),
      batch: argv.batch, seq: argv.seq, seed: argv.seed, out: argv.out, overwrite: argv.overwrite || argv.resume !== undefined, plugin,
      lrScheduler: argv.lrScheduler, warmupSteps: argv.warmupSteps, warmupRatio: argv.warmupRatio, gradAccum: argv.gradAccum,
      maxGradNorm: argv.maxGradNorm, gradientCheckpointing: argv.gradientCheckpointing, evalEvery: argv.evalEvery, saveEvery: argv.saveEvery, saveTotalLimit: argv.saveTotalLimit,
      metrics: argv.metrics, resume: argv.resume,
      samplePacking: argv.samplePacking, trainOnInputs: argv.trainOnInputs, valSetSize: argv.valSetSize,
      expertDtype: argv.expertDtype, int4GroupSize: argv.int4GroupSize, denseDtype: argv.denseDtype,
      progress: { quiet: argv.json },
      shouldStop: () => interrupt.requested,
      stopOnNoGradient: argv.stopOnNoGradient === true,
      // at once, as well as in the summary: a long run shows it while there is still time to stop it
      // (past the progress bar's line on a terminal)
      onWarning: w => process.stderr.write(`${process.stderr.isTTY && !argv.json ? '\n' : ''}warning: ${w.message}\n`),
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
    if (err instanceof TrainError || err instanceof TokenizerError || err instanceof DatasetError) {
      process.stderr.write(`tfjs-moe-lora: error: ${err.message}\n`);
      throw new ExitCode(1);
    }
    throw err;
  } finally {
    interrupt.dispose();
  }
  const shown = started.backend === 'webgpu' ? { ...result, tensorCores: started.tensorCores } : result;
  process.stdout.write(argv.json ? `${JSON.stringify(shown)}\n` : formatResult(result));
  if (result.stopped) throw new ExitCode(130);
  if (result.stoppedNoGradient) throw new ExitCode(1);
}
