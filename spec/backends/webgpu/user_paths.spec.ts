/**
 * Every path a user takes, on webgpu (where dataSync throws: every read is asynchronous): load,
 * parity with transformers, register LoRA, seeded init, savePeftAdapter and back, evaluate,
 * generate, saveHFCheckpoint, merge, and the CLI's convert and inspect with --backend webgpu, on
 * the qwen3_moe fixture and its bf16 (packed experts) and int8 (quantized) forms. Each result is
 * checked against the fixture (transformers' and PEFT's outputs, the bytes transformers wrote)
 * or against the same path run on the cpu backend in this process. Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { generate } from '../../../src/generate/generate.js';
import { loadHFCheckpoint } from '../../../src/io/hf_checkpoint.js';
import { saveHFCheckpoint } from '../../../src/io/hf_save.js';
import { mergeAdapterIntoCheckpoint } from '../../../src/io/merge.js';
import { peftAdapterTensors } from '../../../src/io/peft.js';
import { loadPeftAdapter, savePeftAdapter } from '../../../src/io/peft_files.js';
import { readSafetensorsFile } from '../../../src/io/safetensors.js';
import { sparseMoELayers } from '../../../src/layers/moe_causal_lm.js';
import { runBlockParity } from '../../../src/models/parity.js';
import { OpArgumentError } from '../../../src/ops/validate.js';
import { register } from '../../../src/plugin.js';
import { evaluateLoss, generateGreedy, withAdaptersDisabled } from '../../../src/train/evaluate.js';
import { seedAdapterInit, seedModelInit } from '../../../src/train/seeded_init.js';
import { buildMoECausalLM } from '../../../src/layers/moe_causal_lm.js';
import { maxRelativeError } from '../../../src/util/numeric.js';
import { runMain } from '../../cli/run_cli.js';
import { writeHalfFixture } from '../../helpers/half_checkpoint.js';
import { cleanup, fixtureConfig, fixtureDir, golden, tempDir } from '../../io/checkpoint_helpers.js';
import { onCpu } from './helpers.js';

const ARCH = 'qwen3_moe';
const FIXTURE = fixtureDir(ARCH);
const ADAPTER = join(FIXTURE, 'adapter');
/** the cpu parity spec's tolerance for logits against transformers / PEFT (spec/io/peft.spec.ts, merge.spec.ts) */
const LOGITS_TOL = 1e-4;

async function logitsOf(model: tfl.LayersModel, ids: number[][]): Promise<Float32Array> {
  const x = tf.tensor2d(ids, [ids.length, ids[0].length], 'int32');
  try {
    const y = model.predict(x) as tf.Tensor;
    const values = await y.data() as Float32Array;
    y.dispose();
    return values;
  } finally {
    x.dispose();
  }
}

/** Every tensor of a safetensors file: its dtype and its values. */
async function fileTensors(path: string): Promise<Map<string, { dtype: string; values: Float32Array }>> {
  const file = await readSafetensorsFile(path);
  const out = new Map<string, { dtype: string; values: Float32Array }>();
  for (const name of file.names()) {
    const t = await file.tensor(name);
    out.set(name, { dtype: file.info(name).dtype, values: Float32Array.from(await t.data()) });
    t.dispose();
  }
  return out;
}

/** Σ −log softmax(logits[t])[ids[t+1]] / (S − 1) in float64, for row `row` of [B, S, V] logits. */
function meanNextTokenLoss(logits: Float32Array, ids: number[][], row: number, vocab: number): number {
  const s = ids[row].length;
  let sum = 0;
  for (let t = 0; t < s - 1; t++) {
    const at = (row * s + t) * vocab;
    let max = -Infinity;
    for (let v = 0; v < vocab; v++) max = Math.max(max, logits[at + v]);
    let z = 0;
    for (let v = 0; v < vocab; v++) z += Math.exp(logits[at + v] - max);
    sum += -(logits[at + ids[row][t + 1]] - max - Math.log(z));
  }
  return sum / (s - 1);
}

const maxAbs = (a: ArrayLike<number>) => Array.from(a).reduce((m, v) => Math.max(m, Math.abs(v)), 0);

describe('webgpu: every user path, with asynchronous reads only', () => {
  let ids: number[][];
  let vocab: number;
  let wantBase: Float32Array;
  let wantLoRA: Float32Array;

  before(async function () {
    if (tf.getBackend() !== 'webgpu') throw new Error(`the webgpu specs need TFJS_BACKEND=webgpu (backend is ${tf.getBackend()})`);
    const g = await golden(ARCH);
    const [i, base, lora] = await Promise.all(['input_ids', 'logits', 'lora.logits'].map(n => g.tensor(n)));
    ids = await i.array() as number[][];
    vocab = base.shape[2] as number;
    wantBase = Float32Array.from(await base.data());
    wantLoRA = Float32Array.from(await lora.data());
    tf.dispose([i, base, lora]);
    // the cpu backend's first tensor prints a one-off "install tfjs-node" notice: take it here,
    // outside the tests (spec/setup.ts fails a test that warns)
    await onCpu(async () => tf.dispose(tf.scalar(0)));
  });
  after(cleanup);

  it('load; parity with transformers: the logits with and without the PEFT adapter, the block (runBlockParity)', async () => {
    const before = tf.memory().numTensors;
    const model = await loadHFCheckpoint(FIXTURE);
    const loaded = tf.memory().numTensors;
    // unregistered, a SparseMoE runs the reference loop (the cpu/wasm oracle), which reads the
    // routing synchronously: refused with the way out, not a crash inside tfjs
    let refusal: unknown;
    try { await logitsOf(model, ids); } catch (e) { refusal = e; }
    expect(refusal).to.be.instanceOf(OpArgumentError);
    expect((refusal as Error).message).to.equal('`referenceExperts()`: the reference expert loop reads the chosen experts ' +
        'synchronously, which the webgpu backend cannot do: register() the plugin (its fused kernels run there; an ' +
        "unregistered SparseMoE uses 'reference'), or pass options.hostExperts (await routing.experts.data())");
    expect(tf.memory().numTensors, 'the refused forward left nothing behind').to.equal(loaded);
    const handle = register({ models: [model] });
    const base = maxRelativeError(await logitsOf(model, ids), wantBase);
    expect(base, `logits vs transformers ${base.toExponential(2)}`).to.be.at.most(LOGITS_TOL);
    await loadPeftAdapter(model, ADAPTER);
    const adapted = maxRelativeError(await logitsOf(model, ids), wantLoRA);
    expect(adapted, `logits with the adapter vs PEFT ${adapted.toExponential(2)}`).to.be.at.most(LOGITS_TOL);
    handle.unregister();
    model.dispose();
    // the block: out, dx, every parameter gradient and the routing against the fixture
    const r = await runBlockParity(FIXTURE);
    expect(r.backend).to.equal('webgpu');
    expect(r.comparisons.filter(c => !c.pass), 'comparisons over the tolerance').to.deep.equal([]);
    expect(r.tolerance).to.equal(1e-4);
    expect(r.routingIdentical).to.equal(true);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('evaluateLoss (adapted and withAdaptersDisabled), generateGreedy and generate: the fixture\'s losses and tokens', async () => {
    const model = await loadHFCheckpoint(FIXTURE);
    await loadPeftAdapter(model, ADAPTER);
    const handle = register({ models: [model] });
    try {
      const before = tf.memory().numTensors;
      const tokens = Int32Array.from(ids[0]);
      // the loss from transformers' logits in float64; a logit error e moves the loss by at most 2e
      const bound = (want: Float32Array) => 2 * LOGITS_TOL * maxAbs(want);
      const adapted = await evaluateLoss(model, tokens, { seq: tokens.length });
      expect(Math.abs(adapted - meanNextTokenLoss(wantLoRA, ids, 0, vocab))).to.be.at.most(bound(wantLoRA));
      const base = await withAdaptersDisabled(model, () => evaluateLoss(model, tokens, { seq: tokens.length }));
      expect(Math.abs(base - meanNextTokenLoss(wantBase, ids, 0, vocab))).to.be.at.most(bound(wantBase));
      expect(sparseMoELayers(model).every(l => !l.adaptersDisabled), 'adapters back on').to.equal(true);

      const greedy = Array.from(await generateGreedy(model, tokens, { maxNewTokens: 4 }));
      // the first new token: the argmax of PEFT's logits at the prompt's last position
      const last = Array.from(wantLoRA.subarray((tokens.length - 1) * vocab, tokens.length * vocab));
      expect(greedy[0]).to.equal(last.indexOf(Math.max(...last)));
      const cached = await generate(model, Array.from(tokens), { maxNewTokens: 4 });
      expect(Array.from(cached.ids)).to.deep.equal(greedy);
      expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
      // and the same tokens as on cpu
      const cpu = await onCpu(async () => {
        const m = await loadHFCheckpoint(FIXTURE);
        await loadPeftAdapter(m, ADAPTER);
        try {
          return Array.from(await generateGreedy(m, tokens, { maxNewTokens: 4 }));
        } finally {
          m.dispose();
        }
      });
      expect(greedy).to.deep.equal(cpu);
    } finally {
      handle.unregister();
      model.dispose();
    }
  });

  it('register LoRA, seeded init, savePeftAdapter → loadPeftAdapter: the factors and files the cpu path gives', async () => {
    const lora = { r: 4, alpha: 8, targets: ['experts.gate_up', 'experts.down', 'router'] as const };
    // a model built from the config: seedModelInit, then the adapter's seeded A and a B set to
    // values, so that the saved adapter is not the no-op B = 0
    const run = async (dir: string) => {
      const model = buildMoECausalLM(await fixtureConfig(ARCH));
      await seedModelInit(model, 4, 0.2);
      const handle = register({ models: [model], lora: { ...lora, targets: [...lora.targets] } });
      seedAdapterInit(model, 'default', 5);
      for (const [k, t] of peftAdapterTensors(model).entries()) {
        if (t.factor !== 'B') continue;
        const value = tf.fill(t.variable.shape as number[], 0.01 * (k + 1));
        t.variable.write(value);
        value.dispose();
      }
      const factors = await Promise.all(peftAdapterTensors(model).map(async t => Array.from(await t.variable.read().data())));
      const weights = await Promise.all(model.weights.map(async w => Array.from(await w.read().data())));
      await savePeftAdapter(model, dir);
      const logits = await logitsOf(model, ids);
      handle.unregister();
      return { model, factors, weights, logits };
    };
    const [gpuDir, cpuDir] = [await tempDir('webgpu-peft-'), await tempDir('cpu-peft-')];
    const before = tf.memory().numTensors;
    const gpu = await run(gpuDir);
    const cpu = await onCpu(async () => {
      const r = await run(cpuDir);
      r.model.dispose();
      return r;
    });
    expect(gpu.weights, 'seedModelInit: the cpu weights').to.deep.equal(cpu.weights);
    expect(gpu.factors, 'seedAdapterInit: the cpu factors').to.deep.equal(cpu.factors);
    for (const name of ['adapter_model.safetensors', 'adapter_config.json']) {
      expect((await readFile(join(gpuDir, name))).equals(await readFile(join(cpuDir, name))), `${name}: the cpu bytes`).to.equal(true);
    }
    const logitsErr = maxRelativeError(gpu.logits, cpu.logits);
    expect(logitsErr, `adapted logits vs cpu ${logitsErr.toExponential(2)}`).to.be.at.most(LOGITS_TOL);
    // loaded back into a fresh model: exactly the saved factors
    const fresh = buildMoECausalLM(await fixtureConfig(ARCH));
    await loadPeftAdapter(fresh, gpuDir);
    const back = await Promise.all(peftAdapterTensors(fresh).map(async t => Array.from(await t.variable.read().data())));
    expect(back).to.deep.equal(gpu.factors);
    fresh.dispose();
    gpu.model.dispose();
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('seedModelInit on a model whose weights were already used on the device: the cpu\'s seeded weights', async () => {
    // a forward first moves every weight onto the GPU (a new tensor's values wait on the host until
    // first use), where only an asynchronous read reaches them
    const run = async () => {
      const model = buildMoECausalLM(await fixtureConfig(ARCH));
      const handle = register({ models: [model] });  // the fused kernels: the reference expert loop reads synchronously
      await logitsOf(model, ids);
      handle.unregister();
      await seedModelInit(model, 4, 0.2);
      const weights = await Promise.all(model.weights.map(async w => Array.from(await w.read().data())));
      model.dispose();
      return weights;
    };
    const before = tf.memory().numTensors;
    const gpu = await run();
    const cpu = await onCpu(run);
    expect(gpu).to.deep.equal(cpu);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('saveHFCheckpoint gives back the fixture byte for byte; merge gives PEFT\'s logits', async () => {
    const before = tf.memory().numTensors;
    const model = await loadHFCheckpoint(FIXTURE);
    const saved = await tempDir('webgpu-save-');
    await saveHFCheckpoint(model, saved);
    model.dispose();
    expect((await readFile(join(saved, 'model.safetensors'))).equals(await readFile(join(FIXTURE, 'model.safetensors'))),
        'model.safetensors byte-identical to the one transformers wrote').to.equal(true);

    const merged = await tempDir('webgpu-merge-');
    const result = await mergeAdapterIntoCheckpoint(FIXTURE, ADAPTER, merged);
    expect(result.saved.dtype).to.equal('float32');
    const m = await loadHFCheckpoint(merged);
    const handle = register({ models: [m] });
    const err = maxRelativeError(await logitsOf(m, ids), wantLoRA);
    handle.unregister();
    m.dispose();
    expect(err, `merged logits vs PEFT ${err.toExponential(2)}`).to.be.at.most(LOGITS_TOL);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('bf16 experts stay packed: save writes them back bit for bit; merge writes the cpu\'s merge; mergeAdapter refuses to re-pack', async () => {
    const root = await tempDir('webgpu-bf16-');
    const [dir16, dir32] = [join(root, 'bf16'), join(root, 'f32')];
    await writeHalfFixture(FIXTURE, 'bf16', dir16, dir32);
    const before = tf.memory().numTensors;
    const model = await loadHFCheckpoint(dir16);
    expect(sparseMoELayers(model).map(l => l.expertStorage)).to.deep.equal(['bf16', 'bf16']);
    const out = join(root, 'saved');
    await saveHFCheckpoint(model, out);
    const [written, source] = await Promise.all([fileTensors(join(out, 'model.safetensors')), fileTensors(join(dir16, 'model.safetensors'))]);
    expect([...written.keys()].sort()).to.deep.equal([...source.keys()].sort());
    for (const [name, t] of written) {
      expect(t.dtype, name).to.equal('BF16');
      expect(Buffer.from(t.values.buffer).equals(Buffer.from(source.get(name)!.values.buffer)), `${name} bit for bit`).to.equal(true);
    }
    // merging into packed experts re-packs them on the host, synchronously: refused, nothing changed
    await loadPeftAdapter(model, ADAPTER);
    const layer = sparseMoELayers(model)[0];
    const words = Array.from(await layer.weightVariable('gate_up').read().data());
    let refusal: unknown;
    try { layer.mergeAdapter('default'); } catch (e) { refusal = e; }
    expect(refusal).to.be.instanceOf(OpArgumentError);
    expect((refusal as Error).message).to.equal("`SparseMoE.mergeAdapter()`: adapter 'default' adapts 'gate_up', whose experts are " +
        'stored packed (bf16): re-packing them reads them synchronously, which the webgpu backend cannot do; load the ' +
        "model with expertDtype 'float32', or use mergeAdapterIntoCheckpoint (it writes the same bits)");
    expect(Array.from(await layer.weightVariable('gate_up').read().data())).to.deep.equal(words);
    model.dispose();
    // and unmerging an adapter merged on cpu (re-packs too), before anything changes
    const mergedOnCpu = await onCpu(async () => {
      const m = await loadHFCheckpoint(dir16);
      await loadPeftAdapter(m, ADAPTER);
      sparseMoELayers(m).forEach(l => l.mergeAdapter('default'));
      return m;
    });
    const mergedWords = Array.from(await sparseMoELayers(mergedOnCpu)[0].weightVariable('gate_up').read().data());
    refusal = undefined;
    try { sparseMoELayers(mergedOnCpu)[0].unmergeAdapter('default'); } catch (e) { refusal = e; }
    expect((refusal as Error).message).to.equal("`SparseMoE.unmergeAdapter()`: adapter 'default' adapts 'gate_up', whose experts are " +
        'stored packed (bf16): re-packing them reads them synchronously, which the webgpu backend cannot do; load the ' +
        "model with expertDtype 'float32', or use mergeAdapterIntoCheckpoint (it writes the same bits)");
    expect(Array.from(await sparseMoELayers(mergedOnCpu)[0].weightVariable('gate_up').read().data())).to.deep.equal(mergedWords);
    mergedOnCpu.dispose();

    // mergeAdapterIntoCheckpoint merges in float32 here and rounds once when writing: the cpu's
    // packed merge, up to one bf16 step where ΔW's last float32 bits differ between the backends
    const [gpuMerged, cpuMerged] = [join(root, 'merged-webgpu'), join(root, 'merged-cpu')];
    expect((await mergeAdapterIntoCheckpoint(dir16, ADAPTER, gpuMerged)).saved.dtype).to.equal('bfloat16');
    await onCpu(() => mergeAdapterIntoCheckpoint(dir16, ADAPTER, cpuMerged));
    const [g, c] = await Promise.all([gpuMerged, cpuMerged].map(d => fileTensors(join(d, 'model.safetensors'))));
    expect([...g.keys()].sort()).to.deep.equal([...c.keys()].sort());
    for (const [name, t] of g) {
      expect(t.dtype, name).to.equal('BF16');
      const err = maxRelativeError(t.values, c.get(name)!.values);
      expect(err, `${name} vs the cpu merge ${err.toExponential(2)}`).to.be.at.most(2 ** -8);
    }
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('int8 experts: merge with requantize reads asynchronously and reports the cpu\'s largest change', async () => {
    const before = tf.memory().numTensors;
    const options = { expertDtype: 'int8' as const, requantize: true, dtype: 'float32' as const };
    const [gpuDir, cpuDir] = [await tempDir('webgpu-int8-'), await tempDir('cpu-int8-')];
    const gpu = await mergeAdapterIntoCheckpoint(FIXTURE, ADAPTER, gpuDir, options);
    const cpu = await onCpu(() => mergeAdapterIntoCheckpoint(FIXTURE, ADAPTER, cpuDir, options));
    expect(gpu.requantizeMaxChange).to.be.above(0);
    expect(Math.abs(gpu.requantizeMaxChange! - cpu.requantizeMaxChange!)).to.be.at.most(1e-4 * cpu.requantizeMaxChange!);
    const [g, c] = await Promise.all([gpuDir, cpuDir].map(d => fileTensors(join(d, 'model.safetensors'))));
    for (const [name, t] of g) {
      const err = maxRelativeError(t.values, c.get(name)!.values);
      // one int8 step of a group where the merged value sits at a rounding boundary
      expect(err, `${name} vs the cpu merge ${err.toExponential(2)}`).to.be.at.most(1 / 127);
    }
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });

  it('the CLI\'s convert and inspect with --backend webgpu: the cpu\'s files and report', async () => {
    const before = tf.memory().numTensors;
    const [gpuOut, cpuOut] = [join(await tempDir('webgpu-convert-'), 'tfjs'), join(await tempDir('cpu-convert-'), 'tfjs')];
    const convert = (backend: string, out: string) =>
      runMain(['convert', '--from', 'hf', '--to', 'tfjs', '--input', FIXTURE, '--output', out, '--adapter', ADAPTER, '--backend', backend]);
    const gpu = await convert('webgpu', gpuOut);
    expect(gpu.code, gpu.stderr).to.equal(0);
    expect(tf.getBackend()).to.equal('webgpu');
    const cpu = await onCpu(() => convert('cpu', cpuOut));
    expect(cpu.code, cpu.stderr).to.equal(0);
    for (const name of ['model.json', 'weights.bin']) {
      expect((await readFile(join(gpuOut, name))).equals(await readFile(join(cpuOut, name))), `${name}: the cpu bytes`).to.equal(true);
    }
    const inspect = (backend: string) => runMain(['inspect', '--model', gpuOut, '--json', '--register', '--backend', backend]);
    const [gi, ci] = [await inspect('webgpu'), await onCpu(() => inspect('cpu'))];
    expect(gi.code, gi.stderr).to.equal(0);
    const [gr, cr] = [JSON.parse(gi.stdout), JSON.parse(ci.stdout)];
    expect(gr.register.backend).to.equal('webgpu');
    expect(gr.register.kernels).to.include('WebGPUMoEGroupedMatMul');
    expect(gr.moeLayers[0].adapters).to.have.length(1);
    // the backend and its kernels differ, nothing else
    for (const r of [gr, cr]) {
      delete r.register.backend;
      delete r.register.kernels;
    }
    expect(gr).to.deep.equal(cr);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
  });
});
