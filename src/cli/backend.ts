/**
 * Picks the tfjs backend for a command: loads the gradients (tfjs-layers registers them in Node),
 * the backend package, sets it, waits for it and registers this package's kernels on it.
 */
import * as tf from '@tensorflow/tfjs-core';
import { registerMoEKernels } from '../backends/register_all_kernels.js';

export const BACKENDS = ['cpu', 'wasm'] as const;
export type BackendName = typeof BACKENDS[number];

/** The npm package that provides each backend. */
export const BACKEND_PACKAGES: Readonly<Record<BackendName, string>> = {
  cpu: '@tensorflow/tfjs-backend-cpu',
  wasm: '@tensorflow/tfjs-backend-wasm',
};

/** A backend that cannot be loaded or set; a user error (an install or a name), not a bug. */
export class BackendError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'BackendError';
    Object.setPrototypeOf(this, BackendError.prototype);
  }
}

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
  if (!(await tf.setBackend(backend))) {
    throw new BackendError(`the '${backend}' backend failed to initialize`);
  }
  await tf.ready();
  registerMoEKernels(backend);
}
