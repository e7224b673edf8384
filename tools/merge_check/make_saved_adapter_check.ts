/**
 * Prepares the check that PEFT loads adapters saved by this package (auto_mapping, peft_version
 * written as PEFT does) and that transformers loads a merged mixtral (its config.json once came out
 * with ints for floats). For each whole-model fixture, into OUT/<arch>/: base/ (the fixture),
 * our_adapter/ (the fixture adapter, B scaled by 1.5, saved by savePeftAdapter), ours.safetensors
 * (input_ids and our logits with that adapter), merged/ (mergeAdapterIntoCheckpoint). Then, on a
 * machine with PyTorch, transformers and PEFT: python check_saved_adapter.py OUT
 *
 *   npx tsx tools/merge_check/make_saved_adapter_check.ts OUT
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-cpu';
import { cp } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { mergeAdapterIntoCheckpoint } from '../../src/io/merge.js';
import { loadPeftAdapter, savePeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile, writeSafetensorsFile } from '../../src/io/safetensors.js';
import { sparseMoELayers } from '../../src/layers/moe_causal_lm.js';

await tf.setBackend('cpu');
const out = process.argv[2];
if (out === undefined) throw new Error('usage: make_saved_adapter_check.ts OUT');
for (const arch of ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe']) {
  const fixture = `spec/fixtures/hf/${arch}`;
  const dir = join(out, arch);
  await cp(fixture, join(dir, 'base'), { recursive: true, filter: s => !s.includes('adapter') && !s.includes('golden') });
  const model = await loadHFCheckpoint(fixture);
  await loadPeftAdapter(model, join(fixture, 'adapter'));
  // change the adapter so the check cannot pass on the fixture's own numbers
  for (const layer of sparseMoELayers(model)) {
    for (const f of Object.values(layer.adapter('default').factors)) {
      if (f) tf.tidy(() => { f.B.write(tf.mul(f.B.read(), 1.5)); });
    }
  }
  await savePeftAdapter(model, join(dir, 'our_adapter'));
  const ids = await (await readSafetensorsFile(join(fixture, 'golden.safetensors'))).tensor('input_ids');
  const logits = model.predict(ids) as tf.Tensor;
  await writeSafetensorsFile(join(dir, 'ours.safetensors'), { input_ids: ids, logits });
  tf.dispose([ids, logits]);
  model.dispose();
  await mergeAdapterIntoCheckpoint(join(dir, 'base'), join(dir, 'our_adapter'), join(dir, 'merged'), {});
  console.log(arch, 'ok');
}
