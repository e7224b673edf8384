/**
 * PEFT LoRA adapters on MoE blocks, in PEFT's own files: adapter_config.json and
 * adapter_model.safetensors.
 *
 * - Fused expert weights and the router are 3-D / 2-D nn.Parameters, adapted through
 *   `target_parameters` (PEFT >= 0.17 ParamWrapper). PEFT nests one wrapper per targeted parameter
 *   of a module, in target_parameters order (the last outermost), so with both expert targets
 *   `<block>.experts.base_layer.lora_A/B.weight` belong to gate_up_proj and
 *   `<block>.experts.lora_A/B.weight` to down_proj; the router is `<block>.gate.lora_A/B.weight`
 *   (gpt-oss: `router`). Expert layouts (src/ops/README.md): A [r·E, in] expert-major rows,
 *   B [out, r·E] rank-major columns; router A [r, H], B [E, r].
 * - Shared-expert projections are nn.Linear modules, adapted through `target_modules`
 *   (`<block>.shared_expert.gate_proj.lora_A.weight`, DeepSeek/GLM `shared_experts`): A [r, in], B [out, r].
 *
 * Tensor names are `base_model.model.<module path>.…`; a SparseMoE layer's name is its module path
 * (MoECausalLM names them 'model.layers.N.mlp', as transformers 5 does for every family).
 * Loading assigns expert wrappers by their shapes, not by nesting depth (which depends on the
 * order of target_parameters); gate_up and down always differ in A's columns or B's rows.
 * Entries of target_parameters / target_modules match as PEFT matches them, as suffixes of full
 * names, so 'model.layers.1.mlp.gate.weight' targets one layer. (PEFT 0.21 ignores
 * layers_to_transform for target_parameters; it is honoured here on load and never written.)
 *
 * Versions (`peft_version`, read on load, written on save): PEFT before 0.19.1 read a 3-D expert
 * parameter [E, d1, d2] as [E, in, out] positionally (0.17, 0.18), or swapped it exactly when the
 * base layer was transposed (0.19.0), so for transformers 5's [E, out, in] weights (and 0.19.0 on
 * gpt-oss's [E, in, out]) their A is [r·E, out] and B [in, r·E]: ΔW_e = (B_e·A_e)ᵀ. 0.19.1 fixed
 * the swap; since then A is [r·E, in], B [out, r·E] (our layout). An older adapter is converted
 * exactly on load (A'_e = B_eᵀ, B'_e = A_eᵀ: the same numbers, other places). A pre-release of
 * 0.19.0 / 0.19.1 is ambiguous and refused; an unparsable version is refused; a version newer than
 * NEWEST_CHECKED_PEFT loads as 0.19.1's layout with a note; a missing one (this package's saves
 * before it wrote peft_version; PEFT writes it since 0.18) loads as our layout with a note.
 * PEFT knows gpt-oss's experts are [E, in, out]; Llama 4's, [E, in, out] too, it reads as
 * [E, out, in] (A [r·E, out], B [in, r·E] with ΔW_e = B_e·A_e in the stored layout): the old
 * layout, converted on load and written on save, whatever the version.
 * The architecture PEFT records (`auto_mapping.base_model_class` / `parent_library`, written when
 * task_type is null, as here) must be the model's.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import {
  decoderLayerIndex, freezeBaseLayers, hfConfigOf, sparseMoELayers,
} from '../layers/moe_causal_lm.js';
import {
  EXPERT_LORA_TARGETS, SHARED_LORA_TARGETS, SparseMoE, targetAlpha, targetRank, type LoRATarget,
} from '../layers/sparse_moe.js';
import { FAMILIES, MODEL_TYPES, type MoEFamily } from '../models/families.js';
import type { RotaryAttention } from '../layers/attention.js';
import type { LinearLoRAModule } from '../layers/linear_lora.js';
import type { SwiGLUMLP } from '../layers/swiglu_mlp.js';
import { loraModules, moduleMatches, moeTargetPeftNames, patternKey } from '../patch/linear_targets.js';
import { encodeSafetensors, parseSafetensors, type SafetensorsFile } from './safetensors_bytes.js';
import { MoELoraError } from '../errors.js';
import { describeValue } from '../util/describe.js';

/** An adapter that cannot be loaded into (or saved from) this model; the message lists every problem. */
export class PeftAdapterError extends MoELoraError {
  constructor(message: string) {
    super(message);
    this.name = 'PeftAdapterError';
    Object.setPrototypeOf(this, PeftAdapterError.prototype);
  }
}

export const ADAPTER_CONFIG = 'adapter_config.json';
export const ADAPTER_WEIGHTS = 'adapter_model.safetensors';

/** The files of a PEFT adapter folder (a save replaces them all, e.g. an old adapter_model.bin). */
export const isPeftAdapterFile = (name: string) => name === ADAPTER_CONFIG || name.startsWith('adapter_model.');

const PREFIX = 'base_model.model.';
/** Canonical target order (target_parameters and target_modules are written in this order). */
const TARGET_ORDER: readonly LoRATarget[] = [
  'experts.gate_up', 'experts.down', 'router', 'shared.gate', 'shared.up', 'shared.down', 'shared.sigmoid_gate',
];

function peftError(op: string, where: string, problems: string[]): PeftAdapterError {
  return new PeftAdapterError(`\`${op}()\`: ${where}: ${problems.length} problem${problems.length > 1 ? 's' : ''}:\n  ` +
      problems.join('\n  '));
}

/**
 * PEFT's names of each target on a block of this model: the parameter named in
 * target_parameters (experts, router) or the module named in target_modules (shared expert).
 */
interface PeftNames {
  routerParam: string;
  routerModule: string;
  parameter: Partial<Record<LoRATarget, string>>;
  module: Partial<Record<LoRATarget, string>>;
}

function peftNames(model: tfl.LayersModel): PeftNames {
  const { parameter, module } = moeTargetPeftNames(hfConfigOf(model)?.['model_type']);
  return { routerParam: parameter.router!, routerModule: parameter.router!.replace(/\.weight$/, ''), parameter, module };
}

/** The PEFT version whose files savePeftAdapter writes (the fixtures were made with it). */
export const PEFT_VERSION_WRITTEN = '0.21.0';
/** The newest PEFT version whose expert LoRA layout was checked against this package. */
const NEWEST_CHECKED_PEFT: readonly number[] = [0, 21];

/**
 * HF's class and module of a model type, as PEFT records them in auto_mapping: transformers names
 * them after the model type ('qwen3_moe' → Qwen3MoeForCausalLM in transformers.models.qwen3_moe.modeling_qwen3_moe).
 */
function hfArchitecture(type: string): { base_model_class: string; parent_library: string } {
  const family = (FAMILIES as Partial<Record<string, MoEFamily>>)[type];
  const pascal = type.split('_').map(w => w.charAt(0).toUpperCase() + w.slice(1)).join('');
  // llama4_text lives in models/llama4, qwen3_5_moe_text in models/qwen3_5_moe (the family rows say so)
  const module = family?.transformersModule ?? type;
  return {
    base_model_class: family?.causalLMClass ?? `${pascal}ForCausalLM`,
    parent_library: `transformers.models.${module}.modeling_${module}`,
  };
}

/** The model type an adapter's auto_mapping names, or null when it names none we can read. */
function adapterModelType(autoMapping: unknown): string | null {
  if (autoMapping === null || typeof autoMapping !== 'object') return null;
  const { parent_library: library, base_model_class: cls } = autoMapping as Json;
  const fromLibrary = typeof library === 'string' ? /^transformers\.models\.([a-z0-9_]+)\.modeling_/.exec(library)?.[1] : undefined;
  if (fromLibrary !== undefined) {
    return MODEL_TYPES.find(t => hfArchitecture(t).parent_library === library && hfArchitecture(t).base_model_class === cls) ?? fromLibrary;
  }
  if (typeof cls !== 'string') return null;
  const known = MODEL_TYPES.find(t => hfArchitecture(t).base_model_class.replace(/ForCausalLM$/, '') === cls.replace(/For[A-Za-z]+$/, ''));
  return known ?? cls;
}

/**
 * How the expert factors of an adapter written by PEFT `version` are laid out: 'ours' (PEFT >=
 * 0.19.1) or 'swapped' (A [r·E, out], B [in, r·E]); see the file comment. Problems and notes
 * are pushed.
 */
export function expertFactorLayout(version: unknown, transposed: boolean, problems: string[], notes: string[],
    peftTransposed = transposed): 'ours' | 'swapped' {
  if (version == null) {
    notes.push('adapter_config.json has no peft_version: the expert factors are read in the layout of PEFT >= 0.19.1 ' +
        '(this package\'s earlier saves); an adapter from PEFT 0.17 needs peft_version set to convert it');
    return 'ours';
  }
  const m = typeof version === 'string' ? /^(\d+)\.(\d+)\.(\d+)(.*)$/.exec(version) : null;
  if (m === null || !/^(|(\.?(dev|rc|a|b)\d*)?(\+[\w.]+)?(@\w+)?)$/.test(m[4])) {
    problems.push(`peft_version must be a PEFT version such as '0.21.0' but is ${JSON.stringify(version)}`);
    return 'ours';
  }
  const v = [Number(m[1]), Number(m[2]), Number(m[3])];
  const pre = /^\.?(dev|rc|a|b)/.test(m[4]);
  const cmp = (w: number[]) => v[0] - w[0] || v[1] - w[1] || v[2] - w[2];
  if (pre && v[0] === 0 && v[1] === 19 && v[2] <= 1) {
    problems.push(`peft_version ${version} is a pre-release between two expert LoRA layouts (PEFT changed it in ` +
        `0.19.0 and 0.19.1); save the adapter again with a released PEFT`);
    return 'ours';
  }
  if (v[0] > NEWEST_CHECKED_PEFT[0] || (v[0] === NEWEST_CHECKED_PEFT[0] && v[1] > NEWEST_CHECKED_PEFT[1])) {
    notes.push(`peft_version ${version} is newer than the newest PEFT checked here (${NEWEST_CHECKED_PEFT.join('.')}); ` +
        'its expert factors are read in the layout of PEFT >= 0.19.1');
  }
  // `peftTransposed`: whether PEFT itself takes the weights for [E, in, out] (gpt-oss, not Llama 4)
  if (cmp([0, 19, 1]) >= 0) return transposed === peftTransposed ? 'ours' : 'swapped';
  if (cmp([0, 19, 0]) === 0) return transposed === !peftTransposed ? 'ours' : 'swapped';  // 0.19.0 swapped exactly the weights it took for [E, in, out]
  return transposed ? 'ours' : 'swapped';         // 0.17/0.18 never swapped: right for [E, in, out] only
}

/**
 * Factors of an expert target in PEFT's pre-0.19.1 layout (A [r·E, out], B [in, r·E]) in ours:
 * A'_e = B_eᵀ, B'_e = A_eᵀ. The same index maps turn ours into the old one.
 */
export function swapExpertFactors(A: tf.Tensor2D, B: tf.Tensor2D, numExperts: number): { A: tf.Tensor2D; B: tf.Tensor2D } {
  return tf.tidy(() => {
    const e = numExperts;
    const r = A.shape[0] / e;
    const [inDim] = B.shape;
    const outDim = A.shape[1];
    const a = tf.reshape(tf.transpose(tf.reshape(B, [inDim, r, e]), [2, 1, 0]), [e * r, inDim]);   // [r·E, in]
    const b = tf.reshape(tf.transpose(tf.reshape(A, [e, r, outDim]), [2, 1, 0]), [outDim, r * e]);  // [out, r·E]
    return { A: a as tf.Tensor2D, B: b as tf.Tensor2D };
  });
}

/**
 * Whether PEFT takes a layer's expert weights for [E, in, out]: gpt-oss's (interleaved), which it
 * knows; Llama 4's 'inOut' ones it reads as [E, out, in] like every other family's.
 */
function peftTakesTransposed(layer: SparseMoE): boolean {
  return layer.expertLayout === 'inOutInterleaved';
}

/** The names of the tensors among `names` that hold a NaN or an infinity, reading one tensor at a time. */
async function nonFiniteTensors(file: SafetensorsFile, names: readonly string[]): Promise<string[]> {
  const bad: string[] = [];
  for (const name of names) {
    const t = await file.tensor(name);
    try {
      const values = await t.data();
      let count = 0;
      for (let k = 0; k < values.length; k++) if (!Number.isFinite(values[k])) count++;
      if (count > 0) bad.push(`'${name}' holds ${count} non-finite value${count > 1 ? 's' : ''} (NaN or ±Infinity)`);
    } finally {
      t.dispose();
    }
  }
  return bad;
}

const isExpert = (t: LoRATarget) => EXPERT_LORA_TARGETS.includes(t);
const isShared = (t: LoRATarget) => SHARED_LORA_TARGETS.includes(t);

/** Sizes a target's A and B must have for rank r on this layer. */
function expectedShapes(layer: SparseMoE, target: LoRATarget, r: number): { A: number[]; B: number[] } {
  const h = layer.weightVariable('router_weight').shape[1] as number;
  const e = layer.numExperts;
  const i = layer.intermediateSize;
  const is = layer.sharedExpert?.intermediateSize ?? 0;
  switch (target) {
    case 'router': return { A: [r, h], B: [e, r] };
    case 'experts.gate_up': return { A: [r * e, h], B: [2 * i, r * e] };
    case 'experts.down': return { A: [r * e, i], B: [h, r * e] };
    case 'shared.gate': case 'shared.up': return { A: [r, h], B: [is, r] };
    case 'shared.down': return { A: [r, is], B: [h, r] };
    case 'shared.sigmoid_gate': return { A: [r, h], B: [1, r] };
  }
}

const same = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((d, k) => d === b[k]);

/** The module path (relative to the block) of each target, for an adapter with these targets. */
function targetModules(targets: readonly LoRATarget[], names: PeftNames): Map<LoRATarget, string> {
  const out = new Map<LoRATarget, string>();
  const experts = TARGET_ORDER.filter(t => isExpert(t) && targets.includes(t));
  experts.forEach((t, k) => out.set(t, ['experts', ...Array<string>(experts.length - 1 - k).fill('base_layer')].join('.')));
  if (targets.includes('router')) out.set('router', names.routerModule);
  for (const t of SHARED_LORA_TARGETS) if (targets.includes(t)) out.set(t, names.module[t]!);
  return out;
}

export interface PeftTensor {
  /** the name in adapter_model.safetensors */
  peftName: string;
  layer: SparseMoE;
  target: LoRATarget;
  factor: 'A' | 'B';
  variable: tfl.LayerVariable;
}

/**
 * The adapter's tensors under their PEFT file names, for every SparseMoE layer that has it.
 * (PEFT's in-memory parameter names add the adapter name: `….lora_A.<name>.weight`.)
 *
 * ```js
 * peftAdapterTensors(model, 'default')[0].peftName;
 * // 'base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight'
 * ```
 */
export function peftAdapterTensors(model: tfl.LayersModel, name = 'default'): PeftTensor[] {
  const names = peftNames(model);
  const out: PeftTensor[] = [];
  for (const layer of sparseMoELayers(model)) {
    if (!layer.adapterNames().includes(name)) continue;
    const state = layer.adapter(name);
    const modules = targetModules(state.config.targets, names);
    for (const target of TARGET_ORDER) {
      const f = state.factors[target];
      if (f === undefined) continue;
      for (const factor of ['A', 'B'] as const) {
        out.push({
          peftName: `${PREFIX}${layer.name}.${modules.get(target)}.lora_${factor}.weight`,
          layer, target, factor, variable: f[factor],
        });
      }
    }
  }
  return out;
}

/** A linear layer (attention, dense MLP) whose projections can hold a LoRA adapter. */
type LinearLayer = RotaryAttention | SwiGLUMLP;

/** The model's attention and dense-MLP layers, in model order. */
function linearLayers(model: tfl.LayersModel): LinearLayer[] {
  return [...new Set(loraModules([model]).flatMap(m => m.kind === 'linear' ? [m.layer] : []))];
}

/** The PEFT file names of a linear adapter's factors: `base_model.model.<layer>.<projection>.lora_{A,B}.weight`. */
function linearTensorName(layer: LinearLayer, projection: string, factor: 'A' | 'B'): string {
  return `${PREFIX}${layer.name}.${projection}.lora_${factor}.weight`;
}

export interface PeftAdapterOptions {
  /** the adapter's name on the layers; default 'default' (PEFT's) */
  name?: string;
}

export interface LoadedPeftAdapter {
  name: string;
  r: number;
  alpha: number;
  rsLoRA: boolean;
  targets: LoRATarget[];
  /** the SparseMoE layers that got the adapter */
  layers: string[];
  /** the attention and dense-MLP projections that got it ('model.layers.0.self_attn.q_proj') */
  modules: string[];
  /** things loaded but worth knowing (e.g. a lora_dropout that only matters for PEFT training) */
  notes: string[];
}

type Json = Record<string, unknown>;

function isEmpty(v: unknown): boolean {
  if (v == null || v === false) return true;
  if (Array.isArray(v) || typeof v === 'string') return v.length === 0;
  if (typeof v === 'object') return Object.keys(v as object).length === 0;
  return false;
}

/** PEFT's suffix rule: a name matches an entry when it is the entry or ends with '.' + entry. */
const matches = (name: string, entry: string) => name === entry || name.endsWith(`.${entry}`);

/** Reads adapter_config.json's LoRA settings; every unsupported option is its own problem. */
function readAdapterConfig(
    config: Json, layers: SparseMoE[], linear: LinearLayer[], names: PeftNames, problems: string[], notes: string[]) {
  if (config['peft_type'] !== 'LORA') problems.push(`peft_type must be 'LORA' but is ${JSON.stringify(config['peft_type'])}`);
  const r = config['r'];
  if (typeof r !== 'number' || !Number.isInteger(r) || r < 1) problems.push(`r must be an integer >= 1 but is ${JSON.stringify(r)}`);
  const alpha = config['lora_alpha'];
  if (typeof alpha !== 'number' || !Number.isFinite(alpha) || alpha <= 0) {
    problems.push(`lora_alpha must be a number > 0 but is ${JSON.stringify(alpha)}`);
  }
  const rsLoRA = config['use_rslora'] ?? false;
  if (typeof rsLoRA !== 'boolean') problems.push(`use_rslora must be a boolean but is ${JSON.stringify(rsLoRA)}`);
  const unsupported: Array<[string, string]> = [
    ['use_dora', 'DoRA (use_dora) is not supported'],
    ['lora_bias', 'LoRA biases (lora_bias) are not supported'],
    ['modules_to_save', 'modules_to_save is not supported'],
    ['use_qalora', 'QA-LoRA (use_qalora) is not supported'],
    ['layer_replication', 'layer_replication is not supported'],
    ['alora_invocation_tokens', 'aLoRA (alora_invocation_tokens) is not supported'],
    ['trainable_token_indices', 'trainable_token_indices is not supported'],
    ['fan_in_fan_out', 'fan_in_fan_out is not supported'],
  ];
  for (const [key, message] of unsupported) {
    if (!isEmpty(config[key])) problems.push(`${message} but adapter_config.json sets ${key}: ${JSON.stringify(config[key])}`);
  }
  if (config['bias'] != null && config['bias'] !== 'none') {
    problems.push(`bias must be 'none' (trained biases are not supported) but is ${JSON.stringify(config['bias'])}`);
  }
  const dropout = config['lora_dropout'] ?? 0;
  if (typeof dropout !== 'number' || dropout < 0 || dropout >= 1) {
    problems.push(`lora_dropout must be a number in [0, 1) but is ${JSON.stringify(dropout)}`);
  }
  const pattern = (key: string, integer: boolean): Record<string, number> => {
    const value = config[key] ?? {};
    const ok = value !== null && typeof value === 'object' && !Array.isArray(value) &&
        Object.values(value).every(v => typeof v === 'number' && (integer ? Number.isInteger(v) && v >= 1 : Number.isFinite(v) && v > 0));
    if (!ok) problems.push(`${key} must map module-name keys to ${integer ? 'integers >= 1' : 'numbers > 0'} but is ${JSON.stringify(value)}`);
    return ok ? value as Record<string, number> : {};
  };
  const rankPattern = pattern('rank_pattern', true);
  const alphaPattern = pattern('alpha_pattern', false);

  const layersToTransform = config['layers_to_transform'];
  let layerSet: number[] | null = null;
  if (typeof layersToTransform === 'number') layerSet = [layersToTransform];
  else if (Array.isArray(layersToTransform)) layerSet = layersToTransform as number[];
  else if (layersToTransform != null) problems.push(`layers_to_transform must be null, an index or a list but is ${JSON.stringify(layersToTransform)}`);

  // PEFT's rule: an entry targets every parameter (module) whose full name ends with it
  const targetsByLayer = new Map<SparseMoE, Set<LoRATarget>>(layers.map(l => [l, new Set<LoRATarget>()]));
  const select = (entries: unknown, key: string, kinds: readonly LoRATarget[], relative: Partial<Record<LoRATarget, string>>,
      unsupported: (entry: string) => string, other: (entry: string) => boolean = () => false) => {
    if (typeof entries === 'string' && key === 'target_modules') {
      if (entries !== '') problems.push(`target_modules as a pattern (${JSON.stringify(entries)}) is not supported; list the shared-expert projections`);
      return;
    }
    if (!Array.isArray(entries)) {
      problems.push(`${key} must be a list but is ${JSON.stringify(entries)}`);
      return;
    }
    for (const entry of entries) {
      let hit = false;
      for (const layer of layers) {
        for (const t of kinds) {
          if (typeof entry === 'string' && matches(`${layer.name}.${relative[t]}`, entry)) {
            hit = true;
            targetsByLayer.get(layer)!.add(t);
          }
        }
      }
      if (typeof entry === 'string' && other(entry)) hit = true;
      if (!hit) problems.push(unsupported(JSON.stringify(entry)));
    }
  };
  const paramTargets = TARGET_ORDER.filter(t => names.parameter[t] !== undefined);
  select(config['target_parameters'] ?? [], 'target_parameters', paramTargets, names.parameter,
      e => `target_parameters entry ${e} is not supported; supported: ` +
        `${paramTargets.map(t => `'${names.parameter[t]}'`).join(', ')} (optionally after a module path)`);
  // attention and dense-MLP projections: PEFT's lora.Linear, named by target_modules
  const linearModules = loraModules(linear).filter(m => m.kind === 'linear');
  const selectedLinear = new Set<string>();
  const selectLinear = (entry: string) => {
    const hits = linearModules.filter(m => moduleMatches(m.name, entry));
    hits.forEach(m => selectedLinear.add(m.name));
    return hits.length > 0;
  };
  // Qwen2-MoE's shared_expert_gate is named only where a layer has one
  const sharedListed = SHARED_LORA_TARGETS.filter(t => t !== 'shared.sigmoid_gate' || layers.some(l => l.sharedExpert?.gated === true));
  select(config['target_modules'] ?? [], 'target_modules', SHARED_LORA_TARGETS, names.module,
      e => `target_modules entry ${e} is not supported: LoRA on modules is supported on the attention projections ` +
        "('q_proj', 'k_proj', 'v_proj', 'o_proj'), the dense MLPs' ('gate_proj', 'up_proj', 'down_proj') and the shared " +
        `expert's (${sharedListed.map(t => `'${names.module[t]}'`).join(', ')}); it matches none of this model's`, selectLinear);
  const linearPlan = new Map<LinearLayer, Record<string, LinearLoRAModule>>();
  for (const m of linearModules) {
    if (m.kind !== 'linear' || !selectedLinear.has(m.name)) continue;
    const index = decoderLayerIndex(m.layer.name);
    if (layerSet !== null && (index === null || !layerSet.includes(index))) continue;
    const rk = patternKey(Object.keys(rankPattern), m.name);
    const ak = patternKey(Object.keys(alphaPattern), m.name);
    const modules = linearPlan.get(m.layer) ?? {};
    modules[m.projection] = { r: rk === undefined ? r as number : rankPattern[rk], alpha: ak === undefined ? alpha as number : alphaPattern[ak] };
    linearPlan.set(m.layer, modules);
  }
  // PEFT applies the patterns to an MoE target by its name: '<block>.experts.gate_up_proj' for a
  // parameter target ('<module>.<parameter>'), the module name for a shared-expert projection
  const targetSettings = (layer: SparseMoE, t: LoRATarget) => {
    const targetName = `${layer.name}.${names.parameter[t] ?? names.module[t]}`;
    const rk = patternKey(Object.keys(rankPattern), targetName);
    const ak = patternKey(Object.keys(alphaPattern), targetName);
    return { r: rk === undefined ? r as number : rankPattern[rk], alpha: ak === undefined ? alpha as number : alphaPattern[ak] };
  };
  const all = new Set([...targetsByLayer.values()].flatMap(t => [...t]));
  const none = (v: unknown) => v == null || (Array.isArray(v) && v.length === 0);
  if (none(config['target_parameters']) && none(config['target_modules'])) {
    problems.push(`the adapter targets nothing: target_parameters and target_modules are both empty`);
  }
  const excluded: SparseMoE[] = [];
  for (const layer of layers) {
    const index = decoderLayerIndex(layer.name);
    if (layerSet !== null && (index === null || !layerSet.includes(index))) {
      if (targetsByLayer.get(layer)!.size > 0) excluded.push(layer);
      targetsByLayer.set(layer, new Set());
    }
  }
  return {
    r: r as number, alpha: alpha as number, rsLoRA: rsLoRA === true, layerSet, excluded,
    targets: TARGET_ORDER.filter(t => all.has(t)),
    targetsOf: (layer: SparseMoE) => TARGET_ORDER.filter(t => targetsByLayer.get(layer)!.has(t)),
    targetSettings,
    linear: linearPlan, dropout: typeof dropout === 'number' ? dropout : 0,
  };
}

/** A PEFT adapter's two files as bytes: what a browser fetches, downloads or keeps in memory. */
export interface PeftAdapterFiles {
  /** the text of adapter_config.json */
  config: string;
  /** the bytes of adapter_model.safetensors */
  weights: Uint8Array;
}

/**
 * Loads a PEFT LoRA adapter from its files' contents (no file system: browsers fetch them) into a
 * model's SparseMoE layers, exactly as loadPeftAdapter loads a folder: same checks, same messages,
 * the model left untouched when anything is wrong.
 *
 * ```js
 * const files = {config: await (await fetch(url + '/adapter_config.json')).text(),
 *     weights: new Uint8Array(await (await fetch(url + '/adapter_model.safetensors')).arrayBuffer())};
 * const {r, targets} = await loadPeftAdapterFrom(model, files);
 * ```
 */
export async function loadPeftAdapterFrom(
    model: tfl.LayersModel, files: PeftAdapterFiles, options: PeftAdapterOptions = {}): Promise<LoadedPeftAdapter> {
  const op = 'loadPeftAdapterFrom';
  if (files === null || typeof files !== 'object' || typeof files.config !== 'string' || !(files.weights instanceof Uint8Array)) {
    throw new PeftAdapterError(`\`${op}()\`: 'files' must be {config: the text of ${ADAPTER_CONFIG}, weights: the bytes of ` +
        `${ADAPTER_WEIGHTS} (a Uint8Array)} but is ${describeValue(files)}`);
  }
  let config: unknown;
  try {
    config = JSON.parse(files.config);
  } catch (e) {
    throw new PeftAdapterError(`\`${op}()\`: 'files.config' (${ADAPTER_CONFIG}) is not valid JSON: ${(e as Error).message}`);
  }
  return loadParsedPeftAdapter(op, model, () => config, () => parseSafetensors(files.weights, ADAPTER_WEIGHTS),
      { source: 'the given files', configName: `'files.config' (${ADAPTER_CONFIG})` }, options);
}

/**
 * The loader behind loadPeftAdapterFrom and the Node loadPeftAdapter (src/io/peft_files.ts): the
 * parsed config and the weights are asked for once the model has MoE layers, the weights only
 * once the config is an object.
 * `names.source` names the adapter in messages, `names.configName` its config.
 * @internal
 */
export async function loadParsedPeftAdapter(op: string, model: tfl.LayersModel, readConfig: () => unknown,
    openWeights: () => SafetensorsFile | Promise<SafetensorsFile>, names: { source: string; configName: string },
    options: PeftAdapterOptions): Promise<LoadedPeftAdapter> {
  const name = options.name ?? 'default';
  const where = `${names.source} (adapter '${name}')`;
  const layers = sparseMoELayers(model);
  const linear = linearLayers(model);
  if (layers.length === 0 && linear.length === 0) {
    throw new PeftAdapterError(`\`${op}()\`: the model '${model.name}' has no SparseMoE, attention or dense-MLP layer to load an adapter into`);
  }
  const config = await readConfig();
  if (config === null || typeof config !== 'object' || Array.isArray(config)) {
    throw new PeftAdapterError(`\`${op}()\`: ${names.configName} must hold a JSON object`);
  }
  return loadAdapterConfig(op, model, layers, linear, config as Json, await openWeights(), where, name);
}

async function loadAdapterConfig(op: string, model: tfl.LayersModel, layers: SparseMoE[], linear: LinearLayer[], config: Json,
    file: SafetensorsFile, where: string, name: string): Promise<LoadedPeftAdapter> {

  const problems: string[] = [];
  const notes: string[] = [];
  const names = peftNames(model);
  const cfg = readAdapterConfig(config, layers, linear, names, problems, notes);
  const modelType = hfConfigOf(model)?.['model_type'];
  const adapterType = adapterModelType(config['auto_mapping']);
  if (adapterType !== null && typeof modelType === 'string' && adapterType !== modelType) {
    problems.push(`the adapter was made for ${adapterType} (auto_mapping ${JSON.stringify(config['auto_mapping'])}) ` +
        `but the model is ${modelType} (${hfArchitecture(modelType).base_model_class})`);
  }
  const factorLayout = expertFactorLayout(config['peft_version'], layers.length > 0 && layers[0].expertLayout !== 'outIn', problems, notes,
      layers.length > 0 && peftTakesTransposed(layers[0]));
  /** A target's A and B shapes as the file holds them (an older PEFT swaps the expert factors' in and out). */
  const fileShapes = (layer: SparseMoE, t: LoRATarget) => {
    const s = expectedShapes(layer, t, cfg.targetSettings(layer, t).r);
    return isExpert(t) && factorLayout === 'swapped' ? { A: [s.A[0], s.B[0]], B: [s.A[1], s.B[1]] } : s;
  };
  for (const layer of layers) {
    if (layer.adapterNames().includes(name)) problems.push(`layer '${layer.name}' already has an adapter named '${name}'`);
    if (layer.sharedExpert == null) {
      for (const t of cfg.targetsOf(layer).filter(isShared)) problems.push(`${t} is targeted but '${layer.name}' has no shared expert`);
    }
    else if (!layer.sharedExpert.gated && cfg.targetsOf(layer).includes('shared.sigmoid_gate')) {
      problems.push(`shared.sigmoid_gate is targeted but the shared expert of '${layer.name}' has no sigmoid gate`);
    }
  }
  const moduleTargets = (module: string): LoRATarget[] => {
    if (/^experts(\.base_layer)*$/.test(module)) return [...EXPERT_LORA_TARGETS];
    if (module === names.routerModule) return ['router'];
    return SHARED_LORA_TARGETS.filter(t => names.module[t] === module);
  };

  // attention / dense-MLP tensors: '<layer>.<projection>.lora_{A,B}.weight', checked against the config's modules
  const linearTensors = new Set<string>();
  for (const [layer, modules] of cfg.linear) {
    if (layer.lora.names().includes(name)) problems.push(`layer '${layer.name}' already has an adapter named '${name}'`);
    for (const [projection, m] of Object.entries(modules)) {
      const [out, inSize] = layer.weights.find(v => v.originalName.endsWith(`/${projection}.weight`))!.shape as number[];
      for (const [factor, shape] of [['A', [m.r, inSize]], ['B', [out, m.r]]] as const) {
        const tensorName = linearTensorName(layer, projection, factor);
        linearTensors.add(tensorName);
        if (!file.names().includes(tensorName)) {
          problems.push(`no '${tensorName}' (the adapter config targets '${layer.name}.${projection}')`);
          continue;
        }
        const info = file.info(tensorName);
        if (!['F32', 'F16', 'BF16'].includes(info.dtype)) problems.push(`'${tensorName}' must be a float tensor but is ${info.dtype}`);
        if (!same(info.shape, shape)) problems.push(`'${tensorName}' has shape [${info.shape}] but ${layer.name}.${projection} with r = ${m.r} needs [${shape}]`);
      }
    }
  }
  const linearModuleOf = (tensorName: string) => linear.find(l => tensorName.startsWith(`${PREFIX}${l.name}.`));

  // tensor name → (layer, module, factor)
  const byLayer = new Map<SparseMoE, Map<string, { A?: string; B?: string }>>();
  for (const tensorName of file.names()) {
    if (linearTensors.has(tensorName)) continue;
    const linearLayer = linearModuleOf(tensorName);
    if (linearLayer !== undefined) {
      problems.push(`'${tensorName}' is a LoRA tensor of '${linearLayer.name}' that the adapter config does not target ` +
          `(target_modules ${JSON.stringify(config['target_modules'] ?? [])})`);
      continue;
    }
    const layer = layers.find(l => tensorName.startsWith(`${PREFIX}${l.name}.`));
    const m = layer ? /^(.+)\.lora_(A|B)\.weight$/.exec(tensorName.slice(PREFIX.length + layer.name.length + 1)) : null;
    if (layer === undefined || m === null || moduleTargets(m[1]).length === 0) {
      const known = targetModules(TARGET_ORDER, names);
      problems.push(`'${tensorName}' is not a LoRA tensor of this model's MoE blocks (expected ` +
          `'${PREFIX}<block>.<module>.lora_{A,B}.weight' with <module> one of experts[.base_layer], ` +
          `${[...new Set([names.routerModule, ...SHARED_LORA_TARGETS.map(t => known.get(t))])].join(', ')} and <block> one of ` +
          `${layers.slice(0, 3).map(l => `'${l.name}'`).join(', ')}${layers.length > 3 ? ', ...' : ''})`);
      continue;
    }
    const modules = byLayer.get(layer) ?? new Map<string, { A?: string; B?: string }>();
    byLayer.set(layer, modules);
    const entry = modules.get(m[1]) ?? {};
    entry[m[2] as 'A' | 'B'] = tensorName;
    modules.set(m[1], entry);
  }

  // module → target, by shape
  const plan: Array<{ layer: SparseMoE; tensors: Map<LoRATarget, { A: string; B: string }>; targets: LoRATarget[] }> = [];
  for (const layer of layers) {
    const targets = cfg.targetsOf(layer);
    const modules = byLayer.get(layer);
    if (targets.length === 0) {
      if (modules !== undefined) {
        problems.push(cfg.excluded.includes(layer) ?
          `layer '${layer.name}' has LoRA tensors but is not in layers_to_transform [${cfg.layerSet}]` :
          `layer '${layer.name}' has LoRA tensors but the adapter config targets nothing on it`);
      }
      continue;
    }
    if (modules === undefined) {
      problems.push(`no LoRA tensors for '${layer.name}' (expected targets: ${targets.join(', ')})`);
      continue;
    }
    const tensors = new Map<LoRATarget, { A: string; B: string }>();
    const before = problems.length;
    for (const [module, pair] of modules) {
      const label = `'${PREFIX}${layer.name}.${module}'`;
      if (pair.A === undefined || pair.B === undefined) {
        problems.push(`${label} has lora_${pair.A === undefined ? 'B' : 'A'} but no lora_${pair.A === undefined ? 'A' : 'B'}`);
        continue;
      }
      const a = file.info(pair.A);
      const b = file.info(pair.B);
      for (const [t, info] of [[pair.A, a], [pair.B, b]] as const) {
        if (!['F32', 'F16', 'BF16'].includes(info.dtype)) problems.push(`'${t}' must be a float tensor but is ${info.dtype}`);
      }
      const candidates = moduleTargets(module).filter(t => !isShared(t) || layer.sharedExpert != null);
      const fits = candidates.filter(t => {
        const s = fileShapes(layer, t);
        return same(a.shape, s.A) && same(b.shape, s.B);
      });
      if (fits.length !== 1) {
        const want = candidates.map(t => {
          const s = fileShapes(layer, t);
          return `${names.parameter[t] ?? names.module[t]}: A [${s.A}], B [${s.B}]`;
        }).join(' or ');
        const ranks = candidates.map(t => cfg.targetSettings(layer, t).r);
        const rank = ranks.every(v => v === cfg.r) ? `r = ${cfg.r}` : `its ranks (${candidates.map((t, k) => `${t} ${ranks[k]}`).join(', ')})`;
        problems.push(`${label} has A [${a.shape}], B [${b.shape}], which fits no target of this layer with ${rank}` +
            (want ? ` (${want})` : ''));
        continue;
      }
      if (tensors.has(fits[0])) {
        problems.push(`${label} is a second adapter for ${fits[0]} on '${layer.name}'`);
        continue;
      }
      if (!targets.includes(fits[0])) {
        problems.push(`${label} adapts ${fits[0]}, which the adapter config does not target on this layer`);
        continue;
      }
      tensors.set(fits[0], { A: pair.A, B: pair.B });
    }
    // a module that fit nothing was reported already; a target is missing only when none failed
    if (problems.length === before) {
      for (const t of targets) if (!tensors.has(t)) problems.push(`no LoRA tensors for ${t} on '${layer.name}'`);
    }
    plan.push({ layer, tensors, targets });
  }
  if (problems.length > 0) throw peftError(op, where, problems);
  // every value is checked before the model changes, one tensor in memory at a time
  const nonFinite = await nonFiniteTensors(file, [...plan.flatMap(p => [...p.tensors.values()].flatMap(t => [t.A, t.B])), ...linearTensors]);
  if (nonFinite.length > 0) throw peftError(op, where, nonFinite);

  // Every factor is read (and converted from an older layout) before the model changes: a read
  // that fails (a file changed since its header was read) leaves the model untouched. Adapters
  // are small next to the model.
  const read: tf.Tensor[] = [];
  const values = new Map<string, { A: tf.Tensor; B: tf.Tensor }>();
  try {
    for (const { layer, tensors } of plan) {
      for (const [target, pair] of tensors) {
        const A = await file.tensor(pair.A) as tf.Tensor2D;
        read.push(A);
        const B = await file.tensor(pair.B) as tf.Tensor2D;
        read.push(B);
        const converted = isExpert(target) && factorLayout === 'swapped' ? swapExpertFactors(A, B, layer.numExperts) : { A, B };
        read.push(converted.A, converted.B);
        values.set(`${layer.name}/${target}`, converted);
      }
    }
    for (const tensorName of linearTensors) {
      const t = await file.tensor(tensorName);
      read.push(t);
      values.set(tensorName, { A: t, B: t });
    }
    freezeBaseLayers(model);
    for (const [layer, modules] of cfg.linear) {
      // the layer trains again; its LinearLoRA freezes the base weights and keeps the adapter trainable
      layer.trainable = true;
      layer.lora.add({ name, modules, rsLoRA: cfg.rsLoRA, dropout: cfg.dropout }, 'peft');
      for (const [projection, f] of Object.entries(layer.lora.factors(name))) {
        f.A.write(values.get(linearTensorName(layer, projection, 'A'))!.A);
        f.B.write(values.get(linearTensorName(layer, projection, 'B'))!.A);
      }
    }
    for (const { layer, tensors, targets } of plan) {
      const ranks: Partial<Record<LoRATarget, number>> = {};
      const alphas: Partial<Record<LoRATarget, number>> = {};
      for (const t of targets) {
        const own = cfg.targetSettings(layer, t);
        if (own.r !== cfg.r) ranks[t] = own.r;
        if (own.alpha !== cfg.alpha) alphas[t] = own.alpha;
      }
      layer.addAdapter({ name, r: cfg.r, alpha: cfg.alpha, rsLoRA: cfg.rsLoRA, targets: [...targets], dropout: cfg.dropout,
        ...(Object.keys(ranks).length > 0 ? { ranks } : {}), ...(Object.keys(alphas).length > 0 ? { alphas } : {}) }, 'peft');
      const factors = layer.adapter(name).factors;
      for (const target of tensors.keys()) {
        const { A, B } = values.get(`${layer.name}/${target}`)!;
        factors[target]!.A.write(A);
        factors[target]!.B.write(B);
      }
    }
  } finally {
    tf.dispose(read);
  }
  return {
    name, r: cfg.r, alpha: cfg.alpha, rsLoRA: cfg.rsLoRA, targets: [...cfg.targets],
    layers: plan.map(p => p.layer.name),
    modules: [...cfg.linear].flatMap(([layer, modules]) => Object.keys(modules).map(p => `${layer.name}.${p}`)), notes,
  };
}

/**
 * The two files of adapter `name` of the model's SparseMoE layers as PEFT writes them
 * (adapter_config.json's text, adapter_model.safetensors' bytes), without the file system: what a
 * browser page offers as downloads. savePeftAdapter writes the same bytes to a folder; see it for
 * what the files hold. Reads the factors asynchronously, so it runs on webgpu too.
 *
 * ```js
 * const {config, weights} = await encodePeftAdapter(model);
 * const link = Object.assign(document.createElement('a'), {download: 'adapter_model.safetensors',
 *     href: URL.createObjectURL(new Blob([weights]))});
 * ```
 */
export async function encodePeftAdapter(model: tfl.LayersModel, options: PeftAdapterOptions = {}): Promise<PeftAdapterFiles> {
  return peftAdapterFiles('encodePeftAdapter', model, options);
}

/**
 * The files of savePeftAdapter and encodePeftAdapter.
 * @internal
 */
export async function peftAdapterFiles(
    op: string, model: tfl.LayersModel, options: PeftAdapterOptions, source: string | null = null): Promise<PeftAdapterFiles> {
  const name = options.name ?? 'default';
  const layers = sparseMoELayers(model);
  const having = layers.filter(l => l.adapterNames().includes(name));
  const linear = linearLayers(model).filter(l => l.lora.names().includes(name));
  if (having.length === 0 && linear.length === 0) {
    const all = [...new Set([...layers.flatMap(l => l.adapterNames()), ...linearLayers(model).flatMap(l => l.lora.names())])];
    throw new PeftAdapterError(`\`${op}()\`: no layer of '${model.name}' has an adapter '${name}' (adapters: ${all.join(', ') || 'none'})`);
  }
  // one r, alpha, rsLoRA and dropout per adapter (PEFT's); linear modules that differ go in the patterns
  const linearModules = linear.flatMap(l => Object.entries(l.lora.config(name)!.modules).map(([p, m]) =>
    ({ layer: l, projection: p, module: `${l.name}.${p}`, ...m })));
  const first: { r: number; alpha: number; rsLoRA?: boolean } = having.length > 0 ? having[0].adapter(name).config :
    { ...linearModules[0], rsLoRA: linear[0].lora.config(name)!.rsLoRA };
  const firstName = having.length > 0 ? `'${having[0].name}'` : `'${linearModules[0].module}'`;
  const scale = (c: { r: number; alpha: number; rsLoRA?: boolean }) => `r ${c.r}, alpha ${c.alpha}, rsLoRA ${c.rsLoRA ?? false}`;
  const problems: string[] = [];
  for (const layer of having.slice(1)) {
    const c = layer.adapter(name).config;
    if (scale(c) !== scale(first)) {
      problems.push(`'${layer.name}' has ${scale(c)} but ${firstName} has ${scale(first)} (PEFT keeps one of each per adapter)`);
    }
  }
  const dropouts = [...new Set([...having.map(l => l.adapter(name).config.dropout ?? 0), ...linear.map(l => l.lora.config(name)!.dropout ?? 0)])];
  for (const layer of linear) {
    const c = layer.lora.config(name)!;
    if ((c.rsLoRA ?? false) !== (first.rsLoRA ?? false)) {
      problems.push(`'${layer.name}' has rsLoRA ${c.rsLoRA ?? false} but ${firstName} has rsLoRA ${first.rsLoRA ?? false} (PEFT keeps one per adapter)`);
    }
  }
  if (dropouts.length > 1) problems.push(`the adapted layers have lora_dropout ${dropouts.join(', ')} (PEFT keeps one per adapter)`);
  if (problems.length > 0) throw peftError(op, source === null ? `adapter '${name}'` : `${source} (adapter '${name}')`, problems);

  const names = peftNames(model);
  const targetsOf = (l: SparseMoE) => TARGET_ORDER.filter(t => l.adapter(name).config.targets.includes(t));
  const key = (l: SparseMoE) => targetsOf(l).join(',');
  // Short entries target every MoE layer; otherwise each entry names its layer (PEFT matches
  // entries as suffixes of full names, and ignores layers_to_transform for target_parameters).
  const uniform = having.length === layers.length && having.every(l => key(l) === key(having[0]));
  const entries = (shared: boolean) => (uniform ? [having[0]] : having).flatMap(l =>
    targetsOf(l).filter(t => isShared(t) === shared).map(t => {
      const relative = shared ? names.module[t]! : names.parameter[t]!;
      return uniform ? relative : `${l.name}.${relative}`;
    }));
  // Linear modules: '<layer's last name part>.<projection>' ('self_attn.q_proj') when it selects
  // exactly the adapted modules of the model, else each module's full name.
  const allModules = loraModules([model]).map(m => m.name);
  const adaptedModules = new Set(linearModules.map(m => m.module));
  const linearEntries: string[] = [];
  for (const m of linearModules) {
    const short = `${m.layer.name.slice(m.layer.name.lastIndexOf('.') + 1)}.${m.projection}`;
    const hits = allModules.filter(n => moduleMatches(n, short));
    const entry = hits.every(n => adaptedModules.has(n)) ? short : m.module;
    if (!linearEntries.includes(entry)) linearEntries.push(entry);
  }
  const rankPattern: Record<string, number> = {};
  const alphaPattern: Record<string, number> = {};
  for (const m of linearModules) {
    if (m.r !== first.r) rankPattern[m.module] = m.r;
    if (m.alpha !== first.alpha) alphaPattern[m.module] = m.alpha;
  }
  // MoE targets with a rank or alpha of their own: PEFT's own key ('.*\\.gate_up_proj') when one
  // value holds on every layer and the key selects no other adapted name, else each target's name
  const targetName = (l: SparseMoE, t: LoRATarget) => `${l.name}.${names.parameter[t] ?? names.module[t]}`;
  const adaptedNames = [...adaptedModules, ...having.flatMap(l => targetsOf(l).map(t => targetName(l, t)))];
  const escape = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  for (const t of TARGET_ORDER) {
    const withTarget = having.filter(l => targetsOf(l).includes(t));
    for (const [pattern, own, base] of [
      [rankPattern, (l: SparseMoE) => targetRank(l.adapter(name).config, t), first.r],
      [alphaPattern, (l: SparseMoE) => targetAlpha(l.adapter(name).config, t), first.alpha],
    ] as const) {
      const differing = withTarget.filter(l => own(l) !== base);
      if (differing.length === 0) continue;
      // the shortest trailing part of the name that selects this target only ('gate_up_proj', 'gate.weight')
      const parts = (names.parameter[t] ?? names.module[t]!).split('.');
      const shortKey = parts.map((_, k) => `.*\\.${escape(parts.slice(k).join('.'))}`).reverse()
          .filter(key => key !== '.*\\.weight')
          .find(key => adaptedNames.every(n => patternKey([key], n) === undefined || withTarget.some(l => targetName(l, t) === n)));
      const oneValue = differing.length === withTarget.length && differing.every(l => own(l) === own(differing[0]));
      if (oneValue && shortKey !== undefined) pattern[shortKey] = own(differing[0]);
      else for (const l of differing) pattern[escape(targetName(l, t))] = own(l);
    }
  }
  const modelType = hfConfigOf(model)?.['model_type'];
  const parameters = entries(false);
  const config = {
    alpha_pattern: alphaPattern,
    // what PEFT's save_pretrained records when task_type is null: the loader checks it
    auto_mapping: typeof modelType === 'string' ? hfArchitecture(modelType) : null,
    base_model_name_or_path: null,
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layers_pattern: null,
    layers_to_transform: null,
    lora_alpha: first.alpha,
    lora_bias: false,
    // PEFT's ParamWrapper (every target_parameters entry) refuses to load a config whose
    // lora_dropout is not 0; dropout only acts in training, so the adapter computes the same
    lora_dropout: parameters.length > 0 ? 0.0 : dropouts[0] ?? 0.0,
    modules_to_save: null,
    peft_type: 'LORA',
    peft_version: PEFT_VERSION_WRITTEN,
    r: first.r,
    rank_pattern: rankPattern,
    revision: null,
    target_modules: [...entries(true), ...linearEntries],
    target_parameters: parameters,
    task_type: null,
    use_dora: false,
    use_rslora: first.rsLoRA ?? false,
  };
  const tensors: Record<string, tf.Tensor> = {};
  const made: tf.Tensor[] = [];
  const adapterTensors = peftAdapterTensors(model, name);
  for (const t of adapterTensors) {
    if (!isExpert(t.target) || (t.layer.expertLayout !== 'outIn') === peftTakesTransposed(t.layer)) {
      tensors[t.peftName] = t.variable.read();
    } else if (t.factor === 'A') {
      // PEFT reads these experts in the other orientation (Llama 4): write its layout
      const b = adapterTensors.find(o => o.layer === t.layer && o.target === t.target && o.factor === 'B')!;
      const swapped = swapExpertFactors(t.variable.read() as tf.Tensor2D, b.variable.read() as tf.Tensor2D, t.layer.numExperts);
      tensors[t.peftName] = swapped.A;
      tensors[b.peftName] = swapped.B;
      made.push(swapped.A, swapped.B);
    }
  }
  for (const m of linearModules) {
    const f = m.layer.lora.factors(name)[m.projection];
    tensors[linearTensorName(m.layer, m.projection, 'A')] = f.A.read();
    tensors[linearTensorName(m.layer, m.projection, 'B')] = f.B.read();
  }
  try {
    return { config: `${JSON.stringify(config, null, 2)}\n`, weights: await encodeSafetensors(tensors, { format: 'pt' }) };
  } finally {
    tf.dispose(made);
  }
}
