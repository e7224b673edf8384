/**
 * The benchmark's backends: cpu and wasm as every command sets them up, plus webgpu, loaded only
 * when asked for. In Node, webgpu runs on Dawn (npm package `webgpu`), set up by
 * src/backends/webgpu/dawn.ts before the backend is picked (../shared/gpu/README.md).
 */
import * as tf from '@tensorflow/tfjs-core';
import { registerMoEKernels } from '../backends/register_all_kernels.js';
import { BACKENDS, BackendError, selectBackend, type Importer } from '../cli/backend.js';

export const BENCH_BACKENDS = [...BACKENDS, 'webgpu'] as const;
export type BenchBackend = typeof BENCH_BACKENDS[number];

/** The packages the webgpu backend needs in Node. */
export const WEBGPU_PACKAGES = ['@tensorflow/tfjs-backend-webgpu', 'webgpu'] as const;

/** What is used of src/backends/webgpu/dawn.ts. */
export interface DawnModuleLike {
  setupDawnWebGPU(): Promise<unknown>;
  releaseDawnWebGPU(): void;
}

export type DawnLoader = () => Promise<DawnModuleLike>;

// A literal specifier, so that esbuild bundles it for the GPU machine; it is loaded only for webgpu.
const loadDawn: DawnLoader = () => import('../backends/webgpu/dawn.js');

function missingPackage(err: unknown): string | undefined {
  const e = err as { code?: string; message?: string };
  if (e?.code !== 'ERR_MODULE_NOT_FOUND' && e?.code !== 'MODULE_NOT_FOUND') return undefined;
  return WEBGPU_PACKAGES.find(p => (e.message ?? '').includes(`'${p}'`) || (e.message ?? '').includes(`"${p}"`));
}

/**
 * Makes `name` the active backend for a benchmark, with gradients and this package's kernels.
 * Returns what to call when done: on webgpu it lets go of Dawn, which would keep Node alive.
 *
 * ```js
 * const release = await selectBenchBackend('wasm');
 * ```
 */
export async function selectBenchBackend(
    name: string, importer?: Importer, dawnLoader: DawnLoader = loadDawn): Promise<() => void> {
  if (name !== 'webgpu') {
    await selectBackend(name, importer);
    return () => {};
  }
  if (importer) await importer('@tensorflow/tfjs-layers');
  else await import('@tensorflow/tfjs-layers');
  let dawn: DawnModuleLike;
  try {
    dawn = await dawnLoader();
    await dawn.setupDawnWebGPU();
  } catch (err) {
    const pkg = missingPackage(err);
    if (pkg !== undefined) {
      throw new BackendError(`the 'webgpu' backend needs the package ${pkg}, which is not installed ` +
          `(npm install --save-dev ${WEBGPU_PACKAGES.join(' ')})`);
    }
    // tfjs would fall back to another backend without a word: numbers from the wrong device are
    // worse than none, so no adapter is an error.
    throw new BackendError(`the 'webgpu' backend could not start: ${(err as Error)?.message ?? String(err)}`);
  }
  if (!(await tf.setBackend('webgpu'))) {
    dawn.releaseDawnWebGPU();
    throw new BackendError(`the 'webgpu' backend failed to initialize`);
  }
  await tf.ready();
  registerMoEKernels('webgpu');
  return () => dawn.releaseDawnWebGPU();
}
