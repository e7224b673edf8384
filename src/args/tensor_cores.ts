/**
 * The webgpu backend's tensor-core option (issue 13): not a register() arg (it is chosen when the
 * backend starts, before any model exists: Dawn's toggles go into the adapter request), but a spec
 * of the same kind, checked by the same rule (checkScalar), so `selectBackend()`, the CLI's
 * `--tensor-cores` and docs/args.md say the same thing.
 */
import type { ArgSpec } from './schema.js';
import { checkScalar, Collector } from './validate.js';

export const TENSOR_CORE_MODES = ['auto', 'off'] as const;
export type TensorCoreMode = typeof TENSOR_CORE_MODES[number];

export const TENSOR_CORES_SPEC: ArgSpec = {
  path: 'tensorCores', kind: 'enum', values: TENSOR_CORE_MODES, default: 'off', flag: 'tensor-cores',
  description: "webgpu only: 'auto' asks Dawn for f16 subgroup matrices (NVIDIA's tensor cores) and uses them for " +
      "the wide expert products (f16 operands, f32 accumulation) where the adapter has them, the f32 kernels " +
      "elsewhere; 'off' runs the f32 kernels everywhere",
};

/**
 * The problems of a tensorCores value on a backend: not one of the modes, or 'auto' on a backend
 * other than webgpu (a silent f32 run would look like a measured one). [] when fine.
 *
 * ```js
 * tensorCoresProblems('on', 'webgpu');  // ["tensorCores: expected one of 'auto', 'off' but got 'on' (string)"]
 * tensorCoresProblems('auto', 'wasm');  // ["tensorCores: 'auto' is for the 'webgpu' backend, not 'wasm'"]
 * ```
 */
export function tensorCoresProblems(value: unknown, backend: string): string[] {
  const c = new Collector();
  const mode = checkScalar(c, TENSOR_CORES_SPEC, value);
  if (mode === 'auto' && backend !== 'webgpu') {
    c.add(TENSOR_CORES_SPEC.path, `tensorCores: 'auto' is for the 'webgpu' backend, not '${backend}'`);
  }
  return c.problems.map(p => p.message);
}
