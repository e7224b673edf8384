/**
 * The plugin args as command-line flags, generated from the one schema (src/args/schema.ts):
 * `--expert-kernel fused --lora-mode auto --strict --lora-rank 8 --lora-alpha 16
 * --lora-targets experts.gate_up,experts.down,router`. `pluginArgsFromArgv` turns parsed flags
 * into plugin args through the same validation as register(), so the messages are the same,
 * each prefixed by its flag. Any --lora-* flag other than --lora-mode turns LoRA on.
 */
import { MAX_WASM_THREADS } from '../backends/wasm/threads_node.js';
import type { Argv, Options } from 'yargs';
import { PluginArgsError, type PluginArgsProblem } from '../args/errors.js';
import { PLUGIN_ARG_SPECS, keyOf, type ArgSpec, type ResolvedPluginArgs } from '../args/schema.js';
import { collectArgProblems, describeValue } from '../args/validate.js';
import { suggestName } from '../args/suggest.js';
import { TENSOR_CORES_SPEC, tensorCoresProblems, type TensorCoreMode } from '../args/tensor_cores.js';
import { EXPERT_DTYPES, type ExpertDtype } from '../io/hf_block.js';
import { DENSE_DTYPES, type DenseDtype } from '../io/hf_checkpoint_core.js';
import { INT4_GROUP_SIZES } from '../ops/quantized.js';

/** The schema entries that have a flag. */
export const PLUGIN_FLAG_SPECS: readonly ArgSpec[] = PLUGIN_ARG_SPECS.filter(s => s.flag !== undefined);

/** '--lora-rank' for 'lora.r', undefined for args without a flag. */
export function flagOf(path: string): string | undefined {
  const spec = PLUGIN_FLAG_SPECS.find(s => s.path === path);
  return spec ? `--${spec.flag}` : undefined;
}

const isLoRAFlag = (spec: ArgSpec) => spec.path.startsWith('lora.');

function helpText(spec: ArgSpec): string {
  let text = spec.description;
  if (spec.kind === 'enum') text += ` (${spec.values!.join(' | ')})`;
  if (spec.kind === 'targets') text += '; comma-separated';
  if (isLoRAFlag(spec)) {
    const shown = Array.isArray(spec.default) ? spec.default.join(',') : String(spec.default);
    text += spec.required ? '; required with LoRA' : `; default with LoRA: ${shown}`;
  }
  return text;
}

/** yargs options for one spec. Values reach validation as typed (numbers parsed here), never rejected by yargs. */
function optionOf(spec: ArgSpec): Options {
  const option: Options = { describe: helpText(spec), group: 'Plugin:' };
  if (spec.kind === 'boolean') {
    option.type = 'boolean';
  } else {
    // strings, so that a bad value reaches the validation as typed ('abc', not NaN)
    option.type = 'string';
    option.requiresArg = true;
  }
  // a LoRA flag without a default shows whether the user gave it (any of them turns LoRA on)
  if (!isLoRAFlag(spec) && spec.default !== undefined) option.default = spec.default;
  return option;
}

/**
 * Adds the plugin flags to a yargs parser, with a check that runs the plugin-arg validation (so
 * a bad value fails the parse with the validation's message).
 *
 * ```js
 * const argv = await pluginOptions(yargs(['--lora-rank', '8', '--lora-alpha', '16'])).parseAsync();
 * pluginArgsFromArgv(argv);   // {expertKernel: 'fused', ..., lora: {r: 8, alpha: 16, ...}}
 * ```
 */
export function pluginOptions<T>(yargs: Argv<T>, options: { check?: boolean } = {}): Argv<T> {
  let y = yargs;
  for (const spec of PLUGIN_FLAG_SPECS) y = y.option(spec.flag!, optionOf(spec)) as Argv<T>;
  if (options.check ?? true) {
    y = y.check(argv => {
      try {
        pluginArgsFromArgv(argv as Record<string, unknown>);
        return true;
      } catch (err) {
        if (err instanceof PluginArgsError) return err.message;
        throw err;
      }
    });
  }
  return y;
}

/**
 * `--expert-dtype stored|float32|int8|int4|nf4|nf4-dq|mxfp4`, on every command that loads a model:
 * 'stored' keeps BF16/F16 routed experts 16-bit in memory (packed, frozen) and MXFP4 ones MXFP4,
 * 'float32' widens them, the others quantize them on load (frozen; docs/quantized.md)
 * (loadHFCheckpoint's expertDtype). Not a register() arg, but named like the plugin's --expert-* flags.
 *
 * ```js
 * const argv = await expertDtypeOption(yargs(['--expert-dtype', 'float32'])).parseAsync();
 * argv.expertDtype;  // 'float32'
 * ```
 */
export const EXPERT_DTYPE_FLAG = 'expert-dtype';
export function expertDtypeOption<T>(yargs: Argv<T>, describe = "routed experts: 'stored' keeps BF16/F16 ones 16-bit " +
    "in memory (packed, frozen; half the memory) and MXFP4 ones MXFP4, 'float32' widens them, int8/int4/nf4/nf4-dq/mxfp4 " +
    'quantize them on load (frozen; docs/quantized.md)'): Argv<T & { expertDtype?: ExpertDtype; int4GroupSize?: number }> {
  return yargs.option(EXPERT_DTYPE_FLAG, { type: 'string', choices: EXPERT_DTYPES, requiresArg: true, describe })
      .option(INT4_GROUP_SIZE_FLAG, {
        type: 'number', choices: INT4_GROUP_SIZES, requiresArg: true,
        describe: 'with --expert-dtype int4: inputs per scale and zero point (default 64)',
      })
      .check(argv => argv.int4GroupSize === undefined || argv.expertDtype === 'int4' ||
        `--${INT4_GROUP_SIZE_FLAG} needs --${EXPERT_DTYPE_FLAG} int4 but --${EXPERT_DTYPE_FLAG} is ${argv.expertDtype ?? 'not given'}`) as
    unknown as Argv<T & { expertDtype?: ExpertDtype; int4GroupSize?: number }>;
}
export const INT4_GROUP_SIZE_FLAG = 'int4-group-size';

/**
 * `--dense-dtype stored|float32`, beside --expert-dtype on the commands that load a model:
 * 'stored' keeps BF16/F16 attention projections and an untied token embedding and LM head 16-bit
 * in memory (packed, frozen, decoded in each product: bit for bit the float32 results), 'float32'
 * (default) widens them (loadHFCheckpoint's denseDtype).
 *
 * ```js
 * const argv = await denseDtypeOption(yargs(['--dense-dtype', 'stored'])).parseAsync();
 * argv.denseDtype;  // 'stored'
 * ```
 */
export const DENSE_DTYPE_FLAG = 'dense-dtype';
export function denseDtypeOption<T>(yargs: Argv<T>, describe = "attention q/k/v/o and an untied token embedding and LM head: 'stored' " +
    "keeps BF16/F16 ones 16-bit in memory (packed, frozen, decoded per product; same results, half their memory), " +
    "'float32' (default) widens them"): Argv<T & { denseDtype?: DenseDtype }> {
  return yargs.option(DENSE_DTYPE_FLAG, { type: 'string', choices: DENSE_DTYPES, requiresArg: true, describe }) as
    unknown as Argv<T & { denseDtype?: DenseDtype }>;
}

/**
 * `--tensor-cores auto|off` (src/args/tensor_cores.ts), on the commands that run a model on a
 * backend: 'auto' asks Dawn for the subgroup-matrix features and uses them where the adapter has
 * them. A string, so that a bad value reaches tensorCoresFlagProblem as typed; the command's own
 * check calls that with the backend it will use (whose default is the command's).
 *
 * ```js
 * const argv = await tensorCoresOption(yargs(['--tensor-cores', 'auto'])).parseAsync();
 * argv.tensorCores;  // 'auto'
 * ```
 */
export const TENSOR_CORES_FLAG_NAME = TENSOR_CORES_SPEC.flag!;
export function tensorCoresOption<T>(yargs: Argv<T>): Argv<T & { tensorCores?: TensorCoreMode }> {
  return yargs.option(TENSOR_CORES_FLAG_NAME, {
    type: 'string', requiresArg: true,
    describe: `${TENSOR_CORES_SPEC.description} (${TENSOR_CORES_SPEC.values!.join(' | ')}; default ${TENSOR_CORES_SPEC.default}); ` +
        'the run says whether they are in use',
  }) as unknown as Argv<T & { tensorCores?: TensorCoreMode }>;
}

/**
 * The first problem of --tensor-cores with this --backend, prefixed by the flag, or null.
 *
 * ```js
 * tensorCoresFlagProblem('on', 'webgpu');
 * // "--tensor-cores: tensorCores: expected one of 'auto', 'off' but got 'on' (string)"
 * ```
 */
export function tensorCoresFlagProblem(value: unknown, backend: string): string | null {
  const problems = tensorCoresProblems(value, backend);
  return problems.length === 0 ? null : `--${TENSOR_CORES_FLAG_NAME}: ${problems[0]}`;
}

/**
 * `--wasm-threads`'s problem (train, bench): another backend than wasm, or not an integer from 1
 * to MAX_WASM_THREADS; null when fine or absent.
 */
export function wasmThreadsFlagProblem(threads: number | undefined, backend: string): string | null {
  if (threads === undefined) return null;
  if (backend !== 'wasm') return `--wasm-threads is for --backend wasm, not ${backend}`;
  if (!Number.isInteger(threads) || threads < 1 || threads > MAX_WASM_THREADS) {
    return `--wasm-threads must be an integer from 1 to ${MAX_WASM_THREADS} but got ${threads}`;
  }
  return null;
}

/** How a run says what selectBackend's tensorCores state means (BackendReport.tensorCores). */
export function tensorCoresNote(state: string): string {
  if (state === 'on') return 'webgpu tensor cores: on (the wide expert products in f16 with f32 accumulation)';
  if (state === 'off') return 'webgpu tensor cores: off (f32 kernels)';
  return `webgpu tensor cores: unavailable, f32 kernels: ${state}`;
}

const NUMBER = /^[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?$/i;

/** A flag's raw value as the arg's type: numbers parsed, lists split on commas; anything odd stays as is. */
function convert(spec: ArgSpec, raw: unknown, problems: PluginArgsProblem[]): unknown {
  if (spec.kind === 'targets') {
    const parts = (Array.isArray(raw) ? raw : [raw]).flatMap(v => String(v).split(','));
    return parts.map(p => p.trim()).filter(p => p.length > 0);
  }
  if (Array.isArray(raw)) {
    problems.push({ arg: spec.path, message: `${spec.path}: expected one value but got ${raw.length} (${raw.map(describeValue).join(', ')})` });
    return undefined;
  }
  if ((spec.kind === 'integer' || spec.kind === 'number') && typeof raw === 'string' && NUMBER.test(raw.trim())) {
    return Number(raw);
  }
  return raw;
}

/** Flags that look like plugin flags (--lora-*, --expert-*) but are not: "did you mean". */
function unknownPluginFlags(argv: Record<string, unknown>): PluginArgsProblem[] {
  const flags = PLUGIN_FLAG_SPECS.map(s => s.flag!);
  const camel = (f: string) => f.replace(/-([a-z])/g, (_, c: string) => c.toUpperCase());
  const known = new Set([...flags, ...flags.map(camel), EXPERT_DTYPE_FLAG, camel(EXPERT_DTYPE_FLAG)]);
  const problems: PluginArgsProblem[] = [];
  for (const key of Object.keys(argv)) {
    if (known.has(key) || !/^(lora|expert)[-A-Z]/.test(key)) continue;
    // yargs gives each flag twice ('lora-rnak' and 'loraRnak'): report the dashed one
    if (/[A-Z]/.test(key) && Object.keys(argv).some(k => k !== key && camel(k) === key)) continue;
    const hint = suggestName(key, flags);
    problems.push({ arg: key, message: `--${key}: unknown flag (expected one of ${flags.map(f => `--${f}`).join(', ')})` +
        (hint ? `; did you mean --${hint}?` : '') });
  }
  return problems;
}

/**
 * Parsed flags → resolved plugin args (without models), through the register() validation.
 * Throws one PluginArgsError whose lines carry the flag names: "--lora-rank: lora.r: expected …".
 */
export function pluginArgsFromArgv(argv: Record<string, unknown>): ResolvedPluginArgs {
  const problems: PluginArgsProblem[] = unknownPluginFlags(argv);
  const args: Record<string, unknown> = {};
  const lora: Record<string, unknown> = {};
  for (const spec of PLUGIN_FLAG_SPECS) {
    const raw = argv[spec.flag!];
    if (raw === undefined) continue;
    const value = convert(spec, raw, problems);
    if (isLoRAFlag(spec)) lora[keyOf(spec.path)] = value;
    else args[spec.path] = value;
  }
  if (Object.keys(lora).length > 0) args.lora = lora;
  const checked = collectArgProblems(args);
  problems.push(...checked.problems);
  if (problems.length > 0) {
    throw new PluginArgsError(problems, 'command line', arg => flagOf(arg) ?? flagOf(arg.replace(/\[\d+\]$/, '')));
  }
  return checked.resolved as ResolvedPluginArgs;
}
