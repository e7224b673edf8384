/**
 * Pieces shared by the MoE WebGPU programs: the uniform entries tfjs's runWebGPUProgram takes, the
 * dispatch of the one-thread-per-element programs, the activation's WGSL, and the lookups into the
 * device dispatch plan.
 *
 * The device plan (see plan_programs.ts) sorts the T·K (token, slot) pairs by expert into a
 * padded row space: expert e owns rows [seg[e], seg[e+1]), a multiple of the row tile, of which
 * the first seg[E+1+e] are real and the rest padding (pairOfRow = −1). seg[E] is the number of
 * rows in use; rows past it, up to the capacity N + E·(tile−1), belong to no expert.
 *
 * Every program's WGSL is written against tfjs's shader preamble: inputs are `var<storage, read>`
 * arrays named after `variableNames`, the output is `result`, sizes come in `uniforms`, and the
 * builtins are copied into the private variables localId, localIndex, workgroupId, numWorkgroups.
 * Those copies are not uniform to WGSL's analysis, so a per-workgroup value that guards a barrier
 * goes through a workgroup variable and workgroupUniformLoad.
 */
import type { PackedKind } from '../../../ops/packed.js';
import { E2M1_VALUES, NF4_CODE_BOOK, NF4_DQ_NESTED_BLOCK_SIZE, type QuantizedLayout } from '../../../ops/quantized.js';
import type { ExpertActivation } from '../../../ops/types.js';

/** One entry of the program-defined uniforms, in the order of the program's `uniforms` string. */
export interface ProgramUniformEntry { type: 'int32' | 'float32'; data: number[] }

/** One int32 uniform entry per value. */
export function intUniforms(...values: number[]): ProgramUniformEntry[] {
  return values.map(v => ({ type: 'int32' as const, data: [v] }));
}

/** One float32 uniform entry per value. */
export function floatUniforms(...values: number[]): ProgramUniformEntry[] {
  return values.map(v => ({ type: 'float32' as const, data: [v] }));
}

/** Threads per workgroup of the programs that run one thread per output element (or token). */
export const FLAT_THREADS = 64;

/**
 * WGSL (inside main, with `lane` the i32 local index of a FLAT_THREADS workgroup): the lanes'
 * `value` (f32) combined by `combine` through the workgroup array `array` (FLAT_THREADS f32) in a
 * fixed tree, into `name` in every lane; a barrier after the read, so that `array` can be reused.
 * Every lane reaches every barrier: call it in uniform control flow.
 */
export function reduceLanes(array: string, name: string, value: string, combine: (a: string, b: string) => string): string {
  return `${array}[lane] = ${value};
        workgroupBarrier();
        for (var s = ${FLAT_THREADS / 2}; s > 0; s = s >> 1) {
          if (lane < s) {
            ${array}[lane] = ${combine(`${array}[lane]`, `${array}[lane + s]`)};
          }
          workgroupBarrier();
        }
        let ${name} = ${array}[0];
        workgroupBarrier();`;
}

/** WebGPU's default maxComputeWorkgroupsPerDimension, which browsers give (Chrome's adapters report no more). */
export const MAX_WORKGROUPS_PER_DIMENSION = 65535;

/**
 * The dispatch of such a program over `size` elements: one workgroup per FLAT_THREADS, at least
 * one, in rows of at most MAX_WORKGROUPS_PER_DIMENSION workgroups. Past one row (4 194 240
 * elements: OLMoE's activation gradient has 25 million) the grid is two-dimensional; tfjs's
 * getGlobalIndex then counts workgroups across rows, and the programs' `index < size` guard drops
 * the last row's surplus. One row only where the device allowed more was the H100's case, not a
 * browser's.
 */
export function flatDispatch(size: number): [number, number, number] {
  const groups = Math.max(1, Math.ceil(size / FLAT_THREADS));
  if (groups <= MAX_WORKGROUPS_PER_DIMENSION) return [groups, 1, 1];
  const rows = Math.ceil(groups / MAX_WORKGROUPS_PER_DIMENSION);
  return [Math.ceil(groups / rows), rows, 1];
}

/** Threads per workgroup of the tiled products: 16×16, each thread a TM×TN block of outputs. */
export const TILE_THREADS = 16;

/** How a program reads the rows of its left operand. */
export type RowSource =
  /** a [T, width] tensor gathered through pairOfRow: row r is token pairOfRow[r] / K */
  | 'gather'
  /** a [capacity, width] tensor in the padded row space */
  | 'rows'
  /** h [capacity, 2·width]: the activation of the up projection's output, computed on load */
  | 'act';

/** The activation's specialisation: kind and gate/up layout; alpha and limit are uniforms. */
export interface ActivationSpec { kind: ExpertActivation['kind']; interleaved: boolean }

export function activationKey(a: ActivationSpec | undefined): string {
  return a === undefined ? 'none' : `${a.kind}${a.interleaved ? 'I' : 'S'}`;
}

export function activationUniforms(activation: ExpertActivation | undefined): ProgramUniformEntry[] {
  const [alpha, limit] = activation?.kind === 'clampedSwiglu' ? [activation.alpha, activation.limit] : [1, 0];
  return floatUniforms(alpha, limit);
}

/** Uniform declarations matching activationUniforms. */
export const ACTIVATION_UNIFORMS = 'actAlpha : f32, actLimit : f32, ';

/**
 * The grouped product's uniforms, in the kernel's order (groupedMatMul's intUniforms, alpha, the
 * activation's): every program the kernel may pick declares these, so that it passes one list.
 */
export const GROUPED_MATMUL_UNIFORMS = 'numRows : i32, outCols : i32, inner : i32, topK : i32, numExperts : i32, ' +
    'sE : i32, sN : i32, sK : i32, alpha : f32, ' + ACTIVATION_UNIFORMS;

/**
 * The uniforms of a grouped product with a LoRA tail (`loraTail`), after all others: T's columns
 * (the rank, at most 16), V_e(k, n) at tailW[e·tailSE + n·tailSN + k·tailSK], and the factor the
 * tail's sums are added times (its alpha over the product's, which multiplies both).
 */
export const LORA_TAIL_UNIFORMS = 'tailRank : i32, tailSE : i32, tailSN : i32, tailSK : i32, tailScale : f32, ';

/**
 * WGSL: gateIndex/upIndex(i, width) give the columns of gate i and up i in an h row of 2·width;
 * actForward(g, u) and actBackward(g, u, da) -> vec2(dGate, dUp). The clamps pass the gradient
 * where the input is within the limits, boundaries included (as torch.clamp does).
 */
export function activationSnippet(a: ActivationSpec): string {
  const index = a.interleaved
    ? `fn gateIndex(i : i32, width : i32) -> i32 { return 2 * i; }
       fn upIndex(i : i32, width : i32) -> i32 { return 2 * i + 1; }`
    : `fn gateIndex(i : i32, width : i32) -> i32 { return i; }
       fn upIndex(i : i32, width : i32) -> i32 { return width + i; }`;
  const gelu = `fn geluTanh(g : f32) -> f32 {
         return 0.5 * g * (1.0 + tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)));
       }
       fn actForward(g : f32, u : f32) -> f32 {
         return geluTanh(g) * u;
       }
       fn actBackward(g : f32, u : f32, da : f32) -> vec2<f32> {
         let t = tanh(0.7978845608028654 * (g + 0.044715 * g * g * g));
         let dGelu = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g);
         return vec2<f32>(da * u * dGelu, da * geluTanh(g));
       }`;
  const math = a.kind === 'gegluTanh' ? gelu : a.kind === 'swiglu'
    ? `fn actForward(g : f32, u : f32) -> f32 {
         return g / (1.0 + exp(-g)) * u;
       }
       fn actBackward(g : f32, u : f32, da : f32) -> vec2<f32> {
         let sig = 1.0 / (1.0 + exp(-g));
         // silu'(g) = σ(g)·(1 + g·(1 − σ(g)))
         return vec2<f32>(da * u * sig * (1.0 + g * (1.0 - sig)), da * g * sig);
       }`
    : `fn actForward(gate : f32, up : f32) -> f32 {
         let g = min(gate, uniforms.actLimit);
         let u = clamp(up, -uniforms.actLimit, uniforms.actLimit);
         return (u + 1.0) * g / (1.0 + exp(-uniforms.actAlpha * g));
       }
       fn actBackward(gate : f32, up : f32, da : f32) -> vec2<f32> {
         let g = min(gate, uniforms.actLimit);
         let u = clamp(up, -uniforms.actLimit, uniforms.actLimit);
         let sig = 1.0 / (1.0 + exp(-uniforms.actAlpha * g));
         let glu = g * sig;
         let dGlu = sig * (1.0 + uniforms.actAlpha * g * (1.0 - sig));
         let gateIn = select(0.0, 1.0, gate <= uniforms.actLimit);
         let upIn = select(0.0, 1.0, up >= -uniforms.actLimit && up <= uniforms.actLimit);
         return vec2<f32>(da * (u + 1.0) * dGlu * gateIn, da * glu * upIn);
       }`;
  return `${index}\n${math}`;
}

/**
 * WGSL: expertOfRow(r), the expert whose padded rows hold row r < seg[E]: the largest e with
 * seg[e] <= r (empty experts share their start with the next one, so they are never picked).
 * Needs an int32 input named `seg` and the uniform numExperts.
 */
export const EXPERT_OF_ROW = `
  fn expertOfRow(r : i32) -> i32 {
    var lo = 0;
    var hi = uniforms.numExperts - 1;
    while (lo < hi) {
      let mid = (lo + hi + 1) / 2;
      if (seg[mid] <= r) { lo = mid; } else { hi = mid - 1; }
    }
    return lo;
  }
`;

/** WGSL: the flat index of this workgroup when a 1-D dispatch was reshaped to fit the limits. */
export const FLAT_WORKGROUP_INDEX = `
  fn flatWorkgroupIndex() -> i32 {
    return i32(workgroupId.x + workgroupId.y * numWorkgroups.x +
        workgroupId.z * numWorkgroups.x * numWorkgroups.y);
  }
`;

/**
 * WGSL of `fn ${name}(w : u32, odd : bool) -> f32`: the float32 value of one 16-bit half of a packed
 * expert word (src/ops/README.md, "Packed expert weights"): the low half for an even element, the
 * high half for an odd one. bf16 is the high half of an f32; f16 goes through unpack2x16float,
 * which needs no shader-f16.
 */
export function packedHalfSnippet(kind: 'bf16' | 'f16', name: string): string {
  const body = kind === 'bf16'
    ? 'return bitcast<f32>(select(w << 16u, w & 0xffff0000u, odd));'
    : 'let pair = unpack2x16float(w);\n            return select(pair.x, pair.y, odd);';
  return `
          fn ${name}(w : u32, odd : bool) -> f32 {
            ${body}
          }`;
}

/** A packed weight as the WGSL decode needs it: its kind, its logical columns and (quantized) its layout. */
export interface PackedWeightSpec {
  kind: PackedKind;
  /** cols of the logical [E, rows, cols] */
  cols: number;
  layout: QuantizedLayout | null;
}

/** Part of a shader key that names every specialisation of a PackedWeightSpec. */
export function packedWeightKey(spec: PackedWeightSpec): string {
  const l = spec.layout;
  return l === null ? spec.kind : `${spec.kind}_${spec.cols}_${l.inputAxis}_${l.outputs}_${l.inputs}_${l.groupSize}`;
}

/**
 * WGSL `fn ${name}(wordBase : i32, j : i32) -> f32`: element j (= row·cols + col of the logical
 * [rows, cols]) of the expert whose words start at array `words`[wordBase], decoded by the
 * formulas of src/ops/packed.ts / src/ops/quantized.ts, in f32 operations in the same order as
 * the host decode (so the same values).
 */
export function packedElementSnippet(spec: PackedWeightSpec, words: string, name: string): string {
  const l = spec.layout;
  if (l === null) {
    return `
          ${packedHalfSnippet(spec.kind as 'bf16' | 'f16', `${name}Half`)}
          fn ${name}(wordBase : i32, j : i32) -> f32 {
            return ${name}Half(bitcast<u32>(${words}[wordBase + j / 2]), (j & 1) == 1);
          }`;
  }
  const f = (v: number) => (Object.is(v, -0) ? '-0.0' : Number.isInteger(v) ? `${v}.0` : `${v}`);
  const table = l.kind === 'nf4' || l.kind === 'nf4-dq' ? `var<private> ${name}Table : array<f32, 16> = array<f32, 16>(${Array.from(NF4_CODE_BOOK, f).join(', ')});` :
    l.kind === 'mxfp4' ? `var<private> ${name}Table : array<f32, 16> = array<f32, 16>(${Array.from(E2M1_VALUES, f).join(', ')});` : '';
  const [oOf, iOf] = l.inputAxis === 2 ? ['r', 'c'] : ['c', 'r'];
  const code = l.kind === 'int8' ?
    `let q = f32((${words}[wordBase + s / 4] << u32(24 - 8 * (s & 3))) >> 24u);` :
    `let q = (bitcast<u32>(${words}[wordBase + s / 8]) >> u32(4 * (s & 7))) & 15u;`;
  // nf4-dq: absmax = f32(f32(map[a] · nested) + offset) of the group's code byte a and its block of 256 groups
  const scale = l.kind === 'mxfp4' ?
    `let e = i32((bitcast<u32>(${words}[wordBase + ${l.scaleWord} + grp / 4]) >> u32(8 * (grp & 3))) & 255u);` :
    l.kind === 'nf4-dq' ?
    `let a = i32((bitcast<u32>(${words}[wordBase + ${l.scaleWord} + grp / 4]) >> u32(8 * (grp & 3))) & 255u);
            let blk = grp / ${NF4_DQ_NESTED_BLOCK_SIZE};
            let nested = bitcast<f32>(${words}[wordBase + ${l.mapWord} + a]) * bitcast<f32>(${words}[wordBase + ${l.nestedWord} + blk]);
            let scale = nested + bitcast<f32>(${words}[wordBase + ${l.offsetWord} + blk]);` :
    `let scale = bitcast<f32>(${words}[wordBase + ${l.scaleWord} + grp]);`;
  const value = l.kind === 'int8' ? 'return scale * q;' :
    l.kind === 'int4' ? `let zero = bitcast<f32>(${words}[wordBase + ${l.zeroWord} + grp]);
            return scale * (f32(q) - zero);` :
    l.kind === 'nf4' || l.kind === 'nf4-dq' ? `return ${name}Table[q] * scale;` : `return ldexp(${name}Table[q], e - 127);`;
  return `
          ${table}
          fn ${name}(wordBase : i32, j : i32) -> f32 {
            let r = j / ${spec.cols};
            let c = j - r * ${spec.cols};
            let o = ${oOf};
            let i = ${iOf};
            let s = o * ${l.inputs} + i;
            let grp = o * ${l.groupsPerOutput} + i / ${l.groupSize};
            ${code}
            ${scale}
            ${value}
          }`;
}
