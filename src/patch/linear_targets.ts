/**
 * LoRA targets as PEFT users write them: module names matched as PEFT matches `target_modules`
 * (an entry selects every module whose full name is the entry or ends with '.' + entry:
 * 'q_proj', 'self_attn.q_proj', 'model.layers.0.self_attn.q_proj'), 'all-linear', and
 * per-module ranks and alphas (`rank_pattern`, `alpha_pattern`, PEFT's regex-suffix keys).
 *
 * The modules: every RotaryAttention's q/k/v/o_proj and every SwiGLUMLP's gate/up/down_proj
 * (`<layer name>.<projection>`: 'model.layers.0.self_attn.q_proj', as in transformers), and the
 * shared-expert projections of SparseMoE layers ('model.layers.1.mlp.shared_expert.gate_proj',
 * the family's own names), which map to the layer's 'shared.gate' / 'shared.up' / 'shared.down'.
 *
 * 'all-linear' is PEFT's: every nn.Linear of the transformers model but the output head. In
 * transformers 5 the routers and the fused experts are parameters, not nn.Linear, so it means
 * the attention projections, the dense MLPs and the shared experts' projections here. (Qwen2-MoE's
 * 1-wide shared_expert_gate is an nn.Linear too, but has no LoRA target here: all-linear leaves it.)
 */
import * as tfl from '@tensorflow/tfjs-layers';
import type { PluginArgsProblem } from '../args/errors.js';
import { RotaryAttention } from '../layers/attention.js';
import { ATTENTION_PROJECTIONS, MLP_PROJECTIONS, type LinearLoRAModule } from '../layers/linear_lora.js';
import { hfConfigOf } from '../layers/moe_causal_lm.js';
import { LORA_TARGETS, SHARED_LORA_TARGETS, SparseMoE, type LoRATarget } from '../layers/sparse_moe.js';
import { SwiGLUMLP } from '../layers/swiglu_mlp.js';
import { FAMILIES, MODEL_TYPES, type ModelType } from '../models/families.js';

export const ALL_LINEAR = 'all-linear';
/** The projection names a module-name target may end with. */
export const LINEAR_MODULE_NAMES: readonly string[] = [...ATTENTION_PROJECTIONS, ...MLP_PROJECTIONS];

/**
 * Whether `entry` is a target spelling the schema accepts: an MoE target ('experts.gate_up'),
 * 'all-linear', or a module name ending in a projection name ('q_proj', 'self_attn.q_proj').
 */
export function isTargetSpelling(entry: string): boolean {
  if ((LORA_TARGETS as readonly string[]).includes(entry) || entry === ALL_LINEAR) return true;
  return /^[A-Za-z0-9_.]+$/.test(entry) && LINEAR_MODULE_NAMES.includes(entry.slice(entry.lastIndexOf('.') + 1));
}

/** PEFT's target_modules rule for a list: the name is the entry or ends with '.' + entry. */
export const moduleMatches = (name: string, entry: string): boolean => name === entry || name.endsWith(`.${entry}`);

/**
 * The key of a rank_pattern / alpha_pattern that applies to a module, as PEFT 0.21's
 * get_pattern_key: the first key (in the object's order) with `^(.*\.)?(key)$` matching the full
 * module name, or undefined.
 *
 * ```js
 * patternKey(['layers.0.self_attn.q_proj', 'o_proj'], 'model.layers.0.self_attn.q_proj');  // 'layers.0.self_attn.q_proj'
 * ```
 */
export function patternKey(keys: readonly string[], moduleName: string): string | undefined {
  return keys.find(key => new RegExp(`^(.*\\.)?(${key})$`).test(moduleName));
}

/** The relative module names of a SparseMoE's shared-expert projections in a model of this type. */
export function sharedExpertModules(modelType: unknown): Record<'shared.gate' | 'shared.up' | 'shared.down', string> {
  const shared = typeof modelType === 'string' && (MODEL_TYPES as readonly string[]).includes(modelType) ?
    FAMILIES[modelType as ModelType].checkpoint.shared : undefined;
  const s = shared ?? { gate: 'shared_expert.gate_proj.weight', up: 'shared_expert.up_proj.weight', down: 'shared_expert.down_proj.weight' };
  const strip = (name: string) => name.replace(/\.weight$/, '');
  return { 'shared.gate': strip(s.gate), 'shared.up': strip(s.up), 'shared.down': strip(s.down) };
}

/** One module a target name can select. */
export type LoRAModule =
  | { name: string; kind: 'linear'; layer: RotaryAttention | SwiGLUMLP; projection: string }
  | { name: string; kind: 'shared'; layer: SparseMoE; target: LoRATarget };

/** Every module of the models a target name can select, in model order. */
export function loraModules(models: readonly (tfl.LayersModel | tfl.layers.Layer)[]): LoRAModule[] {
  const out: LoRAModule[] = [];
  for (const model of models) {
    const layers = model instanceof tfl.LayersModel ? model.layers : [model];
    const shared = sharedExpertModules(model instanceof tfl.LayersModel ? hfConfigOf(model)?.['model_type'] : undefined);
    for (const layer of layers) {
      if (layer instanceof RotaryAttention || layer instanceof SwiGLUMLP) {
        const projections = layer instanceof RotaryAttention ? ATTENTION_PROJECTIONS : MLP_PROJECTIONS;
        for (const projection of projections) out.push({ name: `${layer.name}.${projection}`, kind: 'linear', layer, projection });
      } else if (layer instanceof SparseMoE && layer.sharedExpert != null) {
        for (const target of SHARED_LORA_TARGETS) {
          out.push({ name: `${layer.name}.${shared[target as keyof typeof shared]}`, kind: 'shared', layer, target });
        }
      }
    }
  }
  return out;
}

export interface LinearLoRAPlan {
  /** the linear layers to adapt and their projections' r and alpha */
  linear: Array<{ layer: RotaryAttention | SwiGLUMLP; modules: Record<string, LinearLoRAModule> }>;
  /** shared-expert targets selected by module name (or all-linear) per SparseMoE layer */
  shared: Map<SparseMoE, LoRATarget[]>;
  problems: PluginArgsProblem[];
}

/**
 * Which modules of `models` the targets select (module names, 'all-linear'; MoE targets such as
 * 'experts.gate_up' are the MoE layers' business and skipped here), with each linear module's r
 * and alpha after the patterns. A name that selects nothing, or a pattern key that matches no
 * selected linear module, is a problem (PEFT raises for the first and ignores the second, which
 * hides typos).
 */
export function planLinearLoRA(models: readonly (tfl.LayersModel | tfl.layers.Layer)[], lora: {
  r: number; alpha: number; targets: readonly string[]; rankPattern?: Record<string, number>; alphaPattern?: Record<string, number>;
}): LinearLoRAPlan {
  const modules = loraModules(models);
  const problems: PluginArgsProblem[] = [];
  const selected = new Set<LoRAModule>();
  lora.targets.forEach((entry, i) => {
    if ((LORA_TARGETS as readonly string[]).includes(entry)) return;
    const hits = entry === ALL_LINEAR ? modules : modules.filter(m => moduleMatches(m.name, entry));
    if (hits.length === 0 && entry !== ALL_LINEAR) {
      const example = modules.slice(0, 3).map(m => `'${m.name}'`).join(', ');
      problems.push({ arg: 'lora.targets', message: `lora.targets[${i}]: expected a module name of the models (PEFT's rule: ` +
          `a full name or its end after a '.') but '${entry}' matches none; modules: ${example || 'none'}${modules.length > 3 ? ', ...' : ''}` });
    }
    hits.forEach(m => selected.add(m));
  });
  const linear = new Map<RotaryAttention | SwiGLUMLP, Record<string, LinearLoRAModule>>();
  const shared = new Map<SparseMoE, LoRATarget[]>();
  const rankKeys = Object.keys(lora.rankPattern ?? {});
  const alphaKeys = Object.keys(lora.alphaPattern ?? {});
  const used = new Set<string>();
  for (const m of modules.filter(mod => selected.has(mod))) {
    if (m.kind === 'shared') {
      shared.set(m.layer, [...(shared.get(m.layer) ?? []), m.target]);
      continue;
    }
    const rk = patternKey(rankKeys, m.name);
    const ak = patternKey(alphaKeys, m.name);
    if (rk !== undefined) used.add(`r:${rk}`);
    if (ak !== undefined) used.add(`a:${ak}`);
    const entry = linear.get(m.layer) ?? {};
    entry[m.projection] = {
      r: rk === undefined ? lora.r : lora.rankPattern![rk],
      alpha: ak === undefined ? lora.alpha : lora.alphaPattern![ak],
    };
    linear.set(m.layer, entry);
  }
  for (const [keys, tag, arg] of [[rankKeys, 'r', 'lora.rankPattern'], [alphaKeys, 'a', 'lora.alphaPattern']] as const) {
    for (const key of keys) {
      if (used.has(`${tag}:${key}`)) continue;
      problems.push({ arg, message: `${arg}: expected each key to match a targeted attention or dense-MLP projection ` +
          `(PEFT's rule: the module name ends with the key after a '.') but '${key}' matches none` });
    }
  }
  return { linear: [...linear].map(([layer, m]) => ({ layer, modules: m })), shared, problems };
}
