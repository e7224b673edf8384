/** The built-in descriptor of SparseMoE: it exposes its block and LoRA state through methods. */
import type * as tfl from '@tensorflow/tfjs-layers';
import { LORA_TARGETS, SparseMoE } from '../layers/sparse_moe.js';
import type { MoELayerDescriptor } from './descriptor.js';

export const SPARSE_MOE_DESCRIPTOR: MoELayerDescriptor<SparseMoE> = {
  className: SparseMoE.className,
  layerClass: SparseMoE,
  matches: (layer: tfl.layers.Layer) => layer instanceof SparseMoE,
  getBlockWeights: layer => layer.blockWeights(),
  getBlockConfig: layer => layer.blockConfig(),
  describe: layer => ({
    numExperts: layer.numExperts,
    hidden: layer.built ? layer.weightVariable('router_weight').shape[1] as number : null,
    intermediateSize: layer.intermediateSize,
    sharedIntermediateSize: layer.sharedExpert?.intermediateSize ?? null,
    sharedGated: layer.sharedExpert?.gated ?? false,
    routing: { ...layer.routing },
  }),
  // as SparseMoE.call: base experts get gradients only while they are trainable
  trainExpertWeights: layer => layer.trainable && layer.weightVariable('gate_up').trainable,
  lora: {
    targets: LORA_TARGETS,
    adapterNames: layer => layer.adapterNames(),
    adapterConfig: (layer, name) => layer.adapterConfig(name),
    add: (layer, config) => layer.addAdapter(config),
    remove: (layer, name) => {
      if (layer.mergedAdapters.includes(name)) layer.unmergeAdapter(name);
      layer.removeAdapter(name);
    },
  },
};
