/** `tfjs-moe-lora parity --fixture DIR`: one MoE block against its Hugging Face golden tensors. */
import { existsSync, statSync } from 'node:fs';
import type { ArgumentsCamelCase, Argv } from 'yargs';
import { BACKENDS } from '../backend.js';
import { ExitCode } from '../errors.js';
import {
  DEFAULT_PARITY_TOLERANCE, runBlockParity, type BlockParityResult,
} from '../../models/parity.js';

interface ParityArgs {
  fixture: string;
  backend: string;
  expertKernel: 'fused' | 'reference';
  json: boolean;
}

export const command = 'parity';
export const describe = 'Compare one MoE block (forward, dx, parameter gradients, routing) with a ' +
    'Hugging Face fixture';

export function builder(yargs: Argv): Argv<ParityArgs> {
  return yargs
      .option('fixture', {
        type: 'string', demandOption: true, requiresArg: true,
        describe: 'fixture directory: config.json, model.safetensors, golden.json, golden.safetensors',
      })
      .option('backend', {
        type: 'string', choices: BACKENDS, default: 'cpu', requiresArg: true, describe: 'tfjs backend',
      })
      .option('expert-kernel', {
        type: 'string', choices: ['fused', 'reference'] as const, default: 'fused' as const,
        requiresArg: true, describe: 'the block implementation under test',
      })
      .option('json', { type: 'boolean', default: false, describe: 'print one JSON object' })
      .check(argv => {
        const dir = argv.fixture;
        // a failed check is an argument error (exit code 2), like a bad --backend
        return existsSync(dir) && statSync(dir).isDirectory() ? true : `--fixture: '${dir}' is not a directory`;
      })
      .example('$0 parity --fixture spec/fixtures/hf/mixtral --backend wasm', '')
      .example('$0 parity --fixture spec/fixtures/hf/gpt_oss --json', '') as unknown as Argv<ParityArgs>;
}

export async function handler(argv: ArgumentsCamelCase<ParityArgs>): Promise<void> {
  const result = await runBlockParity(argv.fixture, {
    backend: argv.backend, expertKernel: argv.expertKernel, tolerance: DEFAULT_PARITY_TOLERANCE,
  });
  process.stdout.write(argv.json ? `${JSON.stringify(result)}\n` : formatParity(result));
  if (!result.pass) throw new ExitCode(1);
}

/** The human-readable report: one row per comparison, then routing and the verdict. */
export function formatParity(r: BlockParityResult): string {
  const routingLabel = `routing vs ${r.routingReference}`;
  const width = Math.max(...[...r.comparisons.map(c => c.name), routingLabel].map(n => n.length + 2));
  const lines = [
    `parity ${r.fixture}: ${r.family} ${r.block} (layer ${r.layer}), ${r.tokens} tokens, ` +
        `backend ${r.backend}, expert kernel ${r.expertKernel}`,
    `  ${'comparison'.padEnd(width)}max rel error`,
    ...r.comparisons.map(c =>
      `  ${c.name.padEnd(width)}${c.maxRelError.toExponential(2).padEnd(12)}${c.pass ? 'ok' : 'FAIL'}`),
    `  ${routingLabel.padEnd(width)}` +
        (r.routingIdentical ? 'identical' : `DIFFERS on ${r.routingMismatches.length} of ${r.tokens} tokens`),
    ...r.routingMismatches.slice(0, 5).map(m =>
      `    token ${m.token}: expected experts [${m.expected}] but chose [${m.actual}]`),
    r.pass ? `PASS (every error <= ${r.tolerance}, routing identical)` :
      `FAIL (${r.comparisons.filter(c => !c.pass).length} error(s) > ${r.tolerance}` +
          `${r.routingIdentical ? '' : ', routing differs'})`,
  ];
  return `${lines.join('\n')}\n`;
}
