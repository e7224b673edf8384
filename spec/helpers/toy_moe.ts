/**
 * A user-style MoE layer for the descriptor tests: it keeps its weights its own (Keras) way —
 * router kernel [H, E], per-expert gate/up/down kernels [E, H, I], [E, H, I], [E, I, H] — and
 * computes its block densely (every expert on every token, masked by the top-k). It can hold
 * router LoRA adapters. ToyMoE's descriptor maps all that onto MoEBlockWeights.
 */
import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import type { LayerArgs } from '@tensorflow/tfjs-layers/dist/engine/topology.js';
import type { MoELayerDescriptor } from '../../src/patch/descriptor.js';
import type { MoEBlockWeights, RoutingConfig } from '../../src/ops/types.js';

export interface ToyMoEArgs extends LayerArgs {
  numExperts: number;
  intermediateSize: number;
  /** not validated here: the plugin's rules are tested with it */
  routing: RoutingConfig;
  stddev?: number;
}

interface RouterAdapter { A: tfl.LayerVariable; B: tfl.LayerVariable; r: number; alpha: number; scaling: number }

export class ToyMoE extends tfl.layers.Layer {
  static className = 'ToyMoE';
  readonly numExperts: number;
  readonly intermediateSize: number;
  readonly routing: RoutingConfig;
  readonly stddev: number;
  readonly routerAdapters = new Map<string, RouterAdapter>();
  kernel!: tfl.LayerVariable;
  wGate!: tfl.LayerVariable;
  wUp!: tfl.LayerVariable;
  wDown!: tfl.LayerVariable;
  /** calls of its own `call` (not the plugin's) */
  ownCalls = 0;

  constructor(args: ToyMoEArgs) {
    super(args);
    this.numExperts = args.numExperts;
    this.intermediateSize = args.intermediateSize;
    this.routing = { ...args.routing };
    this.stddev = args.stddev ?? 0.5;
  }

  override build(inputShape: tfl.Shape | tfl.Shape[]): void {
    const shape = (Array.isArray(inputShape[0]) ? inputShape[0] : inputShape) as tfl.Shape;
    const h = shape[shape.length - 1] as number;
    const e = this.numExperts;
    const i = this.intermediateSize;
    const init = (seed: number) => tfl.initializers.randomNormal({ stddev: this.stddev, seed });
    this.kernel = this.addWeight('router_kernel', [h, e], 'float32', tfl.initializers.randomNormal({ stddev: 2, seed: 3 }));
    this.wGate = this.addWeight('w_gate', [e, h, i], 'float32', init(7));
    this.wUp = this.addWeight('w_up', [e, h, i], 'float32', init(8));
    this.wDown = this.addWeight('w_down', [e, i, h], 'float32', init(9));
    this.built = true;
  }

  addRouterAdapter(name: string, r: number, alpha: number): void {
    const h = this.kernel.shape[0] as number;
    const bound = 1 / Math.sqrt(h);
    const A = this.addWeight(`lora_${name}_A`, [r, h], 'float32', tfl.initializers.randomUniform({ minval: -bound, maxval: bound }));
    const B = this.addWeight(`lora_${name}_B`, [this.numExperts, r], 'float32', tfl.initializers.zeros());
    this.routerAdapters.set(name, { A, B, r, alpha, scaling: alpha / r });
  }

  removeRouterAdapter(name: string): void {
    const a = this.routerAdapters.get(name)!;
    const self = this as unknown as { _trainableWeights: tfl.LayerVariable[]; _addedWeightNames: string[] };
    self._trainableWeights = self._trainableWeights.filter(v => v !== a.A && v !== a.B);
    self._addedWeightNames = self._addedWeightNames.filter(n => n !== a.A.originalName && n !== a.B.originalName);
    a.A.dispose();
    a.B.dispose();
    this.routerAdapters.delete(name);
  }

  override computeOutputShape(inputShape: tfl.Shape | tfl.Shape[]): tfl.Shape | tfl.Shape[] {
    return inputShape;
  }

  /** Dense softmax → top-k (→ renormalise) block; the selection is read on the CPU (no gradient needed). */
  override call(inputs: tf.Tensor | tf.Tensor[]): tf.Tensor {
    this.ownCalls++;
    if (this.routing.kind !== 'softmaxTopK') throw new Error(`ToyMoE.call: routing '${this.routing.kind}' is not implemented`);
    return tf.tidy(() => {
      const x = Array.isArray(inputs) ? inputs[0] : inputs;
      const h = x.shape[x.rank - 1];
      const x2 = tf.reshape(x, [-1, h]) as tf.Tensor2D;
      const t = x2.shape[0];
      const e = this.numExperts;
      const i = this.intermediateSize;
      let logits = tf.matMul(x2, this.kernel.read() as tf.Tensor2D);                       // [T, E]
      for (const a of this.routerAdapters.values()) {
        logits = tf.add(logits, tf.matMul(tf.mul(tf.matMul(x2, a.A.read() as tf.Tensor2D, false, true), a.scaling),
            a.B.read() as tf.Tensor2D, false, true));
      }
      const values = logits.dataSync();
      const mask = new Float32Array(t * e);
      for (let row = 0; row < t; row++) {
        const order = Array.from({ length: e }, (_, c) => c).sort((p, q) => values[row * e + q] - values[row * e + p]);
        for (const c of order.slice(0, this.routing.topK)) mask[row * e + c] = 1;
      }
      let w = tf.mul(tf.softmax(logits), tf.tensor2d(mask, [t, e]));                       // [T, E]
      // as the ops: renormalise unless told not to
      if (this.routing.renormalize ?? true) w = tf.div(w, tf.sum(w, 1, true));
      let out: tf.Tensor = tf.zeros([t, h]);
      for (let c = 0; c < e; c++) {
        const pick = (v: tfl.LayerVariable, a: number, b: number) => tf.reshape(tf.slice(v.read(), [c, 0, 0], [1, a, b]), [a, b]) as tf.Tensor2D;
        const g = tf.matMul(x2, pick(this.wGate, h, i));
        const u = tf.matMul(x2, pick(this.wUp, h, i));
        const y = tf.matMul(tf.mul(tf.mul(g, tf.sigmoid(g)), u) as tf.Tensor2D, pick(this.wDown, i, h));
        out = tf.add(out, tf.mul(tf.slice(w, [0, c], [t, 1]), y));
      }
      return tf.reshape(out, x.shape);
    });
  }

  override getConfig(): tf.serialization.ConfigDict {
    return { ...super.getConfig(), numExperts: this.numExperts, intermediateSize: this.intermediateSize,
      routing: { ...this.routing }, stddev: this.stddev } as unknown as tf.serialization.ConfigDict;
  }
}
tf.serialization.registerClass(ToyMoE);

/** ToyMoE without LoRA support in its descriptor (same weights, same call). */
export class BareMoE extends ToyMoE {
  static override className = 'BareMoE';
}
tf.serialization.registerClass(BareMoE);

function toyBlockWeights(layer: ToyMoE): MoEBlockWeights {
  const t = (v: tfl.LayerVariable) => tf.transpose(v.read(), [0, 2, 1]) as tf.Tensor3D;     // [E, in, out] → [E, out, in]
  return {
    router: {
      weight: tf.transpose(layer.kernel.read()) as tf.Tensor2D,
      lora: [...layer.routerAdapters.values()].map(a => ({ A: a.A.read() as tf.Tensor2D, B: a.B.read() as tf.Tensor2D, scaling: a.scaling })),
    },
    experts: { gateUp: tf.concat([t(layer.wGate), t(layer.wUp)], 1) as tf.Tensor3D, down: t(layer.wDown) },
  };
}

export const TOY_DESCRIPTOR: MoELayerDescriptor<ToyMoE> = {
  className: 'ToyMoE',
  layerClass: ToyMoE,
  matches: layer => layer.getClassName() === 'ToyMoE',
  getBlockWeights: toyBlockWeights,
  getBlockConfig: layer => ({ routing: { ...layer.routing }, activation: { kind: 'swiglu' } }),
  lora: {
    targets: ['router'],
    adapterNames: layer => [...layer.routerAdapters.keys()],
    adapterConfig: (layer, name) => {
      const a = layer.routerAdapters.get(name);
      return a && { name, r: a.r, alpha: a.alpha, targets: ['router'] };
    },
    add: (layer, config) => layer.addRouterAdapter(config.name, config.r, config.alpha),
    remove: (layer, name) => layer.removeRouterAdapter(name),
  },
};

/** No layerClass: found through tf.serialization.registerClass; no lora hooks. */
export const BARE_DESCRIPTOR: MoELayerDescriptor<BareMoE> = {
  className: 'BareMoE',
  matches: layer => layer.getClassName() === 'BareMoE',
  getBlockWeights: toyBlockWeights,
  getBlockConfig: layer => ({ routing: { ...layer.routing }, activation: { kind: 'swiglu' } }),
};

export function builtToy(args: ToyMoEArgs, h = 6, cls: typeof ToyMoE = ToyMoE): ToyMoE {
  const layer = new cls(args);
  layer.build([null, h]);
  return layer;
}
