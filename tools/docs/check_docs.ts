/**
 * Checks the generated and listed parts of docs/ against the code:
 * - docs/api.md names every export of src/index.ts (as `name`);
 * - docs/args.md is what tools/docs/args_doc.ts generates now (the messages are the code's).
 * Prints what is missing or stale and exits 1, or prints 'docs ok'.
 *
 *   npx tsx tools/docs/check_docs.ts
 */
import { readFile } from 'node:fs/promises';
import { listExports } from './api_exports.js';
import { renderArgsDoc } from './args_doc.js';

const problems: string[] = [];
const api = await readFile('docs/api.md', 'utf8');
const missing = listExports().map(e => e.name).filter(name => !api.includes(`\`${name}\``));
if (missing.length > 0) problems.push(`docs/api.md does not name these exports of src/index.ts: ${missing.join(', ')}`);
const args = await readFile('docs/args.md', 'utf8');
if (args !== await renderArgsDoc()) {
  problems.push('docs/args.md is stale: run `npx tsx tools/docs/args_doc.ts > docs/args.md`');
}
if (problems.length > 0) {
  process.stderr.write(`${problems.join('\n')}\n`);
  process.exitCode = 1;
} else {
  process.stdout.write('docs ok\n');
}
