/**
 * The whole-model table of docs/models.md: for each whole-model family's fixture, the max relative
 * error against transformers / PEFT of the logits, of the logits with the fixture's PEFT adapter,
 * and of every LoRA gradient (the max over the adapter tensors: 12, or 6 where the first layer is dense), per backend, fused kernel.
 *
 *   npx tsx tools/docs/model_parity_table.ts [family ...]     (default: every whole-model family)
 */
import * as tf from '@tensorflow/tfjs-core';
import { join } from 'node:path';
import { selectBackend } from '../../src/cli/backend.js';
import { loadHFCheckpoint } from '../../src/io/hf_checkpoint.js';
import { peftAdapterTensors } from '../../src/io/peft.js';
import { loadPeftAdapter } from '../../src/io/peft_files.js';
import { readSafetensorsFile } from '../../src/io/safetensors.js';
import { WHOLE_MODEL_TYPES } from '../../src/layers/moe_causal_lm.js';
import { maxRelativeError } from '../../src/util/numeric.js';

const FIXTURES = 'spec/fixtures/hf';

async function errors(arch: string): Promise<[number, number, number]> {
  const dir = join(FIXTURES, arch);
  const golden = await readSafetensorsFile(join(dir, 'golden.safetensors'));
  const model = await loadHFCheckpoint(dir, { expertKernel: 'fused' });
  const [ids, logits, loraLogits, cot] = await Promise.all(['input_ids', 'logits', 'lora.logits', 'lora.g'].map(n => golden.tensor(n)));
  const base = tf.tidy(() => maxRelativeError((model.predict(ids) as tf.Tensor).dataSync(), logits.dataSync()));
  await loadPeftAdapter(model, join(dir, 'adapter'));
  const lora = peftAdapterTensors(model);
  let adapted = NaN;
  const { value, grads } = tf.variableGrads(() => {
    const out = model.apply(ids, { training: true }) as tf.Tensor;
    adapted = maxRelativeError(out.dataSync(), loraLogits.dataSync());
    return tf.sum(tf.mul(out, cot)) as tf.Scalar;
  }, lora.map(t => t.variable.read() as tf.Variable));
  let grad = 0;
  for (const t of lora) {
    const expected = await golden.tensor(`lora.grad.${t.peftName.replace(/\.weight$/, '.default.weight')}`);
    grad = Math.max(grad, maxRelativeError(grads[(t.variable.read() as tf.Variable).name].dataSync(), expected.dataSync()));
    expected.dispose();
  }
  tf.dispose([value, ...Object.values(grads), ids, logits, loraLogits, cot]);
  model.dispose();
  return [base, adapted, grad];
}

const rows = ['| family | backend | logits | logits with adapter | LoRA gradients |', '|---|---|---|---|---|'];
const only = process.argv.slice(2);
for (const arch of WHOLE_MODEL_TYPES.filter(a => only.length === 0 || only.includes(a))) {
  for (const backend of ['cpu', 'wasm']) {
    await selectBackend(backend);
    const e = await errors(arch);
    rows.push(`| ${arch} | ${backend} | ${e.map(v => v.toExponential(1)).join(' | ')} |`);
  }
}
process.stdout.write(`${rows.join('\n')}\n`);
