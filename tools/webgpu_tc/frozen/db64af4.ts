/**
 * The package's subgroup-matrix programs as they were at db64af4 (the code that computed wrong
 * numbers on the H100 on 2026-12-05 and brought variants v2 down with a segfault), frozen as the
 * WGSL their getUserCode() returned (blank lines dropped), so that the device batch can run the old
 * next to the fixed (tools/webgpu_tc/variants.ts, case 'old'). Their specs: SubgroupMatrixMatMulProgram
 * { source: 'rows', kContiguous: true, no bias/addend/scaling }, subgroup size 32
 * (moeSubgroupMatMul_rows_none_k_32), and SubgroupMatrixWeightGradProgram { left: 'rows', right: 'rows' }
 * (moeSubgroupWeightGrad_rows_rows_none__32_3). Their uniforms and inputs are the current programs'.
 */

/** SubgroupMatrixMatMulProgram.getUserCode() at db64af4, spec above. */
export const OLD_MATMUL_ROWS = `
      enable f16;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
      var<workgroup> As : array<f16, 4096>;
      var<workgroup> Bs : array<f16, 4096>;
      var<workgroup> Ts : array<f32, 1024>;
      var<workgroup> rowSrc : array<i32, 128>;
      var<workgroup> tileExpert : i32;
  fn expertOfRow(r : i32) -> i32 {
    var lo = 0;
    var hi = uniforms.numExperts - 1;
    while (lo < hi) {
      let mid = (lo + hi + 1) / 2;
      if (seg[mid] <= r) { lo = mid; } else { hi = mid - 1; }
    }
    return lo;
  }
          fn loadA(m : i32, k : i32) -> f32 {
            let src = rowSrc[m];
            if (src < 0) { return 0.0; }
            return A[src * uniforms.inner + k];
          }
      fn main() {
        let lid = i32(localIndex);
        let col0 = i32(workgroupId.x) * 128;
        let row0 = i32(workgroupId.y) * 128;
        let subgroup = localIndex / 32u;
        let lane = localIndex % 32u;
        let partRow = ((subgroup / 2u) * 64u);
        let partCol = ((subgroup % 2u) * 64u);
        let s = 1.0;
        if (lid == 0) {
          var e = -1;
          if (row0 < seg[uniforms.numExperts]) { e = expertOfRow(row0); }
          tileExpert = e;
        }
        for (var m = lid; m < 128; m += 128) {
          let r = row0 + m;
          var src = -1;
          if (r < uniforms.numRows) {
            let p = pr[r];
            if (p >= 0) { src = r; }
          }
          rowSrc[m] = src;
        }
        let e = workgroupUniformLoad(&tileExpert);
        var c0_0 = subgroup_matrix_result<f32, 16, 16>();
var c0_1 = subgroup_matrix_result<f32, 16, 16>();
var c0_2 = subgroup_matrix_result<f32, 16, 16>();
var c0_3 = subgroup_matrix_result<f32, 16, 16>();
var c1_0 = subgroup_matrix_result<f32, 16, 16>();
var c1_1 = subgroup_matrix_result<f32, 16, 16>();
var c1_2 = subgroup_matrix_result<f32, 16, 16>();
var c1_3 = subgroup_matrix_result<f32, 16, 16>();
var c2_0 = subgroup_matrix_result<f32, 16, 16>();
var c2_1 = subgroup_matrix_result<f32, 16, 16>();
var c2_2 = subgroup_matrix_result<f32, 16, 16>();
var c2_3 = subgroup_matrix_result<f32, 16, 16>();
var c3_0 = subgroup_matrix_result<f32, 16, 16>();
var c3_1 = subgroup_matrix_result<f32, 16, 16>();
var c3_2 = subgroup_matrix_result<f32, 16, 16>();
var c3_3 = subgroup_matrix_result<f32, 16, 16>();
        // a block past the rows in use (e < 0) runs no step: a uniform loop bound rather than a
        // branch around the matrix operations, the control flow of the verified variants
        let kEnd = select(0, uniforms.inner, e >= 0);
        let wBase = max(e, 0) * uniforms.sE;
        for (var k0 = 0; k0 < kEnd; k0 += 32) {
          for (var i = localIndex; i < 4096u; i += 128u) {
            let mm = (i / 32u); let kk = (i % 32u);
            var v = 0.0;
            let k = k0 + i32(kk);
            if (k < uniforms.inner) { v = loadA(i32(mm), k) * s; }
            As[((mm * 32u) + kk)] = f16(v);
          }
          for (var i = localIndex; i < 4096u; i += 128u) {
            let kk = (i % 32u); let nn = (i / 32u);
            var v = 0.0;
            let k = k0 + i32(kk);
            let n = col0 + i32(nn);
            if (n < uniforms.outCols && k < uniforms.inner) { v = W[wBase + n * uniforms.sN + k * uniforms.sK]; }
            Bs[((kk * 128u) + nn)] = f16(v);
          }
          workgroupBarrier();
          let a0_0 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, (((partRow + 0u) * 32u) + 0u), false, 32u);
let a0_1 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, (((partRow + 16u) * 32u) + 0u), false, 32u);
let a0_2 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, (((partRow + 32u) * 32u) + 0u), false, 32u);
let a0_3 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, (((partRow + 48u) * 32u) + 0u), false, 32u);
let b0_0 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((0u * 128u) + (partCol + 0u)), false, 128u);
let b0_1 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((0u * 128u) + (partCol + 16u)), false, 128u);
let b0_2 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((0u * 128u) + (partCol + 32u)), false, 128u);
let b0_3 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((0u * 128u) + (partCol + 48u)), false, 128u);
c0_0 = subgroupMatrixMultiplyAccumulate(a0_0, b0_0, c0_0);
c0_1 = subgroupMatrixMultiplyAccumulate(a0_0, b0_1, c0_1);
c0_2 = subgroupMatrixMultiplyAccumulate(a0_0, b0_2, c0_2);
c0_3 = subgroupMatrixMultiplyAccumulate(a0_0, b0_3, c0_3);
c1_0 = subgroupMatrixMultiplyAccumulate(a0_1, b0_0, c1_0);
c1_1 = subgroupMatrixMultiplyAccumulate(a0_1, b0_1, c1_1);
c1_2 = subgroupMatrixMultiplyAccumulate(a0_1, b0_2, c1_2);
c1_3 = subgroupMatrixMultiplyAccumulate(a0_1, b0_3, c1_3);
c2_0 = subgroupMatrixMultiplyAccumulate(a0_2, b0_0, c2_0);
c2_1 = subgroupMatrixMultiplyAccumulate(a0_2, b0_1, c2_1);
c2_2 = subgroupMatrixMultiplyAccumulate(a0_2, b0_2, c2_2);
c2_3 = subgroupMatrixMultiplyAccumulate(a0_2, b0_3, c2_3);
c3_0 = subgroupMatrixMultiplyAccumulate(a0_3, b0_0, c3_0);
c3_1 = subgroupMatrixMultiplyAccumulate(a0_3, b0_1, c3_1);
c3_2 = subgroupMatrixMultiplyAccumulate(a0_3, b0_2, c3_2);
c3_3 = subgroupMatrixMultiplyAccumulate(a0_3, b0_3, c3_3);
let a16_0 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, (((partRow + 0u) * 32u) + 16u), false, 32u);
let a16_1 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, (((partRow + 16u) * 32u) + 16u), false, 32u);
let a16_2 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, (((partRow + 32u) * 32u) + 16u), false, 32u);
let a16_3 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, (((partRow + 48u) * 32u) + 16u), false, 32u);
let b16_0 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((16u * 128u) + (partCol + 0u)), false, 128u);
let b16_1 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((16u * 128u) + (partCol + 16u)), false, 128u);
let b16_2 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((16u * 128u) + (partCol + 32u)), false, 128u);
let b16_3 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((16u * 128u) + (partCol + 48u)), false, 128u);
c0_0 = subgroupMatrixMultiplyAccumulate(a16_0, b16_0, c0_0);
c0_1 = subgroupMatrixMultiplyAccumulate(a16_0, b16_1, c0_1);
c0_2 = subgroupMatrixMultiplyAccumulate(a16_0, b16_2, c0_2);
c0_3 = subgroupMatrixMultiplyAccumulate(a16_0, b16_3, c0_3);
c1_0 = subgroupMatrixMultiplyAccumulate(a16_1, b16_0, c1_0);
c1_1 = subgroupMatrixMultiplyAccumulate(a16_1, b16_1, c1_1);
c1_2 = subgroupMatrixMultiplyAccumulate(a16_1, b16_2, c1_2);
c1_3 = subgroupMatrixMultiplyAccumulate(a16_1, b16_3, c1_3);
c2_0 = subgroupMatrixMultiplyAccumulate(a16_2, b16_0, c2_0);
c2_1 = subgroupMatrixMultiplyAccumulate(a16_2, b16_1, c2_1);
c2_2 = subgroupMatrixMultiplyAccumulate(a16_2, b16_2, c2_2);
c2_3 = subgroupMatrixMultiplyAccumulate(a16_2, b16_3, c2_3);
c3_0 = subgroupMatrixMultiplyAccumulate(a16_3, b16_0, c3_0);
c3_1 = subgroupMatrixMultiplyAccumulate(a16_3, b16_1, c3_1);
c3_2 = subgroupMatrixMultiplyAccumulate(a16_3, b16_2, c3_2);
c3_3 = subgroupMatrixMultiplyAccumulate(a16_3, b16_3, c3_3);
          workgroupBarrier();
        }
        let unscale = uniforms.alpha / s;
        subgroupMatrixStore(&Ts, (subgroup * 256u), c0_0, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 0u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 0u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c0_1, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 0u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 16u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c0_2, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 0u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 32u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c0_3, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 0u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 48u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c1_0, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 16u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 0u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c1_1, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 16u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 16u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c1_2, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 16u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 32u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c1_3, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 16u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 48u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c2_0, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 32u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 0u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c2_1, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 32u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 16u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c2_2, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 32u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 32u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c2_3, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 32u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 48u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c3_0, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 48u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 0u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c3_1, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 48u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 16u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c3_2, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 48u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 32u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c3_3, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let m = ((partRow + 48u) + (t / 16u));
          let r = row0 + i32(m);
          let c = col0 + i32(((partCol + 48u) + (t % 16u)));
          if (r < uniforms.numRows && c < uniforms.outCols) {
            var v = 0.0;
            if (e >= 0 && rowSrc[m] >= 0) {
              v = unscale * Ts[((subgroup * 256u) + t)];
            }
            result[r * uniforms.outCols + c] = v;
          }
        }
}
workgroupBarrier();
      }
`;

/** SubgroupMatrixWeightGradProgram.getUserCode() at db64af4, spec above. */
export const OLD_WEIGHT_GRAD_ROWS = `
      enable f16;
enable chromium_experimental_subgroup_matrix;
diagnostic(off, chromium.subgroup_matrix_uniformity);
      var<workgroup> As : array<f16, 4096>;
      var<workgroup> Bs : array<f16, 4096>;
      var<workgroup> Ts : array<f32, 1024>;
      var<workgroup> segStart : i32;
      var<workgroup> segCount : i32;
      fn loadL(r : i32, p : i32) -> f32 { return L[r * uniforms.P + p]; }
      fn loadR(r : i32, q : i32) -> f32 { return R[r * uniforms.Q + q]; }
      fn main() {
        let lid = i32(localIndex);
        let e = i32(workgroupId.z);
        let q0 = i32(workgroupId.x) * 128;
        let p0 = i32(workgroupId.y) * 128;
        let subgroup = localIndex / 32u;
        let lane = localIndex % 32u;
        let partRow = ((subgroup / 2u) * 64u);
        let partCol = ((subgroup % 2u) * 64u);
        let s = 1.0;
        if (lid == 0) {
          segStart = seg[e];
          segCount = seg[uniforms.numExperts + 1 + e];
        }
        let start = workgroupUniformLoad(&segStart);
        let count = workgroupUniformLoad(&segCount);
        var c0_0 = subgroup_matrix_result<f32, 16, 16>();
var c0_1 = subgroup_matrix_result<f32, 16, 16>();
var c0_2 = subgroup_matrix_result<f32, 16, 16>();
var c0_3 = subgroup_matrix_result<f32, 16, 16>();
var c1_0 = subgroup_matrix_result<f32, 16, 16>();
var c1_1 = subgroup_matrix_result<f32, 16, 16>();
var c1_2 = subgroup_matrix_result<f32, 16, 16>();
var c1_3 = subgroup_matrix_result<f32, 16, 16>();
var c2_0 = subgroup_matrix_result<f32, 16, 16>();
var c2_1 = subgroup_matrix_result<f32, 16, 16>();
var c2_2 = subgroup_matrix_result<f32, 16, 16>();
var c2_3 = subgroup_matrix_result<f32, 16, 16>();
var c3_0 = subgroup_matrix_result<f32, 16, 16>();
var c3_1 = subgroup_matrix_result<f32, 16, 16>();
var c3_2 = subgroup_matrix_result<f32, 16, 16>();
var c3_3 = subgroup_matrix_result<f32, 16, 16>();
        for (var r0 = 0; r0 < count; r0 += 32) {
          for (var i = localIndex; i < 4096u; i += 128u) {
            let pp = (i % 128u); let rr = (i / 128u);
            var v = 0.0;
            let p = p0 + i32(pp);
            let r = r0 + i32(rr);
            if (p < uniforms.P && r < count) { v = loadL(start + r, p) * s; }
            As[((rr * 128u) + pp)] = f16(v);
          }
          for (var i = localIndex; i < 4096u; i += 128u) {
            let rr = (i / 128u); let qq = (i % 128u);
            var v = 0.0;
            let q = q0 + i32(qq);
            let r = r0 + i32(rr);
            if (q < uniforms.Q && r < count) { v = loadR(start + r, q); }
            Bs[((rr * 128u) + qq)] = f16(v);
          }
          workgroupBarrier();
          let a0_0 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, ((0u * 128u) + (partRow + 0u)), true, 128u);
let a0_1 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, ((0u * 128u) + (partRow + 16u)), true, 128u);
let a0_2 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, ((0u * 128u) + (partRow + 32u)), true, 128u);
let a0_3 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, ((0u * 128u) + (partRow + 48u)), true, 128u);
let b0_0 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((0u * 128u) + (partCol + 0u)), false, 128u);
let b0_1 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((0u * 128u) + (partCol + 16u)), false, 128u);
let b0_2 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((0u * 128u) + (partCol + 32u)), false, 128u);
let b0_3 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((0u * 128u) + (partCol + 48u)), false, 128u);
c0_0 = subgroupMatrixMultiplyAccumulate(a0_0, b0_0, c0_0);
c0_1 = subgroupMatrixMultiplyAccumulate(a0_0, b0_1, c0_1);
c0_2 = subgroupMatrixMultiplyAccumulate(a0_0, b0_2, c0_2);
c0_3 = subgroupMatrixMultiplyAccumulate(a0_0, b0_3, c0_3);
c1_0 = subgroupMatrixMultiplyAccumulate(a0_1, b0_0, c1_0);
c1_1 = subgroupMatrixMultiplyAccumulate(a0_1, b0_1, c1_1);
c1_2 = subgroupMatrixMultiplyAccumulate(a0_1, b0_2, c1_2);
c1_3 = subgroupMatrixMultiplyAccumulate(a0_1, b0_3, c1_3);
c2_0 = subgroupMatrixMultiplyAccumulate(a0_2, b0_0, c2_0);
c2_1 = subgroupMatrixMultiplyAccumulate(a0_2, b0_1, c2_1);
c2_2 = subgroupMatrixMultiplyAccumulate(a0_2, b0_2, c2_2);
c2_3 = subgroupMatrixMultiplyAccumulate(a0_2, b0_3, c2_3);
c3_0 = subgroupMatrixMultiplyAccumulate(a0_3, b0_0, c3_0);
c3_1 = subgroupMatrixMultiplyAccumulate(a0_3, b0_1, c3_1);
c3_2 = subgroupMatrixMultiplyAccumulate(a0_3, b0_2, c3_2);
c3_3 = subgroupMatrixMultiplyAccumulate(a0_3, b0_3, c3_3);
let a16_0 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, ((16u * 128u) + (partRow + 0u)), true, 128u);
let a16_1 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, ((16u * 128u) + (partRow + 16u)), true, 128u);
let a16_2 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, ((16u * 128u) + (partRow + 32u)), true, 128u);
let a16_3 = subgroupMatrixLoad<subgroup_matrix_left<f16, 16, 16>>(&As, ((16u * 128u) + (partRow + 48u)), true, 128u);
let b16_0 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((16u * 128u) + (partCol + 0u)), false, 128u);
let b16_1 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((16u * 128u) + (partCol + 16u)), false, 128u);
let b16_2 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((16u * 128u) + (partCol + 32u)), false, 128u);
let b16_3 = subgroupMatrixLoad<subgroup_matrix_right<f16, 16, 16>>(&Bs, ((16u * 128u) + (partCol + 48u)), false, 128u);
c0_0 = subgroupMatrixMultiplyAccumulate(a16_0, b16_0, c0_0);
c0_1 = subgroupMatrixMultiplyAccumulate(a16_0, b16_1, c0_1);
c0_2 = subgroupMatrixMultiplyAccumulate(a16_0, b16_2, c0_2);
c0_3 = subgroupMatrixMultiplyAccumulate(a16_0, b16_3, c0_3);
c1_0 = subgroupMatrixMultiplyAccumulate(a16_1, b16_0, c1_0);
c1_1 = subgroupMatrixMultiplyAccumulate(a16_1, b16_1, c1_1);
c1_2 = subgroupMatrixMultiplyAccumulate(a16_1, b16_2, c1_2);
c1_3 = subgroupMatrixMultiplyAccumulate(a16_1, b16_3, c1_3);
c2_0 = subgroupMatrixMultiplyAccumulate(a16_2, b16_0, c2_0);
c2_1 = subgroupMatrixMultiplyAccumulate(a16_2, b16_1, c2_1);
c2_2 = subgroupMatrixMultiplyAccumulate(a16_2, b16_2, c2_2);
c2_3 = subgroupMatrixMultiplyAccumulate(a16_2, b16_3, c2_3);
c3_0 = subgroupMatrixMultiplyAccumulate(a16_3, b16_0, c3_0);
c3_1 = subgroupMatrixMultiplyAccumulate(a16_3, b16_1, c3_1);
c3_2 = subgroupMatrixMultiplyAccumulate(a16_3, b16_2, c3_2);
c3_3 = subgroupMatrixMultiplyAccumulate(a16_3, b16_3, c3_3);
          workgroupBarrier();
        }
        let unscale = uniforms.alpha / s;
        subgroupMatrixStore(&Ts, (subgroup * 256u), c0_0, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 0u) + (t / 16u)));
          let q = q0 + i32(((partCol + 0u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c0_1, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 0u) + (t / 16u)));
          let q = q0 + i32(((partCol + 16u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c0_2, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 0u) + (t / 16u)));
          let q = q0 + i32(((partCol + 32u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c0_3, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 0u) + (t / 16u)));
          let q = q0 + i32(((partCol + 48u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c1_0, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 16u) + (t / 16u)));
          let q = q0 + i32(((partCol + 0u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c1_1, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 16u) + (t / 16u)));
          let q = q0 + i32(((partCol + 16u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c1_2, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 16u) + (t / 16u)));
          let q = q0 + i32(((partCol + 32u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c1_3, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 16u) + (t / 16u)));
          let q = q0 + i32(((partCol + 48u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c2_0, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 32u) + (t / 16u)));
          let q = q0 + i32(((partCol + 0u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c2_1, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 32u) + (t / 16u)));
          let q = q0 + i32(((partCol + 16u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c2_2, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 32u) + (t / 16u)));
          let q = q0 + i32(((partCol + 32u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c2_3, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 32u) + (t / 16u)));
          let q = q0 + i32(((partCol + 48u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c3_0, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 48u) + (t / 16u)));
          let q = q0 + i32(((partCol + 0u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c3_1, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 48u) + (t / 16u)));
          let q = q0 + i32(((partCol + 16u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c3_2, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 48u) + (t / 16u)));
          let q = q0 + i32(((partCol + 32u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
subgroupMatrixStore(&Ts, (subgroup * 256u), c3_3, false, 16u);
workgroupBarrier();
for (var t = lane; t < 256u; t += 32u) {
  {
          let p = p0 + i32(((partRow + 48u) + (t / 16u)));
          let q = q0 + i32(((partCol + 48u) + (t % 16u)));
          if (p < uniforms.P && q < uniforms.Q) {
            result[e * uniforms.oE + p * uniforms.oP + q * uniforms.oQ] = unscale * Ts[((subgroup * 256u) + t)];
          }
        }
}
workgroupBarrier();
      }
`;
