/**
 * TF.js's webgpu backend in Node, on Dawn (npm package `webgpu`). Dawn must be installed as
 * `navigator.gpu` before the backend is created, and the adapter must be asked for with the right
 * feature level: a real GPU (Vulkan, the H100) gives a 'core' adapter; Mesa's software GL (CI,
 * `EGL_PLATFORM=surfaceless`) only a 'compatibility' one through Dawn's OpenGL ES backend, which
 * tfjs's own registration never asks for. So the backend is registered here, on a device this
 * module requests, and a missing adapter is an error instead of a silent fall back to the cpu.
 */
import * as tf from '@tensorflow/tfjs-core';
import {
  readSubgroupMatrixConfigs, registerTensorCoreDevice, type SubgroupMatrixConfig, tensorCoreSupport,
} from './tensor_cores.js';
import { fail } from '../../ops/validate.js';
import { describeValue } from '../../util/describe.js';

/**
 * The Dawn toggles behind which NVIDIA's Vulkan driver offers f16 subgroup matrices (docs/webgpu.md,
 * "Tensor cores"): the experimental feature is an unsafe API, and shader-f16 is off on NVIDIA
 * without the second toggle. One comma-separated list: Dawn reads one enable-dawn-features flag.
 */
export const TENSOR_CORE_TOGGLES = ['allow_unsafe_apis', 'vulkan_enable_f16_on_nvidia'];

/** What setupDawnWebGPU found. */
export interface DawnAdapterReport {
  /** the Dawn `create()` flags that gave the adapter */
  flags: string[];
  featureLevel: 'core' | 'compatibility';
  vendor: string;
  architecture: string;
  description: string;
  features: string[];
  /**
   * the adapter's subgroup matrix configs (component → result type, M×N×K); [] where the
   * adapter lists none (Mesa, or without `tensorCores: 'auto'` on NVIDIA)
   */
  subgroupMatrixConfigs: SubgroupMatrixConfig[];
  /**
   * 'available' when the device can run the subgroup-matrix products (they run only with the
   * tf.env() flag WEBGPU_MOE_TENSOR_CORES on), 'off' when not asked for, else why not
   */
  tensorCores: 'available' | 'off' | string;
}

export interface DawnSetupOptions {
  /**
   * Dawn create() flags and feature level to try, in order; default: the default backend (Vulkan)
   * at 'core', then OpenGL ES at 'compatibility' (Mesa's software GL).
   */
  attempts?: Array<{ flags: string[]; featureLevel: 'core' | 'compatibility' }>;
  /** the backend's registration priority (default 3, as tfjs's own) */
  priority?: number;
  /**
   * Dawn flags added to every attempt, e.g. 'disable-dawn-features=timestamp_quantization' for
   * per-kernel timing at full resolution
   */
  extraFlags?: string[];
  /**
   * 'auto': add Dawn's toggles TENSOR_CORE_TOGGLES to each attempt, request 'shader-f16' and
   * 'chromium-experimental-subgroup-matrix' when offered, and make the device usable by the
   * subgroup-matrix products when it has an f16→f32 16×16×16 config. 'off' (default): none of
   * that; the toggles enable Dawn's unsafe APIs, which a caller asks for knowingly. Either way
   * the f32 kernels run unless the flag WEBGPU_MOE_TENSOR_CORES is on, so results change only
   * with both.
   */
  tensorCores?: 'auto' | 'off';
}

interface DawnModule { create(flags: string[]): GPU; globals: Record<string, unknown> }
interface WebGPUBackendModule { WebGPUBackend: new (device: GPUDevice, info?: GPUAdapterInfo) => tf.KernelBackend }

const DEFAULT_ATTEMPTS: NonNullable<DawnSetupOptions['attempts']> = [
  { flags: [], featureLevel: 'core' },
  { flags: ['backend=opengles'], featureLevel: 'compatibility' },
];

let gpuRef: GPU | undefined;

/**
 * Creates Dawn's GPU, finds an adapter, requests a device with every limit the adapter offers
 * (and 'timestamp-query' and 'subgroups' when offered), and registers tfjs's 'webgpu' backend on
 * it. Throws when no attempt gives an adapter. Call before `tf.setBackend('webgpu')`.
 *
 * ```js
 * const report = await setupDawnWebGPU();
 * await tf.setBackend('webgpu');
 * ```
 */
export async function setupDawnWebGPU(options: DawnSetupOptions = {}): Promise<DawnAdapterReport> {
  // Imported while navigator.gpu is still unset, tfjs's backend module does not register its own
  // factory (which would ask for a 'core' adapter only).
  const hadGpu = (globalThis as { navigator?: { gpu?: unknown } }).navigator?.gpu != null;
  const { WebGPUBackend } = await import('@tensorflow/tfjs-backend-webgpu') as unknown as WebGPUBackendModule;
  const { gpu, adapter, device, report } = await requestDawnDevice(options, 'setupDawnWebGPU');
  const g = globalThis as unknown as { navigator?: { gpu?: GPU } };
  g.navigator ??= {} as { gpu?: GPU };
  g.navigator.gpu = gpu;
  gpuRef = gpu;
  if (hadGpu || tf.findBackendFactory('webgpu') != null) tf.removeBackend('webgpu');
  tf.registerBackend('webgpu', () => new WebGPUBackend(device, adapter.info), options.priority ?? 3);
  return report;
}

/**
 * setupDawnWebGPU's adapter and device, without registering a backend (specs, tools): the first
 * attempt that gives an adapter, its device with every limit and the wanted features, and the
 * report. With tensorCores 'auto' a capable device is registered for the subgroup-matrix programs.
 * `op` names the caller in the error when no attempt gives an adapter.
 */
export async function requestDawnDevice(options: DawnSetupOptions = {}, op = 'requestDawnDevice'):
    Promise<{ gpu: GPU; adapter: GPUAdapter; device: GPUDevice; report: DawnAdapterReport }> {
  const tensorCores = options.tensorCores ?? 'off';
  if (tensorCores !== 'auto' && tensorCores !== 'off') {
    fail(op, `'tensorCores' must be 'auto' or 'off' but got ${describeValue(tensorCores)}`);
  }
  const dawn = await import('webgpu') as unknown as DawnModule;
  Object.assign(globalThis, dawn.globals);
  const tried: string[] = [];
  for (const attempt of options.attempts ?? DEFAULT_ATTEMPTS) {
    const flags = withToggles([...attempt.flags, ...(options.extraFlags ?? [])], tensorCores === 'auto' ? TENSOR_CORE_TOGGLES : []);
    let gpu: GPU;
    let adapter: GPUAdapter | null;
    try {
      gpu = dawn.create(flags);
      adapter = await gpu.requestAdapter(
          { powerPreference: 'high-performance', featureLevel: attempt.featureLevel } as GPURequestAdapterOptions);
    } catch (err) {
      // Dawn throws instead of returning null for some backends (Vulkan, with a named adapter)
      tried.push(`[${flags.join(' ')}] ${attempt.featureLevel}: ${String((err as Error)?.message ?? err).split('\n')[0]}`);
      continue;
    }
    tried.push(`[${flags.join(' ')}] ${attempt.featureLevel}`);
    if (adapter == null) continue;
    const requiredLimits: Record<string, number> = {};
    // GPUSupportedLimits' fields are prototype getters: walk the prototype for their names.
    for (const key of Object.keys(Object.getPrototypeOf(adapter.limits))) {
      const value = (adapter.limits as unknown as Record<string, unknown>)[key];
      if (typeof value === 'number') requiredLimits[key] = value;
    }
    const wanted = ['timestamp-query', 'subgroups',
      ...(tensorCores === 'auto' ? ['shader-f16', 'chromium-experimental-subgroup-matrix'] : [])] as GPUFeatureName[];
    const requiredFeatures = wanted.filter(f => adapter.features.has(f));
    const device = await adapter.requestDevice({ requiredLimits, requiredFeatures });
    const subgroupMatrixConfigs = readSubgroupMatrixConfigs(adapter.info);
    let tensorCoreState = 'off';
    if (tensorCores === 'auto') {
      const info = adapter.info as unknown as { subgroupMinSize?: number; subgroupMaxSize?: number };
      const support = tensorCoreSupport([...device.features].map(String), subgroupMatrixConfigs,
          info.subgroupMinSize, info.subgroupMaxSize);
      tensorCoreState = 'device' in support
        ? registerTensorCoreDevice(device, support.device) ?? 'available'
        : support.missing;
    }
    const report: DawnAdapterReport = {
      flags,
      featureLevel: attempt.featureLevel,
      vendor: adapter.info.vendor,
      architecture: adapter.info.architecture,
      description: adapter.info.description,
      features: [...device.features].map(String).sort(),
      subgroupMatrixConfigs,
      tensorCores: tensorCoreState,
    };
    return { gpu, adapter, device, report };
  }
  throw new Error(`${op}: no WebGPU adapter (requestAdapter() returned null or threw for ${tried.join('; ')}); ` +
      `on Mesa's software GL set EGL_PLATFORM=surfaceless and install libegl1 libegl-mesa0 libgles2 libgl1-mesa-dri`);
}

/**
 * `flags` with `toggles` added to its enable-dawn-features flag (one flag: Dawn reads only one),
 * each once.
 *
 * ```js
 * withToggles(['enable-dawn-features=a'], ['b']);  // ['enable-dawn-features=a,b']
 * ```
 */
export function withToggles(flags: string[], toggles: string[]): string[] {
  if (toggles.length === 0) return flags;
  const prefix = 'enable-dawn-features=';
  const existing = flags.find(f => f.startsWith(prefix));
  const names = existing === undefined ? [] : existing.slice(prefix.length).split(',').filter(n => n !== '');
  for (const t of toggles) if (!names.includes(t)) names.push(t);
  const merged = `${prefix}${names.join(',')}`;
  return existing === undefined ? [...flags, merged] : flags.map(f => (f === existing ? merged : f));
}

/** Drops the reference to Dawn's GPU so that Node can exit (Dawn keeps the process alive while it lives). */
export function releaseDawnWebGPU(): void {
  const g = globalThis as unknown as { navigator?: { gpu?: GPU } };
  if (g.navigator?.gpu === gpuRef) delete g.navigator!.gpu;
  gpuRef = undefined;
}
