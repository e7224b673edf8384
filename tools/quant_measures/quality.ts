/**
 * Issue 14's training-quality check: LoRA on the example's model with float32 experts and with
 * quantized ones (same seed, steps, windows and adapter init), held-out loss of each, one table.
 *
 *   npx tsx tools/quant_measures/quality.ts [--backend wasm|cpu] [--steps 200] [--seed 1] [--batch 8] [--seq 64]
 *       [--val examples/data/target_val.txt] [--dtypes float32,int4,nf4] [--json]
 *
 * The target (issue 14): every 4-bit format's held-out loss within 5 % of float32's.
 */
import * as tf from '@tensorflow/tfjs-core';
import '@tensorflow/tfjs-layers';
import { parseArgs } from 'node:util';
import { benchLoRAQuality, formatQualityTable } from '../../src/bench/quality_bench.js';
import { MoELoraError } from '../../src/errors.js';
import type { ExpertDtype } from '../../src/io/hf_block.js';

const { values } = parseArgs({
  options: {
    backend: { type: 'string', default: 'wasm' },
    steps: { type: 'string', default: '200' },
    seed: { type: 'string', default: '1' },
    batch: { type: 'string', default: '8' },
    seq: { type: 'string', default: '64' },
    val: { type: 'string' },
    dtypes: { type: 'string', default: 'float32,int4,nf4' },
    json: { type: 'boolean', default: false },
  },
});
if (values.backend !== 'wasm' && values.backend !== 'cpu') throw new Error(`--backend must be wasm or cpu but got '${values.backend}'`);
await import(values.backend === 'wasm' ? '@tensorflow/tfjs-backend-wasm' : '@tensorflow/tfjs-backend-cpu');
await tf.setBackend(values.backend);
await tf.ready();
let result: Awaited<ReturnType<typeof benchLoRAQuality>>;
try {
  result = await benchLoRAQuality({
    steps: Number(values.steps), seed: Number(values.seed), batch: Number(values.batch), seq: Number(values.seq),
    ...(values.val !== undefined ? { val: values.val } : {}), expertDtypes: values.dtypes.split(',') as ExpertDtype[],
    onRow: row => process.stderr.write(`${row.expertDtype}: LoRA loss ${row.adaptedLoss.toFixed(4)} (${row.seconds.toFixed(1)} s)\n`),
  });
} catch (e) {
  // bad flags (an unknown dtype, steps 0): one line, no stack trace
  if (!(e instanceof MoELoraError)) throw e;
  console.error(e.message);
  process.exit(1);
}
process.stdout.write(values.json ? `${JSON.stringify(result, null, 2)}\n` : formatQualityTable(result));
