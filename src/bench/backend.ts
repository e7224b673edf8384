/**
 * The benchmark's backends: cpu, wasm and webgpu, each loaded only when asked for. In Node,
 * webgpu runs on Dawn (npm package `webgpu`), set up by src/backends/webgpu/dawn.ts before the
 * backend is picked (../shared/gpu/README.md).
 *
 * Every package is imported with a literal specifier (unlike src/cli/backend.ts), so that esbuild
 * bundles them all into bench/run.ts's bundle for the GPU machine, which has no node_modules.
 */
import * as tf from '@tensorflow/tfjs-core';
import { registerMoEKernels } from '../backends/register_all_kernels.js';
import { BackendError, type DawnLoader, type DawnModuleLike, type Importer } from '../cli/backend.js';

export const BENCH_BACKENDS = ['cpu', 'wasm', 'webgpu'] as const;
export type BenchBackend = typeof BENCH_BACKENDS[number];

/** The packages the webgpu backend needs in Node. */
export const WEBGPU_PACKAGES = ['@tensorflow/tfjs-backend-webgpu', 'webgpu'] as const;

export type { DawnModuleLike, DawnLoader };

// A literal specifier, so that esbuild bundles it for the GPU machine; it is loaded only for webgpu.
const loadDawn: DawnLoader = () => import('../backends/webgpu/dawn.js');

const PACKAGES = {
  layers: '@tensorflow/tfjs-layers',
  cpu: '@tensorflow/tfjs-backend-cpu',
  wasm: '@tensorflow/tfjs-backend-wasm',
} as const;

const literalImports: Record<keyof typeof PACKAGES, () => Promise<unknown>> = {
  layers: () => import('@tensorflow/tfjs-layers'),
  cpu: () => import('@tensorflow/tfjs-backend-cpu'),
  wasm: () => import('@tensorflow/tfjs-backend-wasm'),
};

function missingPackage(err: unknown, candidates: readonly string[]): string | undefined {
  const e = err as { code?: string; message?: string };
  if (e?.code !== 'ERR_MODULE_NOT_FOUND' && e?.code !== 'MODULE_NOT_FOUND') return undefined;
  return candidates.find(p => (e.message ?? '').includes(`'${p}'`) || (e.message ?? '').includes(`"${p}"`));
}

/** Imports one of PACKAGES (through `importer` when given: the specs); a missing one is a BackendError. */
async function load(what: keyof typeof PACKAGES, purpose: string, importer?: Importer): Promise<void> {
  const specifier = PACKAGES[what];
  try {
    await (importer ? importer(specifier) : literalImports[what]());
  } catch (err) {
    if (missingPackage(err, [specifier]) !== undefined) {
      throw new BackendError(`${purpose} needs the package ${specifier}, which is not installed ` +
          `(npm install ${specifier}@^4.22.0)`);
    }
    throw err;
  }
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
  if (!(BENCH_BACKENDS as readonly string[]).includes(name)) {
    throw new BackendError(`unknown backend '${name}'; choose one of ${BENCH_BACKENDS.join(', ')}`);
  }
  await load('layers', 'computing gradients', importer);
  if (name === 'cpu' || name === 'wasm') {
    await load(name, `the '${name}' backend`, importer);
    if (!(await tf.setBackend(name))) throw new BackendError(`the '${name}' backend failed to initialize`);
    await tf.ready();
    registerMoEKernels(name);
    return () => {};
  }
  let dawn: DawnModuleLike;
  try {
    dawn = await dawnLoader();
    await dawn.setupDawnWebGPU({ tensorCores: 'off' });
  } catch (err) {
    const pkg = missingPackage(err, WEBGPU_PACKAGES);
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
