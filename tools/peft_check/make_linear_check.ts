/**
 * Prepares the PEFT check of LoRA on attention / dense-MLP / shared-expert projections and of
 * per-target MoE ranks (issue 11). For each whole-model fixture, into OUT/<arch>/: base/ (the
 * fixture model), our_adapter/ (PEFT 0.21's all-linear + the expert targets, rank and alpha
 * patterns on linear modules and on MoE parameters, random B, saved by savePeftAdapter),
 * ours.safetensors (input_ids and our logits with it), our_modules.json (every module a target name
 * can select). Then, on the GPU machine (PyTorch, transformers, PEFT):
 *
 *   npx tsx tools/peft_check/make_linear_check.ts OUT
 *   python tools/peft_check/check_linear.py OUT          # PEFT loads ours; PEFT saves its own all-linear adapter
 *   npx tsx tools/peft_check/verify_linear_check.ts OUT  # ours loads PEFT's, equal logits; same all-linear set
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import '@tensorflow/tfjs-backend-cpu';
import { cp, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { savePeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile, writeSafetensorsFile } from '../../src/io/safetensors.js';
import { MLAAttention } from '../../src/layers/mla_attention.js';
import { loraModules } from '../../src/patch/linear_targets.js';
import { register, unregister } from '../../src/plugin.js';
import { SeededRandom } from '../../src/data/random.js';

await tf.setBackend('cpu');
const out = process.argv[2];
if (out === undefined) throw new Error('usage: make_linear_check.ts OUT');
// every whole-model family: PEFT's all-linear set is what ours must equal, so each family's is wanted,
// including those (deepseek_v3's MLA) whose adapters ours cannot build yet
for (const arch of ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'glm4_moe', 'gpt_oss']) {
  try {
    await prepareArch(arch);
  } catch (err) {
    console.log(arch, 'failed:', (err as Error).message);
  }
}

async function prepareArch(arch: string): Promise<void> {
  const fixture = `spec/fixtures/hf/${arch}`;
  const dir = join(out, arch);
  await cp(fixture, join(dir, 'base'), { recursive: true, filter: s => !s.includes('adapter') && !s.includes('golden') });
  const model = await loadHFCheckpoint(fixture);
  await writeFile(join(dir, 'our_modules.json'), JSON.stringify(loraModules([model]).map(m => m.name)));
  // all-linear as PEFT 0.21 resolves it (gate_up at 2r, 2α on the families PEFT converts), plus
  // ranks and alphas of MoE targets by PEFT's names; MLA models (no attention LoRA here) name the
  // expert targets instead of all-linear
  const mla = model.layers.some(l => l instanceof MLAAttention);
  register({ models: [model], lora: {
    r: 4, alpha: 8, targets: mla ? ['experts.gate_up', 'experts.down', 'router'] : ['all-linear', 'experts.gate_up', 'experts.down'],
    rankPattern: { ...(mla ? {} : { 'q_proj': 2 }), 'model.layers.1.mlp.experts.down_proj': 3 },
    alphaPattern: { ...(mla ? {} : { 'layers.1.self_attn.o_proj': 16 }), 'experts.gate_up_proj': 12 },
  } });
  // every factor random (B too), so the check cannot pass on a no-op adapter
  const rng = new SeededRandom(11);
  for (const v of model.trainableWeights) {
    const n = v.shape.reduce((p: number, q) => p * (q as number), 1);
    const data = Float32Array.from({ length: n }, () => (2 * rng.next() - 1) * 0.2);
    tf.tidy(() => { v.write(tf.tensor(data, v.shape as number[])); });
  }
  await savePeftAdapter(model, join(dir, 'our_adapter'));
  const ids = await (await readSafetensorsFile(join(fixture, 'golden.safetensors'))).tensor('input_ids');
  const logits = model.predict(ids) as tf.Tensor;
  await writeSafetensorsFile(join(dir, 'ours.safetensors'), { input_ids: ids, logits });
  tf.dispose([ids, logits]);
  unregister();
  model.dispose();
  console.log(arch, 'ok');
}
