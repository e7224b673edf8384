/**
 * tfjs-wasm's threaded SIMD build in Node (src/backends/wasm/threads_node.ts): it starts with the
 * threads asked for and its products equal a float64 reference; moe_simd's row loops split over a
 * loop worker (moe_simd_threads_node.ts) give the fused block the same bits as on one thread; it
 * refuses bad counts and a wasm backend that has started. The build replaces the process's 'wasm' backend, so it runs in a
 * child process (spec/helpers/threaded_wasm_child.ts).
 */
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { BackendError } from '../../src/cli/backend.js';
import { useThreadedWasm } from '../../src/backends/wasm/threads_node.js';


describe('threaded wasm in Node', () => {
  it('starts with the threads asked for; its products equal the exact ones; moe_simd runs on its shared heap, its row loops split over a worker with the same bits; a second start is refused', () => {
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'spec/helpers/threaded_wasm_child.ts'], { encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    const out = JSON.parse(r.stdout.trim().split('\n').at(-1)!);
    expect(out).to.deep.equal({
      threads: 2, loopWorkers: 1, backend: 'wasm', worst: 0, gathered: [4, 5, 6], parts: 2,
      // the fused block's value and every gradient, split LoRA and full fine-tuning: no value differs
      blockMismatches: 0,
      splitExports: ['combine_rows', 'gather_rows', 'gather_transpose', 'pair_row_dot', 'product_narrow_k', 'product_narrow_m',
        'swiglu_backward', 'swiglu_forward', 'weight_grad'],
      again: 'BackendError: the threaded wasm build must be chosen before the wasm backend starts, but it has started already',
    });
  });

  it('refuses a thread count outside 1 to 8 and a loop worker count outside 0 to 8', async () => {
    for (const bad of [0, 9, 1.5]) {
      let err: unknown;
      try { await useThreadedWasm(bad); } catch (e) { err = e; }
      expect(err).to.be.instanceOf(BackendError);
      expect((err as Error).message).to.equal(`wasm threads must be an integer from 1 to 8 but got ${bad}`);
    }
    for (const bad of [-1, 9, 0.5]) {
      let err: unknown;
      try { await useThreadedWasm(2, { loopWorkers: bad }); } catch (e) { err = e; }
      expect(err).to.be.instanceOf(BackendError);
      expect((err as Error).message).to.equal(`loopWorkers must be an integer from 0 to 8 but got ${bad}`);
    }
  });

  it('is a bench flag for block configs on wasm only', () => {
    const cases: Array<[string[], string]> = [
      [['--backend', 'cpu', '--wasm-threads', '2'], '--wasm-threads is for --backend wasm, not cpu'],
      [['--backend', 'wasm', '--wasm-threads', '9'], '--wasm-threads must be an integer from 1 to 8 but got 9'],
      [['--config', 'load', '--backend', 'wasm', '--wasm-threads', '2'], '--wasm-threads is not an option of --config load'],
    ];
    for (const [args, message] of cases) {
      const r = spawnSync(process.execPath, ['--import', 'tsx', 'bench/run.ts', ...args], { encoding: 'utf8' });
      expect(r.status, args.join(' ')).to.equal(2);
      expect(r.stderr, args.join(' ')).to.contain(message);
    }
  });
});
