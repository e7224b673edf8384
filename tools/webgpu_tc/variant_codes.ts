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
  aIndex, bIndex, declareAccumulators, epilogueThroughSlots, MATRIX_EDGE, multiplySlab, partOrigin, type SlabLayout, slabSizes,
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
const PROGRAM_INPUTS: Record<string, string> = { A: 'f32', W: 'f32', L: 'f32', R: 'f32', seg: 'i32', pr: 'i32' };

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
    const scalar = name === 'W' && options.packedW ? 'i32' : PROGRAM_INPUTS[name];
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
  const body = code.replace(/^\s*(enable|diagnostic)\b.*$/gm, '').replace(/\bf16\b/g, 'f32')
    .replace(/subgroupMatrix(Load|Store)(?:<subgroup_matrix_(?:left|right)<f32, 16, 16>>)?\(&(\w+), /g, (_, op: string, name: string) => {
      arrays.add(name);
      return `sm${op}_${name}(`;
    })
    .replace(/subgroup_matrix_result<f32, 16, 16>\(\)/g, 'SM(0.0)')
    .replace(/subgroupMatrixMultiplyAccumulate\(/g, 'smMma(');
  const writable = /var<(?:workgroup|storage, read_write)>\s*(\w+)/g;
  const canWrite = new Set([...body.matchAll(writable)].map(m => m[1]));
  const helpers = [...arrays].map(a => `
fn smLoad_${a}(offset : u32, colMajor : bool, stride : u32) -> SM { return SM(f32(${a}[offset + stride])); }
fn smStore_${a}(offset : u32, c : SM, colMajor : bool, stride : u32) { ${canWrite.has(a) ? `${a}[offset + stride] = c.v;` : ''} }`);
  return `struct SM { v : f32 }\nfn smMma(a : SM, b : SM, c : SM) -> SM { return SM(a.v * b.v + c.v); }\n${body}\n${helpers.join('\n')}`;
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
