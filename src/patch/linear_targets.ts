/**
 * LoRA targets as PEFT users write them: module names matched as PEFT matches `target_modules`
 * (an entry selects every module whose full name is the entry or ends with '.' + entry:
 * 'q_proj', 'self_attn.q_proj', 'model.layers.0.self_attn.q_proj'), 'all-linear', and
 * per-module ranks and alphas (`rank_pattern`, `alpha_pattern`, PEFT's regex-suffix keys).
 *
 * The modules: every RotaryAttention's q/k/v/o_proj and every SwiGLUMLP's gate/up/down_proj
 * (`<layer name>.<projection>`: 'model.layers.0.self_attn.q_proj', as in transformers), and the
 * shared-expert projections of SparseMoE layers ('model.layers.1.mlp.shared_expert.gate_proj',
 * the family's own names), which map to the layer's 'shared.gate' / 'shared.up' / 'shared.down'
 * (and Qwen2-MoE's 'shared_expert_gate' to 'shared.sigmoid_gate').
 *
 * 'all-linear' is PEFT 0.21's set, which depends on the family (`peftConversion` in
 * families.ts): PEFT rewrites the config of a model whose transformers-v5 experts are fused
 * (transformers' _MODEL_TO_CONVERSION_PATTERN; peft/utils/transformers_weight_conversion.py):
 * its MLP names (gate_proj/up_proj/down_proj/gate; Mixtral w1/w3/w2/gate) become the
 * target_parameters gate_up_proj, down_proj and gate.weight, with gate_up at rank 2r and alpha 2α
 * (rank_pattern / alpha_pattern key '.*\\.gate_up_proj'). So there all-linear is the attention
 * projections + experts.gate_up (2r, 2α) + experts.down + router, and no dense MLP or shared expert
 * (their names were converted away). Elsewhere (Qwen2-MoE, gpt-oss) it is every nn.Linear but the
 * output head: attention, dense MLPs, shared-expert projections and the shared_expert_gate.
 *
 * Rank and alpha patterns apply to MoE targets too, under PEFT's names: '<block>.experts.gate_up_proj',
 * '<block>.experts.down_proj', '<block>.gate.weight' (a parameter target is named '<module>.<param>')
 * and the shared-expert module names.
 */
import * as tfl from '@tensorflow/tfjs-layers';
import type { PluginArgsProblem } from '../args/errors.js';
import { RotaryAttention } from '../layers/attention.js';
import { GatedDeltaNet } from '../layers/gated_delta_net.js';
import { MLAAttention } from '../layers/mla_attention.js';
import { ATTENTION_PROJECTIONS, MLP_PROJECTIONS, type LinearLoRAModule } from '../layers/linear_lora.js';
import { hfConfigOf } from '../layers/moe_causal_lm.js';
import { LORA_TARGETS, SHARED_LORA_TARGETS, SparseMoE, type LoRATarget } from '../layers/sparse_moe.js';
import { SwiGLUMLP } from '../layers/swiglu_mlp.js';
import { FAMILIES, MODEL_TYPES, type MoEFamily, type ModelType } from '../models/families.js';

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

/** The family of a model type, or undefined for a type that is not one of ours. */
function familyOf(modelType: unknown): MoEFamily | undefined {
  return typeof modelType === 'string' && (MODEL_TYPES as readonly string[]).includes(modelType) ?
    FAMILIES[modelType as ModelType] : undefined;
}

/** The relative module names of a SparseMoE's shared-expert projections in a model of this type. */
export function sharedExpertModules(modelType: unknown):
    Record<'shared.gate' | 'shared.up' | 'shared.down' | 'shared.sigmoid_gate', string> {
  const s = familyOf(modelType)?.checkpoint.shared ?? { gate: 'shared_expert.gate_proj.weight',
    up: 'shared_expert.up_proj.weight', down: 'shared_expert.down_proj.weight' };
  const strip = (name: string) => name.replace(/\.weight$/, '');
  return { 'shared.gate': strip(s.gate), 'shared.up': strip(s.up), 'shared.down': strip(s.down),
    'shared.sigmoid_gate': strip(s.sigmoidGate ?? 'shared_expert_gate.weight') };
}

/**
 * PEFT's names of the MoE targets of a block in a model of this type, relative to the block: the
 * parameter named in target_parameters (experts, router) or the module named in target_modules
 * (shared expert).
 *
 * ```js
 * moeTargetPeftNames('mixtral').parameter['experts.gate_up'];  // 'experts.gate_up_proj'
 * ```
 */
export function moeTargetPeftNames(modelType: unknown): {
  parameter: Partial<Record<LoRATarget, string>>; module: Partial<Record<LoRATarget, string>>;
} {
  const router = familyOf(modelType)?.checkpoint.router.weight ?? 'gate.weight';
  return {
    parameter: { 'experts.gate_up': 'experts.gate_up_proj', 'experts.down': 'experts.down_proj', router },
    module: sharedExpertModules(modelType),
  };
}

/**
 * The name PEFT gives an MoE target of a block when it applies rank_pattern / alpha_pattern: the
 * module name for a module target, '<module>.<parameter>' for a parameter target
 * ('model.layers.0.mlp.experts.gate_up_proj', 'model.layers.0.mlp.gate.weight').
 */
export function moeTargetPatternName(modelType: unknown, blockName: string, target: LoRATarget): string {
  const names = moeTargetPeftNames(modelType);
  return `${blockName}.${names.parameter[target] ?? names.module[target]}`;
}

/** How PEFT 0.21 rewrites a LoRA config of this model type (see the file comment); null: it does not. */
export function peftConversionOf(modelType: unknown): NonNullable<MoEFamily['peftConversion']> | null {
  return familyOf(modelType)?.peftConversion ?? null;
}

/** The rank_pattern / alpha_pattern key PEFT's conversion adds for the fused gate_up ('.*\\.gate_up_proj'). */
export const FUSED_GATE_UP_KEY = '.*\\.gate_up_proj';

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
          if (target === 'shared.sigmoid_gate' && !layer.sharedExpert.gated) continue;
          out.push({ name: `${layer.name}.${shared[target as keyof typeof shared]}`, kind: 'shared', layer, target });
        }
      }
    }
  }
  return out;
}

/** One SparseMoE layer's part of a plan: its targets and the ones with a rank or alpha of their own. */
export interface MoELoRAPlan {
  /** every target of the layer: named ('experts.gate_up'), selected by module name, or by all-linear */
  targets: LoRATarget[];
  ranks: Partial<Record<LoRATarget, number>>;
  alphas: Partial<Record<LoRATarget, number>>;
}

export interface LinearLoRAPlan {
  /** the linear layers to adapt and their projections' r and alpha */
  linear: Array<{ layer: RotaryAttention | SwiGLUMLP; modules: Record<string, LinearLoRAModule> }>;
  /** the SparseMoE layers to adapt */
  moe: Map<SparseMoE, MoELoRAPlan>;
  problems: PluginArgsProblem[];
}

/** The SparseMoE layers of the models with their model type (undefined for a bare layer). */
function moeLayersOf(models: readonly (tfl.LayersModel | tfl.layers.Layer)[]): Array<{ layer: SparseMoE; modelType: unknown }> {
  return models.flatMap(model => {
    const modelType = model instanceof tfl.LayersModel ? hfConfigOf(model)?.['model_type'] : undefined;
    const layers = model instanceof tfl.LayersModel ? model.layers : [model];
    return layers.filter((l): l is SparseMoE => l instanceof SparseMoE).map(layer => ({ layer, modelType }));
  });
}

/**
 * Which modules of `models` the targets select (module names, 'all-linear'; MoE targets such as
 * 'experts.gate_up' name a SparseMoE target directly), with each module's and MoE target's r and
 * alpha after the patterns. A name that selects nothing, a pattern key that matches no selected
 * module or MoE target, and 'all-linear' on a model with layers that have no LoRA here (MLA, GatedDeltaNet) are
 * problems (PEFT raises for the first and ignores the second, which hides typos).
 */
export function planLinearLoRA(models: readonly (tfl.LayersModel | tfl.layers.Layer)[], lora: {
  r: number; alpha: number; targets: readonly string[]; rankPattern?: Record<string, number>; alphaPattern?: Record<string, number>;
}): LinearLoRAPlan {
  const modules = loraModules(models);
  const problems: PluginArgsProblem[] = [];
  const selected = new Set<LoRAModule>();
  const allLinear = lora.targets.includes(ALL_LINEAR);
  const rankPattern = { ...lora.rankPattern ?? {} };
  const alphaPattern = { ...lora.alphaPattern ?? {} };
  // PEFT converts the models whose experts transformers 5 fused: all-linear means their experts
  // and routers, gate_up at 2r / 2α (its key goes last, as PEFT adds it to the config's dicts)
  const converting = models.filter(m => m instanceof tfl.LayersModel && peftConversionOf(hfConfigOf(m)?.['model_type']) !== null);
  // there the dense-MLP and shared-expert names were converted into the experts' (so not all-linear's)
  const convertedAway = (m: LoRAModule) => (m.kind === 'shared' || m.layer instanceof SwiGLUMLP) &&
      converting.some(model => (model as tfl.LayersModel).layers.includes(m.layer));
  if (allLinear && converting.length > 0) {
    rankPattern[FUSED_GATE_UP_KEY] = 2 * lora.r;
    alphaPattern[FUSED_GATE_UP_KEY] = 2 * lora.alpha;
  }
  if (allLinear) {
    for (const model of models) {
      const layers = model instanceof tfl.LayersModel ? model.layers : [model];
      const mla = layers.find(l => l instanceof MLAAttention);
      if (mla !== undefined) {
        problems.push({ arg: 'lora.targets', message: `lora.targets: 'all-linear' on '${model.name}' (PEFT 0.21: every ` +
            `attention projection, MLA's q_proj / q_a_proj / q_b_proj / kv_a_proj_with_mqa / kv_b_proj / o_proj included) needs ` +
            `LoRA on MLA attention ('${mla.name}'), which this package does not have yet; name the targets instead ` +
            `(experts.gate_up, experts.down, router, shared.*)` });
      }
      // PEFT adapts the DeltaNet's in_proj_* and out_proj too (nn.Linear); leaving them out would differ silently
      const deltaNet = layers.find(l => l instanceof GatedDeltaNet);
      if (deltaNet !== undefined) {
        problems.push({ arg: 'lora.targets', message: `lora.targets: 'all-linear' on '${model.name}' (PEFT 0.21: every ` +
            `nn.Linear, the gated DeltaNet's in_proj_* / out_proj included) needs LoRA on GatedDeltaNet ('${deltaNet.name}'), ` +
            `which this package does not have yet; name the targets instead (q_proj, k_proj, v_proj, o_proj, experts.gate_up, ` +
            `experts.down, router, shared.*)` });
      }
    }
  }
  lora.targets.forEach((entry, i) => {
    if ((LORA_TARGETS as readonly string[]).includes(entry)) return;
    const hits = entry === ALL_LINEAR ? modules.filter(m => !convertedAway(m)) : modules.filter(m => moduleMatches(m.name, entry));
    if (hits.length === 0 && entry !== ALL_LINEAR) {
      const example = modules.slice(0, 3).map(m => `'${m.name}'`).join(', ');
      problems.push({ arg: 'lora.targets', message: `lora.targets[${i}]: expected a module name of the models (PEFT's rule: ` +
          `a full name or its end after a '.') but '${entry}' matches none; modules: ${example || 'none'}${modules.length > 3 ? ', ...' : ''}` });
    }
    hits.forEach(m => selected.add(m));
  });
  const linear = new Map<RotaryAttention | SwiGLUMLP, Record<string, LinearLoRAModule>>();
  const moe = new Map<SparseMoE, MoELoRAPlan>();
  const rankKeys = Object.keys(rankPattern);
  const alphaKeys = Object.keys(alphaPattern);
  const used = new Set<string>();
  const settings = (name: string) => {
    const rk = patternKey(rankKeys, name);
    const ak = patternKey(alphaKeys, name);
    if (rk !== undefined) used.add(`r:${rk}`);
    if (ak !== undefined) used.add(`a:${ak}`);
    return { r: rk === undefined ? lora.r : rankPattern[rk], alpha: ak === undefined ? lora.alpha : alphaPattern[ak] };
  };
  const moeTargets = new Map<SparseMoE, Set<LoRATarget>>();
  for (const { layer, modelType } of moeLayersOf(models)) {
    const named = LORA_TARGETS.filter(t => lora.targets.includes(t));
    const converted: LoRATarget[] = allLinear && peftConversionOf(modelType) !== null ? ['experts.gate_up', 'experts.down', 'router'] : [];
    moeTargets.set(layer, new Set([...named, ...converted]));
  }
  for (const m of modules.filter(mod => selected.has(mod))) {
    if (m.kind === 'shared') {
      moeTargets.get(m.layer)?.add(m.target);
      continue;
    }
    const entry = linear.get(m.layer) ?? {};
    entry[m.projection] = settings(m.name);
    linear.set(m.layer, entry);
  }
  for (const { layer, modelType } of moeLayersOf(models)) {
    const targets = LORA_TARGETS.filter(t => moeTargets.get(layer)!.has(t));
    if (targets.length === 0) continue;
    const plan: MoELoRAPlan = { targets, ranks: {}, alphas: {} };
    for (const t of targets) {
      const { r, alpha } = settings(moeTargetPatternName(modelType, layer.name, t));
      if (r !== lora.r) plan.ranks[t] = r;
      if (alpha !== lora.alpha) plan.alphas[t] = alpha;
    }
    moe.set(layer, plan);
  }
  for (const [keys, tag, arg] of [[Object.keys(lora.rankPattern ?? {}), 'r', 'lora.rankPattern'],
    [Object.keys(lora.alphaPattern ?? {}), 'a', 'lora.alphaPattern']] as const) {
    for (const key of keys) {
      if (used.has(`${tag}:${key}`)) continue;
      problems.push({ arg, message: `${arg}: expected each key to match a targeted module or MoE parameter ` +
          `(PEFT's rule: the name, e.g. 'model.layers.0.self_attn.q_proj' or 'model.layers.0.mlp.experts.gate_up_proj', ` +
          `ends with the key after a '.') but '${key}' matches none` });
    }
  }
  return { linear: [...linear].map(([layer, m]) => ({ layer, modules: m })), moe, problems };
}
