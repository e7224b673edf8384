/**
 * The row-wise programs around the grouped products:
 * - CombineRowsProgram: out[t] = Σ_k (w[t,k]·) Y[rowOfPair[t·K+k]], the weighted scatter-add back to
 *   tokens as a gather through the inverse permutation and a sum over K in k order (no float
 *   atomics, deterministic).
 * - ActivationBackwardProgram: dh = act'(h)·(w_pair·g) on the padded rows.
 * - PairDotProgram: the routing weights' gradient ⟨dOut_t, y_(t,k)⟩ without y: it equals
 *   ⟨g_r, act(h_r)⟩ (+ ⟨dOut_t, b2_e⟩ with a down bias), g = dOut_t·W2_e being the down
 *   projection's input gradient before the routing weight.
 * - GroupedColumnSumProgram: bias gradients, Σ over an expert's real rows.
 * - GatherRowsProgram: rows picked by index, zeros for −1 (h between pair order and padded rows).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import {
  ACTIVATION_UNIFORMS, type ActivationSpec, activationKey, activationSnippet, FLAT_THREADS, FLAT_WORKGROUP_INDEX,
  flatDispatch, intUniforms, type ProgramUniformEntry,
} from './shared.js';

/** out [T, width] from Y [capacity, width], rowOfPair [T·K] and, when weighted, w [T·K]. */
export class CombineRowsProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0, 1] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  size = true;
  uniforms = 'width : i32, topK : i32, ';
  private readonly weighted: boolean;

  constructor(numTokens: number, width: number, weighted: boolean) {
    this.weighted = weighted;
    this.outputShape = [numTokens, width];
    this.dispatch = flatDispatch(numTokens * width);
    this.variableNames = ['Y', 'rp', ...(weighted ? ['rw'] : [])];
    this.shaderKey = `moeCombineRows_${weighted ? 'w' : ''}`;
  }

  static uniformsFor(width: number, topK: number): ProgramUniformEntry[] {
    return intUniforms(width, topK);
  }

  getUserCode(): string {
    const term = this.weighted ? 'rw[p] * Y[rp[p] * uniforms.width + j]' : 'Y[rp[p] * uniforms.width + j]';
    return `
      fn main(index : i32) {
        if (index >= uniforms.size) { return; }
        let t = index / uniforms.width;
        let j = index - t * uniforms.width;
        var s = 0.0;
        for (var k = 0; k < uniforms.topK; k++) {
          let p = t * uniforms.topK + k;
          s += ${term};
        }
        result[index] = s;
      }
    `;
  }
}

/**
 * dh [capacity, 2·width] from h [capacity, 2·width], g [capacity, width], pairOfRow and w [T·K].
 * With gate and up halves (not interleaved) and a width that is a multiple of 4, a thread takes 4
 * columns: h, g and dh bound as vec4<f32> (run Y2 on the H100: 263 µs a call one column a thread at
 * OLMoE's [24576, 2048], about 60 % of what its 500 MB allow).
 */
export class ActivationBackwardProgram implements WebGPUProgram {
  variableNames = ['h', 'g', 'pr', 'rw'];
  variableComponents: number[] | undefined;
  outputComponent: number | undefined;
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0, 1] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  uniforms = 'count : i32, width : i32, ' + ACTIVATION_UNIFORMS;
  private readonly activation: ActivationSpec;
  private readonly quads: boolean;

  constructor(capacity: number, width: number, activation: ActivationSpec) {
    this.activation = activation;
    this.outputShape = [capacity, 2 * width];
    this.quads = !activation.interleaved && width % 4 === 0;
    this.variableComponents = this.quads ? [4, 4, 1, 1] : undefined;
    this.outputComponent = this.quads ? 4 : undefined;
    this.dispatch = flatDispatch(capacity * width / (this.quads ? 4 : 1));
    this.shaderKey = `moeActivationBackward_${activationKey(activation)}${this.quads ? '_v4' : ''}`;
  }

  /** `count` and `width` in loads: quads where the program takes them */
  uniformsFor(capacity: number, width: number, activation: ProgramUniformEntry[]): ProgramUniformEntry[] {
    const unit = this.quads ? 4 : 1;
    return [...intUniforms(capacity * width / unit, width / unit), ...activation];
  }

  getUserCode(): string {
    // quads: quad i of the gate half and of the up half, each column through actBackward as one
    // column a thread does; else column i where activationSnippet's gate/up layout puts it
    const [indices, zero, body] = this.quads
      ? ['let gi = r * 2 * uniforms.width + i;\n        let ui = gi + uniforms.width;', 'vec4<f32>(0.0)', `let hg = h[gi];
        let hu = h[ui];
        let gq = g[index];
        let scale = rw[p];
        ${[0, 1, 2, 3].map(c => `let d${c} = actBackward(hg[${c}], hu[${c}], scale * gq[${c}]);`).join('\n        ')}
        result[gi] = vec4<f32>(d0.x, d1.x, d2.x, d3.x);
        result[ui] = vec4<f32>(d0.y, d1.y, d2.y, d3.y);`]
      : ['let base = r * 2 * uniforms.width;\n        let gi = base + gateIndex(i, uniforms.width);\n        let ui = base + upIndex(i, uniforms.width);',
        '0.0', `let d = actBackward(h[gi], h[ui], rw[p] * g[r * uniforms.width + i]);
        result[gi] = d.x;
        result[ui] = d.y;`];
    return `
      ${activationSnippet(this.activation)}
      fn main(index : i32) {
        if (index >= uniforms.count) { return; }
        let r = index / uniforms.width;
        let i = index - r * uniforms.width;
        ${indices}
        let p = pr[r];
        if (p < 0) {
          result[gi] = ${zero};
          result[ui] = ${zero};
          return;
        }
        ${body}
      }
    `;
  }
}

const DOT_THREADS = 64;

/**
 * dWeights [T, K]: per pair, ⟨g_r, act(h_r)⟩ (+ ⟨dOut_t, b2_e⟩), r = rowOfPair[p]; one workgroup
 * per pair with a tree reduction (fixed order: deterministic).
 */
export class PairDotProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0, 1] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [DOT_THREADS, 1, 1];
  uniforms = 'numPairs : i32, width : i32, hidden : i32, topK : i32, ' + ACTIVATION_UNIFORMS;
  private readonly activation: ActivationSpec;
  private readonly withBias: boolean;

  constructor(numTokens: number, topK: number, activation: ActivationSpec, withBias: boolean) {
    this.activation = activation;
    this.withBias = withBias;
    this.outputShape = [numTokens, topK];
    this.dispatch = [numTokens * topK, 1, 1];
    this.variableNames = ['g', 'h', 'rp', ...(withBias ? ['dy', 'b2', 'ex'] : [])];
    this.shaderKey = `moePairDot_${activationKey(activation)}_${withBias ? 'b' : ''}`;
  }

  getUserCode(): string {
    const bias = this.withBias ? `
          let t = pair / uniforms.topK;
          let e = ex[pair];
          for (var j = lid; j < uniforms.hidden; j += ${DOT_THREADS}) {
            s += dy[t * uniforms.hidden + j] * b2[e * uniforms.hidden + j];
          }` : '';
    return `
      ${activationSnippet(this.activation)}
      ${FLAT_WORKGROUP_INDEX}
      var<workgroup> partial : array<f32, ${DOT_THREADS}>;
      fn main(index : i32) {
        let lid = i32(localIndex);
        let pair = flatWorkgroupIndex();
        let live = pair < uniforms.numPairs;
        var s = 0.0;
        if (live) {
          let r = rp[pair];
          let base = r * 2 * uniforms.width;
          for (var i = lid; i < uniforms.width; i += ${DOT_THREADS}) {
            let a = actForward(h[base + gateIndex(i, uniforms.width)], h[base + upIndex(i, uniforms.width)]);
            s += g[r * uniforms.width + i] * a;
          }
          ${bias}
        }
        partial[lid] = s;
        workgroupBarrier();
        for (var offset = ${DOT_THREADS / 2}; offset > 0; offset /= 2) {
          if (lid < offset) { partial[lid] += partial[lid + offset]; }
          workgroupBarrier();
        }
        if (live && lid == 0) { result[pair] = partial[0]; }
      }
    `;
  }
}

/** dBias [E, width] = Σ over the real rows of e of (w·) S(r), S gathered ('gather') or padded rows ('rows'). */
export class GroupedColumnSumProgram implements WebGPUProgram {
  variableNames: string[];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0, 1] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  size = true;
  uniforms = 'width : i32, topK : i32, numExperts : i32, ';
  private readonly source: 'gather' | 'rows';
  private readonly scaled: boolean;

  constructor(numExperts: number, width: number, source: 'gather' | 'rows', scaled: boolean) {
    this.source = source;
    this.scaled = scaled;
    this.outputShape = [numExperts, width];
    this.dispatch = flatDispatch(numExperts * width);
    // an input the shader never reads drops out of the pipeline's layout: name pr only when used
    this.variableNames = ['S', 'seg', ...(source === 'gather' || scaled ? ['pr'] : []), ...(scaled ? ['rw'] : [])];
    this.shaderKey = `moeGroupedColumnSum_${source}_${scaled ? 's' : ''}`;
  }

  getUserCode(): string {
    const row = this.source === 'gather' ? '(pr[r] / uniforms.topK)' : 'r';
    const scale = this.scaled ? ' * rw[pr[r]]' : '';
    return `
      fn main(index : i32) {
        if (index >= uniforms.size) { return; }
        let e = index / uniforms.width;
        let c = index - e * uniforms.width;
        let start = seg[e];
        let end = start + seg[uniforms.numExperts + 1 + e];
        var s = 0.0;
        for (var r = start; r < end; r++) {
          s += S[${row} * uniforms.width + c]${scale};
        }
        result[index] = s;
      }
    `;
  }
}

/** Invocations per workgroup of GatherRowsProgram, each copying one vec4 of a row. */
const GATHER_ROWS_THREADS = 64;
/** Rows per grid column at most: a grid row loops over the rows 65535 workgroups cannot cover. */
const GATHER_ROWS_MAX_GRID = 65535;

/**
 * out [count, width] = X[rows[i]] for each i, zeros where rows[i] < 0 (a padding row of the plan):
 * the fused experts' kept h into pair order and back to padded rows (issue 15). tfjs-webgpu's
 * Gather computes each element's coordinates from flat indices: 0.5 ms for OLMoE's [24576, 2048] on
 * the H100 (run U1), where the copy is ~0.1 ms of memory traffic. Here a grid row per output row
 * copies it in vec4s (width a multiple of 4).
 */
export class GatherRowsProgram implements WebGPUProgram {
  variableNames = ['X', 'rows'];
  variableComponents = [4, 1];
  outputComponent = 4;
  outputShape: number[];
  shaderKey = 'moeGatherRows';
  dispatchLayout = { x: [1], y: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [GATHER_ROWS_THREADS, 1, 1];
  uniforms = 'count : i32, quads : i32, ';

  constructor(count: number, width: number) {
    if (width < 4 || width % 4 !== 0) throw new Error(`GatherRowsProgram: width must be a positive multiple of 4 but got ${width}`);
    this.outputShape = [count, width];
    this.dispatch = [Math.ceil(width / 4 / GATHER_ROWS_THREADS), Math.max(1, Math.min(count, GATHER_ROWS_MAX_GRID)), 1];
  }

  static uniformsFor(count: number, width: number): ProgramUniformEntry[] {
    return intUniforms(count, width / 4);
  }

  getUserCode(): string {
    return `
      fn main() {
        let q = i32(workgroupId.x) * ${GATHER_ROWS_THREADS} + i32(localIndex);
        if (q >= uniforms.quads) { return; }
        for (var i = i32(workgroupId.y); i < uniforms.count; i += i32(numWorkgroups.y)) {
          let row = rows[i];
          var v = vec4<f32>(0.0);
          if (row >= 0) { v = X[row * uniforms.quads + q]; }
          result[i * uniforms.quads + q] = v;
        }
      }
    `;
  }
}
