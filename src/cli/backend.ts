/**
 * Picks the tfjs backend for a command: loads the gradients (tfjs-layers registers them in Node),
 * the backend package, sets it, waits for it and registers this package's kernels on it. webgpu
 * runs on Dawn (src/backends/webgpu/dawn.ts), which keeps Node alive until released: main()
 * calls releaseBackend() when the command is done.
 */
import * as tf from '@tensorflow/tfjs-core';
import { registerMoEKernels } from '../backends/register_all_kernels.js';
import { BackendError } from '../backends/errors.js';

export const BACKENDS = ['cpu', 'wasm', 'webgpu'] as const;
export type BackendName = typeof BACKENDS[number];

/** The npm package that provides each backend (webgpu in Node: Dawn's as well, 'webgpu'). */
export const BACKEND_PACKAGES: Readonly<Record<BackendName, string>> = {
  cpu: '@tensorflow/tfjs-backend-cpu',
  wasm: '@tensorflow/tfjs-backend-wasm',
  webgpu: '@tensorflow/tfjs-backend-webgpu',
};

/** What releases the Dawn this module started (null: none, or one its host started and keeps). */
let releaseDawn: (() => void) | null = null;

export { BackendError };

export type Importer = (specifier: string) => Promise<unknown>;

const nativeImport: Importer = specifier => import(specifier);

function isModuleNotFound(err: unknown, specifier: string): boolean {
  const e = err as { code?: string; message?: string };
  return (e?.code === 'ERR_MODULE_NOT_FOUND' || e?.code === 'MODULE_NOT_FOUND') &&
      (e.message ?? '').includes(specifier);
}

async function importPackage(specifier: string, purpose: string, importer: Importer, version = '^4.22.0'): Promise<void> {
  try {
    await importer(specifier);
  } catch (err) {
    if (isModuleNotFound(err, specifier)) {
      throw new BackendError(`${purpose} needs the package ${specifier}, which is not installed ` +
          `(npm install ${specifier}@${version})`);
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
export async function selectBackend(name: string, importer: Importer = nativeImport, dawnLoader: DawnLoader = loadDawn): Promise<void> {
  if (!(BACKENDS as readonly string[]).includes(name)) {
    throw new BackendError(`unknown backend '${name}'; choose one of ${BACKENDS.join(', ')}`);
  }
  const backend = name as BackendName;
  await importPackage('@tensorflow/tfjs-layers', 'computing gradients', importer);
  await importPackage(BACKEND_PACKAGES[backend], `the '${backend}' backend`, importer);
  if (backend === 'webgpu') {
    // kept as it is when already active: a host (the specs) set Dawn up and releases it
    if (tf.getBackend() === 'webgpu') {
      registerMoEKernels(backend);
      return;
    }
    await startDawn(importer, dawnLoader);
  }
  const listenersBefore = processErrorListeners();
  if (!(await tf.setBackend(backend))) {
    releaseBackend();
    throw new BackendError(`the '${backend}' backend failed to initialize`);
  }
  await tf.ready();
  removeListenersAddedSince(listenersBefore);
  registerMoEKernels(backend);
}

/** What is used of src/backends/webgpu/dawn.ts (a stand-in in the specs). */
export interface DawnModuleLike {
  setupDawnWebGPU(): Promise<unknown>;
  releaseDawnWebGPU(): void;
}

export type DawnLoader = () => Promise<DawnModuleLike>;

const loadDawn: DawnLoader = () => import('../backends/webgpu/dawn.js');

/**
 * Dawn as navigator.gpu with tfjs's webgpu backend on it. No adapter is an error: tfjs would
 * fall back to another backend without a word.
 */
async function startDawn(importer: Importer, dawnLoader: DawnLoader): Promise<void> {
  await importPackage('webgpu', "the 'webgpu' backend (Dawn, in Node)", importer, '^0.6.2');
  const dawn = await dawnLoader();
  try {
    await dawn.setupDawnWebGPU();
  } catch (err) {
    throw new BackendError(`the 'webgpu' backend could not start: ${(err as Error)?.message ?? String(err)}`);
  }
  releaseDawn = () => dawn.releaseDawnWebGPU();
}

/**
 * Lets go of what selectBackend started that would keep Node alive (Dawn, for webgpu); a no-op
 * otherwise. main() calls it after every command.
 *
 * ```js
 * await selectBackend('webgpu');
 * try { ... } finally { releaseBackend(); }
 * ```
 */
export function releaseBackend(): void {
  const release = releaseDawn;
  releaseDawn = null;
  release?.();
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
