/** What tfjs-layers offers no public call for: taking added weights off a layer again. */
import type * as tfl from '@tensorflow/tfjs-layers';

/**
 * Disposes `vars` (weights added with addWeight, e.g. an adapter's A and B) and removes them from
 * `layer`'s trainable weights and from its used names, so a weight of the same name can be added
 * again. tfjs-layers (4.22) keeps both in private fields.
 *
 * ```js
 * releaseLayerVariables(layer, [factors.A, factors.B]);
 * ```
 */
export function releaseLayerVariables(layer: tfl.layers.Layer, vars: readonly tfl.LayerVariable[]): void {
  const self = layer as unknown as { _trainableWeights: tfl.LayerVariable[]; _addedWeightNames: string[] };
  self._trainableWeights = self._trainableWeights.filter(v => !vars.includes(v));
  const names = vars.map(v => v.originalName);
  self._addedWeightNames = self._addedWeightNames.filter(n => !names.includes(n));
  vars.forEach(v => v.dispose());
}
