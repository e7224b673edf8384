/**
 * `tfjs-moe-lora train --wasm-threads N` and selectBackend's wasmThreads option: tfjs-wasm's
 * threaded SIMD build for a training run (src/backends/wasm/threads_node.ts). Bad values and other
 * backends are one message naming the flag, before anything is loaded; a run on the threaded build
 * (a process of its own: the build replaces the process's 'wasm' backend) says what it started,
 * exits when done, and gives the single-threaded build's losses.
 */
import { expect } from 'chai';
import { join } from 'node:path';
import { BackendError, selectBackend } from '../../src/cli/backend.js';
import { cleanup, tempDir } from '../io/checkpoint_helpers.js';
import { runMain, spawnCli } from './run_cli.js';

const BASE = ['train', '--init-config', 'qwen3_moe', '--data', 'examples/data/target_train.txt', '--steps', '3'];

describe('cli: --wasm-threads', () => {
  it('train: off wasm or outside 1 to 8 exits 2 with one message naming the flag, before anything is written', async () => {
    const out = ['--out', '/nonexistent/never-written'];
    const cases: Array<[string[], string]> = [
      [['--backend', 'cpu', '--wasm-threads', '2'], '--wasm-threads is for --backend wasm, not cpu'],
      [['--wasm-threads', '9'], '--wasm-threads must be an integer from 1 to 8 but got 9'],
      [['--wasm-threads', '1.5'], '--wasm-threads must be an integer from 1 to 8 but got 1.5'],
    ];
    for (const [args, message] of cases) {
      const r = await runMain([...BASE, ...out, ...args]);
      expect(r.code, args.join(' ')).to.equal(2);
      expect(r.stderr).to.equal(`tfjs-moe-lora: ${message} (see tfjs-moe-lora --help)\n`);
    }
    const help = await runMain(['train', '--help']);
    expect(help.stdout.replace(/\s+/g, ' ')).to.include("--wasm-threads wasm: tfjs-wasm's threaded SIMD build");
  });

  it('selectBackend: wasmThreads off wasm is a BackendError naming it', async () => {
    let err: unknown;
    try { await selectBackend('cpu', { wasmThreads: 2 }); } catch (e) { err = e; }
    expect(err).to.be.instanceOf(BackendError);
    expect((err as Error).message).to.equal("selectBackend(): wasmThreads is for the 'wasm' backend, not 'cpu'");
  });

  it('train on the threaded build: says what it started, exits when done, the single-threaded build\'s losses', async () => {
    const dir = await tempDir('wasm-threads');
    try {
      const losses = (r: ReturnType<typeof spawnCli>) => {
        expect(r.code, r.stderr).to.equal(0);
        return (JSON.parse(r.stdout) as { losses: number[] }).losses;
      };
      const threaded = spawnCli([...BASE, '--backend', 'wasm', '--wasm-threads', '2', '--json', '--out', join(dir, 'threaded')]);
      expect(threaded.stderr).to.match(/^note: wasm threaded SIMD build, 2 XNNPACK threads, \d loop workers$/m);
      const single = spawnCli([...BASE, '--backend', 'wasm', '--json', '--out', join(dir, 'single')]);
      const [a, b] = [losses(threaded), losses(single)];
      expect(a).to.have.length(3);
      // XNNPACK's threads split a product's output tiles, not its sums: the same float32 results
      a.forEach((v, i) => expect(Math.abs(v - b[i]), `step ${i + 1}: ${v} against ${b[i]}`).to.be.at.most(1e-6 * Math.abs(b[i])));
    } finally {
      await cleanup();
    }
  });
});
