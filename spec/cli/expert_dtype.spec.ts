/** `--expert-dtype` on the commands that load a model: convert, inspect, train. */
import { expect } from 'chai';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { cleanup, fixtureDir, tempDir } from '../io/checkpoint_helpers.js';
import { writeHalfFixture } from '../helpers/half_checkpoint.js';
import { runMain } from './run_cli.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { CharTokenizer, writeTokenizer } from '../../src/data/index.js';
import { sparseMoELayers } from '../../src/layers/moe_causal_lm.js';

/** the spec run's backend, so the commands do not switch (and warn) */
const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';

/** The expertStorage of each SparseMoE in a TF.js folder's model.json (tfjs writes its keys snake_case). */
async function storages(dir: string): Promise<string[]> {
  const json = JSON.parse(await readFile(join(dir, 'model.json'), 'utf8'));
  return (json.modelTopology.config.layers as Array<{ class_name: string; config: { expert_storage: string } }>)
      .filter(l => l.class_name === 'SparseMoE').map(l => l.config.expert_storage);
}

describe('--expert-dtype', function () {
  this.timeout(60_000);
  let bf16: string;

  before(async () => {
    bf16 = await tempDir('cli-bf16-');
    await writeHalfFixture(fixtureDir('olmoe'), 'bf16', bf16, await tempDir('cli-rounded-'));
  });
  after(cleanup);

  it('convert keeps bf16 experts packed by default and widens them with float32', async () => {
    const stored = join(await tempDir('cli-out-'), 'm');
    const r1 = await runMain(['convert', '--from', 'hf', '--to', 'tfjs', '--input', bf16, '--output', stored, '--backend', BACKEND]);
    expect(r1.code, r1.stderr).to.equal(0);
    expect(await storages(stored)).to.deep.equal(['bf16', 'bf16']);
    const wide = join(await tempDir('cli-out-'), 'm');
    const r2 = await runMain(['convert', '--to', 'tfjs', '--input', bf16, '--output', wide, '--expert-dtype', 'float32', '--backend', BACKEND]);
    expect(r2.code, r2.stderr).to.equal(0);
    expect(await storages(wide)).to.deep.equal(['float32', 'float32']);
  });

  it('inspect takes it; a bad value is an argument error (exit 2)', async () => {
    const ok = await runMain(['inspect', '--model', bf16, '--expert-dtype', 'float32', '--json', '--backend', BACKEND]);
    expect(ok.code, ok.stderr).to.equal(0);
    const bad = await runMain(['inspect', '--model', bf16, '--expert-dtype', 'bf16']);
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.match(/Invalid values:\s+Argument: expert-dtype, Given: "bf16", Choices: "stored", "float32", "int8", "int4", "nf4", "nf4-dq", "mxfp4"/);
  });

  it('convert quantizes with int4 / nf4 (int4 groups of 32 with --int4-group-size): the TF.js folder keeps them quantized', async () => {
    for (const kind of ['int4', 'nf4']) {
      const out = join(await tempDir('cli-out-'), 'm');
      const r = await runMain(['convert', '--to', 'tfjs', '--input', bf16, '--output', out, '--expert-dtype', kind, '--backend', BACKEND]);
      expect(r.code, r.stderr).to.equal(0);
      expect(await storages(out), kind).to.deep.equal([kind, kind]);
      const ok = await runMain(['inspect', '--model', out, '--json', '--backend', BACKEND]);
      expect(ok.code, ok.stderr).to.equal(0);
    }
     const g32 = join(await tempDir('cli-out-'), 'm');
    const r = await runMain(['convert', '--to', 'tfjs', '--input', bf16, '--output', g32, '--expert-dtype', 'int4', '--int4-group-size', '32', '--backend', BACKEND]);
    expect(r.code, r.stderr).to.equal(0);
    const json = JSON.parse(await readFile(join(g32, 'model.json'), 'utf8'));
    const groups = (json.modelTopology.config.layers as Array<{ class_name: string; config: { expert_group_size?: number } }>)
        .filter(l => l.class_name === 'SparseMoE').map(l => l.config.expert_group_size);
    expect(groups).to.deep.equal([32, 32]);
    const bad = await runMain(['inspect', '--model', bf16, '--expert-dtype', 'nf4', '--int4-group-size', '32']);
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.match(/--int4-group-size needs --expert-dtype int4 but --expert-dtype is nf4/);
    const bad2 = await runMain(['inspect', '--model', bf16, '--expert-dtype', 'int4', '--int4-group-size', '48']);
    expect(bad2.code).to.equal(2);
    expect(bad2.stderr).to.match(/Invalid values:\s+Argument: int4-group-size, Given: 48, Choices: 32, 64, 128/);
  });

  it('train: QLoRA with --expert-dtype nf4 trains the adapter on the quantized experts and writes it', async () => {
    const data = join(await tempDir('cli-data-'), 'text.txt');
    await writeFile(data, 'abcdefghij'.repeat(20));
    // the model folder brings its tokenizer: a character one (vocabulary within the fixture's 97)
    const model16 = await tempDir('cli-qlora-model-');
    await writeHalfFixture(fixtureDir('olmoe'), 'bf16', model16, await tempDir('cli-rounded-'));
    await writeTokenizer(model16, CharTokenizer.fromText('abcdefghij'));
    const out = join(await tempDir('cli-qlora-'), 'out');
    const r = await runMain(['train', '--model', model16, '--data', data, '--out', out, '--steps', '2', '--batch', '2', '--seq', '8',
      '--lora-rank', '2', '--lora-alpha', '4', '--lora-targets', 'experts.gate_up,experts.down', '--expert-dtype', 'nf4', '--backend', BACKEND]);
    expect(r.code, r.stderr).to.equal(0);
    const adapter = await readFile(join(out, 'adapter_model.safetensors'));
    expect(adapter.byteLength).to.be.above(0);
    const model = await loadHFCheckpoint(model16, { expertDtype: 'nf4' });
    const loaded = await loadPeftAdapter(model, out);
    expect(loaded.targets).to.have.members(['experts.gate_up', 'experts.down']);
    expect(sparseMoELayers(model).map(l => l.expertStorage)).to.deep.equal(['nf4', 'nf4']);
    model.dispose();
  });

  it('merge --expert-dtype nf4 writes bf16 of the dequantized base plus the delta; --requantize reports the change', async () => {
    const adapter = join(fixtureDir('olmoe'), 'adapter');
    const out = join(await tempDir('cli-merge-'), 'm');
    const r = await runMain(['merge', '--model', fixtureDir('olmoe'), '--adapter', adapter, '--out', out, '--expert-dtype', 'nf4', '--backend', BACKEND]);
    expect(r.code, r.stderr).to.equal(0);
    expect(r.stdout).to.match(/\(HF checkpoint, bfloat16\)/);
    expect(r.stdout).to.not.match(/re-quantized/);
    const out2 = join(await tempDir('cli-merge-'), 'm');
    const q = await runMain(['merge', '--model', fixtureDir('olmoe'), '--adapter', adapter, '--out', out2, '--expert-dtype', 'nf4',
      '--requantize', '--backend', BACKEND]);
    expect(q.code, q.stderr).to.equal(0);
    expect(q.stdout).to.match(/ {2}re-quantized experts: largest change \d\.\d+(e-\d+)?\n/);
    const bad = await runMain(['merge', '--model', fixtureDir('olmoe'), '--adapter', adapter, '--out', join(await tempDir('cli-merge-'), 'm'), '--requantize']);
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.match(/--requantize needs a quantized --expert-dtype \(int8, int4, nf4, nf4-dq, mxfp4\) but got none/);
  });

  it("train: full fine-tuning with --expert-dtype stored is refused (exit 1), before any step", async () => {
    const data = join(await tempDir('cli-data-'), 'text.txt');
    await writeFile(data, 'abcdefghij'.repeat(20));
    const out = join(await tempDir('cli-train-'), 'out');
    const r = await runMain(['train', '--model', bf16, '--data', data, '--out', out, '--steps', '1', '--expert-dtype', 'stored', '--backend', BACKEND]);
    expect(r.code).to.equal(1);
    expect(r.stderr).to.match(/full fine-tuning trains the routed experts, which needs them in float32: expertDtype 'stored' keeps them 16-bit and frozen/);
    const q = await runMain(['train', '--model', bf16, '--data', data, '--out', out, '--steps', '1', '--expert-dtype', 'nf4', '--backend', BACKEND]);
    expect(q.code).to.equal(1);
    expect(q.stderr).to.match(/full fine-tuning trains the routed experts, which needs them in float32: expertDtype 'nf4' keeps them quantized and frozen/);
  });
});
