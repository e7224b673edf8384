/**
 * Prints the WGSL of the package's subgroup-matrix programs for a representative set of attributes
 * (issue 13: what the GPU compiles, with the staging kernels.ts would pick for the shape), each
 * followed by what tools/webgpu_tc/uniformity.ts finds in its control flow, and the same for
 * db64af4's frozen programs, and the v7 variants (variant_codes.ts's V7_STEPS) at Q's up shape.
 *
 *   npx tsx tools/webgpu_tc/print_shaders.ts            all of them
 *   npx tsx tools/webgpu_tc/print_shaders.ts matmul     those whose name contains 'matmul'
 *   npx tsx tools/webgpu_tc/print_shaders.ts v7-g       the v7 variant v7-g-double
 *   npx tsx tools/webgpu_tc/print_shaders.ts --audit    the findings only
 */
import {
  matMulStaging, SubgroupMatrixMatMulProgram, SubgroupMatrixWeightGradProgram, weightGradStaging,
} from '../../src/backends/webgpu/programs/subgroup_matrix_program.js';
import { OLD_MATMUL_ROWS, OLD_WEIGHT_GRAD_ROWS } from './frozen/db64af4.js';
import { auditSubgroupControlFlow } from './uniformity.js';
import { v7Variant, V7_STEPS } from './variant_codes.js';

const args = process.argv.slice(2);
const auditOnly = args.includes('--audit');
const filter = args.find(a => !a.startsWith('--'));
const bf16 = { kind: 'bf16' as const, cols: 1536, layout: null };
const shaders: Array<[string, string]> = [
  ['matmul: up projection, gather, f32 weight [E, N, K]', new SubgroupMatrixMatMulProgram(2048, 1536,
    { source: 'gather', hasBias: false, hasAddend: false, kContiguous: true, scaled: false }, 32,
    matMulStaging({}, { inner: 2048, outCols: 1536, sE: 1536 * 2048, sN: 2048, sK: 1 })).getUserCode()],
  ['matmul: up projection, gather, bf16 weight, bias', new SubgroupMatrixMatMulProgram(2048, 1536,
    { source: 'gather', hasBias: true, hasAddend: false, kContiguous: true, scaled: false, packedWeight: bf16 }, 32,
    matMulStaging({ packedWeight: bf16 }, { inner: 2048, outCols: 1536, sE: 1536 * 1024, sN: 2048, sK: 1 })).getUserCode()],
  ['matmul: down projection, SwiGLU on load, addend', new SubgroupMatrixMatMulProgram(2048, 1024,
    { source: 'act', activation: { kind: 'swiglu', interleaved: false }, hasBias: false, hasAddend: true, kContiguous: true, scaled: false }, 32,
    matMulStaging({}, { inner: 1536, outCols: 1024, sE: 1024 * 1536, sN: 1536, sK: 1 })).getUserCode()],
  ['matmul: dx rows = dh·W1 (scaled gradient operand, W read along n)', new SubgroupMatrixMatMulProgram(2048, 1024,
    { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true }, 32,
    matMulStaging({}, { inner: 1536, outCols: 1024, sE: 1024 * 1536, sN: 1, sK: 1024 })).getUserCode()],
  ['weight grad: dW1 = dhᵀ·x (gather right, scaled)', new SubgroupMatrixWeightGradProgram([8, 1024, 1024], 8, 1024, 1024,
    { left: 'rows', right: 'gather', scaleLeft: false, scaled: true }, 32, weightGradStaging({ P: 1024, Q: 1024 })).getUserCode()],
  ['weight grad: dW2 = (w·dOut)ᵀ·act(h)', new SubgroupMatrixWeightGradProgram([8, 1024, 512], 8, 1024, 512,
    { left: 'gather', right: 'act', activation: { kind: 'swiglu', interleaved: false }, scaleLeft: true, scaled: true }, 32,
    weightGradStaging({ P: 1024, Q: 512 })).getUserCode()],
  ['db64af4 matmul (frozen): rows, f32 weight', OLD_MATMUL_ROWS],
  ['db64af4 weight grad (frozen): rows x rows', OLD_WEIGHT_GRAD_ROWS],
  ...V7_STEPS.map(([id, options]): [string, string] => {
    const v = v7Variant({ E: 16, M: 1024, unused: 0, N: 1536, K: 2048, padding: false }, options);
    return [`${id} (${v.name})`, v.code];
  }),
];
for (const [name, code] of shaders) {
  if (filter && !name.includes(filter)) continue;
  const findings = auditSubgroupControlFlow(code);
  process.stdout.write(`// ==== ${name}: ${findings.length} control-flow finding(s)\n`);
  for (const f of findings) process.stdout.write(`//   ${f.kind}: ${f.at}\n`);
  if (!auditOnly) process.stdout.write(`${code}\n`);
}
