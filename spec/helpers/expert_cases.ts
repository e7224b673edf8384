/**
 * Random routed-experts cases with their float64 twins (spec/ops/expert_reference64.ts), shared by
 * the composed-op specs and the WebGPU specs: the tensors, which of them train, and the float64 loss.
 */
import * as tf from '@tensorflow/tfjs-core';
import { loraDropoutMask } from '../../src/ops/lora/dropout.js';
import type { ExpertActivation, ExpertWeights, LoRADropout, LoRAFactors } from '../../src/ops/types.js';
import { experts64, type Experts64 } from '../ops/expert_reference64.js';
import { Rng, asF32 } from './numeric.js';

export interface ExpertCaseSpec {
  T: number; H: number; I: number; E: number; K: number;
  layout?: 'outIn' | 'inOutInterleaved' | 'inOut';
  activation?: ExpertActivation;
  bias?: boolean;
  lora1?: number[];
  lora2?: number[];
  /** 'random': K distinct experts per token; 'one': every token to expert E−1 (K=1); 'skip': experts 0 and E−1 unused */
  routing?: 'random' | 'one' | 'skip';
  /**
   * LoRA dropout p on every adapter, seeds `dropoutSeed` + 0, 1, ... on W1's adapters and
   * `dropoutSeed` + 100, ... on W2's; the float64 twin gets the same masks (loraDropoutMask)
   */
  dropout?: number;
  dropoutSeed?: number;
}

export interface ExpertCase {
  m: Experts64;
  x: tf.Tensor2D; weights: tf.Tensor2D; experts: tf.Tensor2D;
  /** float32 expert weights (packed ones: spec/helpers/packed_case.ts) */
  w: ExpertWeights & { gateUp: tf.Tensor3D; down: tf.Tensor3D };
  activation: ExpertActivation;
  dispose(): void;
}

/** Random experts ids, in [0, E), K distinct per token (or the spec's pattern). */
export function chooseExperts(rng: Rng, T: number, K: number, E: number, routing: ExpertCaseSpec['routing'] = 'random'): Int32Array {
  const chosen = new Int32Array(T * K);
  const pool = routing === 'skip' ? Array.from({ length: E - 2 }, (_, i) => i + 1) : Array.from({ length: E }, (_, i) => i);
  for (let t = 0; t < T; t++) {
    const perm = [...pool];
    for (let i = perm.length - 1; i > 0; i--) { const j = rng.int(i + 1); [perm[i], perm[j]] = [perm[j], perm[i]]; }
    for (let k = 0; k < K; k++) chosen[t * K + k] = routing === 'one' ? E - 1 : perm[k];
  }
  return chosen;
}

export function makeExpertCase(spec: ExpertCaseSpec, seed: number): ExpertCase {
  const rng = new Rng(seed);
  const { T, H, I, E, K } = spec;
  const layout = spec.layout ?? 'outIn';
  const activation = spec.activation ?? { kind: 'swiglu' };
  const chosen = chooseExperts(rng, T, K, E, spec.routing);
  const dropoutOf = (i: number, base: number): LoRADropout | undefined => spec.dropout === undefined ? undefined :
    { p: spec.dropout, seed: (spec.dropoutSeed ?? 0) + base + i };
  const maskOf = (d: LoRADropout | undefined, inSize: number) => d === undefined ? undefined :
    (() => { const t = loraDropoutMask([T * K, inSize], d.p, d.seed); const v = Float64Array.from(t.dataSync()); t.dispose(); return v; })();
  const adapters = (ranks: number[] | undefined, inSize: number, outSize: number, base: number) => (ranks ?? []).map((r, i) => ({
    A: asF32(rng.array(r * E * inSize, 0.5)), B: asF32(rng.array(outSize * r * E, 0.5)), r, s: 1.5 + i,
    dropout: dropoutOf(i, base), mask: maskOf(dropoutOf(i, base), inSize),
  }));
  const m: Experts64 = {
    T, H, I, E, K, layout, activation, experts: chosen,
    weights: asF32(Float64Array.from({ length: T * K }, () => 0.2 + rng.uniform())),
    x: asF32(rng.array(T * H)),
    W1: asF32(rng.array(E * 2 * I * H, 0.6 / Math.sqrt(H / 6))),
    W2: asF32(rng.array(E * H * I, 0.6 / Math.sqrt(I / 3))),
    b1: spec.bias ? asF32(rng.array(E * 2 * I, 0.3)) : undefined,
    b2: spec.bias ? asF32(rng.array(E * H, 0.3)) : undefined,
    lora1: adapters(spec.lora1, H, 2 * I, 0),
    lora2: adapters(spec.lora2, I, H, 100),
  };
  const t2 = layout !== 'outIn';
  const toFactors = (fs: Array<Experts64['lora1'][number] & { dropout?: LoRADropout }>, inSize: number, outSize: number): LoRAFactors[] =>
    fs.map(f => ({
      A: tf.tensor2d(Float32Array.from(f.A), [f.r * E, inSize]),
      B: tf.tensor2d(Float32Array.from(f.B), [outSize, f.r * E]),
      scaling: f.s,
      ...(f.dropout ? { dropout: f.dropout } : {}),
    }));
  const w: ExpertCase['w'] = {
    layout,
    gateUp: tf.tensor3d(Float32Array.from(m.W1), t2 ? [E, H, 2 * I] : [E, 2 * I, H]),
    down: tf.tensor3d(Float32Array.from(m.W2), t2 ? [E, I, H] : [E, H, I]),
    gateUpBias: m.b1 && tf.tensor2d(Float32Array.from(m.b1), [E, 2 * I]),
    downBias: m.b2 && tf.tensor2d(Float32Array.from(m.b2), [E, H]),
    gateUpLoRA: toFactors(m.lora1, H, 2 * I),
    downLoRA: toFactors(m.lora2, I, H),
  };
  const x = tf.tensor2d(Float32Array.from(m.x), [T, H]);
  const weights = tf.tensor2d(Float32Array.from(m.weights), [T, K]);
  const experts = tf.tensor2d(chosen, [T, K], 'int32');
  const all = [x, weights, experts, w.gateUp, w.down, w.gateUpBias, w.downBias,
    ...w.gateUpLoRA!.flatMap(f => [f.A, f.B]), ...w.downLoRA!.flatMap(f => [f.A, f.B])];
  return { m, x, weights, experts, w, activation, dispose: () => tf.dispose(all.filter(t => t != null) as tf.Tensor[]) };
}

export interface Trained {
  name: string;
  t: tf.Tensor;
  get: (m: Experts64) => Float64Array;
  set: (m: Experts64, v: Float64Array) => Experts64;
}

/** The trained tensors of a case with their float64 counterparts: x, weights, [W1, W2, b1, b2], adapters. */
export function trainedOf(c: ExpertCase, trainBase: boolean): Trained[] {
  const list: Trained[] = [
    { name: 'x', t: c.x, get: m => m.x, set: (m, v) => ({ ...m, x: v }) },
    { name: 'weights', t: c.weights, get: m => m.weights, set: (m, v) => ({ ...m, weights: v }) },
  ];
  if (trainBase) {
    list.push({ name: 'W1', t: c.w.gateUp, get: m => m.W1, set: (m, v) => ({ ...m, W1: v }) });
    list.push({ name: 'W2', t: c.w.down, get: m => m.W2, set: (m, v) => ({ ...m, W2: v }) });
    if (c.w.gateUpBias) list.push({ name: 'b1', t: c.w.gateUpBias, get: m => m.b1!, set: (m, v) => ({ ...m, b1: v }) });
    if (c.w.downBias) list.push({ name: 'b2', t: c.w.downBias, get: m => m.b2!, set: (m, v) => ({ ...m, b2: v }) });
  }
  for (const [key, tensors] of [['lora1', c.w.gateUpLoRA!], ['lora2', c.w.downLoRA!]] as const) {
    tensors.forEach((f, i) => {
      const replace = (m: Experts64, part: 'A' | 'B', v: Float64Array) =>
        ({ ...m, [key]: m[key].map((g, j) => (j === i ? { ...g, [part]: v } : g)) });
      list.push({ name: `${key}[${i}].A`, t: f.A, get: m => m[key][i].A, set: (m, v) => replace(m, 'A', v) });
      list.push({ name: `${key}[${i}].B`, t: f.B, get: m => m[key][i].B, set: (m, v) => replace(m, 'B', v) });
    });
  }
  return list;
}

/** The weights of a case with the trained tensors replaced by `inputs` (in trainedOf order). */
export function weightsWith(c: ExpertCase, trained: Trained[], inputs: tf.Tensor[]): { x: tf.Tensor2D; weights: tf.Tensor2D; w: ExpertWeights } {
  const byName = new Map(trained.map((p, i) => [p.name, inputs[i]]));
  const pick = <T extends tf.Tensor>(name: string, t: T) => (byName.get(name) as T | undefined) ?? t;
  return {
    x: pick('x', c.x),
    weights: pick('weights', c.weights),
    w: {
      ...c.w,
      gateUp: pick('W1', c.w.gateUp), down: pick('W2', c.w.down),
      gateUpBias: c.w.gateUpBias && pick('b1', c.w.gateUpBias), downBias: c.w.downBias && pick('b2', c.w.downBias),
      gateUpLoRA: c.w.gateUpLoRA!.map((l, i) => ({ ...l, A: pick(`lora1[${i}].A`, l.A), B: pick(`lora1[${i}].B`, l.B) })),
      downLoRA: c.w.downLoRA!.map((l, i) => ({ ...l, A: pick(`lora2[${i}].A`, l.A), B: pick(`lora2[${i}].B`, l.B) })),
    },
  };
}

export function loss64(m: Experts64, G: Float64Array): number {
  const out = experts64(m);
  let s = 0;
  for (let i = 0; i < out.length; i++) s += out[i] * G[i];
  return s;
}
