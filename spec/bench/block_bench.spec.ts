/**
 * The MoE block benchmark's harness on the active backend with the tiny XS config, one iteration:
 * the shape of what it reports, its argument checks, the table, the CLI's `bench --json` in a
 * spawned process, and the backend selection's errors. No timings are asserted.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { cpuLinearUnsortedSegmentSumConfig } from '../../src/backends/cpu/unsorted_segment_sum.js';
import { selectBenchBackend } from '../../src/bench/backend.js';
import {
  BENCH_CONFIGS, BENCH_LORA_CASES, benchMoEBlock, expertFlops, formatBenchTable, type BenchCase,
} from '../../src/bench/block_bench.js';
import { BackendError } from '../../src/cli/backend.js';
import { OpArgumentError } from '../../src/ops/validate.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';

function expectTiming(t: unknown, label: string): void {
  expect(t, label).to.be.an('object');
  const { ms, peakBytes, samples, gflops, cpuMs } = t as BenchCase['fused'];
  expect(ms, `${label}.ms`).to.be.a('number').and.to.be.above(0);
  expect(cpuMs, `${label}.cpuMs`).to.be.a('number').and.to.be.at.least(0);
  expect(Number.isInteger(peakBytes) && peakBytes > 0, `${label}.peakBytes = ${peakBytes}`).to.equal(true);
  expect(samples, `${label}.samples`).to.have.length(1);
  expect((t as BenchCase['fused']).minMs, `${label}.minMs`).to.equal(samples[0]);
  expect(gflops, `${label}.gflops`).to.be.a('number').and.to.be.above(0);
}

function expectCase(c: BenchCase, lora: string): void {
  expect(c).to.include({ config: 'XS', backend: BACKEND, lora, iters: 1, warmup: 0 });
  expect(c.expertStorage).to.be.oneOf(['float32', 'bf16']);
  expectTiming(c.fused, `${lora} fused`);
  expectTiming(c.reference, `${lora} reference`);
  const ref = c.reference!;
  expect(c.speedup).to.be.closeTo(ref.ms / c.fused.ms, 1e-9);
  expect(c.cpuSpeedup).to.equal(ref.cpuMs / c.fused.cpuMs);
  // one round: the paired ratio is the ratio of the two samples
  expect(c.pairedSpeedup).to.be.closeTo(ref.samples[0] / c.fused.samples[0], 1e-9);
  expect(c.memRatio).to.be.closeTo(c.fused.peakBytes / ref.peakBytes, 1e-9);
  expect(c.fused.gflops).to.be.closeTo(expertFlops(BENCH_CONFIGS.XS, c.lora) / c.fused.ms / 1e6, 1e-9);
  expect(c.shape).to.deep.equal({ T: 64, H: 32, I: 16, E: 4, K: 2, r: 4 });
  if (lora === 'auto') {
    expect(c.autoPicks).to.have.length(2);
    for (const pick of c.autoPicks!) expect(['split', 'materialize']).to.include(pick);
  } else {
    expect(c).to.not.have.property('autoPicks');
    expect(c).to.not.have.property('autoVsBest');
  }
  if (BACKEND === 'cpu') expect(c.cpuSegmentSum).to.equal('stock');
  else expect(c).to.not.have.property('cpuSegmentSum');
}

function cli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('bench/benchMoEBlock', () => {
  it('times every LoRA case, fused and reference, and leaves no tensor behind', async () => {
    const before = tf.memory().numTensors;
    const seen: string[] = [];
    const cases = await benchMoEBlock({ config: 'XS', iters: 1, warmup: 0, onCase: c => seen.push(c.lora) });
    expect(tf.memory().numTensors, 'tensors left behind').to.equal(before);
    expect(cases.map(c => c.lora)).to.deep.equal([...BENCH_LORA_CASES]);
    expect(seen).to.deep.equal([...BENCH_LORA_CASES]);
    cases.forEach(c => expectCase(c, c.lora));
    const [, materialize, split, auto] = cases;
    expect(auto.autoVsBest).to.be.closeTo(auto.fused.samples[0] / Math.min(materialize.fused.samples[0], split.fused.samples[0]), 1e-9);
    // one JSON value per case, nothing that JSON would drop or mangle
    expect(JSON.parse(JSON.stringify(cases))).to.deep.equal(cases);

    const table = formatBenchTable(cases).split('\n');
    expect(table[0]).to.match(/^MoE block forward\+backward, T=64 H=32 I=16 E=4 K=2 r=4, median of 1 after 0 warm-up/);
    expect(table[1]).to.match(/^config\s+backend\s+lora\s+fused ms\s+ref ms\s+speedup\s+paired\s+fused cpu-ms\s+ref cpu-ms\s+cpu speedup\s+fused MiB/);
    for (const [i, lora] of BENCH_LORA_CASES.entries()) {
      expect(table[2 + i]).to.match(new RegExp(`^XS\\s+${BACKEND}\\s+${lora}\\s+\\d+\\.\\d\\s+\\d+\\.\\d\\s+\\d+\\.\\d\\dx\\s+\\d+\\.\\d\\dx`));
    }
  });

  it('runs the chosen cases only, at the rank and with the cpu segment sum it was asked for (then puts tfjs\'s back)', async () => {
    const stock = tf.getKernel('UnsortedSegmentSum', 'cpu')!.kernelFunc;
    const cases = await benchMoEBlock({ config: 'XS', lora: ['split'], iters: 1, warmup: 0, cpuSegmentSum: 'linear', rank: 2 });
    expect(cases.map(c => c.lora)).to.deep.equal(['split']);
    expect(cases[0].shape.r).to.equal(2);
    if (BACKEND === 'cpu') expect(cases[0].cpuSegmentSum).to.equal('linear');
    expect(tf.getKernel('UnsortedSegmentSum', 'cpu')!.kernelFunc).to.equal(stock);
  });

  it('times the fused kernel alone with reference: false (null reference and ratios)', async () => {
    const before = tf.memory().numTensors;
    const [c] = await benchMoEBlock({ config: 'XS', lora: ['split'], iters: 1, warmup: 0, reference: false });
    expect(tf.memory().numTensors).to.equal(before);
    expectTiming(c.fused, 'fused');
    expect(c).to.include({ reference: null, speedup: null, cpuSpeedup: null, pairedSpeedup: null, memRatio: null });
    expect(formatBenchTable([c]).split('\n')[2]).to.match(new RegExp(`^XS\\s+${BACKEND}\\s+split\\s+\\d+\\.\\d\\s+-\\s+-\\s+-`));
  });

  it('runs on packed bf16 experts (the title says so) and leaves no tensor behind', async () => {
    const before = tf.memory().numTensors;
    const [c] = await benchMoEBlock({ config: 'XS', lora: ['split'], iters: 1, warmup: 0, expertStorage: 'bf16' });
    expect(tf.memory().numTensors).to.equal(before);
    expectCase(c, 'split');
    expect(c.expertStorage).to.equal('bf16');
    expect(formatBenchTable([c]).split('\n')[0]).to.match(/warm-up, experts packed bf16(,|$)/);
  });

  it('rejects bad options with one clear error each', async () => {
    const bad: Array<[object, RegExp]> = [
      [{ config: 'L' }, /`benchMoEBlock\(\)`: 'config' must be one of 'XS', 'S', 'M1', 'O', 'Q', 'Q1' but got 'L'/],
      [{ config: 'XS', lora: ['qlora'] }, /'lora\[0\]' must be one of 'none', 'materialize', 'split', 'auto' but got 'qlora'/],
      [{ config: 'XS', lora: [] }, /'lora' must be a non-empty list of cases but got \[\]/],
      [{ config: 'XS', iters: 0 }, /'iters' must be >= 1 but got 0/],
      [{ config: 'XS', warmup: 1.5 }, /'warmup' must be an integer but got 1.5 \(number\)/],
      [{ config: 'XS', cpuSegmentSum: 'fast' }, /'cpuSegmentSum' must be one of 'stock', 'linear' but got 'fast'/],
      [{ config: 'XS', rank: 0 }, /'rank' must be >= 1 but got 0/],
      [{ config: 'XS', reference: 'no' }, /'reference' must be a boolean but got "no"/],
      [{ config: 'XS', expertStorage: 'int3' }, /'expertStorage' must be one of 'float32', 'bf16', 'f16', 'int8', 'int4', 'nf4', 'mxfp4' but got 'int3'/],
      [{ config: 'XS', expertStorage: 'bf16', lora: ['split', 'none'] },
        /'expertStorage' 'bf16' holds the expert weights frozen, so the LoRA case 'none' \(which trains them\) cannot run; ask for LoRA cases only \(got \["split","none"\]\)/],
      [{ config: 'M1' }, new RegExp(`config 'M1' is sized for webgpu, not ${BACKEND} \\(allowAnyBackend`)],
    ];
    for (const [options, re] of bad) {
      const before = tf.memory().numTensors;
      let err: unknown;
      try {
        await benchMoEBlock(options as never);
      } catch (e) {
        err = e;
      }
      expect(err, JSON.stringify(options)).to.be.instanceOf(OpArgumentError);
      expect((err as Error).message).to.match(re);
      expect(tf.memory().numTensors).to.equal(before);
    }
  });
});

describe('cli bench', () => {
  it('--json prints exactly one JSON array, one object per case', () => {
    const r = cli(['bench', '--config', 'XS', '--backend', BACKEND, '--lora', 'none,auto', '--iters', '1', '--warmup', '0', '--json']);
    expect(r.status, r.stderr).to.equal(0);
    const lines = r.stdout.trim().split('\n');
    expect(lines, r.stdout).to.have.length(1);
    const cases = JSON.parse(lines[0]) as BenchCase[];
    expect(cases.map(c => c.lora)).to.deep.equal(['none', 'auto']);
    cases.forEach(c => expectCase(c, c.lora));
    expect(cases[1]).to.not.have.property('autoVsBest');   // neither materialize nor split ran
  });

  it('refuses a config on a backend it is not sized for, and an unknown LoRA case (exit 2)', () => {
    const big = cli(['bench', '--config', 'Q', '--backend', 'cpu']);
    expect(big.status).to.equal(2);
    expect(big.stderr).to.match(/--config Q is sized for webgpu, not cpu \(--allow-any-backend runs it anyway\)/);
    const lora = cli(['bench', '--config', 'XS', '--lora', 'none,dora']);
    expect(lora.status).to.equal(2);
    expect(lora.stderr).to.match(/--lora: 'dora' is not one of none, materialize, split, auto/);
  });
});

describe('bench/selectBenchBackend', () => {
  const layersOnly = async (specifier: string) => {
    if (specifier === '@tensorflow/tfjs-layers') return {};
    throw new Error(`unexpected import of ${specifier}`);
  };

  it('refuses an unknown backend and names a missing backend package', async () => {
    const errors: unknown[] = [];
    try { await selectBenchBackend('webgl', layersOnly); } catch (e) { errors.push(e); }
    const noWasm = async (specifier: string) => {
      if (specifier === '@tensorflow/tfjs-layers') return {};
      throw Object.assign(new Error(`Cannot find package '${specifier}' imported from /x`), { code: 'ERR_MODULE_NOT_FOUND' });
    };
    try { await selectBenchBackend('wasm', noWasm); } catch (e) { errors.push(e); }
    expect(errors.map(e => (e as Error).message)).to.deep.equal([
      `unknown backend 'webgl'; choose one of cpu, wasm, webgpu`,
      `the 'wasm' backend needs the package @tensorflow/tfjs-backend-wasm, which is not installed ` +
          `(npm install @tensorflow/tfjs-backend-wasm@^4.22.0)`,
    ]);
    errors.forEach(e => expect(e).to.be.instanceOf(BackendError));
    expect(tf.getBackend()).to.equal(BACKEND);
  });

  it('names the missing package', async () => {
    const missing = async () => {
      throw Object.assign(new Error(`Cannot find package 'webgpu' imported from /x/dawn.js`), { code: 'ERR_MODULE_NOT_FOUND' });
    };
    let err: unknown;
    try { await selectBenchBackend('webgpu', layersOnly, missing); } catch (e) { err = e; }
    expect(err).to.be.instanceOf(BackendError);
    expect((err as Error).message).to.equal(`the 'webgpu' backend needs the package webgpu, which is not installed ` +
        `(npm install --save-dev @tensorflow/tfjs-backend-webgpu webgpu)`);
    expect(tf.getBackend()).to.equal(BACKEND);
  });

  it('fails loudly when there is no adapter instead of falling back', async () => {
    const noAdapter = async () => ({
      setupDawnWebGPU: async () => { throw new Error('setupDawnWebGPU: no WebGPU adapter'); },
      releaseDawnWebGPU: () => {},
    });
    let err: unknown;
    try { await selectBenchBackend('webgpu', layersOnly, noAdapter); } catch (e) { err = e; }
    expect(err).to.be.instanceOf(BackendError);
    expect((err as Error).message).to.equal(`the 'webgpu' backend could not start: setupDawnWebGPU: no WebGPU adapter`);
    expect(tf.getBackend()).to.equal(BACKEND);
  });
});

describe('cpu linear UnsortedSegmentSum (the bench\'s --cpu-segment-sum linear)', () => {
  it('sums rows per segment in one pass, drops out-of-range ids, keeps int32 exact', () => {
    // called directly on a minimal backend, so it runs whichever backend is active
    const store = new Map<object, { values: tf.BackendValues; shape: number[] }>();
    const backend = {
      readSync: (id: object) => store.get(id)!.values,
      makeTensorInfo: (shape: number[], dtype: tf.DataType, values?: tf.BackendValues) => {
        const dataId = {};
        store.set(dataId, { values: values!, shape });
        return { dataId, shape, dtype };
      },
    };
    const info = (values: tf.BackendValues, shape: number[], dtype: tf.DataType) => backend.makeTensorInfo(shape, dtype, values);
    const run = (x: tf.TensorInfo, ids: number[], numSegments: number) =>
      cpuLinearUnsortedSegmentSumConfig.kernelFunc({
        inputs: { x, segmentIds: info(Int32Array.from(ids), [ids.length], 'int32') },
        backend: backend as never, attrs: { numSegments },
      }) as tf.TensorInfo;
    const f = run(info(Float32Array.from([1, 2, 3, 4, 5, 6, 7, 8]), [4, 2], 'float32'), [2, 0, 2, -1], 3);
    expect(f.shape).to.deep.equal([3, 2]);
    expect(Array.from(store.get(f.dataId)!.values as Float32Array)).to.deep.equal([3, 4, 0, 0, 6, 8]);
    const i = run(info(Int32Array.from([7, 100000001, 5, 2]), [4], 'int32'), [1, 1, 0, 5], 2);
    expect(i.dtype).to.equal('int32');
    expect(Array.from(store.get(i.dataId)!.values as Int32Array)).to.deep.equal([5, 100000008]);
  });
});
