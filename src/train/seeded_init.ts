/**
 * Seeded initial weights. tfjs-layers' initializers draw from an unseeded generator, so two runs
 * start from different weights; these re-draw the random ones from SeededRandom, so a run's
 * losses repeat for the same seed (on the same backend).
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { SeededRandom } from '../data/random.js';
import { RotaryAttention } from '../layers/attention.js';
import { sparseMoELayers } from '../layers/moe_causal_lm.js';
import { SwiGLUMLP } from '../layers/swiglu_mlp.js';

function write(variable: tfl.LayerVariable, draw: () => number): void {
  const data = new Float32Array(variable.shape.reduce<number>((p, d) => p * (d ?? 1), 1));
  for (let i = 0; i < data.length; i++) data[i] = draw();
  tf.tidy(() => { variable.write(tf.tensor(data, variable.shape as number[])); });
}

/**
 * Re-draws every randomly initialized weight of a model (one whose values are not all equal;
 * norms start at 1 and biases at 0 and are kept) from N(0, std²), HF's init. Asynchronous: the
 * weights are read with `data()`, the one read webgpu allows once a weight lives on the GPU.
 *
 * ```js
 * const model = buildMoECausalLM(config);
 * await seedModelInit(model, 1, config.initializer_range ?? 0.02);
 * ```
 */
export async function seedModelInit(model: tfl.LayersModel, seed: number, std: number): Promise<void> {
  const rng = new SeededRandom(seed);
  const normal = () => Math.sqrt(-2 * Math.log(1 - rng.next())) * Math.cos(2 * Math.PI * rng.next()) * std;
  // one weight at a time, in order: the draws' order is the seed's contract (fixtures hold its
  // values), and only one weight's values are on the host at once
  for (const w of model.weights) {
    const values = await w.read().data() as Float32Array;
    if (values.every(v => v === values[0])) continue;
    write(w, normal);
  }
}

/**
 * Re-draws the A factors of adapter `name` on every MoE layer, then on every attention and
 * dense-MLP layer, from PEFT's init, U(±1/√in), and leaves B (zeros: the adapter starts as a no-op).
 *
 * ```js
 * register({models: [model], lora: {r: 4, alpha: 8}});
 * seedAdapterInit(model, 'default', 1);
 * ```
 */
export function seedAdapterInit(model: tfl.LayersModel, name: string, seed: number): void {
  const rng = new SeededRandom(seed);
  for (const layer of sparseMoELayers(model)) {
    if (!layer.adapterNames().includes(name)) continue;
    for (const factors of Object.values(layer.adapter(name).factors)) {
      const bound = 1 / Math.sqrt(factors!.A.shape[1] as number);
      write(factors!.A, () => (2 * rng.next() - 1) * bound);
    }
  }
  for (const layer of model.layers) {
    if (!(layer instanceof RotaryAttention || layer instanceof SwiGLUMLP) || !layer.lora.names().includes(name)) continue;
    for (const factors of Object.values(layer.lora.factors(name))) {
      const bound = 1 / Math.sqrt(factors.A.shape[1] as number);
      write(factors.A, () => (2 * rng.next() - 1) * bound);
    }
  }
}
