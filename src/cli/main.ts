/**
 * The `tfjs-moe-lora` command line. Exit codes: 0 success, 1 a failed run (parity off, a bad
 * fixture or checkpoint), 2 bad arguments.
 */
import { realpathSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import * as bench from './commands/bench.js';
import * as convert from './commands/convert.js';
import * as inspect from './commands/inspect.js';
import * as parity from './commands/parity.js';
import * as train from './commands/train.js';
import { ExitCode, UsageError, isUserError } from './errors.js';

const NAME = 'tfjs-moe-lora';

/** Runs the CLI on `args` (without node and the script) and returns the exit code. */
export async function main(args: string[]): Promise<number> {
  const parser = yargs(args)
      .scriptName(NAME)
      .command(parity)
      .command(train)
      .command(bench)
      .command(convert)
      .command(inspect)
      .demandCommand(1, 'name a command')
      .strict()
      .help()
      .alias('h', 'help')
      .version(false)
      .exitProcess(false)
      .wrap(Math.min(110, process.stdout.columns ?? 110))
      .fail((msg, err) => {
        // a handler's error comes through here too, with no message: pass it on untouched
        if (msg == null && err != null) throw err;
        throw new UsageError(msg ?? 'bad arguments');
      });
  try {
    await parser.parseAsync();
    return 0;
  } catch (err) {
    if (err instanceof ExitCode) return err.code;
    if (err instanceof UsageError) {
      process.stderr.write(`${NAME}: ${err.message.replace(/\s*\n\s*/g, ' ')} (see ${NAME} --help)\n`);
      return 2;
    }
    if (isUserError(err)) {
      process.stderr.write(`${NAME}: error: ${err.message}\n`);
      return 1;
    }
    process.stderr.write(`${NAME}: internal error: ${(err as Error)?.stack ?? String(err)}\n`);
    return 1;
  }
}

function isEntryPoint(): boolean {
  if (process.argv[1] === undefined) return false;
  try {
    return realpathSync(process.argv[1]) === realpathSync(fileURLToPath(import.meta.url));
  } catch {
    return false;
  }
}

// No top-level await: it would make this module async, and code that requires it (tests under
// a TS loader) would then load a second copy of every module it imports.
if (isEntryPoint()) void main(hideBin(process.argv)).then(code => { process.exitCode = code; });
