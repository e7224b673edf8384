/**
 * `--tensor-cores auto` on an adapter without tensor cores (Mesa): the CLI's train and generate
 * start Dawn with the toggles, find no subgroup matrices, say why on stderr and in --json, and run
 * the f32 kernels: the same tokens and the same losses as --tensor-cores off. Each run is its own
 * process (the suite's backend was set up by its host, so Dawn's probe runs only in a fresh one).
 * Run with TFJS_BACKEND=webgpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { join } from 'node:path';
import { selectBackend } from '../../../src/cli/backend.js';
import { TENSOR_CORES_FLAG } from '../../../src/backends/webgpu/tensor_cores.js';
import { spawnCli } from '../../cli/run_cli.js';
import { cleanup, tempDir } from '../../io/checkpoint_helpers.js';

const TALA = 'examples/models/tala-moe';
/** what Dawn's probe says on Mesa's software GL (src/backends/webgpu/tensor_cores.ts, tensorCoreSupport) */
const MESA_REASON = 'the device lacks shader-f16 and chromium-experimental-subgroup-matrix';

describe('webgpu: --tensor-cores auto where the adapter has none', function () {
  this.timeout(180_000);
  let dir: string;
  before(async () => { dir = await tempDir('tensor-cores-cli-'); });
  after(cleanup);

  it('generate: the reason on stderr and in --json, and the f32 tokens (those of --tensor-cores off)', () => {
    const args = ['generate', '--model', TALA, '--prompt', 'miro ', '--max-new-tokens', '6', '--backend', 'webgpu', '--json'];
    const auto = spawnCli([...args, '--tensor-cores', 'auto']);
    expect(auto.code, auto.stderr).to.equal(0);
    expect(auto.stderr).to.include(`note: webgpu tensor cores: unavailable, f32 kernels: ${MESA_REASON}\n`);
    const off = spawnCli(args);
    expect(off.code, off.stderr).to.equal(0);
    expect(off.stderr).to.include('note: webgpu tensor cores: off (f32 kernels)\n');
    const [a, o] = [JSON.parse(auto.stdout), JSON.parse(off.stdout)];
    expect(a.tensorCores).to.equal(MESA_REASON);
    expect(o.tensorCores).to.equal('off');
    expect(a.ids).to.deep.equal(o.ids);
  });

  it('train: the reason in --json and every step\'s loss equal to --tensor-cores off', () => {
    // LoRA on the example model, as a user's fine-tune of a checkpoint folder
    const run = (mode: string) => spawnCli(['train', '--model', TALA, '--lora-rank', '2', '--lora-alpha', '4', '--data', 'examples/data/target_train.txt',
      '--steps', '2', '--batch', '2', '--seq', '16', '--backend', 'webgpu', '--tensor-cores', mode, '--json',
      '--out', join(dir, mode)]);
    const auto = run('auto');
    expect(auto.code, auto.stderr).to.equal(0);
    expect(auto.stderr).to.include(`note: webgpu tensor cores: unavailable, f32 kernels: ${MESA_REASON}\n`);
    const off = run('off');
    expect(off.code, off.stderr).to.equal(0);
    const [a, o] = [JSON.parse(auto.stdout), JSON.parse(off.stdout)];
    expect(a.tensorCores).to.equal(MESA_REASON);
    expect(o.tensorCores).to.equal('off');
    expect(a.losses).to.have.length(2);
    expect(a.losses).to.deep.equal(o.losses);
  });

  it('selectBackend on the suite\'s backend (set up without the toggles): auto says so and keeps the flag off', async () => {
    tf.env().set(TENSOR_CORES_FLAG, true);
    try {
      const report = await selectBackend('webgpu', { tensorCores: 'auto' });
      expect(report).to.deep.equal({
        backend: 'webgpu',
        tensorCores: "the webgpu backend was started without tensorCores 'auto' (setupDawnWebGPU), so its device has no subgroup matrices",
      });
      expect(tf.env().getBool(TENSOR_CORES_FLAG)).to.equal(false);
      expect(tf.getBackend()).to.equal('webgpu');
    } finally {
      tf.env().set(TENSOR_CORES_FLAG, false);
    }
  });
});
