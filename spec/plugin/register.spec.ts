/** register() against the active backend: the fused backends, and an unknown one (fallback or strict error). */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { PluginArgsError } from '../../src/args/errors.js';
import { SparseMoE } from '../../src/layers/sparse_moe.js';
import { patchOptions } from '../../src/patch/patch_class.js';
import { FUSED_BACKENDS, isRegistered, register, unregister } from '../../src/plugin.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';

/** A backend tfjs does not know kernels for; nothing runs on it (register() computes nothing). */
class OtherBackend extends tf.KernelBackend {
  override dispose(): void {}
}

describe('register(): backends', () => {
  let original: string;
  let layer: SparseMoE;

  before(() => {
    original = tf.getBackend();
    layer = new SparseMoE({ name: 'moe_bk', numExperts: 4, intermediateSize: 3, routing: { kind: 'softmaxTopK', topK: 2 } });
    layer.build([null, 8]);
    tf.registerBackend('otherbackend', () => new OtherBackend(), -100);
  });

  after(async () => {
    unregister();
    await tf.setBackend(original);
    tf.removeBackend('otherbackend');
    layer.weights.forEach(w => w.dispose());
  });

  afterEach(() => unregister());

  async function onOtherBackend<T>(fn: () => T): Promise<T> {
    expect(await tf.setBackend('otherbackend')).to.equal(true);
    try {
      return fn();
    } finally {
      await tf.setBackend(original);
    }
  }

  it('the test backend is one with the fused kernels', () => {
    expect(FUSED_BACKENDS).to.include(original);
    const handle = register({ models: [layer] });
    expect(handle.backend).to.equal(original);
    expect(handle.expertKernel).to.equal('fused');
    expect(handle.patched[0].kernel).to.equal('fused');
  });

  it("an unknown backend with 'fused': the composed 'reference' path and one console.warn, however often register() runs", async () => {
    const warnings: string[] = [];
    const hookWarn = console.warn;
    console.warn = (...args: unknown[]) => { warnings.push(args.map(String).join(' ')); };
    try {
      await onOtherBackend(() => {
        const h1 = register({ models: [layer] });
        const h2 = register({ models: [layer], loraMode: 'split' });
        expect(h1.backend).to.equal('otherbackend');
        expect(h1.kernels).to.deep.equal([]);
        expect(h1.expertKernel).to.equal('reference');
        expect(h2.patched[0].kernel).to.equal('reference');
        expect(patchOptions()).to.deep.equal({ expertKernel: 'reference', loraMode: 'split' });
      });
    } finally {
      console.warn = hookWarn;
    }
    expect(warnings).to.deep.equal(["tfjs-moe-lora: backend 'otherbackend' has no fused MoE kernels; the MoE layers run the " +
        "composed 'reference' path (pass strict: true to make this an error)"]);
  });

  it("an unknown backend with 'reference' asked for: no warning", async () => {
    await onOtherBackend(() => expect(register({ expertKernel: 'reference', strict: true }).expertKernel).to.equal('reference'));
  });

  it('an unknown backend with strict: true is a PluginArgsError, and nothing is registered', async () => {
    const call = SparseMoE.prototype.call;
    const err = await onOtherBackend(() => {
      try {
        register({ models: [layer], strict: true });
      } catch (e) {
        return e;
      }
      return undefined;
    });
    expect(err).to.be.instanceOf(PluginArgsError);
    expect((err as PluginArgsError).problems.map(p => p.message)).to.deep.equal([
      "expertKernel: expected an active backend with the fused kernels (cpu, wasm, webgpu, webgl, tensorflow) for 'fused' " +
      "but the active backend is 'otherbackend' (strict: true; use expertKernel 'reference', or strict: false to fall back " +
      'to it with a warning)']);
    expect(isRegistered()).to.equal(false);
    expect(SparseMoE.prototype.call).to.equal(call);
  });
});

describe('register() with LoRA on a whole model', () => {
  it('trains the adapters only, as PEFT does, and unregister() gives the other weights back', async () => {
    const model = await loadHFCheckpoint('spec/fixtures/hf/qwen3_moe');
    const trainableBefore = model.weights.filter(w => w.trainable).map(w => w.originalName);
    const handle = register({ models: [model], lora: { r: 2, alpha: 4, targets: ['experts.gate_up', 'router'] } });
    const names = model.trainableWeights.map(w => w.originalName);
    expect(names.length).to.equal(2 * 4);   // 2 MoE layers × (gate_up A, B, router A, B)
    expect(names.every(n => /lora_default_/.test(n)), names.join(', ')).to.equal(true);
    handle.unregister();
    expect(model.weights.filter(w => w.trainable).map(w => w.originalName)).to.deep.equal(trainableBefore);
    model.weights.forEach(w => w.dispose());
  });
});
