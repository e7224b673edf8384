/**
 * What the whole-model fixtures do not exercise, against transformers' own logits (made on the GPU
 * machine by tools/fixtures/make_gpt_oss_extras.py, make_deepseek_yarn_extras.py and
 * make_fp8_fixture.py): gpt-oss with a sliding window shorter than the input and a truncated YaRN
 * ramp; gpt-oss with MXFP4 experts as the Hub stores them; DeepSeek-V3 with the Hub's YaRN rope
 * (mscale / mscale_all_dim); DeepSeek-V3 with block-scaled FP8 weights as the Hub stores them
 * (transformers' logits of the dequantized weights: transformers 5.17 itself could not load the
 * FP8 folder with FineGrainedFP8Config(dequantize=True)).
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { cp, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint, type LoadHFCheckpointOptions } from '../../src/io/hf_checkpoint.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { cleanup, fixtureDir, tempDir } from './checkpoint_helpers.js';

/**
 * The logits of the checkpoint in `dir` on `ids`, checked against `expected` (below `tolerance`,
 * relative to the largest expected logit); no tensor is left behind.
 */
async function expectLogits(
    dir: string, ids: tf.Tensor, expected: tf.Tensor, tolerance = 1e-4, options: LoadHFCheckpointOptions = {}): Promise<void> {
  const before = tf.memory().numTensors;
  const model = await loadHFCheckpoint(dir, options);
  try {
    const logits = model.predict(ids) as tf.Tensor;
    expect(maxRelativeError(await logits.data(), await expected.data())).to.be.below(tolerance);
    logits.dispose();
  } finally {
    model.dispose();
  }
  expect(tf.memory().numTensors, 'tensors left').to.equal(before);
}

describe('io/hf_format_extras (transformers on gpt-oss and DeepSeek-V3 variants, MXFP4 and FP8 checkpoints)', function () {
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

  // transformers holds the experts it dequantizes from MXFP4 in bf16 and multiplies in bf16: its
  // `mxfp4.logits` are 9.7e-3 (relative) from the same model with every parameter in float32,
  // `mxfp4_f32.logits`. The grid values themselves are exact in both, so float32 against float32
  // agrees to float32 rounding (7.9e-7 measured on cpu), whether the experts stay MXFP4 in memory
  // ('stored', the default) or are decoded to float32.
  for (const expertDtype of ['stored', 'float32'] as const) {
    it(`gpt_oss_mxfp4 (expertDtype '${expertDtype}'): transformers' logits of the dequantized model in float32`, async () => {
      const extras = await readSafetensorsFile(join(fixtureDir('gpt_oss'), 'golden_extras.safetensors'));
      const [ids, expected] = await Promise.all([extras.tensor('input_ids'), extras.tensor('mxfp4_f32.logits')]);
      await expectLogits(fixtureDir('gpt_oss_mxfp4'), ids, expected, 1e-5, { expertDtype });
      tf.dispose([ids, expected]);
    });
  }

  // the variants' rope_parameters replace the fixture's default rope as the script wrote them into
  // config.json; without them the logits are 8.9e-3 off, between the two variants 1.7e-3 (mscale)
  for (const variant of ['hub', 'unequal'] as const) {
    it(`deepseek_v3: YaRN with mscale / mscale_all_dim, variant '${variant}'`, async () => {
      const info = JSON.parse(await readFile(join(fixtureDir('deepseek_v3'), 'golden_yarn.json'), 'utf8')) as
        { variants: Record<string, Record<string, unknown>> };
      const extras = await readSafetensorsFile(join(fixtureDir('deepseek_v3'), 'golden_yarn.safetensors'));
      const dir = await tempDir('deepseek-yarn-');
      await cp(fixtureDir('deepseek_v3'), dir, { recursive: true });
      const config = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')) as Record<string, any>;
      config['rope_parameters'] = info.variants[variant];
      await writeFile(join(dir, 'config.json'), JSON.stringify(config));
      const [ids, expected] = await Promise.all([extras.tensor('input_ids'), extras.tensor(`${variant}.logits`)]);
      await expectLogits(dir, ids, expected, 1e-5);
      tf.dispose([ids, expected]);
    });
  }

  it('deepseek_v3: FP8 e4m3 weights with 16 x 16 weight_scale_inv blocks', async () => {
    const golden = await readSafetensorsFile(join(fixtureDir('deepseek_v3_fp8'), 'golden.safetensors'));
    const [ids, expected] = await Promise.all([golden.tensor('input_ids'), golden.tensor('logits')]);
    await expectLogits(fixtureDir('deepseek_v3_fp8'), ids, expected);
    tf.dispose([ids, expected]);
  });
});
