/**
 * softmax → top-k → weights in one pass over each token's logits: one workgroup per token, its
 * FLAT_THREADS lanes striding over the experts, computes the softmax's max and sum, then picks the
 * K largest probabilities in the order (p descending, index ascending) — the order of tf.topk,
 * ties to the lower index — without sorting or storing the E probabilities: each of K rounds takes
 * every lane's best remaining candidate and reduces them in workgroup memory. The same program
 * writes either the experts (int32) or their weights (float32, optionally divided by their sum):
 * WebGPU programs in tfjs have one output, and the selection is cheap enough to run twice. One
 * thread per token took 77 µs a call at OLMoE's 2048 tokens × 64 experts on the H100 (run Y2: 2048
 * threads, most of the GPU idle).
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { FLAT_THREADS, flatDispatch, intUniforms, type ProgramUniformEntry, reduceLanes } from './shared.js';

export class SoftmaxTopKProgram implements WebGPUProgram {
  variableNames = ['logits'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0, 1] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  uniforms = 'numTokens : i32, numExperts : i32, ';
  private readonly k: number;
  private readonly output: 'experts' | 'weights';
  private readonly renormalize: boolean;

  constructor(numTokens: number, k: number, output: 'experts' | 'weights', renormalize: boolean) {
    this.k = k;
    this.output = output;
    this.renormalize = renormalize;
    this.outputShape = [numTokens, k];
    this.dispatch = [Math.max(1, numTokens), 1, 1];  // one workgroup per token
    this.shaderKey = `moeSoftmaxTopK_${k}_${output}_${renormalize ? 'r' : ''}_lanes`;
  }

  static uniformsFor(numTokens: number, numExperts: number): ProgramUniformEntry[] {
    return intUniforms(numTokens, numExperts);
  }

  getUserCode(): string {
    const K = this.k;
    const T = FLAT_THREADS;
    const write = this.output === 'experts'
      ? `for (var k = 0; k < ${K}; k++) { result[token * ${K} + k] = chosen[k]; }`
      : `let denom = ${this.renormalize ? 'total' : '1.0'};
          for (var k = 0; k < ${K}; k++) { result[token * ${K} + k] = prob[k] / denom; }`;
    return `
      var<workgroup> laneP : array<f32, ${T}>;
      var<workgroup> laneE : array<i32, ${T}>;

      // (pa, ea) comes before (pb, eb): a candidate (e >= 0) with a larger p, or an equal p and a lower index
      fn before(pa : f32, ea : i32, pb : f32, eb : i32) -> bool {
        return ea >= 0 && (eb < 0 || pa > pb || (pa == pb && ea < eb));
      }

      fn main(index : i32) {
        // a token per workgroup (tfjs may fold a long dispatch into x and y); tokens past the end read
        // token 0 and write nothing, so every lane reaches every barrier
        let row = i32(workgroupId.x + workgroupId.y * numWorkgroups.x);
        let lane = i32(localIndex);
        let inRange = row < uniforms.numTokens;
        let token = select(0, row, inRange);
        let E = uniforms.numExperts;
        let base = token * E;
        var m = -3.4e38;
        for (var e = lane; e < E; e += ${T}) { m = max(m, logits[base + e]); }
        ${reduceLanes('laneP', 'mx', 'm', (a, b) => `max(${a}, ${b})`)}
        var partial = 0.0;
        for (var e = lane; e < E; e += ${T}) { partial += exp(logits[base + e] - mx); }
        ${reduceLanes('laneP', 'sum', 'partial', (a, b) => `${a} + ${b}`)}
        var chosen : array<i32, ${K}>;
        var prob : array<f32, ${K}>;
        var prevP = 2.0;
        var prevE = -1;
        var total = 0.0;
        for (var k = 0; k < ${K}; k++) {
          // this lane's best candidate after the ones already chosen
          var bestP = -1.0;
          var bestE = -1;
          for (var e = lane; e < E; e += ${T}) {
            let p = exp(logits[base + e] - mx) / sum;
            let after = p < prevP || (p == prevP && e > prevE);
            if (after && before(p, e, bestP, bestE)) {
              bestP = p;
              bestE = e;
            }
          }
          laneP[lane] = bestP;
          laneE[lane] = bestE;
          workgroupBarrier();
          for (var s = ${T / 2}; s > 0; s = s >> 1) {
            if (lane < s && before(laneP[lane + s], laneE[lane + s], laneP[lane], laneE[lane])) {
              laneP[lane] = laneP[lane + s];
              laneE[lane] = laneE[lane + s];
            }
            workgroupBarrier();
          }
          chosen[k] = laneE[0];
          prob[k] = laneP[0];
          workgroupBarrier();
          total += prob[k];
          prevP = prob[k];
          prevE = chosen[k];
        }
        if (inRange && lane == 0) {
          ${write}
        }
      }
    `;
  }
}

/**
 * The logits' gradient of SoftmaxTopKProgram's weights, one thread per token: with p = softmax(z),
 * the chosen p_k, S = Σ_k p_k and w_k = p_k / S (or p_k), dq_k = (dy_k − Σ_j dy_j·w_j) / S (or
 * dy_k), dp scattered to the chosen experts (repeats add), and dz_e = p_e·(dp_e − Σ_k dq_k·p_k).
 * Selection gets no gradient. Replaces a dozen composed kernels of the same formulas.
 */
export class SoftmaxTopKGradProgram implements WebGPUProgram {
  variableNames = ['logits', 'chosen', 'dy'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0, 1] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  uniforms = 'numTokens : i32, numExperts : i32, ';
  private readonly k: number;
  private readonly renormalize: boolean;

  constructor(numTokens: number, numExperts: number, k: number, renormalize: boolean) {
    this.k = k;
    this.renormalize = renormalize;
    this.outputShape = [numTokens, numExperts];
    this.dispatch = flatDispatch(numTokens);
    this.shaderKey = `moeSoftmaxTopKGrad_${k}_${renormalize ? 'r' : ''}`;
  }

  getUserCode(): string {
    const K = this.k;
    const dq = this.renormalize ? '(dy[index * K + k] - dot) / total' : 'dy[index * K + k]';
    return `
      const K = ${K};
      fn main(index : i32) {
        if (index >= uniforms.numTokens) { return; }
        let E = uniforms.numExperts;
        let base = index * E;
        var mx = logits[base];
        for (var e = 1; e < E; e++) { mx = max(mx, logits[base + e]); }
        var sum = 0.0;
        for (var e = 0; e < E; e++) { sum += exp(logits[base + e] - mx); }
        var ek : array<i32, ${K}>;
        var pk : array<f32, ${K}>;
        var dqk : array<f32, ${K}>;
        var total = 0.0;
        for (var k = 0; k < K; k++) {
          ek[k] = chosen[index * K + k];
          pk[k] = exp(logits[base + ek[k]] - mx) / sum;
          total += pk[k];
        }
        var dot = 0.0;
        for (var k = 0; k < K; k++) { dot += dy[index * K + k] * pk[k] / total; }
        var c = 0.0;
        for (var k = 0; k < K; k++) {
          dqk[k] = ${dq};
          c += dqk[k] * pk[k];
        }
        for (var e = 0; e < E; e++) {
          var dp = 0.0;
          for (var k = 0; k < K; k++) { if (ek[k] == e) { dp += dqk[k]; } }
          result[base + e] = exp(logits[base + e] - mx) / sum * (dp - c);
        }
      }
    `;
  }
}
