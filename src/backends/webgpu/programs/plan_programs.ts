/**
 * The dispatch plan on the device, in three programs, without any read to the host:
 * 1. ExpertSegmentsProgram: per-expert counts (workgroup histogram) and the padded row segments.
 * 2. RowOfPairProgram: each pair's padded row, stable within an expert (a counting sort).
 * 3. PairOfRowProgram: the inverse map, −1 on padding rows.
 * Integer atomics are only used for the histogram, whose result does not depend on their order.
 */
import type { WebGPUProgram } from '@tensorflow/tfjs-backend-webgpu';
import { EXPERT_OF_ROW, FLAT_THREADS, flatDispatch, intUniforms, type ProgramUniformEntry } from './shared.js';

const PLAN_THREADS = 256;

/**
 * seg [2E+1] int32: seg[e] = first padded row of expert e (e = 0..E, seg[E] = rows in use),
 * seg[E+1+e] = pairs routed to expert e. One workgroup; E is compiled in (the histogram's size).
 */
export class ExpertSegmentsProgram implements WebGPUProgram {
  variableNames = ['ex'];
  outputShape: number[];
  shaderKey: string;
  dispatchLayout = { x: [0] };
  dispatch: [number, number, number] = [1, 1, 1];
  workgroupSize: [number, number, number] = [PLAN_THREADS, 1, 1];
  uniforms = 'numPairs : i32, rowTile : i32, ';
  private readonly numExperts: number;

  constructor(numExperts: number) {
    this.numExperts = numExperts;
    this.outputShape = [2 * numExperts + 1];
    this.shaderKey = `moeExpertSegments_${numExperts}`;
  }

  static uniformsFor(numPairs: number, rowTile: number): ProgramUniformEntry[] {
    return intUniforms(numPairs, rowTile);
  }

  getUserCode(): string {
    const E = this.numExperts;
    return `
      var<workgroup> hist : array<atomic<i32>, ${E}>;
      fn main(index : i32) {
        let lid = i32(localIndex);
        for (var e = lid; e < ${E}; e += ${PLAN_THREADS}) { atomicStore(&hist[e], 0); }
        workgroupBarrier();
        for (var p = lid; p < uniforms.numPairs; p += ${PLAN_THREADS}) {
          let e = ex[p];
          if (e >= 0 && e < ${E}) { atomicAdd(&hist[e], 1); }
        }
        workgroupBarrier();
        if (lid == 0) {
          var start = 0;
          for (var e = 0; e < ${E}; e++) {
            let c = atomicLoad(&hist[e]);
            result[e] = start;
            result[${E + 1} + e] = c;
            start += ((c + uniforms.rowTile - 1) / uniforms.rowTile) * uniforms.rowTile;
          }
          result[${E}] = start;
        }
      }
    `;
  }
}

/**
 * rowOfPair [T·K] int32: the padded row of each pair. One workgroup per expert scans all pairs in
 * contiguous chunks (one per thread), counts its own, prefix-sums the counts across the threads
 * and writes the rows in pair order, so each expert's rows keep the pairs' order.
 */
export class RowOfPairProgram implements WebGPUProgram {
  variableNames = ['ex', 'seg'];
  outputShape: number[];
  shaderKey = 'moeRowOfPair';
  dispatchLayout = { x: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [PLAN_THREADS, 1, 1];
  uniforms = 'numPairs : i32, ';

  constructor(numPairs: number, numExperts: number) {
    this.outputShape = [numPairs];
    this.dispatch = [numExperts, 1, 1];
  }

  static uniformsFor(numPairs: number): ProgramUniformEntry[] {
    return intUniforms(numPairs);
  }

  getUserCode(): string {
    return `
      var<workgroup> scan : array<i32, ${PLAN_THREADS}>;
      fn main(index : i32) {
        let lid = i32(localIndex);
        let e = i32(workgroupId.x);
        let chunk = (uniforms.numPairs + ${PLAN_THREADS - 1}) / ${PLAN_THREADS};
        let p0 = min(lid * chunk, uniforms.numPairs);
        let p1 = min(p0 + chunk, uniforms.numPairs);
        var mine = 0;
        for (var p = p0; p < p1; p++) { if (ex[p] == e) { mine++; } }
        scan[lid] = mine;
        workgroupBarrier();
        for (var offset = 1; offset < ${PLAN_THREADS}; offset *= 2) {
          var add = 0;
          if (lid >= offset) { add = scan[lid - offset]; }
          workgroupBarrier();
          scan[lid] += add;
          workgroupBarrier();
        }
        var row = seg[e] + scan[lid] - mine;
        for (var p = p0; p < p1; p++) {
          if (ex[p] == e) {
            result[p] = row;
            row++;
          }
        }
      }
    `;
  }
}

/**
 * pairOfRow [capacity] int32: the pair in each padded row, −1 on padding and unused rows. Thread i
 * writes pair i into its row and, when row i is padding, −1 there: the two sets of rows are
 * disjoint and together cover every row, so no row is written twice.
 */
export class PairOfRowProgram implements WebGPUProgram {
  variableNames = ['rp', 'seg'];
  outputShape: number[];
  shaderKey = 'moePairOfRow';
  dispatchLayout = { x: [0] };
  dispatch: [number, number, number];
  workgroupSize: [number, number, number] = [FLAT_THREADS, 1, 1];
  uniforms = 'numPairs : i32, capacity : i32, numExperts : i32, ';

  constructor(numPairs: number, capacity: number) {
    this.outputShape = [capacity];
    this.dispatch = flatDispatch(Math.max(numPairs, capacity));
  }

  static uniformsFor(numPairs: number, capacity: number, numExperts: number): ProgramUniformEntry[] {
    return intUniforms(numPairs, capacity, numExperts);
  }

  getUserCode(): string {
    return `
      ${EXPERT_OF_ROW}
      fn main(index : i32) {
        if (index < uniforms.numPairs) { result[rp[index]] = index; }
        if (index < uniforms.capacity) {
          let used = seg[uniforms.numExperts];
          if (index >= used) {
            result[index] = -1;
          } else {
            let e = expertOfRow(index);
            if (index - seg[e] >= seg[uniforms.numExperts + 1 + e]) { result[index] = -1; }
          }
        }
      }
    `;
  }
}
