/**
 * examples/finetune.ts (`npm run example`) in short runs: 5 LoRA steps on the shipped model, then
 * resumed to 7, then interrupted with Ctrl-C. Each run writes the PEFT adapter (loaded back
 * here), the JSON log and the loss-curve SVG.
 */
import { expect } from 'chai';
import { spawn, spawnSync } from 'node:child_process';
import { readFile, readdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { cleanup, tempDir } from '../io/checkpoint_helpers.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';
const MODEL = 'examples/models/tala-moe';

interface Log {
  backend: string;
  lora: { r: number; alpha: number; targets: string[] };
  stepsDone: number;
  stepsPlanned: number;
  interrupted: boolean;
  losses: number[];
  valLoss: { base: number; adapted: number };
  generation: { prompt: string; base: string; adapted: string };
}

const readLog = async (out: string) => JSON.parse(await readFile(join(out, 'log.json'), 'utf8')) as Log;

describe('examples/finetune.ts', function () {
  this.timeout(120_000);
  let out: string;
  let val: string;
  // a short held-out text and small windows keep each run to seconds on the cpu backend too
  const args = (extra: string[]) => ['--import', 'tsx', 'examples/finetune.ts', '--backend', BACKEND, '--out', out,
    '--val', val, '--batch', '4', '--seq', '32', ...extra];

  before(async () => {
    out = await tempDir('example-');
    val = join(out, 'val.txt');
    const heldOut = (await readFile('examples/data/target_val.txt', 'utf8')).split('\n').slice(0, 12).join('\n');
    await writeFile(val, `${heldOut}\n`);
  });
  after(cleanup);

  it('--steps 5: exits 0, reports base vs adapted, writes the adapter, the log and the plot', async () => {
    const r = spawnSync(process.execPath, args(['--steps', '5']), { encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/validation loss on held-out target text \(\d+ characters, nats per character\):\n {2}base {5}\d+\.\d{4}\n {2}adapted {2}\d+\.\d{4} {2}\([-+]\d+\.\d%\)\n/);
    expect(r.stdout).to.match(/greedy continuation of ".*":\n {2}base {5}".*"\n {2}adapted {2}".*"\n/);
    expect(r.stderr).to.include('step 5/5');

    expect((await readdir(out)).sort()).to.include.members(['adapter', 'log.json', 'loss.svg']);
    const log = await readLog(out);
    expect(log).to.include({ backend: BACKEND, stepsDone: 5, stepsPlanned: 5, interrupted: false });
    expect(log.lora).to.deep.equal({ r: 4, alpha: 8, targets: ['experts.gate_up', 'experts.down', 'router'] });
    expect(log.losses).to.have.length(5);
    expect(log.losses.every(Number.isFinite)).to.equal(true);
    expect(r.stdout).to.include(`base     ${log.valLoss.base.toFixed(4)}`);
    expect(r.stdout).to.include(`adapted  ${log.valLoss.adapted.toFixed(4)}`);
    expect(log.generation.prompt.endsWith(' ')).to.equal(true);

    const svg = await readFile(join(out, 'loss.svg'), 'utf8');
    expect(svg).to.match(/^<svg[^>]*xmlns="http:\/\/www\.w3\.org\/2000\/svg"/);
    expect(svg).to.include('train loss').and.to.include('val adapted').and.to.match(/<path d="M/);

    const model = await loadHFCheckpoint(MODEL);
    const adapter = await loadPeftAdapter(model, join(out, 'adapter'));
    expect(adapter).to.include({ r: 4, alpha: 8 });
    expect(adapter.layers).to.deep.equal(['model.layers.0.mlp', 'model.layers.1.mlp']);
    model.dispose();
  });

  it('--resume continues the steps and the log from the saved adapter', async () => {
    const before = await readLog(out);
    const r = spawnSync(process.execPath, args(['--steps', '7', '--resume']), { encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(0);
    expect(r.stdout).to.include('steps 6..7');
    const log = await readLog(out);
    expect(log).to.include({ stepsDone: 7, stepsPlanned: 7 });
    expect(log.losses.slice(0, 5)).to.deep.equal(before.losses);
    expect(log.losses).to.have.length(7);
    // the base model is the same, so is its loss
    expect(log.valLoss.base).to.be.closeTo(before.valLoss.base, 1e-6);
  });

  it('--resume checks the flags against the saved run: --steps below the steps done, and each changed flag', async () => {
    const before = await readFile(join(out, 'log.json'), 'utf8');
    const below = spawnSync(process.execPath, args(['--steps', '3', '--resume']), { encoding: 'utf8' });
    expect(below.status, below.stderr).to.equal(1);
    expect(below.stderr.trimEnd()).to.equal(`--resume: --steps 3 is below the 7 steps already done in '${out}'; pass --steps 7 or more`);
    const changed = spawnSync(process.execPath, args(['--steps', '9', '--resume', '--lr', '0.5', '--lora-rank', '2', '--seed=3',
      '--targets', 'router']), { encoding: 'utf8' });
    expect(changed.status, changed.stderr).to.equal(1);
    expect(changed.stderr.trimEnd()).to.equal(`--resume: flags differ from the run saved in '${out}': ` +
      '--lr 0.5 (the saved run has 0.01), --seed 3 (the saved run has 1), --lora-rank 2 (the saved run has 4), ' +
      '--targets router (the saved run has experts.gate_up,experts.down,router); leave them out to continue that run, ' +
      'or start a new one without --resume');
    const one = spawnSync(process.execPath, ['--import', 'tsx', 'examples/finetune.ts', '--backend', BACKEND, '--out', out,
      '--val', val, '--steps', '9', '--resume', '--batch', '4', '--seq', '16'], { encoding: 'utf8' });
    expect(one.status, one.stderr).to.equal(1);
    expect(one.stderr.trimEnd()).to.equal(`--resume: a flag differs from the run saved in '${out}': --seq 16 (the saved run has 32); ` +
      'leave it out to continue that run, or start a new one without --resume');
    expect(await readFile(join(out, 'log.json'), 'utf8'), 'nothing written').to.equal(before);
  });

  it('the adapter and log.json are one save: a run killed between them leaves the previous run, which resumes', async () => {
    const files = async () => Object.fromEntries(await Promise.all(['adapter/adapter_config.json', 'adapter/adapter_model.safetensors',
      'log.json', 'loss.svg'].map(async f => [f, (await readFile(join(out, f))).toString('base64')])));
    const before = await files();
    // SIGKILL when log.json is written, after the new adapter was
    const preload = join(await tempDir('example-kill-'), 'kill_at_log.mjs');
    await writeFile(preload, [
      "import { createRequire, syncBuiltinESMExports } from 'node:module';",
      'const fsp = createRequire(import.meta.url)(\'node:fs/promises\');',
      'const writeFile = fsp.writeFile;',
      "fsp.writeFile = async (path, ...rest) => { if (String(path).endsWith('log.json')) process.kill(process.pid, 'SIGKILL'); return writeFile(path, ...rest); };",
      'syncBuiltinESMExports();',
    ].join('\n'));
    const killed = spawnSync(process.execPath, ['--import', preload, ...args(['--steps', '9', '--resume'])], { encoding: 'utf8' });
    expect(killed.signal, killed.stderr).to.equal('SIGKILL');
    expect(await files()).to.deep.equal(before);
    const resumed = spawnSync(process.execPath, args(['--steps', '8', '--resume']), { encoding: 'utf8' });
    expect(resumed.status, resumed.stderr).to.equal(0);
    expect(resumed.stdout).to.include('steps 8..8');
    expect(await readLog(out)).to.include({ stepsDone: 8 });
  });

  it('a run that diverges stops with one line that says so, and saves nothing', async () => {
    const fresh = await tempDir('example-diverge-');
    const r = spawnSync(process.execPath, ['--import', 'tsx', 'examples/finetune.ts', '--backend', BACKEND, '--out', fresh,
      '--val', val, '--batch', '4', '--seq', '32', '--steps', '60', '--lr', '1000'], { encoding: 'utf8' });
    expect(r.status, r.stderr).to.equal(1);
    expect(r.stderr).to.match(/\ntraining stopped: the model collapsed: the loss is stuck at ln\(vocab\) = \d\.\d{4} \(the same probability for all \d+ tokens\) for the last 10 steps, after it had reached \d\.\d{4} at step \d+; try a smaller learning rate \(it is 1000\)\n$/);
    expect(r.stderr).to.not.match(/\n\s+at /);
    expect(await readdir(fresh)).to.deep.equal([]);
  });

  it('Ctrl-C saves the adapter and the log and exits with 130', async () => {
    const child = spawn(process.execPath, args(['--steps', '100000']), { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let sent = false;
    child.stdout.on('data', (d: Buffer) => {
      stdout += String(d);
      if (!sent && /\ntraining .*\n/.test(stdout)) {
        sent = true;
        child.kill('SIGINT');
      }
    });
    child.stderr.on('data', (d: Buffer) => { stderr += String(d); });
    const code = await new Promise<number | null>(resolve => child.on('close', resolve));
    expect(code, stderr).to.equal(130);
    expect(stderr).to.include('interrupted: saving after this step');
    expect(stdout).to.match(/stopped at step \d+ of 100000; continue with --resume\n$/);
    const log = await readLog(out);
    expect(log).to.include({ interrupted: true, stepsPlanned: 100000 });
    expect(log.losses).to.have.length(log.stepsDone);
    const model = await loadHFCheckpoint(MODEL);
    await loadPeftAdapter(model, join(out, 'adapter'));
    model.dispose();
  });

  it('rejects --resume without a saved run and an unknown LoRA target, with exit code 1', async () => {
    const empty = await tempDir('example-empty-');
    const example = (extra: string[]) => spawnSync(process.execPath, ['--import', 'tsx', 'examples/finetune.ts', ...extra], { encoding: 'utf8' });
    const resume = example(['--out', empty, '--resume']);
    expect(resume.status).to.equal(1);
    expect(resume.stderr).to.include(`--resume: '${empty}' has no log.json and adapter/ to continue from (run without --resume first)`);
    const targets = example(['--out', empty, '--targets', 'experts.down,gate']);
    expect(targets.status).to.equal(1);
    expect(targets.stderr).to.include("--targets: 'gate' is not one of experts.gate_up, experts.down, router, shared.gate, shared.up, shared.down");
  });
});
