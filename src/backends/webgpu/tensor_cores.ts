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
 * top (hoistEnableDirectives), and a subgroup-matrix program's main() becomes the entry point itself
 * instead of a function tfjs's entry point calls (entryPointInlined: 1.65× on the H100). Devices tfjs
 * or a page created are never registered, so there the f32 kernels run whatever the flag says.
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

/** tfjs's entry point: its workgroup size, builtin parameters and the private copies, then main(); */
const TFJS_ENTRY = /(@compute @workgroup_size\([^)]*\))\s*fn _start\(([\s\S]*?)\)\s*\{([\s\S]*?)\bmain\(\);;?\s*\}/;

/** The builtins tfjs's entry point copies to module-scope privates of the same names, lowercased. */
const TFJS_BUILTINS = ['LocalId', 'LocalIndex', 'GlobalId', 'NumWorkgroups', 'WorkgroupId'];

/**
 * A tfjs shader whose program has a `fn main()` with no parameters, rewritten so that main's body
 * is the entry point `_start` (the name tfjs's pipeline asks for): the builtins as parameters, the
 * privates set as tfjs sets them (for any helper that reads them), then shadowed by lets of the same
 * values for main's body. On the H100, NVIDIA's compiler gives the subgroup-matrix MatMul 140
 * TFLOP/s this way against 85 when main() is a function the entry point calls, the same code
 * otherwise (tools/webgpu_tc/variants.ts: pkg-matmul-q-whole-bf16-half-inline against -half).
 * Code of any other form (a flat program's main(index), no tfjs entry) is returned as it is.
 *
 * ```js
 * entryPointInlined(tfjsShader);  // '... @compute @workgroup_size(128, 1, 1)\nfn _start(...) { ...main's body... }'
 * ```
 */
export function entryPointInlined(code: string): string {
  const entry = TFJS_ENTRY.exec(code);
  const header = /\bfn main\(\)\s*\{/.exec(code);
  if (entry === null || header === null || code.indexOf('fn main(', header.index + 1) >= 0) return code;
  const bodyStart = header.index + header[0].length;
  const bodyEnd = closingBrace(code, bodyStart);
  if (bodyEnd < 0 || bodyEnd > entry.index) return code;
  const [, workgroupSize, params, copies] = entry;
  const shadows = TFJS_BUILTINS.map(b => `let ${b[0].toLowerCase()}${b.slice(1)} = ${b};`).join(' ');
  const inlined = `${workgroupSize}\nfn _start(${params}) {\n${copies.trim()}\n${shadows}${code.slice(bodyStart, bodyEnd)}}`;
  return code.slice(0, header.index) + inlined + code.slice(bodyEnd + 1, entry.index) + code.slice(entry.index + entry[0].length);
}

/** The index of the `}` closing the block whose body starts at `from`, skipping line comments; −1 when unbalanced. */
function closingBrace(code: string, from: number): number {
  let depth = 1;
  for (let i = from; i < code.length; i++) {
    const c = code[i];
    if (c === '/' && code[i + 1] === '/') {
      const end = code.indexOf('\n', i);
      if (end < 0) return -1;
      i = end;
    } else if (c === '{') {
      depth++;
    } else if (c === '}' && --depth === 0) {
      return i;
    }
  }
  return -1;
}

/** Whether `code` is one of the subgroup-matrix programs (they enable the extension). */
const usesSubgroupMatrices = (code: string) => /\benable\s+chromium_experimental_subgroup_matrix\b/.test(code);

const tensorCoreDevices = new WeakMap<GPUDevice, TensorCoreDevice>();

/**
 * Registers `device` (made with the features tensorCoreSupport asks for) for the subgroup-matrix
 * programs: its createShaderModule hoists enable directives from then on, and makes a
 * subgroup-matrix program's main() the entry point (entryPointInlined). Returns why not when
 * the device object does not take the wrapper (then it stays unregistered: f32 kernels).
 */
export function registerTensorCoreDevice(device: GPUDevice, support: TensorCoreDevice): string | undefined {
  if (tensorCoreDevices.has(device)) return undefined;
  const create = device.createShaderModule.bind(device);
  const hoisting = (descriptor: GPUShaderModuleDescriptor) => {
    const code = hoistEnableDirectives(descriptor.code);
    return create({ ...descriptor, code: usesSubgroupMatrices(code) ? entryPointInlined(code) : code });
  };
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
