import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { moeBlock, moeBlockKernelNames } from '../../src/ops/moe_block.js';
import { referenceMoEBlock } from '../../src/ops/reference/moe_block.js';
import type { ExpertWeights, LoRAFactors, MoEBlockConfig, MoEBlockWeights, RoutingConfig } from '../../src/ops/types.js';
import { Rng, expectClose, expectNoLeak } from '../helpers/numeric.js';

interface FamilySpec {
  name: string;
  routing: RoutingConfig;
  E: number; H: number; I: number;
  gptOss?: boolean;            // transposed interleaved experts, biases, clamped GLU, router bias
  correctionBias?: boolean;
  shared?: 'sigmoid' | 'plain';
}

const families: FamilySpec[] = [
  { name: 'mixtral (softmax → top-k → renormalise)', routing: { kind: 'softmaxTopK', topK: 2, renormalize: true }, E: 8, H: 12, I: 6 },
  { name: 'qwen2_moe (no renormalisation, sigmoid-gated shared expert)', routing: { kind: 'softmaxTopK', topK: 2, renormalize: false }, E: 6, H: 10, I: 4, shared: 'sigmoid' },
  { name: 'gpt-oss (top-k → softmax, biases, clamped GLU)', routing: { kind: 'topKSoftmax', topK: 2 }, E: 5, H: 8, I: 4, gptOss: true },
  { name: 'deepseek_v3 (sigmoid, bias, groups, ×2.5, shared)', routing: { kind: 'sigmoidGroupTopK', topK: 4, nGroup: 4, topkGroup: 2, renormalize: true, scalingFactor: 2.5 }, E: 16, H: 8, I: 3, correctionBias: true, shared: 'plain' },
  { name: 'glm4_moe (sigmoid, one group)', routing: { kind: 'sigmoidGroupTopK', topK: 3, nGroup: 1, topkGroup: 1, renormalize: true, scalingFactor: 1.5 }, E: 7, H: 9, I: 4, correctionBias: true, shared: 'plain' },
  { name: 'mistral4 (softmax group top-k)', routing: { kind: 'softmaxGroupTopK', topK: 2, nGroup: 2, topkGroup: 1, renormalize: true }, E: 6, H: 8, I: 3 },
  { name: 'deepseek_v2 (softmax group-limited greedy)', routing: { kind: 'softmaxGroupLimitedGreedy', topK: 3, nGroup: 4, topkGroup: 2, scalingFactor: 1.25 }, E: 8, H: 8, I: 3 },
  { name: 'ernie4_5_moe (softmax, bias for the selection, clamped sum, shared)', routing: { kind: 'softmaxBiasedTopK', topK: 3, normMin: 1e-12 }, E: 8, H: 8, I: 4, correctionBias: true, shared: 'plain' },
  { name: 'hunyuan_v1_moe (softmax → top-k → renormalise, shared MLP)', routing: { kind: 'softmaxTopK', topK: 2, renormalize: true }, E: 6, H: 8, I: 4, shared: 'plain' },
  { name: 'minimax_m2 (sigmoid, bias, no groups, renormalise)', routing: { kind: 'sigmoidGroupTopK', topK: 3, renormalize: true }, E: 8, H: 8, I: 4, correctionBias: true },
];

interface Built { weights: MoEBlockWeights; config: MoEBlockConfig; x: tf.Tensor2D; g: tf.Tensor2D; all: tf.Tensor[] }

function build(f: FamilySpec, T: number, lora: boolean, seed: number): Built {
  const rng = new Rng(seed);
  const all: tf.Tensor[] = [];
  const t = <R extends tf.Tensor>(shape: number[], scale = 1): R => {
    const v = tf.tensor(Float32Array.from(rng.array(shape.reduce((a, b) => a * b, 1), scale)), shape) as R;
    all.push(v);
    return v;
  };
  const { E, H, I } = f;
  const r = 2;
  const expertLoRA = (inSize: number, outSize: number): LoRAFactors[] =>
    lora ? [{ A: t([r * E, inSize], 0.3), B: t([outSize, r * E], 0.3), scaling: 2 }] : [];
  const experts: ExpertWeights & { gateUp: tf.Tensor3D; down: tf.Tensor3D } = f.gptOss
    ? { layout: 'inOutInterleaved', gateUp: t<tf.Tensor3D>([E, H, 2 * I], 0.5), down: t<tf.Tensor3D>([E, I, H], 0.5),
        gateUpBias: t<tf.Tensor2D>([E, 2 * I], 0.2), downBias: t<tf.Tensor2D>([E, H], 0.2) }
    : { gateUp: t<tf.Tensor3D>([E, 2 * I, H], 0.5), down: t<tf.Tensor3D>([E, H, I], 0.5) };
  experts.gateUpLoRA = expertLoRA(H, 2 * I);
  experts.downLoRA = expertLoRA(I, H);
  const weights: MoEBlockWeights = {
    // router weights scaled up so that top-k ties are unlikely
    router: { weight: t([E, H], 2), bias: f.gptOss ? t<tf.Tensor1D>([E], 0.5) : undefined,
      correctionBias: f.correctionBias ? t<tf.Tensor1D>([E], 0.3) : undefined,
      lora: lora ? [{ A: t([r, H], 0.3), B: t([E, r], 0.3), scaling: 2 }] : [] },
    experts,
    shared: f.shared ? { gate: t([5, H], 0.5), up: t([5, H], 0.5), down: t([H, 5], 0.5),
      sigmoidGate: f.shared === 'sigmoid' ? t<tf.Tensor2D>([1, H], 0.5) : undefined } : undefined,
  };
  const config: MoEBlockConfig = { routing: f.routing,
    activation: f.gptOss ? { kind: 'clampedSwiglu', alpha: 1.702, limit: 1.5 } : { kind: 'swiglu' } };
  return { weights, config, x: t([T, H]), g: t([T, H]), all };
}

/** Every tensor that trains in this setting, with a function rebuilding the weights from replacements. */
function trainedTensors(b: Built, lora: boolean): { tensors: tf.Tensor[]; names: string[]; rebuild: (ts: tf.Tensor[]) => MoEBlockWeights } {
  const w = b.weights;
  const entries: Array<[string, tf.Tensor, (acc: MoEBlockWeights, v: tf.Tensor) => void]> = [];
  if (lora) {
    w.router.lora!.forEach((f, i) => {
      entries.push([`router.lora[${i}].A`, f.A, (acc, v) => { acc.router.lora![i] = { ...acc.router.lora![i], A: v as tf.Tensor2D }; }]);
      entries.push([`router.lora[${i}].B`, f.B, (acc, v) => { acc.router.lora![i] = { ...acc.router.lora![i], B: v as tf.Tensor2D }; }]);
    });
    for (const key of ['gateUpLoRA', 'downLoRA'] as const) {
      w.experts[key]!.forEach((f, i) => {
        entries.push([`${key}[${i}].A`, f.A, (acc, v) => { acc.experts[key]![i] = { ...acc.experts[key]![i], A: v as tf.Tensor2D }; }]);
        entries.push([`${key}[${i}].B`, f.B, (acc, v) => { acc.experts[key]![i] = { ...acc.experts[key]![i], B: v as tf.Tensor2D }; }]);
      });
    }
  } else {
    entries.push(['router.weight', w.router.weight, (acc, v) => { acc.router.weight = v as tf.Tensor2D; }]);
    if (w.router.bias) entries.push(['router.bias', w.router.bias, (acc, v) => { acc.router.bias = v as tf.Tensor1D; }]);
    for (const key of ['gateUp', 'down', 'gateUpBias', 'downBias'] as const) {
      if (w.experts[key]) entries.push([key, w.experts[key] as tf.Tensor, (acc, v) => { (acc.experts as unknown as Record<string, tf.Tensor>)[key] = v; }]);
    }
    if (w.shared) {
      for (const key of ['gate', 'up', 'down', 'sigmoidGate'] as const) {
        if (w.shared[key]) entries.push([`shared.${key}`, w.shared[key]!, (acc, v) => { (acc.shared as unknown as Record<string, tf.Tensor>)[key] = v; }]);
      }
    }
  }
  return {
    tensors: entries.map(e => e[1]),
    names: entries.map(e => e[0]),
    rebuild: ts => {
      const acc: MoEBlockWeights = {
        router: { ...w.router, lora: [...(w.router.lora ?? [])] },
        experts: { ...w.experts, gateUpLoRA: [...(w.experts.gateUpLoRA ?? [])], downLoRA: [...(w.experts.downLoRA ?? [])] },
        shared: w.shared && { ...w.shared },
      };
      entries.forEach(([, , set], i) => set(acc, ts[i]));
      return acc;
    },
  };
}

function runBlock(b: Built, lora: boolean, options: Parameters<typeof moeBlock>[3]) {
  const { tensors, names, rebuild } = trainedTensors(b, lora);
  const f = (x: tf.Tensor, ...ts: tf.Tensor[]) => {
    const { out, routing } = moeBlock(x as tf.Tensor2D, rebuild(ts), b.config, options);
    tf.dispose([routing.weights, routing.experts, routing.logits]);
    return tf.sum(tf.mul(out, b.g));
  };
  const { out, routing } = moeBlock(b.x, b.weights, b.config, options);
  const grads = tf.grads(f)([b.x, ...tensors]);
  const chosen = Array.from(routing.experts.dataSync());
  tf.dispose([routing.weights, routing.experts, routing.logits]);
  return { out, grads, names: ['x', ...names], chosen };
}

describe('moeBlock: fused vs reference', () => {
  it('has both kernels registered', () => {
    expect(moeBlockKernelNames()).to.include.members(['fused', 'reference']);
  });
  for (const fam of families) {
    for (const lora of [false, true]) {
      const modes = lora ? (['split', 'materialize'] as const) : (['auto'] as const);
      for (const loraMode of modes) {
        it(`${fam.name}${lora ? `, router + expert LoRA (${loraMode})` : ', full fine-tuning'}: outputs and every gradient`, () => {
          const b = build(fam, 13, lora, fam.E * 7 + (lora ? 1 : 0));
          expectNoLeak(() => {
            const fused = runBlock(b, lora, { expertKernel: 'fused', loraMode });
            const ref = runBlock(b, lora, { expertKernel: 'reference' });
            const sets = (c: number[]) => Array.from({ length: c.length / fam.routing.topK },
                (_, t) => c.slice(t * fam.routing.topK, (t + 1) * fam.routing.topK).sort((p, q) => p - q).join(','));
            expect(sets(fused.chosen), 'routing').to.deep.equal(sets(ref.chosen));
            expectClose(fused.out, ref.out, 1e-5, 'out');
            fused.grads.forEach((gr, i) => expectClose(gr, ref.grads[i], 1e-5, `d${fused.names[i]}`));
            tf.dispose([fused.out, ref.out, ...fused.grads, ...ref.grads]);
          });
          tf.dispose(b.all);
        });
      }
    }
  }

  it('an unknown expert kernel lists the registered ones', () => {
    const b = build(families[0], 3, false, 1);
    expectNoLeak(() => expect(() => moeBlock(b.x, b.weights, b.config, { expertKernel: 'turbo' }))
      .to.throw(/`moeBlock\(\)`: 'options.expertKernel' must be one of 'fused', 'reference'.* but got 'turbo'/));
    tf.dispose(b.all);
  });

  it('bad expert weights after routing leave nothing behind', () => {
    const b = build(families[0], 3, false, 2);
    const bad = tf.zeros([8, 12, 5]) as tf.Tensor3D;
    expectNoLeak(() => expect(() => moeBlock(b.x, { ...b.weights, experts: { ...b.weights.experts, down: bad } }, b.config))
      .to.throw(/`fusedExperts\(\)`: 'weights.down' must have shape \[8,12,6\] but got \[8,12,5\]/));
    tf.dispose([...b.all, bad]);
  });

  it('the reference with its routing read beforehand (hostExperts) gives the same output and gradients', () => {
    const b = build(families[0], 9, true, 5);
    expectNoLeak(() => {
      const first = moeBlock(b.x, b.weights, b.config, { expertKernel: 'reference' });
      const hostExperts = Int32Array.from(first.routing.experts.dataSync());
      tf.dispose([first.out, first.routing.weights, first.routing.experts, first.routing.logits]);
      const lossOf = (options: { hostExperts?: Int32Array }) => tf.valueAndGrads((x: tf.Tensor, w1: tf.Tensor) => {
        const { out, routing } = referenceMoEBlock(x as tf.Tensor2D,
            { ...b.weights, experts: { ...b.weights.experts, gateUp: w1 as tf.Tensor3D } }, b.config, options);
        tf.dispose([routing.experts]);
        return tf.sum(tf.mul(out, b.g));
      })([b.x, b.weights.experts.gateUp as tf.Tensor3D]);
      const read = lossOf({});
      const given = lossOf({ hostExperts });
      expectClose(given.value, read.value, 0, 'loss');
      given.grads.forEach((g, i) => expectClose(g, read.grads[i], 0, `grad ${i}`));
      tf.dispose([read.value, given.value, ...read.grads, ...given.grads]);
    });
    tf.dispose(b.all);
  });

  it('bad hostExperts name the argument, the expected and the actual value, and leave nothing behind', () => {
    const b = build(families[0], 3, false, 6);
    expectNoLeak(() => {
      expect(() => referenceMoEBlock(b.x, b.weights, b.config, { hostExperts: [0, 1, 2] }))
        .to.throw(/`referenceExperts\(\)`: 'options.hostExperts' must hold the 6 chosen experts of routing.experts \[3,2\] but got length 3/);
      expect(() => referenceMoEBlock(b.x, b.weights, b.config, { hostExperts: [0, 1, 2, 8, 4, 5] }))
        .to.throw(/'options.hostExperts' must hold expert ids in \[0, 8\) but element 3 is 8/);
    });
    tf.dispose(b.all);
  });
});
