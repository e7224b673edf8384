/**
 * Picks the tfjs backend for a command: loads the gradients (tfjs-layers registers them in Node),
 * the backend package, sets it, waits for it and registers this package's kernels on it. webgpu
 * runs on Dawn (src/backends/webgpu/dawn.ts), which keeps Node alive until released: main()
 * calls releaseBackend() when the command is done.
 */
import * as tf from '@tensorflow/tfjs-core';
import { tensorCoresProblems, type TensorCoreMode } from '../args/tensor_cores.js';
import { registerMoEKernels } from '../backends/register_all_kernels.js';
import { BackendError } from '../backends/errors.js';
import { TENSOR_CORES_FLAG, tensorCoreDevice } from '../backends/webgpu/tensor_cores.js';

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
/** What ends the threaded wasm build's threads this module started (null: none). */
let releaseWasmThreads: (() => void) | null = null;

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

/** How selectBackend starts a backend. */
export interface BackendOptions {
  /**
   * webgpu only: 'auto' asks Dawn for the subgroup-matrix features (its tensor-core toggles) and
   * turns the tf.env() flag WEBGPU_MOE_TENSOR_CORES on when the device has them; 'off' (default)
   * turns the flag off: the f32 kernels (src/args/tensor_cores.ts)
   */
  tensorCores?: TensorCoreMode;
  /**
   * wasm in Node only: tfjs-wasm's threaded SIMD build with this many XNNPACK threads (1 to 8), its
   * loops between the products split over the cores left beside them
   * (src/backends/wasm/threads_node.ts); default: the single-threaded build tfjs loads in Node
   */
  wasmThreads?: number;
}

/** What selectBackend started. */
export interface BackendReport {
  backend: BackendName;
  /**
   * 'on': the wide expert products run on tensor cores (f16 operands, f32 accumulation); 'off':
   * not asked for; else why 'auto' found none (the f32 kernels run), e.g. "the device lacks
   * shader-f16 and chromium-experimental-subgroup-matrix" on Mesa
   */
  tensorCores: string;
  /** With wasmThreads: the XNNPACK threads and loop workers started. */
  wasmThreads?: { threads: number; loopWorkers: number };
}

/**
 * Makes `name` the active backend, ready for training (gradients and this package's kernels).
 *
 * ```js
 * await selectBackend('wasm');
 * tf.getBackend();  // 'wasm'
 * const { tensorCores } = await selectBackend('webgpu', { tensorCores: 'auto' });  // 'on' on an H100
 * ```
 */
export async function selectBackend(name: string, options: BackendOptions = {}, importer: Importer = nativeImport,
    dawnLoader: DawnLoader = loadDawn): Promise<BackendReport> {
  if (!(BACKENDS as readonly string[]).includes(name)) {
    throw new BackendError(`unknown backend '${name}'; choose one of ${BACKENDS.join(', ')}`);
  }
  const problems = tensorCoresProblems(options.tensorCores, name);
  if (options.wasmThreads !== undefined && name !== 'wasm') problems.push(`wasmThreads is for the 'wasm' backend, not '${name}'`);
  if (problems.length > 0) throw new BackendError(`selectBackend(): ${problems.join('; ')}`);
  const tensorCores = options.tensorCores ?? 'off';
  const backend = name as BackendName;
  await importPackage('@tensorflow/tfjs-layers', 'computing gradients', importer);
  await importPackage(BACKEND_PACKAGES[backend], `the '${backend}' backend`, importer);
  if (backend === 'wasm' && options.wasmThreads !== undefined) {
    return { backend, tensorCores: 'off', wasmThreads: await activateThreadedWasm(options.wasmThreads) };
  }
  if (backend !== 'webgpu') {
    await activate(backend);
    return { backend, tensorCores: 'off' };
  }
  // kept as it is when already active: a host (the specs) set Dawn up and releases it
  if (tf.getBackend() === 'webgpu') {
    registerMoEKernels(backend);
    return { backend, tensorCores: useTensorCores(tensorCores, activeDeviceState()) };
  }
  const dawnState = await startDawn(importer, dawnLoader, tensorCores);
  await activate(backend);
  return { backend, tensorCores: useTensorCores(tensorCores, dawnState) };
}

/** Sets the backend (its package imported) and registers this package's kernels on it. */
async function activate(backend: BackendName): Promise<void> {
  const listenersBefore = processErrorListeners();
  if (!(await tf.setBackend(backend))) {
    releaseBackend();
    throw new BackendError(`the '${backend}' backend failed to initialize`);
  }
  await tf.ready();
  removeListenersAddedSince(listenersBefore);
  registerMoEKernels(backend);
}

/**
 * The threaded wasm build as the backend (useThreadedWasm, imported only when asked for: it reads
 * tfjs-wasm's threaded files and starts worker threads), this package's kernels on it;
 * releaseBackend ends its threads.
 */
async function activateThreadedWasm(threads: number): Promise<{ threads: number; loopWorkers: number }> {
  const { useThreadedWasm } = await import('../backends/wasm/threads_node.js');
  const listenersBefore = processErrorListeners();
  const started = await useThreadedWasm(threads);
  removeListenersAddedSince(listenersBefore);
  registerMoEKernels('wasm');
  releaseWasmThreads = started.release;
  return { threads: started.threads, loopWorkers: started.loopWorkers };
}

/**
 * Sets the tensor-core flag for a webgpu run and says what it is: 'on' when asked for ('auto')
 * and the device has them (`state` 'available'), 'off' when not asked for, else why not.
 */
function useTensorCores(mode: TensorCoreMode, state: string): string {
  const on = mode === 'auto' && state === 'available';
  tf.env().set(TENSOR_CORES_FLAG, on);
  if (mode === 'off') return 'off';
  return on ? 'on' : state;
}

/** The tensor-core state of the active webgpu backend's device, which its host set up. */
function activeDeviceState(): string {
  const device = (tf.backend() as unknown as { device?: GPUDevice }).device;
  return tensorCoreDevice(device) !== undefined ? 'available' :
    "the webgpu backend was started without tensorCores 'auto' (setupDawnWebGPU), so its device has no subgroup matrices";
}

/** What is used of src/backends/webgpu/dawn.ts (a stand-in in the specs). */
export interface DawnModuleLike {
  setupDawnWebGPU(options: { tensorCores: TensorCoreMode }): Promise<{ tensorCores: string }>;
  releaseDawnWebGPU(): void;
}

export type DawnLoader = () => Promise<DawnModuleLike>;

const loadDawn: DawnLoader = () => import('../backends/webgpu/dawn.js');

/**
 * Dawn as navigator.gpu with tfjs's webgpu backend on it; returns the adapter's tensor-core state
 * (DawnAdapterReport.tensorCores). No adapter is an error: tfjs would fall back to another backend
 * without a word.
 */
async function startDawn(importer: Importer, dawnLoader: DawnLoader, tensorCores: TensorCoreMode): Promise<string> {
  await importPackage('webgpu', "the 'webgpu' backend (Dawn, in Node)", importer, '^0.6.2');
  const dawn = await dawnLoader();
  let report: { tensorCores: string };
  try {
    report = await dawn.setupDawnWebGPU({ tensorCores });
  } catch (err) {
    throw new BackendError(`the 'webgpu' backend could not start: ${(err as Error)?.message ?? String(err)}`);
  }
  releaseDawn = () => dawn.releaseDawnWebGPU();
  return report.tensorCores;
}

/**
 * Lets go of what selectBackend started that would keep Node alive (Dawn, for webgpu; the threaded
 * wasm build's threads, which goes with its backend); a no-op otherwise. main() calls it after every command.
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
  const releaseThreads = releaseWasmThreads;
  releaseWasmThreads = null;
  releaseThreads?.();
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
