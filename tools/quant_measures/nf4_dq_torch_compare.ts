/**
 * Compares tools/fixtures/nf4_dq_torch.py's output (torch's dynamic map and float32 mean) with
 * 'nf4-dq''s BNB_DYNAMIC_MAP and its offset (the float64 sum over the count, rounded once):
 * prints the entries that differ and the mean's difference in float32 steps.
 *
 *   npx tsx tools/quant_measures/nf4_dq_torch_compare.ts nf4_dq_torch.json
 */
import { readFile } from 'node:fs/promises';
import { BNB_DYNAMIC_MAP } from '../../src/ops/quantized.js';

const fromBits = (b: number) => new Float32Array(Uint32Array.of(b).buffer)[0];
const path = process.argv[2] ?? 'nf4_dq_torch.json';
const got = JSON.parse(await readFile(path, 'utf8')) as Record<string, unknown>;
console.log(`torch ${String(got['torch'])}`);
for (const key of ['map_cpu', 'map_cuda', 'map_bnb']) {
  const b = got[key] as number[] | null;
  if (b === null) { console.log(`${key}: not given`); continue; }
  const diffs = b.map((v, k) => [k, fromBits(v), BNB_DYNAMIC_MAP[k]] as const).filter(([, t, o]) => !Object.is(t, o));
  console.log(`${key}: ${diffs.length} of 256 entries differ from BNB_DYNAMIC_MAP` +
      diffs.slice(0, 8).map(([k, t, o]) => `\n  ${k}: torch ${t}, ours ${o}`).join(''));
}
let sum = 0;
for (let k = 0; k < 24576; k++) sum += Math.fround(0.01 + ((k * 7919) % 1000) / 1e5);
const ours = Math.fround(sum / 24576);
for (const key of ['mean_cpu', 'mean_cuda']) {
  const b = got[key] as number | null;
  if (b === null) { console.log(`${key}: not given`); continue; }
  const ulp = 2 ** (Math.floor(Math.log2(ours)) - 23);
  console.log(`${key}: torch ${fromBits(b)}, ours ${ours} (${(fromBits(b) - ours) / ulp} float32 steps)`);
}
