/**
 * The writer process of spec/io/atomic_save.spec.ts: saves one artifact with the package's own
 * save function, under the kill switch of kill_at_fs_call.ts (armed just before the save).
 *
 *   node --import tsx --import ./spec/helpers/kill_at_fs_call.ts spec/helpers/atomic_writer.ts KIND DIR VARIANT
 *
 * KIND: peft | hf | tfjs | tokenizer (see ARTIFACT_KINDS); VARIANT: old | new (different weights, alpha and tokenizer,
 * so the two artifacts differ in every file). Prints 'saving' before the save and 'saved CALLS'
 * after it, CALLS being the counted file-system calls of the save.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-backend-cpu';
import { CharTokenizer } from '../../src/data/tokenizer.js';
import { tokenizerFileText, writeTokenizer } from '../../src/data/tokenizer_file.js';
import { fileIO } from '../../src/io/file_io_handler.js';
import { saveHFCheckpoint } from '../../src/io/hf_save.js';
import { savePeftAdapter } from '../../src/io/peft_files.js';
import { addMoEAdapter, buildMoECausalLM, sparseMoELayers } from '../../src/layers/moe_causal_lm.js';
import { seedAdapterInit, seedModelInit } from '../../src/train/seeded_init.js';

/** The tiny model every kind saves (vocab 32 holds both tokenizers). */
export const WRITER_CONFIG = {
  model_type: 'qwen3_moe', vocab_size: 32, hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2,
  num_key_value_heads: 1, head_dim: 4, num_experts: 2, num_experts_per_tok: 1, moe_intermediate_size: 4,
  norm_topk_prob: true, rms_norm_eps: 1e-6,
};

/** The adapter of each variant: alpha differs, as in the old bug (new weights loaded with the old alpha). */
export const WRITER_ALPHA = { old: 4, new: 8 } as const;

export const writerTokenizer = (variant: 'old' | 'new') =>
  CharTokenizer.fromText(variant === 'new' ? 'the new tokenizer: xyzq!\n' : 'old one.\n');

export type ArtifactKind = 'peft' | 'hf' | 'tfjs' | 'tokenizer';
export const ARTIFACT_KINDS: readonly ArtifactKind[] = ['peft', 'hf', 'tfjs', 'tokenizer'];

/**
 * The save of one artifact kind and variant, with the package's own save function, ready to run
 * into any folder (the model is built once); `dispose()` frees the model. Uses the current backend.
 */
export async function prepareSave(kind: ArtifactKind, variant: 'old' | 'new'):
    Promise<{ save: (dir: string) => Promise<void>; dispose: () => void }> {
  const v = variant === 'new' ? 1 : 0;
  if (kind === 'tokenizer') {
    return { save: dir => writeTokenizer(dir, writerTokenizer(variant)), dispose: () => {} };
  }
  const model = buildMoECausalLM(WRITER_CONFIG);
  const dispose = () => model.dispose();
  if (kind === 'peft') {
    await seedModelInit(model, 1, 0.02);
    addMoEAdapter(model, { name: 'default', r: 2, alpha: WRITER_ALPHA[variant], targets: ['experts.gate_up', 'experts.down'] });
    seedAdapterInit(model, 'default', 1 + v);
    for (const layer of sparseMoELayers(model)) {
      for (const factors of Object.values(layer.adapter('default').factors)) {
        const value = tf.fill(factors!.B.shape as number[], 0.01 * (1 + v));
        factors!.B.write(value);
        value.dispose();
      }
    }
    return { save: dir => savePeftAdapter(model, dir), dispose };
  }
  await seedModelInit(model, 1 + v, 0.02);
  if (kind === 'hf') {
    const extraFiles = { 'tokenizer.json': tokenizerFileText(writerTokenizer(variant)) };
    return { save: async dir => { await saveHFCheckpoint(model, dir, { extraFiles }); }, dispose };
  }
  return { save: async dir => { await model.save(fileIO(dir)); }, dispose };
}

/** The base model the 'peft' adapters belong to (what loadPeftAdapter loads them into). */
export async function peftBaseModel(): Promise<ReturnType<typeof buildMoECausalLM>> {
  const model = buildMoECausalLM(WRITER_CONFIG);
  await seedModelInit(model, 1, 0.02);
  return model;
}

async function main(): Promise<void> {
  const [kind, dir, variant] = process.argv.slice(2) as [ArtifactKind, string, 'old' | 'new'];
  await tf.setBackend('cpu');
  const { save } = await prepareSave(kind, variant);
  const crashSwitch = (globalThis as Record<symbol, { armed: boolean; calls: number } | undefined>)[
    Symbol.for('tfjs-moe-lora.spec.crashSwitch')];
  if (crashSwitch === undefined) throw new Error('start this script with --import ./spec/helpers/kill_at_fs_call.ts');
  process.stdout.write('saving\n');
  crashSwitch.armed = true;
  await save(dir);
  crashSwitch.armed = false;
  process.stdout.write(`saved ${crashSwitch.calls}\n`);
}

// no top-level await: the spec imports this file too, and a module with one would be loaded as a
// second copy of the package (its layer classes registered twice)
if (process.argv[1]?.endsWith('atomic_writer.ts')) {
  main().catch((e: unknown) => {
    process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  });
}
