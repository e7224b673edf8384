/**
 * Class-level patching: the fused path equals the layer's own path (outputs and gradients) for
 * every routing family with and without LoRA; idempotence; exact restore; layers created and
 * loaded after register(); adapters added and removed; a user's own MoE class via a descriptor.
 */
import * as tf from '@tensorflow/tfjs-core';
import { moeKernelNames } from '../../src/backends/register_all_kernels.js';
import * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { LORA_TARGETS, SparseMoE, type LoRATarget, type SparseMoEArgs } from '../../src/layers/sparse_moe.js';
import { registerMoELayerDescriptor } from '../../src/patch/descriptor.js';
import { PATCHED_CALL, patchOptions, unwrapCall } from '../../src/patch/patch_class.js';
import { isRegistered, register, unregister } from '../../src/plugin.js';
import { expectClose, expectNoLeak, Rng, tensorOf } from '../helpers/numeric.js';
import { BARE_DESCRIPTOR, BareMoE, TOY_DESCRIPTOR, ToyMoE, builtToy } from '../helpers/toy_moe.js';

type Call = (this: tfl.layers.Layer, inputs: tf.Tensor | tf.Tensor[], kwargs: object) => tf.Tensor;
const protoCall = (cls: { prototype: unknown }) => (cls.prototype as { call: Call }).call;

/** Every weight of the layer random (router spread out so that top-k has no near-ties). */
function randomize(layer: tfl.layers.Layer, seed: number): void {
  const rng = new Rng(seed);
  for (const w of layer.weights) {
    const name = w.originalName.split('/').pop()!;
    const scale = /router|kernel/.test(name) && !/lora/.test(name) ? 2 : /bias/.test(name) ? 0.3 : 0.5;
    tf.tidy(() => { w.write(tensorOf(rng.array(w.shape.reduce((a, b) => a! * b!, 1)!, scale), w.shape as number[])); });
  }
}

/** The layer's output and the gradients of sum(out·G) for x and every trainable weight. */
function outAndGrads(layer: tfl.layers.Layer, x: tf.Variable, g: tf.Tensor, call?: Call) {
  const run = () => (call ? call.call(layer, x, {}) : layer.apply(x) as tf.Tensor);
  const vars = [x, ...layer.trainableWeights.map(w => w.read() as tf.Variable)];
  const out = tf.tidy(run);
  const { value, grads } = tf.variableGrads(() => tf.sum(tf.mul(run(), g)) as tf.Scalar, vars);
  value.dispose();
  return { out, grads: vars.map(v => grads[v.name]), names: ['x', ...layer.trainableWeights.map(w => w.originalName)] };
}

function maxAbs(t: tf.Tensor): number {
  const m = tf.tidy(() => tf.max(tf.abs(t)));
  const v = m.dataSync()[0];
  m.dispose();
  return v;
}

function disposeLayer(layer: tfl.layers.Layer) {
  layer.weights.forEach(w => w.dispose());
}

interface Family { name: string; args: SparseMoEArgs }

const families: Family[] = [
  { name: 'mixtral: softmaxTopK, renormalised',
    args: { numExperts: 8, intermediateSize: 4, routing: { kind: 'softmaxTopK', topK: 2, renormalize: true } } },
  { name: 'qwen2_moe: softmaxTopK without renormalisation, sigmoid-gated shared expert',
    args: { numExperts: 6, intermediateSize: 4, routing: { kind: 'softmaxTopK', topK: 2, renormalize: false },
      sharedExpert: { intermediateSize: 5, gated: true } } },
  { name: 'gpt-oss: topKSoftmax, transposed interleaved experts with biases, router bias, clamped SwiGLU',
    args: { numExperts: 5, intermediateSize: 4, routing: { kind: 'topKSoftmax', topK: 2 }, expertLayout: 'inOutInterleaved',
      expertBias: true, routerBias: true, activation: { kind: 'clampedSwiglu', alpha: 1.702, limit: 1.5 } } },
  { name: 'deepseek_v3: sigmoidGroupTopK with correction bias, ×2.5, shared expert',
    args: { numExperts: 16, intermediateSize: 3, routing: { kind: 'sigmoidGroupTopK', topK: 4, nGroup: 4, topkGroup: 2,
      renormalize: true, scalingFactor: 2.5 }, correctionBias: true, sharedExpert: { intermediateSize: 5, gated: false } } },
  { name: 'mistral4: softmaxGroupTopK',
    args: { numExperts: 6, intermediateSize: 3, routing: { kind: 'softmaxGroupTopK', topK: 2, nGroup: 2, topkGroup: 1, renormalize: true } } },
  { name: 'deepseek_v2: softmaxGroupLimitedGreedy',
    args: { numExperts: 8, intermediateSize: 3, routing: { kind: 'softmaxGroupLimitedGreedy', topK: 3, nGroup: 4, topkGroup: 2, scalingFactor: 1.25 } } },
];

const H = 8;

describe('patching: the fused path equals the layer’s own path', () => {
  afterEach(() => unregister());

  families.forEach((fam, f) => {
    for (const lora of [false, true]) {
      it(`${fam.name}${lora ? ', LoRA on experts, router (and shared expert)' : ', full fine-tuning'}`, () => {
        const layer = new SparseMoE({ ...fam.args, name: `fam${f}` });
        layer.build([null, null, H]);
        randomize(layer, 100 + f);
        const targets: LoRATarget[] = LORA_TARGETS.filter(t => !t.startsWith('shared.') || fam.args.sharedExpert)
            .filter(t => t !== 'shared.sigmoid_gate' || fam.args.sharedExpert?.gated === true);
        const adapter = { name: 'default', r: 2, alpha: 4, targets };
        if (lora) layer.addAdapter(adapter, 'random');
        const rng = new Rng(7 + f);
        const x = tf.variable(tensorOf(rng.array(2 * 5 * H), [2, 5, H]));
        const g = tensorOf(rng.array(2 * 5 * H), [2, 5, H]);
        expectNoLeak(() => {
          const own = outAndGrads(layer, x, g);
          const handle = register({ models: [layer], lora: lora ? { r: 2, alpha: 4, targets } : null });
          expect(handle.patched).to.deep.equal([{ layer: `fam${f}`, className: 'SparseMoE', routing: fam.args.routing.kind,
            kernel: 'fused', adapter: lora ? 'default' : null, adapterAdded: false }]);
          // the layer's own kernel field is not used any more: the wrapper runs moeBlock 'fused'
          layer.expertKernel = 'no-such-kernel';
          const patched = outAndGrads(layer, x, g);
          layer.expertKernel = 'reference';
          expect(patched.names).to.deep.equal(own.names);
          expect(patched.names.length).to.equal(lora ? 1 + 2 * targets.length : 1 + layer.weights.length - (fam.args.correctionBias ? 1 : 0));
          expectClose(patched.out, own.out, 1e-5, 'out');
          patched.grads.forEach((gr, i) => expectClose(gr, own.grads[i], 1e-5, `d${own.names[i]}`));
          handle.unregister();
          const again = tf.tidy(() => layer.apply(x) as tf.Tensor);
          expect(Array.from(again.dataSync())).to.deep.equal(Array.from(own.out.dataSync()));
          tf.dispose([own.out, ...own.grads, patched.out, ...patched.grads, again]);
        });
        expect(layer.adapterNames()).to.deep.equal(lora ? ['default'] : []);
        tf.dispose([x, g]);
        disposeLayer(layer);
      });
    }
  });
});

describe('patching: register / unregister', () => {
  const removers: Array<() => void> = [];
  before(() => {
    removers.push(registerMoELayerDescriptor(TOY_DESCRIPTOR), registerMoELayerDescriptor(BARE_DESCRIPTOR));
  });
  after(() => removers.forEach(r => r()));
  afterEach(() => unregister());

  it('is idempotent: a second register() does not wrap again; unregister() puts back the same function objects', () => {
    const originals = [SparseMoE, ToyMoE].map(c => Object.getOwnPropertyDescriptor(c.prototype, 'call'));
    const sparseCall = protoCall(SparseMoE);
    expect(Object.prototype.hasOwnProperty.call(BareMoE.prototype, 'call')).to.equal(false);
    const h1 = register();
    const wrapper = protoCall(SparseMoE);
    expect(wrapper).to.not.equal(sparseCall);
    expect(unwrapCall(wrapper)).to.equal(sparseCall);
    expect((wrapper as unknown as Record<symbol, unknown>)[PATCHED_CALL]).to.not.equal(undefined);
    expect(h1.patchedClasses).to.deep.equal(['ToyMoE', 'SparseMoE']);
    const h2 = register({ expertKernel: 'reference', loraMode: 'split' });
    expect(protoCall(SparseMoE)).to.equal(wrapper);
    expect(unwrapCall(unwrapCall(protoCall(SparseMoE)))).to.equal(undefined);
    expect(unwrapCall(protoCall(ToyMoE))).to.equal(unwrapCall(protoCall(BareMoE)));
    expect(h2.patchedClasses).to.deep.equal(['ToyMoE', 'SparseMoE']);
    expect(h2.expertKernel).to.equal('reference');
    expect(patchOptions()).to.deep.equal({ expertKernel: 'reference', loraMode: 'split' });
    h1.unregister();
    expect(h1.active).to.equal(false);
    expect(h2.active).to.equal(false);
    expect(isRegistered()).to.equal(false);
    expect(patchOptions()).to.equal(null);
    expect(protoCall(SparseMoE)).to.equal(sparseCall);
    expect([SparseMoE, ToyMoE].map(c => Object.getOwnPropertyDescriptor(c.prototype, 'call'))).to.deep.equal(originals);
    expect(Object.prototype.hasOwnProperty.call(BareMoE.prototype, 'call')).to.equal(false);
    h2.unregister();
    expect(protoCall(SparseMoE)).to.equal(sparseCall);
  });

  it('a subclass registered before its parent gets its own wrapper, deleted again on unregister', () => {
    const removeToy = removers.shift()!;
    removeToy();
    const toyCall = protoCall(ToyMoE);
    let handle;
    try {
      handle = register();
      expect(Object.prototype.hasOwnProperty.call(BareMoE.prototype, 'call')).to.equal(true);
      expect(unwrapCall(protoCall(BareMoE))).to.equal(toyCall);
      expect(protoCall(ToyMoE)).to.equal(toyCall);
      // ToyMoE registered now, while the plugin is in effect: patched at once (no double wrap via BareMoE)
      removers.unshift(registerMoELayerDescriptor(TOY_DESCRIPTOR));
      expect(unwrapCall(protoCall(ToyMoE))).to.equal(toyCall);
      expect(unwrapCall(protoCall(BareMoE))).to.equal(toyCall);
      handle.unregister();
      expect(Object.prototype.hasOwnProperty.call(BareMoE.prototype, 'call')).to.equal(false);
      expect(protoCall(ToyMoE)).to.equal(toyCall);
    } finally {
      if (removers.length < 2) removers.unshift(registerMoELayerDescriptor(TOY_DESCRIPTOR));
    }
  });

  it('a descriptor removed while registered restores its class at once', () => {
    class LateMoE extends ToyMoE { static override className = 'LateMoE'; override call(inputs: tf.Tensor | tf.Tensor[]) { return super.call(inputs); } }
    const lateCall = protoCall(LateMoE);
    const handle = register();
    const remove = registerMoELayerDescriptor({ ...BARE_DESCRIPTOR, className: 'LateMoE', layerClass: LateMoE,
      matches: l => l instanceof LateMoE });
    expect(unwrapCall(protoCall(LateMoE))).to.equal(lateCall);
    expect(handle.patchedClasses).to.not.include('LateMoE');
    remove();
    expect(protoCall(LateMoE)).to.equal(lateCall);
    remove();
    handle.unregister();
    expect(protoCall(LateMoE)).to.equal(lateCall);
  });

  it('adds the adapter to the MoE layers of args.models, freezes their base, keeps user adapters; unregister removes only its own', () => {
    const input = tfl.input({ shape: [4, H] });
    const a = new SparseMoE({ name: 'moe_a', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 },
      sharedExpert: { intermediateSize: 5, gated: true } });
    const b = new SparseMoE({ name: 'moe_b', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } });
    const model = tfl.model({ inputs: input, outputs: b.apply(a.apply(input)) as tfl.SymbolicTensor });
    b.addAdapter({ name: 'default', r: 2, alpha: 4, targets: ['experts.gate_up', 'router'] }, 'random');
    const weightsBefore = [...a.weights];
    const flagsBefore = a.weights.map(w => w.trainable);
    const bWeights = [...b.weights];
    const before = tf.memory().numTensors;
    const handle = register({ models: [model], lora: { r: 2, alpha: 4, targets: ['experts.gate_up', 'router'] } });
    expect(handle.patched.map(p => [p.layer, p.adapterAdded])).to.deep.equal([['moe_a', true], ['moe_b', false]]);
    expect(a.adapterNames()).to.deep.equal(['default']);
    expect(a.trainableWeights.map(w => w.originalName.split('/').pop())).to.deep.equal([
      'lora_default_gate_up_A', 'lora_default_gate_up_B', 'lora_default_router_A', 'lora_default_router_B']);
    expect(model.trainableWeights.length).to.equal(8);
    expect(tf.memory().numTensors).to.equal(before + 4);
    handle.unregister();
    expect(a.adapterNames()).to.deep.equal([]);
    expect(a.weights).to.deep.equal(weightsBefore);
    expect(a.weights.every((w, i) => w === weightsBefore[i])).to.equal(true);
    expect(a.weights.map(w => w.trainable)).to.deep.equal(flagsBefore);
    expect(b.adapterNames()).to.deep.equal(['default']);
    expect(b.weights.every((w, i) => w === bWeights[i])).to.equal(true);
    expect(tf.memory().numTensors).to.equal(before);
    // the same adapter name can be added again after unregister
    const again = register({ models: [a], lora: { r: 1, alpha: 1, targets: ['shared.up'] } });
    expect(again.patched.map(p => p.adapterAdded)).to.deep.equal([true]);
    expect(a.adapter('default').config.targets).to.deep.equal(['shared.up']);
    again.unregister();
    model.dispose();
  });

  it('finds MoE layers in nested models once; an unbuilt layer gets its adapter when it is built', () => {
    const inner = tfl.sequential({ layers: [new SparseMoE({ name: 'inner_moe', numExperts: 4, intermediateSize: 3,
      routing: { kind: 'softmaxTopK', topK: 2 }, inputShape: [H] })] });
    const input = tfl.input({ shape: [H] });
    const outer = tfl.model({ inputs: input, outputs: inner.apply(tfl.layers.dense({ units: H }).apply(input)) as tfl.SymbolicTensor });
    const late = new SparseMoE({ name: 'late_moe', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } });
    const handle = register({ models: [outer, inner, late], lora: { r: 2, alpha: 4, targets: ['router'] } });
    expect(handle.patched.map(p => [p.layer, p.adapterAdded])).to.deep.equal([['inner_moe', true], ['late_moe', true]]);
    expect(late.adapterNames()).to.deep.equal(['default']);
    late.build([null, H]);
    expect(late.trainableWeights.map(w => w.originalName.split('/').pop())).to.deep.equal(['lora_default_router_A', 'lora_default_router_B']);
    handle.unregister();
    expect(late.adapterNames()).to.deep.equal([]);
    expect(late.weights.map(w => w.trainable)).to.deep.equal([true, true, true]);
    expect((inner.layers[0] as SparseMoE).adapterNames()).to.deep.equal([]);
    outer.dispose();
    disposeLayer(late);
  });

  it('rejects a second register() whose adapter differs from the one added by the first (nothing changes)', () => {
    const layer = new SparseMoE({ name: 'moe_c', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } });
    layer.build([null, H]);
    register({ models: [layer], lora: { r: 2, alpha: 4 }, loraMode: 'split' });
    const call = protoCall(SparseMoE);
    expect(() => register({ models: [layer], lora: { r: 3, alpha: 4 }, loraMode: 'materialize' }))
      .to.throw(/lora: expected the layer's existing adapter 'default' to match the args \(r = 3,/);
    expect(patchOptions()).to.deep.equal({ expertKernel: 'fused', loraMode: 'split' });
    expect(protoCall(SparseMoE)).to.equal(call);
    expect(layer.adapter('default').config.r).to.equal(2);
    unregister();
    expect(layer.adapterNames()).to.deep.equal([]);
    disposeLayer(layer);
  });

  it('a failed validation patches nothing and adds no adapter', () => {
    const layer = new SparseMoE({ name: 'moe_d', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } });
    layer.build([null, H]);
    const toy = builtToy({ name: 'toy_d', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } });
    const calls = [SparseMoE, ToyMoE, BareMoE].map(protoCall);
    const names = [layer, toy].map(l => l.weights.map(w => `${w.name}:${w.trainable}`));
    const before = tf.memory().numTensors;
    // valid LoRA for both layers, one bad arg elsewhere
    expect(() => register({ models: [layer, toy], lora: { r: 2, alpha: 4, targets: ['router'] }, strict: 'yes' as never }))
      .to.throw(/strict: expected a boolean but got 'yes'/);
    expect([SparseMoE, ToyMoE, BareMoE].map(protoCall)).to.deep.equal(calls);
    expect([layer, toy].map(l => l.weights.map(w => `${w.name}:${w.trainable}`))).to.deep.equal(names);
    expect(layer.adapterNames()).to.deep.equal([]);
    expect((toy as ToyMoE).routerAdapters.size).to.equal(0);
    expect(tf.memory().numTensors).to.equal(before);
    expect(isRegistered()).to.equal(false);
    disposeLayer(layer);
    disposeLayer(toy);
  });

  it('a hook that throws half-way: the error passes through and everything this call did is undone (finally)', () => {
    const first = new SparseMoE({ name: 'moe_e', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } });
    first.build([null, H]);
    const toy = builtToy({ name: 'toy_e', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } });
    const addRouterAdapter = toy.addRouterAdapter;
    toy.addRouterAdapter = () => { throw new Error('disk full'); };
    const calls = [SparseMoE, ToyMoE].map(protoCall);
    const flags = first.weights.map(w => w.trainable);
    const before = tf.memory().numTensors;
    try {
      expect(() => register({ models: [first, toy], lora: { r: 2, alpha: 4, targets: ['router'] } })).to.throw('disk full');
    } finally {
      toy.addRouterAdapter = addRouterAdapter;
    }
    expect(first.adapterNames()).to.deep.equal([]);
    expect(first.weights.map(w => w.trainable)).to.deep.equal(flags);
    expect([SparseMoE, ToyMoE].map(protoCall)).to.deep.equal(calls);
    expect(isRegistered()).to.equal(false);
    expect(tf.memory().numTensors).to.equal(before);
    disposeLayer(first);
    disposeLayer(toy);
  });

  it('the handle names the layers, families, kernel and backend; this package’s kernels for the backend', () => {
    const layer = new SparseMoE({ name: 'moe_f', numExperts: 6, intermediateSize: 3,
      routing: { kind: 'sigmoidGroupTopK', topK: 2, nGroup: 3, topkGroup: 2 }, correctionBias: true });
    layer.build([null, H]);
    const handle = register({ models: [layer] });
    expect(handle.backend).to.equal(tf.getBackend());
    // every kernel this package has for the backend, and each one really registered there
    expect(handle.kernels).to.deep.equal(moeKernelNames(tf.getBackend()));
    handle.kernels.forEach(k => expect(tf.getKernel(k, tf.getBackend()), k).to.not.equal(undefined));
    if (tf.getBackend() === 'wasm') expect(handle.kernels).to.include('UnsortedSegmentSum');
    expect(handle.patched).to.deep.equal([{ layer: 'moe_f', className: 'SparseMoE', routing: 'sigmoidGroupTopK',
      kernel: 'fused', adapter: null, adapterAdded: false }]);
    expect(handle.active).to.equal(true);
    handle.unregister();
    disposeLayer(layer);
  });
});

describe('patching: layers created or loaded after register()', () => {
  afterEach(() => unregister());

  it('a model saved (toJSON + weights), loaded after register() runs the fused path; equal outputs and gradients', async () => {
    const input = tfl.input({ shape: [3, H] });
    const moe = new SparseMoE({ name: 'moe', numExperts: 6, intermediateSize: 4, routing: { kind: 'softmaxTopK', topK: 2 },
      sharedExpert: { intermediateSize: 5, gated: true } });
    const model = tfl.model({ inputs: input, outputs: moe.apply(input) as tfl.SymbolicTensor });
    randomize(moe, 5);
    let saved: tf.io.ModelArtifacts | undefined;
    await model.save(tf.io.withSaveHandler(async artifacts => {
      saved = artifacts;
      return { modelArtifactsInfo: { dateSaved: new Date(), modelTopologyType: 'JSON' } };
    }));
    expect(JSON.stringify(model.toJSON(undefined, false))).to.include('"class_name":"SparseMoE"');
    const handle = register();
    const loaded = await tfl.loadLayersModel(tf.io.fromMemory(saved!));
    const loadedMoE = loaded.layers.find(l => l instanceof SparseMoE) as SparseMoE;
    expect(unwrapCall(loadedMoE.call)).to.equal(unwrapCall(protoCall(SparseMoE)));
    expect(unwrapCall(loadedMoE.call)).to.not.equal(undefined);
    const x = tf.variable(tf.randomNormal([2, 3, H], 0, 1, 'float32', 3));
    const g = tf.randomNormal([2, 3, H], 0, 1, 'float32', 4);
    expectNoLeak(() => {
      loadedMoE.expertKernel = 'no-such-kernel';
      const patched = outAndGrads(loadedMoE, x, g);
      // the same layer through the original (reference) call
      loadedMoE.expertKernel = 'reference';
      const own = outAndGrads(loadedMoE, x, g, unwrapCall(protoCall(SparseMoE)) as Call);
      expectClose(patched.out, own.out, 1e-5, 'out');
      patched.grads.forEach((gr, i) => expectClose(gr, own.grads[i], 1e-5, `d${own.names[i]}`));
      const viaModel = loaded.predict(x) as tf.Tensor;
      expectClose(viaModel, own.out, 1e-5, 'loaded model predict');
      tf.dispose([patched.out, ...patched.grads, own.out, ...own.grads, viaModel]);
    });
    handle.unregister();
    expect(loadedMoE.call).to.equal(unwrapCall(loadedMoE.call) ?? loadedMoE.call);
    expect(unwrapCall(loadedMoE.call)).to.equal(undefined);
    tf.dispose([x, g]);
    model.dispose();
    loaded.dispose();
  });

  it('a SparseMoE created after register() is patched; training it keeps numTensors stable', () => {
    register({ loraMode: 'split' });
    const layer = new SparseMoE({ name: 'late', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 },
      expertKernel: 'no-such-kernel' });
    layer.build([null, H]);
    randomize(layer, 9);
    layer.addAdapter({ name: 'default', r: 2, alpha: 4, targets: ['experts.gate_up', 'experts.down'] });
    const x = tf.randomNormal([6, H], 0, 1, 'float32', 1);
    const target = tf.randomNormal([6, H], 0, 1, 'float32', 2);
    const opt = tf.train.adam(0.05);
    const loss = () => tf.mean(tf.square(tf.sub(layer.apply(x) as tf.Tensor, target))) as tf.Scalar;
    const base = layer.nonTrainableWeights.map(w => w.read().dataSync().slice());
    const counts: number[] = [];
    const losses: number[] = [];
    for (let step = 0; step < 6; step++) {
      const l = opt.minimize(loss, true, layer.trainableWeights.map(w => w.read() as tf.Variable))!;
      losses.push(l.dataSync()[0]);
      l.dispose();
      counts.push(tf.memory().numTensors);
    }
    expect(new Set(counts.slice(1)).size, `numTensors per step: ${counts}`).to.equal(1);
    expect(losses[5]).to.be.below(losses[0]);
    layer.nonTrainableWeights.forEach((w, i) => expect(Array.from(w.read().dataSync()), w.name).to.deep.equal(Array.from(base[i])));
    unregister();
    expect(() => layer.apply(x)).to.throw(/'options.expertKernel' must be one of .* but got 'no-such-kernel'/);
    opt.dispose();
    tf.dispose([x, target]);
    disposeLayer(layer);
  });
});

describe('patching: a user MoE layer class through a descriptor', () => {
  const removers: Array<() => void> = [];
  before(() => {
    removers.push(registerMoELayerDescriptor(TOY_DESCRIPTOR), registerMoELayerDescriptor(BARE_DESCRIPTOR));
  });
  after(() => removers.forEach(r => r()));
  afterEach(() => unregister());

  for (const renormalize of [true, false]) {
    it(`ToyMoE (Keras-layout weights, dense own call, renormalize ${renormalize}): fused = own, outputs and gradients; router LoRA added and removed`, () => {
      const toy = builtToy({ name: 'toy', numExperts: 6, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2, renormalize } }, 5);
      const x = tf.variable(tf.randomNormal([7, 5], 0, 1, 'float32', 11));
      const g = tf.randomNormal([7, 5], 0, 1, 'float32', 12);
      expectNoLeak(() => {
        const own = outAndGrads(toy, x, g);
        expect(toy.ownCalls).to.equal(2);
        const handle = register({ models: [toy] });
        expect(handle.patched).to.deep.equal([{ layer: 'toy', className: 'ToyMoE', routing: 'softmaxTopK', kernel: 'fused',
          adapter: null, adapterAdded: false }]);
        const patched = outAndGrads(toy, x, g);
        expect(toy.ownCalls, 'the own call did not run').to.equal(2);
        expect(patched.names).to.deep.equal(['x', 'router_kernel', 'w_gate', 'w_up', 'w_down']);
        expectClose(patched.out, own.out, 1e-5, 'out');
        patched.grads.forEach((gr, i) => expectClose(gr, own.grads[i], 1e-5, `d${own.names[i]}`));
        tf.dispose([own.out, ...own.grads, patched.out, ...patched.grads]);
        handle.unregister();
      });
      // router LoRA through the descriptor's hooks
      const before = tf.memory().numTensors;
      const handle = register({ models: [toy], lora: { r: 2, alpha: 3, targets: ['router'] } });
      expect(handle.patched[0].adapterAdded).to.equal(true);
      expect(toy.trainableWeights.map(w => w.originalName)).to.deep.equal(['lora_default_A', 'lora_default_B']);
      const { B } = toy.routerAdapters.get('default')!;
      tf.tidy(() => { B.write(tf.randomNormal(B.shape as number[], 0, 1, 'float32', 13)); });
      const patched = outAndGrads(toy, x, g);
      const calls = toy.ownCalls;
      const own = outAndGrads(toy, x, g, unwrapCall(protoCall(ToyMoE)) as Call);
      expect(toy.ownCalls).to.equal(calls + 2);
      expectClose(patched.out, own.out, 1e-5, 'out with router LoRA');
      patched.grads.forEach((gr, i) => expectClose(gr, own.grads[i], 1e-5, `d${own.names[i]}`));
      expect(maxAbs(patched.grads[1]), 'dA is not zero').to.be.above(0);
      tf.dispose([own.out, ...own.grads, patched.out, ...patched.grads]);
      handle.unregister();
      expect(toy.routerAdapters.size).to.equal(0);
      expect(toy.trainableWeights.map(w => w.originalName)).to.deep.equal(['router_kernel', 'w_gate', 'w_up', 'w_down']);
      expect(tf.memory().numTensors).to.equal(before);
      tf.dispose([x, g]);
      disposeLayer(toy);
    });
  }

  it('BareMoE (descriptor without layerClass: found by its registered class name; inherits call) is patched too', () => {
    const bare = builtToy({ name: 'bare', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 1 } }, 5, BareMoE);
    const x = tf.randomNormal([4, 5], 0, 1, 'float32', 21);
    const own = bare.apply(x) as tf.Tensor;
    const handle = register({ models: [bare] });
    expect(handle.patched[0].className).to.equal('BareMoE');
    const patched = bare.apply(x) as tf.Tensor;
    expect(bare.ownCalls).to.equal(1);
    expectClose(patched, own, 1e-5, 'out');
    tf.dispose([x, own, patched]);
    disposeLayer(bare);
  });

  it('registerMoELayerDescriptor rejects bad descriptors', () => {
    expect(() => registerMoELayerDescriptor({ ...TOY_DESCRIPTOR, getBlockWeights: undefined as never, className: 'X' }))
      .to.throw(/`registerMoELayerDescriptor\(\)`: 'getBlockWeights' must be a function but got undefined/);
    expect(() => registerMoELayerDescriptor(TOY_DESCRIPTOR))
      .to.throw(/`registerMoELayerDescriptor\(\)`: a descriptor for 'ToyMoE' is already registered; remove it first/);
    expect(() => registerMoELayerDescriptor({ ...TOY_DESCRIPTOR, className: 'SparseMoE' }))
      .to.throw(/a descriptor for 'SparseMoE' is already registered \(built in\)/);
    expect(() => registerMoELayerDescriptor({ ...BARE_DESCRIPTOR, className: 'NoSuchMoE' }))
      .to.throw(/'layerClass' is not given and no class named 'NoSuchMoE' is registered with tf.serialization.registerClass; pass the class as layerClass/);
    expect(() => registerMoELayerDescriptor({ ...TOY_DESCRIPTOR, className: 'Y', lora: { ...TOY_DESCRIPTOR.lora!, add: 3 as never } }))
      .to.throw(/'lora.add' must be a function but got number/);
  });
});
