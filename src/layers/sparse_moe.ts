/**
 * SparseMoE: a tfjs-layers Layer holding one MoE block (router, fused experts, optional shared
 * expert) and, like PEFT's LoRA wrappers, the state of its LoRA adapters: adapters keyed by name,
 * a list of active ones, a disabled flag and merged adapters, all changed through methods.
 *
 * Its own `call` runs the plain reference kernel; `register()` patches it to the fused one.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type { LayerArgs } from '@tensorflow/tfjs-layers/dist/engine/topology.js';
import { expertLoRADelta } from '../ops/lora/delta.js';
import { dropoutSeedOf } from '../ops/lora/dropout.js';
import { moeBlock } from '../ops/moe_block.js';
import {
  PACKED_KINDS, PackedExpertWeight, expertWordsOf, unpackDenseWeight, isQuantizedKind, packExpertWeight, packedExpertGroup, unpackExpertWeight,
  type ExpertWeightTensor, type PackedKind, type PackedOptions,
} from '../ops/packed.js';
import { DEFAULT_INT4_GROUP_SIZE, INT4_GROUP_SIZES } from '../ops/quantized.js';
import type {
  ExpertActivation, ExpertLayout, LoRADropout, LoRAFactors, LoRAMode, MoEBlockConfig, MoEBlockWeights, RoutingConfig,
} from '../ops/types.js';
import { assertInteger, assertOneOf, fail } from '../ops/validate.js';
import { describeValue } from '../util/describe.js';
import { protectString, restoreString } from './config_strings.js';
import { HOST_BACKENDS } from './embedding.js';
import { normalInitializer } from './initializers.js';
import { packedDenseFormat, packedDenseOf } from './dense_storage.js';
import { releaseLayerVariables } from './layer_variables.js';
import { currentSequenceContext } from './sequence_context.js';

export type LoRATarget =
  | 'experts.gate_up' | 'experts.down' | 'router'
  /** the shared expert's projections: plain 2-D LoRA like the router's (A [r, in], B [out, r]) */
  | 'shared.gate' | 'shared.up' | 'shared.down'
  /** Qwen2-MoE's [1, H] shared_expert_gate (PEFT's all-linear adapts it): A [r, H], B [1, r] */
  | 'shared.sigmoid_gate';
export const LORA_TARGETS: readonly LoRATarget[] = [
  'experts.gate_up', 'experts.down', 'router', 'shared.gate', 'shared.up', 'shared.down', 'shared.sigmoid_gate',
];
/** The targets whose adapter holds per-expert factors (A [r·E, in], B [out, r·E]). */
export const EXPERT_LORA_TARGETS: readonly LoRATarget[] = ['experts.gate_up', 'experts.down'];
/** The targets that exist only on a layer with a shared expert. */
export const SHARED_LORA_TARGETS: readonly LoRATarget[] = ['shared.gate', 'shared.up', 'shared.down', 'shared.sigmoid_gate'];

/**
 * How a SparseMoE holds its routed-expert weights (gate_up, down): 'float32', packed 'bf16' /
 * 'f16' halves, or quantized 'int8' / 'int4' (groups of 64) / 'nf4' / 'mxfp4', in int32 variables
 * (src/ops/packed.ts, src/ops/quantized.ts; groups run along each weight's input). Packed experts
 * are frozen: non-trainable, never given a gradient; LoRA, the router, shared experts and
 * everything else stay float32.
 */
export type ExpertStorage = 'float32' | PackedKind;
export const EXPERT_STORAGES: readonly ExpertStorage[] = ['float32', ...PACKED_KINDS];

/** The packed expert variables of every SparseMoE: what they hold, for readers outside the layer. */
const packedVariables = new WeakMap<tfl.LayerVariable, { kind: PackedKind; shape: [number, number, number]; options: PackedOptions }>();

function packedOf(variable: tfl.LayerVariable): PackedExpertWeight | undefined {
  const packed = packedVariables.get(variable);
  return packed && new PackedExpertWeight(packed.kind, packed.shape, variable.read(), packed.options);
}

/**
 * A layer variable's value as float32 (a new tensor the caller owns): packed expert weights and
 * packed dense weights (src/layers/dense_storage.ts) decoded (the whole weight: for saving and
 * merging), any other variable cloned.
 *
 * ```js
 * const w = variableFloat32(layer.weightVariable('gate_up'));  // float32 [E, 2I, H]
 * ```
 */
export function variableFloat32(variable: tfl.LayerVariable): tf.Tensor {
  const packed = packedOf(variable);
  if (packed !== undefined) return unpackExpertWeight(packed);
  const dense = packedDenseOf(variable);
  if (dense !== undefined) return unpackDenseWeight(dense);
  return tf.clone(variable.read());
}

/**
 * Expert `e` of an expert weight variable [E, rows, cols] as float32 [rows, cols]: one expert is
 * decoded when the variable holds packed experts, never the whole weight.
 */
export function variableExpertFloat32(variable: tfl.LayerVariable, e: number): tf.Tensor2D {
  const packed = packedOf(variable);
  if (packed !== undefined) return packedExpertGroup(packed, e);
  const [, rows, cols] = variable.shape as number[];
  return tf.tidy(() => tf.reshape(tf.slice(variable.read(), [e, 0, 0], [1, rows, cols]), [rows, cols]) as tf.Tensor2D);
}

/** A layer variable's logical shape: [E, rows, cols] for packed expert weights, [rows, cols] for packed dense ones, else its own. */
export function variableShape(variable: tfl.LayerVariable): number[] {
  return [...(packedVariables.get(variable)?.shape ?? packedDenseFormat(variable)?.shape ?? variable.shape as number[])];
}

export interface LoRAAdapterConfig {
  name: string;
  /** rank per expert (experts) or of the router adapter */
  r: number;
  alpha: number;
  /** scaling alpha/sqrt(r) instead of alpha/r */
  rsLoRA?: boolean;
  targets: LoRATarget[];
  /**
   * Ranks of single targets that differ from `r` (PEFT's rank_pattern on a target, e.g.
   * `{'experts.gate_up': 8}`: gate and up fused in one weight, each keeping rank 4 of its own).
   */
  ranks?: Partial<Record<LoRATarget, number>>;
  /** Alphas of single targets that differ from `alpha` (PEFT's alpha_pattern on a target). */
  alphas?: Partial<Record<LoRATarget, number>>;
  /**
   * PEFT's lora_dropout on every target's branch input, in training passes only (`training` of
   * the current SequenceContext); routed experts drop each (token, expert) pair's input
   * independently (split LoRA only). Default 0.
   */
  dropout?: number;
}

export interface SparseMoEArgs extends LayerArgs {
  /** E */
  numExperts: number;
  /** I, per expert */
  intermediateSize: number;
  routing: RoutingConfig;
  /** default {kind: 'swiglu'} */
  activation?: ExpertActivation;
  /** 'outIn' (transformers' default), 'inOutInterleaved' (gpt-oss) or 'inOut' (Llama 4) */
  expertLayout?: ExpertLayout;
  /** gate_up and down biases (gpt-oss) */
  expertBias?: boolean;
  /** router bias (gpt-oss) */
  routerBias?: boolean;
  /** DeepSeek/GLM e_score_correction_bias: selection only, never trained */
  correctionBias?: boolean;
  /** Llama 4: each chosen expert runs on w·x, outputs summed unweighted (MoEBlockConfig.weightedInput) */
  weightedInput?: boolean;
  /** a dense SwiGLU expert every token uses; `gated` scales it by sigmoid(x·gᵀ) (Qwen2-MoE) */
  sharedExpert?: { intermediateSize: number; gated: boolean } | null;
  /** the block implementation `call` uses; default 'reference' until the plugin patches it */
  expertKernel?: string;
  /** how expert LoRA is applied; default 'auto' */
  loraMode?: LoRAMode;
  /** std of the normal initializer of the base weights (HF initializer_range); default 0.02 */
  initializerRange?: number;
  /** how gate_up and down are held: 'float32' (default), packed 'bf16' / 'f16' or quantized (frozen) */
  expertStorage?: ExpertStorage;
  /** int4 experts' group size along the input: 32, 64 (default) or 128; only with expertStorage 'int4' */
  expertGroupSize?: number;
  /** adapters to create in build(), as getConfig() writes them */
  adapters?: LoRAAdapterConfig[];
  activeAdapters?: string[];
  adaptersDisabled?: boolean;
  mergedAdapters?: string[];
}

interface AdapterState {
  config: LoRAAdapterConfig;
  /** the scaling of the targets without a rank or alpha of their own */
  scaling: number;
  /** every target's scaling: alpha_t / r_t (alpha_t / √r_t with rsLoRA) */
  scalings: Partial<Record<LoRATarget, number>>;
  factors: Partial<Record<LoRATarget, { A: tfl.LayerVariable; B: tfl.LayerVariable }>>;
}

const TARGET_WEIGHT: Record<LoRATarget, string> = {
  'experts.gate_up': 'gate_up', 'experts.down': 'down', router: 'router_weight',
  'shared.gate': 'shared_gate', 'shared.up': 'shared_up', 'shared.down': 'shared_down',
  'shared.sigmoid_gate': 'shared_expert_gate',
};

/** A target's rank in an adapter: its own (`ranks`) or the adapter's r. */
export function targetRank(config: Pick<LoRAAdapterConfig, 'r' | 'ranks'>, target: LoRATarget): number {
  return config.ranks?.[target] ?? config.r;
}

/** A target's alpha in an adapter: its own (`alphas`) or the adapter's alpha. */
export function targetAlpha(config: Pick<LoRAAdapterConfig, 'alpha' | 'alphas'>, target: LoRATarget): number {
  return config.alphas?.[target] ?? config.alpha;
}

function copyAdapterConfig(config: LoRAAdapterConfig): LoRAAdapterConfig {
  return {
    ...config, targets: [...config.targets],
    ...(config.ranks === undefined ? {} : { ranks: { ...config.ranks } }),
    ...(config.alphas === undefined ? {} : { alphas: { ...config.alphas } }),
  };
}

function checkAdapterConfig(
    layer: string, cfg: LoRAAdapterConfig, existing: string[], shared: SparseMoE['sharedExpert']): void {
  const op = `${layer}.addAdapter`;
  if (cfg == null || typeof cfg !== 'object') fail(op, `'config' must be {name, r, alpha, targets} but got ${String(cfg)}`);
  if (typeof cfg.name !== 'string' || !/^[A-Za-z0-9_-]+$/.test(cfg.name)) {
    fail(op, `'name' must be letters, digits, '_' or '-' but got ${JSON.stringify(cfg.name)}`);
  }
  if (existing.includes(cfg.name)) fail(op, `an adapter named '${cfg.name}' already exists (adapters: ${existing.join(', ')})`);
  assertInteger(op, 'r', cfg.r, 1);
  if (typeof cfg.alpha !== 'number' || !Number.isFinite(cfg.alpha) || cfg.alpha <= 0) {
    fail(op, `'alpha' must be a finite number > 0 but got ${String(cfg.alpha)}`);
  }
  if (!Array.isArray(cfg.targets) || cfg.targets.length === 0) {
    fail(op, `'targets' must be a non-empty array of ${LORA_TARGETS.map(t => `'${t}'`).join(', ')} but got ${JSON.stringify(cfg.targets)}`);
  }
  cfg.targets.forEach((t, i) => assertOneOf(op, `targets[${i}]`, t, LORA_TARGETS));
  const dup = cfg.targets.find((t, i) => cfg.targets.indexOf(t) !== i);
  if (dup !== undefined) fail(op, `'targets' must not repeat a target but got '${dup}' twice`);
  const p = cfg.dropout ?? 0;
  if (typeof p !== 'number' || !(p >= 0 && p < 1)) fail(op, `'dropout' must be a number in [0, 1) but got ${String(p)}`);
  for (const [key, values, integer] of [['ranks', cfg.ranks, true], ['alphas', cfg.alphas, false]] as const) {
    if (values === undefined) continue;
    if (values === null || typeof values !== 'object' || Array.isArray(values)) {
      fail(op, `'${key}' must be an object {target: ${integer ? 'rank' : 'alpha'}} but got ${describeValue(values)}`);
    }
    for (const [t, v] of Object.entries(values)) {
      if (!cfg.targets.includes(t as LoRATarget)) {
        fail(op, `'${key}' may only name the adapter's targets (${cfg.targets.join(', ')}) but names '${t}'`);
      }
      if (integer) assertInteger(op, `${key}['${t}']`, v, 1);
      else if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) fail(op, `'${key}['${t}']' must be a finite number > 0 but got ${String(v)}`);
    }
  }
  const sharedTarget = cfg.targets.find(t => SHARED_LORA_TARGETS.includes(t));
  if (sharedTarget !== undefined && shared == null) {
    fail(op, `target '${sharedTarget}' needs a shared expert but the layer has none (sharedExpert is null)`);
  }
  if (cfg.targets.includes('shared.sigmoid_gate') && shared?.gated !== true) {
    fail(op, "target 'shared.sigmoid_gate' needs a gated shared expert (Qwen2-MoE's shared_expert_gate) but the layer's is not gated");
  }
}

export class SparseMoE extends tfl.layers.Layer {
  static className = 'SparseMoE';

  readonly numExperts: number;
  readonly intermediateSize: number;
  readonly routing: RoutingConfig;
  readonly activation: ExpertActivation;
  readonly expertLayout: ExpertLayout;
  readonly expertBias: boolean;
  readonly routerBias: boolean;
  readonly correctionBias: boolean;
  readonly weightedInput: boolean;
  readonly sharedExpert: { intermediateSize: number; gated: boolean } | null;
  readonly initializerRange: number;
  readonly expertStorage: ExpertStorage;
  /** int4's group size (expertStorage 'int4'), else null */
  readonly expertGroupSize: number | null;
  expertKernel: string;
  loraMode: LoRAMode;

  private readonly weightsByName = new Map<string, tfl.LayerVariable>();
  private readonly adapters = new Map<string, AdapterState>();
  private pendingAdapters: LoRAAdapterConfig[];
  private active: string[];
  private disabled: boolean;
  private merged: string[];
  /** the base weights' trainable flags before the first adapter froze them; null while no adapter exists */
  private baseTrainable: Map<tfl.LayerVariable, boolean> | null = null;
  private inBuild = false;

  constructor(args: SparseMoEArgs) {
    super(args);
    const op = 'SparseMoE';
    assertInteger(op, 'numExperts', args.numExperts, 1);
    assertInteger(op, 'intermediateSize', args.intermediateSize, 1);
    if (args.routing == null || typeof args.routing !== 'object') fail(op, `'routing' must be a RoutingConfig but got ${String(args.routing)}`);
    assertInteger(op, 'routing.topK', args.routing.topK, 1, args.numExperts);
    this.numExperts = args.numExperts;
    this.intermediateSize = args.intermediateSize;
    this.routing = { ...args.routing };
    this.activation = args.activation ?? { kind: 'swiglu' };
    this.expertLayout = args.expertLayout ?? 'outIn';
    assertOneOf(op, 'expertLayout', this.expertLayout, ['outIn', 'inOutInterleaved', 'inOut'] as const);
    this.expertBias = args.expertBias ?? false;
    this.routerBias = args.routerBias ?? false;
    this.correctionBias = args.correctionBias ?? false;
    this.weightedInput = args.weightedInput ?? false;
    if (typeof this.weightedInput !== 'boolean') fail(op, `'weightedInput' must be a boolean but got ${describeValue(this.weightedInput)}`);
    this.sharedExpert = args.sharedExpert ?? null;
    this.initializerRange = args.initializerRange ?? 0.02;
    this.expertStorage = args.expertStorage ?? 'float32';
    assertOneOf(op, 'expertStorage', this.expertStorage, EXPERT_STORAGES);
    const groupSize = args.expertGroupSize ?? null;
    if (groupSize !== null && this.expertStorage !== 'int4') {
      fail(op, `'expertGroupSize' is for expertStorage 'int4' but expertStorage is '${this.expertStorage}'`);
    }
    if (groupSize !== null && !INT4_GROUP_SIZES.includes(groupSize)) {
      fail(op, `'expertGroupSize' must be one of ${INT4_GROUP_SIZES.join(', ')} but got ${JSON.stringify(groupSize)}`);
    }
    this.expertGroupSize = this.expertStorage === 'int4' ? groupSize ?? DEFAULT_INT4_GROUP_SIZE : null;
    this.expertKernel = args.expertKernel ?? 'reference';
    this.loraMode = args.loraMode ?? 'auto';
    // configs from getConfig() hold protected strings (see config_strings.ts); restore them
    this.pendingAdapters = (args.adapters ?? []).map(a => {
      const saved = a as LoRAAdapterConfig & { rslora?: boolean; targetRanks?: number[]; targetAlphas?: number[] };
      const { rslora, targetRanks, targetAlphas, ...rest } = saved;
      const targets = a.targets.map(restoreString) as LoRATarget[];
      // the lists hold every target's value; the config keeps those that differ from r / alpha
      const byTarget = (values: number[] | undefined, base: number) =>
        values === undefined ? undefined : Object.fromEntries(targets.flatMap((t, k) => values[k] === base ? [] : [[t, values[k]]]));
      return { ...rest, rsLoRA: saved.rsLoRA ?? rslora ?? false, targets,
        ...(targetRanks === undefined ? {} : { ranks: byTarget(targetRanks, rest.r) }),
        ...(targetAlphas === undefined ? {} : { alphas: byTarget(targetAlphas, rest.alpha) }) };
    });
    this.active = (args.activeAdapters ?? this.pendingAdapters.map(a => a.name)).map(restoreString);
    this.disabled = args.adaptersDisabled ?? false;
    this.merged = (args.mergedAdapters ?? []).map(restoreString);
  }

  override build(inputShape: tfl.Shape | tfl.Shape[]): void {
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    const h = shape[shape.length - 1];
    if (h == null) fail('SparseMoE.build', `the input's last dimension (H) must be known but got shape [${shape}]`);
    const e = this.numExperts;
    const i = this.intermediateSize;
    const init = normalInitializer(this.initializerRange);
    const zeros = tfl.initializers.zeros();
    const t = this.expertLayout !== 'outIn';
    const add = (name: string, dims: number[], initializer = init, trainable = true) =>
      this.weightsByName.set(name, this.addWeight(name, dims, 'float32', initializer, undefined, trainable));
    add('router_weight', [e, h]);
    if (this.routerBias) add('router_bias', [e], zeros);
    if (this.correctionBias) add('correction_bias', [e], zeros, false);
    const gateUpShape: [number, number, number] = t ? [e, h, 2 * i] : [e, 2 * i, h];
    const downShape: [number, number, number] = t ? [e, i, h] : [e, h, i];
    if (this.expertStorage === 'float32') {
      add('gate_up', gateUpShape);
      add('down', downShape);
    } else {
      // packed halves or quantized words (zeros until a checkpoint is loaded), frozen:
      // non-trainable int32 variables; quantized groups run along the input ([E, out, in]: axis 2)
      const kind = this.expertStorage;
      const options: PackedOptions = isQuantizedKind(kind) ?
        { inputAxis: t ? 1 : 2, ...(this.expertGroupSize !== null ? { groupSize: this.expertGroupSize } : {}) } : {};
      for (const [name, shape] of [['gate_up', gateUpShape], ['down', downShape]] as const) {
        const v = this.addWeight(name, [e, expertWordsOf(kind, shape, options)], 'int32', zeros, undefined, false);
        this.weightsByName.set(name, v);
        packedVariables.set(v, { kind, shape, options });
      }
    }
    if (this.expertBias) {
      add('gate_up_bias', [e, 2 * i], zeros);
      add('down_bias', [e, h], zeros);
    }
    if (this.sharedExpert) {
      const is = this.sharedExpert.intermediateSize;
      add('shared_gate', [is, h]);
      add('shared_up', [is, h]);
      add('shared_down', [h, is]);
      if (this.sharedExpert.gated) add('shared_expert_gate', [1, h]);
    }
    this.built = true;
    const pending = this.pendingAdapters;
    this.pendingAdapters = [];
    const active = this.active;
    this.inBuild = true;
    try {
      for (const cfg of pending) this.createAdapter(cfg, 'peft');
    } finally {
      this.inBuild = false;
    }
    this.active = active;
  }

  /** The layer's variable called `name` (see the weight names in the class comment of the API doc). */
  weightVariable(name: string): tfl.LayerVariable {
    const v = this.weightsByName.get(name);
    if (v === undefined) {
      fail('SparseMoE.weightVariable', `no weight '${name}'${this.built ? '' : ' (the layer is not built yet)'}; ` +
          `weights: ${[...this.weightsByName.keys()].join(', ')}`);
    }
    return v;
  }

  private hidden(): number {
    return this.weightVariable('router_weight').shape[1] as number;
  }

  /** [in, out] of a LoRA target's weight (per expert for the experts), whatever the storage layout */
  private targetSizes(target: LoRATarget): [number, number] {
    const h = this.hidden();
    const i = this.intermediateSize;
    const is = this.sharedExpert?.intermediateSize ?? 0;
    switch (target) {
      case 'router': return [h, this.numExperts];
      case 'experts.gate_up': return [h, 2 * i];
      case 'experts.down': return [i, h];
      case 'shared.gate': case 'shared.up': return [h, is];
      case 'shared.down': return [is, h];
      case 'shared.sigmoid_gate': return [h, 1];
    }
  }

  // ---- LoRA state -------------------------------------------------------------------------

  /**
   * Adds a LoRA adapter (PEFT layouts) and makes it active alongside the active ones.
   * 'peft' init: A ~ U(±1/√in) (PEFT's kaiming-uniform), B = 0, so the model is unchanged;
   * 'random': both random (tests). Adding an adapter freezes the base weights, as PEFT does;
   * removing the last adapter gives them back the trainable flags they had before.
   * Targets: 'experts.gate_up', 'experts.down' (per-expert factors), 'router' and, on a layer with
   * a shared expert, 'shared.gate', 'shared.up', 'shared.down' and, when it is gated (Qwen2-MoE),
   * 'shared.sigmoid_gate' (plain 2-D factors). `ranks` / `alphas` give single targets their own.
   */
  addAdapter(config: LoRAAdapterConfig, init: 'peft' | 'random' = 'peft'): void {
    checkAdapterConfig('SparseMoE', config, [...this.adapters.keys(), ...this.pendingAdapters.map(a => a.name)],
        this.sharedExpert);
    if (!this.built) {
      this.pendingAdapters.push(copyAdapterConfig(config));
      this.active.push(config.name);
      return;
    }
    this.createAdapter(config, init);
    this.active.push(config.name);
  }

  private createAdapter(config: LoRAAdapterConfig, init: 'peft' | 'random'): void {
    const e = this.numExperts;
    const scalingOf = (r: number, alpha: number) => alpha / (config.rsLoRA ? Math.sqrt(r) : r);
    const state: AdapterState = {
      config: copyAdapterConfig(config),
      scaling: scalingOf(config.r, config.alpha),
      scalings: Object.fromEntries(config.targets.map(t => [t, scalingOf(targetRank(config, t), config.alphas?.[t] ?? config.alpha)])),
      factors: {},
    };
    // Outside build() tfjs applies no name scope: scope by hand like the base weights, so the
    // adapter's names are unique in a model and match the ones a reloaded model builds.
    const base = this.weightVariable('router_weight').originalName;
    const scope = !this.inBuild && base.startsWith(`${this.name}/`) ? `${this.name}/` : '';
    for (const target of config.targets) {
      const [inSize, outSize] = this.targetSizes(target);
      const r = targetRank(config, target);
      const rows = EXPERT_LORA_TARGETS.includes(target) ? r * e : r;
      const bound = 1 / Math.sqrt(inSize);
      const aInit = tfl.initializers.randomUniform({ minval: -bound, maxval: bound });
      const bInit = init === 'peft' ? tfl.initializers.zeros() : tfl.initializers.randomUniform({ minval: -bound, maxval: bound });
      const key = `${scope}lora_${config.name}_${TARGET_WEIGHT[target].replace('_weight', '')}`;
      state.factors[target] = {
        A: this.addWeight(`${key}_A`, [rows, inSize], 'float32', aInit, undefined, true),
        B: this.addWeight(`${key}_B`, [outSize, rows], 'float32', bInit, undefined, true),
      };
    }
    this.adapters.set(config.name, state);
    if (this.baseTrainable === null) this.baseTrainable = new Map([...this.weightsByName.values()].map(v => [v, v.trainable]));
    for (const v of this.weightsByName.values()) v.trainable = false;
  }

  /**
   * Removes an adapter (a pending one too) and disposes its variables. The base stays frozen while
   * other adapters exist; after the last one it is trainable again as it was before the first.
   */
  removeAdapter(name: string): void {
    const pending = this.pendingAdapters.findIndex(a => a.name === name);
    if (pending >= 0) {
      this.pendingAdapters.splice(pending, 1);
      this.active = this.active.filter(a => a !== name);
      return;
    }
    const state = this.adapterState(name, 'removeAdapter');
    if (this.merged.includes(name)) fail('SparseMoE.removeAdapter', `adapter '${name}' is merged; unmerge it first`);
    const vars = Object.values(state.factors).flatMap(f => [f!.A, f!.B]);
    // frees the names too, so an adapter of the same name can be added again
    releaseLayerVariables(this, vars);
    this.adapters.delete(name);
    if (this.adapters.size === 0 && this.baseTrainable !== null) {
      for (const [v, trainable] of this.baseTrainable) v.trainable = trainable;
      this.baseTrainable = null;
    }
    this.active = this.active.filter(a => a !== name);
  }

  adapterNames(): string[] {
    return [...this.adapters.keys(), ...this.pendingAdapters.map(a => a.name)];
  }

  /** An adapter's settings (a pending one's too), or undefined when there is none of that name. */
  adapterConfig(name: string): LoRAAdapterConfig | undefined {
    const cfg = this.adapters.get(name)?.config ?? this.pendingAdapters.find(a => a.name === name);
    return cfg === undefined ? undefined : copyAdapterConfig(cfg);
  }

  adapter(name: string): Readonly<AdapterState> {
    return this.adapterState(name, 'adapter');
  }

  private adapterState(name: string, method: string): AdapterState {
    const state = this.adapters.get(name);
    if (state === undefined) {
      fail(`SparseMoE.${method}`, `no adapter '${name}'${this.built ? '' : ' (build the layer first)'}; adapters: ${this.adapterNames().join(', ') || 'none'}`);
    }
    return state;
  }

  get activeAdapters(): readonly string[] { return [...this.active]; }

  setActiveAdapters(names: string[]): void {
    const known = this.adapterNames();
    const unknown = names.filter(n => !known.includes(n));
    if (unknown.length > 0) fail('SparseMoE.setActiveAdapters', `unknown adapters ${unknown.join(', ')}; adapters: ${known.join(', ') || 'none'}`);
    this.active = [...names];
  }

  get adaptersDisabled(): boolean { return this.disabled; }
  disableAdapters(): void { this.disabled = true; }
  enableAdapters(): void { this.disabled = false; }

  /** Runs fn with the adapters disabled (e.g. a base-model reference forward), restoring the state after. */
  withAdaptersDisabled<T>(fn: () => T): T {
    const before = this.disabled;
    this.disabled = true;
    try {
      return fn();
    } finally {
      this.disabled = before;
    }
  }

  get mergedAdapters(): readonly string[] { return [...this.merged]; }

  /** ΔW = scaling·B·A of one adapter on one target, in the stored weight's layout. */
  deltaWeight(name: string, target: LoRATarget): tf.Tensor {
    const state = this.adapterState(name, 'deltaWeight');
    const f = state.factors[target];
    if (f === undefined) fail('SparseMoE.deltaWeight', `adapter '${name}' does not target '${target}' (targets: ${state.config.targets.join(', ')})`);
    return tf.tidy(() => {
      const scaling = state.scalings[target]!;
      if (!EXPERT_LORA_TARGETS.includes(target)) return tf.mul(tf.matMul(f.B.read(), f.A.read()), scaling);
      return expertLoRADelta(f.A.read() as tf.Tensor2D, f.B.read() as tf.Tensor2D, scaling,
          this.numExperts, this.expertLayout === 'outIn' ? 'outIn' : 'inOut');
    });
  }

  /**
   * W += ΔW for every target of the adapter; a merged adapter is no longer applied separately.
   * Packed experts are decoded, merged in float32 and packed again, so the merged weight is
   * rounded to the stored precision (as PEFT's merge into a bf16 model is): unmergeAdapter then
   * gives back the base only up to that rounding.
   *
   * Quantized experts (int8, int4, nf4, nf4-dq, mxfp4) can only take the merge re-quantized, which can
   * lose much of a small delta: that needs `{requantize: true}`, and the largest change the
   * re-quantization made to any merged value (|requantized − (dequantized base + ΔW)|) is
   * returned so the caller can judge it. To keep the delta exactly, merge into a checkpoint
   * instead (mergeAdapterIntoCheckpoint with the same expertDtype writes the dequantized base plus
   * ΔW in bf16). Returns null when nothing was re-quantized.
   *
   * ```js
   * const change = layer.mergeAdapter('default', {requantize: true});  // nf4 experts: e.g. 0.004
   * ```
   */
  mergeAdapter(name: string, options: { requantize?: boolean } = {}): number | null {
    const state = this.adapterState(name, 'mergeAdapter');
    if (this.merged.includes(name)) fail('SparseMoE.mergeAdapter', `adapter '${name}' is already merged`);
    const quantized = isQuantizedKind(this.expertStorage) &&
        state.config.targets.some(t => EXPERT_LORA_TARGETS.includes(t));
    if (quantized && options.requantize !== true) {
      fail('SparseMoE.mergeAdapter', `adapter '${name}' targets the routed experts, which are quantized ` +
          `(${this.expertStorage}): merging re-quantizes them and may lose the delta; pass {requantize: true} to ` +
          "accept that (the largest change is returned), or merge into a checkpoint with mergeAdapterIntoCheckpoint, " +
          'which writes the dequantized base plus the delta in bf16');
    }
    this.assertRepackable('SparseMoE.mergeAdapter', name, state.config.targets);
    let change: number | null = null;
    for (const target of state.config.targets) {
      const c = this.addToWeight(TARGET_WEIGHT[target], this.deltaWeight(name, target), 1);
      if (c !== null) change = Math.max(change ?? 0, c);
    }
    this.merged.push(name);
    return change;
  }

  unmergeAdapter(name: string): void {
    const state = this.adapterState(name, 'unmergeAdapter');
    if (!this.merged.includes(name)) fail('SparseMoE.unmergeAdapter', `adapter '${name}' is not merged`);
    this.assertRepackable('SparseMoE.unmergeAdapter', name, state.config.targets);
    for (const target of state.config.targets) this.addToWeight(TARGET_WEIGHT[target], this.deltaWeight(name, target), -1);
    this.merged = this.merged.filter(m => m !== name);
  }

  /**
   * Re-packing a packed expert weight reads it to the host, synchronously here (merging is
   * synchronous): refused up front on a backend that cannot (webgpu), before anything changed.
   */
  private assertRepackable(op: string, name: string, targets: readonly LoRATarget[]): void {
    if (HOST_BACKENDS.includes(tf.getBackend())) return;
    const packed = targets.map(t => TARGET_WEIGHT[t]).find(w => packedVariables.has(this.weightVariable(w)));
    if (packed === undefined) return;
    fail(op, `adapter '${name}' adapts '${packed}', whose experts are stored packed (${this.expertStorage}): re-packing ` +
        `them reads them synchronously, which the ${tf.getBackend()} backend cannot do; load the model with ` +
        "expertDtype 'float32', or use mergeAdapterIntoCheckpoint (it writes the same bits)");
  }

  /**
   * W += sign·delta (delta disposed), re-packing a packed expert weight; returns the largest
   * change re-quantizing made (quantized experts), else null.
   */
  private addToWeight(weight: string, delta: tf.Tensor, sign: 1 | -1): number | null {
    const w = this.weightVariable(weight);
    const packed = packedVariables.get(w);
    let change: number | null = null;
    tf.tidy(() => {
      const sum = sign > 0 ? tf.add(variableFloat32(w), delta) : tf.sub(variableFloat32(w), delta);
      if (packed === undefined) {
        w.write(sum);
        return;
      }
      const repacked = packExpertWeight(sum as tf.Tensor3D, packed.kind, packed.options);
      if (isQuantizedKind(packed.kind)) change = tf.max(tf.abs(tf.sub(unpackExpertWeight(repacked), sum))).dataSync()[0];
      w.write(repacked.packed);
    });
    delta.dispose();
    return change;
  }

  /**
   * gate_up or down as the ops take it: a float32 tensor, or a PackedExpertWeight over the packed
   * variable's value (not a copy).
   */
  expertWeight(name: 'gate_up' | 'down'): ExpertWeightTensor {
    const v = this.weightVariable(name);
    return packedOf(v) ?? v.read() as tf.Tensor3D;
  }

  // ---- the block ---------------------------------------------------------------------------

  /** The adapters that change the output now: active, not merged, not disabled. */
  private appliedAdapters(): AdapterState[] {
    if (this.disabled) return [];
    return this.active.filter(n => !this.merged.includes(n)).map(n => this.adapterState(n, 'call'));
  }

  /**
   * The block's current weights as the ops take them (variables' values, applied adapters). In a
   * training pass an adapter with dropout carries it, seeded from the pass's dropoutSeed and the
   * target's name (as LinearLoRA seeds its projections), so a resumed run redraws the same masks.
   */
  blockWeights(): MoEBlockWeights {
    const v = (name: string) => this.weightsByName.get(name)?.read();
    const applied = this.appliedAdapters();
    const context = currentSequenceContext();
    const dropoutOf = (a: AdapterState, target: LoRATarget): { dropout?: LoRADropout } => {
      const p = a.config.dropout ?? 0;
      if (p === 0 || context?.training !== true) return {};
      const key = `${this.name}.${target}/${a.config.name}`;
      return { dropout: { p, seed: context.dropoutSeed === undefined ? undefined : dropoutSeedOf(context.dropoutSeed, key) } };
    };
    const factors = (target: LoRATarget): LoRAFactors[] => applied.flatMap(a => {
      const f = a.factors[target];
      return f ? [{ A: f.A.read() as tf.Tensor2D, B: f.B.read() as tf.Tensor2D, scaling: a.scalings[target]!, ...dropoutOf(a, target) }] : [];
    });
    const shared = this.sharedExpert ? {
      gate: v('shared_gate') as tf.Tensor2D, up: v('shared_up') as tf.Tensor2D, down: v('shared_down') as tf.Tensor2D,
      sigmoidGate: v('shared_expert_gate') as tf.Tensor2D | undefined,
      lora: {
        gate: factors('shared.gate'), up: factors('shared.up'), down: factors('shared.down'),
        ...(this.sharedExpert.gated ? { sigmoidGate: factors('shared.sigmoid_gate') } : {}),
      },
    } : undefined;
    return {
      router: {
        weight: v('router_weight') as tf.Tensor2D,
        bias: v('router_bias') as tf.Tensor1D | undefined,
        correctionBias: v('correction_bias') as tf.Tensor1D | undefined,
        lora: factors('router'),
      },
      experts: {
        layout: this.expertLayout,
        gateUp: this.expertWeight('gate_up'),
        down: this.expertWeight('down'),
        gateUpBias: v('gate_up_bias') as tf.Tensor2D | undefined,
        downBias: v('down_bias') as tf.Tensor2D | undefined,
        gateUpLoRA: factors('experts.gate_up'),
        downLoRA: factors('experts.down'),
      },
      shared,
    };
  }

  blockConfig(): MoEBlockConfig {
    const config: MoEBlockConfig = { routing: { ...this.routing }, activation: { ...this.activation } };
    if (this.weightedInput) config.weightedInput = true;
    return config;
  }

  override computeOutputShape(inputShape: tfl.Shape | tfl.Shape[]): tfl.Shape | tfl.Shape[] {
    return inputShape;
  }

  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      const h = x.shape[x.rank - 1];
      const weights = this.blockWeights();
      const expertsTrainable = this.trainable && this.weightVariable('gate_up').trainable;
      const { out } = moeBlock(tf.reshape(x, [-1, h]) as tf.Tensor2D, weights, this.blockConfig(), {
        expertKernel: this.expertKernel,
        loraMode: this.loraMode,
        trainExpertWeights: expertsTrainable,
      });
      return tf.reshape(out, x.shape);
    });
  }

  override getConfig(): tf.serialization.ConfigDict {
    const adapters = [...this.adapters.values()].map(a => ({ ...a.config }));
    return {
      ...super.getConfig(),
      numExperts: this.numExperts,
      intermediateSize: this.intermediateSize,
      routing: { ...this.routing },
      activation: { ...this.activation },
      expertLayout: this.expertLayout,
      expertBias: this.expertBias,
      routerBias: this.routerBias,
      correctionBias: this.correctionBias,
      // written only when set, so the configs of the other families stay as they were
      ...(this.weightedInput ? { weightedInput: true } : {}),
      sharedExpert: this.sharedExpert ? { ...this.sharedExpert } : null,
      expertKernel: this.expertKernel,
      loraMode: this.loraMode,
      initializerRange: this.initializerRange,
      expertStorage: this.expertStorage,
      ...(this.expertGroupSize !== null ? { expertGroupSize: this.expertGroupSize } : {}),
      // strings and keys that tfjs's save/load rewriting would change are protected
      // per-target ranks and alphas as lists beside targets: object keys would be rewritten too
      adapters: [...adapters, ...this.pendingAdapters].map(({ rsLoRA, ranks, alphas, ...a }) => ({
        ...a, rslora: rsLoRA ?? false, targets: a.targets.map(protectString),
        ...(ranks === undefined ? {} : { targetRanks: a.targets.map(t => ranks[t] ?? a.r) }),
        ...(alphas === undefined ? {} : { targetAlphas: a.targets.map(t => alphas[t] ?? a.alpha) }),
      })),
      activeAdapters: this.active.map(protectString),
      adaptersDisabled: this.disabled,
      mergedAdapters: this.merged.map(protectString),
    } as unknown as tf.serialization.ConfigDict;
  }
}
tf.serialization.registerClass(SparseMoE);
