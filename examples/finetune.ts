/**
 * LoRA fine-tuning of a small MoE language model, end to end (`npm run example`):
 *
 * 1. loads the shipped base model (examples/models/tala-moe: an HF qwen3_moe checkpoint trained
 *    by `tfjs-moe-lora train` on the base register of Tala, a language made up by this project)
 *    and its character tokenizer;
 * 2. registers the plugin with LoRA on the fused expert weights and the router;
 * 3. fine-tunes the adapters on the target register (other word order, suffixes, fewer words)
 *    with a progress bar;
 * 4. compares the base and the adapted model on held-out target text (loss, greedy generation);
 * 5. writes the PEFT adapter, a JSON log and the loss curve (SVG) to --out, as one atomic save
 *    (writeArtifactFolder): a crash leaves the previous run's files or the new ones, never an
 *    adapter with another run's log.
 *
 * Ctrl-C stops after the current step, saves the adapter, the log and the plot, and exits with
 * code 130; `--resume` continues from them (Adam's moments start afresh). A second Ctrl-C quits
 * at once. Run `npm run example -- --help` for the flags.
 *
 * `--resume` takes the run's settings from log.json: flags left out get the saved values; a flag
 * given with another value than the saved one (--lr, --batch, --seq, --seed, --lora-rank,
 * --lora-alpha, --targets, --model, --data) is an error naming each, since the run would silently
 * not be the one it continues. --steps may only grow (below the steps done is an error); --val and
 * --backend may change (they do not change what is trained).
 *
 * It imports only what the package exports, so it runs from an installed package as it is
 * (examples/README.md says how; inside this repository tsconfig.json's `paths` point
 * 'tfjs-moe-lora' at src/).
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';  // registers the gradients in Node
import { existsSync } from 'node:fs';
import { readFile, writeFile } from 'node:fs/promises';
import { join, relative, resolve } from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import {
  createProgress, evaluateLoss, generateGreedy, loadHFCheckpoint, loadPeftAdapter, LORA_TARGETS, MoELoraError,
  onInterrupt, PeftAdapterError, PluginArgsError, readTokenizer, register, savePeftAdapter, seedAdapterInit,
  sparseMoELayers, trainLoop, withAdaptersDisabled, writeArtifactFolder, type LoRATarget,
} from 'tfjs-moe-lora';
import { lossChartSVG } from './loss_chart.js';

const here = import.meta.dirname;
const shown = (path: string) => relative(process.cwd(), path) || '.';

const argv = await yargs(hideBin(process.argv))
    .scriptName('npm run example --')
    .usage('$0 [options]\n\nLoRA fine-tuning of the shipped MoE model on the target text; see examples/README.md.')
    .options({
      model: { type: 'string', default: shown(join(here, 'models', 'tala-moe')), describe: 'HF checkpoint folder with tokenizer.json' },
      data: { type: 'string', default: shown(join(here, 'data', 'target_train.txt')), describe: 'training text' },
      val: { type: 'string', default: shown(join(here, 'data', 'target_val.txt')), describe: 'held-out text for the base vs adapted loss' },
      steps: { type: 'number', default: 200, describe: 'total LoRA steps (with --resume: counting the steps done)' },
      lr: { type: 'number', default: 1e-2, describe: 'Adam learning rate' },
      'lora-rank': { type: 'number', default: 4, describe: 'LoRA rank (per expert on the expert weights)' },
      'lora-alpha': { type: 'number', default: 8, describe: 'LoRA alpha (scaling alpha / rank)' },
      targets: {
        type: 'string', default: 'experts.gate_up,experts.down,router',
        describe: 'comma-separated LoRA targets: experts.gate_up, experts.down, router',
      },
      batch: { type: 'number', default: 8, describe: 'windows per step' },
      seq: { type: 'number', default: 64, describe: 'characters per window' },
      seed: { type: 'number', default: 1, describe: 'seed of the adapter init and the window order' },
      backend: { type: 'string', choices: ['wasm', 'cpu'], default: 'wasm', describe: 'tfjs backend' },
      out: { type: 'string', default: shown(join(here, 'out')), describe: 'output folder: adapter/, log.json, loss.svg' },
      resume: { type: 'boolean', default: false, describe: 'continue from the adapter and log.json in --out' },
    })
    .check(a => {
      for (const k of ['steps', 'lora-rank', 'batch', 'seq'] as const) {
        if (!Number.isInteger(a[k]) || a[k] < 1) return `--${k} must be an integer >= 1 but got ${a[k]}`;
      }
      if (!Number.isInteger(a.seed) || a.seed < 0) return `--seed must be an integer >= 0 but got ${a.seed}`;
      if (!(a.lr > 0) || !(a['lora-alpha'] > 0)) return '--lr and --lora-alpha must be numbers > 0';
      for (const [flag, path] of [['--model', join(a.model, 'config.json')], ['--model', join(a.model, 'tokenizer.json')],
        ['--data', a.data], ['--val', a.val]]) {
        if (!existsSync(path)) return `${flag}: '${path}' does not exist`;
      }
      const unknown = a.targets.split(',').map(t => t.trim()).filter(t => !(LORA_TARGETS as readonly string[]).includes(t));
      if (unknown.length > 0) return `--targets: '${unknown[0]}' is not one of ${LORA_TARGETS.join(', ')}`;
      if (a.resume && !(existsSync(join(a.out, 'log.json')) && existsSync(join(a.out, 'adapter', 'adapter_config.json')))) {
        return `--resume: '${a.out}' has no log.json and adapter/ to continue from (run without --resume first)`;
      }
      return true;
    })
    .strict()
    .help()
    .version(false)
    .parseAsync();

interface Log {
  model: string;
  data: string;
  val: string;
  backend: string;
  lora: { r: number; alpha: number; targets: string[] };
  lr: number;
  batch: number;
  seq: number;
  seed: number;
  /** steps done so far (over every run), and the target */
  stepsDone: number;
  stepsPlanned: number;
  interrupted: boolean;
  /** the training loss of every step done, resumed runs included */
  losses: number[];
  /** training seconds over every run */
  trainSeconds: number;
  tokensPerSecond: number;
  valLoss: { base: number; adapted: number };
  generation: { prompt: string; base: string; adapted: string };
}

const logPath = join(argv.out, 'log.json');
const adapterDir = join(argv.out, 'adapter');
const chartPath = join(argv.out, 'loss.svg');
/** Prints one line and exits with code 1 (bad flags or a failed run; never a stack trace). */
function quit(message: string): never {
  console.error(message);
  process.exit(1);
}

/** A flag given on the command line (not a default). */
const given = (flag: string) => hideBin(process.argv).some(a => a === `--${flag}` || a.startsWith(`--${flag}=`) ||
    a === `--${flag.replace(/-(\w)/g, (_, c: string) => c.toUpperCase())}`);
const targetList = (text: string) => text.split(',').map(t => t.trim()).filter(t => t !== '') as LoRATarget[];

let previous: Log | null = null;
if (argv.resume) {
  try {
    previous = JSON.parse(await readFile(logPath, 'utf8')) as Log;
  } catch (e) {
    quit(`--resume: cannot read '${logPath}': ${(e as Error).message}`);
  }
  // the saved run's settings, flag by flag: a flag left out takes it; one given must equal it
  const saved: Array<[string, unknown, unknown, (a: unknown, b: unknown) => boolean]> = [
    ['model', previous.model, argv.model, (a, b) => resolve(String(a)) === resolve(String(b))],
    ['data', previous.data, argv.data, (a, b) => resolve(String(a)) === resolve(String(b))],
    ['lr', previous.lr, argv.lr, Object.is],
    ['batch', previous.batch, argv.batch, Object.is],
    ['seq', previous.seq, argv.seq, Object.is],
    ['seed', previous.seed, argv.seed, Object.is],
    ['lora-rank', previous.lora?.r, argv['lora-rank'], Object.is],
    ['lora-alpha', previous.lora?.alpha, argv['lora-alpha'], Object.is],
    ['targets', previous.lora?.targets?.join(','), targetList(argv.targets).join(','), Object.is],
  ];
  const missing = saved.filter(([, value]) => value === undefined).map(([flag]) => flag);
  if (missing.length > 0 || typeof previous.stepsDone !== 'number') {
    quit(`--resume: '${logPath}' is not a log of this example (it lacks ${[...missing, 'stepsDone'].join(', ')})`);
  }
  const changed = saved.filter(([flag, value, now, same]) => given(flag) && !same(value, now))
      .map(([flag, value, now]) => `--${flag} ${String(now)} (the saved run has ${String(value)})`);
  if (changed.length > 0) {
    quit(`--resume: ${changed.length === 1 ? 'a flag differs' : 'flags differ'} from the run saved in '${argv.out}': ` +
        `${changed.join(', ')}; leave ${changed.length === 1 ? 'it' : 'them'} out to continue that run, or start a new one without --resume`);
  }
  if (argv.steps < previous.stepsDone) {
    quit(`--resume: --steps ${argv.steps} is below the ${previous.stepsDone} steps already done in '${argv.out}'; ` +
        `pass --steps ${previous.stepsDone} or more`);
  }
  Object.assign(argv, {
    model: previous.model, data: previous.data, lr: previous.lr, batch: previous.batch, seq: previous.seq, seed: previous.seed,
  });
}

// Ctrl-C from here on: training stops after the current step (or before the first) and saves
const interrupt = onInterrupt(() => process.stderr.write('\ninterrupted: saving after this step (Ctrl-C again quits now)\n'));

// 1. the backend, the base model and its tokenizer
await import(argv.backend === 'wasm' ? '@tensorflow/tfjs-backend-wasm' : '@tensorflow/tfjs-backend-cpu');
await tf.setBackend(argv.backend);
await tf.ready();
const tokenizer = await readTokenizer(argv.model);
const model = await loadHFCheckpoint(argv.model);
const trainTokens = tokenizer.encode(await readFile(argv.data, 'utf8'));
const valText = await readFile(argv.val, 'utf8');
const valTokens = tokenizer.encode(valText);

// 2. the plugin: fused MoE kernels, LoRA on the experts and the router, everything else frozen
let lora: Log['lora'];
try {
  if (previous !== null) {
    register({ models: [model] });
    const loaded = await loadPeftAdapter(model, adapterDir);
    lora = { r: loaded.r, alpha: loaded.alpha, targets: loaded.targets };
  } else {
    const targets = targetList(argv.targets);
    register({ models: [model], lora: { r: argv['lora-rank'], alpha: argv['lora-alpha'], targets } });
    seedAdapterInit(model, 'default', argv.seed);
    lora = { r: argv['lora-rank'], alpha: argv['lora-alpha'], targets };
  }
} catch (err) {
  // args that do not fit this model (e.g. a rank above a weight's size), or an adapter for another model
  if (!(err instanceof PluginArgsError || err instanceof PeftAdapterError)) throw err;
  quit(err.message);
}
const trainable = model.trainableWeights.reduce((s, w) => s + w.shape.reduce<number>((p, d) => p * (d ?? 1), 1), 0);
console.log(`model ${argv.model}: ${model.countParams().toLocaleString('en-US')} weights, ` +
    `${sparseMoELayers(model).length} MoE layers; LoRA r ${lora.r}, alpha ${lora.alpha} on ${lora.targets.join(', ')} ` +
    `(${trainable.toLocaleString('en-US')} trainable); backend ${tf.getBackend()}`);

// 3. the prompt for the generations: one held-out line, then the first word of the next
const [line0, line1 = ''] = valText.split('\n');
const prompt = `${line0}\n${line1.split(' ')[0]} `;
const newline = tokenizer.encode('\n')[0];
const generate = async () => tokenizer.decode(await generateGreedy(model, tokenizer.encode(prompt),
    { maxNewTokens: 60, context: argv.seq, stopToken: newline })).replace(/\n$/, '');
const evaluate = () => evaluateLoss(model, valTokens, { seq: argv.seq });
const baseValLoss = await withAdaptersDisabled(model, evaluate);
const baseGeneration = await withAdaptersDisabled(model, generate);

// 4. training; Ctrl-C stops after the current step
const startStep = previous?.stepsDone ?? 0;
console.log(`training ${argv.data} (${trainTokens.length} characters): steps ${startStep + 1}..${argv.steps}, ` +
    `batch ${argv.batch} × ${argv.seq}, lr ${argv.lr}`);
const progress = createProgress(argv.steps, startStep);
let result: Awaited<ReturnType<typeof trainLoop>>;
try {
  result = await trainLoop(model, trainTokens, {
    steps: argv.steps, startStep, lr: argv.lr, batch: argv.batch, seq: argv.seq, seed: argv.seed,
    onStep: r => progress.update(r), shouldStop: () => interrupt.requested,
  });
} catch (err) {
  // a run that diverged, or flags the model cannot take (a batch too large): one line, nothing saved
  progress.stop();
  if (!(err instanceof MoELoraError)) throw err;
  quit(`training stopped: ${err.message}`);
}
progress.stop();
interrupt.dispose();

// 5. base vs adapted, and the files
const adaptedValLoss = await evaluate();
const adaptedGeneration = await generate();
const losses = [...(previous?.losses ?? []), ...result.losses];
const trainSeconds = (previous?.trainSeconds ?? 0) + result.seconds;
const log: Log = {
  model: argv.model, data: argv.data, val: argv.val, backend: tf.getBackend(), lora,
  lr: argv.lr, batch: argv.batch, seq: argv.seq, seed: argv.seed,
  stepsDone: result.step, stepsPlanned: argv.steps, interrupted: result.stopped, losses, trainSeconds,
  tokensPerSecond: trainSeconds > 0 ? (losses.length * argv.batch * argv.seq) / trainSeconds : 0,
  valLoss: { base: baseValLoss, adapted: adaptedValLoss },
  generation: { prompt, base: baseGeneration, adapted: adaptedGeneration },
};
// the adapter, the log resume reads and the plot are one artifact: all old or all new
const OUTPUTS = ['adapter', 'log.json', 'loss.svg'];
await writeArtifactFolder(argv.out, async dir => {
  await savePeftAdapter(model, join(dir, 'adapter'));
  await writeFile(join(dir, 'log.json'), `${JSON.stringify(log, null, 2)}\n`);
  await writeFile(join(dir, 'loss.svg'), lossChartSVG({
    title: `LoRA r ${lora.r} on ${lora.targets.join(', ')}: target-text loss`, losses, baseValLoss, adaptedValLoss,
  }));
}, { owns: name => OUTPUTS.includes(name), what: 'examples/finetune.ts --out' });

const change = (100 * (adaptedValLoss - baseValLoss)) / baseValLoss;
const quoted = (s: string) => JSON.stringify(s);
console.log([
  '',
  `validation loss on held-out target text (${valTokens.length} characters, nats per character):`,
  `  base     ${baseValLoss.toFixed(4)}`,
  `  adapted  ${adaptedValLoss.toFixed(4)}  (${change >= 0 ? '+' : ''}${change.toFixed(1)}%)`,
  `greedy continuation of ${quoted(prompt)}:`,
  `  base     ${quoted(baseGeneration)}`,
  `  adapted  ${quoted(adaptedGeneration)}`,
  `training: ${result.losses.length} steps in ${result.seconds.toFixed(1)} s (${Math.round(result.tokensPerSecond)} tokens/s)`,
  `wrote ${adapterDir}/ (PEFT adapter), ${logPath}, ${chartPath}`,
].join('\n'));
if (result.stopped) {
  console.log(`stopped at step ${result.step} of ${argv.steps}; continue with --resume`);
  process.exitCode = 130;
}
