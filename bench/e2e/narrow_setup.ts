/**
 * What the narrow-model measurements on Mesa (profile_narrow.ts, memory_narrow.ts) share: their
 * `--name value` flags and the webgpu backend through Dawn with the package's kernels.
 */
import * as tf from '@tensorflow/tfjs-core';
import { registerMoEKernels } from '../../src/backends/register_all_kernels.js';
import { setupDawnWebGPU } from '../../src/backends/webgpu/dawn.js';

/** `--name value` from the command line, or `fallback` where absent. */
export function commandLineFlag(name: string, fallback: string): string {
  const args = process.argv.slice(2);
  const i = args.indexOf(`--${name}`);
  return i >= 0 && i + 1 < args.length ? args[i + 1] : fallback;
}

/** Dawn's webgpu (f32 kernels, no tensor cores) as tfjs's backend, the package's kernels registered. */
export async function setUpNarrowWebGPU(): Promise<void> {
  await setupDawnWebGPU({ tensorCores: 'off' });
  if (!(await tf.setBackend('webgpu'))) throw new Error('webgpu could not be set up');
  registerMoEKernels('webgpu');
}
