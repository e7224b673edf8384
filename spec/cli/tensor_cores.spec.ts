/**
 * `--tensor-cores auto|off` (src/args/tensor_cores.ts) on train and generate, and selectBackend's
 * tensorCores option: the values each accepts, one message naming the flag for a bad value or a
 * backend other than webgpu, given before any work. What 'auto' does on an adapter without tensor
 * cores is spec/backends/webgpu/tensor_cores_cli.spec.ts (it needs Dawn).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { TENSOR_CORE_MODES, tensorCoresProblems } from '../../src/args/tensor_cores.js';
import { BackendError, selectBackend } from '../../src/cli/backend.js';
import { tensorCoresNote } from '../../src/cli/plugin_options.js';
import { runMain } from './run_cli.js';

const TALA = 'examples/models/tala-moe';
const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';

describe('cli: --tensor-cores', () => {
  it('tensorCoresProblems: the modes pass; another value or \'auto\' off webgpu is one problem naming the arg', () => {
    expect(TENSOR_CORE_MODES).to.deep.equal(['auto', 'off']);
    expect(tensorCoresProblems('auto', 'webgpu')).to.deep.equal([]);
    expect(tensorCoresProblems('off', 'webgpu')).to.deep.equal([]);
    expect(tensorCoresProblems('off', 'wasm'), "'off' is every backend's state").to.deep.equal([]);
    expect(tensorCoresProblems(undefined, 'cpu'), 'absent: the default').to.deep.equal([]);
    expect(tensorCoresProblems('on', 'webgpu')).to.deep.equal(["tensorCores: expected one of 'auto', 'off' but got 'on' (string)"]);
    expect(tensorCoresProblems(true, 'webgpu')).to.deep.equal(["tensorCores: expected one of 'auto', 'off' but got true (boolean)"]);
    expect(tensorCoresProblems('auto', 'wasm')).to.deep.equal(["tensorCores: 'auto' is for the 'webgpu' backend, not 'wasm'"]);
  });

  it('generate: a bad value, or auto off webgpu, exits 2 with one message naming --tensor-cores', async () => {
    const bad = await runMain(['generate', '--model', TALA, '--prompt', 'miro ', '--backend', BACKEND, '--tensor-cores', 'on']);
    expect(bad.code).to.equal(2);
    expect(bad.stdout).to.equal('');
    expect(bad.stderr).to.equal("tfjs-moe-lora: --tensor-cores: tensorCores: expected one of 'auto', 'off' but got 'on' (string) " +
        '(see tfjs-moe-lora --help)\n');
    const other = BACKEND === 'webgpu' ? 'cpu' : BACKEND;
    const offGpu = await runMain(['generate', '--model', TALA, '--prompt', 'miro ', '--backend', other, '--tensor-cores', 'auto']);
    expect(offGpu.code).to.equal(2);
    expect(offGpu.stderr).to.equal(`tfjs-moe-lora: --tensor-cores: tensorCores: 'auto' is for the 'webgpu' backend, not '${other}' ` +
        '(see tfjs-moe-lora --help)\n');
    const twice = await runMain(['generate', '--model', TALA, '--prompt', 'miro ', '--tensor-cores', 'off', '--tensor-cores', 'off']);
    expect(twice.code).to.equal(2);
    expect(twice.stderr).to.include('--tensor-cores is given 2 times; give it once');
  });

  it('train: the same checks, before anything is loaded or written (the default backend is wasm)', async () => {
    const base = ['train', '--init-config', 'qwen3_moe', '--data', 'examples/data/target_train.txt', '--out', '/nonexistent/never-written'];
    const bad = await runMain([...base, '--tensor-cores', 'yes']);
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.equal("tfjs-moe-lora: --tensor-cores: tensorCores: expected one of 'auto', 'off' but got 'yes' (string) " +
        '(see tfjs-moe-lora --help)\n');
    const wasm = await runMain([...base, '--tensor-cores', 'auto']);
    expect(wasm.code).to.equal(2);
    expect(wasm.stderr).to.include("--tensor-cores: tensorCores: 'auto' is for the 'webgpu' backend, not 'wasm'");
    const help = await runMain(['train', '--help']);
    expect(help.stdout.replace(/\s+/g, ' ')).to.include('--tensor-cores webgpu only:');
  });

  it('selectBackend: tensorCores is checked first (a BackendError naming it); off webgpu the state is \'off\'', async () => {
    let err: unknown;
    try { await selectBackend('cpu', { tensorCores: 'auto' }); } catch (e) { err = e; }
    expect(err).to.be.instanceOf(BackendError);
    expect((err as Error).message).to.equal("selectBackend(): tensorCores: 'auto' is for the 'webgpu' backend, not 'cpu'");
    err = undefined;
    try { await selectBackend('webgpu', { tensorCores: 'fast' as 'auto' }); } catch (e) { err = e; }
    expect((err as Error).message).to.equal("selectBackend(): tensorCores: expected one of 'auto', 'off' but got 'fast' (string)");
    if (BACKEND === 'webgpu') return;  // selecting another backend here would take the suite's away
    expect(await selectBackend(BACKEND, { tensorCores: 'off' })).to.deep.equal({ backend: BACKEND, tensorCores: 'off' });
    expect(tf.getBackend()).to.equal(BACKEND);
  });

  it('says what each state means', () => {
    expect(tensorCoresNote('on')).to.equal('webgpu tensor cores: on (the wide expert products in f16 with f32 accumulation)');
    expect(tensorCoresNote('off')).to.equal('webgpu tensor cores: off (f32 kernels)');
    expect(tensorCoresNote('the device lacks shader-f16')).to.equal('webgpu tensor cores: unavailable, f32 kernels: the device lacks shader-f16');
  });
});
