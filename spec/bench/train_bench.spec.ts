/**
 * The training-step benchmark on the active backend, with small steps and one iteration: what it
 * reports, that it leaves no registration and no tensor behind, its argument checks, and the CLI's
 * `bench --config example --json`. No timings are asserted.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { mkdtempSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { benchTrainingStep, formatTrainBenchTable, type TrainBenchCase, type TrainTiming } from '../../src/bench/train_bench.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { isRegistered } from '../../src/plugin.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';
const MODEL = resolve('examples/models/tala-moe');
const BASE_PARAMS = 226176;

function expectTiming(t: TrainTiming | null, label: string, tokensPerStep: number): void {
  expect(t, label).to.be.an('object');
  const { ms, tokensPerSecond, peakBytes, samples, minMs } = t!;
  expect(ms, `${label}.ms`).to.be.above(0);
  expect(tokensPerSecond, `${label}.tokensPerSecond`).to.be.closeTo((tokensPerStep * 1000) / ms, 1e-6);
  expect(Number.isInteger(peakBytes) && peakBytes > 0, `${label}.peakBytes = ${peakBytes}`).to.equal(true);
  expect(samples, `${label}.samples`).to.have.length(1);
  expect(minMs).to.equal(samples[0]);
}

function expectCase(c: TrainBenchCase, lora: string, tokensPerStep: number): void {
  expect(c).to.include({ config: 'example', backend: BACKEND, lora, tokensPerStep, iters: 1, warmup: 0 });
  expectTiming(c.fused, `${lora} fused`, tokensPerStep);
  expectTiming(c.reference, `${lora} reference`, tokensPerStep);
  expect(c.speedup).to.be.closeTo(c.reference!.ms / c.fused.ms, 1e-9);
  expect(c.pairedSpeedup).to.be.closeTo(c.reference!.samples[0] / c.fused.samples[0], 1e-9);
  expect(c.memRatio).to.be.closeTo(c.fused.peakBytes / c.reference!.peakBytes, 1e-9);
  expect(c.model).to.include({ moeLayers: 2, experts: 8, topK: 2, moeIntermediate: 64 });
  // the base weights, and the adapter's when one is on
  expect(c.model.params).to.equal(BASE_PARAMS + (lora === 'none' ? 0 : c.model.trainable));
  expect(c).to.not.have.property('referenceSkipped');
}

describe('bench/benchTrainingStep', () => {
  it('times training steps of the example model, fused and reference, LoRA and full fine-tuning, and leaves nothing behind', async () => {
    const before = tf.memory().numTensors;
    const seen: string[] = [];
    const cases = await benchTrainingStep({
      lora: ['auto', 'none'], batch: 2, seq: 16, iters: 1, warmup: 0, onCase: c => seen.push(c.lora),
    });
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    expect(isRegistered(), 'the plugin is unregistered again').to.equal(false);
    expect(seen).to.deep.equal(['auto', 'none']);
    cases.forEach(c => expectCase(c, c.lora, 32));
    expect(cases[0].model.dir).to.equal(MODEL);
    // LoRA r 4 on gate_up, down and router of 2 layers (E=8, H=64, I=64) vs every weight
    const perLayer = 4 * 8 * (64 + 128) + 4 * 8 * (64 + 64) + 4 * (64 + 8);
    expect(cases[0].model.trainable).to.equal(2 * perLayer);
    expect(cases[1].model.trainable).to.equal(BASE_PARAMS);
    expect(JSON.parse(JSON.stringify(cases))).to.deep.equal(cases);

    const table = formatTrainBenchTable(cases).split('\n');
    expect(table[0]).to.match(/^training step of .*tala-moe \(2 MoE layers, E=8 K=2, 247232 weights\), 32 tokens per step, median of 1 after 0 warm-up/);
    expect(table[2]).to.match(new RegExp(`^example\\s+${BACKEND}\\s+auto\\s+\\d+\\.\\d\\s+\\d+\\s+\\d+\\.\\d\\s+\\d+\\s+\\d+\\.\\d\\dx`));
  });

  it('rejects bad options with one clear error each, before loading anything', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'train-bench-'));
    writeFileSync(join(dir, 'short.txt'), 'abc');
    const bad: Array<[object, RegExp]> = [
      [{ lora: ['qlora'] }, /`benchTrainingStep\(\)`: 'lora\[0\]' must be one of 'none', 'materialize', 'split', 'auto' but got 'qlora'/],
      [{ batch: 0 }, /'batch' must be >= 1 but got 0/],
      [{ alpha: -1 }, /'alpha' must be a number > 0 but got -1/],
      [{ model: dir }, new RegExp(`'model' must be a Hugging Face checkpoint folder with config.json but '${dir}' has none`)],
      [{ text: join(dir, 'none.txt') }, /'text' must be a text file but '.*none.txt' does not exist/],
      [{ text: join(dir, 'short.txt') }, /'text' must hold more than seq = 64 characters but has 3/],
    ];
    for (const [options, re] of bad) {
      const before = tf.memory().numTensors;
      let err: unknown;
      try {
        await benchTrainingStep(options);
      } catch (e) {
        err = e;
      }
      expect(err, JSON.stringify(options)).to.be.instanceOf(OpArgumentError);
      expect((err as Error).message).to.match(re);
      expect(tf.memory().numTensors).to.equal(before);
      expect(isRegistered()).to.equal(false);
    }
  });
});

describe('cli bench --config example', () => {
  it('--json prints one JSON array, one object per case', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'bench', '--config', 'example',
      '--backend', BACKEND, '--lora', 'split', '--iters', '1', '--warmup', '0', '--json'], { encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    const lines = r.stdout.trim().split('\n');
    expect(lines, r.stdout).to.have.length(1);
    const cases = JSON.parse(lines[0]) as TrainBenchCase[];
    expect(cases.map(c => c.lora)).to.deep.equal(['split']);
    expectCase(cases[0], 'split', 512);
  });

  it('refuses block-only flags with it, and its flags with a block config (exit 2)', () => {
    const run = (args: string[]) => spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', 'bench', ...args], { encoding: 'utf8' });
    const profile = run(['--config', 'example', '--profile']);
    expect(profile.status).to.equal(2);
    expect(profile.stderr).to.match(/--profile times the kernels of a block config, not --config example/);
    const model = run(['--config', 'S', '--model', MODEL]);
    expect(model.status).to.equal(2);
    expect(model.stderr).to.match(/--model is for --config example, not S/);
  });
});
