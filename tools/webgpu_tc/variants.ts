/**
 * The tensor-core device batch, variants v4 (issue 13). v3 found the package's subgroup-matrix
 * programs wrong on the H100 (max rel. error 1.4) and standalone f16 GEMMs exact, the best at
 * 97 TFLOP/s (4 subgroups of 64×64, 128×128 block, depth 64, rows padded by 8 halves). v4 runs:
 * 1. the rebuilt programs (that exact layout, no 4-byte workgroup scalars) outside tfjs (their WGSL
 *    under a minimal stand-in of tfjs's preamble, variant_codes.ts) on a small grouped problem with
 *    every edge (K tail, output columns past the last block's, padding rows, a block past the rows
 *    in use), every element against float64;
 * 2. the bisection (variant_codes.ts's bisectVariant): the exact layout staged per element from f32,
 *    then one piece of the programs added per case (the slot epilogue, the row loader with and
 *    without SwiGLU, the f32 and bf16 weight loaders, grouped rows, a runtime K bound, a 4-byte
 *    workgroup scalar before the slabs, column-major As, a K tail), then all together;
 * 3. the rebuilt programs at Q's up shape, timed; the exact GEMM at 2048³ (the control); db64af4's MatMul.
 * v5 (the speed, after v4 found the programs exact at 3.4 / 5.4 TFLOP/s): the programs stage in
 * vec4 quads with register prefetch where the shapes allow (subgroup_matrix_program.ts's
 * matMulStaging / weightGradStaging, as kernels.ts picks them). CASES now run the small problem on
 * every staging path (quads of f32 and bf16 weights, along k and n, a K tail per element, the
 * per-element path itself), all rel 0 expected; then Q's shape timed (goal >= 40 TFLOP/s) beside the
 * exact GEMM and the per-element MatMul; then the bisection's two ends. v4's other bisection cases
 * are BISECT_CASES (VARIANT_CASES=id,... runs them).
 * v6 (the speed, after v5's quads reached 11.1 / 13.9 TFLOP/s against the exact GEMM's 97): CASES
 * run the v6 programs (subgroup_matrix_program.ts's `v6` structure: whole-block quads without clamps,
 * quad rows resolved once per block, results stored straight to the output) on the small problems,
 * then v6 against v5 at Q's up shape, then the speed bisection (variant_codes.ts's V6_STEPS: the
 * exact GEMM on Q's grouped shape, each construct of the package's MatMul alone, then all together),
 * each timed and checked on 512 samples. v4/v5's other cases are BISECT_CASES.
 * v7 (the speed, after run N: v6 programs 53 TFLOP/s, the exact grouped GEMM without its register
 * prefetch 152.7): `node variants.js v7` runs V7_CASES (variant_codes.ts's V7_STEPS: staging without
 * prefetch, Bs column-major, f16 / bf16 operands in 8- or 16-byte loads, depth 32, double-buffered
 * slabs, 8-subgroup blocks, each with the package MatMul's gathered rows, expert lookup, padding
 * and a block of no expert), each exact on a small problem on every element and then timed at Q's up
 * shape, beside the v6 baselines pkg-matmul-q, pkg-matmul-q-bf16 and v6-g-no-prefetch; then the
 * f32 → f16 conversion pass at Q's operands (what the f16 variants would add). Any other argument
 * is a regular expression over the case ids. Timings: the median of 3 samples of 10 dispatches.
 * Each case reports maxRelError and, for the wrong elements (error > 1e-3 of the scale), how many,
 * the first few and their counts by subgroup part and by row / column inside the 16×16 matrix.
 * Operands are multiples of 1/64 in [-1, 1] and sums short enough to be exact in f16 inputs / f32
 * sums: a right kernel gives maxRelError 0 (SwiGLU on load: ~1e-7, its f16 rounding is in the reference).
 * Every case runs in a child process of its own (this script again, with VARIANT_CASE set), so that
 * a crash inside Dawn or the driver ends that case only and is recorded as
 * `{ crashed: true, signal, lastPhase }`; a case that hangs is killed after CASE_TIMEOUT_MS.
 *
 * On the GPU machine, after `../shared/gpu/prepare.sh tools/webgpu_tc/variants.ts tools/webgpu_tc/check.ts`:
 *   bash tools/webgpu_tc/on_device.sh      (this, then check.js)
 * Here (Mesa): `EGL_PLATFORM=surfaceless npx tsx tools/webgpu_tc/variants.ts` reports that the
 * adapter has no subgroup matrices and exits 0; with VARIANTS_HARNESS=1 it dry-runs the harness:
 * a plain f32 GEMM and the package and bisection cases' plumbing with the matrices stood in for
 * (their numbers are no product), each in its child process. `VARIANT_CASES=id,id` runs only those.
 * Prints one JSON object; writes $OUT/variants.json when OUT is set (variants.partial.json after
 * every case). Stops starting cases after TIME_BUDGET_MS.
 * The port (after the v7 run of 06:38 UTC: v7-b 110.8, v7-c 114.8 TFLOP/s against the package program's
 * 11.0): the package's programs now stage as v7-b/c (subgroup_matrix_program.ts's SubgroupStaging), so
 * every pkg-* case above times the ported programs; `structure: 'v6'` (the -v6 cases) keeps v6's staging
 * for the comparison. `node variants.js port` runs PORT_CASES: the ported programs exact on the small
 * problems, then Q's up shape beside their -v6 twins and the raw v7-b, v7-c and v7-k.
 * Issue 15 (batch 1: 64 and 32 rows per expert): FEW_ROWS_CASES run the MatMul's 64- and 32-row
 * blocks and the weight gradient's 32-deep slab on small problems (every element, rel 0 expected),
 * then timed at OLMoE's and Qwen3-30B-A3B's batch-1 shapes, the other block / depth beside each:
 *   VARIANT_CASES=few-rows node .gpu/bundle/variants.js
 */
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, renameSync, statSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { create, globals } from 'webgpu';
import {
  ELEMENT_STAGING, matMulStaging, type SubgroupBlockRows, SubgroupMatrixMatMulProgram, SubgroupMatrixWeightGradProgram, v5Structure,
  v6Staging, weightGradStaging,
} from '../../src/backends/webgpu/programs/subgroup_matrix_program.js';
import { OLD_MATMUL_ROWS, OLD_WEIGHT_GRAD_ROWS } from './frozen/db64af4.js';
import {
  type BisectOptions, bisectVariant, isPaddingRow, type PackageShaderOptions, packageProgramShader, plainVariant, type Problem,
  stagedVariant, standInMatrices, type Variant, gemmLayout, type GroupedGemmOptions, groupedBlocks, groupedGemmDispatch, groupedGemmVariant,
  type GroupedProblem, groupedSourceRow, V6_STEPS,
  conversionPass, v7Blocks, v7Dispatch, v7Layout, type V7Options, type V7Problem, v7SourceRow, v7Variant, v7WorkgroupBytes, V7_STEPS,
} from './variant_codes.js';

Object.assign(globalThis, globals);
const FLAGS = ['enable-dawn-features=allow_unsafe_apis,vulkan_enable_f16_on_nvidia'];
/** the parent starts no case after this; the batch stays within on_device.sh's 150 s with the last case's timeout */
const TIME_BUDGET_MS = 125_000;
const harness = process.env.VARIANTS_HARNESS === '1';
// Mesa's software rasterizer takes ~27 s for a small package case
const CASE_TIMEOUT_MS = harness ? 60_000 : 25_000;
/** Dispatching before a timed case's samples (clocks up); none in the Mesa dry run. */
const WARM_UP_MS = harness ? 0 : 400;
const started = Date.now();
const elapsed = () => ((Date.now() - started) / 1000).toFixed(1);

// ---- the cases --------------------------------------------------------------------------------

/** A grouped problem for the package's programs: E experts of `perExpert` padded rows, `real` of them real. */
interface Grouped {
  E: number;
  perExpert: number;
  real: number;
  /** padded rows past the rows in use (a block whose expert is −1): MatMul only */
  unused: number;
  /** MatMul: out [rows, N] = A [rows, K] · W_e [N, K]ᵀ; weight gradient: dW_e [N, K] = Σ_rows L[r, N]ᵀ R[r, K] */
  N: number;
  K: number;
  /** check every element (else 512 samples) */
  everyElement: boolean;
  /** MatMul: W f32 or packed bf16 words; stored [E, N, K] ('nk', contiguous along k) or [E, K, N] ('kn') */
  weight?: 'f32' | 'bf16';
  layout?: 'nk' | 'kn';
  /** 'auto': matMulStaging / weightGradStaging of the shape (quads where aligned), as kernels.ts picks; 'element': the v4 per-element path */
  staging?: 'auto' | 'element';
  /**
   * 'v5': the staging without v6's structure (v5Structure); 'v6': v6's staging (v6Staging: register
   * prefetch, Bs row-major, 4-element loads), for the old-vs-new comparisons; default: the port of v7's
   * staging, as kernels.ts picks
   */
  structure?: 'v5' | 'v6';
  /** MatMul: the block's rows (default 128); perExpert and unused must be multiples of it */
  blockRows?: SubgroupBlockRows;
  /** weight gradient: rows of the reduction per slab (default 64) */
  depth?: 32 | 64;
  /** MatMul: A f32 (default) or f16 halves in int32 words (staging 'half8', as kernels.ts converts it first) */
  left?: 'f32' | 'half';
  /**
   * MatMul, for the bisection of the package's speed against the raw v7 variants: 'direct-only' drops
   * the per-element epilogue (the shape must be whole blocks of real rows: every block stores directly)
   */
  edit?: 'direct-only';
}

const SMALL: Grouped = { E: 2, perExpert: 256, real: 200, unused: 128, N: 320, K: 200, everyElement: true };
/** K not a multiple of 4: A per element (its tail zero-filled per element), W [E, K, N] in quads along n: the mixed path */
const SMALL_TAIL: Grouped = { ...SMALL, K: 198, layout: 'kn' };
/** whole blocks (K 256, N 256, 640 rows): v6's quads without clamps and its direct stores, padding rows and the unused block included */
const SMALL_WHOLE: Grouped = { ...SMALL, N: 256, K: 256 };
/** config Q's up projection */
const Q_UP: Grouped = { E: 16, perExpert: 1024, real: 1000, unused: 0, N: 1536, K: 2048, everyElement: false };

type Timing = 'none' | 'timestamps';

type CaseSpec =
  | { kind: 'package'; program: 'matmul' | 'weightGrad'; code: 'fixed' | 'db64af4'; entry: PackageShaderOptions['entry']; shape: Grouped; timing: Timing }
  | { kind: 'gemm'; problem: Problem; variant: (p: Problem) => Variant; timing: Timing }
  | { kind: 'bisect'; problem: Problem; options: BisectOptions }
  | { kind: 'grouped-gemm'; problem: GroupedProblem; options: GroupedGemmOptions }
  /** a v7 variant: the small problem on every element, then (on the GPU) Q's up shape timed */
  | { kind: 'v7'; options: V7Options }
  /** the f32 → f16 conversion pass over `elements` values, timed */
  | { kind: 'convert'; elements: number };

interface Case {
  id: string;
  name: string;
  spec: CaseSpec;
  /**
   * keep no reference to the Dawn instance and collect garbage (node --expose-gc) once the inputs
   * are made: v2's way of holding it (none), made certain to matter, so that a crash here and none
   * in the same case without it says that the collected instance brought v2 down
   */
  dropInstance?: boolean;
}

const GEMM_2048: Problem = { name: '2048^3', batch: 1, M: 2048, N: 2048, K: 2048 };
/** the bisection's problem: 3 row blocks per batch (the last one unused when grouped), 2 column blocks, 3 whole slabs */
const BISECT: Problem = { name: 'bisect: 2 x (384 x 256 x 192)', batch: 2, M: 384, N: 256, K: 192 };
/** the same with a K tail (200: the last slab 8 deep, zero-filled) */
const BISECT_TAIL: Problem = { ...BISECT, name: 'bisect: 2 x (384 x 256 x 200)', K: 200 };
/** v2's exact GEMM: 4 subgroups of 64×64, 128×128 block, depth 64, pad 8, vec4 f16 reads, prefetch (97.1 TFLOP/s on the H100) */
const exactV2 = (p: Problem) => stagedVariant(p,
    { layout: gemmLayout({ sgRows: 2, sgCols: 2, tilesM: 4, tilesN: 4, depth: 64, pad: 8 }), from: 'f16', vec4: true, prefetch: true });

function packageCase(id: string, program: 'matmul' | 'weightGrad', code: 'fixed' | 'db64af4', shape: Grouped,
    entry: PackageShaderOptions['entry'] = 'wrapper', timing: Timing = 'none'): Case {
  const staging = code === 'db64af4' ? 'its staging' : shape.staging === 'element' ? 'per element'
    : `quads where aligned, ${shape.structure ?? 'v7'} staging`;
  const what = program === 'matmul'
    ? `SubgroupMatrixMatMulProgram (rows, ${shape.weight ?? 'f32'} weight [E, ${shape.layout === 'kn' ? 'K, N' : 'N, K'}], ${staging})`
    : `SubgroupMatrixWeightGradProgram (rows x rows, ${staging})`;
  const shapeName = `${shape.E} x ${shape.perExpert} rows (${shape.real} real${shape.unused && program === 'matmul' ? `, ${shape.unused} unused` : ''}), N ${shape.N}, K ${shape.K}` +
      (program === 'matmul' ? `, ${shape.blockRows ?? 128}-row blocks` : '');
  return { id, name: `package ${what}, ${code === 'fixed' ? `depth ${program === 'weightGrad' ? shape.depth ?? 64 : 64}, pad 8` : code}${entry === 'inline' ? ', main as the entry point' : ''}: ${shapeName}`,
    spec: { kind: 'package', program, code, entry, shape, timing } };
}

/**
 * A MatMul's code with its per-element epilogue removed: `if (direct) { stores } else { slots }`
 * becomes the stores alone (a bisection edit: right only where every block stores directly).
 */
function directOnly(code: string): string {
  const start = code.indexOf('if (direct) {');
  const otherwise = code.indexOf('} else {', start);
  if (start < 0 || otherwise < 0) throw new Error('directOnly: the code has no direct-store branch');
  // the else branch closes at the last '}' before main's own closing brace
  const mainEnd = code.lastIndexOf('}');
  const elseEnd = code.lastIndexOf('}', mainEnd - 1);
  return `${code.slice(0, start)}{${code.slice(start + 'if (direct) {'.length, otherwise)}}${code.slice(elseEnd + 1)}`;
}

function bisectCase(id: string, options: BisectOptions, problem = BISECT): Case {
  return { id, name: `${bisectVariant(problem, options).name} (${problem.name})`, spec: { kind: 'bisect', problem, options } };
}

/**
 * Every case, in the order they run (variants v4): the rebuilt programs first (right → done), then
 * the bisection from the exact GEMM, one piece of the programs added per case (every element
 * against float64, with where the wrong ones are), then the rebuilt programs at Q's shape, timed,
 * the exact GEMM itself as the control, and db64af4's MatMul (wrong in v3) to show the card
 * reproduces.
 */
/** Q's up shape for the v6 bisection: 16 experts × 1024 rows × K 2048 → N 1536 (no padding: whole blocks). */
const Q_GEMM: GroupedProblem = { E: 16, M: 1024, N: 1536, K: 2048 };

function groupedGemmCase(id: string, options: GroupedGemmOptions, problem = Q_GEMM): Case {
  return { id, name: `${groupedGemmVariant(problem, options).name} (${problem.E} x ${problem.M} x ${problem.K} -> ${problem.N})`,
    spec: { kind: 'grouped-gemm', problem, options } };
}

/**
 * Every case, in the order they run (variants v6): the v6 programs (kernels.ts's choice) on the
 * small problems, every element against float64 (rel 0 expected); the v6 and v5 programs at Q's
 * shape, timed; the exact GEMM as the control; then the speed bisection (V6_STEPS): the exact GEMM
 * on the grouped problem, one construct of the package's MatMul per case, then all of them.
 */
export const CASES: Case[] = [
  packageCase('pkg-matmul-small', 'matmul', 'fixed', SMALL),
  packageCase('pkg-matmul-small-whole', 'matmul', 'fixed', SMALL_WHOLE),
  packageCase('pkg-weightgrad-small-whole', 'weightGrad', 'fixed', SMALL_WHOLE),
  packageCase('pkg-matmul-small-whole-bf16', 'matmul', 'fixed', { ...SMALL_WHOLE, weight: 'bf16' }),
  packageCase('pkg-weightgrad-small', 'weightGrad', 'fixed', SMALL),
  packageCase('pkg-matmul-small-tail', 'matmul', 'fixed', SMALL_TAIL),
  // speed at Q's up shape: v6 against v5 in the same run (v5, run L: 11.1 and 13.9 TFLOP/s)
  packageCase('pkg-matmul-q', 'matmul', 'fixed', Q_UP, 'wrapper', 'timestamps'),
  packageCase('pkg-matmul-q-v5', 'matmul', 'fixed', { ...Q_UP, structure: 'v5' }, 'wrapper', 'timestamps'),
  packageCase('pkg-weightgrad-q', 'weightGrad', 'fixed', Q_UP, 'wrapper', 'timestamps'),
  packageCase('pkg-weightgrad-q-v5', 'weightGrad', 'fixed', { ...Q_UP, structure: 'v5' }, 'wrapper', 'timestamps'),
  packageCase('pkg-matmul-q-bf16', 'matmul', 'fixed', { ...Q_UP, weight: 'bf16' }, 'wrapper', 'timestamps'),
  { id: 'exact-v2-2048', name: 'v2 exact GEMM: 4 subgroups of 64x64, 128x128, depth 64, pad 8, vec4, prefetch', spec: { kind: 'gemm', problem: GEMM_2048, variant: exactV2, timing: 'timestamps' } },
  ...V6_STEPS.map(([id, options]) => groupedGemmCase(id, options)),
];


/** 64 rows per expert (OLMoE-1B-7B at 512 tokens), 32 (Qwen3-30B-A3B), with padding rows and an unused block */
const SMALL_64: Grouped = { E: 4, perExpert: 64, real: 50, unused: 64, N: 320, K: 200, everyElement: true, blockRows: 64 };
const SMALL_32: Grouped = { E: 8, perExpert: 32, real: 25, unused: 32, N: 320, K: 200, everyElement: true, blockRows: 32 };
/**
 * Batch 1's down projections: OLMoE (64 experts × 64 rows, N = H 2048, K = I 1024) and Qwen3-30B-A3B
 * (N 2048, K = I 768, 32 rows each; 64 of its 128 experts, the same 1024 workgroups as OLMoE's),
 * bf16 weights as the e2e run stores them.
 */
const O_DOWN: Grouped = { E: 64, perExpert: 64, real: 64, unused: 0, N: 2048, K: 1024, everyElement: false, weight: 'bf16', blockRows: 64 };
const Q1_DOWN: Grouped = { E: 64, perExpert: 32, real: 32, unused: 0, N: 2048, K: 768, everyElement: false, weight: 'bf16', blockRows: 32 };

/**
 * The MatMul on f16 left operands (staging 'half8'), exact on the small problems (a K tail, padding
 * rows, an unused block), then at Q's up shape timed beside the same program converting f32 A as it
 * stages, the raw v7-o (the same operand formats outside the package) and the package with only the
 * direct-store epilogue (real rows only: every block stores directly), to bisect the gap between them.
 */
const Q_UP_WHOLE: Grouped = { ...Q_UP, real: Q_UP.perExpert };
export const HALF_CASES: Case[] = [
  packageCase('pkg-matmul-small-half', 'matmul', 'fixed', { ...SMALL, K: 200, left: 'half' }),
  packageCase('pkg-matmul-small-whole-bf16-half', 'matmul', 'fixed', { ...SMALL_WHOLE, weight: 'bf16', left: 'half' }),
  packageCase('pkg-matmul-q-bf16-f32a', 'matmul', 'fixed', { ...Q_UP, weight: 'bf16' }, 'wrapper', 'timestamps'),
  packageCase('pkg-matmul-q-bf16-half', 'matmul', 'fixed', { ...Q_UP, weight: 'bf16', left: 'half' }, 'wrapper', 'timestamps'),
  packageCase('pkg-matmul-q-whole-bf16-half', 'matmul', 'fixed', { ...Q_UP_WHOLE, weight: 'bf16', left: 'half' }, 'wrapper', 'timestamps'),
  packageCase('pkg-matmul-q-whole-bf16-half-direct', 'matmul', 'fixed', { ...Q_UP_WHOLE, weight: 'bf16', left: 'half', edit: 'direct-only' }, 'wrapper', 'timestamps'),
  packageCase('pkg-matmul-q-whole-bf16-half-inline', 'matmul', 'fixed', { ...Q_UP_WHOLE, weight: 'bf16', left: 'half' }, 'inline', 'timestamps'),
];

/** Issue 15's cases (VARIANT_CASES=few-rows runs them all, VARIANT_CASES=id,... some). */
export const FEW_ROWS_CASES: Case[] = [
  packageCase('pkg-matmul-small-r64', 'matmul', 'fixed', SMALL_64),
  packageCase('pkg-matmul-small-r32', 'matmul', 'fixed', SMALL_32),
  packageCase('pkg-matmul-small-whole-r32-bf16', 'matmul', 'fixed', { ...SMALL_32, N: 256, K: 256, weight: 'bf16' }),
  packageCase('pkg-weightgrad-small-d32', 'weightGrad', 'fixed', { ...SMALL_32, depth: 32 }),
  packageCase('pkg-weightgrad-small-whole-d32', 'weightGrad', 'fixed', { ...SMALL_32, N: 256, K: 256, depth: 32 }),
  // timed: each shape's block beside the smaller one it could also take, the weight gradient at both depths
  packageCase('pkg-matmul-o-r64', 'matmul', 'fixed', O_DOWN, 'wrapper', 'timestamps'),
  packageCase('pkg-matmul-o-r32', 'matmul', 'fixed', { ...O_DOWN, blockRows: 32 }, 'wrapper', 'timestamps'),
  packageCase('pkg-matmul-q1-r32', 'matmul', 'fixed', Q1_DOWN, 'wrapper', 'timestamps'),
  packageCase('pkg-weightgrad-q1-d32', 'weightGrad', 'fixed', { ...Q1_DOWN, depth: 32 }, 'wrapper', 'timestamps'),
  packageCase('pkg-weightgrad-q1-d64', 'weightGrad', 'fixed', { ...Q1_DOWN, depth: 64 }, 'wrapper', 'timestamps'),
  packageCase('pkg-weightgrad-o-d64', 'weightGrad', 'fixed', { ...O_DOWN, depth: 64 }, 'wrapper', 'timestamps'),
];

/** v4's other bisection cases (compiled on Mesa by the emulator spec; run with VARIANT_CASES=id,...). */
export const BISECT_CASES: Case[] = [
  bisectCase('bisect-a-slot-epilogue', { slotEpilogue: true }),
  bisectCase('bisect-b-left-rows', { left: 'rows' }),
  bisectCase('bisect-c-left-act', { left: 'act' }),
  bisectCase('bisect-d-weight-f32', { weight: 'f32' }),
  bisectCase('bisect-e-weight-bf16', { weight: 'bf16' }),
  bisectCase('bisect-f-grouped', { left: 'rows', grouped: true }),
  bisectCase('bisect-k-runtime-k', { runtimeK: true }),
  bisectCase('bisect-h-scalar-first', { runtimeK: true, scalarFirst: true }),
  bisectCase('bisect-i-left-col-major', { leftColMajor: true }),
  bisectCase('bisect-t-k-tail', {}, BISECT_TAIL),
  bisectCase('bisect-0-base', {}),
  bisectCase('bisect-all', { slotEpilogue: true, left: 'rows', weight: 'f32', grouped: true, runtimeK: true, scalarFirst: true }, BISECT_TAIL),
  packageCase('old-matmul-small', 'matmul', 'db64af4', SMALL),
  // v5's other small cases (every staging path; rel 0 on the H100 in run L)
  packageCase('pkg-matmul-small-bf16', 'matmul', 'fixed', { ...SMALL, weight: 'bf16' }),
  packageCase('pkg-matmul-small-kn', 'matmul', 'fixed', { ...SMALL, layout: 'kn' }),
  packageCase('pkg-weightgrad-small-tail', 'weightGrad', 'fixed', { ...SMALL, K: 198 }),
  packageCase('pkg-matmul-small-element', 'matmul', 'fixed', { ...SMALL, staging: 'element' }),
  packageCase('pkg-matmul-q-element', 'matmul', 'fixed', { ...Q_UP, staging: 'element' }, 'wrapper', 'timestamps'),
];

const HARNESS_GROUPED: GroupedProblem = { E: 2, M: 256, N: 256, K: 128 };

/** The Mesa dry run's cases: the harness on a plain GEMM, the package cases' and bisection cases' plumbing on small shapes. */
const HARNESS_CASES: Case[] = [
  { id: 'harness-plain', name: 'plain f32 GEMM (harness dry run)',
    spec: { kind: 'gemm', problem: { name: 'harness', batch: 2, M: 64, N: 64, K: 64 }, variant: plainVariant, timing: 'timestamps' } },
  packageCase('pkg-matmul-small', 'matmul', 'fixed', SMALL),
  packageCase('pkg-weightgrad-small', 'weightGrad', 'fixed', SMALL),
  packageCase('pkg-matmul-small-bf16', 'matmul', 'fixed', { ...SMALL, weight: 'bf16' }),
  packageCase('pkg-matmul-small-tail', 'matmul', 'fixed', SMALL_TAIL),
  packageCase('pkg-weightgrad-small-tail', 'weightGrad', 'fixed', { ...SMALL, K: 198 }),
  packageCase('pkg-matmul-small-element', 'matmul', 'fixed', { ...SMALL, staging: 'element' }),
  bisectCase('bisect-c-left-act', { left: 'act' }),
  bisectCase('bisect-all', { slotEpilogue: true, left: 'rows', weight: 'f32', grouped: true, runtimeK: true, scalarFirst: true }, BISECT_TAIL),
  bisectCase('bisect-e-weight-bf16', { weight: 'bf16', leftColMajor: true }),
  packageCase('old-matmul-small', 'matmul', 'db64af4', SMALL),
  packageCase('pkg-matmul-small-whole', 'matmul', 'fixed', SMALL_WHOLE),
  packageCase('pkg-weightgrad-small-whole', 'weightGrad', 'fixed', SMALL_WHOLE),
  packageCase('pkg-matmul-small-whole-bf16', 'matmul', 'fixed', { ...SMALL_WHOLE, weight: 'bf16' }),
  // the v6 bisection's plumbing at a small grouped shape (every construct: both ends)
  groupedGemmCase('harness-v6-0', {}, HARNESS_GROUPED),
  groupedGemmCase('harness-v6-z', V6_STEPS[V6_STEPS.length - 1][1], HARNESS_GROUPED),
  groupedGemmCase('harness-v6-bf16', { b: 'bf16-nk', rowTable: true, prefetch: false }, HARNESS_GROUPED),
];

/**
 * v7's problems: the small one with every edge a port meets (padding rows, gathered rows, a block of
 * no expert, whole 256-row and 256-column blocks), every element against float64; Q's up shape as
 * pkg-matmul-q's (16 experts × 1024 rows, K 2048 → N 1536; rows gathered, no padding), timed.
 */
const V7_SMALL: V7Problem = { E: 2, M: 256, unused: 256, N: 256, K: 256, padding: true };
const V7_Q: V7Problem = { E: 16, M: 1024, unused: 0, N: 1536, K: 2048, padding: false };

/**
 * The v7 batch (`node variants.js v7` selects it, with the v6 baselines pkg-matmul-q,
 * pkg-matmul-q-bf16 and v6-g-no-prefetch run beside it): every V7_STEPS variant, then the
 * conversion pass that the f16 variants need, priced at Q's operands (A and W, 83.9M values).
 */
export const V7_CASES: Case[] = [
  ...V7_STEPS.map(([id, options]): Case => ({ id, name: `${v7Variant(V7_SMALL, options).name} (small, then Q's up shape)`, spec: { kind: 'v7', options } })),
  { id: 'v7-convert-q', name: `${conversionPass().name}: Q's A and W (${(V7_Q.E * V7_Q.M * V7_Q.K + V7_Q.E * V7_Q.N * V7_Q.K) / 1e6}M values)`,
    spec: { kind: 'convert', elements: V7_Q.E * V7_Q.M * V7_Q.K + V7_Q.E * V7_Q.N * V7_Q.K } },
];

/**
 * What `node variants.js v7` runs: the package's programs at Q's shape (since the port, with v7's staging) and
 * v6-g in the same process tree, then V7_CASES.
 */
const V7_FILTER_BASELINES = ['pkg-matmul-q', 'pkg-matmul-q-bf16', 'v6-g-no-prefetch'];

/**
 * The port of v7's staging into the package's programs (`node variants.js port`): the ported
 * programs (kernels.ts's choice) exact on the small problems with every edge (rel 0: padding rows,
 * a block of no expert, K and column tails, f32 and bf16 W along k — bf16 in 16-byte runs —, W
 * along n, 64- and 32-row blocks, the weight gradient at both depths), then Q's up shape timed:
 * each ported program beside the same operands with v6's staging (the -v6 cases: the program the
 * lead measured at 11.0 / 13.7 TFLOP/s) and beside the raw v7 variants it ports (v7-b, v7-c) and
 * the 256×128 block not yet ported (v7-k).
 */
export const PORT_CASES: Case[] = [
  packageCase('pkg-matmul-small', 'matmul', 'fixed', SMALL),
  packageCase('pkg-matmul-small-bf16', 'matmul', 'fixed', { ...SMALL, weight: 'bf16' }),
  packageCase('pkg-matmul-small-whole', 'matmul', 'fixed', SMALL_WHOLE),
  packageCase('pkg-matmul-small-whole-bf16', 'matmul', 'fixed', { ...SMALL_WHOLE, weight: 'bf16' }),
  packageCase('pkg-matmul-small-tail', 'matmul', 'fixed', SMALL_TAIL),
  packageCase('pkg-matmul-small-kn', 'matmul', 'fixed', { ...SMALL, layout: 'kn' }),
  packageCase('pkg-matmul-small-r64', 'matmul', 'fixed', SMALL_64),
  packageCase('pkg-matmul-small-whole-r32-bf16', 'matmul', 'fixed', { ...SMALL_32, N: 256, K: 256, weight: 'bf16' }),
  packageCase('pkg-weightgrad-small', 'weightGrad', 'fixed', SMALL),
  packageCase('pkg-weightgrad-small-whole', 'weightGrad', 'fixed', SMALL_WHOLE),
  packageCase('pkg-weightgrad-small-d32', 'weightGrad', 'fixed', { ...SMALL_32, depth: 32 }),
  packageCase('pkg-matmul-q', 'matmul', 'fixed', Q_UP, 'wrapper', 'timestamps'),
  packageCase('pkg-matmul-q-v6', 'matmul', 'fixed', { ...Q_UP, structure: 'v6' }, 'wrapper', 'timestamps'),
  packageCase('pkg-matmul-q-bf16', 'matmul', 'fixed', { ...Q_UP, weight: 'bf16' }, 'wrapper', 'timestamps'),
  packageCase('pkg-matmul-q-bf16-v6', 'matmul', 'fixed', { ...Q_UP, weight: 'bf16', structure: 'v6' }, 'wrapper', 'timestamps'),
  packageCase('pkg-weightgrad-q', 'weightGrad', 'fixed', Q_UP, 'wrapper', 'timestamps'),
  packageCase('pkg-weightgrad-q-v6', 'weightGrad', 'fixed', { ...Q_UP, structure: 'v6' }, 'wrapper', 'timestamps'),
  ...V7_CASES.filter(c => ['v7-b-bs-col', 'v7-c-bf16x8', 'v7-k-256x128-f32-bf16'].includes(c.id)),
];

/** On Mesa: the conversion pass on 2^16 values (pack2x16float needs no f16: a real check). */
const HARNESS_V7_CONVERT: Case = { id: 'v7-convert-small', name: `${conversionPass().name}: 65536 values`, spec: { kind: 'convert', elements: 65536 } };

// ---- the child: one case ----------------------------------------------------------------------

/** A line for the parent: the phase reached (so that a crash says where), or the result. */
function tell(message: Record<string, unknown>): void {
  process.stdout.write(`${JSON.stringify(message)}\n`);
}

let seed = 12345;
const rand = () => { seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0; return seed / 2 ** 32; };
function sixtyFourths(n: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.round((rand() * 2 - 1) * 64) / 64;
  return out;
}

/**
 * bf16 words of f32 values that bf16 holds exactly (multiples of 1/64 in [-1, 1]: 7 significant
 * bits), two per u32 in element order: each f32's high half, straight from its bits in a typed
 * array (v5's per-element conversion took over 30 s at Q's 50M weights).
 */
function bf16Words(values: Float32Array): Uint16Array {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = bits[i] >>> 16;
  return out;
}

/** The prefix of sharedSixtyFourths' files in the temporary folder (the parent removes them at the end). */
const SHARED_PREFIX = 'webgpu_tc_v7_';

/**
 * `n` multiples of 1/64 from a seed of their own, the same in every case's process: generated by the
 * first case that asks (about 2 s of CPU for Q's 84M values) and read back from the temporary folder
 * by the next ones, so that the v7 batch's Q cases spend their time on the GPU.
 */
function sharedSixtyFourths(name: string, n: number, ownSeed: number): Float32Array {
  const path = join(tmpdir(), `${SHARED_PREFIX}${name}_${n}.f32`);
  const out = new Float32Array(n);
  if (existsSync(path) && statSync(path).size === n * 4) {
    new Uint8Array(out.buffer).set(readFileSync(path));
    return out;
  }
  const kept = seed;
  seed = ownSeed;
  out.set(sixtyFourths(n));
  seed = kept;
  writeFileSync(`${path}.${process.pid}`, out);
  renameSync(`${path}.${process.pid}`, path);
  return out;
}

/** f16 bits of values f16 holds exactly (multiples of 1/64 in [-1, 1]). */
function halves(values: Float32Array): Uint16Array {
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) out[i] = halfBits(values[i]);
  return out;
}
/** The value of f16 bits (normal numbers and zeros: what the cases hold). */
function halfValue(bits: number): number {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >>> 10) & 0x1f;
  return exponent === 0 ? sign * (bits & 0x3ff) * 2 ** -24 : sign * (1 + (bits & 0x3ff) / 1024) * 2 ** (exponent - 15);
}
const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);
function halfBits(v: number): number {
  // v is a multiple of 1/64 in [-1, 1]: exact in f16
  if (v === 0) return 0;
  scratchF32[0] = v;
  const u = scratchU32[0];
  return ((u >>> 16) & 0x8000) | ((((u >>> 23) & 0xff) - 127 + 15) << 10) | ((u >>> 13) & 0x3ff);
}

interface Run {
  code: string;
  /** bound in order from binding 0 */
  buffers: GPUBuffer[];
  out: GPUBuffer;
  uniforms?: GPUBuffer;
  dispatch: [number, number, number];
  flops: number;
  /** bytes moved (a pass that does no products: reported as GB/s) */
  bytes?: number;
  /** max |c − expected| / max |expected| */
  check: (c: Float32Array, entry?: Record<string, unknown>) => number;
}

/** Compiles, runs once, checks, then times 10 dispatches (timestamp queries); tells each phase first. */
async function runOnce(device: GPUDevice, entry: Record<string, unknown>, run: Run, timing: Timing, partial = true): Promise<void> {
  const errors: string[] = [];
  device.addEventListener('uncapturederror', e => errors.push(String((e as GPUUncapturedErrorEvent).error.message).slice(0, 800)));
  entry.deviceErrors = errors;
  tell({ phase: 'compile' });
  const module = device.createShaderModule({ code: run.code });
  const info = await module.getCompilationInfo();
  const msgs = info.messages.filter(m => m.type === 'error').map(m => `${m.lineNum}:${m.linePos} ${m.message}`);
  if (msgs.length) { entry.compileErrors = msgs.slice(0, 5); return; }
  tell({ phase: 'pipeline' });
  const pipeline = await device.createComputePipelineAsync({ layout: 'auto', compute: { module, entryPoint: 'main' } });
  const entries: GPUBindGroupEntry[] = run.buffers.map((b, binding) => ({ binding, resource: { buffer: b } }));
  if (run.uniforms) entries.push({ binding: run.buffers.length, resource: { buffer: run.uniforms } });
  const bind = device.createBindGroup({ layout: pipeline.getBindGroupLayout(0), entries });
  const querySet = timing === 'timestamps' && device.features.has('timestamp-query')
    ? device.createQuerySet({ type: 'timestamp', count: 2 }) : undefined;
  const stamps = querySet && device.createBuffer({ size: 16, usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC });
  const stampsRead = querySet && device.createBuffer({ size: 16, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const go = (n: number, timed: boolean) => {
    const enc = device.createCommandEncoder();
    enc.clearBuffer(run.out);
    const pass = enc.beginComputePass(timed && querySet ? { timestampWrites: { querySet, beginningOfPassWriteIndex: 0, endOfPassWriteIndex: 1 } } : {});
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bind);
    for (let i = 0; i < n; i++) pass.dispatchWorkgroups(...run.dispatch);
    pass.end();
    if (timed && querySet) {
      enc.resolveQuerySet(querySet, 0, 2, stamps!, 0);
      enc.copyBufferToBuffer(stamps!, 0, stampsRead!, 0, 16);
    }
    device.queue.submit([enc.finish()]);
  };
  tell({ phase: 'dispatch' });
  go(1, false);
  tell({ phase: 'readback' });
  const readback = device.createBuffer({ size: run.out.size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
  const enc = device.createCommandEncoder();
  enc.copyBufferToBuffer(run.out, 0, readback, 0, run.out.size);
  device.queue.submit([enc.finish()]);
  await readback.mapAsync(GPUMapMode.READ);
  const c = new Float32Array(readback.getMappedRange().slice(0));
  readback.unmap();
  entry.maxRelError = run.check(c, entry);
  entry.finite = c.every(Number.isFinite);
  // the verdict first: a crash while timing leaves it with the parent (`partial` false: the caller tells it, under its own key)
  if (partial) tell({ partial: entry });
  if (timing === 'none') return;
  tell({ phase: 'timing' });
  // the GPU's clocks ramp up under load: dispatches for WARM_UP_MS first, so that no case is timed at
  // idle clocks (the same case gave 29.6 and 110.8 TFLOP/s in one run without it)
  const warmUntil = performance.now() + WARM_UP_MS;
  while (performance.now() < warmUntil) {
    go(10, false);
    await device.queue.onSubmittedWorkDone();
  }
  // 3 samples of 10 dispatches, the median (run N's single samples were noisy)
  const samples: number[] = [];
  for (let sample = 0; sample < 3; sample++) {
    await device.queue.onSubmittedWorkDone();
    const t0 = performance.now();
    go(10, true);
    await device.queue.onSubmittedWorkDone();
    let ms = (performance.now() - t0) / 10;
    if (querySet) {
      await stampsRead!.mapAsync(GPUMapMode.READ);
      const [begin, end] = new BigUint64Array(stampsRead!.getMappedRange().slice(0));
      stampsRead!.unmap();
      ms = Number(end - begin) / 1e6 / 10;
    }
    samples.push(ms);
  }
  entry.msSamples = samples.map(v => Number(v.toPrecision(4)));
  entry.timedBy = querySet ? 'timestamps' : 'wall clock';
  const ms = [...samples].sort((a, b) => a - b)[1];
  entry.ms = ms;
  if (run.flops > 0) entry.tflops = run.flops / (ms * 1e-3) / 1e12;
  if (run.bytes) entry.gbps = run.bytes / (ms * 1e-3) / 1e9;
}

function storage(device: GPUDevice, data: ArrayBufferView | number): GPUBuffer {
  const size = typeof data === 'number' ? data : data.byteLength;
  const g = device.createBuffer({ size, usage: GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_DST | GPUBufferUsage.COPY_SRC });
  if (typeof data !== 'number') device.queue.writeBuffer(g, 0, data as unknown as ArrayBuffer);
  return g;
}

/**
 * max |c − expected| / max |expected| over `points` (indices into c) with their float64 values; and,
 * into `entry`, where the wrong ones are (error above 1e-3 of the scale): how many, the first few,
 * and their counts by the subgroup part of the 128×128 block they fall in (row, column halves),
 * by row and by column inside their 16×16 matrix. `at(i)`: element i's output row and column.
 */
function relativeCheck(points: number[], expected: number[], at: (i: number) => [number, number] = i => [0, i]):
    (c: Float32Array, entry?: Record<string, unknown>) => number {
  const scale = expected.reduce((m, v) => Math.max(m, Math.abs(v)), 1e-30);
  return (c, entry) => {
    let worst = 0;
    const byPart = [0, 0, 0, 0], byRow16 = new Array(16).fill(0), byCol16 = new Array(16).fill(0);
    const first: unknown[] = [];
    let wrong = 0, zeros = 0;
    points.forEach((index, i) => {
      const err = Math.abs(c[index] - expected[i]) / scale;
      worst = Math.max(worst, Number.isNaN(err) ? Infinity : err);
      if (!(err <= 1e-3)) {
        wrong++;
        if (c[index] === 0) zeros++;
        const [row, col] = at(index);
        byPart[(row % 128 >= 64 ? 2 : 0) + (col % 128 >= 64 ? 1 : 0)]++;
        byRow16[row % 16]++;
        byCol16[col % 16]++;
        if (first.length < 4) first.push({ row, col, got: c[index], want: expected[i] });
      }
    });
    if (entry) Object.assign(entry, { checked: points.length, wrong, wrongAreZero: zeros, ...(wrong ? { firstWrong: first, wrongByPart: byPart, wrongByRow16: byRow16, wrongByCol16: byCol16 } : {}) });
    return worst;
  };
}

/** IEEE binary16 rounding (nearest, ties away: the cases' values never tie) of a float64. */
function roundHalf(v: number): number {
  if (v === 0 || !Number.isFinite(v)) return v;
  const e = Math.max(Math.floor(Math.log2(Math.abs(v))), -14);
  const step = 2 ** (e - 10);
  return Math.round(v / step) * step;
}

/**
 * A bisection case's run (variant_codes.ts's bisectVariant) on `p`, every element against float64:
 * the left operand as its row loader sees it (the batch's rows reversed for 'rows', SwiGLU of h
 * rounded to f16 for 'act', 0 on padding rows and past the rows in use when grouped).
 */
function bisectRun(device: GPUDevice, p: Problem, o: BisectOptions): Run {
  const v = bisectVariant(p, o);
  const { batch, M, N, K } = p;
  const a = sixtyFourths(batch * M * K);
  const b = sixtyFourths(batch * K * N);
  const h = sixtyFourths(batch * M * 2 * K);
  const rowsInUse = o.grouped ? M - 128 : M;
  const left = (z: number, r: number, k: number): number => {
    if (o.grouped && (isPaddingRow(r) || r >= rowsInUse)) return 0;
    if (o.left === 'act') {
      const base = (z * M + r) * 2 * K;
      const g = h[base + k], u = h[base + K + k];
      return roundHalf(g / (1 + Math.exp(-g)) * u);
    }
    return a[(z * M + (o.left === 'rows' ? M - 1 - r : r)) * K + k];
  };
  const points = Array.from({ length: batch * M * N }, (_, i) => i);
  const expected = points.map(i => {
    const z = Math.floor(i / (M * N)), r = Math.floor(i / N) % M, n = i % N;
    let sum = 0;
    for (let k = 0; k < K; k++) sum += left(z, r, k) * b[(z * K + k) * N + n];
    return sum;
  });
  const C = storage(device, batch * M * N * 4);
  const W = o.weight === 'bf16' ? storage(device, new Int32Array(bf16Words(b).buffer)) : storage(device, b);
  const A = o.left === 'act' ? storage(device, h) : storage(device, a);
  const dims = storage(device, Int32Array.of(K, rowsInUse, 0, 0));
  return { code: v.code, buffers: [storage(device, a), storage(device, b), C, W, A, dims], out: C,
    dispatch: [N / v.blockCols, M / v.blockRows, batch], flops: 2 * batch * M * N * K,
    check: relativeCheck(points, expected, i => [Math.floor(i / N) % M, i % N]) };
}

/**
 * The package program's run on `g`: inputs, uniforms (the stand-in preamble's struct, in the order
 * of the program's `uniforms`), and the float64 reference. MatMul: padding rows, the unused block
 * and nothing else must come out 0.
 */
function groupedRun(device: GPUDevice, spec: Extract<CaseSpec, { kind: 'package' }>, dryRun: boolean): Run {
  const g = spec.shape;
  const { E, perExpert, real, N, K } = g;
  const grad = spec.program === 'weightGrad';
  const rows = E * perExpert + (grad ? 0 : g.unused);
  const bf16 = !grad && g.weight === 'bf16';
  const kn = !grad && g.layout === 'kn';
  // W_e(k, n) at e·sE + n·sN + k·sK (sE in words when packed)
  const [sN, sK] = kn ? [1, N] : [K, 1];
  const sE = bf16 ? N * K / 2 : N * K;
  const packedWeight = bf16 ? { kind: 'bf16' as const, cols: kn ? N : K, layout: null } : undefined;
  const element = g.staging === 'element' || spec.code === 'db64af4';
  const structure = (s: ReturnType<typeof matMulStaging>) => (g.structure === 'v5' ? v5Structure(s) : g.structure === 'v6' ? v6Staging(s) : s);
  const program = grad
    ? new SubgroupMatrixWeightGradProgram([E, N, K], E, N, K, { left: 'rows', right: 'rows', scaleLeft: false, scaled: false }, 32,
        element ? ELEMENT_STAGING : structure(weightGradStaging({ P: N, Q: K })), g.depth ?? 64)
    : new SubgroupMatrixMatMulProgram(rows, N, { source: 'rows', hasBias: false, hasAddend: false, kContiguous: !kn, scaled: false, packedWeight }, 32,
        element ? ELEMENT_STAGING : structure(matMulStaging({ packedWeight }, { inner: K, outCols: N, sE, sN, sK }, g.left === 'half')), g.blockRows ?? 128);
  const halfA = !grad && g.left === 'half';
  const userCode = spec.code === 'db64af4' ? (grad ? OLD_WEIGHT_GRAD_ROWS : OLD_MATMUL_ROWS)
    : g.edit === 'direct-only' ? directOnly(program.getUserCode()) : undefined;
  const shader = packageProgramShader(program, { entry: spec.entry, userCode, packedW: bf16, packedA: halfA });
  // Mesa: f32 stand-in slabs at a quarter of their length, within its 32 KiB (its numbers are no product anyway)
  const code = dryRun ? shrinkSlabs(standInMatrices(shader)) : shader;
  const isReal = (row: number) => row < E * perExpert && row % perExpert < real;
  const pr = Int32Array.from({ length: rows }, (_, row) => (isReal(row) ? row : -1));
  // the plan's seg: E + 1 group starts (the last: rows in use), then E real counts
  const seg = Int32Array.from([...Array.from({ length: E + 1 }, (_, e) => e * perExpert), ...Array(E).fill(real)]);
  const uniformData = new ArrayBuffer(48);
  let points: number[];
  let expected: number[];
  let buffers: GPUBuffer[];
  if (grad) {
    // L [rows, N], R [rows, K]; dW [E, N, K]
    const l = sixtyFourths(rows * N), r = sixtyFourths(rows * K);
    new Int32Array(uniformData, 0, 7).set([N, K, 1, E, N * K, K, 1]);
    new Float32Array(uniformData, 28, 3).set([1, 0, 0]);
    const at = g.everyElement ? Array.from({ length: E * N * K }, (_, i) => i)
      : Array.from({ length: 512 }, () => Math.floor(rand() * E * N * K));
    points = at;
    expected = at.map(i => {
      const e = Math.floor(i / (N * K)), p = Math.floor(i / K) % N, q = i % K;
      let s = 0;
      for (let row = e * perExpert; row < e * perExpert + real; row++) s += l[row * N + p] * r[row * K + q];
      return s;
    });
    buffers = [storage(device, E * N * K * 4), storage(device, l), storage(device, r), storage(device, seg)];
  } else {
    // A [rows, K], W [E, N, K] or [E, K, N] (f32, or bf16 halves in int32 words: multiples of 1/64 are exact in both); out [rows, N]
    const a = sixtyFourths(rows * K), w = sixtyFourths(E * N * K);
    new Int32Array(uniformData, 0, 8).set([rows, N, K, 1, E, sE, sN, sK]);
    new Float32Array(uniformData, 32, 3).set([1, 0, 0]);
    // sampled: 32 of the samples on padding rows, which must be 0
    const padding = Array.from({ length: rows }, (_, row) => row).filter(row => !isReal(row));
    const at = g.everyElement ? Array.from({ length: rows * N }, (_, i) => i)
      : Array.from({ length: 512 }, (_, i) => (i < 32 && padding.length
        ? padding[Math.floor(rand() * padding.length)] * N + Math.floor(rand() * N)
        : Math.floor(rand() * rows * N)));
    points = at;
    expected = at.map(i => {
      const row = Math.floor(i / N), n = i % N;
      if (!isReal(row)) return 0;
      const e = Math.floor(row / perExpert);
      let s = 0;
      for (let k = 0; k < K; k++) s += a[row * K + k] * w[e * N * K + n * sN + k * sK];
      return s;
    });
    const W = bf16 ? storage(device, new Int32Array(bf16Words(w).buffer)) : storage(device, w);
    buffers = [storage(device, rows * N * 4), storage(device, halfA ? halves(a) : a), W, storage(device, seg), storage(device, pr)];
  }
  const uniforms = device.createBuffer({ size: 48, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
  device.queue.writeBuffer(uniforms, 0, uniformData);
  return { code, buffers, out: buffers[0], uniforms, dispatch: program.dispatch,
    check: relativeCheck(points, expected, grad ? i => [Math.floor(i / K) % N, i % K] : i => [Math.floor(i / N), i % N]),
    flops: 2 * E * (grad ? real : perExpert) * N * K };
}

/**
 * A v6 bisection case (variant_codes.ts's groupedGemmVariant) on `p`: A [E·M, K] (f32 or f16, only
 * the one the case reads; the other bound as 16 bytes), B per expert in the case's layout and format,
 * Info (the blocks' experts, then each row's source row: its expert's rows reversed), 512 sampled
 * outputs against float64.
 */
function groupedGemmRun(device: GPUDevice, p: GroupedProblem, o: GroupedGemmOptions): Run {
  const v = groupedGemmVariant(p, o);
  const { E, M, N, K } = p;
  const rows = E * M;
  const a = sixtyFourths(rows * K);
  const w = sixtyFourths(E * K * N);
  const b = o.b ?? 'f16-kn';
  // B_e(k, n) at e·K·N + n·sN + k·sK
  const [sN, sK] = b === 'f16-kn' ? [1, N] : [K, 1];
  const blocks = groupedBlocks(p);
  const info = new Int32Array(blocks + rows);
  for (let i = 0; i < blocks; i++) info[i] = Math.floor(i * 128 / M);
  for (let r = 0; r < rows; r++) info[blocks + r] = groupedSourceRow(p, r);
  const srcRow = (r: number) => (o.rowTable ? groupedSourceRow(p, r) : r);
  const samples = Array.from({ length: 512 }, () => Math.floor(rand() * rows * N));
  const expected = samples.map(i => {
    const r = Math.floor(i / N), n = i % N, e = Math.floor(r / M), src = srcRow(r);
    let s = 0;
    for (let k = 0; k < K; k++) s += a[src * K + k] * w[e * K * N + n * sN + k * sK];
    return s;
  });
  const tiny = () => storage(device, 16);
  const B = b === 'f32-nk' ? storage(device, w) : b === 'bf16-nk' ? storage(device, bf16Words(w)) : storage(device, halves(w));
  const C = storage(device, rows * N * 4);
  const dims = device.createBuffer({ size: 32, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
  device.queue.writeBuffer(dims, 0, Int32Array.of(K, N, sN, sK, K * N, rows, 0, 0));
  return { code: v.code, buffers: [o.aF32 ? storage(device, a) : tiny(), o.aF32 ? tiny() : storage(device, halves(a)), B, C, storage(device, info)],
    uniforms: dims, out: C, dispatch: groupedGemmDispatch(p, o), flops: 2 * rows * N * K,
    check: relativeCheck(samples, expected, i => [Math.floor(i / N), i % N]) };
}

/**
 * A v7 case's run (variant_codes.ts's v7Variant) on `p`: A [rows, K] and W [E, N, K] in the
 * variant's formats (only those it reads), Info (each block's expert, −1 past the experts, then
 * each row's source row, v7SourceRow), and the float64 reference on every element or 512 samples.
 */
function v7Run(device: GPUDevice, p: V7Problem, o: V7Options, everyElement: boolean): Run {
  const v = v7Variant(p, o);
  const l = v7Layout(o);
  const { E, M, N, K } = p;
  const rows = E * M + p.unused;
  // Q's operands: shared by the batch's cases (the small problem's: made here, in a moment)
  const a = everyElement ? sixtyFourths(rows * K) : sharedSixtyFourths('a', rows * K, 101);
  const w = everyElement ? sixtyFourths(E * N * K) : sharedSixtyFourths('w', E * N * K, 202);
  const blocks = v7Blocks(p, l.rows);
  const info = new Int32Array(blocks + rows);
  for (let b = 0; b < blocks; b++) info[b] = b * l.rows < E * M ? Math.floor(b * l.rows / M) : -1;
  for (let r = 0; r < rows; r++) info[blocks + r] = v7SourceRow(p, r);
  const points = everyElement ? Array.from({ length: rows * N }, (_, i) => i) : Array.from({ length: 512 }, () => Math.floor(rand() * rows * N));
  const expected = points.map(i => {
    const r = Math.floor(i / N), n = i % N, src = v7SourceRow(p, r);
    if (src < 0) return 0;
    const e = Math.floor(r / M);
    let s = 0;
    for (let k = 0; k < K; k++) s += a[src * K + k] * w[(e * N + n) * K + k];
    return s;
  });
  const A = o.a === 'f32' ? storage(device, a) : storage(device, halves(a));
  const W = o.b === 'f32' ? storage(device, w) : o.b === 'bf16' ? storage(device, bf16Words(w)) : storage(device, halves(w));
  const C = storage(device, rows * N * 4);
  const dims = device.createBuffer({ size: 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
  device.queue.writeBuffer(dims, 0, Uint32Array.of(K, N, N * K, 0));
  return { code: v.code, buffers: [A, W, C, storage(device, info)], uniforms: dims, out: C, dispatch: v7Dispatch(p, o),
    flops: 2 * rows * N * K, check: relativeCheck(points, expected, i => [Math.floor(i / N), i % N]) };
}

/**
 * The conversion pass's run: `elements` multiples of 1/64 (f32) to f16 bits, 4096 sampled halves
 * (all of them when fewer) against halfBits; bytes moved: 4 read and 2 written per value.
 */
function convertRun(device: GPUDevice, elements: number): Run {
  const f = sixtyFourths(elements);
  const groups = elements / 8 / 256;
  const dispatch: [number, number, number] = [Math.min(groups, 32768), Math.ceil(groups / 32768), 1];
  const out = storage(device, elements * 2);
  const dims = device.createBuffer({ size: 16, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST });
  device.queue.writeBuffer(dims, 0, Uint32Array.of(elements, 0, 0, 0));
  const points = elements <= 4096 ? Array.from({ length: elements }, (_, i) => i) : Array.from({ length: 4096 }, () => Math.floor(rand() * elements));
  return { code: conversionPass().code, buffers: [storage(device, f), out], uniforms: dims, out, dispatch, flops: 0, bytes: elements * 6,
    check: (c, entry) => {
      const got = new Uint16Array(c.buffer, c.byteOffset, elements);
      // by value: −0 (a rounded −1/256) converts to f16's −0, which halfBits writes as +0
      const wrong = points.filter(i => halfValue(got[i]) !== f[i]);
      if (entry) Object.assign(entry, { checked: points.length, wrong: wrong.length, firstWrong: wrong.slice(0, 4).map(i => ({ i, got: halfValue(got[i]), want: f[i] })) });
      return wrong.length ? 1 : 0;
    } };
}

/** The f32 stand-in's slabs at a quarter of their length: within Mesa's 32 KiB of workgroup memory. */
function shrinkSlabs(code: string): string {
  return code.replace(/(var<workgroup> [AB]s : array<f32, )(\d+)>/g, (_, head: string, n: string) => `${head}${Math.floor(Number(n) / 4)}>`);
}

/** On Mesa (the harness), the matrices stood in for and the slabs shrunk, as for the package cases. */
function harnessed(run: Run): Run {
  return harness ? { ...run, code: shrinkSlabs(standInMatrices(run.code)) } : run;
}

function gemmRun(device: GPUDevice, p: Problem, v: Variant): Run {
  const a = sixtyFourths(p.batch * p.M * p.K);
  const b = sixtyFourths(p.batch * p.K * p.N);
  const samples = Array.from({ length: 512 }, () => [Math.floor(rand() * p.batch), Math.floor(rand() * p.M), Math.floor(rand() * p.N)]);
  const expected = samples.map(([z, r, col]) => {
    let s = 0;
    for (let k = 0; k < p.K; k++) s += a[(z * p.M + r) * p.K + k] * b[(z * p.K + k) * p.N + col];
    return s;
  });
  const A16 = storage(device, halves(a)), B16 = storage(device, halves(b));
  const C = storage(device, p.batch * p.M * p.N * 4);
  // bindings 5, 6: the f16 buffers again, read as vec4<f16>
  return { code: v.code, buffers: [storage(device, a), storage(device, b), A16, B16, C, A16, B16], out: C,
    dispatch: [p.N / v.blockCols, p.M / v.blockRows, p.batch], flops: 2 * p.batch * p.M * p.N * p.K,
    check: relativeCheck(samples.map(([z, r, col]) => (z * p.M + r) * p.N + col), expected, i => [Math.floor(i / p.N) % p.M, i % p.N]) };
}

/**
 * Every Dawn instance made, kept for the life of the process: an instance collected while another
 * works (the Vulkan one that found no adapter on Mesa) brought the process down in a later
 * getCompilationInfo.
 */
const instances: GPU[] = [];

async function requestAdapter(hold = true): Promise<GPUAdapter> {
  const instance = (flags: string[]) => {
    const gpu = create(flags);
    if (hold) instances.push(gpu);
    return gpu;
  };
  // Vulkan (the GPU machine); else Mesa's GL
  const adapter = await instance(FLAGS).requestAdapter({ powerPreference: 'high-performance' }) ??
      await instance([...FLAGS, 'backend=opengles']).requestAdapter({ featureLevel: 'compatibility' });
  if (!adapter) throw new Error('no adapter');
  return adapter;
}

const WANTED: GPUFeatureName[] = ['shader-f16', 'chromium-experimental-subgroup-matrix' as GPUFeatureName, 'subgroups' as GPUFeatureName, 'timestamp-query'];

async function child(id: string): Promise<void> {
  const c = [...CASES, ...BISECT_CASES, ...HARNESS_CASES, ...V7_CASES, HARNESS_V7_CONVERT, ...FEW_ROWS_CASES, ...PORT_CASES, ...HALF_CASES].find(x => x.id === id);
  if (!c) throw new Error(`variants: no case ${id}`);
  const entry: Record<string, unknown> = {};
  tell({ phase: 'adapter' });
  const adapter = await requestAdapter(!c.dropInstance);
  const features = WANTED.filter(f => adapter.features.has(f));
  const device = await adapter.requestDevice({ requiredFeatures: harness ? [] : features,
    requiredLimits: { maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize,
      maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize, maxBufferSize: adapter.limits.maxBufferSize,
      // v7's 8-subgroup blocks and the conversion pass: 256 invocations a workgroup
      maxComputeWorkgroupSizeX: adapter.limits.maxComputeWorkgroupSizeX,
      maxComputeInvocationsPerWorkgroup: adapter.limits.maxComputeInvocationsPerWorkgroup } });
  if (c.spec.kind === 'v7' || c.spec.kind === 'convert') {
    await v7Child(device, c.spec, entry);
    tell({ result: entry });
    device.destroy();
    return;
  }
  tell({ phase: 'inputs' });
  const run = c.spec.kind === 'package' ? groupedRun(device, c.spec, harness)
    : c.spec.kind === 'bisect' ? harnessed(bisectRun(device, c.spec.problem, c.spec.options))
    : c.spec.kind === 'grouped-gemm' ? harnessed(groupedGemmRun(device, c.spec.problem, c.spec.options))
    : gemmRun(device, c.spec.problem, c.spec.variant(c.spec.problem));
  if (c.dropInstance) {
    tell({ phase: 'gc' });
    (globalThis as { gc?: () => void }).gc?.();
  }
  await runOnce(device, entry, run, c.spec.kind === 'bisect' ? 'none' : c.spec.kind === 'grouped-gemm' ? 'timestamps' : c.spec.timing);
  tell({ result: entry });
  device.destroy();
}

/**
 * A v7 case in its child: the variant on the small problem (every element; on Mesa with the
 * matrices stood in for, no product), then on the GPU at Q's up shape (512 samples, timed) into
 * `entry`; a variant needing more workgroup memory than the device has is reported, not run.
 * The conversion pass: checked and timed.
 */
async function v7Child(device: GPUDevice, spec: Extract<CaseSpec, { kind: 'v7' | 'convert' }>, entry: Record<string, unknown>): Promise<void> {
  if (spec.kind === 'convert') {
    tell({ phase: 'inputs' });
    await runOnce(device, entry, convertRun(device, spec.elements), 'timestamps');
    return;
  }
  const bytes = v7WorkgroupBytes(v7Layout(spec.options));
  entry.workgroupBytes = bytes;
  if (!harness && bytes > device.limits.maxComputeWorkgroupStorageSize) {
    entry.error = `needs ${bytes} bytes of workgroup memory, the device has ${device.limits.maxComputeWorkgroupStorageSize}`;
    return;
  }
  tell({ phase: 'inputs small' });
  const small: Record<string, unknown> = {};
  await runOnce(device, small, harnessed(v7Run(device, V7_SMALL, spec.options, true)), 'none', false);
  // the errors so far (the device's listeners keep collecting into every run's list)
  entry.small = harness ? { noProduct: 'matrices stood in for (Mesa)', compileErrors: small.compileErrors, deviceErrors: [...(small.deviceErrors as string[])] }
    : { rel: small.maxRelError, wrong: small.wrong, of: small.checked, ...(small.wrong ? { firstWrong: small.firstWrong } : {}),
    ...(small.compileErrors ? { compileErrors: small.compileErrors } : {}), ...((small.deviceErrors as string[]).length ? { deviceErrors: [...(small.deviceErrors as string[])] } : {}) };
  tell({ partial: entry });
  if (harness || small.compileErrors) return;
  tell({ phase: 'inputs Q' });
  await runOnce(device, entry, v7Run(device, V7_Q, spec.options, false), 'timestamps');
}

// ---- the parent: every case in its own process ------------------------------------------------

interface Outcome extends Record<string, unknown> { id: string; name: string }

function runCase(c: Case): Promise<Outcome> {
  return new Promise(resolve => {
    const outcome: Outcome = { id: c.id, name: c.name };
    const t0 = Date.now();
    // the same script (the bundle, or tsx's loader in execArgv), one case
    const proc = spawn(process.execPath, [...process.execArgv, ...(c.dropInstance ? ['--expose-gc'] : []), process.argv[1]], {
      env: { ...process.env, VARIANT_CASE: c.id }, stdio: ['ignore', 'pipe', 'pipe'] });
    let pending = '';
    const stderrTail: string[] = [];
    proc.stdout.on('data', (chunk: Buffer) => {
      pending += chunk.toString();
      const lines = pending.split('\n');
      pending = lines.pop()!;
      for (const line of lines) {
        try {
          const m = JSON.parse(line) as { phase?: string; partial?: object; result?: object };
          if (m.phase) outcome.lastPhase = m.phase;
          if (m.partial) Object.assign(outcome, m.partial);
          if (m.result) Object.assign(outcome, m.result, { done: true });
        } catch {
          stderrTail.push(line.slice(0, 300));
        }
      }
    });
    proc.stderr.on('data', (chunk: Buffer) => {
      for (const line of chunk.toString().split('\n')) if (line.trim()) stderrTail.push(line.slice(0, 300));
      stderrTail.splice(0, Math.max(0, stderrTail.length - 8));
    });
    // the dropped instance may hang rather than crash (it does on Mesa): less of the budget for it
    const timeout = c.dropInstance ? CASE_TIMEOUT_MS / 2 : CASE_TIMEOUT_MS;
    const timer = setTimeout(() => { outcome.timedOut = true; proc.kill('SIGKILL'); }, timeout);
    proc.on('close', (code, signal) => {
      clearTimeout(timer);
      outcome.seconds = (Date.now() - t0) / 1000;
      if (signal && !outcome.timedOut) Object.assign(outcome, { crashed: true, signal });
      else if (code !== 0 && !outcome.timedOut) Object.assign(outcome, { crashed: true, exitCode: code });
      if (!outcome.done || outcome.crashed) outcome.stderrTail = stderrTail;
      resolve(outcome);
    });
  });
}

async function parent(): Promise<void> {
  const report: Record<string, unknown> = { check: 'webgpu_tc variants v7', budgetMs: TIME_BUDGET_MS, caseTimeoutMs: CASE_TIMEOUT_MS };
  const write = (name: string) => {
    if (process.env.OUT) writeFileSync(join(process.env.OUT, name), JSON.stringify(report, null, 1));
  };
  const adapter = await requestAdapter();
  report.adapter = (adapter.info as unknown as { description?: string }).description;
  report.features = WANTED.filter(f => adapter.features.has(f));
  const lacking = ['shader-f16', 'chromium-experimental-subgroup-matrix'].filter(f => !adapter.features.has(f));
  report.maxComputeWorkgroupStorageSize = adapter.limits.maxComputeWorkgroupStorageSize;
  let cases = CASES;
  if (lacking.length > 0) {
    report.noSubgroupMatrix = `no subgroup matrix: the adapter lacks ${lacking.join(' and ')}`;
    process.stderr.write(`[variants ${elapsed()}s] ${report.noSubgroupMatrix}\n`);
    cases = harness ? HARNESS_CASES : [];
  }
  // the pool a selection draws from: on Mesa only the dry run's cases (v7's run their small problem, matrices
  // stood in for; issue 15's few-row cases likewise)
  const pool = lacking.length > 0 ? (harness ? [...HARNESS_CASES, ...V7_CASES.filter(c => c.spec.kind === 'v7'), HARNESS_V7_CONVERT, ...FEW_ROWS_CASES, ...HALF_CASES] : [])
    : [...CASES, ...BISECT_CASES, ...V7_CASES, ...FEW_ROWS_CASES, ...PORT_CASES, ...HALF_CASES];
  const only = process.env.VARIANT_CASES === 'few-rows' ? FEW_ROWS_CASES.map(c => c.id) : process.env.VARIANT_CASES?.split(',');
  if (only) cases = pool.filter(c => only.includes(c.id));
  // `variants.js v7`: the v7 batch and its baselines; `variants.js port`: PORT_CASES (on Mesa with VARIANTS_HARNESS=1,
  // their small problems with the matrices stood in for); any other argument: a regular expression over the case ids
  const filter = process.argv[2];
  if (filter === 'v7') cases = pool.filter(c => V7_FILTER_BASELINES.includes(c.id) || c.id.startsWith('v7-'));
  else if (filter === 'port') {
    cases = lacking.length > 0 ? (harness ? PORT_CASES.filter(c => c.spec.kind === 'package' && c.spec.timing === 'none') : []) : PORT_CASES;
  }
  else if (filter) cases = pool.filter(c => new RegExp(filter).test(c.id));
  report.filter = filter ?? process.env.VARIANT_CASES ?? null;
  const results: Outcome[] = [];
  report.results = results;
  for (const c of cases) {
    if (Date.now() - started > TIME_BUDGET_MS) { results.push({ id: c.id, name: c.name, skipped: 'out of time budget' }); continue; }
    process.stderr.write(`[variants ${elapsed()}s] ${c.id}: ${c.name}\n`);
    const o = await runCase(c);
    results.push(o);
    const brief = { small: o.small, rel: o.maxRelError, wrong: o.wrong, of: o.checked, byPart: o.wrongByPart,
      tflops: typeof o.tflops === 'number' ? Number(o.tflops.toFixed(1)) : undefined, ms: o.ms, gbps: typeof o.gbps === 'number' ? Math.round(o.gbps) : undefined, crashed: o.crashed, signal: o.signal, timedOut: o.timedOut, lastPhase: o.done ? undefined : o.lastPhase,
      err: o.error ?? o.compileErrors ?? (o.deviceErrors as string[] | undefined)?.[0] };
    process.stderr.write(`[variants ${elapsed()}s] ${c.id}: ${JSON.stringify(brief)}\n`);
    write('variants.partial.json');
  }
  for (const name of readdirSync(tmpdir()).filter(f => f.startsWith(SHARED_PREFIX))) unlinkSync(join(tmpdir(), name));
  report.elapsedMs = Date.now() - started;
  process.stdout.write(JSON.stringify(report, null, 1) + '\n');
  write('variants.json');
}

const caseId = process.env.VARIANT_CASE;
if (caseId) {
  child(caseId).then(() => process.exit(0), err => { tell({ result: { error: String(err?.stack ?? err).slice(0, 800) } }); process.exit(0); });
} else {
  parent().then(() => process.exit(0), err => { process.stdout.write(JSON.stringify({ fatal: String(err?.stack ?? err) }) + '\n'); process.exit(0); });
}
