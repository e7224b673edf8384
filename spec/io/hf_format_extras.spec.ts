/**
 * What the whole-model fixtures do not exercise, against transformers' own logits (made on the GPU
 * machine by tools/fixtures/make_gpt_oss_extras.py and make_fp8_fixture.py): gpt-oss with a sliding
 * window shorter than the input and a truncated YaRN ramp; DeepSeek-V3 with block-scaled FP8
 * weights as the Hub stores them (transformers' logits of the dequantized weights: transformers 5.17
 * itself could not load the FP8 folder with FineGrainedFP8Config(dequantize=True)).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { cp, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { cleanup, fixtureDir, tempDir } from './checkpoint_helpers.js';

/** The logits of the checkpoint in `dir` on `ids`, checked against `expected` (≤ 1e-4 relative). */
async function expectLogits(dir: string, ids: tf.Tensor, expected: tf.Tensor): Promise<void> {
  const model = await loadHFCheckpoint(dir);
  try {
    const logits = model.predict(ids) as tf.Tensor;
    expect(maxRelativeError(await logits.data(), await expected.data())).to.be.below(1e-4);
    logits.dispose();
  } finally {
    model.dispose();
  }
}

describe('io/hf_format_extras (transformers on a gpt-oss variant and an FP8 checkpoint)', function () {
  this.timeout(60_000);
  after(cleanup);

  it('gpt_oss: a window of 4 over 11 tokens and YaRN with truncate', async () => {
    const extras = await readSafetensorsFile(join(fixtureDir('gpt_oss'), 'golden_extras.safetensors'));
    const dir = await tempDir('gpt-oss-window-');
    await cp(fixtureDir('gpt_oss'), dir, { recursive: true });
    const config = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')) as Record<string, any>;
    config['sliding_window'] = 4;
    config['rope_parameters'] = { ...config['rope_parameters'], truncate: true };
    await writeFile(join(dir, 'config.json'), JSON.stringify(config));
    const [ids, expected] = await Promise.all([extras.tensor('input_ids'), extras.tensor('window4_truncate.logits')]);
    await expectLogits(dir, ids, expected);
    tf.dispose([ids, expected]);
  });

  it('deepseek_v3: FP8 e4m3 weights with 16 x 16 weight_scale_inv blocks', async () => {
    const golden = await readSafetensorsFile(join(fixtureDir('deepseek_v3_fp8'), 'golden.safetensors'));
    const [ids, expected] = await Promise.all([golden.tensor('input_ids'), golden.tensor('logits')]);
    await expectLogits(fixtureDir('deepseek_v3_fp8'), ids, expected);
    tf.dispose([ids, expected]);
  });
});
