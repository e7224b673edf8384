/**
 * `tfjs-moe-lora generate --model DIR [--adapter DIR] (--prompt T | --chat FILE) [--max-new-tokens N]
 * [--temperature T] [--top-k K] [--top-p P] [--seed S] [--stop S]... [--json]`: text from a model
 * folder (HF checkpoint or TF.js), optionally with a PEFT adapter, through `generate` with the
 * folder's tokenizer and generation_config.json (flags win over the file).
 */
import { existsSync, statSync } from 'node:fs';
import type { ArgumentsCamelCase, Argv } from 'yargs';
import type { ChatMessage } from '../../data/chat_template.js';
import { readTokenizer } from '../../data/tokenizer_file.js';
import { generate, type GenerationPrompt, type GenerationResult } from '../../generate/generate.js';
import { readGenerationConfig } from '../../generate/generation_config_file.js';
import { loadModelDir } from '../../io/model_dir.js';
import { loadPeftAdapter } from '../../io/peft_files.js';
import type { TensorCoreMode } from '../../args/tensor_cores.js';
import { BACKENDS, selectBackend } from '../backend.js';
import { tensorCoresFlagProblem, tensorCoresNote, tensorCoresOption } from '../plugin_options.js';
import { readChat } from './tokenize.js';

export interface GenerateArgs {
  model: string;
  adapter?: string;
  prompt?: string;
  chat?: string;
  maxNewTokens?: number;
  temperature?: number;
  topK?: number;
  topP?: number;
  seed?: number;
  stop?: string[];
  json: boolean;
  backend: string;
  /** webgpu: 'auto' uses the tensor cores where the adapter has them (default 'off') */
  tensorCores?: TensorCoreMode;
}

/** What `generate --json` prints. */
export interface GenerateReport extends Omit<GenerationResult, 'promptIds' | 'ids'> {
  /** the prompt text the model saw: --prompt, or the chat rendered by the chat template */
  prompt: string;
  promptIds: number[];
  ids: number[];
  /** seconds from the first forward pass to the last token (model loading not included) */
  seconds: number;
  /** on webgpu: 'on', 'off' or why --tensor-cores auto found none (selectBackend's BackendReport) */
  tensorCores?: string;
}

export const command = 'generate';
export const describe = 'Generate text from a model folder (and a PEFT adapter): greedy or sampled, with a KV cache';

const SINGLE_FLAGS = ['model', 'adapter', 'prompt', 'chat', 'max-new-tokens', 'temperature', 'top-k', 'top-p', 'seed', 'backend',
  'tensor-cores'];
const isDir = (p: string) => existsSync(p) && statSync(p).isDirectory();

/** The checks that need no file contents, before any work. */
function checkArgs(argv: Record<string, unknown>): string | true {
  const repeated = SINGLE_FLAGS.find(f => Array.isArray(argv[f]));
  if (repeated !== undefined) return `--${repeated} is given ${(argv[repeated] as unknown[]).length} times; give it once`;
  if (argv['prompt'] === undefined && argv['chat'] === undefined) return 'give --prompt or --chat';
  for (const name of ['model', 'adapter'] as const) {
    const dir = argv[name] as string | undefined;
    if (dir !== undefined && !isDir(dir)) return `--${name}: '${dir}' is not a directory`;
  }
  const integer = (flag: string, min: number, max = Infinity) => {
    const v = argv[flag] as number | undefined;
    return v === undefined || (Number.isInteger(v) && v >= min && v <= max) ? null :
      `--${flag} must be an integer ${max === Infinity ? `>= ${min}` : `in [${min}, 2^32)`} but got ${v}`;
  };
  const bad = integer('max-new-tokens', 0) ?? integer('top-k', 0) ?? integer('seed', 0, 2 ** 32 - 1);
  if (bad !== null) return bad;
  const temperature = argv['temperature'] as number | undefined;
  if (temperature !== undefined && !(Number.isFinite(temperature) && temperature >= 0)) {
    return `--temperature must be a number >= 0 (0: greedy) but got ${temperature}`;
  }
  const topP = argv['top-p'] as number | undefined;
  if (topP !== undefined && !(topP > 0 && topP <= 1)) return `--top-p must be a number in (0, 1] but got ${topP}`;
  const tensorCores = tensorCoresFlagProblem(argv['tensor-cores'], argv['backend'] as string);
  if (tensorCores !== null) return tensorCores;
  const stops = (argv['stop'] as unknown[] | undefined) ?? [];
  if (stops.some(s => typeof s !== 'string' || s.length === 0)) return '--stop must be a non-empty string';
  return true;
}

export function builder(yargs: Argv): Argv<GenerateArgs> {
  return tensorCoresOption(yargs)
      .option('model', {
        type: 'string', demandOption: true, requiresArg: true,
        describe: 'the model folder: an HF checkpoint or a TF.js model, with its tokenizer.json (and ' +
            'tokenizer_config.json, generation_config.json)',
      })
      .option('adapter', { type: 'string', requiresArg: true, describe: 'a PEFT adapter folder to apply' })
      .option('prompt', { type: 'string', requiresArg: true, describe: 'the text to continue (encoded with the special tokens)' })
      .option('chat', {
        type: 'string', requiresArg: true,
        describe: 'a JSON file {"messages": [{"role", "content"}, ...]} (or the array alone): rendered by the chat ' +
            'template with the assistant\'s opening, and answered',
      })
      .option('max-new-tokens', { type: 'number', requiresArg: true, describe: 'tokens to add at most (default: generation_config.json, else 128)' })
      .option('temperature', {
        type: 'number', requiresArg: true,
        describe: '0: greedy; > 0: sample (default: generation_config.json; greedy unless it says do_sample)',
      })
      .option('top-k', { type: 'number', requiresArg: true, describe: 'sample from the k most likely tokens (0: all; default 50)' })
      .option('top-p', { type: 'number', requiresArg: true, describe: 'sample from the most likely tokens holding probability p (default 1)' })
      .option('seed', { type: 'number', requiresArg: true, describe: 'sampling seed: the same seed, the same text (default random)' })
      .option('stop', {
        type: 'string', array: true, requiresArg: true,
        describe: 'stop when the new text contains this string (not printed); repeat for several',
      })
      .option('json', { type: 'boolean', default: false, describe: 'print one JSON object {prompt, text, ids, finishReason, ...}' })
      .option('backend', { type: 'string', choices: BACKENDS, default: 'cpu', requiresArg: true, describe: 'tfjs backend' })
      .conflicts('prompt', 'chat')
      .check(argv => checkArgs(argv as Record<string, unknown>))
      .example('$0 generate --model examples/models/tala-moe --prompt "miro " --max-new-tokens 40', 'greedy')
      .example('$0 generate --model ./Qwen3-30B-A3B --adapter ./my-adapter --chat chat.json --temperature 0.7 --seed 1', 'sampled')
      .strict() as unknown as Argv<GenerateArgs>;
}

/**
 * Loads the model folder (and adapter), its tokenizer and generation settings, and generates.
 *
 * ```js
 * const report = await generateReport({model: 'examples/models/tala-moe', prompt: 'miro ', maxNewTokens: 20, json: true, backend: 'cpu'});
 * report.text;
 * ```
 */
export async function generateReport(argv: GenerateArgs): Promise<GenerateReport> {
  const started = await selectBackend(argv.backend, { tensorCores: argv.tensorCores });
  // on stderr, --json or not: whether the tensor cores are in use
  if (started.backend === 'webgpu') process.stderr.write(`note: ${tensorCoresNote(started.tensorCores)}\n`);
  const tokenizer = await readTokenizer(argv.model);
  const generationConfig = await readGenerationConfig(argv.model);
  let prompt: GenerationPrompt;
  let promptText: string;
  if (argv.chat !== undefined) {
    const messages = await readChat(argv.chat) as ChatMessage[];
    // the chat's rendered text, as the model sees it (the template checks the messages)
    promptText = 'applyChatTemplate' in tokenizer ? tokenizer.applyChatTemplate(messages, { addGenerationPrompt: true }) : '';
    prompt = messages;
  } else {
    promptText = prompt = argv.prompt!;
  }
  const { model } = await loadModelDir(argv.model, { expertKernel: 'fused' });
  try {
    if (argv.adapter !== undefined) await loadPeftAdapter(model, argv.adapter);
    const start = performance.now();
    const r = await generate(model, prompt, {
      tokenizer, generationConfig, maxNewTokens: argv.maxNewTokens, temperature: argv.temperature,
      topK: argv.topK, topP: argv.topP, seed: argv.seed, stopStrings: argv.stop,
    });
    const seconds = (performance.now() - start) / 1000;
    return {
      ...r, prompt: promptText, promptIds: Array.from(r.promptIds), ids: Array.from(r.ids), seconds,
      ...(started.backend === 'webgpu' ? { tensorCores: started.tensorCores } : {}),
    };
  } finally {
    model.dispose();
  }
}

const REASONS = { eos: 'an end-of-sequence token', stop: 'a stop string', length: 'the token limit' } as const;

export async function handler(argv: ArgumentsCamelCase<GenerateArgs>): Promise<void> {
  const r = await generateReport(argv);
  if (argv.json) {
    process.stdout.write(`${JSON.stringify(r)}\n`);
    return;
  }
  process.stdout.write(`${r.text}\n`);
  const how = r.sampling === null ? 'greedy' :
    `sampled: temperature ${r.sampling.temperature}, top-k ${r.sampling.topK}, top-p ${r.sampling.topP}, seed ${r.sampling.seed}`;
  process.stderr.write(`[${r.ids.length} tokens in ${r.seconds.toFixed(2)} s, ${how}; stopped at ${REASONS[r.finishReason]}]\n`);
}
