/**
 * Subgroup matrices emulated in plain WGSL, so that the subgroup-matrix programs run (slowly, in
 * f32) on a device without them — Mesa in CI — and their numbers can be checked: indexing,
 * staging, the K loop, the epilogue. Each invocation holds and computes the whole 16×16 matrix
 * (what WGSL's value semantics say a subgroup matrix is); every invocation stores the same values.
 *
 * Semantics, per Dawn's docs/dawn/features/subgroup_matrix.md: a left matrix has M rows × K
 * columns, a right one K × N, a result M × N; a row-major load/store reads element (i, j) at
 * offset + i·stride + j, a column-major one at offset + j·stride + i.
 */
import * as tf from '@tensorflow/tfjs-core';
import { SubgroupMatrixMatMulProgram, SubgroupMatrixWeightGradProgram } from '../../src/backends/webgpu/programs/subgroup_matrix_program.js';
import { registerTensorCoreDevice, TENSOR_CORES_FLAG } from '../../src/backends/webgpu/tensor_cores.js';

const EDGE = 16;

const EMULATION = `
  struct SM { v : array<f32, ${EDGE * EDGE}> }
  // the edge as a value the compiler cannot fold, so that Mesa's GLSL compiler does not unroll
  // the emulated loops (fully unrolled, a program takes minutes to compile)
  fn smEdgeOf() -> u32 { return select(${EDGE}u, ${EDGE + 1}u, workgroupId.z > 1000000000u); }
  fn smAt(offset : u32, i : u32, j : u32, colMajor : bool, stride : u32) -> u32 {
    return select(offset + i * stride + j, offset + j * stride + i, colMajor);
  }
  fn smMma(a : SM, b : SM, c : SM) -> SM {
    var r = c;
    let n = smEdgeOf();
    for (var i = 0u; i < n; i++) {
      for (var j = 0u; j < n; j++) {
        var s = r.v[i * ${EDGE}u + j];
        for (var k = 0u; k < n; k++) { s += a.v[i * ${EDGE}u + k] * b.v[k * ${EDGE}u + j]; }
        r.v[i * ${EDGE}u + j] = s;
      }
    }
    return r;
  }`;

/** Load and store functions for each array the matrices are loaded from or stored to. */
function accessors(arrays: Map<string, { space: string; size: string }>): string {
  return [...arrays].map(([name, { space, size }]) => `
  fn smLoad_${name}(p : ptr<${space}, array<f32, ${size}>>, offset : u32, colMajor : bool, stride : u32) -> SM {
    var m : SM;
    let n = smEdgeOf();
    for (var i = 0u; i < n; i++) {
      for (var j = 0u; j < n; j++) { m.v[i * ${EDGE}u + j] = (*p)[smAt(offset, i, j, colMajor, stride)]; }
    }
    return m;
  }
  fn smStore_${name}(p : ptr<${space}, array<f32, ${size}>>, offset : u32, m : SM, colMajor : bool, stride : u32) {
    let n = smEdgeOf();
    for (var i = 0u; i < n; i++) {
      for (var j = 0u; j < n; j++) { (*p)[smAt(offset, i, j, colMajor, stride)] = m.v[i * ${EDGE}u + j]; }
    }
  }`).join('\n');
}

/**
 * `code` (a subgroup-matrix program's user code) with the matrices emulated and f16 as f32. An
 * array the matrices are stored to moves to private memory: every invocation stores the whole
 * matrix there (the f32 slabs and block would exceed Mesa's 32 KiB of workgroup memory).
 */
export function emulateSubgroupMatrices(code: string): string {
  const stored = new Set([...code.matchAll(/subgroupMatrixStore\(&(\w+),/g)].map(m => m[1]));
  const arrays = new Map<string, { space: string; size: string }>();
  let body = code.replace(/^\s*enable .*$/gm, '').replace(/\bf16\b/g, 'f32')
    .replace(/var<workgroup>\s+(\w+)\s*:\s*array<f32,\s*(\d+)>;/g, (_, name: string, size: string) => {
      const space = stored.has(name) ? 'private' : 'workgroup';
      arrays.set(name, { space, size });
      return `var<${space}> ${name} : array<f32, ${size}>;`;
    });
  body = body
    .replace(/subgroupMatrixLoad<subgroup_matrix_(?:left|right)<f32, 16, 16>>\(&(\w+),/g, (_, a: string) => `smLoad_${a}(&${a},`)
    .replace(/subgroup_matrix_result<f32, 16, 16>\(\)/g, 'SM()')
    .replace(/subgroupMatrixMultiplyAccumulate\(/g, 'smMma(')
    .replace(/subgroupMatrixStore\(&(\w+),/g, (_, a: string) => `smStore_${a}(&${a},`);
  if (/subgroup_matrix|subgroupMatrix/.test(body)) throw new Error('emulateSubgroupMatrices: a builtin was left unreplaced');
  return `${EMULATION}\n${accessors(arrays)}\n${body}`;
}

type ProgramClass = { prototype: { getUserCode(): string } };

/**
 * Runs `fn` with WEBGPU_MOE_TENSOR_CORES on and the active webgpu device registered as a tensor-core
 * device whose subgroup-matrix programs are emulated (see the file comment); restores the flag
 * and the programs after. The registration stays (it only hoists enable directives).
 */
export async function withEmulatedTensorCores<T>(fn: () => Promise<T>): Promise<T> {
  const device = (tf.backend() as unknown as { device: GPUDevice }).device;
  const why = registerTensorCoreDevice(device, {
    config: { componentType: 'f16', resultComponentType: 'f32', M: EDGE, N: EDGE, K: EDGE }, subgroupSize: 32 });
  if (why !== undefined) throw new Error(`withEmulatedTensorCores: ${why}`);
  const classes: ProgramClass[] = [SubgroupMatrixMatMulProgram, SubgroupMatrixWeightGradProgram];
  const originals = classes.map(c => c.prototype.getUserCode);
  classes.forEach((c, i) => {
    const original = originals[i];
    c.prototype.getUserCode = function (this: unknown) { return emulateSubgroupMatrices(original.call(this)); };
  });
  const before = tf.env().getBool(TENSOR_CORES_FLAG);
  tf.env().set(TENSOR_CORES_FLAG, true);
  try {
    return await fn();
  } finally {
    tf.env().set(TENSOR_CORES_FLAG, before);
    classes.forEach((c, i) => { c.prototype.getUserCode = originals[i]; });
  }
}
