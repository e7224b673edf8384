import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { spawnSync } from 'node:child_process';
import { copyFileSync, existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { encodeSafetensors, readSafetensorsFile } from '../../src/io/safetensors.js';
import { FixtureError, runBlockParity } from '../../src/models/parity.js';

const FIXTURES = 'spec/fixtures/hf';
const ARCHS = readdirSync(FIXTURES).filter(a => existsSync(join(FIXTURES, a, 'golden.json')));
const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';

/** A copy of a fixture whose golden.safetensors went through `edit` (tensors it drops it disposes). */
async function editedCopy(
    arch: string, edit: (tensors: Record<string, tf.Tensor>) => void): Promise<string> {
  const dir = mkdtempSync(join(tmpdir(), `parity-${arch}-`));
  for (const f of ['config.json', 'model.safetensors', 'golden.json']) {
    copyFileSync(join(FIXTURES, arch, f), join(dir, f));
  }
  const golden = await readSafetensorsFile(join(FIXTURES, arch, 'golden.safetensors'));
  const tensors: Record<string, tf.Tensor> = {};
  for (const name of golden.names()) tensors[name] = await golden.tensor(name);
  edit(tensors);
  writeFileSync(join(dir, 'golden.safetensors'), await encodeSafetensors(tensors));
  tf.dispose(Object.values(tensors));
  return dir;
}

/** block.out with one element moved by 1% of max|out|, far beyond the 1e-4 tolerance. */
function perturbOut(tensors: Record<string, tf.Tensor>): void {
  const out = tensors['block.out'];
  const data = Float32Array.from(out.dataSync());
  const scale = data.reduce((m, v) => Math.max(m, Math.abs(v)), 0);
  data[7] += 0.01 * scale;
  out.dispose();
  tensors['block.out'] = tf.tensor(data, out.shape);
}

function cli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('cli/parity', () => {
  const temps: string[] = [];
  after(() => { for (const d of temps) rmSync(d, { recursive: true, force: true }); });

  describe('runBlockParity', () => {
    it('finds the fixtures', () => {
      expect(ARCHS).to.include.members(
          ['mixtral', 'qwen2_moe', 'qwen3_moe', 'deepseek_v3', 'olmoe', 'glm4_moe', 'gpt_oss']);
    });

    for (const arch of ARCHS) {
      it(`matches transformers on the ${arch} block: out, dx, every parameter gradient, routing`, async () => {
        const before = tf.memory().numTensors;
        const r = await runBlockParity(join(FIXTURES, arch));
        expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);

        const golden = await readSafetensorsFile(join(FIXTURES, arch, 'golden.safetensors'));
        const expectedNames = ['out', 'dx',
          ...golden.names().filter(n => n.startsWith('block.grad.')).map(n => n.slice('block.'.length)),
          ...['router_logits', 'router.logits', 'router.weights'].filter(n => golden.has(`block.${n}`))];
        expect(r.comparisons.map(c => c.name).sort()).to.deep.equal(expectedNames.sort());
        for (const c of r.comparisons) {
          expect(c.maxRelError, `${arch} ${c.name}`).to.be.at.most(1e-4);
        }
        expect(r.routingIdentical, JSON.stringify(r.routingMismatches)).to.equal(true);
        // the newer fixtures store the experts transformers chose: the routing is checked against those;
        // else against the router logits the block returned (llama4_text), else the reference kernel
        expect(r.routingReference).to.equal(golden.has('block.router.indices') ? 'golden router indices' :
          golden.has('block.router_logits') ? 'golden router logits' : 'reference expert kernel');
        expect(r).to.include({ family: arch, backend: BACKEND, expertKernel: 'fused', pass: true, tokens: 15 });
      });
    }

    it('fails a fixture whose golden output is off, and only that comparison', async () => {
      const dir = await editedCopy('qwen3_moe', perturbOut);
      temps.push(dir);
      const r = await runBlockParity(dir);
      expect(r.pass).to.equal(false);
      expect(r.comparisons.filter(c => !c.pass).map(c => c.name)).to.deep.equal(['out']);
      const out = r.comparisons.find(c => c.name === 'out')!;
      expect(out.maxRelError).to.be.within(0.009, 0.011);
      expect(r.routingIdentical).to.equal(true);
    });

    describe('with golden router logits [T, E]', () => {
      /** block.router_logits = x·W_gᵀ from the checkpoint; token 3's row negated when `flip` */
      async function withLogits(flip: boolean): Promise<string> {
        const model = await readSafetensorsFile(join(FIXTURES, 'mixtral', 'model.safetensors'));
        const wg = await model.tensor('model.layers.0.block_sparse_moe.gate.weight');
        const dir = await editedCopy('mixtral', t => {
          const logits = tf.tidy(() => tf.matMul(tf.reshape(t['block.x'], [15, 64]), wg, false, true));
          const data = Float32Array.from(logits.dataSync());
          if (flip) for (let e = 0; e < 8; e++) data[3 * 8 + e] *= -1;
          logits.dispose();
          t['block.router_logits'] = tf.tensor(data, [15, 8]);
        });
        wg.dispose();
        temps.push(dir);
        return dir;
      }

      it('compares the logits and the experts chosen from them', async () => {
        const r = await runBlockParity(await withLogits(false));
        expect(r.routingReference).to.equal('golden router logits');
        expect(r.routingIdentical).to.equal(true);
        expect(r.comparisons.find(c => c.name === 'router_logits')!.maxRelError).to.be.at.most(1e-5);
        expect(r.pass).to.equal(true);
      });

      it('reports the tokens whose experts differ', async () => {
        const r = await runBlockParity(await withLogits(true));
        expect(r.routingIdentical).to.equal(false);
        expect(r.routingMismatches.map(m => m.token)).to.deep.equal([3]);
        expect(r.routingMismatches[0].expected).to.have.length(2);
        expect(r.routingMismatches[0].expected).to.not.have.members(r.routingMismatches[0].actual);
        expect(r.comparisons.filter(c => !c.pass).map(c => c.name)).to.deep.equal(['router_logits']);
        expect(r.pass).to.equal(false);
      });
    });

    it('checks the routing against the experts transformers chose, when the fixture has them', async () => {
      // token 3 gets two experts it did not choose (K = 2 of E = 8)
      const dir = await editedCopy('olmoe', t => {
        const data = Int32Array.from(t['block.router.indices'].dataSync());
        const chosen = [data[6], data[7]];
        const others = [0, 1, 2, 3, 4, 5, 6, 7].filter(e => !chosen.includes(e));
        data[6] = others[0];
        data[7] = others[1];
        t['block.router.indices'].dispose();
        t['block.router.indices'] = tf.tensor(data, [15, 2], 'int32');
      });
      temps.push(dir);
      const r = await runBlockParity(dir);
      expect(r.routingReference).to.equal('golden router indices');
      expect(r.routingIdentical).to.equal(false);
      expect(r.routingMismatches.map(m => m.token)).to.deep.equal([3]);
      expect(r.comparisons.filter(c => !c.pass).map(c => c.name)).to.deep.equal(['router.weights']);
      expect(r.pass).to.equal(false);
    });

    it('rejects a golden gradient that maps to no block parameter', async () => {
      const dir = await editedCopy('mixtral', t => { t['block.grad.experts.bias'] = tf.zeros([8, 64]); });
      temps.push(dir);
      const before = tf.memory().numTensors;
      let err: unknown;
      try { await runBlockParity(dir); } catch (e) { err = e; }
      expect(err).to.be.instanceOf(FixtureError);
      expect((err as Error).message).to.equal(`${dir}: the golden gradients do not match the block's ` +
          "parameters:\n  'block.grad.experts.bias' is no parameter of a mixtral block " +
          '(known: gate.weight, experts.gate_up_proj, experts.down_proj)');
      expect(tf.memory().numTensors).to.equal(before);
    });

    it('rejects a block parameter without a golden gradient', async () => {
      const dir = await editedCopy('mixtral', t => {
        t['block.grad.gate.weight'].dispose();
        delete t['block.grad.gate.weight'];
      });
      temps.push(dir);
      let err: unknown;
      try { await runBlockParity(dir); } catch (e) { err = e; }
      expect(err).to.be.instanceOf(FixtureError);
      expect((err as Error).message).to.match(/\n  the block parameter 'router.weight' has no golden gradient$/);
    });

    it('rejects golden tensors whose shapes do not fit the block', async () => {
      const dir = await editedCopy('qwen3_moe', t => {
        t['block.dx'].dispose();
        t['block.dx'] = tf.zeros([15, 64]);
      });
      temps.push(dir);
      let err: unknown;
      try { await runBlockParity(dir); } catch (e) { err = e; }
      expect(err).to.be.instanceOf(FixtureError);
      expect((err as Error).message).to.equal(
          `${join(dir, 'golden.safetensors')}: 'block.dx' must have the shape of 'block.x' [3,5,64] but has [15,64]`);
    });

    it('rejects a directory that is not a fixture', async () => {
      let err: unknown;
      try { await runBlockParity(FIXTURES); } catch (e) { err = e; }
      expect(err).to.be.instanceOf(FixtureError);
      expect((err as Error).message).to.equal(`fixture '${FIXTURES}' lacks config.json, model.safetensors, ` +
          'golden.json, golden.safetensors (is it a fixture directory?)');
    });
  });

  describe('the command', () => {
    it('exits 0 and prints one JSON object with --json', () => {
      const r = cli(['parity', '--fixture', join(FIXTURES, 'mixtral'), '--backend', BACKEND, '--json']);
      expect(r.status, r.stderr).to.equal(0);
      const report = JSON.parse(r.stdout) as { pass: boolean; family: string; backend: string; comparisons: unknown[] };
      expect(report).to.include({ pass: true, family: 'mixtral', backend: BACKEND });
      expect(report.comparisons).to.have.length(5);
    });

    it('exits 1 and prints the failing row when the golden output is off', async () => {
      const dir = await editedCopy('mixtral', perturbOut);
      temps.push(dir);
      const r = cli(['parity', '--fixture', dir, '--backend', BACKEND]);
      expect(r.status, r.stderr).to.equal(1);
      expect(r.stdout).to.match(/\n {2}out +1\.0\de-2 +FAIL\n/);
      expect(r.stdout).to.match(/\n {2}dx +\d\.\d\de-\d+ +ok\n/);
      expect(r.stdout).to.match(/\nFAIL \(1 error\(s\) > 0\.0001\)\n$/);
    });

    it('exits 2 with one line on stderr for bad arguments', () => {
      const bad = cli(['parity', '--fixture', join(FIXTURES, 'mixtral'), '--backend', 'webgl']);
      expect(bad.status).to.equal(2);
      expect(bad.stderr).to.equal('tfjs-moe-lora: Invalid values: Argument: backend, Given: "webgl", ' +
          'Choices: "cpu", "wasm", "webgpu" (see tfjs-moe-lora --help)\n');
      const missing = cli(['parity', '--fixture', 'no/such/dir']);
      expect(missing.status).to.equal(2);
      expect(missing.stderr).to.equal(
          "tfjs-moe-lora: --fixture: 'no/such/dir' is not a directory (see tfjs-moe-lora --help)\n");
      expect(missing.stdout).to.equal('');
    });
  });
});
