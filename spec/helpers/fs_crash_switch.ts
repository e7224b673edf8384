/**
 * A crash at the k-th file-system call, for the atomic-save spec (spec/io/atomic_save.spec.ts).
 * Counts the calls of the node:fs and node:fs/promises functions that change what is on disk
 * (sync, callback and promise forms; an open only when it writes) and, from call `crashAt` on
 * (0-based):
 * - 'kill': SIGKILLs the process at that call, as `kill -9` would (the writer process);
 * - 'fail': makes that call and every later one fail without touching the disk, so the disk
 *   stays exactly as a kill at that call leaves it while the process goes on (the spec process).
 * Calls that only read (stat, readdir, an open for reading) are not counted: a crash before one
 * of them leaves the same disk as a crash before the next counted call. Patched on the CommonJS
 * objects and copied to ESM named imports with syncBuiltinESMExports, so the package's
 * `import { rename } from 'node:fs/promises'` sees it.
 */
import { constants } from 'node:fs';
import { createRequire, syncBuiltinESMExports } from 'node:module';

export interface CrashSwitch {
  /** counting only while armed */
  armed: boolean;
  /** the counted calls so far */
  calls: number;
  /** the call that crashes (-1: none) */
  crashAt: number;
  onCrash: 'kill' | 'fail';
  /** true once a call failed ('fail') */
  crashed: boolean;
}

/** The functions that create, write, rename or remove. */
const CHANGING = ['open', 'writeFile', 'appendFile', 'rename', 'rm', 'rmdir', 'unlink', 'mkdir', 'mkdtemp', 'link',
  'symlink', 'cp', 'copyFile', 'truncate'];

function changesDisk(name: string, args: unknown[]): boolean {
  if (name !== 'open') return true;
  const flags = args[1];
  if (flags === undefined || flags === null || flags === 'r' || flags === 'rs' || flags === 'sr') return false;
  if (typeof flags === 'number') return (flags & (constants.O_WRONLY | constants.O_RDWR | constants.O_CREAT | constants.O_TRUNC)) !== 0;
  return true;
}

const require = createRequire(import.meta.url);

/** Patches the file-system functions; `uninstall()` restores them. */
export function installCrashSwitch(): { crashSwitch: CrashSwitch; uninstall: () => void } {
  const crashSwitch: CrashSwitch = { armed: false, calls: 0, crashAt: -1, onCrash: 'fail', crashed: false };
  const restore: Array<() => void> = [];
  const fsObject = require('node:fs') as Record<string, unknown>;
  const promisesObject = require('node:fs/promises') as Record<string, unknown>;
  const forms = [[fsObject, '', 'callback'], [fsObject, 'Sync', 'sync'], [promisesObject, '', 'promise']] as const;
  for (const [target, suffix, form] of forms) {
    for (const base of CHANGING) {
      const name = `${base}${suffix}`;
      const original = target[name] as ((...a: unknown[]) => unknown) | undefined;
      if (typeof original !== 'function') continue;
      target[name] = function patched(this: unknown, ...args: unknown[]) {
        if (crashSwitch.armed && changesDisk(base, args)) {
          if (crashSwitch.crashAt >= 0 && crashSwitch.calls >= crashSwitch.crashAt) {
            if (crashSwitch.onCrash === 'kill') {
              process.kill(process.pid, 'SIGKILL');
              Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0);  // never returns: the signal ends the process
            }
            crashSwitch.crashed = true;
            const error = new Error(`simulated crash before ${name}() (file-system call ${crashSwitch.calls})`);
            if (form === 'sync') throw error;
            if (form === 'promise') return Promise.reject(error);
            const callback = args[args.length - 1];
            if (typeof callback === 'function') process.nextTick(callback as (e: Error) => void, error);
            return undefined;
          }
          crashSwitch.calls++;
        }
        return original.apply(this, args);
      };
      restore.push(() => { target[name] = original; });
    }
  }
  syncBuiltinESMExports();
  return {
    crashSwitch,
    uninstall: () => {
      for (const undo of restore) undo();
      syncBuiltinESMExports();
    },
  };
}
