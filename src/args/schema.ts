/**
 * The plugin's arguments as data: one table says each arg's name, type, default, range and
 * description. `register()` validates against it (src/args/validate.ts) and the CLI builds its
 * flags from it (src/cli/plugin_options.ts), so both accept the same things with the same messages.
 */
import type * as tfl from '@tensorflow/tfjs-layers';
import { LORA_TARGETS, type LoRATarget } from '../layers/sparse_moe.js';
import type { ExpertKernel, LoRAMode } from '../ops/types.js';

export const EXPERT_KERNELS: readonly ExpertKernel[] = ['fused', 'reference'];
export const LORA_MODES: readonly LoRAMode[] = ['materialize', 'split', 'auto'];

/** A model or a layer whose MoE layers `register()` prepares (adapters) now. */
export type ModelOrLayer = tfl.LayersModel | tfl.layers.Layer;

export interface LoRAArgs {
  /** rank, per expert on the expert weights; integer >= 1, at most min(in, out) of every targeted weight */
  r: number;
  /** s = alpha / r (alpha / √r with rsLoRA); > 0 */
  alpha: number;
  /** must be 0 (see the 'lora.dropout' description); default 0 */
  dropout?: number;
  /** default false */
  rsLoRA?: boolean;
  /** default ['experts.gate_up', 'experts.down'] */
  targets?: LoRATarget[];
  /** default 'default' */
  adapterName?: string;
}

export interface PluginArgs {
  /** default 'fused' */
  expertKernel?: ExpertKernel;
  /** default 'auto' */
  loraMode?: LoRAMode;
  /** default false */
  strict?: boolean;
  models?: ModelOrLayer[];
  /** absent or null: no LoRA (full fine-tuning or inference) */
  lora?: LoRAArgs | null;
}

export interface ResolvedLoRAArgs {
  r: number;
  alpha: number;
  dropout: number;
  rsLoRA: boolean;
  targets: LoRATarget[];
  adapterName: string;
}

/** PluginArgs after validation, every default filled in. */
export interface ResolvedPluginArgs {
  expertKernel: ExpertKernel;
  loraMode: LoRAMode;
  strict: boolean;
  models: ModelOrLayer[];
  lora: ResolvedLoRAArgs | null;
}

export type ArgKind = 'enum' | 'boolean' | 'integer' | 'number' | 'name' | 'targets' | 'models' | 'object';

export interface ArgSpec {
  /** dotted path in PluginArgs: 'expertKernel', 'lora.r' */
  path: string;
  kind: ArgKind;
  /** the allowed values ('enum') or list items ('targets') */
  values?: readonly string[];
  default?: unknown;
  /** must be given when its parent object is (lora.r, lora.alpha) */
  required?: boolean;
  /** inclusive lower bound */
  min?: number;
  /** exclusive lower bound */
  above?: number;
  /** exclusive upper bound */
  below?: number;
  description: string;
  /** the command-line flag, without '--'; absent: not settable from the command line */
  flag?: string;
}

/** Why LoRA dropout is refused on expert weights (used in the description and in the message). */
export const EXPERT_DROPOUT_REASON =
    'LoRA dropout on fused expert weights is not supported: PEFT drops the input of the adapter ' +
    'branch only (W·x + s·B·A·dropout(x)), but the fused path either folds the adapter into the ' +
    'expert weight (materialize: (W + s·B·A)·x) or reuses the gathered token rows for both products ' +
    '(split), so there is no separate adapter input to drop; PEFT itself refuses it on fused expert ' +
    "parameters (lora.ParamWrapper does not work with lora_dropout != 0)";

export const NON_EXPERT_DROPOUT_REASON =
    'LoRA dropout is not implemented for the router and shared-expert targets (their ops take no dropout)';

export const DEFAULT_LORA_TARGETS: readonly LoRATarget[] = ['experts.gate_up', 'experts.down'];

export const PLUGIN_ARG_SPECS: readonly ArgSpec[] = [
  {
    path: 'expertKernel', kind: 'enum', values: EXPERT_KERNELS, default: 'fused', flag: 'expert-kernel',
    description: "MoE block implementation of the patched layers: 'fused' (expert-sorted customGrad ops) or " +
        "'reference' (the plain per-expert loop)",
  },
  {
    path: 'loraMode', kind: 'enum', values: LORA_MODES, default: 'auto', flag: 'lora-mode',
    description: "how expert LoRA is applied: 'materialize' (W + s·B·A, then grouped products), 'split' " +
        "(x·Wᵀ + s·(x·Aᵀ)·Bᵀ) or 'auto' (picked by cost)",
  },
  {
    path: 'strict', kind: 'boolean', default: false, flag: 'strict',
    description: "fail instead of falling back to the composed 'reference' path when the active backend " +
        'is not one with the fused kernels (cpu, wasm, webgpu, webgl, tensorflow)',
  },
  {
    path: 'models', kind: 'models', default: [],
    description: 'tf.LayersModels or layers whose MoE layers are checked and get the LoRA adapter now ' +
        '(layers created later are patched too, but get no adapter)',
  },
  {
    path: 'lora', kind: 'object', default: null,
    description: 'the LoRA adapter to add to the MoE layers of `models`; absent or null: no LoRA ' +
        '(full fine-tuning or inference)',
  },
  {
    path: 'lora.r', kind: 'integer', min: 1, required: true, flag: 'lora-rank',
    description: 'LoRA rank (per expert on expert weights); at most min(in, out) of each targeted weight',
  },
  {
    path: 'lora.alpha', kind: 'number', above: 0, required: true, flag: 'lora-alpha',
    description: 'LoRA alpha: scaling s = alpha / r (alpha / √r with rsLoRA)',
  },
  {
    path: 'lora.dropout', kind: 'number', min: 0, below: 1, default: 0, flag: 'lora-dropout',
    description: 'LoRA dropout; must be 0: the fused expert path has no separate adapter input to drop ' +
        '(the error message says why in full)',
  },
  {
    path: 'lora.rsLoRA', kind: 'boolean', default: false, flag: 'lora-rslora',
    description: 'rank-stabilized LoRA: scaling alpha / √r instead of alpha / r',
  },
  {
    path: 'lora.targets', kind: 'targets', values: LORA_TARGETS, default: DEFAULT_LORA_TARGETS, flag: 'lora-targets',
    description: "the weights that get LoRA: 'experts.gate_up', 'experts.down' (fused expert weights), " +
        "'router', 'shared.gate', 'shared.up', 'shared.down' (shared-expert projections)",
  },
  {
    path: 'lora.adapterName', kind: 'name', default: 'default', flag: 'lora-adapter-name',
    description: "the adapter's name (letters, digits, '_', '-'); an existing adapter of that name is kept",
  },
];

/** The spec of a dotted path. */
export function argSpec(path: string): ArgSpec | undefined {
  return PLUGIN_ARG_SPECS.find(s => s.path === path);
}

/** The direct children of an object arg ('' for the top level), in table order. */
export function childSpecs(parent: string): ArgSpec[] {
  const depth = parent === '' ? 0 : parent.split('.').length;
  return PLUGIN_ARG_SPECS.filter(s => s.path.split('.').length === depth + 1 &&
      (parent === '' || s.path.startsWith(`${parent}.`)));
}

/** The last segment of a path: 'lora.r' → 'r'. */
export function keyOf(path: string): string {
  return path.slice(path.lastIndexOf('.') + 1);
}

/** PEFT / axolotl spellings a user may bring, for "did you mean". */
export const ARG_ALIASES: Readonly<Record<string, string>> = {
  rank: 'r', lora_r: 'r', lora_alpha: 'alpha', lora_dropout: 'dropout', use_rslora: 'rsLoRA',
  target_modules: 'targets', target_parameters: 'targets', adapter_name: 'adapterName',
  lora_target_modules: 'targets', kernel: 'expertKernel', mode: 'loraMode',
};
