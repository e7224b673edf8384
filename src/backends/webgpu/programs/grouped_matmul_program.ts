/**
 * The grouped products over expert-sorted padded rows, one dispatch for all experts.
 *
 * GroupedMatMulProgram: out[r, n] = alpha·Σ_k A(r, k)·W_e(k, n) (+ bias[e, n]) (+ addend[r, n])
 * for every padded row r, e = the expert of r's tile. A(r, k) is read through the plan ('gather':
 * x or dOut rows of the pair's token, the gather fused into the load), from padded rows ('rows'),
 * or as the activation of h computed on load ('act': SwiGLU / gpt-oss's clamped GLU, so a = act(h)
 * is never stored). W_e(k, n) = W[e·sE + n·sN + k·sK]: the strides (uniforms) cover W and Wᵀ in
 * both expert layouts and PEFT's LoRA factors (A [r·E, in], B [out, r·E] rank-major) without
 * copies. Padding rows get 0; tiles past the rows in use write 0 and skip the product. With
 * `packedWeight`, W is a packed expert weight's int32 words (bf16/f16 halves, src/ops/packed.ts, or
 * quantized codes and scales, src/ops/quantized.ts) and each element is decoded as it is loaded
 * into the slab, so no float32 copy of the experts exists: expert e's words start at e·sE (sE
 * counts words there) and W_e(k, n) is its element j = n·sN + k·sK.
 *
 * GroupedWeightGradProgram: dW[e](p, q) = alpha·Σ_{real rows r of e} L(r, p)·R(r, q), written at
 * e·oE + p·oP + q·oQ (any layout, PEFT's B included); L and R come gathered, from padded rows or
 * (R) as the activation, and L may be scaled by the pair's routing weight. Experts with no rows
 * get zeros.
 *
 * Both tile the output 16·TM × 16·TN per workgroup of 16×16 threads with a BK-deep slab of each
 * operand in workgroup memory; thread (tx, ty) owns rows ty + 16·i and columns tx + 16·j, which
 * keeps the workgroup-memory reads free of bank conflicts and the output writes coalesced.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import {
  ACTIVATION_UNIFORMS, type ActivationSpec, activationKey, activationSnippet, EXPERT_OF_ROW, GROUPED_MATMUL_UNIFORMS, LORA_TAIL_UNIFORMS,
  packedElementSnippet, packedWeightKey, type PackedWeightSpec, type RowSource, TILE_THREADS,
} from './shared.js';

/**
 * Register tile per thread (tm × tn outputs) and slab depth bk. The row tile (16·tm) must divide
 * the plan's row tile. With `vec4`, thread (tx, ty) owns a contiguous tm × tn block and reads the
 * slabs as vec4 (tm, tn multiples of 4); otherwise it owns rows ty + 16·i and columns tx + 16·j.
 */
export interface TileConfig { tm: number; tn: number; bk: number; vec4?: boolean }

export function tileKey(t: TileConfig): string {
  return `${t.tm}x${t.tn}x${t.bk}${t.vec4 ? 'v' : ''}`;
}

const THREADS = TILE_THREADS * TILE_THREADS;
const LANES = 'xyzw';

/**
 * One operand's bk-deep slab in workgroup memory, `width` wide. Each row of the slab is padded by
 * one element (one vec4), so that the transposing stores of a load that walks k fastest do not
 * all land on one bank.
 */
class Slab {
  readonly stride: number;
  constructor(readonly name: string, readonly depth: number, readonly width: number, readonly vec4: boolean) {
    this.stride = vec4 ? width / 4 + 1 : width + 1;
  }

  declaration(): string {
    return `var<workgroup> ${this.name} : array<${this.vec4 ? 'vec4<f32>' : 'f32'}, ${this.depth * this.stride}>;`;
  }

  store(k: string, m: string, v: string): string {
    return this.vec4
      ? `${this.name}[${k} * ${this.stride} + ${m} / 4][${m} % 4] = ${v};`
      : `${this.name}[${k} * ${this.stride} + ${m}] = ${v};`;
  }

  /** WGSL of the element at depth k, column m (both WGSL expressions). */
  at(k: string, m: string): string {
    return this.vec4 ? `${this.name}[${k} * ${this.stride} + ${m} / 4][${m} % 4]` : `${this.name}[${k} * ${this.stride} + ${m}]`;
  }

  /** WGSL lets of this thread's `count` operand values at depth kk: `${prefix}0`, ... */
  loads(prefix: string, owner: string, count: number): string[] {
    if (!this.vec4) {
      return Array.from({ length: count }, (_, i) =>
        `let ${prefix}${i} = ${this.name}[kk * ${this.stride} + ${owner} + ${TILE_THREADS * i}];`);
    }
    return Array.from({ length: count / 4 }, (_, i) =>
      `let ${prefix}v${i} = ${this.name}[kk * ${this.stride} + ${owner} * ${count / 4} + ${i}];`);
  }

  value(prefix: string, i: number): string {
    return this.vec4 ? `${prefix}v${i >> 2}.${LANES[i & 3]}` : `${prefix}${i}`;
  }
}

/** The output row (column) of this thread's i-th register row (column). */
function owned(tile: TileConfig, base: string, thread: string, i: string, count: number): string {
  return tile.vec4 ? `${base} + ${thread} * ${count} + ${i}` : `${base} + ${thread} + ${TILE_THREADS} * ${i}`;
}

/** acc += a·bᵀ over the slab depth, unrolled over the register tile. */
function accumulateSnippet(tile: TileConfig, a: Slab, b: Slab): string {
  const { tm, tn, bk } = tile;
  const fmas: string[] = [];
  for (let i = 0; i < tm; i++) {
    for (let j = 0; j < tn; j++) {
      fmas.push(`acc[${i * tn + j}] = fma(${a.value('a', i)}, ${b.value('b', j)}, acc[${i * tn + j}]);`);
    }
  }
  return `
        for (var kk = 0; kk < ${bk}; kk++) {
          ${a.loads('a', 'ty', tm).join('\n          ')}
          ${b.loads('b', 'tx', tn).join('\n          ')}
          ${fmas.join('\n          ')}
        }`;
}

/**
 * Register prefetch of one operand's slab: this thread's share of the depth × width elements,
 * element i = lid + 256·t, unrolled into `${reg}${t}`. Loading slab k+1 into registers while the
 * product runs on slab k hides the global-memory latency behind the arithmetic.
 */
class Fetch {
  readonly count: number;
  private readonly guarded: boolean;
  constructor(readonly reg: string, readonly total: number,
      private readonly index: string, private readonly load: (k0: string) => string) {
    this.count = Math.ceil(total / THREADS);
    this.guarded = total % THREADS !== 0;
  }

  declarations(): string {
    return Array.from({ length: this.count }, (_, t) => `var ${this.reg}${t} = 0.0;`).join('\n        ');
  }

  private each(body: (t: number) => string): string {
    return Array.from({ length: this.count }, (_, t) => `{
          let i = lid + ${THREADS * t};
          ${this.guarded ? `if (i < ${this.total}) {` : '{'}
            ${this.index}
            ${body(t)}
          }
        }`).join('\n        ');
  }

  /** loads slab k0 into the registers (`load` assigns the element to `v`) */
  fetch(k0: string): string {
    return this.each(t => `var v = 0.0;\n            ${this.load(k0)}\n            ${this.reg}${t} = v;`);
  }

  /** stores the registers into the slab */
  store(slab: Slab, k: string, m: string): string {
    return this.each(t => slab.store(k, m, `${this.reg}${t}`));
  }
}

/**
 * WGSL of the weight element load into `v` (wBase: the expert's first element, or word when
 * packed; n, k in scope). Float32 reads W directly; packed (16-bit halves or quantized codes and
 * scales) decodes element j of the expert's words (packedElementSnippet). Shared with the
 * subgroup-matrix program, so both decode every packed kind the same way.
 */
export function weightLoadSnippet(packed: PackedWeightSpec | undefined): { fn: string; assign: string } {
  if (packed === undefined) return { fn: '', assign: 'v = W[wBase + n * uniforms.sN + k * uniforms.sK];' };
  return {
    fn: packedElementSnippet(packed, 'W', 'loadPackedW'),
    assign: 'v = loadPackedW(wBase, n * uniforms.sN + k * uniforms.sK);',
  };
}

/**
 * WGSL: loadA(m, k), the tile's row m at column k, through the workgroup array rowSrc (the source
 * row, −1 on padding). Shared with the subgroup-matrix program.
 */
export function rowLoadSnippet(source: RowSource, activation: ActivationSpec | undefined): string {
  switch (source) {
    case 'gather':
    case 'rows':
      return `
          fn loadA(m : i32, k : i32) -> f32 {
            let src = rowSrc[m];
            if (src < 0) { return 0.0; }
            return A[src * uniforms.inner + k];
          }`;
    case 'act':
      return `
          ${activationSnippet(activation!)}
          fn loadA(m : i32, k : i32) -> f32 {
            let src = rowSrc[m];
            if (src < 0) { return 0.0; }
            let base = src * 2 * uniforms.inner;
            return actForward(A[base + gateIndex(k, uniforms.inner)], A[base + upIndex(k, uniforms.inner)]);
          }`;
  }
}

export interface GroupedMatMulSpec {
  source: RowSource;
  /** the activation, when source is 'act' */
  activation?: ActivationSpec;
  hasBias: boolean;
  hasAddend: boolean;
  /** W's reduction stride is 1 (an [out, in] weight): the slab is loaded along k */
  kContiguous: boolean;
  tile: TileConfig;
  /**
   * W holds packed 16-bit halves or quantized codes and scales (int32 words, sE in words) decoded
   * on load; absent: float32. Only frozen weights are packed, so only this program (never the
   * weight gradient) reads them.
   */
  packedWeight?: PackedWeightSpec;
  /**
   * One group over plain rows (a dense projection, MoEPackedDenseMatMul): no plan inputs (seg,
   * pr); the tile's expert is 0 (sE 0), row r is A's row r for r < numRows; source must be 'rows'.
   */
  singleGroup?: boolean;
  /**
   * A LoRA branch's expansion added in the epilogue: each output (r, c) of expert e gets
   * tailScale·Σ_k T(r, k)·V_e(k, c) before alpha (inputs tailA = T [rows, rank], tailW = V;
   * LORA_TAIL_UNIFORMS), instead of a second product that reads and writes the output again.
   */
  loraTail?: boolean;
}

/**
 * WGSL of tileRowsSnippet for a single group: expert 0, row r of A for r < numRows. Shared with
 * the subgroup-matrix program (`uniformSteps` as in tileRowsSnippet), whose uniform groups (a
 * batch of equal groups, no plan) give `group`, the tile's group as a WGSL expression of row0.
 */
export function singleGroupRowsSnippet(rows: number, threads = THREADS, uniformSteps = false, group = '0'): string {
  const row = `rowSrc[m] = select(-1, row0 + m, row0 + m < uniforms.numRows);`;
  const loop = uniformSteps
    ? `for (var step = 0; step < ${Math.ceil(rows / threads)}; step++) {
          let m = lid + step * ${threads};
          if (m < ${rows}) {
            ${row}
          }
        }`
    : `for (var m = lid; m < ${rows}; m += ${threads}) {
          ${row}
        }`;
  return `if (lid == 0) { tileExpert = ${group}; }
        ${loop}`;
}

/**
 * WGSL (inside main, with lid and row0 set): the tile's expert into `tileExpert` (−1 past the last
 * group) and the source row of each of its `rows` rows into `rowSrc` (−1 on padding), once per
 * tile instead of a plan lookup per element; a workgroupUniformLoad of tileExpert publishes both.
 * `uniformSteps` (the subgroup-matrix programs): the row loop takes the same number of steps in
 * every invocation, as the matrix operations after it need (rather than one that stops at `rows`
 * at a different step for each).
 */
export function tileRowsSnippet(source: RowSource, rows: number, threads: number, uniformSteps = false): string {
  const rowSource = source === 'gather' ? 'p / uniforms.topK' : 'r';
  const row = `let r = row0 + m;
          var src = -1;
          if (r < uniforms.numRows) {
            let p = pr[r];
            if (p >= 0) { src = ${rowSource}; }
          }
          rowSrc[m] = src;`;
  const loop = uniformSteps
    ? `for (var step = 0; step < ${Math.ceil(rows / threads)}; step++) {
          let m = lid + step * ${threads};
          if (m < ${rows}) {
            ${row}
          }
        }`
    : `for (var m = lid; m < ${rows}; m += ${threads}) {
          ${row}
        }`;
  return `if (lid == 0) {
          var e = -1;
          if (row0 < seg[uniforms.numExperts]) { e = expertOfRow(row0); }
          tileExpert = e;
        }
        ${loop}`;
}

/** The deepest LoRA tail GroupedMatMulProgram adds in its epilogue, on a tile at least as deep. */
export const LORA_TAIL_EPILOGUE_MAX_RANK = 16;

/** The deepest LoRA tail GroupedMatMulProgram adds on this tile: its T and V are staged in the bk-deep slabs. */
export function loraTailEpilogueRank(tile: TileConfig): number {
  return Math.min(tile.bk, LORA_TAIL_EPILOGUE_MAX_RANK);
}

export class GroupedMatMulProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0], y: [1] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [TILE_THREADS, TILE_THREADS, 1];
  uniforms: string;
  private readonly spec: GroupedMatMulSpec;

  /**
   * out [capacity, outCols]; capacity must be a multiple of 16·tm (single group: any row count,
   * the rows of A)
   */
  constructor(capacity: number, outCols: number, spec: GroupedMatMulSpec) {
    this.spec = spec;
    const { tm, tn } = spec.tile;
    this.outputShape = [capacity, outCols];
    this.dispatch = [Math.ceil(outCols / (TILE_THREADS * tn)), Math.ceil(capacity / (TILE_THREADS * tm)), 1];
    this.variableNames = ['A', 'W', ...(spec.singleGroup ? [] : ['seg', 'pr']), ...(spec.hasBias ? ['bias'] : []),
      ...(spec.hasAddend ? ['addend'] : []), ...(spec.loraTail ? ['tailA', 'tailW'] : [])];
    this.uniforms = GROUPED_MATMUL_UNIFORMS + (spec.loraTail ? LORA_TAIL_UNIFORMS : '');
    this.shaderKey = `moeGroupedMatMul_${spec.source}_${activationKey(spec.source === 'act' ? spec.activation : undefined)}_` +
        `${spec.hasBias ? 'b' : ''}${spec.hasAddend ? 'a' : ''}${spec.kContiguous ? 'k' : 'n'}_${tileKey(spec.tile)}` +
        (spec.packedWeight ? `_${packedWeightKey(spec.packedWeight)}` : '') + (spec.singleGroup ? '_single' : '') +
        (spec.loraTail ? '_loraTail' : '');
  }

  getUserCode(): string {
    const tile = this.spec.tile;
    const { tm, tn, bk } = tile;
    const bm = TILE_THREADS * tm;
    const bn = TILE_THREADS * tn;
    const aSlab = new Slab('As', bk, bm, tile.vec4 === true);
    const bSlab = new Slab('Bs', bk, bn, tile.vec4 === true);
    const fetchA = new Fetch('pa', bk * bm, `let kk = i % ${bk}; let mm = i / ${bk};`,
        k0 => `let k = ${k0} + kk;\n            if (k < uniforms.inner) { v = loadA(mm, k); }`);
    const loadW = weightLoadSnippet(this.spec.packedWeight);
    const fetchB = new Fetch('pb', bk * bn,
        this.spec.kContiguous ? `let kk = i % ${bk}; let nn = i / ${bk};` : `let nn = i % ${bn}; let kk = i / ${bn};`,
        k0 => `let k = ${k0} + kk;\n            let n = col0 + nn;\n` +
            `            if (n < uniforms.outCols && k < uniforms.inner) { ${loadW.assign} }`);
    return `
      ${aSlab.declaration()}
      ${bSlab.declaration()}
      var<workgroup> rowSrc : array<i32, ${bm}>;
      var<workgroup> tileExpert : i32;
      ${this.spec.singleGroup ? '' : EXPERT_OF_ROW}
      ${rowLoadSnippet(this.spec.source, this.spec.activation)}
      ${loadW.fn}

      fn main() {
        let tx = i32(localId.x);
        let ty = i32(localId.y);
        let lid = i32(localIndex);
        let col0 = i32(workgroupId.x) * ${bn};
        let row0 = i32(workgroupId.y) * ${bm};
        ${this.spec.singleGroup ? singleGroupRowsSnippet(bm) : tileRowsSnippet(this.spec.source, bm, THREADS)}
        // also the barrier that publishes rowSrc
        let e = workgroupUniformLoad(&tileExpert);
        var acc : array<f32, ${tm * tn}>;
        if (e >= 0) {
          let wBase = e * uniforms.sE;
          ${fetchA.declarations()}
          ${fetchB.declarations()}
          ${fetchA.fetch('0')}
          ${fetchB.fetch('0')}
          for (var k0 = 0; k0 < uniforms.inner; k0 += ${bk}) {
            ${fetchA.store(aSlab, 'kk', 'mm')}
            ${fetchB.store(bSlab, 'kk', 'nn')}
            workgroupBarrier();
            let next = k0 + ${bk};
            if (next < uniforms.inner) {
              ${fetchA.fetch('next')}
              ${fetchB.fetch('next')}
            }
            ${accumulateSnippet(tile, aSlab, bSlab)}
            workgroupBarrier();
          }
        }
        ${this.spec.loraTail ? tailStagingSnippet(aSlab, bSlab, loraTailEpilogueRank(tile)) : ''}
        ${this.epilogue(aSlab, bSlab)}
      }
    `;
  }

  /**
   * WGSL writing the register tile out, unrolled here over its rows and columns: acc is indexed only
   * by constants, so it stays in registers. A loop over it that the shader compiler does not unroll
   * (the LoRA tail's loop over a uniform rank was enough on NVIDIA's Vulkan driver) makes acc
   * addressable, i.e. local memory, in the product's inner loop too: the f32 split-LoRA Q block took
   * 1319 ms against 137 (run Z33). The tail's T and V_e come from the slabs (tailStagingSnippet).
   */
  private epilogue(aSlab: Slab, bSlab: Slab): string {
    const tile = this.spec.tile;
    const { tm, tn } = tile;
    const tail = this.spec.loraTail === true;
    const columns = (i: number) => Array.from({ length: tn }, (_, j) => `{
            let n = ${owned(tile, '0', 'tx', `${j}`, tn)};
            let c = col0 + n;
            if (c < uniforms.outCols) {
              var v = 0.0;
              if (live) {${tail ? `
                var t = 0.0;
                for (var k = 0; k < uniforms.tailRank; k++) { t = fma(${aSlab.at('k', 'm')}, ${bSlab.at('k', 'n')}, t); }
                v = uniforms.alpha * (acc[${i * tn + j}] + uniforms.tailScale * t);` : `
                v = uniforms.alpha * acc[${i * tn + j}];`}
                ${this.spec.hasBias ? 'v += bias[e * uniforms.outCols + c];' : ''}
                ${this.spec.hasAddend ? 'v += addend[r * uniforms.outCols + c];' : ''}
              }
              result[r * uniforms.outCols + c] = v;
            }
          }`).join('\n          ');
    return Array.from({ length: tm }, (_, i) => `{
          let m = ${owned(tile, '0', 'ty', `${i}`, tm)};
          let r = row0 + m;
          if (r < uniforms.numRows) {
            let live = e >= 0 && rowSrc[m] >= 0;
            ${columns(i)}
          }
        }`).join('\n        ');
  }
}

/**
 * WGSL (after the reduction, whose last barrier frees the slabs): the tile's rows of the LoRA tail's
 * T into the A slab and its expert's columns of V into the B slab, at depth k = the rank's index
 * (0 past the rank, the row count or outCols; the rank is at most `depth`, loraTailEpilogueRank).
 * Each output's tail then reads workgroup memory: reading r values of V's column from global memory
 * per output, the epilogue made the f32 split-LoRA block up to 8 % slower than the expansion apart
 * (run Z33).
 */
function tailStagingSnippet(aSlab: Slab, bSlab: Slab, depth: number): string {
  const stage = (slab: Slab, load: string, inRange: string) => `
          for (var i = lid; i < ${depth * slab.width}; i += ${THREADS}) {
            let k = i % ${depth};
            let x = i / ${depth};
            var v = 0.0;
            if (k < uniforms.tailRank && ${inRange}) { v = ${load}; }
            ${slab.store('k', 'x', 'v')}
          }`;
  return `if (e >= 0) {${stage(aSlab, 'tailA[(row0 + x) * uniforms.tailRank + k]', 'row0 + x < uniforms.numRows')}
          ${stage(bSlab, 'tailW[e * uniforms.tailSE + (col0 + x) * uniforms.tailSN + k * uniforms.tailSK]', 'col0 + x < uniforms.outCols')}
          workgroupBarrier();
        }`;
}

export interface GroupedWeightGradSpec {
  left: 'gather' | 'rows';
  right: RowSource;
  /** the activation, when right is 'act' */
  activation?: ActivationSpec;
  /** L rows are multiplied by the pair's routing weight (input `rw`, [T·K]) */
  scaleLeft: boolean;
  tile: TileConfig;
}

/** Whether the weight gradient reads pairOfRow: for a gathered operand or the routing weight. */
export function usesPairOfRow(spec: Pick<GroupedWeightGradSpec, 'left' | 'right' | 'scaleLeft'>): boolean {
  return spec.left === 'gather' || spec.right === 'gather' || spec.scaleLeft;
}

/**
 * WGSL: loadL(r, p) and loadR(r, q), the weight gradient's operands at padded row r (L times the
 * pair's routing weight when scaleLeft). Shared with the subgroup-matrix program. `suffix` names
 * one product of several in a program: loadL0 reads L0 with uniforms.P0, and so on (pr, rw,
 * topK and the activation are the program's).
 */
export function weightGradLoadSnippets(spec: Pick<GroupedWeightGradSpec, 'left' | 'right' | 'activation' | 'scaleLeft'>, suffix = ''):
    { loadL: string; loadR: string } {
  const [L, R, P, Q] = [`L${suffix}`, `R${suffix}`, `uniforms.P${suffix}`, `uniforms.Q${suffix}`];
  const scale = spec.scaleLeft ? ' * rw[pr[r]]' : '';
  const loadL = spec.left === 'gather'
    ? `fn loadL${suffix}(r : i32, p : i32) -> f32 { return ${L}[(pr[r] / uniforms.topK) * ${P} + p]${scale}; }`
    : `fn loadL${suffix}(r : i32, p : i32) -> f32 { return ${L}[r * ${P} + p]${scale}; }`;
  let loadR: string;
  switch (spec.right) {
    case 'gather':
      loadR = `fn loadR${suffix}(r : i32, q : i32) -> f32 { return ${R}[(pr[r] / uniforms.topK) * ${Q} + q]; }`;
      break;
    case 'rows':
      loadR = `fn loadR${suffix}(r : i32, q : i32) -> f32 { return ${R}[r * ${Q} + q]; }`;
      break;
    case 'act':
      loadR = `
        ${activationSnippet(spec.activation!)}
        fn loadR${suffix}(r : i32, q : i32) -> f32 {
          let base = r * 2 * ${Q};
          return actForward(${R}[base + gateIndex(q, ${Q})], ${R}[base + upIndex(q, ${Q})]);
        }`;
      break;
  }
  return { loadL, loadR };
}

export class GroupedWeightGradProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0], y: [1], z: [2] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [TILE_THREADS, TILE_THREADS, 1];
  uniforms = 'P : i32, Q : i32, topK : i32, numExperts : i32, oE : i32, oP : i32, oQ : i32, alpha : f32, ' +
      ACTIVATION_UNIFORMS;
  private readonly spec: GroupedWeightGradSpec;

  /** outputShape is the gradient's own shape (e.g. [E, out, in] or PEFT's [out, r·E]) */
  constructor(outputShape: number[], numExperts: number, P: number, Q: number, spec: GroupedWeightGradSpec) {
    this.spec = spec;
    const { tm, tn } = spec.tile;
    this.outputShape = outputShape;
    this.dispatch = [Math.ceil(Q / (TILE_THREADS * tn)), Math.ceil(P / (TILE_THREADS * tm)), numExperts];
    // an input the shader never reads drops out of the pipeline's layout: name pr only when used
    this.variableNames = ['L', 'R', 'seg', ...(usesPairOfRow(spec) ? ['pr'] : []), ...(spec.scaleLeft ? ['rw'] : [])];
    this.shaderKey = `moeGroupedWeightGrad_${spec.left}_${spec.right}_${activationKey(spec.right === 'act' ? spec.activation : undefined)}_` +
        `${spec.scaleLeft ? 's' : ''}_${tileKey(spec.tile)}_${outputShape.length}`;
  }

  getUserCode(): string {
    const tile = this.spec.tile;
    const { tm, tn, bk } = tile;
    const bp = TILE_THREADS * tm;
    const bq = TILE_THREADS * tn;
    const ls = new Slab('Ls', bk, bp, tile.vec4 === true);
    const rs = new Slab('Rs', bk, bq, tile.vec4 === true);
    const { loadL, loadR } = weightGradLoadSnippets(this.spec);
    const fetchL = new Fetch('pl', bk * bp, `let pp = i % ${bp}; let rr = i / ${bp};`,
        r0 => `let p = p0 + pp;\n            if (p < uniforms.P && ${r0} + rr < count) { v = loadL(start + ${r0} + rr, p); }`);
    const fetchR = new Fetch('pr_', bk * bq, `let qq = i % ${bq}; let rr = i / ${bq};`,
        r0 => `let q = q0 + qq;\n            if (q < uniforms.Q && ${r0} + rr < count) { v = loadR(start + ${r0} + rr, q); }`);
    return `
      ${ls.declaration()}
      ${rs.declaration()}
      var<workgroup> segStart : i32;
      var<workgroup> segCount : i32;
      ${loadL}
      ${loadR}

      fn main() {
        let tx = i32(localId.x);
        let ty = i32(localId.y);
        let lid = i32(localIndex);
        let e = i32(workgroupId.z);
        let q0 = i32(workgroupId.x) * ${bq};
        let p0 = i32(workgroupId.y) * ${bp};
        if (lid == 0) {
          segStart = seg[e];
          segCount = seg[uniforms.numExperts + 1 + e];
        }
        let start = workgroupUniformLoad(&segStart);
        let count = workgroupUniformLoad(&segCount);
        var acc : array<f32, ${tm * tn}>;
        ${fetchL.declarations()}
        ${fetchR.declarations()}
        if (count > 0) {
          ${fetchL.fetch('0')}
          ${fetchR.fetch('0')}
        }
        for (var r0 = 0; r0 < count; r0 += ${bk}) {
          ${fetchL.store(ls, 'rr', 'pp')}
          ${fetchR.store(rs, 'rr', 'qq')}
          workgroupBarrier();
          let next = r0 + ${bk};
          if (next < count) {
            ${fetchL.fetch('next')}
            ${fetchR.fetch('next')}
          }
          ${accumulateSnippet(tile, ls, rs)}
          workgroupBarrier();
        }
        ${this.stores()}
      }
    `;
  }

  /** WGSL of the register tile's stores, unrolled here: acc indexed by constants only (GroupedMatMulProgram's epilogue). */
  private stores(): string {
    const tile = this.spec.tile;
    const { tm, tn } = tile;
    return Array.from({ length: tm }, (_, i) => `{
          let p = ${owned(tile, 'p0', 'ty', `${i}`, tm)};
          if (p < uniforms.P) {
            ${Array.from({ length: tn }, (_, j) => `{
              let q = ${owned(tile, 'q0', 'tx', `${j}`, tn)};
              if (q < uniforms.Q) { result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = uniforms.alpha * acc[${i * tn + j}]; }
            }`).join('\n            ')}
          }
        }`).join('\n        ');
  }
}
