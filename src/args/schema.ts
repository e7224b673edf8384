/**
 * The plugin's arguments as data: one table says each arg's name, type, default, range and
 * description. `register()` validates against it (src/args/validate.ts) and the CLI builds its
 * flags from it (src/cli/plugin_options.ts), so both accept the same things with the same messages.
 */
import type * as tfl from '@tensorflow/tfjs-layers';
import { LORA_TARGETS, type LoRATarget } from '../layers/sparse_moe.js';
import { ALL_LINEAR, LINEAR_MODULE_NAMES } from '../patch/linear_targets.js';
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
  /**
   * PEFT's lora_dropout on the branch input of every target, in training passes only (routed
   * experts: one mask per (token, expert) pair, split LoRA only); default 0
   */
  dropout?: number;
  /** default false */
  rsLoRA?: boolean;
  /**
   * default ['experts.gate_up', 'experts.down']; MoE targets, module names as PEFT's target_modules
   * ('q_proj', 'self_attn.o_proj', 'mlp.down_proj', 'shared_expert.gate_proj') or 'all-linear'
   */
  targets?: string[];
  /** PEFT's rank_pattern: module-name key (regex, matched at the end of the name) → r */
  rankPattern?: Record<string, number>;
  /** PEFT's alpha_pattern: module-name key → alpha */
  alphaPattern?: Record<string, number>;
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
  targets: string[];
  rankPattern: Record<string, number>;
  alphaPattern: Record<string, number>;
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

export type ArgKind = 'enum' | 'boolean' | 'integer' | 'number' | 'name' | 'targets' | 'pattern' | 'models' | 'object';

export interface ArgSpec {
  /** dotted path in PluginArgs: 'expertKernel', 'lora.r' */
  path: string;
  kind: ArgKind;
  /** the allowed values ('enum'), or the list items suggested for 'targets' */
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

/** Why expert LoRA dropout needs the split form (used in the message of the loraMode rule). */
export const EXPERT_DROPOUT_NEEDS_SPLIT =
    "PEFT drops the adapter branch's input only (W·x + s·B·A·dropout(x)); loraMode 'materialize' folds " +
    "the adapter into W_eff, which has no separate branch input: use loraMode 'split' or 'auto' (auto " +
    'picks split when dropout is on)';

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
    description: "LoRA dropout (PEFT's lora_dropout) on the branch input, in training passes only, on every " +
        "target; routed experts drop each (token, expert) pair's input independently, in split LoRA " +
        "(loraMode 'auto' picks split; 'materialize' is refused)",
  },
  {
    path: 'lora.rsLoRA', kind: 'boolean', default: false, flag: 'lora-rslora',
    description: 'rank-stabilized LoRA: scaling alpha / √r instead of alpha / r',
  },
  {
    path: 'lora.targets', kind: 'targets', values: [...LORA_TARGETS, ALL_LINEAR, ...LINEAR_MODULE_NAMES],
    default: DEFAULT_LORA_TARGETS, flag: 'lora-targets',
    description: "the weights that get LoRA: 'experts.gate_up', 'experts.down' (fused expert weights), " +
        "'router', 'shared.gate', 'shared.up', 'shared.down' (shared-expert projections), 'shared.sigmoid_gate' " +
        "(Qwen2-MoE's shared_expert_gate); module names as PEFT's target_modules matches them ('q_proj', " +
        "'self_attn.q_proj', 'mlp.down_proj', 'shared_expert.up_proj': a full name or its end after a '.'); " +
        "'all-linear' (PEFT 0.21's, per family: where PEFT converts fused experts (Mixtral, Qwen3-MoE, OLMoE, GLM-4.5, " +
        'DeepSeek) the attention projections, experts (gate_up at 2r, 2·alpha) and router; elsewhere every attention, ' +
        'dense-MLP and shared-expert projection and the shared_expert_gate; never the output head)',
  },
  {
    path: 'lora.rankPattern', kind: 'pattern', min: 1, default: {},
    description: "PEFT's rank_pattern: {key: r}; a module or MoE parameter whose full name matches ^(.*\\.)?(key)$ " +
        "(first key wins) gets rank r: attention / dense-MLP / shared-expert modules by name, the MoE targets by PEFT's " +
        "'<block>.experts.gate_up_proj', '<block>.experts.down_proj', '<block>.gate.weight'",
  },
  {
    path: 'lora.alphaPattern', kind: 'pattern', above: 0, default: {},
    description: "PEFT's alpha_pattern: {key: alpha}, matched like rankPattern",
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
  lora_target_modules: 'targets', rank_pattern: 'rankPattern', alpha_pattern: 'alphaPattern', kernel: 'expertKernel', mode: 'loraMode',
};
