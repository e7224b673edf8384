/**
 * Class-level patching: a registered MoE layer class's `prototype.call` is replaced by a wrapper
 * that runs the block through moeBlock with the plugin's kernel, so every instance — also those
 * created or loaded after register() — takes the fused path. The wrapper carries a symbol with
 * the original method, which makes patching idempotent and restoring exact.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { moeBlock } from '../ops/moe_block.js';
import type { ExpertKernel, LoRAMode } from '../ops/types.js';
import { findMoELayerDescriptor, type LayerClass, type ResolvedDescriptor } from './descriptor.js';

type CallFn = (this: tfl.layers.Layer, inputs: tf.Tensor | tf.Tensor[], kwargs: Record<string, unknown>) => tf.Tensor | tf.Tensor[];

/** Marks a wrapper; its value is the method the wrapper replaced. */
export const PATCHED_CALL = Symbol.for('tfjs-moe-lora.patchedCall');

interface PatchMark {
  original: CallFn;
  className: string;
}

/** What the wrappers run while the plugin is registered; null: they call the original method. */
export interface PatchOptions {
  expertKernel: ExpertKernel;
  loraMode: LoRAMode;
}

let activeOptions: PatchOptions | null = null;

export function setPatchOptions(options: PatchOptions | null): void {
  activeOptions = options === null ? null : { ...options };
}

export function patchOptions(): PatchOptions | null {
  return activeOptions === null ? null : { ...activeOptions };
}

/** The block through moeBlock, on [..., H] inputs flattened to [T, H]. */
export function runPatchedBlock(
    layer: tfl.layers.Layer, d: ResolvedDescriptor, inputs: tf.Tensor | tf.Tensor[], options: PatchOptions): tf.Tensor {
  return tf.tidy(() => {
    const x = d.input ? d.input(inputs) : Array.isArray(inputs) ? inputs[0] : inputs;
    const h = x.shape[x.rank - 1];
    const { out } = moeBlock(tf.reshape(x, [-1, h]) as tf.Tensor2D, d.getBlockWeights(layer), d.getBlockConfig(layer), {
      expertKernel: options.expertKernel,
      loraMode: options.loraMode,
      trainExpertWeights: d.trainExpertWeights?.(layer),
    });
    return tf.reshape(out, x.shape);
  });
}

function makeWrapper(original: CallFn, className: string): CallFn {
  const wrapper = function patchedMoECall(this: tfl.layers.Layer, inputs: tf.Tensor | tf.Tensor[], kwargs: Record<string, unknown>) {
    const options = activeOptions;
    const d = options === null ? undefined : findMoELayerDescriptor(this);
    if (options === null || d === undefined) return original.call(this, inputs, kwargs);
    return runPatchedBlock(this, d, inputs, options);
  };
  Object.defineProperty(wrapper, PATCHED_CALL, { value: { original, className } satisfies PatchMark });
  return wrapper;
}

/** The method a wrapper replaced, or undefined when `fn` is no wrapper. */
export function unwrapCall(fn: unknown): CallFn | undefined {
  return typeof fn === 'function' ? (fn as unknown as Record<symbol, PatchMark | undefined>)[PATCHED_CALL]?.original : undefined;
}

/** Undoes one class patch. */
export interface ClassPatch {
  layerClass: LayerClass;
  className: string;
  /** the prototype's own `call` property as it was; undefined: it inherited `call` (restoring deletes the wrapper) */
  ownProperty: PropertyDescriptor | undefined;
  original: CallFn;
  wrapper: CallFn;
}

/**
 * Replaces `layerClass.prototype.call` with a wrapper. Returns undefined when the method it would
 * use is a wrapper already (the class or an ancestor is patched): never double-wraps.
 */
export function patchLayerClass(layerClass: LayerClass, className: string): ClassPatch | undefined {
  const proto = layerClass.prototype as unknown as { call: CallFn };
  const current = proto.call;
  if (unwrapCall(current) !== undefined) return undefined;
  const ownProperty = Object.getOwnPropertyDescriptor(proto, 'call');
  const wrapper = makeWrapper(current, className);
  Object.defineProperty(proto, 'call', {
    value: wrapper, writable: true, configurable: true, enumerable: ownProperty?.enumerable ?? false,
  });
  return { layerClass, className, ownProperty, original: current, wrapper };
}

/**
 * Puts the original method back. A `call` replaced by someone else after the patch is left
 * alone (returns false): restoring would drop their change.
 */
export function restoreLayerClass(patch: ClassPatch): boolean {
  const proto = patch.layerClass.prototype as unknown as Record<string, unknown>;
  if (!Object.prototype.hasOwnProperty.call(proto, 'call') || proto.call !== patch.wrapper) return false;
  if (patch.ownProperty !== undefined) Object.defineProperty(proto, 'call', patch.ownProperty);
  else delete proto.call;
  return true;
}
