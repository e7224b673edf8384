/**
 * mergeAdapterIntoCheckpoint: the fixtures' PEFT adapters folded into their base models and
 * written as HF checkpoints. The merged checkpoint's logits equal the model with the adapter
 * (ours, <= 1e-4 relative) and PEFT's own (`lora.logits`, made by PEFT); written as bfloat16,
 * <= 1e-2. (transformers loading these folders and giving the same logits was checked once on the
 * GPU machine: tools/merge_check/, docs/models.md.)
 */
import * as tf from '@tensorflow/tfjs-core';
import { expect } from 'chai';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { CheckpointError } from '../../src/io/hf_checkpoint_core.js';
import { mergeAdapterIntoCheckpoint } from '../../src/io/merge.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { bfloat16Bits } from '../../src/ops/packed.js';
import { maxRelativeError } from '../../src/util/numeric.js';
import { writeHalfFixture } from '../helpers/half_checkpoint.js';
import { moeLayerIndices } from '../../src/models/families.js';
import { cleanup, fixtureConfig, fixtureDir, golden, tempDir, WHOLE_ARCHS } from './checkpoint_helpers.js';

async function logitsOf(dir: string, ids: tf.Tensor, adapter?: string): Promise<Float32Array> {
  const model = await loadHFCheckpoint(dir);
  if (adapter !== undefined) await loadPeftAdapter(model, adapter);
  const y = model.predict(ids) as tf.Tensor;
  const values = await y.data() as Float32Array;
  y.dispose();
  model.dispose();
  return values;
}

describe('io/merge: mergeAdapterIntoCheckpoint', () => {
  after(cleanup);

  for (const arch of WHOLE_ARCHS) {
    it(`${arch}: the merged checkpoint gives the logits of model + adapter (f32 <= 1e-4; bf16 <= 1e-2)`, async () => {
      const g = await golden(arch);
      const [ids, peft] = [await g.tensor('input_ids'), await g.tensor('lora.logits')];
      const adapter = join(fixtureDir(arch), 'adapter');
      const withAdapter = await logitsOf(fixtureDir(arch), ids, adapter);

      const before = tf.memory().numTensors;
      const f32 = await tempDir(`merge-f32-${arch}-`);
      const result = await mergeAdapterIntoCheckpoint(fixtureDir(arch), adapter, f32);
      expect(tf.memory().numTensors, 'no tensor left behind').to.equal(before);
      expect(result.format).to.equal('hf');
      // one adapted block per MoE layer (deepseek_v3 and glm4_moe start with a dense layer)
      expect(result.adapter.layers.length).to.equal(moeLayerIndices(await fixtureConfig(arch)).length);
      expect(result.saved.dtype).to.equal('float32');
      expect((await readdir(f32)).sort()).to.deep.equal(['config.json', 'generation_config.json', 'model.safetensors']);
      expect((await readFile(join(f32, 'generation_config.json'))).equals(await readFile(join(fixtureDir(arch), 'generation_config.json')))).to.equal(true);
      const merged = await logitsOf(f32, ids);
      const vsOurs = maxRelativeError(merged, withAdapter);
      const vsPeft = maxRelativeError(merged, peft.dataSync());
      expect(vsOurs, `merged vs model + adapter ${vsOurs.toExponential(2)}`).to.be.at.most(1e-4);
      expect(vsPeft, `merged vs PEFT's lora.logits ${vsPeft.toExponential(2)}`).to.be.at.most(1e-4);
      // the adapter changes the logits: the comparison above is not base vs base
      expect(maxRelativeError(await logitsOf(fixtureDir(arch), ids), withAdapter)).to.be.above(1e-3);

      const bf16 = await tempDir(`merge-bf16-${arch}-`);
      await mergeAdapterIntoCheckpoint(fixtureDir(arch), adapter, bf16, { dtype: 'bfloat16', maxShardSize: '200KB' });
      const index = JSON.parse(await readFile(join(bf16, 'model.safetensors.index.json'), 'utf8'));
      const shards = [...new Set(Object.values(index.weight_map as Record<string, string>))];
      expect(shards.length).to.be.above(1);
      const merged32 = await readSafetensorsFile(join(f32, 'model.safetensors'));
      for (const shard of shards) {
        const file = await readSafetensorsFile(join(bf16, shard));
        expect(new Set(file.names().map(n => file.info(n).dtype)), shard).to.deep.equal(new Set(['BF16']));
        // merged in float32 and rounded once: each half is the f32 merge's value rounded to nearest even
        for (const n of file.names()) {
          const wide = await merged32.tensor(n);
          expect(Array.from(await file.halfBits(n)), n).to.deep.equal(Array.from(wide.dataSync(), bfloat16Bits));
          wide.dispose();
        }
      }
      expect(JSON.parse(await readFile(join(bf16, 'config.json'), 'utf8'))['dtype']).to.equal('bfloat16');
      const rounded = maxRelativeError(await logitsOf(bf16, ids), withAdapter);
      // how far bf16 rounding of every weight moves the logits, measured: gpt_oss (sinks, biases) 1.5e-2, the others below 1e-2
      expect(rounded, `bf16 merged vs model + adapter ${rounded.toExponential(2)}`).to.be.at.most(arch === 'gpt_oss' ? 2e-2 : 1e-2);
      tf.dispose([ids, peft]);
    });
  }

  it('a bf16 model merged into another dtype is merged in float32, rounded once: float32 output equals the merge of the same values stored as F32', async () => {
    const [dir16, dir32] = [await tempDir('merge-bf16-'), await tempDir('merge-bf16-as-f32-')];
    await writeHalfFixture(fixtureDir('qwen3_moe'), 'bf16', dir16, dir32);
    const adapter = join(fixtureDir('qwen3_moe'), 'adapter');
    const [from16, from32, kept] = [await tempDir('merged-16-'), await tempDir('merged-32-'), await tempDir('merged-kept-')];
    await mergeAdapterIntoCheckpoint(dir16, adapter, from16, { dtype: 'float32' });
    await mergeAdapterIntoCheckpoint(dir32, adapter, from32, { dtype: 'float32' });
    const [a, b] = [await readFile(join(from16, 'model.safetensors')), await readFile(join(from32, 'model.safetensors'))];
    expect(a.equals(b), 'the same merged float32 bytes').to.equal(true);
    // written back in its own dtype (the default), the merge stays bf16 on disk
    await mergeAdapterIntoCheckpoint(dir16, adapter, kept);
    const file = await readSafetensorsFile(join(kept, 'model.safetensors'));
    expect(new Set(file.names().map(n => file.info(n).dtype))).to.deep.equal(new Set(['BF16']));
  });

  it('refuses folder arguments that are not paths, and an adapter of another model, writing nothing', async () => {
    const out = await tempDir('merge-bad-');
    for (const [args, name] of [
      [['', 'a', 'b'], 'modelDir'], [['a', 5, 'b'], 'adapterDir'], [['a', 'b', null], 'outDir'],
    ] as Array<[unknown[], string]>) {
      let error: unknown;
      try {
        await mergeAdapterIntoCheckpoint(...(args as [string, string, string]));
      } catch (e) {
        error = e;
      }
      expect(error).to.be.instanceOf(CheckpointError);
      expect((error as Error).message).to.match(new RegExp(`^\`mergeAdapterIntoCheckpoint\\(\\)\`: '${name}' must be a folder path but got `));
    }
    const before = tf.memory().numTensors;
    let error: unknown;
    try {
      await mergeAdapterIntoCheckpoint(fixtureDir('olmoe'), join(fixtureDir('mixtral'), 'adapter'), out);
    } catch (e) {
      error = e;
    }
    expect((error as Error).message).to.match(/loadPeftAdapter/);
    expect(tf.memory().numTensors).to.equal(before);
    expect(await readdir(out)).to.deep.equal([]);
  });
});
