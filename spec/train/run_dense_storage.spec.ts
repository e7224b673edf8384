/**
 * runTraining's storage of a 16-bit checkpoint's attention, embedding and head (denseDtype): LoRA
 * keeps them packed by default, as PEFT on a bf16 base holds them, at 2 bytes an element less and
 * the same losses bit for bit (cpu: each product decodes its weight exactly); full fine-tuning
 * widens them by default, since it trains them.
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { validatePluginArgs } from '../../src/args/validate.js';
import { CharTokenizer, writeTokenizer } from '../../src/data/index.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import type { DenseDtype } from '../../src/io/hf_checkpoint_core.js';
import { runTraining, type TrainRunResult } from '../../src/train/run.js';
import { cleanup, fixtureDir, tempDir } from '../io/checkpoint_helpers.js';
import { writeHalfFixture } from '../helpers/half_checkpoint.js';

describe('train/run: the dense weights\' storage by mode (denseDtype)', function () {
  this.timeout(60_000);
  let bf16: string;
  let data: string;
  let denseElements = 0;

  before(async () => {
    bf16 = await tempDir('run-dense-bf16-');
    const rounded = await tempDir('run-dense-rounded-');
    await writeHalfFixture(fixtureDir('olmoe'), 'bf16', bf16, rounded);
    await writeTokenizer(bf16, CharTokenizer.fromText('abcdefghij'));
    data = join(await tempDir('run-dense-data-'), 'text.txt');
    await writeFile(data, 'abcdefghij'.repeat(20));
    const file = await readSafetensorsFile(join(rounded, 'model.safetensors'));
    for (const name of file.names()) {
      if (/(q_proj|k_proj|v_proj|o_proj)\.weight$|embed_tokens\.weight$|lm_head\.weight$/.test(name)) {
        denseElements += (await file.tensor(name)).size;
      }
    }
  });
  after(cleanup);

  /** One run; the bytes of every tensor once the model is ready (onStart), and the result. */
  async function train(lora: boolean, denseDtype?: DenseDtype): Promise<{ bytes: number; result: TrainRunResult }> {
    let bytes = 0;
    const plugin = validatePluginArgs(lora ? { lora: { r: 2, alpha: 4, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'experts.gate_up'] } } : {});
    const result = await runTraining({
      model: bf16, data, steps: 2, lr: 1e-2, batch: 2, seq: 8, seed: 3, out: join(await tempDir('run-dense-out-'), 'out'), plugin,
      progress: { quiet: true }, ...(denseDtype !== undefined ? { denseDtype } : {}),
      onStart: () => { bytes = tf.memory().numBytes; },
    });
    return { bytes, result };
  }

  it('LoRA holds them packed unless told float32: 2 bytes an element less, the same losses bit for bit', async () => {
    expect(denseElements).to.be.above(0);
    const byDefault = await train(true);
    const wide = await train(true, 'float32');
    const stored = await train(true, 'stored');
    expect(wide.bytes - byDefault.bytes).to.equal(2 * denseElements);
    expect(stored.bytes).to.equal(byDefault.bytes);
    expect(byDefault.result.losses).to.have.length(2);
    expect(byDefault.result.losses).to.deep.equal(wide.result.losses);
    expect(byDefault.result.trainableParams).to.equal(wide.result.trainableParams);
    expect(byDefault.result.params).to.equal(wide.result.params);
  });

  it('full fine-tuning widens them by default and trains', async () => {
    const full = await train(false);
    const wide = await train(false, 'float32');
    expect(full.bytes).to.equal(wide.bytes);
    expect(full.result.losses).to.deep.equal(wide.result.losses);
    expect(full.result.trainableParams).to.equal(full.result.params);
  });
});
