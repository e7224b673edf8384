/**
 * Picks the tfjs backend for a command: loads the gradients (tfjs-layers registers them in Node),
 * the backend package, sets it, waits for it and registers this package's kernels on it.
 */
import * as tf from '@tensorflow/tfjs-core';
import { registerMoEKernels } from '../backends/register_all_kernels.js';
import { BackendError } from '../backends/errors.js';

export const BACKENDS = ['cpu', 'wasm'] as const;
export type BackendName = typeof BACKENDS[number];

/** The npm package that provides each backend. */
export const BACKEND_PACKAGES: Readonly<Record<BackendName, string>> = {
  cpu: '@tensorflow/tfjs-backend-cpu',
  wasm: '@tensorflow/tfjs-backend-wasm',
};

export { BackendError };

export type Importer = (specifier: string) => Promise<unknown>;

const nativeImport: Importer = specifier => import(specifier);

function isModuleNotFound(err: unknown, specifier: string): boolean {
  const e = err as { code?: string; message?: string };
  return (e?.code === 'ERR_MODULE_NOT_FOUND' || e?.code === 'MODULE_NOT_FOUND') &&
      (e.message ?? '').includes(specifier);
}

async function importPackage(specifier: string, purpose: string, importer: Importer): Promise<void> {
  try {
    await importer(specifier);
  } catch (err) {
    if (isModuleNotFound(err, specifier)) {
      throw new BackendError(`${purpose} needs the package ${specifier}, which is not installed ` +
          `(npm install ${specifier}@^4.22.0)`);
    }
    throw err;
  }
}

/**
 * Makes `name` the active backend, ready for training (gradients and this package's kernels).
 *
 * ```js
 * await selectBackend('wasm');
 * tf.getBackend();  // 'wasm'
 * ```
 */
export async function selectBackend(name: string, importer: Importer = nativeImport): Promise<void> {
  if (!(BACKENDS as readonly string[]).includes(name)) {
    throw new BackendError(`unknown backend '${name}'; choose one of ${BACKENDS.join(', ')}`);
  }
  const backend = name as BackendName;
  await importPackage('@tensorflow/tfjs-layers', 'computing gradients', importer);
  await importPackage(BACKEND_PACKAGES[backend], `the '${backend}' backend`, importer);
  const listenersBefore = processErrorListeners();
  if (!(await tf.setBackend(backend))) {
    throw new BackendError(`the '${backend}' backend failed to initialize`);
  }
  await tf.ready();
  removeListenersAddedSince(listenersBefore);
  registerMoEKernels(backend);
}

const PROCESS_ERROR_EVENTS = ['uncaughtException', 'unhandledRejection'] as const;

function processErrorListeners(): Map<string, Set<Function>> {
  return new Map(PROCESS_ERROR_EVENTS.map(event => [event, new Set<Function>(process.listeners(event as 'uncaughtException'))]));
}

/**
 * The wasm backend's Emscripten glue adds process listeners that rethrow every uncaught error from
 * inside its own file, so Node prints that (minified) source line instead of the error's origin.
 * Errors are this program's to report; the glue's listeners go.
 */
function removeListenersAddedSince(before: Map<string, Set<Function>>): void {
  for (const event of PROCESS_ERROR_EVENTS) {
    for (const listener of process.listeners(event as 'uncaughtException')) {
      if (!before.get(event)!.has(listener)) process.removeListener(event, listener as (...args: unknown[]) => void);
    }
  }
}
