/**
 * Last step of the linear-LoRA check (see make_linear_check.ts): for each arch in OUT, our
 * 'all-linear' (r 4, alpha 8, rankPattern {q_proj: 2}, as check_linear.py asked PEFT) selects the
 * modules and parameters PEFT wrapped (peft_wrappers.json: a ParamWrapper as '<module>.<parameter>')
 * with PEFT's ranks, and loadPeftAdapter loads PEFT's own adapter (peft_adapter/) into the fixture
 * model (spec/fixtures/hf/<arch>) with PEFT's logits (peft.safetensors, <= 1e-4 relative).
 * Prints one JSON line per arch and exits 1 when any arch fails.
 *
 *   npx tsx tools/peft_check/verify_linear_check.ts OUT     # e.g. /work/main/.gpu-fx/linear
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-cpu';
import { existsSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { hfConfigOf } from '../../src/layers/moe_causal_lm.js';
import { moeTargetPatternName, planLinearLoRA } from '../../src/patch/linear_targets.js';
import { maxRelativeError } from '../../src/util/numeric.js';

await tf.setBackend('cpu');
const out = process.argv[2];
if (out === undefined) throw new Error('usage: verify_linear_check.ts OUT');
let failed = false;
for (const arch of ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'glm4_moe', 'gpt_oss']) {
  const dir = join(out, arch);
  if (!existsSync(join(dir, 'peft_wrappers.json'))) {
    console.log(arch, JSON.stringify({ skipped: 'no peft_wrappers.json (check_linear.py failed for it)' }));
    continue;
  }
  const model = await loadHFCheckpoint(`spec/fixtures/hf/${arch}`);
  const result: Record<string, unknown> = {};
  try {
    const wrappers: Record<string, { class: string; parameter: string | null }> =
      JSON.parse(await readFile(join(dir, 'peft_wrappers.json'), 'utf8'));
    const peft = Object.entries(wrappers).map(([name, w]) =>
      w.parameter === null ? name : `${name.replace(/(\.base_layer)+$/, '')}.${w.parameter}`).sort();
    const plan = planLinearLoRA([model], { r: 4, alpha: 8, targets: ['all-linear'], rankPattern: { q_proj: 2 } });
    const modelType = hfConfigOf(model)?.['model_type'];
    const ours = [
      ...plan.linear.flatMap(p => Object.entries(p.modules).map(([m, s]) => `${p.layer.name}.${m} r${s.r}`)),
      ...[...plan.moe].flatMap(([layer, p]) => p.targets.map(t => `${moeTargetPatternName(modelType, layer.name, t)} r${p.ranks[t] ?? 4}`)),
    ].sort();
    result['problems'] = plan.problems.map(p => p.message);
    result['all_linear_equal'] = JSON.stringify(ours.map(n => n.replace(/ r\d+$/, '')).sort()) === JSON.stringify(peft);
    if (result['all_linear_equal'] !== true) Object.assign(result, { all_linear_ours: ours, all_linear_peft: peft });
    result['ranks_ours'] = ours.filter(n => !n.endsWith(' r4'));
    const loaded = await loadPeftAdapter(model, join(dir, 'peft_adapter'));
    const file = await readSafetensorsFile(join(dir, 'peft.safetensors'));
    const ids = await file.tensor('input_ids');
    const expected = await file.tensor('logits');
    const logits = model.predict(ids) as tf.Tensor;
    const rel = maxRelativeError(logits.dataSync(), expected.dataSync());
    Object.assign(result, { loaded_modules: loaded.modules.length, loaded_targets: loaded.targets, ours_loads_peft_rel: rel });
    tf.dispose([ids, expected, logits]);
    if (!(rel <= 1e-4) || result['all_linear_equal'] !== true || plan.problems.length > 0) failed = true;
  } catch (err) {
    result['error'] = (err as Error).message;
    failed = true;
  }
  model.dispose();
  console.log(arch, JSON.stringify(result));
}
process.exitCode = failed ? 1 : 0;
