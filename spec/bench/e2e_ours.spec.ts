/**
 * bench/e2e/ours.ts, our side of issue 15's end-to-end run, on the qwen3_moe fixture for 2 steps on
 * the active backend: the JSON it writes, the token windows torch_peft.py trains on (recomputed
 * here from the text), the LoRA it trains (counted from the config, targets matching
 * torch_peft.py's), and the saved adapter loaded back into a fresh model giving the prompt logits
 * it wrote. Its argument checks. No timings are asserted.
 */
import * as tf from '@tensorflow/tfjs-core';
import type * as tfl from '@tensorflow/tfjs-layers';
import { expect } from 'chai';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import {
  assertTensorCores, defaultTokenizerPath, E2E_DOC_SEPARATOR, E2E_PROMPT, parseOursArgs, parseTfFlags, runOurs, type E2EOptions, trainingWindows, type E2EResult,
} from '../../bench/e2e/ours.js';
import { summarizeCpuProfile, type CpuProfile, type CpuProfileSummary } from '../../bench/e2e/cpu_profile.js';
import { programTimes, StepCounter, type StepProfile } from '../../bench/e2e/step_profile.js';
import { HFTokenizer } from '../../src/data/hf_tokenizer.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { isRegistered } from '../../src/plugin.js';

const FIXTURE = resolve('spec/fixtures/hf/qwen3_moe');
const TEXTS = ['Experts are chosen per token by a router.', 'LoRA trains two small factors beside each frozen weight.'];

async function logitsOf(model: tfl.LayersModel, ids: Int32Array): Promise<Float32Array> {
  const input = tf.tensor2d(ids, [1, ids.length], 'int32');
  const out = model.apply(input, { training: false }) as tf.Tensor;
  const values = await out.data() as Float32Array;
  tf.dispose([input, out]);
  return values;
}

const maxAbs = (a: ArrayLike<number>) => Array.from(a).reduce((m, v) => Math.max(m, Math.abs(v)), 0);
const maxDiff = (a: ArrayLike<number>, b: ArrayLike<number>) => Array.from(a).reduce((m, v, i) => Math.max(m, Math.abs(v - b[i])), 0);

describe('bench/e2e/ours.ts', function () {
  this.timeout(120_000);
  let dir: string;
  let data: string;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), 'e2e-ours-'));
    data = join(dir, 'text.jsonl');
    writeFileSync(data, TEXTS.map(text => JSON.stringify({ text })).join('\n\n') + '\n');
  });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('trains 2 steps, writes its JSON, the token windows and prompt logits, and an adapter that loads back', async () => {
    const out = join(dir, 'run');
    const before = tf.memory().numTensors;
    // Qwen3's tokenizer, as ours.ts finds it by default (built once: it takes seconds)
    const tokenizer = HFTokenizer.fromFiles({ tokenizer: readFileSync(defaultTokenizerPath(), 'utf8') });
    const result = await runOurs({
      model: FIXTURE, data, out, tokenizer, rank: 4, alpha: 8, batch: 2, seq: 8, warmup: 1, steps: 1, learningRate: 1e-2, log: () => {},
    });
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    expect(isRegistered(), 'the plugin is unregistered again').to.equal(false);

    // the JSON: what was returned, with the run's settings
    const written = JSON.parse(readFileSync(join(out, 'result.json'), 'utf8')) as E2EResult;
    expect(written).to.deep.equal(JSON.parse(JSON.stringify(result)));
    expect(result).to.include({ side: 'ours', name: 'stored', backend: tf.getBackend(), modelType: 'qwen3_moe', expertDtype: 'stored',
      batch: 2, seq: 8, warmup: 1, steps: 1, stage: 'done' });
    expect(result.errors).to.deep.equal({});
    expect(result.stepSeconds).to.have.length(2);
    expect(result.losses).to.have.length(2);
    // one GC figure a step, and the host's ms to each phase's end; bind groups and buffers made only on webgpu
    expect(result.stepGcMs).to.have.length(2);
    // V8's heap after each step
    expect(result.stepHeapMB).to.have.length(2);
    for (const heap of result.stepHeapMB) expect(heap.used).to.be.above(1);
    // by kind: every entry has one of the four, so the kinds add up to the step's figure
    expect(result.stepGcKindMs).to.have.length(2);
    result.stepGcKindMs.forEach((kinds, i) => {
      expect(Object.keys(kinds)).to.deep.equal(['major', 'minor', 'incremental', 'weakcb']);
      expect(Object.values(kinds).reduce((a, b) => a + b, 0)).to.be.closeTo(result.stepGcMs[i], 1e-6);
    });
    expect(result.stepPhaseMs).to.have.length(2);
    for (const phases of result.stepPhaseMs) {
      expect(Object.keys(phases)).to.deep.equal(['forward', 'backward', 'optimizer', 'lossRead']);
      Object.values(phases).forEach(ms => expect(ms).to.be.at.least(0));
    }
    const stepMs = result.stepSeconds[1] * 1000;
    expect(Object.values(result.stepPhaseMs[1]).reduce((a, b) => a + b, 0)).to.be.within(0.9 * stepMs, stepMs);
    expect(result.stepBindGroupsMade?.length).to.equal(tf.getBackend() === 'webgpu' ? 2 : undefined);
    expect(result.stepBytesAllocated?.length).to.equal(tf.getBackend() === 'webgpu' ? 2 : undefined);
    result.losses.forEach(l => expect(l).to.be.within(0.1, 20));
    expect(result.tokensPerSecond).to.be.closeTo(2 * 8 / result.stepSeconds[1], 1e-9);
    expect(result.loadSeconds).to.be.above(0);
    expect(result.memory.numBytes).to.be.above(0);
    // LoRA r 4 on each of the 2 layers (E 8, H 64, I 48, 4 heads and 2 KV heads of 16):
    // experts gate_up A [rE, H] B [2I, rE], down A [rE, I] B [H, rE], router A [r, H] B [E, r],
    // q A [r, H] B [64, r], k and v B [32, r], o A [r, 64] B [H, r]
    const r = 4, E = 8, H = 64, I = 48;
    const perLayer = r * E * H + 2 * I * r * E + r * E * I + H * r * E + r * H + E * r + (r * H + 64 * r) + 2 * (r * H + 32 * r) + (r * 64 + H * r);
    expect(result.params).to.deep.include({ trainable: 2 * perLayer, moeLayers: 2, experts: 8 });

    // the windows torch_peft.py reads: the texts' Qwen3 ids, <|endoftext|> after each, modulo the vocabulary 97
    expect(Array.from(tokenizer.encode(E2E_DOC_SEPARATOR, { addSpecialTokens: false }))).to.deep.equal([151643]);
    const stream = TEXTS.flatMap(t => [...tokenizer.encode(t, { addSpecialTokens: false }), 151643]).map(id => id % 97);
    expect(result.tokenizer).to.include({ path: '(given)', vocabSize: 151669, modelVocab: 97, idsTakenModulo: true, textTokens: stream.length });
    const idsFile = await readSafetensorsFile(result.idsFile!);
    const ids = await idsFile.tensor('input_ids');
    expect(ids.shape).to.deep.equal([2, 2, 9]);
    expect(ids.dtype).to.equal('int32');
    expect(Array.from(await ids.data())).to.deep.equal(Array.from({ length: 36 }, (_, i) => stream[i % stream.length]));
    ids.dispose();

    // the adapter: the targets torch_peft.py gives PEFT, and loaded into a fresh model it gives the prompt logits written
    const config = JSON.parse(readFileSync(join(result.adapterDir!, 'adapter_config.json'), 'utf8'));
    expect(config).to.include({ r: 4, lora_alpha: 8 });
    const torchSide = readFileSync('bench/e2e/torch_peft.py', 'utf8');
    const pyList = (name: string) => JSON.parse(torchSide.match(new RegExp(`^${name} = (\\[.*\\])$`, 'm'))![1]) as string[];
    expect(config.target_modules.map((m: string) => m.split('.').at(-1)).sort()).to.deep.equal(pyList('TARGET_MODULES').sort());
    expect([...config.target_parameters].sort()).to.deep.equal(pyList('TARGET_PARAMETERS').sort());

    const prompt = await readSafetensorsFile(result.promptFile!);
    const promptIds = await prompt.tensor('input_ids');
    const promptLogits = await prompt.tensor('logits');
    const expectedIds = Int32Array.from(tokenizer.encode(E2E_PROMPT, { addSpecialTokens: false }), id => id % 97);
    expect(Array.from(await promptIds.data())).to.deep.equal(Array.from(expectedIds));
    expect(promptLogits.shape).to.deep.equal([1, expectedIds.length, 97]);
    const ours = await promptLogits.data();
    tf.dispose([promptIds, promptLogits]);
    const adapted = await loadHFCheckpoint(FIXTURE);
    const base = await loadHFCheckpoint(FIXTURE);
    try {
      await loadPeftAdapter(adapted, result.adapterDir!);
      const reloaded = await logitsOf(adapted, expectedIds);
      const baseLogits = await logitsOf(base, expectedIds);
      const scale = maxAbs(ours);
      expect(maxDiff(reloaded, ours) / scale, 'adapter reloaded vs written logits').to.be.below(1e-5);
      // the trained adapter moves the logits far more than that: the round trip is not a no-op
      expect(maxDiff(baseLogits, ours) / scale, 'adapter effect').to.be.above(1e-3);
    } finally {
      adapted.dispose();
      base.dispose();
    }
    expect(tf.memory().numTensors).to.equal(before);
  });

  it('--profile on: one more step counted per phase, in profile.json; --cpu-profile on: the timed steps sampled by V8; --load-profile on: the load', async () => {
    const out = join(dir, 'profiled');
    const tokenizer = HFTokenizer.fromFiles({ tokenizer: readFileSync(defaultTokenizerPath(), 'utf8') });
    const before = tf.memory().numTensors;
    const result = await runOurs({
      model: FIXTURE, data, out, tokenizer, rank: 4, alpha: 8, batch: 1, seq: 8, warmup: 0, steps: 1, saveAdapter: false, profile: true,
      cpuProfile: true, loadProfile: true, log: () => {},
    });
    // --load-profile on: the load sampled, its functions summed
    expect(result.loadProfileFile).to.equal(join(out, 'load-cpu-profile.json'));
    const load = JSON.parse(readFileSync(result.loadProfileFile!, 'utf8')) as CpuProfileSummary;
    expect(load.inclusive.map(f => f.name).some(n => n.startsWith('loadHFCheckpoint '))).to.equal(true);
    expect(result.cpuProfileFile).to.equal(join(out, 'steps.cpuprofile'));
    const cpu = JSON.parse(readFileSync(join(out, 'cpu-profile.json'), 'utf8')) as CpuProfileSummary & { steps: number };
    expect(cpu.steps).to.equal(1);
    expect(cpu.totalMs).to.be.above(0);
    // the step ran tfjs kernels, so the engine's runKernel is among the functions the step sat in
    expect(cpu.inclusive.map(f => f.name).some(n => n.startsWith('Engine.runKernel ') || n.startsWith('runKernel '))).to.equal(true);
    expect(summarizeCpuProfile(JSON.parse(readFileSync(result.cpuProfileFile!, 'utf8')) as CpuProfile).totalMs).to.equal(cpu.totalMs);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    expect(result.errors).to.deep.equal({});
    expect(result.profileFile).to.equal(join(out, 'profile.json'));
    const profile = JSON.parse(readFileSync(result.profileFile!, 'utf8')) as StepProfile & { losses: number[]; seq: number };
    expect(profile).to.include({ backend: tf.getBackend(), seq: 8, recordOnlyMs: null, gpuMsByProgram: null, gpuMs: null });
    // the step after the timed one, on the same windows: trained a little, its loss a little lower
    expect(profile.losses).to.have.length(1);
    expect(profile.losses[0]).to.be.below(result.losses[0]).and.above(result.losses[0] - 0.5);
    // 2 layers × 7 targets × (A, B): Adam's composed update, 15 kernels per variable (no GPU here;
    // the moments are one [2, ...shape] tensor, unstacked and stacked again)
    const n = 28;
    expect(profile.kernelCounts.optimizer).to.deep.equal({ Multiply: 5 * n, Add: 3 * n, RealDiv: 2 * n, Sqrt: n, Square: n, Sub: n, Unpack: n, Pack: n });
    // tfjs-wasm's Slice (the Unpack of the moments, 2 a variable) reads its input through readSync: a view
    // of wasm's own heap, no copy and no device round trip; cpu's does not
    expect(profile.phases.optimizer).to.include({ kernels: 15 * n, dispatches: 0, reads: tf.getBackend() === 'wasm' ? 2 * n : 0 });
    expect(profile.phases.lossRead).to.include({ kernels: 0, reads: 1 });
    for (const phase of ['forward', 'backward'] as const) expect(profile.phases[phase].kernels, phase).to.be.above(50);
    const sum = (k: 'kernels' | 'reads') => Object.values(profile.phases).reduce((s, p) => s + p[k], 0);
    expect(profile.total).to.include({ kernels: sum('kernels'), reads: sum('reads') });
    expect(Object.values(profile.kernelCounts.forward).reduce((a, b) => a + b, 0)).to.equal(profile.phases.forward.kernels);
  });

  it('--ab-flags: rounds of one step per flag set, interleaved after the timed steps, each set put back after its step', async () => {
    const flag = 'E2E_OURS_SPEC_AB_FLAG';
    tf.env().registerFlag(flag, () => 1);
    const before = tf.memory().numTensors;
    const result = await runOurs({
      model: FIXTURE, data, out: join(dir, 'ab'), rank: 4, alpha: 8, batch: 1, seq: 8, warmup: 0, steps: 1, saveAdapter: false,
      abFlags: [{ [flag]: 2 }, { [flag]: 3 }], abRounds: 2, log: () => {},
    });
    expect(result.abSteps!.map(a => a.flags)).to.deep.equal([{}, { [flag]: 2 }, { [flag]: 3 }]);
    for (const a of result.abSteps!) {
      expect(a.stepSeconds).to.have.length(2);
      expect(a.medianTokensPerSecond).to.be.above(0);
    }
    expect(result.stepSeconds).to.have.length(1);  // the timed steps alone
    expect(tf.env().get(flag)).to.equal(1);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    await expectReject(runOurs({ model: FIXTURE, data, out: join(dir, 'x'), abRounds: 0, log: () => {} }), /'abRounds' must be >= 1 but got 0/);
    await expectReject(runOurs({ model: FIXTURE, data, out: join(dir, 'x'), abFlags: [{ NO_SUCH_FLAG_X: 1 }], log: () => {} }),
        /'abFlags' names NO_SUCH_FLAG_X, which is not a tf.env\(\) flag on /);
  });

  it('--pipeline-rounds: blocks of steps waiting on their loss, then blocks reading it one step late, training on', async () => {
    const before = tf.memory().numTensors;
    const options = { model: FIXTURE, data, rank: 4, alpha: 8, batch: 1, seq: 8, warmup: 0, steps: 1, saveAdapter: false, log: () => {} };
    // the adapters' random init (tfjs seeds it from Math.random) the same in both runs
    const run = async (more: Partial<E2EOptions> & { out: string }) => {
      const random = Math.random;
      let state = 1;
      Math.random = () => (state = (state * 48271) % 2147483647) / 2147483647;
      try {
        return await runOurs({ ...options, ...more });
      } finally {
        Math.random = random;
      }
    };
    const result = await run({ out: join(dir, 'pipeline'), pipelineRounds: 2 });
    const p = result.pipelineSteps!;
    expect(p.blockSteps).to.equal(4);
    for (const seconds of [p.waitingSeconds, p.oneLateSeconds]) {
      expect(seconds).to.have.length(2);
      for (const s of seconds) expect(s).to.be.above(0);
    }
    // the same 16 steps (one window: steps 1) each waiting on its loss, as A/B rounds of two empty
    // flag sets: reading a loss one step late changes no value
    const waiting = await run({ out: join(dir, 'pipeline-ref'), abFlags: [{}], abRounds: 8 });
    const [own, other] = waiting.abSteps!.map(a => a.losses);
    expect(p.losses).to.deep.equal(own.flatMap((loss, round) => [loss, other[round]]));
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    await expectReject(runOurs({ ...options, out: join(dir, 'x'), pipelineRounds: 0 }), /'pipelineRounds' must be >= 1 but got 0/);
  });

  it('--train-loop-rounds: blocks of trainLoop steps (clipping on, the loss and norm read) per flag set in turn, each set put back', async () => {
    const flag = 'E2E_OURS_SPEC_LOOP_FLAG';
    tf.env().registerFlag(flag, () => 1);
    const before = tf.memory().numTensors;
    const options = { model: FIXTURE, data, rank: 4, alpha: 8, batch: 1, seq: 8, warmup: 0, steps: 1, saveAdapter: false, log: () => {} };
    const result = await runOurs({ ...options, out: join(dir, 'loop'), abFlags: [{ [flag]: 2 }], abRounds: 1, trainLoopRounds: 2, trainLoopBlock: 3 });
    expect(result.errors).to.deep.equal({});
    expect(result.trainLoopSteps!.map(b => b.flags)).to.deep.equal([{}, { [flag]: 2 }]);
    for (const b of result.trainLoopSteps!) {
      // 2 rounds of trainLoop's 3 steps, each timed by its onStep
      expect(b.stepSeconds).to.have.length(6);
      expect(b.losses).to.have.length(6);
      // finite, about a random model's ln 97 (the fixture's vocabulary)
      for (const loss of b.losses) expect(loss).to.be.above(0).and.below(2 * Math.log(97));
      expect(b.medianTokensPerSecond).to.be.above(0);
      // the mean of the steps after each block's first: rounds' steps 2–3 and 5–6
      const afterFirst = [1, 2, 4, 5].map(k => b.stepSeconds[k]);
      expect(b.meanTokensPerSecond).to.be.closeTo(8 * 4 / afterFirst.reduce((t, x) => t + x, 0), 1e-9 * b.meanTokensPerSecond);
    }
    expect(tf.env().get(flag)).to.equal(1);
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    await expectReject(runOurs({ ...options, out: join(dir, 'x'), trainLoopRounds: 0 }), /'trainLoopRounds' must be >= 1 but got 0/);
    await expectReject(runOurs({ ...options, out: join(dir, 'x'), trainLoopBlock: 1 }), /'trainLoopBlock' must be >= 2 but got 1/);
  });

  it('StepCounter counts kernels and reads while installed and puts the methods back', async () => {
    const engine = tf.engine() as unknown as Record<string, unknown>;
    const runKernel = engine['runKernel'];
    const counter = new StepCounter();
    counter.install();
    expect(() => counter.install()).to.throw(OpArgumentError, '`StepCounter.install()`: the counter is already installed');
    const a = tf.tensor1d([1, 2]);
    const b = tf.add(a, tf.mul(a, a));
    await b.data();
    counter.uninstall();
    tf.dispose([a, b]);
    expect(counter.kernelCounts).to.deep.equal({ Multiply: 1, Add: 1 });
    expect(counter.current).to.include({ kernels: 2, reads: 1 });
    expect(engine['runKernel']).to.equal(runKernel);
    expect(Object.prototype.hasOwnProperty.call(engine, 'runKernel'), 'no own property left behind').to.equal(false);
  });

  it('refuses bad data and options with one message naming them', async () => {
    const bad = join(dir, 'bad.jsonl');
    const run = (file: string, extra = {}) => runOurs({ model: FIXTURE, data: file, out: join(dir, 'x'), log: () => {}, ...extra });
    writeFileSync(bad, '{"text": "fine"}\nnot json\n');
    await expectReject(run(bad), /'data' line 2 of '.*bad\.jsonl' must be JSON but is not/);
    writeFileSync(bad, '{"content": "x"}\n');
    await expectReject(run(bad), /'data' line 1 of '.*' must be an object with a string "text" but has \{"content":"x"\}/);
    writeFileSync(bad, '\n\n');
    await expectReject(run(bad), /'data' must hold at least one \{"text": \.\.\.\} line but '.*' has none/);
    await expectReject(run(data, { expertDtype: 'int3' }), /'expertDtype' must be one of 'stored', 'float32'.* but got 'int3'/);
    await expectReject(run(data, { seq: 0 }), /'seq' must be >= 1 but got 0/);
    await expectReject(run(data, { warmup: -1 }), /'warmup' must be >= 0 but got -1/);
    await expectReject(run(data, { alpha: 0 }), /'alpha' must be a number > 0 but got 0/);
    await expectReject(run(data, { model: '' }), /'model' must be a path but got ""/);
    await expectReject(run(data, { targets: ['router', 'lm_head'] }), /'targets' must be one of 'experts.gate_up', .* but got 'lm_head'/);
    await expectReject(run(data, { targets: [] }), /'targets' must be a non-empty list but got \[\]/);
    await expectReject(run(data, { gradientCheckpointing: 'on' }), /'gradientCheckpointing' must be a boolean but got "on"/);
  });

  it('reads its command line, and refuses unknown flags, odd arguments and a tensor-core run without tensor cores', () => {
    const args = parseOursArgs(['--model', 'M', '--data', 'D', '--out', 'O', '--expert-dtype', 'nf4', '--rank', '16', '--lr', '2e-4',
      '--backend', 'cpu', '--tensor-cores', 'on', '--save-adapter', 'off', '--profile', 'on']);
    expect(args).to.deep.include({ model: 'M', data: 'D', out: 'O', expertDtype: 'nf4', rank: 16, learningRate: 2e-4, backend: 'cpu',
      tensorCores: true, saveAdapter: false, profile: true, steps: undefined });
    expect(parseOursArgs(['--model', 'M'])).to.include({ backend: 'webgpu', tensorCores: false, saveAdapter: true, profile: false, targets: undefined });
    expect(parseOursArgs(['--targets', 'router,q_proj']).targets).to.deep.equal(['router', 'q_proj']);
    expect(parseOursArgs(['--model', 'M']).gradientCheckpointing).to.equal(false);
    expect(parseOursArgs(['--model', 'M']).nativeTiming).to.equal(false);
    expect(parseOursArgs(['--native-timing', 'on']).nativeTiming).to.equal(true);
    expect(parseOursArgs(['--gradient-checkpointing', 'on']).gradientCheckpointing).to.equal(true);
    expect(() => parseOursArgs(['--gradient-checkpointing', 'yes'])).to.throw(OpArgumentError, /'--gradient-checkpointing' must be one of 'on', 'off' but got 'yes'/);
    expect(parseOursArgs(['--cpu-profile', 'on', '--tf-flags', 'WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE=60,DEBUG=false']))
        .to.deep.include({ cpuProfile: true, tfFlags: { WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE: 60, DEBUG: false } });
    expect(parseTfFlags('A_B=1e-3')).to.deep.equal({ A_B: 1e-3 });
    expect(parseOursArgs(['--ab-flags', 'A=1;B=2,C=true', '--ab-rounds', '3'])).to.deep.include({ abFlags: [{ A: 1 }, { B: 2, C: true }], abRounds: 3 });
    expect(parseOursArgs(['--pipeline-rounds', '2'])).to.deep.include({ pipelineRounds: 2 });
    expect(parseOursArgs(['--train-loop-rounds', '3', '--train-loop-block', '40'])).to.deep.include({ trainLoopRounds: 3, trainLoopBlock: 40 });
    expect(parseTfFlags('WEBGPU_MOE_DENSE_PROGRAM=grouped,X=2')).to.deep.equal({ WEBGPU_MOE_DENSE_PROGRAM: 'grouped', X: 2 });
    for (const bad of ['WEBGPU_X', 'webgpu_x=1', 'X=Yes', 'X=a b', 'X=', 'X=1,', 'X=1-2']) {
      expect(() => parseTfFlags(bad), bad).to.throw(OpArgumentError, /'--tf-flags' must be NAME=VALUE pairs \(a number, true, false or a lowercase word\) joined by commas but got "/);
    }
    expect(() => parseOursArgs(['--profile', 'yes'])).to.throw(OpArgumentError, /'--profile' must be one of 'on', 'off' but got 'yes'/);
    expect(() => parseOursArgs(['--modle', 'M'])).to.throw(OpArgumentError, /'--modle' is not a flag; the flags are --model --data/);
    expect(() => parseOursArgs(['--model'])).to.throw(OpArgumentError, /arguments must be '--flag value' pairs but got \["--model"\]/);
    expect(() => parseOursArgs(['--backend', 'gpu'])).to.throw(OpArgumentError, /'--backend' must be one of 'webgpu', 'cpu', 'wasm' but got 'gpu'/);
    expect(() => parseOursArgs(['--tensor-cores', 'yes'])).to.throw(OpArgumentError, /'--tensor-cores' must be one of 'on', 'off' but got 'yes'/);
    expect(() => assertTensorCores(true, 'no chromium-experimental-subgroup-matrix on this adapter'))
        .to.throw(OpArgumentError, /'--tensor-cores' is on but this adapter has none: no chromium-experimental-subgroup-matrix on this adapter/);
    expect(() => assertTensorCores(true, 'available')).to.not.throw();
    expect(() => assertTensorCores(false, 'off')).to.not.throw();
  });

  it("reads tfjs-webgpu's per-program GPU times, joined into one string as 4.22 returns them, or as an array", () => {
    expect(programTimes('MatMulPackedProgram2: 0.125, GroupedMatMulProgram: 1.5')).to.deep.equal([
      { name: 'MatMulPackedProgram2', ms: 0.125 }, { name: 'GroupedMatMulProgram', ms: 1.5 }]);
    expect(programTimes([{ name: 'A', ms: 2 }])).to.deep.equal([{ name: 'A', ms: 2 }]);
    expect(programTimes('')).to.deep.equal([]);
    expect(programTimes(undefined)).to.deep.equal([]);
  });

  it('sums a V8 profile per function: self time in the frame sampled, inclusive time in every frame above it, recursion once', () => {
    const frame = (functionName: string, line: number) => ({ functionName, url: 'file:///x/dir/a.js', lineNumber: line - 1 });
    // root → step → runKernel → runKernel (recursive) ; step → dispose
    const profile: CpuProfile = {
      nodes: [
        { id: 1, callFrame: { functionName: '(root)', url: '', lineNumber: -1 }, children: [2] },
        { id: 2, callFrame: frame('step', 10), children: [3, 5] },
        { id: 3, callFrame: frame('runKernel', 20), children: [4] },
        { id: 4, callFrame: frame('runKernel', 20) },
        { id: 5, callFrame: frame('', 30) },
      ],
      // each sample lasts until the next one: 4 ms, 2 ms, 1 ms, 3 ms, then a last sample of 0
      samples: [4, 3, 5, 2, 4],
      timeDeltas: [0, 4000, 2000, 1000, 3000],
    };
    const { totalMs, self, inclusive } = summarizeCpuProfile(profile);
    expect(totalMs).to.equal(10);
    expect(self).to.deep.equal([
      { name: 'runKernel a.js:20', ms: 6 }, { name: 'step a.js:10', ms: 3 }, { name: '(anonymous) a.js:30', ms: 1 }]);
    expect(inclusive.slice(0, 3)).to.deep.equal([
      { name: '(root)', ms: 10 }, { name: 'step a.js:10', ms: 10 }, { name: 'runKernel a.js:20', ms: 6 }]);
    expect(summarizeCpuProfile(profile, 1).self).to.have.length(1);
  });

  it('cuts the text into consecutive windows, wrapping around', () => {
    expect(Array.from(trainingWindows(Int32Array.from([1, 2, 3, 4, 5]), 2, 1, 2))).to.deep.equal([1, 2, 3, 4, 5, 1]);
  });
});

async function expectReject(p: Promise<unknown>, message: RegExp): Promise<void> {
  let error: unknown;
  try {
    await p;
  } catch (e) {
    error = e;
  }
  expect(error, String(message)).to.be.instanceOf(OpArgumentError);
  expect((error as Error).message).to.match(message);
}
