/**
 * Tensor cores from WebGPU (issue 13): which devices can run the subgroup-matrix products, and
 * whether the MoE kernels use them.
 *
 * Dawn exposes NVIDIA's tensor cores as `chromium-experimental-subgroup-matrix`, whose f16 configs
 * are listed only with `shader-f16` (on NVIDIA's Vulkan driver behind the toggle
 * vulkan_enable_f16_on_nvidia, and the feature itself behind allow_unsafe_apis; docs/webgpu.md).
 * A device is usable when it has both features, an f16→f32 16×16×16 config and one fixed
 * subgroup size (the programs run one subgroup per workgroup, so that no subgroup id is needed).
 *
 * tfjs's shader builder puts its own declarations before the program's code, and WGSL wants
 * `enable` directives first: on a device registered here createShaderModule moves them to the
 * top (hoistEnableDirectives). Devices tfjs or a page created are never registered, so there the
 * f32 kernels run whatever the flag says.
 *
 * The tf.env() flag WEBGPU_MOE_TENSOR_CORES (default false until the GPU run proves the path)
 * turns the subgroup-matrix products on for the products that are wide enough.
 */
import * as tf from '@tensorflow/tfjs-core';
// the matrix edge the programs are written for: 16×16 f16 operands, 16×16 f32 results
import { MATRIX_EDGE } from './programs/subgroup_matrix_core.js';

/** One entry of GPUAdapterInfo.subgroupMatrixConfigs, as plain data. */
export interface SubgroupMatrixConfig {
  componentType: string;
  resultComponentType: string;
  M: number;
  N: number;
  K: number;
}

/** What the subgroup-matrix programs need from a device. */
export interface TensorCoreDevice {
  /** the f16→f32 config the programs use (16×16×16) */
  config: SubgroupMatrixConfig;
  /** invocations per subgroup, = the programs' workgroup size */
  subgroupSize: number;
}

/** tf.env() flag: use the subgroup-matrix products on a device that has them (default false). */
export const TENSOR_CORES_FLAG = 'WEBGPU_MOE_TENSOR_CORES';
tf.env().registerFlag(TENSOR_CORES_FLAG, () => false);

export { MATRIX_EDGE };

/**
 * The subgroup-matrix configs of an adapter's info as plain data (Dawn's entries have prototype
 * getters only); [] when the adapter lists none.
 */
export function readSubgroupMatrixConfigs(info: GPUAdapterInfo | undefined): SubgroupMatrixConfig[] {
  const raw = (info as unknown as { subgroupMatrixConfigs?: Iterable<Record<string, unknown>> } | undefined)
    ?.subgroupMatrixConfigs;
  if (raw == null) return [];
  return Array.from(raw, c => ({
    componentType: String(c.componentType), resultComponentType: String(c.resultComponentType),
    M: Number(c.M), N: Number(c.N), K: Number(c.K),
  }));
}

/**
 * Why a device with these features, configs and subgroup sizes cannot run the subgroup-matrix
 * products, or its TensorCoreDevice when it can.
 *
 * ```js
 * tensorCoreSupport(['shader-f16', 'chromium-experimental-subgroup-matrix'],
 *     [{ componentType: 'f16', resultComponentType: 'f32', M: 16, N: 16, K: 16 }], 32, 32);
 * // → { device: { config: {...}, subgroupSize: 32 } }
 * ```
 */
export function tensorCoreSupport(
    features: Iterable<string>, configs: SubgroupMatrixConfig[], subgroupMinSize: number | undefined,
    subgroupMaxSize: number | undefined): { device: TensorCoreDevice } | { missing: string } {
  const have = new Set(features);
  const lacking = ['shader-f16', 'chromium-experimental-subgroup-matrix'].filter(f => !have.has(f));
  if (lacking.length > 0) return { missing: `the device lacks ${lacking.join(' and ')}` };
  const config = configs.find(c => c.componentType === 'f16' && c.resultComponentType === 'f32' &&
      c.M === MATRIX_EDGE && c.N === MATRIX_EDGE && c.K === MATRIX_EDGE);
  if (config === undefined) {
    return { missing: `no f16→f32 16×16×16 subgroup matrix config (the adapter lists ${configs.length === 0 ? 'none' :
      configs.map(c => `${c.componentType}→${c.resultComponentType} ${c.M}×${c.N}×${c.K}`).join(', ')})` };
  }
  if (subgroupMinSize === undefined || subgroupMinSize !== subgroupMaxSize) {
    return { missing: `the subgroup size is not fixed (min ${subgroupMinSize}, max ${subgroupMaxSize})` };
  }
  return { device: { config, subgroupSize: subgroupMinSize } };
}

/**
 * The program's WGSL with its `enable ...;` and `diagnostic(...);` directives moved to the front,
 * in their order and each once (tfjs's builder emits the program's code after its own
 * declarations, and WGSL wants directives before any declaration).
 *
 * ```js
 * hoistEnableDirectives('struct S {}\nenable f16;\nfn f() {}');  // 'enable f16;\nstruct S {}\n\nfn f() {}'
 * ```
 */
export function hoistEnableDirectives(code: string): string {
  const directives: string[] = [];
  const rest = code.replace(/^[ \t]*(?:enable\s+[A-Za-z0-9_,\s]+|diagnostic\s*\([A-Za-z0-9_.,\s]+\));[ \t]*$/gm, line => {
    const directive = line.trim();
    if (!directives.includes(directive)) directives.push(directive);
    return '';
  });
  return directives.length === 0 ? code : `${directives.join('\n')}\n${rest}`;
}

const tensorCoreDevices = new WeakMap<GPUDevice, TensorCoreDevice>();

/**
 * Registers `device` (made with the features tensorCoreSupport asks for) for the subgroup-matrix
 * programs: its createShaderModule hoists enable directives from then on. Returns why not when
 * the device object does not take the wrapper (then it stays unregistered: f32 kernels).
 */
export function registerTensorCoreDevice(device: GPUDevice, support: TensorCoreDevice): string | undefined {
  if (tensorCoreDevices.has(device)) return undefined;
  const create = device.createShaderModule.bind(device);
  const hoisting = (descriptor: GPUShaderModuleDescriptor) =>
    create({ ...descriptor, code: hoistEnableDirectives(descriptor.code) });
  try {
    device.createShaderModule = hoisting;
  } catch (err) {
    return `the device's createShaderModule cannot be wrapped: ${String((err as Error)?.message ?? err)}`;
  }
  if (device.createShaderModule !== hoisting) return 'the device\'s createShaderModule cannot be wrapped';
  tensorCoreDevices.set(device, support);
  return undefined;
}

/** The device's TensorCoreDevice when it was registered, else undefined. */
export function tensorCoreDevice(device: GPUDevice | undefined): TensorCoreDevice | undefined {
  return device === undefined ? undefined : tensorCoreDevices.get(device);
}

/**
 * The TensorCoreDevice to use for a product on the active backend now: the flag is on, the
 * backend is 'webgpu' on a registered device. Undefined otherwise (the f32 kernels run).
 */
export function activeTensorCores(): TensorCoreDevice | undefined {
  if (!tf.env().getBool(TENSOR_CORES_FLAG) || tf.getBackend() !== 'webgpu') return undefined;
  return tensorCoreDevice((tf.backend() as unknown as { device?: GPUDevice }).device);
}

/**
 * Whether a product of this size goes to the subgroup-matrix program: both output sides at least
 * 32 (half of a workgroup's 64×64 block) and the reduction at least 16 (one matrix step). The
 * rank-r LoRA products (r < 32: a side of r) stay on the f32 kernels, where most of a block
 * would be padding.
 */
export function wideEnoughForTensorCores(rows: number, cols: number, inner: number): boolean {
  return rows >= 32 && cols >= 32 && inner >= 16;
}
