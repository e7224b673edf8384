/**
 * A routed-experts case whose expert weights are packed (bf16 or f16, or quantized) beside the same
 * weights as float32 tensors holding the rounded (or dequantized) values, so that the fused block on the packed weights can be
 * compared with the float32 block on exactly the values it decodes.
 */
import * as tf from '@tensorflow/tfjs-core';
import {
  bfloat16Bits, float16Bits, isQuantizedKind, packedExpertWeightFromBits, PackedExpertWeight, type HalfKind, type PackedKind,
} from '../../src/ops/packed.js';
import { quantizedLayout, quantizeExpertValues, type QuantizedKind } from '../../src/ops/quantized.js';
import { referenceDecode } from './quantized_reference.js';
import type { fusedExperts } from '../../src/ops/experts/fused_experts.js';
import type { ExpertActivation, ExpertLayout, ExpertWeights, LoRAFactors } from '../../src/ops/types.js';
import { chooseExperts } from './expert_cases.js';
import { Rng, tensorOf } from './numeric.js';

export interface PackedCase {
  x: tf.Tensor2D;
  routingWeights: tf.Tensor2D;
  experts: tf.Tensor2D;
  /** packed weights */
  gateUp: PackedExpertWeight;
  down: PackedExpertWeight;
  /** the same values, decoded: float32 */
  gateUp32: tf.Tensor3D;
  down32: tf.Tensor3D;
  gateUpBias?: tf.Tensor2D;
  downBias?: tf.Tensor2D;
  upLoRA: LoRAFactors;
  downLoRA: LoRAFactors;
  layout: ExpertLayout;
  activation: ExpertActivation;
  dispose(): void;
}

/**
 * Random values rounded to `kind`: the bits, and the values they stand for decoded on the host by
 * the formats' definitions (no device read: webgpu in Node cannot read synchronously).
 */
function roundedWeight(kind: HalfKind, values: Float64Array, shape: number[]): { packed: PackedExpertWeight; plain: tf.Tensor3D } {
  const bits = Uint16Array.from(values, v => (kind === 'bf16' ? bfloat16Bits(v) : float16Bits(v)));
  const decoded = new Float32Array(bits.length);
  const word = new Uint32Array(1);
  const asFloat = new Float32Array(word.buffer);
  bits.forEach((h, i) => {
    if (kind === 'bf16') {
      word[0] = h << 16;
      decoded[i] = asFloat[0];
    } else {
      const e = (h >> 10) & 0x1f;
      const m = h & 0x3ff;
      decoded[i] = (h & 0x8000 ? -1 : 1) * (e === 0 ? m * 2 ** -24 : (1 + m / 1024) * 2 ** (e - 15));
    }
  });
  return { packed: packedExpertWeightFromBits(kind, shape, bits), plain: tf.tensor3d(decoded, shape as [number, number, number]) };
}

/**
 * Random values quantized on the host, and the values their words stand for decoded by
 * quantized_reference.ts (the formats' formulas), input along `inputAxis`.
 */
function quantizedWeight(
    kind: QuantizedKind, values: Float64Array, shape: number[], inputAxis: 1 | 2,
    groupSize?: number): { packed: PackedExpertWeight; plain: tf.Tensor3D } {
  const layout = quantizedLayout(kind, shape, inputAxis, groupSize);
  const words = quantizeExpertValues(layout, shape[0], Float32Array.from(values));
  return {
    packed: new PackedExpertWeight(kind, shape, tf.tensor2d(words, [shape[0], layout.wordsPerExpert], 'int32'), { inputAxis, groupSize }),
    plain: tf.tensor3d(referenceDecode(layout, shape[0], words), shape as [number, number, number]),
  };
}

export function makePackedCase(
    kind: PackedKind, dims: { T: number; H: number; I: number; E: number; K: number; r: number },
    seed: number, layout: ExpertLayout = 'outIn', groupSize?: number): PackedCase {
  const { T, H, I, E, K, r } = dims;
  const rng = new Rng(seed);
  const t = layout !== 'outIn';
  const make = (values: Float64Array, shape: number[]) => isQuantizedKind(kind) ?
    quantizedWeight(kind, values, shape, t ? 1 : 2, groupSize) : roundedWeight(kind, values, shape);
  const w1 = make(rng.array(E * 2 * I * H, 0.5), t ? [E, H, 2 * I] : [E, 2 * I, H]);
  const w2 = make(rng.array(E * H * I, 0.5), t ? [E, I, H] : [E, H, I]);
  const c: PackedCase = {
    x: tensorOf(rng.array(T * H), [T, H]) as tf.Tensor2D,
    routingWeights: tensorOf(Array.from({ length: T * K }, () => 0.2 + rng.uniform()), [T, K]) as tf.Tensor2D,
    experts: tf.tensor2d(chooseExperts(rng, T, K, E), [T, K], 'int32'),
    gateUp: w1.packed, down: w2.packed,
    gateUp32: w1.plain,
    down32: w2.plain,
    upLoRA: { A: tensorOf(rng.array(r * E * H, 0.3), [r * E, H]) as tf.Tensor2D, B: tensorOf(rng.array(2 * I * r * E, 0.3), [2 * I, r * E]) as tf.Tensor2D, scaling: 1.5 },
    downLoRA: { A: tensorOf(rng.array(r * E * I, 0.3), [r * E, I]) as tf.Tensor2D, B: tensorOf(rng.array(H * r * E, 0.3), [H, r * E]) as tf.Tensor2D, scaling: 0.5 },
    layout,
    activation: t ? { kind: 'clampedSwiglu', alpha: 1.702, limit: 7 } : { kind: 'swiglu' },
    dispose() {
      tf.dispose([c.x, c.routingWeights, c.experts, c.gateUp32, c.down32, c.upLoRA.A, c.upLoRA.B, c.downLoRA.A, c.downLoRA.B]);
      if (c.gateUpBias) tf.dispose([c.gateUpBias, c.downBias!]);
      c.gateUp.dispose();
      c.down.dispose();
    },
  };
  if (t) {
    c.gateUpBias = tensorOf(rng.array(E * 2 * I, 0.1), [E, 2 * I]) as tf.Tensor2D;
    c.downBias = tensorOf(rng.array(E * H, 0.1), [E, H]) as tf.Tensor2D;
  }
  return c;
}

type FusedExperts = typeof fusedExperts;

/** What packedCaseGrads returns, in order. */
export const PACKED_CASE_GRAD_NAMES = ['loss', 'dx', 'dA_up', 'dB_up', 'dA_down', 'dB_down'];

/**
 * The case's loss Σ out·sin(out) through `impl` with the given expert weights (the packed ones or
 * their float32 values), and its gradients with respect to x and every LoRA factor.
 */
export function packedCaseGrads(c: PackedCase, impl: FusedExperts, gateUp: ExpertWeights['gateUp'],
    down: ExpertWeights['down'], options: Parameters<FusedExperts>[4]): tf.Tensor[] {
  const f = (x: tf.Tensor, a1: tf.Tensor, b1: tf.Tensor, a2: tf.Tensor, b2: tf.Tensor) => {
    const w: ExpertWeights = {
      gateUp, down, layout: c.layout, gateUpBias: c.gateUpBias, downBias: c.downBias,
      gateUpLoRA: [{ A: a1 as tf.Tensor2D, B: b1 as tf.Tensor2D, scaling: c.upLoRA.scaling }],
      downLoRA: [{ A: a2 as tf.Tensor2D, B: b2 as tf.Tensor2D, scaling: c.downLoRA.scaling }],
    };
    const out = impl(x as tf.Tensor2D, { weights: c.routingWeights, experts: c.experts }, w, c.activation, options);
    return tf.sum(tf.mul(out, tf.sin(out)));
  };
  const { value, grads } = tf.valueAndGrads(f)([c.x, c.upLoRA.A, c.upLoRA.B, c.downLoRA.A, c.downLoRA.B]);
  return [value, ...grads];
}
