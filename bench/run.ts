/**
 * The benchmark entry: `npx tsx bench/run.ts [--config S] [--backend wasm] [--lora ...] [--json]`.
 * Same options and output as `tfjs-moe-lora bench`. A plain ESM entry (no test runner) so that
 * ../shared/gpu/prepare.sh can bundle it with esbuild for the GPU machine. It does not import the
 * CLI's main module: bundled, every module shares the bundle's URL and main would see itself as
 * the entry point and run a second time.
 */
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import * as bench from '../src/cli/commands/bench.js';
import { isUserError } from '../src/cli/errors.js';

let usage: string | undefined;
try {
  await yargs(hideBin(process.argv))
      .scriptName('bench/run.ts')
      .command({ ...bench, command: '$0' })
      .strict()
      .help()
      .version(false)
      .exitProcess(false)
      .fail((msg, err) => {
        if (msg == null && err != null) throw err;
        usage = msg ?? 'bad arguments';
        throw new Error(usage);
      })
      .parseAsync();
} catch (err) {
  if (usage !== undefined) {
    process.stderr.write(`bench: ${usage.replace(/\s*\n\s*/g, ' ')} (see --help)\n`);
    process.exitCode = 2;
  } else {
    process.stderr.write(`bench: ${isUserError(err) ? `error: ${(err as Error).message}` : (err as Error)?.stack ?? String(err)}\n`);
    process.exitCode = 1;
  }
}
