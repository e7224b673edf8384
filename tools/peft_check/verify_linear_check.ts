/**
 * Last step of the linear-LoRA check (see make_linear_check.ts): for each arch in OUT, our
 * 'all-linear' selects the modules PEFT chose (peft_modules.json), and loadPeftAdapter loads PEFT's
 * adapter (peft_adapter/) with PEFT's logits (<= 1e-4 relative). Prints one line per arch.
 *
 *   npx tsx tools/peft_check/verify_linear_check.ts OUT
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-cpu';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { planLinearLoRA } from '../../src/patch/linear_targets.js';
import { maxRelativeError } from '../../src/util/numeric.js';

await tf.setBackend('cpu');
const out = process.argv[2];
if (out === undefined) throw new Error('usage: verify_linear_check.ts OUT');
for (const arch of ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe']) {
  const dir = join(out, arch);
  try {
    const peftModules: string[] = JSON.parse(await readFile(join(dir, 'peft_modules.json'), 'utf8'));
    const model = await loadHFCheckpoint(join(dir, 'base'));
    const plan = planLinearLoRA([model], { r: 4, alpha: 8, targets: ['all-linear'] });
    const ours = [...plan.linear.flatMap(p => Object.keys(p.modules).map(m => `${p.layer.name}.${m}`)),
      ...[...plan.shared].flatMap(([layer, targets]) => targets.map(t => `${layer.name}:${t}`))].sort();
    const loaded = await loadPeftAdapter(model, join(dir, 'peft_adapter'));
    const file = await readSafetensorsFile(join(dir, 'peft.safetensors'));
    const ids = await file.tensor('input_ids');
    const expected = await file.tensor('logits');
    const logits = model.predict(ids) as tf.Tensor;
    console.log(arch, JSON.stringify({
      all_linear_ours: ours, all_linear_peft: peftModules,
      loaded_modules: loaded.modules.length, loaded_shared: loaded.targets, notes: loaded.notes,
      ours_loads_peft_rel: maxRelativeError(logits.dataSync(), expected.dataSync()),
    }));
    tf.dispose([ids, expected, logits]);
    model.dispose();
  } catch (err) {
    console.log(arch, 'error', (err as Error).message);
  }
}
