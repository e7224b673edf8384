/**
 * The control flow around the subgroup-matrix builtins and barriers of the package's programs
 * (issue 13): tools/webgpu_tc/uniformity.ts's audit finds nothing in any program variant, and
 * finds what it should in the programs of db64af4 (wrong on the H100) and in small shaders with
 * each mistake. Pure text: no device needed.
 */
import { expect } from 'chai';
import { uniformStrideLoop } from '../../../src/backends/webgpu/programs/subgroup_matrix_core.js';
import {
  ELEMENT_STAGING, SubgroupMatrixMatMulProgram, type SubgroupMatMulSpec, type SubgroupStaging, SubgroupMatrixWeightGradProgram,
  type SubgroupWeightGradSpec,
} from '../../../src/backends/webgpu/programs/subgroup_matrix_program.js';
import type { PackedWeightSpec } from '../../../src/backends/webgpu/programs/shared.js';
import { OLD_MATMUL_ROWS, OLD_WEIGHT_GRAD_ROWS } from '../../../tools/webgpu_tc/frozen/db64af4.js';
import { auditSubgroupControlFlow } from '../../../tools/webgpu_tc/uniformity.js';
import { packageProgramShader, v7Variant, V7_STEPS } from '../../../tools/webgpu_tc/variant_codes.js';

describe('webgpu: subgroup-matrix programs reach the matrix builtins and barriers in uniform control flow', () => {
  const bf16: PackedWeightSpec = { kind: 'bf16', cols: 96, layout: null };
  const matMulSpecs: SubgroupMatMulSpec[] = [
    { source: 'gather', hasBias: false, hasAddend: false, kContiguous: true, scaled: false },
    { source: 'gather', hasBias: true, hasAddend: true, kContiguous: false, scaled: true },
    { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true },
    { source: 'act', activation: { kind: 'swiglu', interleaved: false }, hasBias: true, hasAddend: false, kContiguous: true, scaled: false },
    { source: 'act', activation: { kind: 'clampedSwiglu', interleaved: true }, hasBias: false, hasAddend: true, kContiguous: true, scaled: false, packedWeight: bf16 },
    // one group (the dense projections): its own row loop
    { source: 'rows', hasBias: true, hasAddend: false, kContiguous: false, scaled: true, singleGroup: true, packedWeight: bf16 },
    // uniform groups (the composed attention's batched products): the group from the block's first row
    { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false, uniformGroups: true },
    { source: 'rows', hasBias: false, hasAddend: false, kContiguous: false, scaled: true, uniformGroups: true },
  ];
  const gradSpecs: SubgroupWeightGradSpec[] = [
    { left: 'rows', right: 'gather', scaleLeft: false, scaled: true },
    { left: 'gather', right: 'act', activation: { kind: 'swiglu', interleaved: false }, scaleLeft: true, scaled: true },
    // uniform groups: segments from the uniform, R scaled (dV = Pᵀ·dO)
    { left: 'rows', right: 'rows', scaleLeft: false, scaled: true, scaledRight: true, uniformGroups: true },
  ];
  // 16 and 64 invocations per subgroup: 64 and 256 per workgroup, fewer or more than the block's 128 rows
  for (const subgroupSize of [16, 32, 64]) {
    it(`every program variant at subgroup size ${subgroupSize}: no per-invocation branch around them, no per-invocation loop bound, no early exit`, () => {
      // per element, in quads (v7's: loaded and stored in each step; v6's register prefetch: the loads under a
      // workgroup-uniform branch), and mixed, with and without v6's whole-block structure, for every MatMul
      // block (128, 64, 32 rows) and weight-gradient depth (64, 32)
      const v6 = { whole: { depth: false, rows: true, cols: false } };
      const stagings: SubgroupStaging[] = [ELEMENT_STAGING, { left: 'vec4', right: 'vec4' }, { left: 'vec4', right: 'element' }, { left: 'element', right: 'vec4' },
        { left: 'vec4', right: 'vec4', v6 }, { left: 'vec4', right: 'vec4', registerPrefetch: true },
        { left: 'vec4', right: 'element', registerPrefetch: true, v6 }];
      // 16-byte runs of a packed weight along k, whole blocks or not
      for (const staging of [{ left: 'vec4', right: 'vec8' }, { left: 'vec4', right: 'vec8', v6: { whole: { depth: true, rows: true, cols: true } } }] as const) {
        for (const spec of matMulSpecs.filter(s => s.packedWeight !== undefined && s.kContiguous)) {
          for (const rows of [128, 64, 32] as const) {
            const program = new SubgroupMatrixMatMulProgram(256, 96, spec, subgroupSize, staging, rows);
            expect(program.shaderKey).to.contain('_vw');
            expect(auditSubgroupControlFlow(program.getUserCode()), program.shaderKey).to.deep.equal([]);
          }
        }
      }
      for (const staging of stagings) {
        for (const spec of matMulSpecs) {
          for (const rows of [128, 64, 32] as const) {
            const program = new SubgroupMatrixMatMulProgram(256, 96, spec, subgroupSize, staging, rows);
            expect(auditSubgroupControlFlow(program.getUserCode()), program.shaderKey).to.deep.equal([]);
          }
        }
        for (const spec of gradSpecs) {
          for (const depth of [64, 32] as const) {
            const program = new SubgroupMatrixWeightGradProgram([4, 96, 64], 4, 96, 64, spec, subgroupSize, staging, depth);
            expect(auditSubgroupControlFlow(program.getUserCode()), program.shaderKey).to.deep.equal([]);
          }
        }
      }
    });
  }

  it('the shader the device batch runs outside tfjs too (the stand-in preamble calls main from the entry point)', () => {
    const program = new SubgroupMatrixMatMulProgram(2048, 1536,
        { source: 'rows', hasBias: false, hasAddend: false, kContiguous: true, scaled: false }, 32);
    const code = packageProgramShader(program);
    expect(code).to.contain('main_();');
    expect(auditSubgroupControlFlow(code)).to.deep.equal([]);
  });

  it('the v7 variants the device batch tries (tools/webgpu_tc, not yet in the package): every one audits clean', () => {
    const small = { E: 2, M: 256, unused: 256, N: 256, K: 256, padding: true };
    for (const [id, options] of V7_STEPS) expect(auditSubgroupControlFlow(v7Variant(small, options).code), id).to.deep.equal([]);
  });

  it('finds the per-invocation loops of db64af4\'s programs (staging, the row sources, the epilogue\'s lanes)', () => {
    const headers = (code: string) => auditSubgroupControlFlow(code).map(f => `${f.kind}: ${f.at}`);
    const matmul = headers(OLD_MATMUL_ROWS);
    expect(new Set(matmul)).to.deep.equal(new Set([
      'loop: for (var m = lid; m < 128; m += 128)',
      'loop: for (var i = localIndex; i < 4096u; i += 128u)',
      'loop: for (var t = lane; t < 256u; t += 32u)',
    ]));
    // two staging loops per slab, one lane loop per result matrix (4×4)
    expect(matmul.length).to.equal(1 + 2 + 16);
    expect(headers(OLD_WEIGHT_GRAD_ROWS).length).to.equal(2 + 16);
  });

  it('finds a matrix operation or barrier under a per-invocation branch, its else, a loop or an exit', () => {
    const shader = (body: string) => `fn helper() -> f32 { return 1.0; }\nfn main() {\n  let lid = i32(localIndex);\n  ${body}\n}`;
    expect(auditSubgroupControlFlow(shader('if (lid == 0) { subgroupMatrixStore(&Ts, 0u, c, false, 16u); }'))).to.deep.equal([
      { kind: 'enclosed', fn: 'main', at: 'subgroupMatrixStore(&Ts, 0u, c, false, 16u)' },
    ]);
    // through a value computed from the invocation, and in the else of such a branch
    expect(auditSubgroupControlFlow(shader('let first = lid < 32; if (first) { x = 1; } else { workgroupBarrier(); }')))
      .to.deep.equal([{ kind: 'enclosed', fn: 'main', at: 'workgroupBarrier()' }]);
    expect(auditSubgroupControlFlow(shader('for (var i = lid; i < 64; i += 32) { x = 1; }\nworkgroupBarrier();'))).to.deep.equal([
      { kind: 'loop', fn: 'main', at: 'for (var i = lid; i < 64; i += 32)' },
    ]);
    expect(auditSubgroupControlFlow(shader('if (lid > 3) { return; }\nworkgroupBarrier();'))).to.deep.equal([
      { kind: 'exit', fn: 'main', at: 'return' },
    ]);
    // a value assigned under a per-invocation branch is per-invocation
    expect(auditSubgroupControlFlow(shader('var n = 4; if (lid == 0) { n = 8; }\nfor (var i = 0; i < n; i++) { workgroupBarrier(); }'))
      .map(f => f.kind)).to.deep.equal(['loop', 'enclosed']);
  });

  it('accepts what is uniform: workgroupUniformLoad, uniforms, a shadowed name, a guarded store without collective operations', () => {
    const code = `fn main() {
      let lid = i32(localIndex);
      if (lid == 0) { tileExpert = seg[0]; }
      let e = workgroupUniformLoad(&tileExpert);
      let kEnd = select(0, uniforms.inner, e >= 0);
      for (var k0 = 0; k0 < kEnd; k0 += 32) {
        for (var step = 0u; step < 8u; step++) { let kk = localIndex + step * 128u; if (kk < 100u) { As[kk] = 0.0; } }
        workgroupBarrier();
        for (var kk = 0u; kk < 32u; kk += 16u) { let a = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, kk, false, 32u); }
        workgroupBarrier();
      }
    }`;
    expect(auditSubgroupControlFlow(code)).to.deep.equal([]);
    // functions without collective operations are not audited (the row loaders' early returns)
    expect(auditSubgroupControlFlow('fn loadA(m : i32) -> f32 { if (m < 0) { return 0.0; } return 1.0; }')).to.deep.equal([]);
  });

  it('uniformStrideLoop: whole steps only', () => {
    expect(uniformStrideLoop('i', 'localIndex', 256, 64, 'x[i] = 0;')).to.contain('for (var step = 0u; step < 4u; step++)');
    expect(() => uniformStrideLoop('i', 'localIndex', 100, 64, '')).to.throw(
        'uniformStrideLoop: 100 items are not whole steps of 64 invocations');
  });
});
