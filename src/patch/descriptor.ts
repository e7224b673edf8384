/**
 * MoE layer descriptors, like PEFT's dispatchers: each says how to recognise an MoE layer class
 * and how to read its router/expert weights and routing config as the ops take them. The plugin
 * patches the `call` of every described class; the first descriptor that matches a layer wins.
 * User descriptors (registerMoELayerDescriptor) come before the built-in one for SparseMoE, so a
 * user can also take over SparseMoE subclasses.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import type { LoRAAdapterConfig, LoRATarget } from '../layers/sparse_moe.js';
import type { MoEBlockConfig, MoEBlockWeights, RoutingConfig } from '../ops/types.js';
import { fail } from '../ops/validate.js';
import { SPARSE_MOE_DESCRIPTOR } from './sparse_moe_descriptor.js';

/** What the validation rules need to know about one MoE layer. */
export interface MoELayerInfo {
  /** E */
  numExperts: number;
  /** H; null while the layer is not built */
  hidden: number | null;
  /** I, per expert */
  intermediateSize: number;
  /** I_s of the shared expert; null when the layer has none */
  sharedIntermediateSize: number | null;
  /** whether the shared expert's output is scaled by a sigmoid gate (Qwen2-MoE); absent: not */
  sharedGated?: boolean;
  routing: RoutingConfig;
}

/** The LoRA state of a layer: what `register()` uses to add an adapter and `unregister()` to remove it. */
export interface MoELoRAHooks<L extends tfl.layers.Layer = tfl.layers.Layer> {
  /** the targets this layer class supports */
  targets: readonly LoRATarget[];
  /** the names of the adapters the layer holds */
  adapterNames(layer: L): string[];
  /** an existing adapter's settings, so that a mismatch with the args is reported */
  adapterConfig?(layer: L, name: string): LoRAAdapterConfig | undefined;
  /** adds the adapter (B = 0: the output does not change) and makes it active */
  add(layer: L, config: LoRAAdapterConfig): void;
  /** removes it again (unmerging first if it was merged) and disposes its variables */
  remove(layer: L, name: string): void;
}

/** The constructor of a Layer class (its prototype's `call` is what gets patched). */
export type LayerClass = abstract new (...args: never[]) => tfl.layers.Layer;

export interface MoELayerDescriptor<L extends tfl.layers.Layer = tfl.layers.Layer> {
  /** the class name, as reported in the register() handle (usually the class's static className) */
  className: string;
  /**
   * the class whose `prototype.call` is patched; default: the class registered with
   * tf.serialization.registerClass under `className`
   */
  layerClass?: LayerClass;
  /** true for the layers this descriptor handles (e.g. `layer instanceof MyMoE`) */
  matches(layer: tfl.layers.Layer): boolean;
  /**
   * The block's current weights as the ops take them (MoEBlockWeights layouts). Runs inside the
   * patched call's tf.tidy: it may build tensors from the layer's variables (transpose, concat),
   * and gradients flow back to the variables through them.
   */
  getBlockWeights(layer: L): MoEBlockWeights;
  getBlockConfig(layer: L): MoEBlockConfig;
  /** default: read from getBlockWeights / getBlockConfig (needs a built layer) */
  describe?(layer: L): MoELayerInfo;
  /** moeBlock's trainExpertWeights; default: moeBlock's own default (true unless expert LoRA is on) */
  trainExpertWeights?(layer: L): boolean;
  /** the block's input from call()'s inputs; default: the first tensor */
  input?(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor;
  /** absent: the layer takes no LoRA adapter from register() */
  lora?: MoELoRAHooks<L>;
}

/** A registered descriptor with its class resolved. */
export interface ResolvedDescriptor extends MoELayerDescriptor {
  layerClass: LayerClass;
  builtIn: boolean;
}

const userDescriptors: ResolvedDescriptor[] = [];
const builtInDescriptors: ResolvedDescriptor[] = [];

type Listener = (event: 'added' | 'removed', descriptor: ResolvedDescriptor) => void;
const listeners = new Set<Listener>();

/** Called when a descriptor is added or removed (the plugin patches or restores its class then). */
export function onDescriptorChange(listener: Listener): () => void {
  listeners.add(listener);
  return () => { listeners.delete(listener); };
}

function resolveClass(op: string, d: MoELayerDescriptor): LayerClass {
  if (d.layerClass !== undefined) {
    if (typeof d.layerClass !== 'function' || typeof d.layerClass.prototype?.call !== 'function') {
      fail(op, `'layerClass' must be a tf.layers.Layer subclass but got ${String(d.layerClass)}`);
    }
    return d.layerClass;
  }
  const map = tf.serialization.SerializationMap.getMap().classNameMap;
  const entry = map[d.className] ??
      Object.values(map).find(([cls]) => (cls as unknown as { className?: string }).className === d.className);
  if (entry === undefined) {
    fail(op, `'layerClass' is not given and no class named '${d.className}' is registered with ` +
        'tf.serialization.registerClass; pass the class as layerClass');
  }
  return entry[0] as unknown as LayerClass;
}

function checkDescriptor(op: string, d: MoELayerDescriptor): void {
  if (d == null || typeof d !== 'object') fail(op, `'descriptor' must be an object but got ${String(d)}`);
  if (typeof d.className !== 'string' || d.className.length === 0) {
    fail(op, `'className' must be a non-empty string but got ${String(d.className)}`);
  }
  for (const fn of ['matches', 'getBlockWeights', 'getBlockConfig'] as const) {
    if (typeof d[fn] !== 'function') fail(op, `'${fn}' must be a function but got ${typeof d[fn]}`);
  }
  for (const fn of ['describe', 'trainExpertWeights', 'input'] as const) {
    if (d[fn] !== undefined && typeof d[fn] !== 'function') fail(op, `'${fn}' must be a function but got ${typeof d[fn]}`);
  }
  if (d.lora !== undefined) {
    if (d.lora === null || typeof d.lora !== 'object') fail(op, `'lora' must be an object of LoRA hooks but got ${String(d.lora)}`);
    if (!Array.isArray(d.lora.targets)) fail(op, `'lora.targets' must be an array but got ${typeof d.lora.targets}`);
    for (const fn of ['adapterNames', 'add', 'remove'] as const) {
      if (typeof d.lora[fn] !== 'function') fail(op, `'lora.${fn}' must be a function but got ${typeof d.lora[fn]}`);
    }
  }
}

/** Adds a built-in descriptor (after every user one). */
export function addBuiltInDescriptor(d: MoELayerDescriptor): void {
  checkDescriptor('addBuiltInDescriptor', d);
  builtInDescriptors.push({ ...d, layerClass: resolveClass('addBuiltInDescriptor', d), builtIn: true });
}

/**
 * Makes a user's MoE layer class patchable by `register()` — the TF.js analogue of a per-model-type
 * table. If the plugin is registered already, the class is patched at once. Returns a function
 * that removes the descriptor again (and restores the class if it was patched for it).
 *
 * ```js
 * const remove = registerMoELayerDescriptor({
 *   className: 'MyMoE', layerClass: MyMoE, matches: l => l instanceof MyMoE,
 *   getBlockWeights: l => ({router: {weight: tf.transpose(l.routerKernel.read())}, experts: {...}}),
 *   getBlockConfig: l => ({routing: {kind: 'softmaxTopK', topK: l.k, renormalize: true}, activation: {kind: 'swiglu'}}),
 * });
 * ```
 */
export function registerMoELayerDescriptor<L extends tfl.layers.Layer>(descriptor: MoELayerDescriptor<L>): () => void {
  const op = 'registerMoELayerDescriptor';
  const d = descriptor as unknown as MoELayerDescriptor;
  checkDescriptor(op, d);
  const taken = allDescriptors().find(x => x.className === d.className);
  if (taken !== undefined) {
    fail(op, `a descriptor for '${d.className}' is already registered${taken.builtIn ? ' (built in)' : ''}; ` +
        'remove it first (call the function registerMoELayerDescriptor returned)');
  }
  const resolved: ResolvedDescriptor = { ...d, layerClass: resolveClass(op, d), builtIn: false };
  userDescriptors.push(resolved);
  listeners.forEach(l => l('added', resolved));
  let removed = false;
  return () => {
    if (removed) return;
    removed = true;
    userDescriptors.splice(userDescriptors.indexOf(resolved), 1);
    listeners.forEach(l => l('removed', resolved));
  };
}

/** Every descriptor in match order: user ones (in registration order), then the built-in ones. */
export function allDescriptors(): ResolvedDescriptor[] {
  return [...userDescriptors, ...builtInDescriptors];
}

/** The first descriptor that matches the layer, or undefined. */
export function findMoELayerDescriptor(layer: tfl.layers.Layer): ResolvedDescriptor | undefined {
  return allDescriptors().find(d => d.matches(layer));
}

/** The layer's info, from the descriptor's describe() or read off its block weights. */
export function describeMoELayer(d: MoELayerDescriptor, layer: tfl.layers.Layer): MoELayerInfo {
  if (d.describe) return d.describe(layer);
  let info: MoELayerInfo | undefined;
  tf.tidy(() => {
    const w = d.getBlockWeights(layer);
    const config = d.getBlockConfig(layer);
    const [numExperts, hidden] = w.router.weight.shape;
    const down = w.experts.down.shape;
    info = {
      numExperts, hidden,
      intermediateSize: (w.experts.layout ?? 'outIn') !== 'outIn' ? down[1] : down[2],
      sharedIntermediateSize: w.shared ? w.shared.gate.shape[0] : null,
      sharedGated: w.shared?.sigmoidGate !== undefined,
      routing: { ...config.routing },
    };
  });
  return info!;
}

addBuiltInDescriptor(SPARSE_MOE_DESCRIPTOR as unknown as MoELayerDescriptor);
