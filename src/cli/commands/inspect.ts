/**
 * `tfjs-moe-lora inspect --model DIR`: a model's MoE layers (routing, sizes, adapters, parameter
 * counts) and whether register() has patched them. A fresh process has not registered the
 * plugin, so every layer reads 'patched: false'; `--register` runs register() on the model first
 * (with the plugin flags) and shows what it patches and adds.
 */
import type { DenseDtype } from '../../io/hf_checkpoint_core.js';
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { existsSync, statSync } from 'node:fs';
import { PluginArgsError } from '../../args/errors.js';
import { loadModelDir, modelDirFormat, MODEL_DIR_FORMATS, ModelDirError, type ModelDirFormat } from '../../io/model_dir.js';
import { inspectModel, type MoELayerReport, type ModelReport } from '../../models/inspect.js';
import type { RoutingConfig } from '../../ops/types.js';
import { register, type PluginHandle } from '../../plugin.js';
import { BACKENDS, selectBackend } from '../backend.js';
import { UsageError } from '../errors.js';
import type { ExpertDtype } from '../../io/hf_block.js';
import { denseDtypeOption, expertDtypeOption, flagOf, pluginArgsFromArgv, pluginOptions, PLUGIN_FLAG_SPECS } from '../plugin_options.js';

interface InspectArgs {
  model: string;
  from?: ModelDirFormat;
  json: boolean;
  register: boolean;
  backend: string;
  /** 'stored' (default), 'float32' or a quantized kind, for an HF checkpoint's experts */
  expertDtype?: ExpertDtype;
  /** with expertDtype 'int4': its group size */
  int4GroupSize?: number;
  /** 'stored' or 'float32' (default), for an HF checkpoint's attention and embedding */
  denseDtype?: DenseDtype;
}

/** What `--register` did: the register() handle's facts. */
export interface RegisterReport {
  backend: string;
  expertKernel: string;
  patchedClasses: string[];
  kernels: string[];
  /** layers that got a new adapter from the LoRA flags */
  adaptersAdded: string[];
}

/** The JSON `inspect --json` prints: the model report, where it came from, and --register's result. */
export interface InspectReport extends ModelReport {
  source: { dir: string; format: ModelDirFormat };
  register: RegisterReport | null;
}

export const command = 'inspect';
export const describe = "List a model's MoE layers: routing, sizes, LoRA adapters, parameters, whether they are patched";

const LORA_FLAGS = PLUGIN_FLAG_SPECS.filter(s => s.path.startsWith('lora.')).map(s => s.flag!);

export function builder(yargs: Argv): Argv<InspectArgs> {
  const y = yargs
      .option('model', {
        type: 'string', demandOption: true, requiresArg: true,
        describe: 'model directory: an HF checkpoint (config.json + model.safetensors) or a TF.js model (model.json)',
      })
      .option('from', {
        type: 'string', choices: MODEL_DIR_FORMATS, requiresArg: true,
        describe: 'the directory\'s format (default: detected from its files)',
      })
      .option('json', { type: 'boolean', default: false, describe: 'print one JSON object' })
      .option('register', {
        type: 'boolean', default: false,
        describe: 'run register() on the model first (with the Plugin flags) and show what it patches and adds',
      })
      .option('backend', {
        type: 'string', choices: BACKENDS, default: 'cpu', requiresArg: true, describe: 'tfjs backend',
      })
      // before the plugin flags' own check, so a LoRA flag without --register says that first
      .check(argv => {
        const dir = argv.model as string;
        if (!existsSync(dir) || !statSync(dir).isDirectory()) return `--model: '${dir}' is not a directory`;
        const lora = LORA_FLAGS.find(f => argv[f] !== undefined);
        if (lora !== undefined && argv.register !== true) return `--${lora} is a register() flag: it needs --register`;
        return true;
      });
  return pluginOptions(denseDtypeOption(expertDtypeOption(y)))
      .example('$0 inspect --model spec/fixtures/hf/mixtral', '')
      .example('$0 inspect --model ./my-model --json', '')
      .example('$0 inspect --model ./my-model --register --lora-rank 8 --lora-alpha 16 --lora-targets experts.gate_up,router',
          '') as unknown as Argv<InspectArgs>;
}

/** Loads, optionally registers, inspects, and gives everything back (registration, tensors). */
export async function inspectDir(argv: InspectArgs & Record<string, unknown>): Promise<InspectReport> {
  let format: ModelDirFormat;
  try {
    format = await modelDirFormat(argv.model, argv.from);
  } catch (e) {
    if (e instanceof ModelDirError) throw new UsageError(`--model: ${e.message}`);
    throw e;
  }
  const args = argv.register ? pluginArgsFromArgv(argv) : null;
  await selectBackend(argv.backend);
  const { model } = await loadModelDir(argv.model, { format, expertDtype: argv.expertDtype, int4GroupSize: argv.int4GroupSize, denseDtype: argv.denseDtype });
  let handle: PluginHandle | null = null;
  try {
    if (args !== null) {
      try {
        handle = register({ ...args, models: [model] });
      } catch (e) {
        // the args against this model (a rank above a weight's size, ...): an argument error, with its flags named
        if (e instanceof PluginArgsError) {
          const prefixed = new PluginArgsError([...e.problems], 'command line', a => flagOf(a) ?? flagOf(a.replace(/\[\d+\]$/, '')));
          throw new UsageError(prefixed.message);
        }
        throw e;
      }
    }
    const report = inspectModel(model);
    return {
      source: { dir: argv.model, format },
      ...report,
      register: handle === null ? null : {
        backend: handle.backend, expertKernel: handle.expertKernel, patchedClasses: [...handle.patchedClasses],
        kernels: [...handle.kernels], adaptersAdded: handle.patched.filter(p => p.adapterAdded).map(p => p.layer),
      },
    };
  } finally {
    handle?.unregister();
    model.dispose();
  }
}

export async function handler(argv: ArgumentsCamelCase<InspectArgs>): Promise<void> {
  const report = await inspectDir(argv as unknown as InspectArgs & Record<string, unknown>);
  process.stdout.write(argv.json ? `${JSON.stringify(report)}\n` : formatInspect(report));
}

const n = (v: number) => v.toLocaleString('en-US');

/** 'softmaxTopK (K 2, renormalize)' */
export function routingLabel(r: RoutingConfig): string {
  const parts = [`K ${r.topK}`];
  if (r.nGroup !== undefined) parts.push(`groups ${r.topkGroup ?? '?'} of ${r.nGroup}`);
  if (r.renormalize) parts.push('renormalize');
  if (r.scalingFactor !== undefined && r.scalingFactor !== 1) parts.push(`scaling ${r.scalingFactor}`);
  return `${r.kind} (${parts.join(', ')})`;
}

function layerLines(l: MoELayerReport): string[] {
  const shared = l.sharedExpert === null ? 'none' :
    `I_s ${l.sharedExpert.intermediate}${l.sharedExpert.gated === null ? '' : l.sharedExpert.gated ? ', sigmoid-gated' : ', ungated'}`;
  const call = l.patched ? `yes, runs the '${l.kernel}' kernel` :
    `no, runs its own call${l.kernel === null ? '' : ` ('${l.kernel}' kernel)`}`;
  const lines = [
    `  ${l.name}  ${l.className}  ${l.family ?? 'custom'} routing ${routingLabel(l.routing)}`,
    `    E ${l.experts}, K ${l.topK}, H ${l.hidden ?? '?'}, I ${l.intermediate}; shared expert: ${shared}`,
    `    params ${n(l.params.total)} (base ${n(l.params.base)}, LoRA ${n(l.params.lora)}); patched: ${call}`,
  ];
  for (const a of l.adapters) {
    const state = [
      a.active === null ? null : a.active ? 'active' : 'inactive',
      a.merged === null ? null : a.merged ? 'merged' : 'not merged',
      l.adaptersDisabled ? 'adapters disabled' : null,
    ].filter(s => s !== null).join(', ');
    lines.push(`    adapter '${a.name}': r ${a.r}, alpha ${a.alpha}${a.rsLoRA ? ' (rsLoRA)' : ''}, scaling ${+a.scaling.toPrecision(6)}, ` +
        `targets ${a.targets.join(', ')}${state ? `; ${state}` : ''}; ${n(a.params)} params`);
  }
  return lines;
}

/** The human-readable report. */
export function formatInspect(r: InspectReport): string {
  const what = r.source.format === 'hf' ? 'HF checkpoint' : 'TF.js LayersModel';
  const t = r.totals;
  const pct = t.params === 0 ? 0 : (100 * t.moeParams) / t.params;
  const lines = [
    `inspect ${r.source.dir} (${what}): ${r.modelType ?? 'no HF config'} model '${r.name}', ${t.moeLayers} MoE layer${t.moeLayers === 1 ? '' : 's'}`,
    r.register !== null ?
      `register() in effect (--register): backend ${r.register.backend}, expert kernel '${r.register.expertKernel}', ` +
          `patched classes ${r.register.patchedClasses.join(', ') || 'none'}, kernels ${r.register.kernels.join(', ') || 'none'}` +
          (r.register.adaptersAdded.length > 0 ? `, adapter added to ${r.register.adaptersAdded.length} layer(s)` : '') :
      r.registered ? 'register() in effect in this process' :
      'register() not in effect in this process: no layer is patched (--register shows what it would patch)',
    ...r.moeLayers.flatMap(layerLines),
    `totals: params ${n(t.params)}, MoE base ${n(t.moeParams)} (${pct.toFixed(1)}%), LoRA ${n(t.loraParams)}, ` +
        `trainable ${n(t.trainableParams)}; adapters: ${t.adapters.join(', ') || 'none'}`,
  ];
  return `${lines.join('\n')}\n`;
}
