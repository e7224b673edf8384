/**
 * bench/e2e/write_checkpoint.ts, the writer of go.sh qwen3-full, with a small config: the sparse
 * checkpoint and its e2e_checkpoint.json (sizes from the files, zeroExperts said), ours.ts copying
 * that marker into its result with its memory at each stage, and both tools' argument checks.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defaultTokenizerPath, parseOursArgs, runOurs } from '../../bench/e2e/ours.js';
import { parseWriteCheckpointArgs, writeE2ECheckpoint } from '../../bench/e2e/write_checkpoint.js';
import { HFTokenizer } from '../../src/data/hf_tokenizer.js';
import { configTensorPlan } from '../../src/io/hf_checkpoint_core.js';
import type { HFConfig } from '../../src/models/families.js';
import { OpArgumentError } from '../../src/ops/validate.js';
import { fixtureConfig } from '../io/checkpoint_helpers.js';
import { rejection } from '../helpers/rejection.js';

describe('bench/e2e/write_checkpoint.ts', () => {
  let dir: string;
  before(() => { dir = mkdtempSync(join(tmpdir(), 'e2e-write-')); });
  after(() => rmSync(dir, { recursive: true, force: true }));

  it('writes a sparse checkpoint and its marker; ours.ts carries the marker and its memory per stage into result.json', async () => {
    const config: HFConfig = { ...await fixtureConfig('qwen3_moe'), moe_intermediate_size: 256 };
    const out = join(dir, 'ckpt');
    const info = await writeE2ECheckpoint({ model: 'qwen3', config, zeroExperts: true, out });
    const files = await readdir(out);
    const size = (f: string) => statSync(join(out, f)).size;
    const plan = configTensorPlan(config).all;
    const elements = (keep: (n: string) => boolean) => plan.filter(e => keep(e.name)).reduce((n, e) => n + e.shape.reduce((a, b) => a * b, 1), 0);
    expect(JSON.parse(readFileSync(join(out, 'e2e_checkpoint.json'), 'utf8'))).to.deep.equal(JSON.parse(JSON.stringify(info)));
    expect(info).to.deep.include({
      model: 'qwen3', model_type: 'qwen3_moe', source: 'Qwen/Qwen3-30B-A3B', layers: 2, full_layers: 48, zeroExperts: true,
      params: elements(() => true), expert_params: elements(n => /\.mlp\.experts\.\d+\./.test(n)), zero_bytes: 2 * elements(n => /\.mlp\.experts\.\d+\./.test(n)),
    });
    expect(info.note).to.match(/^routed experts all zeros/);
    // sizes of the files but the marker itself (written after they were counted)
    expect(info.bytes).to.equal(files.filter(f => f !== 'e2e_checkpoint.json').reduce((n, f) => n + size(f), 0));
    expect(info.disk_bytes).to.be.below(info.bytes - info.zero_bytes / 2);

    const data = join(dir, 'text.jsonl');
    writeFileSync(data, `${JSON.stringify({ text: 'Experts are chosen per token by a router.' })}\n`);
    const tokenizer = HFTokenizer.fromFiles({ tokenizer: readFileSync(defaultTokenizerPath(), 'utf8') });
    const before = tf.memory().numTensors;
    const result = await runOurs({ model: out, data, out: join(dir, 'run'), tokenizer, expertDtype: 'nf4', rank: 2, alpha: 4, seq: 8, warmup: 0, steps: 1,
      saveAdapter: false, poolLimitBytes: 0, log: () => {} });
    expect(tf.memory().numTensors).to.equal(before);
    expect(result.checkpoint).to.deep.equal(JSON.parse(JSON.stringify(info)));
    expect(result.memoryStages.map(s => s.stage)).to.deep.equal(['load', 'step 1', 'prompt logits']);
    const webgpu = tf.getBackend() === 'webgpu';
    expect(result.poolLimitBytes).to.equal(webgpu ? 0 : null);
    for (const s of result.memoryStages) {
      expect(s.numBytes, s.stage).to.be.above(0);
      expect(s.peakUsedBytes === null, s.stage).to.equal(!webgpu);
      // with a bound of 0 bytes the pool never holds more than the most in use
      if (webgpu) expect(s.peakAllocatedBytes!, s.stage).to.equal(s.peakUsedBytes!);
    }
    expect(result.memory.peakUsedBytes ?? null).to.equal(webgpu ? Math.max(...result.memoryStages.map(s => s.peakUsedBytes!)) : null);
  });

  it('refuses a model, layer count or folder it cannot write, and bad flags', async () => {
    const msg = async (o: Parameters<typeof writeE2ECheckpoint>[0]) => {
      const e = await rejection(writeE2ECheckpoint(o));
      expect(e).to.be.instanceOf(OpArgumentError);
      return e.message;
    };
    expect(await msg({ model: 'mixtral', zeroExperts: true, out: join(dir, 'm') })).to.equal("`e2eWriteCheckpoint()`: 'model' must be one of 'qwen3', 'olmoe' but got 'mixtral'");
    expect(await msg({ model: 'qwen3', layers: 49, zeroExperts: true, out: join(dir, 'm') })).to.equal("`e2eWriteCheckpoint()`: 'layers' must be <= 48 but got 49");
    expect(await msg({ model: 'qwen3', zeroExperts: true, out: '' })).to.equal("`e2eWriteCheckpoint()`: 'out' must be a folder path but got \"\"");
    const full = join(dir, 'full');
    await writeE2ECheckpoint({ model: 'olmoe', config: await fixtureConfig('olmoe'), zeroExperts: false, out: full });
    expect(await msg({ model: 'olmoe', zeroExperts: false, out: full })).to.match(/^`e2eWriteCheckpoint\(\)`: 'out' must be an empty or missing folder but '.*full' holds \d+ entries \(/);
    const bound = await rejection(runOurs({ model: full, data: 'x', out: join(dir, 'o'), poolLimitBytes: -1, log: () => {} }));
    expect(bound).to.be.instanceOf(OpArgumentError);
    expect(bound.message).to.equal("`e2eOurs()`: 'poolLimitBytes' must be >= 0 but got -1");
    expect(parseOursArgs(['--pool-limit-mb', '256']).poolLimitBytes).to.equal(256 * 2 ** 20);
    expect(parseOursArgs(['--model', 'M']).poolLimitBytes).to.equal(undefined);
    // Dawn flags for the run, space-separated; none by default
    expect(parseOursArgs(['--dawn-flags', 'enable-dawn-features=disable_robustness  disable-dawn-features=x']).dawnFlags)
        .to.deep.equal(['enable-dawn-features=disable_robustness', 'disable-dawn-features=x']);
    expect(parseOursArgs(['--model', 'M']).dawnFlags).to.deep.equal([]);
    expect(parseWriteCheckpointArgs(['--model', 'qwen3', '--layers', '48', '--zero-experts', 'on', '--out', 'D']))
        .to.deep.equal({ model: 'qwen3', layers: 48, zeroExperts: true, out: 'D' });
    expect(parseWriteCheckpointArgs(['--model', 'olmoe', '--out', 'D'])).to.deep.equal({ model: 'olmoe', layers: undefined, zeroExperts: false, out: 'D' });
    expect(() => parseWriteCheckpointArgs(['--model'])).to.throw(OpArgumentError, `\`e2eWriteCheckpoint()\`: arguments must be '--flag value' pairs but got ["--model"]`);
    expect(() => parseWriteCheckpointArgs(['--zero', 'on'])).to.throw(OpArgumentError, "`e2eWriteCheckpoint()`: '--zero' is not a flag; the flags are --model --layers --zero-experts --out");
    expect(() => parseWriteCheckpointArgs(['--zero-experts', 'yes'])).to.throw(OpArgumentError, "`e2eWriteCheckpoint()`: '--zero-experts' must be one of 'on', 'off' but got 'yes'");
  });
});
