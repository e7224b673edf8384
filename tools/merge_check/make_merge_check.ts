/**
 * Prepares the one-off check that transformers reads what `merge` and saveHFCheckpoint write
 * (run check_merged.py on a machine with PyTorch, transformers and PEFT). For each whole-model
 * fixture, into OUT/<arch>/:
 * - merged_f32/: the fixture + its PEFT adapter merged (mergeAdapterIntoCheckpoint), float32,
 *   sharded at 100KB; merged_bf16/: the same written as bfloat16 (one file);
 * - base_sharded/: the fixture saved at 100KB shards (its index is compared with save_pretrained's);
 * - base_bf16/, base_f16/: the fixture saved as bfloat16 / float16 (compared with torch's `.to()`);
 * - ours.safetensors: input_ids and our logits of model + adapter (unmerged) on them.
 *
 *   npx tsx tools/merge_check/make_merge_check.ts OUT
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-cpu';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { saveHFCheckpoint } from '../../src/io/hf_save.js';
import { mergeAdapterIntoCheckpoint } from '../../src/io/merge.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile, writeSafetensorsFile } from '../../src/io/safetensors.js';

const ARCHS = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe'];
const out = process.argv[2];
if (out === undefined) throw new Error('usage: make_merge_check.ts OUT');
await tf.setBackend('cpu');
for (const arch of ARCHS) {
  const fixture = `spec/fixtures/hf/${arch}`;
  const adapter = join(fixture, 'adapter');
  const dir = join(out, arch);
  await mergeAdapterIntoCheckpoint(fixture, adapter, join(dir, 'merged_f32'), { maxShardSize: '100KB' });
  await mergeAdapterIntoCheckpoint(fixture, adapter, join(dir, 'merged_bf16'), { dtype: 'bfloat16' });
  const base = await loadHFCheckpoint(fixture);
  await saveHFCheckpoint(base, join(dir, 'base_sharded'), { maxShardSize: '100KB' });
  await saveHFCheckpoint(base, join(dir, 'base_bf16'), { dtype: 'bfloat16' });
  await saveHFCheckpoint(base, join(dir, 'base_f16'), { dtype: 'float16' });
  await loadPeftAdapter(base, adapter);
  const ids = await (await readSafetensorsFile(join(fixture, 'golden.safetensors'))).tensor('input_ids');
  const logits = base.predict(ids) as tf.Tensor;
  await writeSafetensorsFile(join(dir, 'ours.safetensors'), { input_ids: ids, logits });
  tf.dispose([ids, logits]);
  base.dispose();
  console.log(`${arch}: written`);
}
