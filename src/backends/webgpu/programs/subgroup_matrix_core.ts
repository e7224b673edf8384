/**
 * The index math of the subgroup-matrix products (issue 13), written once and used three ways:
 * the package's programs (subgroup_matrix_program.ts) and the raw Dawn variants
 * (tools/webgpu_tc/variants.ts) generate their WGSL from it, and the emulator spec
 * (spec/backends/webgpu/subgroup_matrix_emulator.spec.ts) evaluates the very same functions on
 * integers, so a GPU run that verifies a variant verifies the package's indexing too, and the
 * indexing is tested where no subgroup matrices exist (Mesa, CI).
 *
 * Every function takes an `Arith<T>`: `wgslU32` builds u32 WGSL expressions, `integers` computes
 * the numbers (WGSL's u32 `/` truncates, as Math.trunc on non-negative values).
 *
 * Semantics (Dawn's chromium_experimental_subgroup_matrix, confirmed on the H100/H200 by the
 * probe and the variants): `subgroupMatrixLoad<T>(&arr, offset, colMajor, stride)` reads the
 * matrix element (row r, column c) from `arr[offset + r·stride + c]` (row-major) or
 * `arr[offset + c·stride + r]` (column-major). For a left matrix (M×K) the row is m and the column
 * k; for a right matrix (K×N) the row is k and the column n; subgroupMatrixStore writes a result
 * (M×N) the same way. All three are 16×16 here, so Dawn's type parameter order
 * (`subgroup_matrix_left<T, K, M>`, `subgroup_matrix_right<T, N, K>`) does not matter.
 *
 * A workgroup owns a rows × cols block of the output; its subgroups are laid out
 * subgroupRows × subgroupCols, subgroup s (= local_invocation_index / subgroupSize, consecutive
 * runs of the index) owning the part at row (s / subgroupCols)·16·tilesM, column
 * (s % subgroupCols)·16·tilesN, as tilesM × tilesN result matrices. Each step stages a `depth`-deep
 * slab of the left operand in As and of the right operand in Bs (f16, workgroup memory):
 * - As row-major (the products): element (m, k) at m·strideA + k, strideA = depth + pad;
 *   column-major (`leftColMajor`, the weight gradients, whose left operand Lᵀ is read along its
 *   rows): element (m, k) at k·strideA + m, strideA = rows + pad;
 * - Bs row-major: element (k, n) at k·strideB + n, strideB = cols + pad; column-major
 *   (`rightColMajor`, the products of a weight stored [out, in], k contiguous: v7's staging, whose
 *   k-runs of W land on consecutive halves): element (k, n) at n·strideB + k, strideB = depth + pad.
 * Left tile i of a subgroup at slab depth kk starts at As's element (partRow + 16i, kk), right tile
 * j at Bs's element (kk, partCol + 16j), each loaded with the slab's own major order and stride.
 * The epilogue stores result (i, j) row-major with stride 16 to the subgroup's 16×16 f32 slot of Ts
 * (at subgroup·256), and lane l takes the slot's elements t = l, l + subgroupSize, ...: element t
 * is the block's (partRow + 16i + t / 16, partCol + 16j + t % 16).
 */

/** Integer arithmetic over numbers or over WGSL expression text. */
export interface Arith<T> {
  lit(n: number): T;
  add(a: T, b: T): T;
  mul(a: T, b: T): T;
  /** truncating division of non-negative values */
  div(a: T, b: T): T;
  mod(a: T, b: T): T;
}

/** u32 WGSL expressions (literals get `u`; every operation parenthesized). */
export const wgslU32: Arith<string> = {
  lit: n => `${n}u`,
  add: (a, b) => `(${a} + ${b})`,
  mul: (a, b) => `(${a} * ${b})`,
  div: (a, b) => `(${a} / ${b})`,
  mod: (a, b) => `(${a} % ${b})`,
};

/** The same operations on non-negative integers. */
export const integers: Arith<number> = {
  lit: n => n,
  add: (a, b) => a + b,
  mul: (a, b) => a * b,
  div: (a, b) => Math.trunc(a / b),
  mod: (a, b) => a % b,
};

/** The matrices' edge: 16×16 f16 operands, 16×16 f32 results (the f16→f32 16×16×16 config). */
export const MATRIX_EDGE = 16;

/** One workgroup's block, its subgroups' parts and its staged slabs (see the file comment). */
export interface SlabLayout {
  rows: number;
  cols: number;
  depth: number;
  subgroupRows: number;
  subgroupCols: number;
  /** result matrices per subgroup along the rows and the columns */
  tilesM: number;
  tilesN: number;
  /** As holds the left slab column-major ([depth][rows]) */
  leftColMajor: boolean;
  /** Bs holds the right slab column-major ([cols][depth]); absent: row-major */
  rightColMajor?: boolean;
  /** f16 elements added to every slab row (against workgroup-memory bank conflicts) */
  pad: number;
}

/** Checks that the subgroups' parts tile the block exactly and the slab depth is whole steps. */
export function checkSlabLayout(l: SlabLayout): void {
  if (l.subgroupRows * l.tilesM * MATRIX_EDGE !== l.rows || l.subgroupCols * l.tilesN * MATRIX_EDGE !== l.cols ||
      l.depth % MATRIX_EDGE !== 0 || l.depth <= 0) {
    throw new Error(`subgroup-matrix layout: ${l.subgroupRows}×${l.subgroupCols} subgroups of ` +
        `${l.tilesM}×${l.tilesN} matrices do not tile a ${l.rows}×${l.cols} block at depth ${l.depth}`);
  }
}

export function subgroupCount(l: SlabLayout): number {
  return l.subgroupRows * l.subgroupCols;
}

export function strideA(l: SlabLayout): number {
  return (l.leftColMajor ? l.rows : l.depth) + l.pad;
}

export function strideB(l: SlabLayout): number {
  return (l.rightColMajor ? l.depth : l.cols) + l.pad;
}

/** f16 elements of As and Bs. */
export function slabSizes(l: SlabLayout): { a: number; b: number } {
  return { a: (l.leftColMajor ? l.depth : l.rows) * strideA(l), b: (l.rightColMajor ? l.cols : l.depth) * strideB(l) };
}

/** Where the left operand's slab element (m, k) lives in As. */
export function aIndex<T>(x: Arith<T>, l: SlabLayout, m: T, k: T): T {
  return l.leftColMajor ? x.add(x.mul(k, x.lit(strideA(l))), m) : x.add(x.mul(m, x.lit(strideA(l))), k);
}

/** Where the right operand's slab element (k, n) lives in Bs. */
export function bIndex<T>(x: Arith<T>, l: SlabLayout, k: T, n: T): T {
  return l.rightColMajor ? x.add(x.mul(n, x.lit(strideB(l))), k) : x.add(x.mul(k, x.lit(strideB(l))), n);
}

/**
 * The slab element (m, k) that staging step i (i = lid, lid + threads, ...) writes to As: walking
 * As in memory order, so that consecutive invocations write consecutive halves (for the products,
 * k fastest, which is also the activations' coalesced order; for the gradients, m fastest).
 */
export function stagedElementA<T>(x: Arith<T>, l: SlabLayout, i: T): { m: T; k: T } {
  return l.leftColMajor
    ? { m: x.mod(i, x.lit(l.rows)), k: x.div(i, x.lit(l.rows)) }
    : { m: x.div(i, x.lit(l.depth)), k: x.mod(i, x.lit(l.depth)) };
}

/**
 * The slab element (k, n) that staging step i writes to Bs: n fastest, or k fastest
 * (`kFastest`: a weight stored [out, in], whose reduction index is contiguous in memory).
 */
export function stagedElementB<T>(x: Arith<T>, l: SlabLayout, i: T, kFastest: boolean): { k: T; n: T } {
  return kFastest
    ? { k: x.mod(i, x.lit(l.depth)), n: x.div(i, x.lit(l.depth)) }
    : { k: x.div(i, x.lit(l.cols)), n: x.mod(i, x.lit(l.cols)) };
}

/**
 * Vectorized staging (4 consecutive elements of the operand's contiguous direction per load):
 * quad q (q = lid, lid + threads, ...) of the left slab is the elements (m, k + c), c < 4, of
 * As's memory order (k fastest row-major, m fastest column-major: the direction the activations
 * and Lᵀ are contiguous in), at As's `at` + c·`step`. `width` 8 (the 16-byte loads of an operand
 * held as f16 halves): runs of 8 along k, or along m into a column-major As.
 */
export function stagedQuadA<T>(x: Arith<T>, l: SlabLayout, q: T, width: 4 | 8 = 4): { m: T; k: T; at: T; step: number } {
  if (l.leftColMajor) {
    const m = x.mul(x.mod(q, x.lit(l.rows / width)), x.lit(width));
    const k = x.div(q, x.lit(l.rows / width));
    return { m, k, at: aIndex(x, l, m, k), step: 1 };
  }
  const m = x.div(q, x.lit(l.depth / width));
  const k = x.mul(x.mod(q, x.lit(l.depth / width)), x.lit(width));
  return { m, k, at: aIndex(x, l, m, k), step: 1 };
}

/**
 * Quad q of the right slab: the elements (k + c, n) (`kFastest`, a weight contiguous along k) or
 * (k, n + c) (contiguous along n), at Bs's `at` + c·`step`.
 * Along k into a column-major Bs (v7's staging): runs of `width` (4, or 8 for the 16-byte loads of
 * packed halves) walking a column's k first, each run on consecutive halves (step 1): a subgroup
 * reads whole rows of W and stores whole 16-byte chunks. Along n into a row-major Bs: runs of 4, or
 * of 8 (the weight gradient's R held as f16 halves), on consecutive halves too. Along k into a row-major Bs (v6's,
 * width 4): 8 consecutive quads take 8 columns at one depth and the next 8 the next depth: a
 * subgroup of 32 reads 8 columns × 64 contiguous bytes (whole 32-byte sectors) and its
 * transposing stores, 4 slab rows apart (step strideB), fall on 8 banks (2-way), where 16 quads
 * down one column would put 16 lanes on 2 banks.
 */
export function stagedQuadB<T>(x: Arith<T>, l: SlabLayout, q: T, kFastest: boolean, width: 4 | 8 = 4): { k: T; n: T; at: T; step: number } {
  if (width !== 4 && kFastest !== (l.rightColMajor === true)) {
    throw new Error(`stagedQuadB: runs of ${width} need k fastest into a column-major Bs or n fastest into a row-major one`);
  }
  if (kFastest && l.rightColMajor) {
    const perColumn = l.depth / width;
    const n = x.div(q, x.lit(perColumn));
    const k = x.mul(x.mod(q, x.lit(perColumn)), x.lit(width));
    return { k, n, at: bIndex(x, l, k, n), step: 1 };
  }
  if (kFastest) {
    const k = x.mul(x.mod(x.div(q, x.lit(8)), x.lit(l.depth / 4)), x.lit(4));
    const n = x.add(x.mod(q, x.lit(8)), x.mul(x.div(q, x.lit(2 * l.depth)), x.lit(8)));
    return { k, n, at: bIndex(x, l, k, n), step: strideB(l) };
  }
  const k = x.div(q, x.lit(l.cols / width));
  const n = x.mul(x.mod(q, x.lit(l.cols / width)), x.lit(width));
  return { k, n, at: bIndex(x, l, k, n), step: l.rightColMajor ? strideB(l) : 1 };
}

/** The block row and column where subgroup `subgroup`'s part starts. */
export function partOrigin<T>(x: Arith<T>, l: SlabLayout, subgroup: T): { row: T; col: T } {
  return {
    row: x.mul(x.div(subgroup, x.lit(l.subgroupCols)), x.lit(MATRIX_EDGE * l.tilesM)),
    col: x.mul(x.mod(subgroup, x.lit(l.subgroupCols)), x.lit(MATRIX_EDGE * l.tilesN)),
  };
}

/** A subgroupMatrixLoad's arguments after the array. */
export interface MatrixAt<T> { offset: T; colMajor: boolean; stride: number }

/** Left matrix i of the part at partRow, slab depth kk. */
export function leftTile<T>(x: Arith<T>, l: SlabLayout, partRow: T, kk: T, i: number): MatrixAt<T> {
  return { offset: aIndex(x, l, x.add(partRow, x.lit(MATRIX_EDGE * i)), kk), colMajor: l.leftColMajor, stride: strideA(l) };
}

/** Right matrix j of the part at partCol, slab depth kk. */
export function rightTile<T>(x: Arith<T>, l: SlabLayout, partCol: T, kk: T, j: number): MatrixAt<T> {
  return { offset: bIndex(x, l, kk, x.add(partCol, x.lit(MATRIX_EDGE * j))), colMajor: l.rightColMajor === true, stride: strideB(l) };
}

/** Where a subgroup's 16×16 f32 epilogue slot starts in Ts (row-major, stride 16). */
export function resultSlot<T>(x: Arith<T>, subgroup: T): MatrixAt<T> {
  return { offset: x.mul(subgroup, x.lit(MATRIX_EDGE * MATRIX_EDGE)), colMajor: false, stride: MATRIX_EDGE };
}

/** The block element (m, n) of slot element t of result matrix (i, j). */
export function slotElement<T>(x: Arith<T>, partRow: T, partCol: T, i: number, j: number, t: T): { m: T; n: T } {
  return {
    m: x.add(x.add(partRow, x.lit(MATRIX_EDGE * i)), x.div(t, x.lit(MATRIX_EDGE))),
    n: x.add(x.add(partCol, x.lit(MATRIX_EDGE * j)), x.mod(t, x.lit(MATRIX_EDGE))),
  };
}

// ---- WGSL ------------------------------------------------------------------------------------

const LEFT = `subgroup_matrix_left<f16, ${MATRIX_EDGE}, ${MATRIX_EDGE}>`;
const RIGHT = `subgroup_matrix_right<f16, ${MATRIX_EDGE}, ${MATRIX_EDGE}>`;
export const RESULT_MATRIX = `subgroup_matrix_result<f32, ${MATRIX_EDGE}, ${MATRIX_EDGE}>`;

function load(type: string, array: string, at: MatrixAt<string>): string {
  return `subgroupMatrixLoad<${type}>(&${array}, ${at.offset}, ${at.colMajor}, ${at.stride}u)`;
}

/** WGSL: the accumulators c{i}_{j}, zero. */
export function declareAccumulators(l: SlabLayout): string {
  const lines: string[] = [];
  for (let i = 0; i < l.tilesM; i++) for (let j = 0; j < l.tilesN; j++) lines.push(`var c${i}_${j} = ${RESULT_MATRIX}();`);
  return lines.join('\n');
}

/**
 * WGSL: the products over one staged slab (As, Bs), unrolled: for each 16-deep step, the part's
 * left and right matrices, then every accumulator. `partRow`, `partCol`: u32 expressions;
 * `depth`: the slab's first `depth` columns only (a multiple of 16; a shallower slab staged into
 * the same arrays with the layout's strides).
 */
export function multiplySlab(l: SlabLayout, partRow: string, partCol: string, depth = l.depth): string {
  const x = wgslU32;
  const lines: string[] = [];
  for (let kk = 0; kk < depth; kk += MATRIX_EDGE) {
    const k = x.lit(kk);
    for (let i = 0; i < l.tilesM; i++) lines.push(`let a${kk}_${i} = ${load(LEFT, 'As', leftTile(x, l, partRow, k, i))};`);
    for (let j = 0; j < l.tilesN; j++) lines.push(`let b${kk}_${j} = ${load(RIGHT, 'Bs', rightTile(x, l, partCol, k, j))};`);
    for (let i = 0; i < l.tilesM; i++) {
      for (let j = 0; j < l.tilesN; j++) lines.push(`c${i}_${j} = subgroupMatrixMultiplyAccumulate(a${kk}_${i}, b${kk}_${j}, c${i}_${j});`);
    }
  }
  return lines.join('\n');
}

/**
 * WGSL: a loop over `count` items shared by `threads` invocations, item `index` = `first` + step·threads
 * for step < count / threads: the same trip count for every invocation (a loop that starts at the
 * invocation's own index and stops at `count` has a per-invocation bound, and the subgroup-matrix
 * builtins after it need every invocation of the subgroup back in step). `count` must be whole steps.
 *
 * ```js
 * uniformStrideLoop('i', 'localIndex', 4096, 128, 'As[i] = 0.0h;');
 * // for (var step = 0u; step < 32u; step++) { let i = localIndex + step * 128u; As[i] = 0.0h; }
 * ```
 */
export function uniformStrideLoop(index: string, first: string, count: number, threads: number, body: string): string {
  if (count % threads !== 0) throw new Error(`uniformStrideLoop: ${count} items are not whole steps of ${threads} invocations`);
  return `for (var step = 0u; step < ${count / threads}u; step++) {
            let ${index} = ${first} + step * ${threads}u;
            ${body}
          }`;
}

/**
 * WGSL: the epilogue, one result matrix at a time (see the file comment): `subgroup` and `lane`
 * u32 expressions; `write(m, n, v)` the statement for block element (m, n) (u32) of value v.
 * Every invocation takes the same steps (uniformStrideLoop over the slot's elements), so the
 * stores and the barriers are in uniform control flow.
 */
export function epilogueThroughSlots(l: SlabLayout, subgroup: string, lane: string, subgroupSize: number,
    partRow: string, partCol: string, write: (m: string, n: string, v: string) => string): string {
  const x = wgslU32;
  const slot = resultSlot(x, subgroup);
  const lines: string[] = [];
  for (let i = 0; i < l.tilesM; i++) {
    for (let j = 0; j < l.tilesN; j++) {
      const { m, n } = slotElement(x, partRow, partCol, i, j, 't');
      lines.push(`subgroupMatrixStore(&Ts, ${slot.offset}, c${i}_${j}, ${slot.colMajor}, ${slot.stride}u);`,
          'workgroupBarrier();',
          uniformStrideLoop('t', lane, MATRIX_EDGE * MATRIX_EDGE, subgroupSize, write(m, n, `Ts[${x.add(slot.offset, 't')}]`)),
          'workgroupBarrier();');
    }
  }
  return lines.join('\n');
}
