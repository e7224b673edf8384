/**
 * The parity table of docs/models.md: for every fixture in spec/fixtures/hf and each backend, the
 * max relative error over the block's output, dx and every parameter gradient against Hugging
 * Face's (what `tfjs-moe-lora parity --json` reports per run), and whether routing is identical.
 *
 *   npx tsx tools/docs/parity_table.ts [family ...]     (default: every fixture)
 */
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { runBlockParity } from '../../src/models/parity.js';

const FIXTURES = 'spec/fixtures/hf';
const ORDER = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'glm4_moe', 'gpt_oss',
  'ernie4_5_moe', 'hunyuan_v1_moe', 'minimax_m2'];
const only = process.argv.slice(2);
const BACKENDS = ['cpu', 'wasm'];

const archs = readdirSync(FIXTURES).filter(a => existsSync(join(FIXTURES, a, 'golden.json')) && (only.length === 0 || only.includes(a)))
    .sort((a, b) => (ORDER.indexOf(a) + 1 || 99) - (ORDER.indexOf(b) + 1 || 99));
const rows: string[] = ['| family | block | cpu | wasm | routing |', '|---|---|---|---|---|'];
for (const arch of archs) {
  const cells: string[] = [];
  let block = '';
  let routing = 'identical';
  for (const backend of BACKENDS) {
    const r = await runBlockParity(join(FIXTURES, arch), { backend });
    block = r.block;
    cells.push(Math.max(...r.comparisons.map(c => c.maxRelError)).toExponential(1));
    if (!r.routingIdentical) routing = `differs on ${backend}`;
  }
  rows.push(`| ${arch} | ${block} | ${cells.join(' | ')} | ${routing} |`);
}
process.stdout.write(`${rows.join('\n')}\n`);
