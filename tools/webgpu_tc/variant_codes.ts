/**
 * The WGSL of the raw Dawn subgroup-matrix GEMM variants (tools/webgpu_tc/variants.ts runs them;
 * pure, so that spec/backends/webgpu/subgroup_matrix_emulator.spec.ts can emulate the staged
 * layouts without a GPU). Every staged variant takes its index math from
 * src/backends/webgpu/programs/subgroup_matrix_core.ts, the package programs' own.
 *
 * Problem: C_z = A_z·B_z for z < batch, A [batch, M, K], B [batch, K, N], C [batch, M, N], all
 * row-major, sizes compiled in; operands in f32 (A32, B32) and the same values in f16 (A16, B16,
 * and the vec4 views A16v, B16v of those buffers).
 */
import {
  aIndex, type Arith, bIndex, declareAccumulators, epilogueThroughSlots, MATRIX_EDGE, type MatrixAt, multiplySlab, partOrigin, type SlabLayout, slabSizes,
  stagedElementA, stagedElementB, stagedQuadA, stagedQuadB, subgroupCount, uniformStrideLoop, wgslU32,
} from '../../src/backends/webgpu/programs/subgroup_matrix_core.js';
import { rowLoadSnippet, weightLoadSnippet } from '../../src/backends/webgpu/programs/grouped_matmul_program.js';
import type {
  SubgroupMatrixMatMulProgram, SubgroupMatrixWeightGradProgram,
} from '../../src/backends/webgpu/programs/subgroup_matrix_program.js';
import { hoistEnableDirectives } from '../../src/backends/webgpu/tensor_cores.js';

export interface Problem { name: string; batch: number; M: number; N: number; K: number }

export interface Variant {
  name: string;
  threads: number;
  /** output block of one workgroup */
  blockRows: number;
  blockCols: number;
  code: string;
}

const HEADER = `enable f16;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
@group(0) @binding(0) var<storage, read> A32 : array<f32>;
@group(0) @binding(1) var<storage, read> B32 : array<f32>;
@group(0) @binding(2) var<storage, read> A16 : array<f16>;
@group(0) @binding(3) var<storage, read> B16 : array<f16>;
@group(0) @binding(4) var<storage, read_write> C : array<f32>;
@group(0) @binding(5) var<storage, read> A16v : array<vec4<f16>>;
@group(0) @binding(6) var<storage, read> B16v : array<vec4<f16>>;
`;
/** keeps every binding in the 'auto' layout (an unused one is dropped, and the bind group then fails) */
const TOUCH = 'if (wg.z > 100000u) { C[0] = A32[0] + B32[0] + f32(A16[0]) + f32(B16[0]) + f32(A16v[0].x) + f32(B16v[0].x); }';

/** WGSL: the batch's bases and the block's origin. */
function origins(p: Problem, rows: number, cols: number): string {
  return `let aBase = wg.z * ${p.M * p.K}u;
  let bBase = wg.z * ${p.K * p.N}u;
  let cBase = wg.z * ${p.M * p.N}u;
  let row0 = wg.y * ${rows}u;
  let col0 = wg.x * ${cols}u;`;
}

function storeC(p: Problem, tilesM: number, tilesN: number, row: string, col: string): string {
  const l: string[] = [];
  for (let i = 0; i < tilesM; i++) {
    for (let j = 0; j < tilesN; j++) {
      l.push(`subgroupMatrixStore(&C, cBase + (${row} + ${i * MATRIX_EDGE}u) * ${p.N}u + ${col} + ${j * MATRIX_EDGE}u, c${i}_${j}, false, ${p.N}u);`);
    }
  }
  return l.join('\n  ');
}

/**
 * Operands straight from f16 storage, no workgroup memory: subgroups sgRows × sgCols, each owning
 * tilesM × tilesN matrices (the probe's GEMM is 1 subgroup of 4×4). Neighbouring subgroups share
 * their rows and columns only through the caches.
 */
export function storageVariant(p: Problem, o: { sgRows: number; sgCols: number; tilesM: number; tilesN: number }): Variant {
  const layout: SlabLayout = { rows: o.sgRows * o.tilesM * 16, cols: o.sgCols * o.tilesN * 16, depth: 16,
    subgroupRows: o.sgRows, subgroupCols: o.sgCols, tilesM: o.tilesM, tilesN: o.tilesN, leftColMajor: false, pad: 0 };
  const threads = 32 * subgroupCount(layout);
  const { row, col } = partOrigin(wgslU32, layout, 'subgroup');
  const loads: string[] = [];
  for (let i = 0; i < o.tilesM; i++) {
    loads.push(`let a${i} = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&A16, aBase + (row0 + partRow + ${i * 16}u) * ${p.K}u + k, false, ${p.K}u);`);
  }
  for (let j = 0; j < o.tilesN; j++) {
    loads.push(`let b${j} = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&B16, bBase + k * ${p.N}u + col0 + partCol + ${j * 16}u, false, ${p.N}u);`);
  }
  for (let i = 0; i < o.tilesM; i++) for (let j = 0; j < o.tilesN; j++) loads.push(`c${i}_${j} = subgroupMatrixMultiplyAccumulate(a${i}, b${j}, c${i}_${j});`);
  return {
    name: `storage f16, ${subgroupCount(layout)} subgroup(s) of ${o.tilesM * 16}x${o.tilesN * 16}, ${layout.rows}x${layout.cols}`,
    threads, blockRows: layout.rows, blockCols: layout.cols, code: `${HEADER}
@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg : vec3<u32>, @builtin(local_invocation_index) lid : u32) {
  ${TOUCH}
  ${origins(p, layout.rows, layout.cols)}
  let subgroup = lid / 32u;
  let partRow = ${row};
  let partCol = ${col};
  ${declareAccumulators(layout)}
  for (var k = 0u; k < ${p.K}u; k += 16u) {
    ${loads.join('\n    ')}
  }
  ${storeC(p, o.tilesM, o.tilesN, 'row0 + partRow', 'col0 + partCol')}
}` };
}

export interface StagedOptions {
  layout: SlabLayout;
  /** the operands' storage: f32 (converted while staging, as the package's programs do) or f16 */
  from: 'f32' | 'f16';
  /** f16 staging reads vec4<f16> (4 halves per invocation and step) */
  vec4: boolean;
  /** each invocation loads its share of slab k+1 into registers while the matrices multiply slab k */
  prefetch: boolean;
}

/**
 * Workgroup staging with the package programs' index math (subgroup_matrix_core.ts): each step
 * stages a depth-deep slab of A (row-major) and B in workgroup memory as f16 and every subgroup
 * multiplies its part from there; results go straight to C.
 */
export function stagedVariant(p: Problem, o: StagedOptions): Variant {
  const l = o.layout;
  if (l.leftColMajor) throw new Error('stagedVariant: the GEMM stages A row-major');
  if ((o.vec4 || o.prefetch) && o.from !== 'f16') throw new Error('stagedVariant: vec4 and prefetch read f16 storage');
  const threads = 32 * subgroupCount(l);
  const x = wgslU32;
  const { row, col } = partOrigin(x, l, 'subgroup');
  const size = slabSizes(l);
  const width = o.vec4 ? 4 : 1;
  const countA = l.rows * l.depth / width;
  const countB = l.depth * l.cols / width;
  const a = stagedElementA(x, l, 'e');
  const b = stagedElementB(x, l, 'e', false);
  const aSource = (k0: string) => `aBase + (row0 + ${a.m}) * ${p.K}u + ${k0} + ${a.k}`;
  const bSource = (k0: string) => `bBase + (${k0} + ${b.k}) * ${p.N}u + col0 + ${b.n}`;
  const conv = (v: string) => (o.from === 'f32' ? `f16(${v})` : v);
  const src = o.from === 'f32' ? ['A32', 'B32'] : ['A16', 'B16'];
  /** writes value `v` (an f16, or a vec4<f16> of 4 consecutive elements) of element e to the slab */
  const put = (slab: string, index: string, v: string) => o.vec4
    ? `{ let d = ${index}; ${slab}[d] = ${v}.x; ${slab}[d + 1u] = ${v}.y; ${slab}[d + 2u] = ${v}.z; ${slab}[d + 3u] = ${v}.w; }`
    : `${slab}[${index}] = ${v};`;
  const read = (which: 0 | 1, at: string) => o.vec4 ? `${src[which]}v[(${at}) / 4u]` : conv(`${src[which]}[${at}]`);
  let body: string;
  if (!o.prefetch) {
    const loop = (count: number, slab: string, which: 0 | 1, source: string, index: string) =>
      `for (var q = lid; q < ${count}u; q += ${threads}u) {
      let e = q * ${width}u;
      ${put(slab, index, read(which, source))}
    }`;
    body = `for (var k0 = 0u; k0 < ${p.K}u; k0 += ${l.depth}u) {
    ${loop(countA, 'As', 0, aSource('k0'), aIndex(x, l, a.m, a.k))}
    ${loop(countB, 'Bs', 1, bSource('k0'), bIndex(x, l, b.k, b.n))}
    workgroupBarrier();
    ${multiplySlab(l, 'partRow', 'partCol')}
    workgroupBarrier();
  }`;
  } else {
    if (countA % threads !== 0 || countB % threads !== 0) throw new Error('stagedVariant: prefetch needs whole shares');
    const regs = (n: number, r: string) => Array.from({ length: n }, (_, t) => `var ${r}${t} : ${o.vec4 ? 'vec4<f16>' : 'f16'};`).join(' ');
    const each = (n: number, f: (t: number) => string) => Array.from({ length: n }, (_, t) => `{ let e = (lid + ${t * threads}u) * ${width}u; ${f(t)} }`).join('\n    ');
    const nA = countA / threads;
    const nB = countB / threads;
    const fetch = (k0: string) => `${each(nA, t => `ra${t} = ${read(0, aSource(k0))};`)}
    ${each(nB, t => `rb${t} = ${read(1, bSource(k0))};`)}`;
    body = `${regs(nA, 'ra')}
  ${regs(nB, 'rb')}
  ${fetch('0u')}
  for (var k0 = 0u; k0 < ${p.K}u; k0 += ${l.depth}u) {
    ${each(nA, t => put('As', aIndex(x, l, a.m, a.k), `ra${t}`))}
    ${each(nB, t => put('Bs', bIndex(x, l, b.k, b.n), `rb${t}`))}
    workgroupBarrier();
    if (k0 + ${l.depth}u < ${p.K}u) {
      let next = k0 + ${l.depth}u;
      ${fetch('next')}
    }
    ${multiplySlab(l, 'partRow', 'partCol')}
    workgroupBarrier();
  }`;
  }
  const name = `staged ${o.from}->wg f16, ${subgroupCount(l)} subgroups of ${l.tilesM * 16}x${l.tilesN * 16}, ${l.rows}x${l.cols}, ` +
      `depth ${l.depth}${l.pad ? `, pad ${l.pad}` : ''}${o.vec4 ? ', vec4' : ''}${o.prefetch ? ', prefetch' : ''}`;
  return { name, threads, blockRows: l.rows, blockCols: l.cols, code: `${HEADER}
var<workgroup> As : array<f16, ${size.a}>;
var<workgroup> Bs : array<f16, ${size.b}>;
@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg : vec3<u32>, @builtin(local_invocation_index) lid : u32) {
  ${TOUCH}
  ${origins(p, l.rows, l.cols)}
  let subgroup = lid / 32u;
  let partRow = ${row};
  let partCol = ${col};
  ${declareAccumulators(l)}
  ${body}
  ${storeC(p, l.tilesM, l.tilesN, 'row0 + partRow', 'col0 + partCol')}
}` };
}

/**
 * A plain f32 GEMM (one invocation per element, no f16, no matrices) with the same bindings (the f16
 * buffers typed u32): the harness's dry run where subgroup matrices are missing (Mesa).
 */
export function plainVariant(p: Problem): Variant {
  return { name: 'plain f32 (harness dry run)', threads: 64, blockRows: 8, blockCols: 8, code: `
@group(0) @binding(0) var<storage, read> A32 : array<f32>;
@group(0) @binding(1) var<storage, read> B32 : array<f32>;
@group(0) @binding(2) var<storage, read> A16 : array<u32>;
@group(0) @binding(3) var<storage, read> B16 : array<u32>;
@group(0) @binding(4) var<storage, read_write> C : array<f32>;
@group(0) @binding(5) var<storage, read> A16v : array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> B16v : array<vec4<u32>>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg : vec3<u32>, @builtin(local_invocation_index) lid : u32) {
  if (wg.z > 100000u) { C[0] = A32[0] + B32[0] + f32(A16[0] + B16[0] + A16v[0].x + B16v[0].x); }
  ${origins(p, 8, 8)}
  let r = row0 + lid / 8u;
  let c = col0 + lid % 8u;
  var s = 0.0;
  for (var k = 0u; k < ${p.K}u; k++) { s += A32[aBase + r * ${p.K}u + k] * B32[bBase + k * ${p.N}u + c]; }
  C[cBase + r * ${p.N}u + c] = s;
}` };
}

/** A staged layout over A row-major (see SlabLayout). */
export function gemmLayout(o: { sgRows: number; sgCols: number; tilesM: number; tilesN: number; depth: number; pad: number }): SlabLayout {
  return { rows: o.sgRows * o.tilesM * 16, cols: o.sgCols * o.tilesN * 16, depth: o.depth, subgroupRows: o.sgRows,
    subgroupCols: o.sgCols, tilesM: o.tilesM, tilesN: o.tilesN, leftColMajor: false, pad: o.pad };
}

/**
 * The staged variants, most promising first (a GPU run stops at its time budget). The package's
 * programs use the last one's layout and f32 sources (4 subgroups of 64×64, depth 32, no pad).
 */
export function stagedVariants(): StagedOptions[] {
  const v = (sgRows: number, sgCols: number, tilesN: number, depth: number, pad: number, vec4: boolean, prefetch: boolean,
      from: 'f16' | 'f32' = 'f16'): StagedOptions =>
    ({ layout: gemmLayout({ sgRows, sgCols, tilesM: 4, tilesN, depth, pad }), from, vec4, prefetch });
  return [
    v(4, 2, 4, 32, 8, true, true),   // 8 subgroups, 256×128: each slab feeds twice the matrices
    v(2, 4, 4, 32, 8, true, true),   // 8 subgroups, 128×256
    v(2, 2, 4, 64, 8, true, true),   // half the barriers
    v(2, 2, 4, 32, 8, true, true),
    v(2, 2, 8, 32, 8, true, true),   // 4×8 accumulators: 256 f32 per lane, may spill
    v(2, 2, 4, 32, 8, true, false),
    v(2, 2, 4, 32, 0, false, false), // the verified pattern of the last run (14.0 TFLOP/s at 2048³)
    v(2, 2, 4, 32, 0, false, false, 'f32'), // the package programs' layout and conversion
  ];
}

/** The inputs packageProgramShader binds, and their WGSL element types. */
const PROGRAM_INPUTS: Record<string, string> = { A: 'f32', W: 'f32', L: 'f32', R: 'f32', seg: 'i32', pr: 'i32', amax: 'i32' };

/**
 * What tfjs-webgpu declares before a program's code, as far as the package's programs use it: the
 * private builtins its main() fills, the uniforms struct, the result binding, the inputs'
 * declarations (`inputs`, bindings 1..n) and the uniforms' binding after them.
 */
export function tfjsPreambleStandIn(uniforms: string, inputs: readonly string[]): string {
  return `var<private> localId : vec3<u32>;
var<private> localIndex : u32;
var<private> workgroupId : vec3<u32>;
var<private> numWorkgroups : vec3<u32>;
struct Uniforms { ${uniforms} };
@group(0) @binding(0) var<storage, read_write> result : array<f32>;
${inputs.join('\n')}
@group(0) @binding(${inputs.length + 1}) var<uniform> uniforms : Uniforms;`;
}

/** How packageProgramShader lays a program's code out. */
export interface PackageShaderOptions {
  /** the code to run instead of the program's own getUserCode() (db64af4's, tools/webgpu_tc/frozen/) */
  userCode?: string;
  /**
   * 'wrapper' (tfjs's layout): an entry point that sets the private ids and calls the program's
   * main(); 'inline': the program's main() is the entry point and the ids are its builtins
   * (shadowing the private ones), so the matrix operations sit in the entry point as in the
   * standalone variants that were exact on the H200.
   */
  entry: 'wrapper' | 'inline';
  /** W holds packed int32 words (a bf16/f16 or quantized weight), not f32 */
  packedW?: boolean;
  /** A holds f16 halves in int32 words (staging 'half8'), not f32 */
  packedA?: boolean;
}

/**
 * A subgroup-matrix program's shader outside tfjs: its code under a minimal stand-in of tfjs's
 * preamble (the private builtins, the uniforms struct, result at binding 0, the inputs in order,
 * then the uniforms), entry point `main`.
 */
export function packageProgramShader(program: SubgroupMatrixMatMulProgram | SubgroupMatrixWeightGradProgram,
    options: PackageShaderOptions = { entry: 'wrapper' }): string {
  const unbound = program.variableNames.filter(name => !(name in PROGRAM_INPUTS));
  if (unbound.length > 0) throw new Error(`packageProgramShader: no binding for input ${unbound.join(', ')}`);
  const userCode = options.userCode ?? program.getUserCode();
  if (!/\bfn main\(\) \{/.test(userCode)) throw new Error('packageProgramShader: the code has no fn main() {');
  // as tfjs declares them: vec4 (vec2 for packed words) where the program stages in quads
  const inputs = program.variableNames.map((name, i) => {
    const scalar = (name === 'W' && options.packedW) || (name === 'A' && options.packedA) ? 'i32' : PROGRAM_INPUTS[name];
    const n = program.variableComponents[i];
    return `@group(0) @binding(${i + 1}) var<storage, read> ${name} : array<${n === 1 ? scalar : `vec${n}<${scalar}>`}>;`;
  });
  const builtins = `@builtin(local_invocation_id) li3 : vec3<u32>, @builtin(local_invocation_index) li : u32,
    @builtin(workgroup_id) wg : vec3<u32>, @builtin(num_workgroups) nw : vec3<u32>`;
  const workgroupSize = `@compute @workgroup_size(${program.workgroupSize.join(', ')})`;
  const code = options.entry === 'inline'
    ? userCode.replace(/\bfn main\(\) \{/, `${workgroupSize}\nfn main(${builtins}) {
  let localId = li3;
  let localIndex = li;
  let workgroupId = wg;
  let numWorkgroups = nw;`)
    : `${userCode.replace(/\bfn main\(\)/, 'fn main_()')}
${workgroupSize}
fn main(${builtins}) {
  localId = li3;
  localIndex = li;
  workgroupId = wg;
  numWorkgroups = nw;
  main_();
}`;
  return hoistEnableDirectives(`
${tfjsPreambleStandIn(program.uniforms, inputs)}
${code}`);
}

/**
 * `code` with f16 as f32 and each subgroup-matrix builtin replaced by a plain function of its
 * array (one per array: WGSL has no overloads), so that a device without subgroup matrices (Mesa)
 * compiles and runs everything else: names, types, uniformity, bindings. The numbers are not a
 * product.
 */
export function standInMatrices(code: string): string {
  const arrays = new Set<string>();
  // a u32 of two halves read as vec2<f16> (v7's 16-byte loads): the same two values as f32
  const body = code.replace(/^\s*(enable|diagnostic)\b.*$/gm, '').replace(/bitcast<vec2<f16>>\(/g, 'unpack2x16float(').replace(/\bf16\b/g, 'f32')
    .replace(/subgroupMatrix(Load|Store)(?:<subgroup_matrix_(?:left|right)<f32, 16, 16>>)?\(&(\w+), /g, (_, op: string, name: string) => {
      arrays.add(name);
      return `sm${op}_${name}(`;
    })
    .replace(/subgroup_matrix_result<f32, 16, 16>\(\)/g, 'SM(0.0)')
    .replace(/subgroupMatrixMultiplyAccumulate\(/g, 'smMma(').replace(/subgroupMatrixScalarMultiply\(/g, 'smScale(');
  const writable = /var<(?:workgroup|storage, read_write)>\s*(\w+)/g;
  const canWrite = new Set([...body.matchAll(writable)].map(m => m[1]));
  const helpers = [...arrays].map(a => `
fn smLoad_${a}(offset : u32, colMajor : bool, stride : u32) -> SM { return SM(f32(${a}[offset + stride])); }
fn smStore_${a}(offset : u32, c : SM, colMajor : bool, stride : u32) { ${canWrite.has(a) ? `${a}[offset + stride] = c.v;` : ''} }`);
  return `struct SM { v : f32 }\nfn smMma(a : SM, b : SM, c : SM) -> SM { return SM(a.v * b.v + c.v); }\n` +
      `fn smScale(a : SM, s : f32) -> SM { return SM(a.v * s); }\n${body}\n${helpers.join('\n')}`;
}

// ---- variants v4: bisection from the exact GEMM towards the package programs ----------------

/**
 * What one bisection case adds to the exact GEMM's layout (4 subgroups of 64×64, 128×128 block,
 * depth 64, rows padded by 8 halves), each a piece of what the package programs do and the exact
 * GEMM does not:
 * - `slotEpilogue`: results through each subgroup's 16×16 f32 slot in workgroup memory, the lanes
 *   writing C (the programs' epilogueThroughSlots), instead of subgroupMatrixStore straight to C;
 * - `left`: A staged per element from f32 ('direct'), or through the package's row loader
 *   (rowLoadSnippet: a workgroup table of source rows, here the batch's rows reversed, 'rows'), or
 *   its SwiGLU on load from h [rows, 2K] ('act');
 * - `leftColMajor`: As holds A column-major (the weight gradients' layout);
 * - `weight`: B staged per element from B32 ('direct'), or through the package's weight loader
 *   (weightLoadSnippet) from f32 ('f32') or packed bf16 words ('bf16');
 * - `grouped`: the programs' grouped layout: every 8th row a padding row (source −1, result 0) and
 *   the last row block past the rows in use (its K loop bound 0 by workgroupUniformLoad);
 * - `runtimeK`: the K loop bound read from a buffer through workgroupUniformLoad (the programs'
 *   bound is a uniform), not a constant;
 * - `scalarFirst`: a 4-byte workgroup scalar declared (and used) before the slabs, as db64af4's
 *   programs had (tileExpert, segStart): the alignment suspect.
 * Bindings (6 storage buffers, within WebGPU's default 8 per stage): 0 A32, 1 B32, 2 C, 3 W (B32
 * again for 'f32', bf16 words for 'bf16'), 4 A (A32 again, or h for 'act'), 5 Dims (i32: K, then
 * the rows in use per batch).
 */
export interface BisectOptions {
  slotEpilogue?: boolean;
  left?: 'direct' | 'rows' | 'act';
  leftColMajor?: boolean;
  weight?: 'direct' | 'f32' | 'bf16';
  grouped?: boolean;
  runtimeK?: boolean;
  scalarFirst?: boolean;
}

/** The exact GEMM's layout (v2 staged, 97 TFLOP/s on the H100), As row- or column-major. */
export function exactLayout(leftColMajor = false): SlabLayout {
  return { ...gemmLayout({ sgRows: 2, sgCols: 2, tilesM: 4, tilesN: 4, depth: 64, pad: 8 }), leftColMajor };
}

/** Rows of a grouped bisection problem that are padding (source −1): every 8th. */
export const isPaddingRow = (row: number) => row % 8 === 7;

export function bisectVariant(p: Problem, o: BisectOptions): Variant {
  const l = exactLayout(o.leftColMajor);
  const threads = 32 * subgroupCount(l);
  const x = wgslU32;
  const { row, col } = partOrigin(x, l, 'subgroup');
  const size = slabSizes(l);
  const left = o.left ?? 'direct';
  const weight = o.weight ?? 'direct';
  const usesRowTable = left !== 'direct' || o.grouped === true;
  const a = stagedElementA(x, l, 'i');
  const b = stagedElementB(x, l, 'i', false);
  const rowSnippet = left === 'direct' ? '' : rowLoadSnippet(left, left === 'act' ? { kind: 'swiglu', interleaved: false } : undefined);
  const weightSnippet = weight === 'direct' ? undefined : weightLoadSnippet(weight === 'bf16' ? { kind: 'bf16', cols: p.N, layout: null } : undefined);
  // the row loader reads rowSrc[m] (a global row, −1 on padding): the batch's rows reversed ('rows',
  // 'act' reads its own row), padding and unused rows −1 when grouped
  const sourceRow = left === 'rows' ? `${p.M - 1}u - r` : 'r';
  const rowTable = !usesRowTable ? '' : uniformStrideLoop('m', 'lid', l.rows, threads, `{
      let r = row0 + m;
      let padding = ${o.grouped ? `r % 8u == 7u || r >= rowsInUse` : 'false'};
      rowSrc[m] = select(i32(wg.z * ${p.M}u + ${sourceRow}), -1, padding);
    }`);
  const aValue = left === 'direct'
    ? `select(0.0, A32[aBase + (row0 + mm) * ${p.K}u + min(kAt, ${p.K - 1}u)], kAt < kEnd)`
    : `select(0.0, loadA(i32(mm), i32(min(kAt, ${p.K - 1}u))), kAt < kEnd)`;
  const bValue = weight === 'direct'
    ? `select(0.0, B32[bBase + min(kAt, ${p.K - 1}u) * ${p.N}u + col0 + nn], kAt < kEnd)`
    : `select(0.0, loadW(i32(bBase${weight === 'bf16' ? ' / 2u' : ''}), i32(min(kAt, ${p.K - 1}u)), i32(col0 + nn)), kAt < kEnd)`;
  const loadW = weightSnippet === undefined ? '' : `${weightSnippet.fn}
fn loadW(wBase : i32, k : i32, n : i32) -> f32 {
  var v = 0.0;
  ${weightSnippet.assign}
  return v;
}`;
  const store = o.slotEpilogue
    ? epilogueThroughSlots(l, 'subgroup', 'lane', 32, 'partRow', 'partCol', (m, n, v) => `C[cBase + (row0 + ${m}) * ${p.N}u + col0 + ${n}] = ${v};`)
    : Array.from({ length: l.tilesM * l.tilesN }, (_, t) => {
      const i = Math.floor(t / l.tilesN), j = t % l.tilesN;
      return `subgroupMatrixStore(&C, cBase + (row0 + partRow + ${i * 16}u) * ${p.N}u + col0 + partCol + ${j * 16}u, c${i}_${j}, false, ${p.N}u);`;
    }).join('\n  ');
  const name = ['bisect: exact layout, f32 staged per element', o.slotEpilogue && 'slot epilogue', left !== 'direct' && `left via loadA '${left}'`,
    o.leftColMajor && 'As column-major', weight !== 'direct' && `weight loader ${weight}`, o.grouped && 'grouped rows', o.runtimeK && 'runtime K bound',
    o.scalarFirst && 'a 4-byte workgroup scalar first'].filter(Boolean).join(', ');
  return { name, threads, blockRows: l.rows, blockCols: l.cols, code: `enable f16;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
@group(0) @binding(0) var<storage, read> A32 : array<f32>;
@group(0) @binding(1) var<storage, read> B32 : array<f32>;
@group(0) @binding(2) var<storage, read_write> C : array<f32>;
@group(0) @binding(3) var<storage, read> W : array<${weight === 'bf16' ? 'i32' : 'f32'}>;
@group(0) @binding(4) var<storage, read> A : array<f32>;
@group(0) @binding(5) var<storage, read> Dims : array<i32>;
struct Uniforms { inner : i32, sN : i32, sK : i32 }
var<private> uniforms : Uniforms;
${o.scalarFirst ? 'var<workgroup> flag : i32;' : ''}
var<workgroup> As : array<f16, ${size.a}>;
var<workgroup> Bs : array<f16, ${size.b}>;
var<workgroup> Ts : array<f32, ${subgroupCount(l) * 256}>;
var<workgroup> rowSrc : array<i32, ${l.rows + 4}>;
${rowSnippet}
${loadW}
@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg : vec3<u32>, @builtin(local_invocation_index) lid : u32) {
  if (wg.z > 100000u) { C[0] = A32[0] + B32[0] + f32(W[0]) + A[0] + f32(Dims[0]) + Ts[0] + f32(rowSrc[0]); }
  uniforms = Uniforms(Dims[0], 1, ${p.N});
  ${origins(p, l.rows, l.cols)}
  let subgroup = lid / 32u;
  let lane = lid % 32u;
  let partRow = ${row};
  let partCol = ${col};
  let rowsInUse = u32(Dims[1]);
  ${rowTable}
  if (lid == 0u) {
    // the K loop's bound: a constant, or from the buffer (0 for a block past the rows in use)
    rowSrc[${l.rows}] = ${o.runtimeK || o.grouped ? `select(Dims[0], 0, ${o.grouped ? 'row0 >= rowsInUse' : 'false'})` : `${p.K}`};
    ${o.scalarFirst ? 'flag = 1;' : ''}
  }
  let bound = workgroupUniformLoad(&rowSrc[${l.rows}]);
  ${o.scalarFirst ? 'let one = workgroupUniformLoad(&flag);' : ''}
  let kEnd = ${o.runtimeK || o.grouped ? `u32(bound)${o.scalarFirst ? ' * u32(one)' : ''}` : `${p.K}u`};
  ${declareAccumulators(l)}
  for (var k0 = 0u; k0 < kEnd; k0 += ${l.depth}u) {
    ${uniformStrideLoop('i', 'lid', l.rows * l.depth, threads, `let mm = ${a.m}; let kk = ${a.k};
      let kAt = k0 + kk;
      As[${aIndex(x, l, 'mm', 'kk')}] = f16(${aValue});`)}
    ${uniformStrideLoop('i', 'lid', l.depth * l.cols, threads, `let kk = ${b.k}; let nn = ${b.n};
      let kAt = k0 + kk;
      Bs[${bIndex(x, l, 'kk', 'nn')}] = f16(${bValue});`)}
    workgroupBarrier();
    ${multiplySlab(l, 'partRow', 'partCol')}
    workgroupBarrier();
  }
  ${store}
}` };
}

// ---- variants v6: the speed bisection, from the exact GEMM to the package's MatMul ------------

/** A grouped product C[rows, N] = A[rows, K] · B_e for the rows of expert e (E experts of M rows each). */
export interface GroupedProblem { E: number; M: number; N: number; K: number }

/**
 * What one v6 case changes in the exact GEMM (v2 staged: 4 subgroups of 64×64, 128×128 block,
 * depth 64, rows padded by 8 halves, vec4<f16> reads, register prefetch, results stored straight
 * to C), each a construct of the package's SubgroupMatrixMatMulProgram that the exact GEMM lacks:
 * - `expertLookup`: one dispatch over all E·M rows, the block's expert read from a table through
 *   workgroupUniformLoad (the package's expertOfRow), instead of one z slice per expert;
 * - `rowTable`: each staged quad's source row read from a workgroup table (filled once per block,
 *   here each expert's rows reversed: a real gather) at every fetch;
 * - `aF32`: A read as vec4<f32> and converted to f16 at the fetch (the activations are f32);
 * - `b`: B as the exact GEMM has it ('f16-kn': [E, K, N], quads along n into consecutive halves) or
 *   as the package's weights are ('f16-nk', 'f32-nk', 'bf16-nk': [E, N, K], quads along k, each
 *   quad's 4 halves stored 4 slab rows apart; f32 converted, bf16 from vec2<u32> words);
 * - `bounds`: the package's edge handling on every quad (k and n clamped, row −1 and k past K
 *   zeroed by select), although the shape is whole blocks;
 * - `runtimeDims`: K, N and the strides from a uniform buffer instead of WGSL constants;
 * - `slotEpilogue`: results through each subgroup's 16×16 f32 slot and the lanes (2 barriers per
 *   result matrix), instead of subgroupMatrixStore straight to C;
 * - `workgroupExtra`: the package's extra workgroup memory (the 4 KiB of slots and the 528-byte row
 *   table: 39.5 KiB instead of 35), declared and touched but not used;
 * - `prefetch: false`: no register prefetch (stage, barrier, multiply).
 */
export interface GroupedGemmOptions {
  expertLookup?: boolean;
  rowTable?: boolean;
  aF32?: boolean;
  b?: 'f16-kn' | 'f16-nk' | 'f32-nk' | 'bf16-nk';
  bounds?: boolean;
  runtimeDims?: boolean;
  slotEpilogue?: boolean;
  workgroupExtra?: boolean;
  prefetch?: boolean;
}

/** i32 elements of the Info buffer before the row table: one expert per row block. */
export const groupedBlocks = (p: GroupedProblem) => p.E * p.M / 128;

/**
 * The source row of output row r in a v6 case with a row table: the rows of r's expert reversed.
 *
 * ```js
 * groupedSourceRow({ E: 2, M: 256, N: 128, K: 64 }, 0);   // 255
 * ```
 */
export function groupedSourceRow(p: GroupedProblem, r: number): number {
  const e = Math.floor(r / p.M);
  return e * p.M + (p.M - 1 - (r % p.M));
}

/**
 * A v6 case's shader. Bindings: 0 A32v (vec4<f32>), 1 A16v (vec4<f16>), 2 Bv (vec4 of f16 or f32,
 * or vec2<u32> of bf16 words), 3 C, 4 Info (i32: each row block's expert, then each row's source
 * row), 5 the uniform Dims { K, N, sN, sK, sE, rows } (elements). Dispatch: groupedGemmDispatch.
 */
export function groupedGemmVariant(p: GroupedProblem, o: GroupedGemmOptions): Variant {
  const l = exactLayout();
  const threads = 32 * subgroupCount(l);
  const x = wgslU32;
  const { row, col } = partOrigin(x, l, 'subgroup');
  const size = slabSizes(l);
  const b = o.b ?? 'f16-kn';
  const alongK = b !== 'f16-kn';
  const prefetch = o.prefetch ?? true;
  const rt = o.runtimeDims === true;
  if (p.M % l.rows !== 0 || p.N % l.cols !== 0 || p.K % l.depth !== 0) throw new Error('groupedGemmVariant: the problem must be whole blocks');
  const K = rt ? 'kDim' : `${p.K}u`;
  const N = rt ? 'nDim' : `${p.N}u`;
  // W_e(k, n) at e·sE + n·sN + k·sK (elements)
  const [sN, sK] = rt ? ['sN', 'sK'] : alongK ? [`${p.K}u`, '1u'] : ['1u', `${p.N}u`];
  const sE = rt ? 'sE' : `${p.K * p.N}u`;
  const bType = b === 'f32-nk' ? 'vec4<f32>' : b === 'bf16-nk' ? 'vec2<u32>' : 'vec4<f16>';
  const qa = stagedQuadA(x, l, 'q');
  const qb = stagedQuadB(x, l, 'q', alongK);
  const usesRowSrc = o.rowTable || o.expertLookup || o.workgroupExtra;
  const usesSlots = o.slotEpilogue || o.workgroupExtra;
  // A's quad: (row, k) → value; the row is the block's own, or the table's
  const aRow = o.rowTable ? 'rowSrc[mm]' : 'i32(rowBase + mm)';
  const aFetch = (k0: string) => {
    const kAt = `${k0} + kk`;
    const rowU = o.bounds ? `u32(max(${aRow}, 0))` : `u32(${aRow})`;
    const kU = o.bounds ? `min(${kAt}, ${K} - 4u)` : kAt;
    const at = `(${rowU} * ${K} + ${kU}) / 4u`;
    const v = o.aF32 ? `vec4<f16>(A32v[${at}])` : `A16v[${at}]`;
    return o.bounds ? `select(vec4<f16>(), ${v}, ${aRow} >= 0 && ${kAt} < ${K})` : v;
  };
  const bFetch = (k0: string) => {
    const kAt = `${k0} + kk`;
    const nAt = 'col0 + nn';
    const [kMax, nMax] = alongK ? [`${K} - 4u`, `${N} - 1u`] : [`${K} - 1u`, `${N} - 4u`];
    const kU = o.bounds ? `min(${kAt}, ${kMax})` : kAt;
    const nU = o.bounds ? `min(${nAt}, ${nMax})` : nAt;
    const element = `bBase + (${nU}) * ${sN} + (${kU}) * ${sK}`;
    const v = b === 'f16-kn' || b === 'f16-nk' ? `Bv[(${element}) / 4u]`
      : b === 'f32-nk' ? `vec4<f16>(Bv[(${element}) / 4u])`
      : `bf16Quad(Bv[(${element}) / 4u])`;
    return o.bounds ? `select(vec4<f16>(), ${v}, ${nAt} < ${N} && ${kAt} < ${K})` : v;
  };
  const nA = l.rows * l.depth / 4 / threads;
  const nB = l.depth * l.cols / 4 / threads;
  const each = (n: number, f: (t: number) => string) =>
    Array.from({ length: n }, (_, t) => `{ let q = lid + ${t * threads}u; ${f(t)} }`).join('\n    ');
  const put = (slab: string, at: string, step: number, v: string) =>
    `{ let d = ${at}; ${slab}[d] = ${v}.x; ${slab}[d + ${step}u] = ${v}.y; ${slab}[d + ${2 * step}u] = ${v}.z; ${slab}[d + ${3 * step}u] = ${v}.w; }`;
  const fetchA = (k0: string) => each(nA, t => `let mm = ${qa.m}; let kk = ${qa.k}; ra${t} = ${aFetch(k0)};`);
  const fetchB = (k0: string) => each(nB, t => `let kk = ${qb.k}; let nn = ${qb.n}; rb${t} = ${bFetch(k0)};`);
  const storeA = each(nA, t => put('As', qa.at, qa.step, `ra${t}`));
  const storeB = each(nB, t => put('Bs', qb.at, qb.step, `rb${t}`));
  const regs = `${Array.from({ length: nA }, (_, t) => `var ra${t} : vec4<f16>;`).join(' ')}
  ${Array.from({ length: nB }, (_, t) => `var rb${t} : vec4<f16>;`).join(' ')}`;
  const loop = prefetch
    ? `${regs}
  ${fetchA('0u')}
  ${fetchB('0u')}
  for (var k0 = 0u; k0 < ${K}; k0 += ${l.depth}u) {
    ${storeA}
    ${storeB}
    workgroupBarrier();
    if (k0 + ${l.depth}u < ${K}) {
      let next = k0 + ${l.depth}u;
      ${fetchA('next')}
      ${fetchB('next')}
    }
    ${multiplySlab(l, 'partRow', 'partCol')}
    workgroupBarrier();
  }`
    : `${regs}
  for (var k0 = 0u; k0 < ${K}; k0 += ${l.depth}u) {
    ${fetchA('k0')}
    ${fetchB('k0')}
    ${storeA}
    ${storeB}
    workgroupBarrier();
    ${multiplySlab(l, 'partRow', 'partCol')}
    workgroupBarrier();
  }`;
  const store = o.slotEpilogue
    ? epilogueThroughSlots(l, 'subgroup', 'lane', 32, 'partRow', 'partCol', (m, n, v) => o.bounds
      ? `{ let r = rowBase + ${m}; let c = col0 + ${n}; if (r < rowsDim && c < ${N}) { C[r * ${N} + c] = select(0.0, ${v}, e >= 0); } }`
      : `C[(rowBase + ${m}) * ${N} + col0 + ${n}] = ${v};`)
    : Array.from({ length: l.tilesM * l.tilesN }, (_, t) => {
      const i = Math.floor(t / l.tilesN), j = t % l.tilesN;
      return `subgroupMatrixStore(&C, (rowBase + partRow + ${i * 16}u) * ${N} + col0 + partCol + ${j * 16}u, c${i}_${j}, false, ${N});`;
    }).join('\n  ');
  const blocks = groupedBlocks(p);
  const expert = o.expertLookup
    ? `if (lid == 0u) { rowSrc[128] = Info[wg.y]; }
  let e = workgroupUniformLoad(&rowSrc[128]);`
    : 'let e = i32(wg.z);';
  // the block's first row among all E·M rows
  const rowBase = o.expertLookup ? `wg.y * ${l.rows}u` : `wg.z * ${p.M}u + wg.y * ${l.rows}u`;
  const fillRows = o.rowTable
    ? `${uniformStrideLoop('m', 'lid', l.rows, threads, `rowSrc[m] = Info[${blocks}u + rowBase + m];`)}
  workgroupBarrier();`
    : '';
  const name = ['v6 grouped: exact GEMM', o.expertLookup && 'expert by lookup', o.rowTable && 'row table per fetch', o.aF32 && 'A from f32',
    b !== 'f16-kn' && `B ${b}`, o.bounds && 'bounds on every quad', rt && 'runtime dims', o.slotEpilogue && 'slot epilogue',
    o.workgroupExtra && '39.5 KiB workgroup memory', !prefetch && 'no prefetch'].filter(Boolean).join(', ');
  return { name, threads, blockRows: l.rows, blockCols: l.cols, code: `enable f16;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
@group(0) @binding(0) var<storage, read> A32v : array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> A16v : array<vec4<f16>>;
@group(0) @binding(2) var<storage, read> Bv : array<${bType}>;
@group(0) @binding(3) var<storage, read_write> C : array<f32>;
@group(0) @binding(4) var<storage, read> Info : array<i32>;
struct Dims { K : i32, N : i32, sN : i32, sK : i32, sE : i32, rows : i32 }
@group(0) @binding(5) var<uniform> dims : Dims;
var<workgroup> As : array<f16, ${size.a}>;
var<workgroup> Bs : array<f16, ${size.b}>;
${usesSlots ? `var<workgroup> Ts : array<f32, ${subgroupCount(l) * 256}>;` : ''}
${usesRowSrc ? `var<workgroup> rowSrc : array<i32, ${l.rows + 4}>;` : ''}
${b === 'bf16-nk' ? `fn bf16Quad(w : vec2<u32>) -> vec4<f16> {
  return vec4<f16>(vec4<f32>(bitcast<f32>(w.x << 16u), bitcast<f32>(w.x & 0xffff0000u), bitcast<f32>(w.y << 16u), bitcast<f32>(w.y & 0xffff0000u)));
}` : ''}
@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg : vec3<u32>, @builtin(local_invocation_index) lid : u32) {
  if (wg.z > 100000u) { C[0] = A32v[0].x + f32(A16v[0].x) + f32(Bv[0].x) + f32(Info[0]) + f32(dims.rows)${usesSlots ? ' + Ts[0]' : ''}${usesRowSrc ? ' + f32(rowSrc[0])' : ''}; }
  let kDim = u32(dims.K);
  let nDim = u32(dims.N);
  let sN = u32(dims.sN);
  let sK = u32(dims.sK);
  let sE = u32(dims.sE);
  let rowsDim = u32(dims.rows);
  let subgroup = lid / 32u;
  let lane = lid % 32u;
  let partRow = ${row};
  let partCol = ${col};
  let col0 = wg.x * ${l.cols}u;
  let rowBase = ${rowBase};
  ${expert}
  let bBase = u32(e) * ${sE};
  ${fillRows}
  ${declareAccumulators(l)}
  ${loop}
  ${store}
}` };
}

/** Workgroups of a v6 case: one per 128×128 block, per expert on z unless the expert is looked up. */
export function groupedGemmDispatch(p: GroupedProblem, o: GroupedGemmOptions): [number, number, number] {
  return o.expertLookup ? [p.N / 128, p.E * p.M / 128, 1] : [p.N / 128, p.M / 128, p.E];
}

/**
 * The v6 bisection's cases at Q's up shape, in the order they run: the exact GEMM on the grouped
 * problem, then each construct of the package's MatMul alone, then all of the MatMul's together
 * (`v6-z-package-like`, what v5's program does; compare with pkg-matmul-q-v5).
 */
export const V6_STEPS: ReadonlyArray<readonly [string, GroupedGemmOptions]> = [
  ['v6-0-exact-grouped', {}],
  ['v6-a-expert-lookup', { expertLookup: true }],
  ['v6-b-row-table', { rowTable: true }],
  ['v6-c-a-from-f32', { aF32: true }],
  ['v6-d-b-nk', { b: 'f16-nk' }],
  ['v6-d-b-f32-nk', { b: 'f32-nk' }],
  ['v6-d-b-bf16-nk', { b: 'bf16-nk' }],
  ['v6-e-slot-epilogue', { slotEpilogue: true }],
  ['v6-f-workgroup-39k', { workgroupExtra: true }],
  ['v6-g-no-prefetch', { prefetch: false }],
  ['v6-h-bounds', { bounds: true }],
  ['v6-i-runtime-dims', { runtimeDims: true }],
  ['v6-z-package-like', { expertLookup: true, rowTable: true, aF32: true, b: 'f32-nk', bounds: true, runtimeDims: true, slotEpilogue: true }],
];

// ---- variants v7: faster grouped products (after run N) -------------------------------------

/**
 * A v7 grouped problem, the package MatMul's semantics: C[rows, N] = A[src(r), :] · W_eᵀ for the
 * rows r of expert e's blocks, W [E, N, K] (k contiguous, as the package's expert weights), E
 * experts of M rows each, then `unused` rows in a block of no expert (−1: K bound 0, result 0).
 * `padding`: every 8th row of an expert is a padding row (source −1, result 0); the other rows
 * gather their expert's rows reversed (groupedSourceRow).
 */
export interface V7Problem { E: number; M: number; unused: number; N: number; K: number; padding: boolean }

/**
 * What a v7 variant does. Every variant keeps what the package's v6 MatMul needs in a port: one
 * dispatch over all rows with the block's expert looked up (workgroupUniformLoad), gathered rows
 * through a per-block table of vector offsets (−1 → staged 0), K, N and the expert stride as
 * uniforms, blocks of no expert, results stored straight to C. Each subgroup owns 4×4 result
 * matrices (64×64: 128 f32 accumulator registers a lane; v2's 4×8 spilled).
 * The f16 16×16×16 config (f32 results) stays: of Dawn's configs on the H100 (f16 at 16×16×16,
 * 16×8×16, 16×8×8; no bf16) it ran 74 TFLOP/s in the probe against 17 and 13 (docs/webgpu.md);
 * only the staging around it changes here.
 */
export interface V7Options {
  /** subgroups along the block's rows and columns: 2×2 (128×128, as v6), 4×2 (256×128), 2×4 (128×256) */
  sgRows: number;
  sgCols: number;
  /**
   * result matrices of a subgroup along rows and columns (default 4×4: 64×64, 128 accumulator
   * registers a lane); 2×4 (32×64) halves them, for more subgroups on an SM at the same block
   */
  tilesM?: number;
  tilesN?: number;
  /** slab depth: 64 (v6) or 32 (half the workgroup memory per buffer: room for two buffers or 8 subgroups) */
  depth: 32 | 64;
  /**
   * 'prefetch' (v6): slab k+1 fetched into registers while slab k multiplies, 2 barriers a slab;
   * 'direct': fetch, store, barrier, multiply, barrier (no registers live across the products:
   * v6-g-no-prefetch ran 152.7 TFLOP/s against v6-0's 21.1 in run N);
   * 'double': two slab buffers, slab k+1 staged (fetch and store) into the other buffer before slab k
   * multiplies, one barrier a slab; 'double-prefetch': two buffers, slab k+1 fetched into registers
   * before slab k's products and stored after them, one barrier a slab.
   */
  staging: 'prefetch' | 'direct' | 'double' | 'double-prefetch';
  /** A in global memory: f32 (the activations as tfjs holds them, converted at the fetch) or f16 (a conversion pass before) */
  a: 'f32' | 'f16';
  /** W in global memory: f32, f16 (converted before) or packed bf16 words (the bf16-stored experts) */
  b: 'f32' | 'f16' | 'bf16';
  /** elements per global load of the 16-bit operands: 4 (8 bytes, v6) or 8 (16 bytes, vec4<u32>); f32 loads are vec4<f32> (16 bytes) */
  width: 4 | 8;
  /**
   * Bs column-major ([cols][depth + pad], k contiguous as W is): a run of k-consecutive weights goes
   * to consecutive halves (stores the compiler can merge), where v6's row-major Bs puts its 4
   * elements 4 slab rows apart (4 separate 16-bit stores).
   */
  bColMajor: boolean;
}

/** A v7 variant's slab geometry (f16 elements). */
export interface V7Layout {
  rows: number;
  cols: number;
  depth: number;
  subgroupRows: number;
  subgroupCols: number;
  tilesM: number;
  tilesN: number;
  /** As row-major: (m, k) at m·strideA + k */
  strideA: number;
  /** Bs column-major: (k, n) at n·strideB + k; row-major: at k·strideB + n */
  strideB: number;
  bColMajor: boolean;
  /** elements per fetch of A and of B */
  widthA: number;
  widthB: number;
  /** halves per buffer of As and Bs; `buffers` of each */
  sizeA: number;
  sizeB: number;
  buffers: number;
}

/** Halves added to every slab row: rows 144 or 80 bytes apart put 8 consecutive rows' 16-byte chunks on distinct banks. */
const V7_PAD = 8;

export function v7Layout(o: V7Options): V7Layout {
  const tilesM = o.tilesM ?? 4, tilesN = o.tilesN ?? 4;
  const rows = o.sgRows * tilesM * MATRIX_EDGE, cols = o.sgCols * tilesN * MATRIX_EDGE;
  const strideA = o.depth + V7_PAD;
  const strideB = o.bColMajor ? o.depth + V7_PAD : cols + V7_PAD;
  return { rows, cols, depth: o.depth, subgroupRows: o.sgRows, subgroupCols: o.sgCols, tilesM, tilesN, strideA, strideB, bColMajor: o.bColMajor,
    widthA: o.a === 'f32' ? 4 : o.width, widthB: o.b === 'f32' ? 4 : o.width,
    sizeA: rows * strideA, sizeB: o.bColMajor ? cols * strideB : o.depth * strideB,
    buffers: o.staging.startsWith('double') ? 2 : 1 };
}

/** Workgroup bytes of a v7 variant: the slabs (f16) and the row table (rows + 4 i32). */
export function v7WorkgroupBytes(l: V7Layout): number {
  return 2 * l.buffers * (l.sizeA + l.sizeB) + 4 * (l.rows + 4);
}

/**
 * Run q of A's slab (q = lid, lid + threads, ...): widthA k-consecutive elements of slab row m from
 * depth k, stored at As's `at` + c (c < widthA). Consecutive runs walk a row's k first: a subgroup
 * reads whole rows of contiguous bytes.
 */
export function v7RunA<T>(x: Arith<T>, l: V7Layout, q: T): { m: T; k: T; at: T } {
  const perRow = l.depth / l.widthA;
  const m = x.div(q, x.lit(perRow));
  const k = x.mul(x.mod(q, x.lit(perRow)), x.lit(l.widthA));
  return { m, k, at: x.add(x.mul(m, x.lit(l.strideA)), k) };
}

/**
 * Run q of B's slab: widthB k-consecutive weights of output column n from depth k, stored at Bs's
 * `at` + c·`step`. Column-major Bs: consecutive halves (step 1), runs walking a column's k first;
 * row-major Bs (v6's order, stagedQuadB generalized to the width): 8 columns at one depth, then
 * the next depth, each element a slab row (step strideB) apart.
 */
export function v7RunB<T>(x: Arith<T>, l: V7Layout, q: T): { n: T; k: T; at: T; step: number } {
  const perColumn = l.depth / l.widthB;
  if (l.bColMajor) {
    const n = x.div(q, x.lit(perColumn));
    const k = x.mul(x.mod(q, x.lit(perColumn)), x.lit(l.widthB));
    return { n, k, at: x.add(x.mul(n, x.lit(l.strideB)), k), step: 1 };
  }
  const k = x.mul(x.mod(x.div(q, x.lit(8)), x.lit(perColumn)), x.lit(l.widthB));
  const n = x.add(x.mod(q, x.lit(8)), x.mul(x.div(q, x.lit(8 * perColumn)), x.lit(8)));
  return { n, k, at: x.add(x.mul(k, x.lit(l.strideB)), n), step: l.strideB };
}

/** Left matrix i of the part at partRow, slab depth kk (As row-major), in the buffer at `base`. */
export function v7LeftTile<T>(x: Arith<T>, l: V7Layout, base: T, partRow: T, kk: T, i: number): MatrixAt<T> {
  return { offset: x.add(base, x.add(x.mul(x.add(partRow, x.lit(MATRIX_EDGE * i)), x.lit(l.strideA)), kk)), colMajor: false, stride: l.strideA };
}

/** Right matrix j of the part at partCol, slab depth kk: element (k, n) at n·strideB + k column-major. */
export function v7RightTile<T>(x: Arith<T>, l: V7Layout, base: T, partCol: T, kk: T, j: number): MatrixAt<T> {
  const n = x.add(partCol, x.lit(MATRIX_EDGE * j));
  return l.bColMajor
    ? { offset: x.add(base, x.add(x.mul(n, x.lit(l.strideB)), kk)), colMajor: true, stride: l.strideB }
    : { offset: x.add(base, x.add(x.mul(kk, x.lit(l.strideB)), n)), colMajor: false, stride: l.strideB };
}

/** Row blocks of a v7 problem for a block of `rows` rows (the Info buffer's first entries: each block's expert). */
export const v7Blocks = (p: V7Problem, rows: number) => (p.E * p.M + p.unused) / rows;

/**
 * The source row of row r in a v7 problem (−1: padding or no expert): its expert's rows reversed.
 *
 * ```js
 * v7SourceRow({ E: 2, M: 256, unused: 256, N: 256, K: 256, padding: true }, 0);   // 255
 * v7SourceRow({ E: 2, M: 256, unused: 256, N: 256, K: 256, padding: true }, 7);   // -1
 * ```
 */
export function v7SourceRow(p: V7Problem, r: number): number {
  if (r >= p.E * p.M || (p.padding && r % 8 === 7)) return -1;
  const e = Math.floor(r / p.M);
  return e * p.M + (p.M - 1 - (r % p.M));
}

/** The WGSL array type of an operand's loads. */
function v7ArrayType(format: 'f32' | 'f16' | 'bf16', width: number): string {
  if (format === 'f32') return 'vec4<f32>';
  if (width === 8) return 'vec4<u32>';
  return format === 'f16' ? 'vec4<f16>' : 'vec2<u32>';
}

/** WGSL: the width / 4 vec4<f16> quads of a loaded value `v`. */
function v7Quads(format: 'f32' | 'f16' | 'bf16', width: number, v: string): string[] {
  if (format === 'f32') return [`vec4<f16>(${v})`];
  if (format === 'f16') {
    return width === 4 ? [v] : [`vec4<f16>(bitcast<vec2<f16>>(${v}.x), bitcast<vec2<f16>>(${v}.y))`,
      `vec4<f16>(bitcast<vec2<f16>>(${v}.z), bitcast<vec2<f16>>(${v}.w))`];
  }
  return width === 4 ? [`bf16Quad(${v})`] : [`bf16Quad(${v}.xy)`, `bf16Quad(${v}.zw)`];
}

const V7_COMPONENTS = ['x', 'y', 'z', 'w'];

/**
 * A v7 variant's shader on `p`. Bindings: 0 A (the rows, K long, in the option's format), 1 W
 * ([E, N, K]), 2 C [rows, N] f32, 3 Info (i32: each row block's expert, −1 for none, then each
 * row's source row, −1 for padding), 4 the uniform Dims { K, N, sE (elements) }. Dispatch:
 * v7Dispatch. Sizes other than the block's (rows, cols, depth) are uniforms, as in the package.
 */
export function v7Variant(p: V7Problem, o: V7Options): Variant {
  const l = v7Layout(o);
  const threads = 32 * l.subgroupRows * l.subgroupCols;
  const x = wgslU32;
  if ((p.E * p.M) % l.rows !== 0 || p.unused % l.rows !== 0 || p.N % l.cols !== 0 || p.K % l.depth !== 0) {
    throw new Error(`v7Variant: ${p.E}×${p.M} rows (+${p.unused}), N ${p.N}, K ${p.K} are not whole ${l.rows}×${l.cols}×${l.depth} blocks`);
  }
  const runsA = l.rows * l.depth / l.widthA / threads;
  const runsB = l.cols * l.depth / l.widthB / threads;
  if (!Number.isInteger(runsA) || !Number.isInteger(runsB)) throw new Error('v7Variant: the slabs are not whole runs per invocation');
  const layoutOf = { rows: l.rows, cols: l.cols, depth: l.depth, subgroupRows: l.subgroupRows, subgroupCols: l.subgroupCols,
    tilesM: l.tilesM, tilesN: l.tilesN, leftColMajor: false, pad: V7_PAD };
  const { row, col } = partOrigin(x, layoutOf, 'subgroup');
  const quadsA = l.widthA / 4, quadsB = l.widthB / 4;
  const ra = (t: number, h: number) => `ra${t}_${h}`;
  const rb = (t: number, h: number) => `rb${t}_${h}`;
  const each = (n: number, f: (t: number) => string) =>
    Array.from({ length: n }, (_, t) => `{ let q = lid + ${t * threads}u; ${f(t)} }`).join('\n    ');
  const fetchA = (k0: string) => each(runsA, t => {
    const r = v7RunA(x, l, 'q');
    const quads = v7Quads(o.a, l.widthA, 'v');
    return `let base = rowSrc[${r.m}]; let v = A[u32(max(base, 0)) + (${k0} + ${r.k}) / ${l.widthA}u];
      ${quads.map((value, h) => `${ra(t, h)} = select(vec4<f16>(), ${value}, base >= 0);`).join(' ')}`;
  });
  const fetchB = (k0: string) => each(runsB, t => {
    const r = v7RunB(x, l, 'q');
    const quads = v7Quads(o.b, l.widthB, 'v');
    return `let v = B[(bBase + (col0 + ${r.n}) * kDim + ${k0} + ${r.k}) / ${l.widthB}u];
      ${quads.map((value, h) => `${rb(t, h)} = ${value};`).join(' ')}`;
  });
  /** the buffer's first half in a slab array of `size` halves a buffer ('0u': the only or the first buffer) */
  const bufferBase = (buffer: string, size: number) => (buffer === '0u' ? '0u' : x.mul(buffer, `${size}u`));
  const put = (slab: string, at: string, step: number, quads: number, reg: (h: number) => string) => `let d = ${at}; ` +
    Array.from({ length: quads * 4 }, (_, c) => `${slab}[d + ${c * step}u] = ${reg(Math.floor(c / 4))}.${V7_COMPONENTS[c % 4]};`).join(' ');
  const storeA = (buffer: string) => each(runsA, t =>
    put('As', x.add(bufferBase(buffer, l.sizeA), v7RunA(x, l, 'q').at), 1, quadsA, h => ra(t, h)));
  const storeB = (buffer: string) => each(runsB, t => {
    const r = v7RunB(x, l, 'q');
    return put('Bs', x.add(bufferBase(buffer, l.sizeB), r.at), r.step, quadsB, h => rb(t, h));
  });
  const regs = [...Array.from({ length: runsA * quadsA }, (_, i) => `var ${ra(Math.floor(i / quadsA), i % quadsA)} : vec4<f16>;`),
    ...Array.from({ length: runsB * quadsB }, (_, i) => `var ${rb(Math.floor(i / quadsB), i % quadsB)} : vec4<f16>;`)].join(' ');
  const multiply = (buffer: string) => {
    const lines: string[] = [];
    const baseA = bufferBase(buffer, l.sizeA);
    const baseB = bufferBase(buffer, l.sizeB);
    for (let kk = 0; kk < l.depth; kk += MATRIX_EDGE) {
      for (let i = 0; i < l.tilesM; i++) {
        const at = v7LeftTile(x, l, baseA, 'partRow', x.lit(kk), i);
        lines.push(`let a${kk}_${i} = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, ${at.offset}, false, ${at.stride}u);`);
      }
      for (let j = 0; j < l.tilesN; j++) {
        const at = v7RightTile(x, l, baseB, 'partCol', x.lit(kk), j);
        lines.push(`let b${kk}_${j} = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ${at.offset}, ${at.colMajor}, ${at.stride}u);`);
      }
      for (let i = 0; i < l.tilesM; i++) for (let j = 0; j < l.tilesN; j++) lines.push(`c${i}_${j} = subgroupMatrixMultiplyAccumulate(a${kk}_${i}, b${kk}_${j}, c${i}_${j});`);
    }
    return `{\n    ${lines.join('\n    ')}\n    }`;
  };
  const D = `${l.depth}u`;
  let loop: string;
  if (o.staging === 'prefetch') {
    loop = `if (kEnd > 0u) {
    ${fetchA('0u')}
    ${fetchB('0u')}
  }
  for (var k0 = 0u; k0 < kEnd; k0 += ${D}) {
    ${storeA('0u')}
    ${storeB('0u')}
    workgroupBarrier();
    if (k0 + ${D} < kEnd) {
      let next = k0 + ${D};
      ${fetchA('next')}
      ${fetchB('next')}
    }
    ${multiply('0u')}
    workgroupBarrier();
  }`;
  } else if (o.staging === 'direct') {
    loop = `for (var k0 = 0u; k0 < kEnd; k0 += ${D}) {
    ${fetchA('k0')}
    ${fetchB('k0')}
    ${storeA('0u')}
    ${storeB('0u')}
    workgroupBarrier();
    ${multiply('0u')}
    workgroupBarrier();
  }`;
  } else {
    // buffer (k0 / depth) % 2 holds slab k0; the other was last read before the previous barrier
    const stageNext = o.staging === 'double'
      ? { before: `${fetchA('next')}\n      ${fetchB('next')}\n      ${storeA('other')}\n      ${storeB('other')}`, after: '' }
      : { before: `${fetchA('next')}\n      ${fetchB('next')}`, after: `${storeA('other')}\n      ${storeB('other')}` };
    loop = `if (kEnd > 0u) {
    ${fetchA('0u')}
    ${fetchB('0u')}
    ${storeA('0u')}
    ${storeB('0u')}
  }
  workgroupBarrier();
  for (var k0 = 0u; k0 < kEnd; k0 += ${D}) {
    let current = (k0 / ${D}) % 2u;
    let other = 1u - current;
    let more = k0 + ${D} < kEnd;
    let next = k0 + ${D};
    if (more) {
      ${stageNext.before}
    }
    ${multiply('current')}
    ${stageNext.after ? `if (more) {\n      ${stageNext.after}\n    }` : ''}
    workgroupBarrier();
  }`;
  }
  const stores = Array.from({ length: l.tilesM * l.tilesN }, (_, t) => {
    const i = Math.floor(t / l.tilesN), j = t % l.tilesN;
    return `subgroupMatrixStore(&C, (rowBase + partRow + ${i * 16}u) * nDim + col0 + partCol + ${j * 16}u, c${i}_${j}, false, nDim);`;
  }).join('\n  ');
  const fillRow = `let src = Info[${v7Blocks(p, l.rows)}u + rowBase + m];
            rowSrc[m] = select(-1, src * i32(kDim / ${l.widthA}u), src >= 0);`;
  // 128×256 blocks: fewer rows than invocations (no matrix builtin in between: the guard needs no uniform steps)
  const fillRows = l.rows >= threads ? uniformStrideLoop('m', 'lid', l.rows, threads, fillRow) : `if (lid < ${l.rows}u) { let m = lid; ${fillRow} }`;
  const usesBf16 = o.b === 'bf16';
  const name = `v7: ${l.subgroupRows * l.subgroupCols} subgroups${l.tilesM * l.tilesN !== 16 ? ` of ${l.tilesM * 16}x${l.tilesN * 16}` : ''}, ${l.rows}x${l.cols}, depth ${l.depth}, ${o.staging}, A ${o.a}, W ${o.b}` +
    `${o.a !== 'f32' || o.b !== 'f32' ? ` x${o.width}` : ''}, Bs ${l.bColMajor ? 'column' : 'row'}-major, ${(v7WorkgroupBytes(l) / 1024).toFixed(1)} KiB`;
  return { name, threads, blockRows: l.rows, blockCols: l.cols, code: `enable f16;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
@group(0) @binding(0) var<storage, read> A : array<${v7ArrayType(o.a, l.widthA)}>;
@group(0) @binding(1) var<storage, read> B : array<${v7ArrayType(o.b, l.widthB)}>;
@group(0) @binding(2) var<storage, read_write> C : array<f32>;
@group(0) @binding(3) var<storage, read> Info : array<i32>;
struct Dims { K : u32, N : u32, sE : u32 }
@group(0) @binding(4) var<uniform> dims : Dims;
var<workgroup> As : array<f16, ${l.buffers * l.sizeA}>;
var<workgroup> Bs : array<f16, ${l.buffers * l.sizeB}>;
var<workgroup> rowSrc : array<i32, ${l.rows + 4}>;
${usesBf16 ? `fn bf16Quad(w : vec2<u32>) -> vec4<f16> {
  return vec4<f16>(vec4<f32>(bitcast<f32>(w.x << 16u), bitcast<f32>(w.x & 0xffff0000u), bitcast<f32>(w.y << 16u), bitcast<f32>(w.y & 0xffff0000u)));
}` : ''}
@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wg : vec3<u32>, @builtin(local_invocation_index) lid : u32) {
  let kDim = dims.K;
  let nDim = dims.N;
  let subgroup = lid / 32u;
  let partRow = ${row};
  let partCol = ${col};
  let col0 = wg.x * ${l.cols}u;
  let rowBase = wg.y * ${l.rows}u;
  if (lid == 0u) { rowSrc[${l.rows}] = Info[wg.y]; }
  // each row's first vector in A, −1 on padding (its runs stage as 0)
  ${fillRows}
  // a barrier too: the table is complete for every invocation after it
  let e = workgroupUniformLoad(&rowSrc[${l.rows}]);
  let kEnd = select(kDim, 0u, e < 0);
  let bBase = u32(max(e, 0)) * dims.sE;
  ${declareAccumulators(layoutOf)}
  ${regs}
  ${loop}
  ${stores}
}` };
}

/** Workgroups of a v7 variant: one per block, columns on x, row blocks on y. */
export function v7Dispatch(p: V7Problem, o: V7Options): [number, number, number] {
  const l = v7Layout(o);
  return [p.N / l.cols, v7Blocks(p, l.rows), 1];
}

/**
 * The conversion pass that f16 operands would need first: `elements` f32 (vec4 pairs) to packed
 * f16 (vec4<u32>, 8 halves), one invocation per 8 elements, 256 a workgroup, rows of
 * 32768 workgroups on y. Bindings: 0 the f32 source, 1 the packed output; Dims.K the element count.
 */
export function conversionPass(): Variant {
  return { name: 'f32 -> f16 conversion pass (8 elements an invocation, vec4<f32> pairs to vec4<u32>)', threads: 256, blockRows: 1, blockCols: 1, code: `
@group(0) @binding(0) var<storage, read> F : array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> H : array<vec4<u32>>;
struct Dims { count : u32 }
@group(0) @binding(2) var<uniform> dims : Dims;
@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid : vec3<u32>) {
  let i = gid.x + gid.y * ${32768 * 256}u;
  if (i >= dims.count / 8u) { return; }
  let lo = F[2u * i];
  let hi = F[2u * i + 1u];
  H[i] = vec4<u32>(pack2x16float(lo.xy), pack2x16float(lo.zw), pack2x16float(hi.xy), pack2x16float(hi.zw));
}` };
}

const V7_BASE: V7Options = { sgRows: 2, sgCols: 2, depth: 64, staging: 'prefetch', a: 'f32', b: 'f32', width: 4, bColMajor: false };

/**
 * The v7 cases, each on the small grouped problem (every element against float64) and at Q's up
 * shape (timed), in the order they run. Each names what limits v6 that it addresses.
 */
export const V7_STEPS: ReadonlyArray<readonly [string, V7Options]> = [
  // v6's program rebuilt in the v7 generator (prefetch, f32 operands, row-major Bs): the family's baseline, ~pkg-matmul-q
  ['v7-0-v6-like', V7_BASE],
  // no register prefetch: 64 registers a lane less across the products (v6-g: 152.7 against v6-0's 21.1 TFLOP/s)
  ['v7-a-direct', { ...V7_BASE, staging: 'direct' }],
  // + Bs column-major: W's k-runs stored to consecutive halves instead of 4 separate stores 4 slab rows apart
  ['v7-b-bs-col', { ...V7_BASE, staging: 'direct', bColMajor: true }],
  // + the bf16-stored experts (the end-to-end setup): half W's bytes
  ['v7-c-bf16x8', { ...V7_BASE, staging: 'direct', bColMajor: true, b: 'bf16', width: 8 }],
  // + both operands f16 in global memory (price v7-convert-q beside it): half the bytes, no conversion at the fetch
  ['v7-d-f16', { ...V7_BASE, staging: 'direct', bColMajor: true, a: 'f16', b: 'f16' }],
  // + 16-byte loads of 8 halves: half the load instructions, runs of 8 halves stored together
  ['v7-e-f16x8', { ...V7_BASE, staging: 'direct', bColMajor: true, a: 'f16', b: 'f16', width: 8 }],
  // depth 32: half the slab, twice the barriers (the reference point for the two below)
  ['v7-f-depth32', { ...V7_BASE, staging: 'direct', bColMajor: true, a: 'f16', b: 'f16', width: 8, depth: 32 }],
  // two slab buffers, one barrier a slab: the next slab staged while other subgroups multiply
  ['v7-g-double', { ...V7_BASE, staging: 'double', bColMajor: true, a: 'f16', b: 'f16', width: 8, depth: 32 }],
  ['v7-h-double-prefetch', { ...V7_BASE, staging: 'double-prefetch', bColMajor: true, a: 'f16', b: 'f16', width: 8, depth: 32 }],
  // 8 subgroups: each staged element feeds twice the products (256×128: W's slab shared by twice the rows)
  ['v7-i-256x128', { ...V7_BASE, staging: 'direct', bColMajor: true, a: 'f16', b: 'f16', width: 8, depth: 32, sgRows: 4 }],
  ['v7-j-128x256', { ...V7_BASE, staging: 'direct', bColMajor: true, a: 'f16', b: 'f16', width: 8, depth: 32, sgCols: 4 }],
  // the same two with the package's operands as they are (A f32, W bf16): what a port without a conversion pass gets
  ['v7-k-256x128-f32-bf16', { ...V7_BASE, staging: 'direct', bColMajor: true, b: 'bf16', width: 8, depth: 32, sgRows: 4 }],
  ['v7-l-double-f32-bf16', { ...V7_BASE, staging: 'double', bColMajor: true, b: 'bf16', width: 8, depth: 32 }],
  // v6's 128×128 block over 8 subgroups of 32×64: 64 accumulator registers a lane instead of 128, for
  // more resident subgroups per SM; each subgroup loads 6 fragments per 8 products instead of 8 per 16
  ['v7-m-8x32x64', { ...V7_BASE, staging: 'direct', bColMajor: true, a: 'f16', b: 'f16', width: 8, sgRows: 4, tilesM: 2 }],
  ['v7-n-8x32x64-f32-bf16', { ...V7_BASE, staging: 'direct', bColMajor: true, b: 'bf16', width: 8, sgRows: 4, tilesM: 2 }],
  // which operand's conversion costs c's speed against e's: A f16 in memory beside the bf16-stored W, and A f32 beside an f16 W
  ['v7-o-f16-bf16x8', { ...V7_BASE, staging: 'direct', bColMajor: true, a: 'f16', b: 'bf16', width: 8 }],
  ['v7-p-f32-f16x8', { ...V7_BASE, staging: 'direct', bColMajor: true, b: 'f16', width: 8 }],
];
