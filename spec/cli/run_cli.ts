/** Test helpers: the CLI run in this process (main()) or as its own process, with what it wrote. */
import { spawnSync } from 'node:child_process';
import { main } from '../../src/cli/main.js';

export interface CliRun { code: number | null; stdout: string; stderr: string }

/** Runs `main(args)` here, capturing stdout and stderr: no process start, the same exit code. */
export async function runMain(args: string[]): Promise<CliRun> {
  const out: string[] = [];
  const err: string[] = [];
  const write = { out: process.stdout.write, err: process.stderr.write };
  process.stdout.write = ((s: string) => { out.push(String(s)); return true; }) as typeof process.stdout.write;
  process.stderr.write = ((s: string) => { err.push(String(s)); return true; }) as typeof process.stderr.write;
  try {
    const code = await main(args);
    return { code, stdout: out.join(''), stderr: err.join('') };
  } finally {
    process.stdout.write = write.out;
    process.stderr.write = write.err;
  }
}

/** Runs the CLI as `node --import tsx src/cli/main.ts ...` (seconds each: use sparingly). */
export function spawnCli(args: string[]): CliRun {
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'src/cli/main.ts', ...args], { encoding: 'utf8' });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}
