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
import * as generate from './commands/generate.js';
import * as inspect from './commands/inspect.js';
import * as merge from './commands/merge.js';
import * as parity from './commands/parity.js';
import * as tokenize from './commands/tokenize.js';
import * as train from './commands/train.js';
import { REPORT_BUGS } from '../errors.js';
import { releaseBackend } from './backend.js';
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
      .command(tokenize)
      .command(merge)
      .command(generate)
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
      process.stderr.write(`${NAME}: error: ${userMessage(err)}\n`);
      return 1;
    }
    reportInternalError(err);
    return 1;
  } finally {
    // Dawn (webgpu) keeps Node alive while it is held
    releaseBackend();
  }
}

/** The message of a user error; Node's file errors get their path when the message lacks it (EISDIR). */
function userMessage(err: Error): string {
  const path = (err as NodeJS.ErrnoException).path;
  return path !== undefined && !err.message.includes(path) ? `${err.message} ('${path}')` : err.message;
}

/** A bug: one line and how to report it; the stack only when asked for (never a page of minified code). */
function reportInternalError(err: unknown): void {
  const message = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  process.stderr.write(`${NAME}: internal error: ${message.split('\n')[0]}\n  (${REPORT_BUGS})\n`);
  if (process.env['TFJS_MOE_LORA_DEBUG'] && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
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

/**
 * Errors that escape every handler (a stray promise) end the process with the same one-line report
 * as any other internal error. For the bin script and the module run directly.
 */
export function installProcessErrorReport(): void {
  const fatal = (err: unknown) => {
    if (isUserError(err)) process.stderr.write(`${NAME}: error: ${userMessage(err)}\n`);
    else reportInternalError(err);
    process.exit(1);
  };
  process.on('uncaughtException', fatal);
  process.on('unhandledRejection', fatal);
}
if (isEntryPoint()) installProcessErrorReport();
