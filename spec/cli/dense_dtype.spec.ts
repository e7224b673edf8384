/** `--dense-dtype` beside --expert-dtype: convert, inspect, train (LoRA on a 16-bit base; full fine-tuning refuses it). */
import { expect } from 'chai';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { cleanup, fixtureDir, tempDir } from '../io/checkpoint_helpers.js';
import { writeHalfFixture } from '../helpers/half_checkpoint.js';
import { runMain } from './run_cli.js';
import { CharTokenizer, writeTokenizer } from '../../src/data/index.js';

const BACKEND = process.env.TFJS_BACKEND ?? 'cpu';

/** The denseStorage of each RotaryAttention, TokenEmbedding and LMHead in a TF.js folder's model.json (absent: float32). */
async function denseStorages(dir: string): Promise<string[]> {
  const json = JSON.parse(await readFile(join(dir, 'model.json'), 'utf8'));
  return (json.modelTopology.config.layers as Array<{ class_name: string; config: { dense_storage?: string } }>)
      .filter(l => ['RotaryAttention', 'TokenEmbedding', 'LMHead'].includes(l.class_name))
      .map(l => `${l.class_name}:${l.config.dense_storage ?? 'float32'}`);
}

describe('--dense-dtype', function () {
  this.timeout(60_000);
  let bf16: string;

  before(async () => {
    bf16 = await tempDir('cli-dense-bf16-');
    await writeHalfFixture(fixtureDir('olmoe'), 'bf16', bf16, await tempDir('cli-dense-rounded-'));
    await writeTokenizer(bf16, CharTokenizer.fromText('abcdefghij'));
  });
  after(cleanup);

  it('convert keeps bf16 attention, embedding and head packed with stored, float32 by default; inspect takes it; a bad value exits 2', async () => {
    const stored = join(await tempDir('cli-dense-out-'), 'm');
    const r1 = await runMain(['convert', '--to', 'tfjs', '--input', bf16, '--output', stored, '--dense-dtype', 'stored', '--backend', BACKEND]);
    expect(r1.code, r1.stderr).to.equal(0);
    expect(await denseStorages(stored)).to.deep.equal(['TokenEmbedding:bf16', 'RotaryAttention:bf16', 'RotaryAttention:bf16', 'LMHead:bf16']);
    const wide = join(await tempDir('cli-dense-out-'), 'm');
    const r2 = await runMain(['convert', '--to', 'tfjs', '--input', bf16, '--output', wide, '--backend', BACKEND]);
    expect(r2.code, r2.stderr).to.equal(0);
    expect(await denseStorages(wide)).to.deep.equal(['TokenEmbedding:float32', 'RotaryAttention:float32', 'RotaryAttention:float32', 'LMHead:float32']);
    const ok = await runMain(['inspect', '--model', bf16, '--dense-dtype', 'stored', '--json', '--backend', BACKEND]);
    expect(ok.code, ok.stderr).to.equal(0);
    const bad = await runMain(['inspect', '--model', bf16, '--dense-dtype', 'bf16']);
    expect(bad.code).to.equal(2);
    expect(bad.stderr).to.match(/Invalid values:\s+Argument: dense-dtype, Given: "bf16", Choices: "stored", "float32"/);
  });

  it('train: LoRA on q/k/v/o with --dense-dtype stored writes the adapter; full fine-tuning refuses it (exit 1)', async () => {
    const data = join(await tempDir('cli-dense-data-'), 'text.txt');
    await writeFile(data, 'abcdefghij'.repeat(20));
    const out = join(await tempDir('cli-dense-train-'), 'out');
    const r = await runMain(['train', '--model', bf16, '--data', data, '--out', out, '--steps', '2', '--batch', '2', '--seq', '8',
      '--lora-rank', '2', '--lora-alpha', '4', '--lora-targets', 'q_proj,k_proj,v_proj,o_proj', '--dense-dtype', 'stored', '--backend', BACKEND]);
    expect(r.code, r.stderr).to.equal(0);
    expect((await readFile(join(out, 'adapter_model.safetensors'))).byteLength).to.be.above(0);
    const full = await runMain(['train', '--model', bf16, '--data', data, '--out', join(await tempDir('cli-dense-train-'), 'out'),
      '--steps', '1', '--dense-dtype', 'stored', '--backend', BACKEND]);
    expect(full.code).to.equal(1);
    expect(full.stderr).to.match(/full fine-tuning trains the attention and embedding weights, which needs them in float32: denseDtype 'stored' keeps them 16-bit and frozen/);
  });
});
