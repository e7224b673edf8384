/** Finds the MoE layers (those a descriptor matches) in models and layers, nested models included. */
import * as tfl from '@tensorflow/tfjs-layers';
import type { ModelOrLayer } from '../args/schema.js';
import { findMoELayerDescriptor, type ResolvedDescriptor } from './descriptor.js';

export interface FoundMoELayer {
  /** index in args.models */
  model: number;
  layer: tfl.layers.Layer;
  descriptor: ResolvedDescriptor;
  /** how messages name it: "models[0] layer 'moe' (SparseMoE)" */
  where: string;
}

function childLayers(layer: tfl.layers.Layer): tfl.layers.Layer[] {
  const layers = (layer as unknown as { layers?: unknown }).layers;
  return Array.isArray(layers) ? layers.filter((l): l is tfl.layers.Layer => l instanceof tfl.layers.Layer) : [];
}

/**
 * Every MoE layer of every model, once (a layer shared by two models is reported with the first),
 * in model order then layer order, and per model whether it had any.
 */
export function findMoELayers(models: readonly ModelOrLayer[]): { found: FoundMoELayer[]; layersPerModel: number[] } {
  const found: FoundMoELayer[] = [];
  const seen = new Set<tfl.layers.Layer>();
  const layersPerModel: number[] = [];
  models.forEach((root, model) => {
    let count = 0;
    const visit = (layer: tfl.layers.Layer) => {
      const descriptor = findMoELayerDescriptor(layer);
      if (descriptor !== undefined) {
        count++;
        if (seen.has(layer)) return;
        seen.add(layer);
        found.push({ model, layer, descriptor, where: `models[${model}] layer '${layer.name}' (${descriptor.className})` });
        return;
      }
      childLayers(layer).forEach(visit);
    };
    visit(root);
    layersPerModel.push(count);
  });
  return { found, layersPerModel };
}
