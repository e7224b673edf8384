import * as tf from '@tensorflow/tfjs-core';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { SparseMoE, type SparseMoEArgs } from '../../src/layers/sparse_moe.js';
import { dropoutSeedOf } from '../../src/ops/lora/dropout.js';
import { withSequenceContext, type SequenceContext } from '../../src/layers/sequence_context.js';
import { sharedExpert } from '../../src/ops/shared_expert.js';
import { expectClose, expectNoLeak } from '../helpers/numeric.js';

const qwen2Like: SparseMoEArgs = {
  numExperts: 6, intermediateSize: 4, routing: { kind: 'softmaxTopK', topK: 2, renormalize: false },
  sharedExpert: { intermediateSize: 5, gated: true }, initializerRange: 0.3,
};

function maxAbs(t: tf.Tensor): number {
  const m = tf.tidy(() => tf.max(tf.abs(t)));
  const v = m.dataSync()[0];
  m.dispose();
  return v;
}

function built(args: SparseMoEArgs, h = 8): SparseMoE {
  const layer = new SparseMoE(args);
  layer.build([null, null, h]);
  return layer;
}

describe('SparseMoE layer', () => {
  it('runs on [B, S, H] and the fused kernel equals the reference one', () => {
    const layer = built(qwen2Like);
    const x = tf.randomNormal([2, 3, 8]);
    expectNoLeak(() => {
      const ref = layer.apply(x) as tf.Tensor;
      layer.expertKernel = 'fused';
      const fused = layer.apply(x) as tf.Tensor;
      layer.expertKernel = 'reference';
      expect(fused.shape).to.deep.equal([2, 3, 8]);
      expectClose(fused, ref, 1e-5, 'out');
      tf.dispose([ref, fused]);
    });
    tf.dispose(x);
    layer.weights.forEach(w => w.dispose());
  });

  it('adding an adapter freezes the base; B = 0 keeps the output exactly; training moves only LoRA tensors', () => {
    const layer = built({ ...qwen2Like, expertKernel: 'fused' });
    // seeded throughout: the run is the same every time (it once failed in a full suite, unseeded)
    const reseed = (names: RegExp) => layer.weights.forEach((w, i) => {
      if (names.test(w.originalName)) w.write(tf.tidy(() => tf.randomNormal(w.shape as number[], 0, 0.3, 'float32', 100 + i)));
    });
    reseed(/^(?!.*lora_)/);
    const x = tf.randomNormal([10, 8], 0, 1, 'float32', 1);
    const base = layer.apply(x) as tf.Tensor;
    layer.addAdapter({ name: 'default', r: 2, alpha: 4, targets: ['experts.gate_up', 'experts.down', 'router'] });
    reseed(/lora_default_\w+_A$/);
    expect(layer.trainableWeights.map(w => w.originalName.split('/').pop())).to.deep.equal([
      'lora_default_gate_up_A', 'lora_default_gate_up_B', 'lora_default_down_A', 'lora_default_down_B',
      'lora_default_router_A', 'lora_default_router_B']);
    const same = layer.apply(x) as tf.Tensor;
    expect(Array.from(same.dataSync())).to.deep.equal(Array.from(base.dataSync()));
    const frozen = layer.nonTrainableWeights.map(w => w.read().dataSync().slice());
    const opt = tf.train.adam(0.05);
    const target = tf.randomNormal([10, 8], 0, 1, 'float32', 2);
    const loss = () => tf.mean(tf.square(tf.sub(layer.apply(x) as tf.Tensor, target))) as tf.Scalar;
    const first = loss().dataSync()[0];
    const before = tf.memory().numTensors;
    for (let step = 0; step < 15; step++) {
      const { value, grads } = tf.variableGrads(loss);
      for (const w of layer.trainableWeights) {
        expect(grads[(w.read() as tf.Variable).name], w.originalName).to.not.equal(undefined);
      }
      opt.applyGradients(grads as tf.NamedTensorMap as never);
      tf.dispose([value, ...Object.values(grads)]);
      if (step === 0) expect(tf.memory().numTensors).to.be.at.least(before);
      if (step === 1) var steady = tf.memory().numTensors;   // eslint-disable-line no-var
      if (step > 1) expect(tf.memory().numTensors, `numTensors at step ${step}`).to.equal(steady!);
    }
    expect(loss().dataSync()[0]).to.be.below(first);
    layer.nonTrainableWeights.forEach((w, i) => expect(Array.from(w.read().dataSync()), w.originalName).to.deep.equal(Array.from(frozen[i])));
    tf.dispose([x, base, same, target]);
    opt.dispose();
    layer.weights.forEach(w => w.dispose());
  });

  it('several adapters add up; disabled and withAdaptersDisabled give the base; merge equals applying', () => {
    const layer = built({ ...qwen2Like, expertKernel: 'fused' });
    const x = tf.randomNormal([7, 8]);
    const base = layer.apply(x) as tf.Tensor;
    layer.addAdapter({ name: 'a', r: 2, alpha: 4, targets: ['experts.gate_up', 'router'] }, 'random');
    layer.addAdapter({ name: 'b', r: 1, alpha: 1, rsLoRA: true, targets: ['experts.down'] }, 'random');
    expect(layer.activeAdapters).to.deep.equal(['a', 'b']);
    expect(layer.adapter('b').scaling).to.equal(1);
    const both = layer.apply(x) as tf.Tensor;
    expect(tf.max(tf.abs(tf.sub(both, base))).dataSync()[0]).to.be.above(1e-3);
    const off = layer.withAdaptersDisabled(() => layer.apply(x) as tf.Tensor);
    expect(Array.from(off.dataSync())).to.deep.equal(Array.from(base.dataSync()));
    expect(layer.adaptersDisabled).to.equal(false);
    layer.setActiveAdapters(['a']);
    const onlyA = layer.apply(x) as tf.Tensor;
    layer.setActiveAdapters(['a', 'b']);
    layer.mergeAdapter('a');
    layer.mergeAdapter('b');
    const merged = layer.apply(x) as tf.Tensor;
    expectClose(merged, both, 1e-5, 'merged vs applied');
    layer.unmergeAdapter('b');
    layer.unmergeAdapter('a');
    const back = layer.apply(x) as tf.Tensor;
    expectClose(back, both, 1e-5, 'unmerged');
    expect(() => layer.setActiveAdapters(['c'])).to.throw(/`SparseMoE.setActiveAdapters\(\)`: unknown adapters c; adapters: a, b/);
    expect(() => layer.addAdapter({ name: 'a', r: 1, alpha: 1, targets: ['router'] })).to.throw(/an adapter named 'a' already exists/);
    expect(() => layer.addAdapter({ name: 'z', r: 0, alpha: 1, targets: ['router'] })).to.throw(/'r' must be >= 1 but got 0/);
    expect(() => layer.addAdapter({ name: 'z', r: 1, alpha: 1, targets: ['shared'] as never })).to.throw(/'targets\[0\]' must be one of 'experts.gate_up', 'experts.down', 'router', 'shared.gate', 'shared.up', 'shared.down', 'shared.sigmoid_gate' but got 'shared'/);
    expect(() => layer.addAdapter({ name: 'z', r: 1, alpha: 1, targets: ['router', 'router'] })).to.throw(/`SparseMoE.addAdapter\(\)`: 'targets' must not repeat a target but got 'router' twice/);
    expect(() => layer.deltaWeight('b', 'router')).to.throw(/adapter 'b' does not target 'router'/);
    expect(onlyA.shape).to.deep.equal([7, 8]);
    tf.dispose([x, base, both, off, onlyA, merged, back]);
    layer.weights.forEach(w => w.dispose());
  });

  it('LoRA on the shared expert: A [r, in], B [out, r], output changes by exactly the shared delta, fused = reference, merge = apply', () => {
    const layer = built({ ...qwen2Like, expertKernel: 'fused' });
    const x = tf.randomNormal([9, 8]);
    const base = layer.apply(x) as tf.Tensor;
    const before = layer.blockWeights().shared!;
    const baseShared = sharedExpert(x as tf.Tensor2D, { ...before, lora: undefined });
    layer.addAdapter({ name: 's', r: 2, alpha: 3, targets: ['shared.gate', 'shared.up', 'shared.down'] }, 'random');
    const names = layer.trainableWeights.map(w => `${w.originalName.split('/').pop()} [${w.shape}]`);
    expect(names).to.deep.equal(['lora_s_shared_gate_A [2,8]', 'lora_s_shared_gate_B [5,2]', 'lora_s_shared_up_A [2,8]',
      'lora_s_shared_up_B [5,2]', 'lora_s_shared_down_A [2,5]', 'lora_s_shared_down_B [8,2]']);
    const w = layer.blockWeights();
    expect(w.shared!.lora!.gate!.length).to.equal(1);
    expect(w.shared!.lora!.gate![0].scaling).to.equal(1.5);
    expect(w.router.lora).to.deep.equal([]);
    const withLoRA = layer.apply(x) as tf.Tensor;
    // the routed part is untouched: out - base = shared(with LoRA) - shared(without)
    const sharedNow = sharedExpert(x as tf.Tensor2D, w.shared!);
    const delta = tf.sub(sharedNow, baseShared);
    expect(maxAbs(delta)).to.be.above(1e-3);
    expectClose(tf.sub(withLoRA, base), delta, 1e-4, 'out - base');
    layer.expertKernel = 'reference';
    const ref = layer.apply(x) as tf.Tensor;
    layer.expertKernel = 'fused';
    expectClose(withLoRA, ref, 1e-5, 'fused vs reference');
    const f = layer.adapter('s').factors['shared.down']!;
    const dw = layer.deltaWeight('s', 'shared.down');
    expectClose(dw, tf.mul(tf.matMul(f.B.read(), f.A.read()), 1.5), 1e-6, 'deltaWeight shared.down');
    // every shared LoRA tensor gets a gradient, the frozen base none
    const { grads } = tf.variableGrads(() => tf.sum(tf.square(layer.apply(x) as tf.Tensor)) as tf.Scalar);
    for (const v of layer.trainableWeights) {
      const g = grads[(v.read() as tf.Variable).name];
      expect(g, v.originalName).to.not.equal(undefined);
      expect(maxAbs(g), v.originalName).to.be.above(0);
    }
    expect(Object.keys(grads).length).to.equal(6);
    const sharedBase = layer.weightVariable('shared_down').read().dataSync().slice();
    layer.mergeAdapter('s');
    const merged = layer.apply(x) as tf.Tensor;
    expectClose(merged, withLoRA, 1e-5, 'merged vs applied');
    layer.unmergeAdapter('s');
    expectClose(layer.weightVariable('shared_down').read(), sharedBase, 1e-6, 'unmerged shared_down');
    tf.dispose([x, base, baseShared, withLoRA, sharedNow, delta, ref, dw, merged, ...Object.values(grads)]);
    layer.weights.forEach(v => v.dispose());
  });

  it('lora_dropout on every MoE target: training passes only, seeded by the pass seed and the target; fused = reference; saved in the config', () => {
    const layer = built({ ...qwen2Like, expertKernel: 'fused' });
    layer.addAdapter({ name: 'd', r: 2, alpha: 4, dropout: 0.3,
      targets: ['experts.gate_up', 'experts.down', 'router', 'shared.gate', 'shared.up', 'shared.down'] }, 'random');
    const x = tf.randomNormal([1, 7, 8]);
    const run = (context: SequenceContext) => withSequenceContext(context, () => {
      const y = layer.apply(x) as tf.Tensor;
      const values = Array.from(y.dataSync());
      y.dispose();
      return values;
    });
    expectNoLeak(() => {
      const inference = run({});
      expect(run({ training: false, dropoutSeed: 3 })).to.deep.equal(inference);
      const trained = run({ training: true, dropoutSeed: 3 });
      expect(trained).to.not.deep.equal(inference);
      expect(run({ training: true, dropoutSeed: 3 })).to.deep.equal(trained);
      expect(run({ training: true, dropoutSeed: 4 })).to.not.deep.equal(trained);
      layer.expertKernel = 'reference';
      expectClose(run({ training: true, dropoutSeed: 3 }), trained, 1e-5, 'reference with the same masks');
      layer.expertKernel = 'fused';
      // each target its own seed, from the pass seed and the target's name
      withSequenceContext({ training: true, dropoutSeed: 3 }, () => {
        const w = layer.blockWeights();
        expect(w.experts.gateUpLoRA![0].dropout).to.deep.equal({ p: 0.3, seed: dropoutSeedOf(3, `${layer.name}.experts.gate_up/d`) });
        expect(w.experts.downLoRA![0].dropout!.seed).to.equal(dropoutSeedOf(3, `${layer.name}.experts.down/d`));
        expect(w.router.lora![0].dropout!.seed).to.not.equal(w.shared!.lora!.up![0].dropout!.seed);
      });
      expect(layer.blockWeights().experts.gateUpLoRA![0].dropout).to.equal(undefined);
      // every LoRA tensor gets a gradient through the dropped branches
      const { value, grads } = withSequenceContext({ training: true, dropoutSeed: 5 },
        () => tf.variableGrads(() => tf.sum(tf.square(layer.apply(x) as tf.Tensor)) as tf.Scalar));
      expect(Object.keys(grads).length).to.equal(12);
      for (const g of Object.values(grads)) expect(maxAbs(g)).to.be.above(0);
      tf.dispose([value, ...Object.values(grads)]);
    });
    // materialize has no branch input: refused in training, inference unaffected
    layer.loraMode = 'materialize';
    expect(() => run({ training: true, dropoutSeed: 3 })).to.throw(/`fusedExperts\(\)`: expert LoRA dropout needs loraMode 'split' or 'auto' but got loraMode 'materialize'/);
    expect(run({ training: false })).to.have.length(56);
    const config = layer.getConfig() as unknown as { adapters: Array<{ dropout?: number }> };
    expect(config.adapters[0].dropout).to.equal(0.3);
    expect(() => layer.addAdapter({ name: 'e', r: 1, alpha: 1, dropout: 1, targets: ['router'] }))
      .to.throw(/`SparseMoE.addAdapter\(\)`: 'dropout' must be a number in \[0, 1\) but got 1/);
    tf.dispose(x);
    layer.weights.forEach(v => v.dispose());
  });

  it('shared targets need a shared expert; a pending adapter can be removed before build', () => {
    const plain = new SparseMoE({ numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } });
    expect(() => plain.addAdapter({ name: 'a', r: 1, alpha: 1, targets: ['experts.down', 'shared.up'] }))
      .to.throw(/`SparseMoE.addAdapter\(\)`: target 'shared.up' needs a shared expert but the layer has none \(sharedExpert is null\)/);
    plain.addAdapter({ name: 'a', r: 1, alpha: 1, targets: ['experts.down'] });
    expect(plain.adapterNames()).to.deep.equal(['a']);
    plain.removeAdapter('a');
    expect(plain.adapterNames()).to.deep.equal([]);
    expect(plain.activeAdapters).to.deep.equal([]);
    plain.build([null, 6]);
    expect(plain.weights.map(v => v.originalName.split('/').pop())).to.deep.equal(['router_weight', 'gate_up', 'down']);
    plain.weights.forEach(v => v.dispose());
  });

  it('removing the last adapter gives the base its trainable flags back; the same name can be added again', () => {
    const layer = built({ ...qwen2Like, correctionBias: true, routing: { kind: 'sigmoidGroupTopK', topK: 2, nGroup: 2, topkGroup: 1 } });
    const flags = () => layer.weights.map(w => `${w.originalName.split('/').pop()}:${w.trainable}`);
    const before = flags();
    expect(before).to.include('correction_bias:false');
    layer.addAdapter({ name: 'a', r: 1, alpha: 1, targets: ['router'] });
    layer.addAdapter({ name: 'b', r: 1, alpha: 1, targets: ['experts.down'] });
    layer.removeAdapter('a');
    expect(layer.weightVariable('gate_up').trainable, 'frozen while b exists').to.equal(false);
    layer.removeAdapter('b');
    expect(flags()).to.deep.equal(before);
    layer.addAdapter({ name: 'a', r: 1, alpha: 1, targets: ['router'] });
    expect(layer.adapterNames()).to.deep.equal(['a']);
    expect(layer.weightVariable('gate_up').trainable).to.equal(false);
    layer.weights.forEach(w => w.dispose());
  });

  it('round-trips through getConfig / fromConfig with its adapters, and serializes in a model', () => {
    const input = tfl.input({ shape: [4, 8] });
    const layer = new SparseMoE({ ...qwen2Like, name: 'moe' });
    layer.addAdapter({ name: 'default', r: 2, alpha: 4, targets: ['experts.down', 'shared.up'] }, 'random');
    const model = tfl.model({ inputs: input, outputs: layer.apply(input) as tfl.SymbolicTensor });
    const json = model.toJSON(undefined, false) as object;
    const config = layer.getConfig();
    const clone = SparseMoE.fromConfig(SparseMoE, config) as SparseMoE;
    clone.build([null, 4, 8]);
    expect(clone.adapterNames()).to.deep.equal(['default']);
    expect(clone.weights.map(w => w.originalName.split('/').pop())).to.deep.equal(layer.weights.map(w => w.originalName.split('/').pop()));
    clone.setWeights(layer.getWeights());
    const x = tf.randomNormal([3, 4, 8]);
    const a = model.predict(x) as tf.Tensor;
    const b = clone.apply(x) as tf.Tensor;
    expect(Array.from(b.dataSync())).to.deep.equal(Array.from(a.dataSync()));
    expect(JSON.stringify(json)).to.include('"class_name":"SparseMoE"');
    tf.dispose([x, a, b]);
    model.dispose();
    clone.weights.forEach(w => w.dispose());
  });

  it('rejects bad constructor arguments', () => {
    expect(() => new SparseMoE({ ...qwen2Like, numExperts: 0 })).to.throw(/`SparseMoE\(\)`: 'numExperts' must be >= 1 but got 0/);
    expect(() => new SparseMoE({ ...qwen2Like, routing: { kind: 'softmaxTopK', topK: 7 } })).to.throw(/'routing.topK' must be <= 6 but got 7/);
    expect(() => new SparseMoE({ ...qwen2Like, expertLayout: 'rows' as never })).to.throw(/'expertLayout' must be one of 'outIn', 'inOutInterleaved' but got 'rows'/);
  });
});
