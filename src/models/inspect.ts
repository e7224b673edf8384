/**
 * What a model's MoE layers are, as data: routing family and kind, sizes, shared expert, LoRA
 * adapters, parameter counts, and whether `register()` has patched them in this process. The
 * CLI's `inspect` prints it; anything else can use it to check a model before training.
 */
import type * as tfl from '@tensorflow/tfjs-layers';
import { EXPERT_LORA_TARGETS, SparseMoE, variableShape, type LoRAAdapterConfig, type LoRATarget } from '../layers/sparse_moe.js';
import { decoderLayerIndex, hfConfigOf } from '../layers/moe_causal_lm.js';
import type { ExpertKernel, RoutingConfig } from '../ops/types.js';
import { describeMoELayer } from '../patch/descriptor.js';
import { findMoELayers } from '../patch/find_layers.js';
import { patchOptions, unwrapCall } from '../patch/patch_class.js';
import { isRegistered } from '../plugin.js';

export interface AdapterReport {
  name: string;
  r: number;
  alpha: number;
  rsLoRA: boolean;
  /** alpha / r, or alpha / √r with rsLoRA */
  scaling: number;
  targets: LoRATarget[];
  /** in the layer's active set (null: the layer class does not say) */
  active: boolean | null;
  /** folded into the base weights (null: the layer class does not say) */
  merged: boolean | null;
  /** the adapter's A and B elements on this layer */
  params: number;
}

export interface MoELayerReport {
  /** the layer's name ('model.layers.0.mlp') */
  name: string;
  /** the class the descriptor handles ('SparseMoE') */
  className: string;
  /** the decoder layer index read from the name, or null */
  decoderLayer: number | null;
  /** the HF model_type of the model the layer belongs to, or null when the model has no HF config */
  family: string | null;
  routing: RoutingConfig;
  /** E */
  experts: number;
  /** K */
  topK: number;
  /** H (null while the layer is not built) */
  hidden: number | null;
  /** I, per expert */
  intermediate: number;
  /** the shared expert: its I_s and whether a sigmoid gate scales it (null: the class does not say) */
  sharedExpert: { intermediate: number; gated: boolean | null } | null;
  adapters: AdapterReport[];
  /** adapters switched off as a whole (null: the class does not say) */
  adaptersDisabled: boolean | null;
  /** parameter elements: the base weights, the adapters, both */
  params: { base: number; lora: number; total: number };
  /** whether the plugin's wrapper runs this layer's call now (register() in effect for its class) */
  patched: boolean;
  /** the block implementation a call runs now; null: the class's own call, which this package does not know */
  kernel: ExpertKernel | null;
}

export interface ModelReport {
  name: string;
  /** the HF model_type, or null */
  modelType: string | null;
  /** whether register() is in effect in this process */
  registered: boolean;
  moeLayers: MoELayerReport[];
  totals: {
    moeLayers: number;
    /** every weight of the model */
    params: number;
    /** weights that train now (trainable layer and weight) */
    trainableParams: number;
    /** base weights of the MoE layers */
    moeParams: number;
    /** every adapter on every MoE layer */
    loraParams: number;
    /** adapter names across the layers, in first-seen order */
    adapters: string[];
  };
}

const size = (shape: readonly (number | null)[]) => shape.reduce<number>((n, d) => n * (d ?? 0), 1);
// logical shapes: packed 16-bit experts count their [E, rows, cols] values, not their int32 words
const count = (vars: readonly tfl.LayerVariable[]) => vars.reduce((n, v) => n + size(variableShape(v)), 0);

/** A / B sizes of one adapter target per PEFT's layouts (src/ops/README.md), for layer classes without variables to count. */
function targetParams(target: LoRATarget, r: number, e: number, h: number, i: number, is: number): number {
  const experts = EXPERT_LORA_TARGETS.includes(target);
  const [inSize, outSize] = ({
    'experts.gate_up': [h, 2 * i], 'experts.down': [i, h], router: [h, e],
    'shared.gate': [h, is], 'shared.up': [h, is], 'shared.down': [is, h], 'shared.sigmoid_gate': [h, 1],
  } as Record<LoRATarget, [number, number]>)[target];
  const rows = experts ? r * e : r;
  return rows * (inSize + outSize);
}

function adapterReport(cfg: LoRAAdapterConfig, params: number, active: boolean | null, merged: boolean | null): AdapterReport {
  const rsLoRA = cfg.rsLoRA ?? false;
  return {
    name: cfg.name, r: cfg.r, alpha: cfg.alpha, rsLoRA,
    scaling: cfg.alpha / (rsLoRA ? Math.sqrt(cfg.r) : cfg.r),
    targets: [...cfg.targets], active, merged, params,
  };
}

/** The kernel the patch wrapper runs for this layer now, or null when its own call runs. */
function patchedKernel(layer: tfl.layers.Layer): ExpertKernel | null {
  const options = patchOptions();
  const call = (layer as unknown as { call: unknown }).call;
  return options !== null && isRegistered() && unwrapCall(call) !== undefined ? options.expertKernel : null;
}

/**
 * The report for every MoE layer of `model` (those a registered descriptor matches, nested models
 * included), with totals.
 *
 * ```js
 * const report = inspectModel(await loadHFCheckpoint('./my-moe'));
 * report.moeLayers[0];  // {name: 'model.layers.0.mlp', routing: {kind: 'softmaxTopK', topK: 2, ...}, experts: 8, ...}
 * ```
 */
export function inspectModel(model: tfl.LayersModel): ModelReport {
  const hf = hfConfigOf(model);
  const modelType = typeof hf?.['model_type'] === 'string' ? hf['model_type'] as string : null;
  const { found } = findMoELayers([model]);
  const layers = found.map(({ layer, descriptor }): MoELayerReport => {
    const info = describeMoELayer(descriptor, layer);
    const kernel = patchedKernel(layer);
    let adapters: AdapterReport[];
    let lora: number;
    let sharedExpert: MoELayerReport['sharedExpert'] = info.sharedIntermediateSize === null ? null :
      { intermediate: info.sharedIntermediateSize, gated: null };
    let adaptersDisabled: boolean | null = null;
    if (layer instanceof SparseMoE) {
      adapters = layer.adapterNames().map(name => {
        const cfg = layer.adapterConfig(name)!;
        // a pending adapter (layer not built) has no variables yet
        const factors = layer.built ? Object.values(layer.adapter(name).factors) : [];
        return adapterReport(cfg, count(factors.flatMap(f => [f!.A, f!.B])),
            layer.activeAdapters.includes(name), layer.mergedAdapters.includes(name));
      });
      lora = adapters.reduce((n, a) => n + a.params, 0);
      if (layer.sharedExpert !== null) {
        sharedExpert = { intermediate: layer.sharedExpert.intermediateSize, gated: layer.sharedExpert.gated };
      }
      adaptersDisabled = layer.adaptersDisabled;
    } else {
      const hooks = descriptor.lora;
      const names = hooks?.adapterNames(layer) ?? [];
      adapters = names.flatMap(name => {
        const cfg = hooks?.adapterConfig?.(layer, name);
        if (cfg === undefined) return [];
        const params = info.hidden === null ? 0 : cfg.targets.reduce((n, t) =>
          n + targetParams(t, cfg.ranks?.[t] ?? cfg.r, info.numExperts, info.hidden!, info.intermediateSize, info.sharedIntermediateSize ?? 0), 0);
        return [adapterReport(cfg, params, null, null)];
      });
      lora = adapters.reduce((n, a) => n + a.params, 0);
    }
    const total = count(layer.weights);
    return {
      name: layer.name,
      className: descriptor.className,
      decoderLayer: decoderLayerIndex(layer.name),
      family: modelType,
      routing: { ...info.routing },
      experts: info.numExperts,
      topK: info.routing.topK,
      hidden: info.hidden,
      intermediate: info.intermediateSize,
      sharedExpert,
      adapters,
      adaptersDisabled,
      params: { base: total - lora, lora, total },
      patched: kernel !== null,
      kernel: kernel ?? (layer instanceof SparseMoE ? layer.expertKernel as ExpertKernel : null),
    };
  });
  const adapterNames: string[] = [];
  for (const l of layers) for (const a of l.adapters) if (!adapterNames.includes(a.name)) adapterNames.push(a.name);
  return {
    name: model.name,
    modelType,
    registered: isRegistered(),
    moeLayers: layers,
    totals: {
      moeLayers: layers.length,
      params: count(model.weights),
      trainableParams: count(model.trainableWeights),
      moeParams: layers.reduce((n, l) => n + l.params.base, 0),
      loraParams: layers.reduce((n, l) => n + l.params.lora, 0),
      adapters: adapterNames,
    },
  };
}
