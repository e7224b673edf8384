/**
 * The plugin entry point. `register(args)` validates the args (against the schema and against
 * every MoE layer of args.models) and throws one PluginArgsError listing every problem before
 * touching anything; then registers this package's kernels for the active backend; then patches
 * every registered MoE layer class (class level: layers created or loaded later take the fused
 * path too) and adds the LoRA adapter to the MoE layers of args.models.
 *
 * There is one registration at a time: calling register() again re-validates, updates the
 * options, patches classes registered since and prepares new models, never wrapping twice.
 * `unregister()` (on any handle of the registration) restores the original `call` methods, removes
 * the adapters register() added (not the user's own) and restores their layers' trainable flags.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { PluginArgsError, type PluginArgsProblem } from './args/errors.js';
import type { PluginArgs, ResolvedPluginArgs } from './args/schema.js';
import { collectArgProblems, type PartialResolvedArgs } from './args/validate.js';
import { moeKernelNames, registerMoEKernels } from './backends/register_all_kernels.js';
import type { ExpertKernel, RoutingKind } from './ops/types.js';
import { allDescriptors, onDescriptorChange, type ResolvedDescriptor } from './patch/descriptor.js';
import { findMoELayers } from './patch/find_layers.js';
import { LORA_TARGETS, SparseMoE } from './layers/sparse_moe.js';
import { planLinearLoRA } from './patch/linear_targets.js';
import { checkMoELayers } from './patch/model_rules.js';
import {
  patchLayerClass, restoreLayerClass, setPatchOptions, type ClassPatch, type PatchOptions,
} from './patch/patch_class.js';

/** Backends with the kernels the fused path needs (tfjs-node registers as 'tensorflow'). */
export const FUSED_BACKENDS: readonly string[] = ['cpu', 'wasm', 'webgpu', 'webgl', 'tensorflow'];

export interface PatchedLayer {
  /** the layer's name */
  layer: string;
  className: string;
  /** the routing family */
  routing: RoutingKind;
  /** the block implementation its call runs now */
  kernel: ExpertKernel;
  /** the LoRA adapter the args asked for, or null without lora */
  adapter: string | null;
  /** true when this register() call added the adapter (unregister() removes it) */
  adapterAdded: boolean;
}

export interface PluginHandle {
  /** the MoE layers of args.models */
  patched: PatchedLayer[];
  /** the classes whose call is patched (every instance, also later ones) */
  patchedClasses: string[];
  /** this package's kernels in place for the backend */
  kernels: string[];
  backend: string;
  /** the block implementation the patched layers run: args.expertKernel, or 'reference' after a fallback */
  expertKernel: ExpertKernel;
  /** false once unregister() ran */
  readonly active: boolean;
  /** restores the original methods and removes the adapters register() added; a second call does nothing */
  unregister(): void;
}

interface AddedAdapter {
  layer: tfl.layers.Layer;
  name: string;
  /** removes the adapter from the layer when it is still there */
  remove: () => void;
  /** the layer's weights and their trainable flags before the adapter froze them */
  trainable: Array<[tfl.LayerVariable, boolean]>;
}

interface Session {
  options: PatchOptions;
  classPatches: ClassPatch[];
  adapters: AddedAdapter[];
  /** the models' other weights frozen for LoRA training, with their flags before */
  frozen: Array<[tfl.LayerVariable, boolean]>;
  warnedFallback: boolean;
  stopListening: () => void;
}

let session: Session | null = null;

function backendProblem(args: PartialResolvedArgs, backend: string): PluginArgsProblem | undefined {
  if (args.expertKernel !== 'fused' || args.strict !== true || FUSED_BACKENDS.includes(backend)) return undefined;
  return {
    arg: 'expertKernel',
    message: `expertKernel: expected an active backend with the fused kernels (${FUSED_BACKENDS.join(', ')}) for ` +
        `'fused' but the active backend is '${backend}' (strict: true; use expertKernel 'reference', or ` +
        'strict: false to fall back to it with a warning)',
  };
}

function patchClassInto(s: Session, d: ResolvedDescriptor): ClassPatch | undefined {
  if (s.classPatches.some(p => p.layerClass === d.layerClass)) return undefined;
  const patch = patchLayerClass(d.layerClass, d.className);
  if (patch !== undefined) s.classPatches.push(patch);
  return patch;
}

function dropClassPatch(s: Session, patch: ClassPatch): void {
  restoreLayerClass(patch);
  s.classPatches.splice(s.classPatches.indexOf(patch), 1);
}

function removeAddedAdapter(added: AddedAdapter): void {
  try {
    added.remove();
  } finally {
    for (const [v, trainable] of added.trainable) v.trainable = trainable;
  }
}

function startSession(): Session {
  const s: Session = {
    options: { expertKernel: 'fused', loraMode: 'auto' }, classPatches: [], adapters: [], frozen: [], warnedFallback: false,
    stopListening: () => {},
  };
  // descriptors registered or removed while the plugin is in effect patch or restore their class at once
  s.stopListening = onDescriptorChange((event, d) => {
    if (event === 'added') {
      patchClassInto(s, d);
      return;
    }
    if (allDescriptors().some(other => other.layerClass === d.layerClass)) return;
    const patch = s.classPatches.find(p => p.layerClass === d.layerClass);
    if (patch !== undefined) dropClassPatch(s, patch);
  });
  return s;
}

/** Restores everything a registration did, going on after a failing step; rethrows the first error. */
function endSession(s: Session): void {
  const errors: unknown[] = [];
  const attempt = (fn: () => void) => { try { fn(); } catch (err) { errors.push(err); } };
  setPatchOptions(null);
  attempt(s.stopListening);
  for (const added of [...s.adapters].reverse()) attempt(() => removeAddedAdapter(added));
  for (const [v, trainable] of s.frozen) attempt(() => { v.trainable = trainable; });
  s.frozen = [];
  for (const patch of [...s.classPatches].reverse()) attempt(() => restoreLayerClass(patch));
  s.adapters = [];
  s.classPatches = [];
  if (errors.length > 0) throw errors[0];
}

/**
 * Validates `args`, registers the kernels for the active backend and patches the MoE layers.
 * Throws a PluginArgsError (one line per problem) before changing anything when the args are bad.
 *
 * ```js
 * const model = await tf.loadLayersModel('file://model/model.json');
 * const handle = register({models: [model], lora: {r: 8, alpha: 16, targets: ['experts.gate_up', 'experts.down', 'router']}});
 * handle.patched;     // [{layer: 'moe_1', className: 'SparseMoE', routing: 'softmaxTopK', kernel: 'fused', ...}]
 * // ... train model.trainableWeights (the LoRA tensors of the MoE layers) ...
 * handle.unregister();
 * ```
 */
export function register(args: PluginArgs = {}): PluginHandle {
  // 1. validate: every problem, nothing changed yet
  const { problems, resolved } = collectArgProblems(args);
  const backend = tf.getBackend();
  const bad = backendProblem(resolved, backend);
  if (bad !== undefined) problems.push(bad);
  const { found, layersPerModel } = findMoELayers(resolved.models ?? []);
  const checked = checkMoELayers(found, layersPerModel, resolved);
  problems.push(...checked.problems);
  // attention / dense-MLP / shared-expert modules named as PEFT names them, and the patterns
  const l = resolved.lora;
  const linearPlan = l != null && l.r !== undefined && l.alpha !== undefined && l.targets !== undefined ?
    planLinearLoRA(resolved.models ?? [], { ...l, r: l.r, alpha: l.alpha, targets: l.targets }) : null;
  if (linearPlan !== null) problems.push(...linearPlan.problems);
  if (problems.length > 0) throw new PluginArgsError(problems);
  const a = resolved as ResolvedPluginArgs;

  // 2. kernels for the active backend
  registerMoEKernels(backend);
  const kernels = moeKernelNames(backend).filter(k => tf.getKernel(k, backend) != null);

  // 3. patch; on a throw half-way, undo what this call did (an earlier register()'s work stays)
  const fallback = a.expertKernel === 'fused' && !FUSED_BACKENDS.includes(backend);
  const options: PatchOptions = { expertKernel: fallback ? 'reference' : a.expertKernel, loraMode: a.loraMode };
  const fresh = session === null;
  const s = session ?? startSession();
  const undo: Array<() => void> = [];
  let done = false;
  try {
    for (const d of allDescriptors()) {
      const patch = patchClassInto(s, d);
      if (patch !== undefined) undo.push(() => dropClassPatch(s, patch));
    }
    const patched: PatchedLayer[] = [];
    for (const f of found) {
      let adapterAdded = false;
      const lora = f.descriptor.lora!;
      // a SparseMoE's targets, ranks and alphas come from the plan (module names, all-linear, patterns)
      const moePlan = f.layer instanceof SparseMoE ? linearPlan?.moe.get(f.layer) : undefined;
      const targets = a.lora === null ? [] : moePlan?.targets ?? LORA_TARGETS.filter(t => a.lora!.targets.includes(t));
      if (a.lora !== null && targets.length > 0 && !lora.adapterNames(f.layer).includes(a.lora.adapterName)) {
        const name = a.lora.adapterName;
        const added: AddedAdapter = {
          layer: f.layer, name,
          remove: () => { if (lora.adapterNames(f.layer).includes(name)) lora.remove(f.layer, name); },
          trainable: f.layer.weights.map((v): [tfl.LayerVariable, boolean] => [v, v.trainable]),
        };
        const own = moePlan === undefined ? {} : {
          ...(Object.keys(moePlan.ranks).length > 0 ? { ranks: moePlan.ranks } : {}),
          ...(Object.keys(moePlan.alphas).length > 0 ? { alphas: moePlan.alphas } : {}),
        };
        lora.add(f.layer, { name, r: a.lora.r, alpha: a.lora.alpha, rsLoRA: a.lora.rsLoRA, targets, dropout: a.lora.dropout, ...own });
        s.adapters.push(added);
        undo.push(() => { s.adapters.splice(s.adapters.indexOf(added), 1); removeAddedAdapter(added); });
        // the weights the layer had before the adapter are its base: frozen while the adapter trains
        for (const [v] of added.trainable) v.trainable = false;
        adapterAdded = true;
      }
      patched.push({
        layer: f.layer.name, className: f.descriptor.className, routing: checked.infos.get(f)!.routing.kind,
        kernel: options.expertKernel, adapter: a.lora?.adapterName ?? null, adapterAdded,
      });
    }
    // LoRA on attention and dense-MLP projections: the layer's LinearLoRA state
    const adapterWeights = new Set<tfl.LayerVariable>();
    for (const { layer, modules } of a.lora === null ? [] : linearPlan!.linear) {
      const name = a.lora!.adapterName;
      if (!layer.lora.names().includes(name)) {
        const added: AddedAdapter = {
          layer, name,
          remove: () => { if (layer.lora.names().includes(name)) layer.lora.remove(name); },
          trainable: layer.weights.map((v): [tfl.LayerVariable, boolean] => [v, v.trainable]),
        };
        layer.lora.add({ name, modules, rsLoRA: a.lora!.rsLoRA, dropout: a.lora!.dropout });
        s.adapters.push(added);
        undo.push(() => { s.adapters.splice(s.adapters.indexOf(added), 1); removeAddedAdapter(added); });
      }
      for (const f of Object.values(layer.lora.factors(name))) adapterWeights.add(f.A).add(f.B);
    }
    // As PEFT does, LoRA training trains the adapters only: every other weight (attention,
    // embeddings, norms, and the MoE layers the targets leave out, e.g. attention-only LoRA) is
    // frozen until unregister(); a MoE or linear layer froze its own base when its adapter was added.
    if (a.lora !== null) {
      const adapted = found.filter(f => f.descriptor.lora!.adapterNames(f.layer).includes(a.lora!.adapterName));
      const moeWeights = new Set([...adapted.flatMap(f => f.layer.weights), ...adapterWeights]);
      const others = (resolved.models ?? []).flatMap(m => m.weights)
          .filter(v => v.trainable && !moeWeights.has(v) && !s.frozen.some(([w]) => w === v));
      const before = others.map((v): [tfl.LayerVariable, boolean] => [v, v.trainable]);
      s.frozen.push(...before);
      undo.push(() => {
        for (const [v, trainable] of before) v.trainable = trainable;
        s.frozen = s.frozen.filter(entry => !before.includes(entry));
      });
      for (const v of others) v.trainable = false;
    }
    s.options = options;
    setPatchOptions(options);
    session = s;
    if (fallback && !s.warnedFallback) {
      s.warnedFallback = true;
      console.warn(`tfjs-moe-lora: backend '${backend}' has no fused MoE kernels; the MoE layers run the composed ` +
          "'reference' path (pass strict: true to make this an error)");
    }
    done = true;
    return {
      patched,
      patchedClasses: s.classPatches.map(p => p.className),
      kernels,
      backend,
      expertKernel: options.expertKernel,
      get active() { return session === s; },
      unregister() {
        if (session !== s) return;
        session = null;
        endSession(s);
      },
    };
  } finally {
    if (!done) {
      for (const u of undo.reverse()) {
        try { u(); } catch { /* keep undoing the rest; the original error is the one to report */ }
      }
      if (fresh) s.stopListening();
    }
  }
}

/** Ends the current registration, if any: the same as its handle's unregister(). */
export function unregister(): void {
  if (session === null) return;
  const s = session;
  session = null;
  endSession(s);
}

/** Whether register() is in effect. */
export function isRegistered(): boolean {
  return session !== null;
}
