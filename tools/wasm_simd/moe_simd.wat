;; The wasm MoE kernels' loops around the products (src/backends/wasm/moe_simd.ts), in SIMD (v128).
;; The module imports tfjs-backend-wasm's own memory, so it reads and writes tensors in place: every
;; pointer below is a byte address on that heap, every row is contiguous float32.
;;
;; Build: npx tsx tools/wasm_simd/build.ts  (assembles this file with tools/wasm_simd/wat.ts into
;; src/backends/wasm/moe_simd_bytes.ts; spec/backends/wasm_simd.spec.ts checks that file is current).
;;
;; Results against the JS loops they replace (src/backends/cpu/moe_math.ts, moe_kernels.ts):
;; - combine_rows: the same float64 sums in the same order, so bit for bit the same float32 results;
;; - pair_row_dot: float64 sums in another order (four partial sums), float32 result;
;; - gather_rows, gather_transpose: copies, bit for bit;
;; - swiglu_forward / swiglu_backward: float32 arithmetic and a float32 exp (Cody–Waite reduction,
;;   Cephes' degree-5 polynomial, ~1 ulp), where the JS loop computes in float64 with Math.exp; the
;;   spec bounds the difference (spec/backends/wasm_simd.spec.ts says which bound and why).
(module
  (import "env" "memory" (memory 0))

  ;; Row `r` of an indexed tensor: idx[start + r] when indexed, else start + r.
  (func $row_of (param $indexed i32) (param $idx i32) (param $start i32) (param $r i32) (result i32)
    local.get $indexed
    if
      local.get $idx
      local.get $start
      local.get $r
      i32.add
      i32.const 2
      i32.shl
      i32.add
      i32.load
      return
    end
    local.get $start
    local.get $r
    i32.add)

  ;; a[n, I] = silu(g)·u = (g·u)·σ(g) with h[n, 2I] = [g | u] (gate and up halves); when `scaled`,
  ;; also a_scaled[r] = a[r]·scale[r]. Eight columns a step in two independent chains (A: the first
  ;; four, B: the next four), interleaved statement by statement: one chain's σ is a long dependency
  ;; chain that leaves the CPU waiting, and the other chain's instructions fill that time. The
  ;; last step's eight columns end at the row's end, overlapping the step before when 8 does not
  ;; divide I (out of place, so those columns are written twice with the same values). I >= 8.
  (func $swiglu_forward (export "swiglu_forward")
    (param $n i32) (param $inter i32) (param $h i32) (param $a i32) (param $scaled i32) (param $scale i32) (param $as i32)
    (local $half i32) (local $last i32) (local $r i32) (local $c i32)
    (local $g_at i32) (local $a_at i32) (local $as_at i32) (local $s v128)
    (local $gA v128) (local $uA v128) (local $xA v128) (local $tA v128) (local $kA v128) (local $r2A v128) (local $eA v128) (local $gB v128) (local $uB v128) (local $xB v128) (local $tB v128) (local $kB v128) (local $r2B v128) (local $eB v128)
    (local $x_min v128) (local $x_max v128) (local $log2e v128) (local $round v128) (local $ln2_hi v128) (local $ln2_lo v128)
    (local $p0 v128) (local $p1 v128) (local $p2 v128) (local $p3 v128) (local $p4 v128) (local $p5 v128) (local $one v128) (local $exp_bias v128)
    local.get $inter
    i32.const 2
    i32.shl
    local.set $half
    local.get $half
    i32.const 32
    i32.sub
    local.set $last
    local.get $h
    local.set $g_at
    local.get $a
    local.set $a_at
    local.get $as
    local.set $as_at
    ;; the exp's constants, built once (V8 builds a v128.const in the loop with several instructions)
    v128.const f32x4 -87.3 -87.3 -87.3 -87.3
    local.set $x_min
    v128.const f32x4 88.3 88.3 88.3 88.3
    local.set $x_max
    v128.const f32x4 1.44269504 1.44269504 1.44269504 1.44269504
    local.set $log2e
    v128.const f32x4 12582912 12582912 12582912 12582912
    local.set $round
    v128.const f32x4 0.693359375 0.693359375 0.693359375 0.693359375
    local.set $ln2_hi
    v128.const f32x4 -2.12194440e-4 -2.12194440e-4 -2.12194440e-4 -2.12194440e-4
    local.set $ln2_lo
    v128.const f32x4 5.0000001201e-1 5.0000001201e-1 5.0000001201e-1 5.0000001201e-1
    local.set $p0
    v128.const f32x4 1.6666665459e-1 1.6666665459e-1 1.6666665459e-1 1.6666665459e-1
    local.set $p1
    v128.const f32x4 4.1665795894e-2 4.1665795894e-2 4.1665795894e-2 4.1665795894e-2
    local.set $p2
    v128.const f32x4 8.3334519073e-3 8.3334519073e-3 8.3334519073e-3 8.3334519073e-3
    local.set $p3
    v128.const f32x4 1.3981999507e-3 1.3981999507e-3 1.3981999507e-3 1.3981999507e-3
    local.set $p4
    v128.const f32x4 1.9875691500e-4 1.9875691500e-4 1.9875691500e-4 1.9875691500e-4
    local.set $p5
    v128.const f32x4 1 1 1 1
    local.set $one
    v128.const i32x4 0x3f800000 0x3f800000 0x3f800000 0x3f800000
    local.set $exp_bias
    block $done
    loop $rows
      local.get $r
      local.get $n
      i32.ge_u
      br_if $done
      local.get $scaled
      if
        local.get $scale local.get $r i32.const 2 i32.shl i32.add v128.load32_splat local.set $s
      end
      ;; c: the step's first column, in bytes from the row's start; the last step starts at `last`
      i32.const 0
      local.set $c
      loop $cols
        local.get $c local.get $last local.get $c local.get $last i32.lt_u select local.set $c
        local.get $g_at local.get $c i32.add v128.load align=4 local.set $gA
        local.get $g_at local.get $c i32.add v128.load offset=16 align=4 local.set $gB
        local.get $g_at local.get $half i32.add local.get $c i32.add v128.load align=4 local.set $uA
        local.get $g_at local.get $half i32.add local.get $c i32.add v128.load offset=16 align=4 local.set $uB
        ;; x = −g clamped to [−87.3, 88.3], where 2^k below stays a normal float
        local.get $gA f32x4.neg local.get $x_min f32x4.pmax local.get $x_max f32x4.pmin local.set $xA
        local.get $gB f32x4.neg local.get $x_min f32x4.pmax local.get $x_max f32x4.pmin local.set $xB
        ;; t = x·log2 e + 1.5·2^23 rounds to the integer k = t − 1.5·2^23 (ties to even, as nearest),
        ;; which t holds in its low mantissa bits
        local.get $xA local.get $log2e f32x4.mul local.get $round f32x4.add local.set $tA
        local.get $xB local.get $log2e f32x4.mul local.get $round f32x4.add local.set $tB
        local.get $tA local.get $round f32x4.sub local.set $kA
        local.get $tB local.get $round f32x4.sub local.set $kB
        ;; r = x − k·ln 2 in two parts (Cody–Waite): |r| <= ln 2 / 2
        local.get $xA local.get $kA local.get $ln2_hi f32x4.mul f32x4.sub local.get $kA local.get $ln2_lo f32x4.mul f32x4.sub local.set $xA
        local.get $xB local.get $kB local.get $ln2_hi f32x4.mul f32x4.sub local.get $kB local.get $ln2_lo f32x4.mul f32x4.sub local.set $xB
        local.get $xA local.get $xA f32x4.mul local.set $r2A
        local.get $xB local.get $xB f32x4.mul local.set $r2B
        ;; e^r = P(r)·r² + r + 1, P Cephes' expf polynomial in Estrin's form (a shorter dependency chain
        ;; than Horner's): P = (p0 + p1·r) + r²·(p2 + p3·r) + r⁴·(p4 + p5·r)
        local.get $p1 local.get $xA f32x4.mul local.get $p0 f32x4.add local.get $p3 local.get $xA f32x4.mul local.get $p2 f32x4.add local.get $r2A f32x4.mul f32x4.add local.set $eA
        local.get $p1 local.get $xB f32x4.mul local.get $p0 f32x4.add local.get $p3 local.get $xB f32x4.mul local.get $p2 f32x4.add local.get $r2B f32x4.mul f32x4.add local.set $eB
        local.get $p5 local.get $xA f32x4.mul local.get $p4 f32x4.add local.get $r2A local.get $r2A f32x4.mul f32x4.mul local.set $kA
        local.get $p5 local.get $xB f32x4.mul local.get $p4 f32x4.add local.get $r2B local.get $r2B f32x4.mul f32x4.mul local.set $kB
        local.get $eA local.get $kA f32x4.add local.get $r2A f32x4.mul local.get $xA f32x4.add local.get $one f32x4.add local.set $eA
        local.get $eB local.get $kB f32x4.add local.get $r2B f32x4.mul local.get $xB f32x4.add local.get $one f32x4.add local.set $eB
        ;; 1 + e^−g = 1 + e^r·2^k: t's bits << 23 leave k << 23 (1.5·2^23's own bits shift out), + 127 << 23
        local.get $eA local.get $tA i32.const 23 i32x4.shl local.get $exp_bias i32x4.add f32x4.mul local.get $one f32x4.add local.set $eA
        local.get $eB local.get $tB i32.const 23 i32x4.shl local.get $exp_bias i32x4.add f32x4.mul local.get $one f32x4.add local.set $eB
        ;; σ(g) = 1 / (1 + e^−g)
        local.get $one local.get $eA f32x4.div local.set $eA
        local.get $one local.get $eB f32x4.div local.set $eB
        ;; a = (g·u)·σ(g), the JS loop's order (into e)
        local.get $gA local.get $uA f32x4.mul local.get $eA f32x4.mul local.set $eA
        local.get $gB local.get $uB f32x4.mul local.get $eB f32x4.mul local.set $eB
        local.get $a_at local.get $c i32.add local.get $eA v128.store align=4
        local.get $a_at local.get $c i32.add local.get $eB v128.store offset=16 align=4
        local.get $scaled
        if
          local.get $as_at local.get $c i32.add local.get $eA local.get $s f32x4.mul v128.store align=4
          local.get $as_at local.get $c i32.add local.get $eB local.get $s f32x4.mul v128.store offset=16 align=4
        end
        local.get $c local.get $last i32.ne
        local.get $c i32.const 32 i32.add local.set $c
        br_if $cols
      end
      ;; the next row
      local.get $g_at local.get $half i32.add local.get $half i32.add local.set $g_at
      local.get $a_at local.get $half i32.add local.set $a_at
      local.get $as_at local.get $half i32.add local.set $as_at
      local.get $r i32.const 1 i32.add local.set $r
      br $rows
    end
    end)

  ;; dh[n, 2I] = [dg | du] from h[n, 2I] = [g | u] and da[n, I] (times scale[r] when `scaled`):
  ;; d = da·s, dg = ((d·u)·σ)·(1 + g·(1 − σ)), du = (d·g)·σ with σ = σ(g), the JS loop's order.
  ;; Two chains and the last step as in swiglu_forward; I >= 8.
  (func $swiglu_backward (export "swiglu_backward")
    (param $n i32) (param $inter i32) (param $h i32) (param $da i32) (param $scaled i32) (param $scale i32) (param $dh i32)
    (local $half i32) (local $last i32) (local $r i32) (local $c i32)
    (local $g_at i32) (local $da_at i32) (local $dh_at i32) (local $s v128)
    (local $gA v128) (local $uA v128) (local $dA v128) (local $xA v128) (local $tA v128) (local $kA v128) (local $r2A v128) (local $eA v128) (local $gB v128) (local $uB v128) (local $dB v128) (local $xB v128) (local $tB v128) (local $kB v128) (local $r2B v128) (local $eB v128)
    (local $x_min v128) (local $x_max v128) (local $log2e v128) (local $round v128) (local $ln2_hi v128) (local $ln2_lo v128)
    (local $p0 v128) (local $p1 v128) (local $p2 v128) (local $p3 v128) (local $p4 v128) (local $p5 v128) (local $one v128) (local $exp_bias v128)
    local.get $inter
    i32.const 2
    i32.shl
    local.set $half
    local.get $half
    i32.const 32
    i32.sub
    local.set $last
    local.get $h
    local.set $g_at
    local.get $da
    local.set $da_at
    local.get $dh
    local.set $dh_at
    ;; the exp's constants, built once (V8 builds a v128.const in the loop with several instructions)
    v128.const f32x4 -87.3 -87.3 -87.3 -87.3
    local.set $x_min
    v128.const f32x4 88.3 88.3 88.3 88.3
    local.set $x_max
    v128.const f32x4 1.44269504 1.44269504 1.44269504 1.44269504
    local.set $log2e
    v128.const f32x4 12582912 12582912 12582912 12582912
    local.set $round
    v128.const f32x4 0.693359375 0.693359375 0.693359375 0.693359375
    local.set $ln2_hi
    v128.const f32x4 -2.12194440e-4 -2.12194440e-4 -2.12194440e-4 -2.12194440e-4
    local.set $ln2_lo
    v128.const f32x4 5.0000001201e-1 5.0000001201e-1 5.0000001201e-1 5.0000001201e-1
    local.set $p0
    v128.const f32x4 1.6666665459e-1 1.6666665459e-1 1.6666665459e-1 1.6666665459e-1
    local.set $p1
    v128.const f32x4 4.1665795894e-2 4.1665795894e-2 4.1665795894e-2 4.1665795894e-2
    local.set $p2
    v128.const f32x4 8.3334519073e-3 8.3334519073e-3 8.3334519073e-3 8.3334519073e-3
    local.set $p3
    v128.const f32x4 1.3981999507e-3 1.3981999507e-3 1.3981999507e-3 1.3981999507e-3
    local.set $p4
    v128.const f32x4 1.9875691500e-4 1.9875691500e-4 1.9875691500e-4 1.9875691500e-4
    local.set $p5
    v128.const f32x4 1 1 1 1
    local.set $one
    v128.const i32x4 0x3f800000 0x3f800000 0x3f800000 0x3f800000
    local.set $exp_bias
    local.get $one
    local.set $s
    block $done
    loop $rows
      local.get $r
      local.get $n
      i32.ge_u
      br_if $done
      local.get $scaled
      if
        local.get $scale local.get $r i32.const 2 i32.shl i32.add v128.load32_splat local.set $s
      end
      i32.const 0
      local.set $c
      loop $cols
        local.get $c local.get $last local.get $c local.get $last i32.lt_u select local.set $c
        local.get $g_at local.get $c i32.add v128.load align=4 local.set $gA
        local.get $g_at local.get $c i32.add v128.load offset=16 align=4 local.set $gB
        local.get $g_at local.get $half i32.add local.get $c i32.add v128.load align=4 local.set $uA
        local.get $g_at local.get $half i32.add local.get $c i32.add v128.load offset=16 align=4 local.set $uB
        local.get $da_at local.get $c i32.add v128.load align=4 local.set $dA
        local.get $da_at local.get $c i32.add v128.load offset=16 align=4 local.set $dB
        ;; x = −g clamped to [−87.3, 88.3], where 2^k below stays a normal float
        local.get $gA f32x4.neg local.get $x_min f32x4.pmax local.get $x_max f32x4.pmin local.set $xA
        local.get $gB f32x4.neg local.get $x_min f32x4.pmax local.get $x_max f32x4.pmin local.set $xB
        ;; t = x·log2 e + 1.5·2^23 rounds to the integer k = t − 1.5·2^23 (ties to even, as nearest),
        ;; which t holds in its low mantissa bits
        local.get $xA local.get $log2e f32x4.mul local.get $round f32x4.add local.set $tA
        local.get $xB local.get $log2e f32x4.mul local.get $round f32x4.add local.set $tB
        local.get $tA local.get $round f32x4.sub local.set $kA
        local.get $tB local.get $round f32x4.sub local.set $kB
        ;; r = x − k·ln 2 in two parts (Cody–Waite): |r| <= ln 2 / 2
        local.get $xA local.get $kA local.get $ln2_hi f32x4.mul f32x4.sub local.get $kA local.get $ln2_lo f32x4.mul f32x4.sub local.set $xA
        local.get $xB local.get $kB local.get $ln2_hi f32x4.mul f32x4.sub local.get $kB local.get $ln2_lo f32x4.mul f32x4.sub local.set $xB
        local.get $xA local.get $xA f32x4.mul local.set $r2A
        local.get $xB local.get $xB f32x4.mul local.set $r2B
        ;; e^r = P(r)·r² + r + 1, P Cephes' expf polynomial in Estrin's form (a shorter dependency chain
        ;; than Horner's): P = (p0 + p1·r) + r²·(p2 + p3·r) + r⁴·(p4 + p5·r)
        local.get $p1 local.get $xA f32x4.mul local.get $p0 f32x4.add local.get $p3 local.get $xA f32x4.mul local.get $p2 f32x4.add local.get $r2A f32x4.mul f32x4.add local.set $eA
        local.get $p1 local.get $xB f32x4.mul local.get $p0 f32x4.add local.get $p3 local.get $xB f32x4.mul local.get $p2 f32x4.add local.get $r2B f32x4.mul f32x4.add local.set $eB
        local.get $p5 local.get $xA f32x4.mul local.get $p4 f32x4.add local.get $r2A local.get $r2A f32x4.mul f32x4.mul local.set $kA
        local.get $p5 local.get $xB f32x4.mul local.get $p4 f32x4.add local.get $r2B local.get $r2B f32x4.mul f32x4.mul local.set $kB
        local.get $eA local.get $kA f32x4.add local.get $r2A f32x4.mul local.get $xA f32x4.add local.get $one f32x4.add local.set $eA
        local.get $eB local.get $kB f32x4.add local.get $r2B f32x4.mul local.get $xB f32x4.add local.get $one f32x4.add local.set $eB
        ;; 1 + e^−g = 1 + e^r·2^k: t's bits << 23 leave k << 23 (1.5·2^23's own bits shift out), + 127 << 23
        local.get $eA local.get $tA i32.const 23 i32x4.shl local.get $exp_bias i32x4.add f32x4.mul local.get $one f32x4.add local.set $eA
        local.get $eB local.get $tB i32.const 23 i32x4.shl local.get $exp_bias i32x4.add f32x4.mul local.get $one f32x4.add local.set $eB
        ;; σ(g) = 1 / (1 + e^−g)
        local.get $one local.get $eA f32x4.div local.set $eA
        local.get $one local.get $eB f32x4.div local.set $eB
        ;; d = da·s; dg = ((d·u)·σ)·(1 + g·(1 − σ)) (into k); du = (d·g)·σ (into u)
        local.get $dA local.get $s f32x4.mul local.set $dA
        local.get $dB local.get $s f32x4.mul local.set $dB
        local.get $dA local.get $uA f32x4.mul local.get $eA f32x4.mul local.get $one local.get $gA local.get $one local.get $eA f32x4.sub f32x4.mul f32x4.add f32x4.mul local.set $kA
        local.get $dB local.get $uB f32x4.mul local.get $eB f32x4.mul local.get $one local.get $gB local.get $one local.get $eB f32x4.sub f32x4.mul f32x4.add f32x4.mul local.set $kB
        local.get $dA local.get $gA f32x4.mul local.get $eA f32x4.mul local.set $uA
        local.get $dB local.get $gB f32x4.mul local.get $eB f32x4.mul local.set $uB
        local.get $dh_at local.get $c i32.add local.get $kA v128.store align=4
        local.get $dh_at local.get $c i32.add local.get $kB v128.store offset=16 align=4
        local.get $dh_at local.get $half i32.add local.get $c i32.add local.get $uA v128.store align=4
        local.get $dh_at local.get $half i32.add local.get $c i32.add local.get $uB v128.store offset=16 align=4
        local.get $c local.get $last i32.ne
        local.get $c i32.const 32 i32.add local.set $c
        br_if $cols
      end
      ;; the next row
      local.get $g_at local.get $half i32.add local.get $half i32.add local.set $g_at
      local.get $dh_at local.get $half i32.add local.get $half i32.add local.set $dh_at
      local.get $da_at local.get $half i32.add local.set $da_at
      local.get $r i32.const 1 i32.add local.set $r
      br $rows
    end
    end)

  ;; out[tok, c] = Σ_j w[tok·K + j]·y[rows[tok·K + j], c] (w = 1 unless `weighted`), summed in float64
  ;; from 0 in slot order, as moe_math's combineRows: two columns a float64x2, four a step.
  (func $combine_rows (export "combine_rows")
    (param $t i32) (param $k i32) (param $cols i32) (param $y i32) (param $rows i32) (param $weighted i32) (param $w i32) (param $out i32)
    (local $row_bytes i32) (local $tok i32) (local $c i32) (local $j i32) (local $pair i32) (local $o i32)
    (local $acc f64) (local $sd f64)
    (local $s v128) (local $v v128) (local $lo v128) (local $hi v128)
    local.get $cols
    i32.const 2
    i32.shl
    local.set $row_bytes
    local.get $out
    local.set $o
    block $done
    loop $tokens
      local.get $tok
      local.get $t
      i32.ge_u
      br_if $done
      i32.const 0
      local.set $c
      block $wide_done
      loop $wide
        local.get $c
        i32.const 16
        i32.add
        local.get $row_bytes
        i32.gt_u
        br_if $wide_done
        v128.const f64x2 0 0
        local.tee $lo
        local.set $hi
        i32.const 0
        local.set $j
        loop $slots
          ;; s = w of pair tok·K + j (or 1); v = y[rows[pair], c … c + 3]
          f64.const 1
          local.set $sd
          local.get $weighted
          if
            local.get $w
            local.get $pair
            local.get $j
            i32.add
            i32.const 2
            i32.shl
            i32.add
            f32.load
            f64.promote_f32
            local.set $sd
          end
          local.get $sd
          f64x2.splat
          local.set $s
          local.get $y
          local.get $rows
          local.get $pair
          local.get $j
          i32.add
          i32.const 2
          i32.shl
          i32.add
          i32.load
          local.get $row_bytes
          i32.mul
          i32.add
          local.get $c
          i32.add
          v128.load align=4
          local.set $v
          local.get $lo
          local.get $v
          f64x2.promote_low_f32x4
          local.get $s
          f64x2.mul
          f64x2.add
          local.set $lo
          local.get $hi
          local.get $v
          local.get $v
          i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7
          f64x2.promote_low_f32x4
          local.get $s
          f64x2.mul
          f64x2.add
          local.set $hi
          local.get $j
          i32.const 1
          i32.add
          local.tee $j
          local.get $k
          i32.lt_u
          br_if $slots
        end
        local.get $o
        local.get $c
        i32.add
        local.get $lo
        f32x4.demote_f64x2_zero
        local.get $hi
        f32x4.demote_f64x2_zero
        i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        v128.store align=4
        local.get $c
        i32.const 16
        i32.add
        local.set $c
        br $wide
      end
      end
      ;; the last cols mod 4, one at a time
      block $tail_done
      loop $tail
        local.get $c
        local.get $row_bytes
        i32.ge_u
        br_if $tail_done
        f64.const 0
        local.set $acc
        i32.const 0
        local.set $j
        loop $slots1
          f64.const 1
          local.set $sd
          local.get $weighted
          if
            local.get $w
            local.get $pair
            local.get $j
            i32.add
            i32.const 2
            i32.shl
            i32.add
            f32.load
            f64.promote_f32
            local.set $sd
          end
          local.get $acc
          local.get $sd
          local.get $y
          local.get $rows
          local.get $pair
          local.get $j
          i32.add
          i32.const 2
          i32.shl
          i32.add
          i32.load
          local.get $row_bytes
          i32.mul
          i32.add
          local.get $c
          i32.add
          f32.load
          f64.promote_f32
          f64.mul
          f64.add
          local.set $acc
          local.get $j
          i32.const 1
          i32.add
          local.tee $j
          local.get $k
          i32.lt_u
          br_if $slots1
        end
        local.get $o
        local.get $c
        i32.add
        local.get $acc
        f32.demote_f64
        f32.store
        local.get $c
        i32.const 4
        i32.add
        local.set $c
        br $tail
      end
      end
      local.get $pair
      local.get $k
      i32.add
      local.set $pair
      local.get $o
      local.get $row_bytes
      i32.add
      local.set $o
      local.get $tok
      i32.const 1
      i32.add
      local.set $tok
      br $tokens
    end
    end)

  ;; out[p] = ⟨a[rows[p]], b[rows[p]]⟩ for p < pairs, float64 products and sums (four partial sums).
  (func $pair_row_dot (export "pair_row_dot")
    (param $pairs i32) (param $cols i32) (param $a i32) (param $b i32) (param $rows i32) (param $out i32)
    (local $row_bytes i32) (local $p i32) (local $off i32) (local $c i32)
    (local $acc f64)
    (local $va v128) (local $vb v128) (local $lo v128) (local $hi v128)
    local.get $cols
    i32.const 2
    i32.shl
    local.set $row_bytes
    block $done
    loop $pairs_loop
      local.get $p
      local.get $pairs
      i32.ge_u
      br_if $done
      local.get $rows
      local.get $p
      i32.const 2
      i32.shl
      i32.add
      i32.load
      local.get $row_bytes
      i32.mul
      local.set $off
      v128.const f64x2 0 0
      local.tee $lo
      local.set $hi
      i32.const 0
      local.set $c
      block $wide_done
      loop $wide
        local.get $c
        i32.const 16
        i32.add
        local.get $row_bytes
        i32.gt_u
        br_if $wide_done
        local.get $a
        local.get $off
        i32.add
        local.get $c
        i32.add
        v128.load align=4
        local.set $va
        local.get $b
        local.get $off
        i32.add
        local.get $c
        i32.add
        v128.load align=4
        local.set $vb
        local.get $lo
        local.get $va
        f64x2.promote_low_f32x4
        local.get $vb
        f64x2.promote_low_f32x4
        f64x2.mul
        f64x2.add
        local.set $lo
        local.get $hi
        local.get $va
        local.get $va
        i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7
        f64x2.promote_low_f32x4
        local.get $vb
        local.get $vb
        i8x16.shuffle 8 9 10 11 12 13 14 15 0 1 2 3 4 5 6 7
        f64x2.promote_low_f32x4
        f64x2.mul
        f64x2.add
        local.set $hi
        local.get $c
        i32.const 16
        i32.add
        local.set $c
        br $wide
      end
      end
      local.get $lo
      local.get $hi
      f64x2.add
      local.tee $lo
      f64x2.extract_lane 0
      local.get $lo
      f64x2.extract_lane 1
      f64.add
      local.set $acc
      block $tail_done
      loop $tail
        local.get $c
        local.get $row_bytes
        i32.ge_u
        br_if $tail_done
        local.get $acc
        local.get $a
        local.get $off
        i32.add
        local.get $c
        i32.add
        f32.load
        f64.promote_f32
        local.get $b
        local.get $off
        i32.add
        local.get $c
        i32.add
        f32.load
        f64.promote_f32
        f64.mul
        f64.add
        local.set $acc
        local.get $c
        i32.const 4
        i32.add
        local.set $c
        br $tail
      end
      end
      local.get $out
      local.get $p
      i32.const 2
      i32.shl
      i32.add
      local.get $acc
      f32.demote_f64
      f32.store
      local.get $p
      i32.const 1
      i32.add
      local.set $p
      br $pairs_loop
    end
    end)

  ;; dst[n, cols] = rows row_of(0) … row_of(n − 1) of src [·, cols] (memmove per row).
  (func $gather_rows (export "gather_rows")
    (param $n i32) (param $cols i32) (param $src i32) (param $indexed i32) (param $idx i32) (param $start i32) (param $dst i32)
    (local $row_bytes i32) (local $r i32)
    local.get $cols
    i32.const 2
    i32.shl
    local.set $row_bytes
    block $done
    loop $rows
      local.get $r
      local.get $n
      i32.ge_u
      br_if $done
      local.get $dst
      local.get $r
      local.get $row_bytes
      i32.mul
      i32.add
      local.get $src
      local.get $indexed
      local.get $idx
      local.get $start
      local.get $r
      call $row_of
      local.get $row_bytes
      i32.mul
      i32.add
      local.get $row_bytes
      memory.copy
      local.get $r
      i32.const 1
      i32.add
      local.set $r
      br $rows
    end
    end)

  ;; dst[cols, n] = (rows row_of(0) … row_of(n − 1) of src [·, cols])ᵀ, a destination row dst_n floats
  ;; long (n, or more where a thread writes columns n of a wider one). Eight rows a block: per
  ;; four columns, two 4×4 transposes in registers (eight loads, sixteen shuffles) and 32 contiguous
  ;; bytes stored to each of the four destination rows (blocks of four rows stored 16 bytes a row,
  ;; each destination cache line written in more passes); then blocks of four rows, then single rows; the last
  ;; cols mod 4 columns one float at a time.
  (func $gather_transpose (export "gather_transpose")
    (param $n i32) (param $cols i32) (param $src i32) (param $indexed i32) (param $idx i32) (param $start i32) (param $dst i32)
    (param $dst_n i32)
    (local $row_bytes i32) (local $stride i32) (local $r i32) (local $c i32) (local $d i32)
    (local $s0 i32) (local $s1 i32) (local $s2 i32) (local $s3 i32) (local $s4 i32) (local $s5 i32) (local $s6 i32) (local $s7 i32)
    (local $v0 v128) (local $v1 v128) (local $v2 v128) (local $v3 v128) (local $t0 v128) (local $t1 v128) (local $t2 v128) (local $t3 v128)
    (local $w0 v128) (local $w1 v128) (local $w2 v128) (local $w3 v128) (local $q0 v128) (local $q1 v128) (local $q2 v128) (local $q3 v128)
    local.get $cols i32.const 2 i32.shl local.set $row_bytes
    local.get $dst_n i32.const 2 i32.shl local.set $stride
    block $blocks_done
    loop $blocks
      local.get $r i32.const 8 i32.add local.get $n i32.gt_u br_if $blocks_done
      local.get $src local.get $indexed local.get $idx local.get $start local.get $r i32.const 0 i32.add call $row_of local.get $row_bytes i32.mul i32.add local.set $s0
      local.get $src local.get $indexed local.get $idx local.get $start local.get $r i32.const 1 i32.add call $row_of local.get $row_bytes i32.mul i32.add local.set $s1
      local.get $src local.get $indexed local.get $idx local.get $start local.get $r i32.const 2 i32.add call $row_of local.get $row_bytes i32.mul i32.add local.set $s2
      local.get $src local.get $indexed local.get $idx local.get $start local.get $r i32.const 3 i32.add call $row_of local.get $row_bytes i32.mul i32.add local.set $s3
      local.get $src local.get $indexed local.get $idx local.get $start local.get $r i32.const 4 i32.add call $row_of local.get $row_bytes i32.mul i32.add local.set $s4
      local.get $src local.get $indexed local.get $idx local.get $start local.get $r i32.const 5 i32.add call $row_of local.get $row_bytes i32.mul i32.add local.set $s5
      local.get $src local.get $indexed local.get $idx local.get $start local.get $r i32.const 6 i32.add call $row_of local.get $row_bytes i32.mul i32.add local.set $s6
      local.get $src local.get $indexed local.get $idx local.get $start local.get $r i32.const 7 i32.add call $row_of local.get $row_bytes i32.mul i32.add local.set $s7
      local.get $dst local.get $r i32.const 2 i32.shl i32.add local.set $d
      i32.const 0 local.set $c
      block $wide_done
      loop $wide
        local.get $c i32.const 16 i32.add local.get $row_bytes i32.gt_u br_if $wide_done
        local.get $s0 local.get $c i32.add v128.load align=4 local.set $v0
        local.get $s1 local.get $c i32.add v128.load align=4 local.set $v1
        local.get $s2 local.get $c i32.add v128.load align=4 local.set $v2
        local.get $s3 local.get $c i32.add v128.load align=4 local.set $v3
        local.get $s4 local.get $c i32.add v128.load align=4 local.set $w0
        local.get $s5 local.get $c i32.add v128.load align=4 local.set $w1
        local.get $s6 local.get $c i32.add v128.load align=4 local.set $w2
        local.get $s7 local.get $c i32.add v128.load align=4 local.set $w3
        ;; t0 = [v0₀ v1₀ v0₁ v1₁], t1 = [v0₂ v1₂ v0₃ v1₃], t2, t3 the same of v2, v3; q0 … q3 of w0 … w3
        local.get $v0 local.get $v1 i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 local.set $t0
        local.get $v0 local.get $v1 i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 local.set $t1
        local.get $v2 local.get $v3 i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 local.set $t2
        local.get $v2 local.get $v3 i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 local.set $t3
        local.get $w0 local.get $w1 i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 local.set $q0
        local.get $w0 local.get $w1 i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 local.set $q1
        local.get $w2 local.get $w3 i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 local.set $q2
        local.get $w2 local.get $w3 i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 local.set $q3
        ;; column c + i of the eight rows: low or high halves of t0/t2 and q0/q2 (i = 0, 1), t1/t3 and q1/q3 (i = 2, 3)
        local.get $d local.get $t0 local.get $t2 i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 v128.store align=4
        local.get $d local.get $q0 local.get $q2 i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 v128.store offset=16 align=4
        local.get $d local.get $stride i32.add local.tee $d local.get $t0 local.get $t2 i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31 v128.store align=4
        local.get $d local.get $q0 local.get $q2 i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31 v128.store offset=16 align=4
        local.get $d local.get $stride i32.add local.tee $d local.get $t1 local.get $t3 i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 v128.store align=4
        local.get $d local.get $q1 local.get $q3 i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23 v128.store offset=16 align=4
        local.get $d local.get $stride i32.add local.tee $d local.get $t1 local.get $t3 i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31 v128.store align=4
        local.get $d local.get $q1 local.get $q3 i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31 v128.store offset=16 align=4
        local.get $d local.get $stride i32.add local.set $d
        local.get $c i32.const 16 i32.add local.set $c
        br $wide
      end
      end
      block $tail_done
      loop $tail
        local.get $c local.get $row_bytes i32.ge_u br_if $tail_done
        local.get $d local.get $s0 local.get $c i32.add f32.load f32.store offset=0
        local.get $d local.get $s1 local.get $c i32.add f32.load f32.store offset=4
        local.get $d local.get $s2 local.get $c i32.add f32.load f32.store offset=8
        local.get $d local.get $s3 local.get $c i32.add f32.load f32.store offset=12
        local.get $d local.get $s4 local.get $c i32.add f32.load f32.store offset=16
        local.get $d local.get $s5 local.get $c i32.add f32.load f32.store offset=20
        local.get $d local.get $s6 local.get $c i32.add f32.load f32.store offset=24
        local.get $d local.get $s7 local.get $c i32.add f32.load f32.store offset=28
        local.get $d local.get $stride i32.add local.set $d
        local.get $c i32.const 4 i32.add local.set $c
        br $tail
      end
      end
      local.get $r i32.const 8 i32.add local.set $r
      br $blocks
    end
    end
    ;; the rows left, four at a time
    block $blocks4_done
    loop $blocks4
      local.get $r
      i32.const 4
      i32.add
      local.get $n
      i32.gt_u
      br_if $blocks4_done
      local.get $src
      local.get $indexed
      local.get $idx
      local.get $start
      local.get $r
      call $row_of
      local.get $row_bytes
      i32.mul
      i32.add
      local.set $s0
      local.get $src
      local.get $indexed
      local.get $idx
      local.get $start
      local.get $r
      i32.const 1
      i32.add
      call $row_of
      local.get $row_bytes
      i32.mul
      i32.add
      local.set $s1
      local.get $src
      local.get $indexed
      local.get $idx
      local.get $start
      local.get $r
      i32.const 2
      i32.add
      call $row_of
      local.get $row_bytes
      i32.mul
      i32.add
      local.set $s2
      local.get $src
      local.get $indexed
      local.get $idx
      local.get $start
      local.get $r
      i32.const 3
      i32.add
      call $row_of
      local.get $row_bytes
      i32.mul
      i32.add
      local.set $s3
      local.get $dst
      local.get $r
      i32.const 2
      i32.shl
      i32.add
      local.set $d
      i32.const 0
      local.set $c
      block $wide_done
      loop $wide
        local.get $c
        i32.const 16
        i32.add
        local.get $row_bytes
        i32.gt_u
        br_if $wide_done
        local.get $s0
        local.get $c
        i32.add
        v128.load align=4
        local.set $v0
        local.get $s1
        local.get $c
        i32.add
        v128.load align=4
        local.set $v1
        local.get $s2
        local.get $c
        i32.add
        v128.load align=4
        local.set $v2
        local.get $s3
        local.get $c
        i32.add
        v128.load align=4
        local.set $v3
        ;; t0 = [v0₀ v1₀ v0₁ v1₁], t1 = [v0₂ v1₂ v0₃ v1₃], t2, t3 the same of v2, v3
        local.get $v0
        local.get $v1
        i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23
        local.set $t0
        local.get $v0
        local.get $v1
        i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31
        local.set $t1
        local.get $v2
        local.get $v3
        i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23
        local.set $t2
        local.get $v2
        local.get $v3
        i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31
        local.set $t3
        ;; column c + i of the four rows = low or high halves of t0/t2 (i = 0, 1), t1/t3 (i = 2, 3)
        local.get $d
        local.get $t0
        local.get $t2
        i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        v128.store align=4
        local.get $d
        local.get $stride
        i32.add
        local.tee $d
        local.get $t0
        local.get $t2
        i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31
        v128.store align=4
        local.get $d
        local.get $stride
        i32.add
        local.tee $d
        local.get $t1
        local.get $t3
        i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        v128.store align=4
        local.get $d
        local.get $stride
        i32.add
        local.tee $d
        local.get $t1
        local.get $t3
        i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31
        v128.store align=4
        local.get $d
        local.get $stride
        i32.add
        local.set $d
        local.get $c
        i32.const 16
        i32.add
        local.set $c
        br $wide
      end
      end
      block $tail_done
      loop $tail
        local.get $c
        local.get $row_bytes
        i32.ge_u
        br_if $tail_done
        local.get $d
        local.get $s0
        local.get $c
        i32.add
        f32.load
        f32.store
        local.get $d
        local.get $s1
        local.get $c
        i32.add
        f32.load
        f32.store offset=4
        local.get $d
        local.get $s2
        local.get $c
        i32.add
        f32.load
        f32.store offset=8
        local.get $d
        local.get $s3
        local.get $c
        i32.add
        f32.load
        f32.store offset=12
        local.get $d
        local.get $stride
        i32.add
        local.set $d
        local.get $c
        i32.const 4
        i32.add
        local.set $c
        br $tail
      end
      end
      local.get $r
      i32.const 4
      i32.add
      local.set $r
      br $blocks4
    end
    end
    ;; the last rows, one at a time
    block $rows_done
    loop $rows
      local.get $r
      local.get $n
      i32.ge_u
      br_if $rows_done
      local.get $src
      local.get $indexed
      local.get $idx
      local.get $start
      local.get $r
      call $row_of
      local.get $row_bytes
      i32.mul
      i32.add
      local.set $s0
      local.get $dst
      local.get $r
      i32.const 2
      i32.shl
      i32.add
      local.set $d
      i32.const 0
      local.set $c
      block $cols_done
      loop $cols
        local.get $c
        local.get $row_bytes
        i32.ge_u
        br_if $cols_done
        local.get $d
        local.get $s0
        local.get $c
        i32.add
        f32.load
        f32.store
        local.get $d
        local.get $stride
        i32.add
        local.set $d
        local.get $c
        i32.const 4
        i32.add
        local.set $c
        br $cols
      end
      end
      local.get $r
      i32.const 1
      i32.add
      local.set $r
      br $rows
    end
    end)

  ;; out[p, q] = Σ_r a[row_a(r), :p]ᵀ·b[row_b(r), :q] over the n rows start … start + n − 1 (each
  ;; side through its index when indexed), a's rows a_p floats long (p, or more where a thread takes
  ;; out rows p of a wider product): one expert's weight gradient as rank-1 updates, for
  ;; products with a narrow side (LoRA's dA = grᵀ·x, r × in, and dB = dyᵀ·u, out × r), where a
  ;; product on XNNPACK needs the wide operand transposed first and packs an operand per call.
  ;; Four rows a pass, out[i, c…c+3] = (((out + a0ᵢ·b0[c…]) + a1ᵢ·b1[c…]) + a2ᵢ·b2[c…]) + a3ᵢ·b3[c…]
  ;; (one load and store of out per 16 products, where two rows a pass had one per 8); the rows left
  ;; one at a time; the last q mod 4 columns one at a time. float32 sums in row order.
  (func $weight_grad (export "weight_grad")
    (param $n i32) (param $p i32) (param $q i32) (param $a i32) (param $a_indexed i32) (param $a_idx i32)
    (param $b i32) (param $b_indexed i32) (param $b_idx i32) (param $start i32) (param $out i32) (param $a_p i32)
    (local $a_bytes i32) (local $q_bytes i32) (local $wide_end i32) (local $r i32) (local $i i32) (local $c i32) (local $o i32)
    (local $a0 i32) (local $a1 i32) (local $a2 i32) (local $a3 i32) (local $b0 i32) (local $b1 i32) (local $b2 i32) (local $b3 i32)
    (local $s0 v128) (local $s1 v128) (local $s2 v128) (local $s3 v128)
    local.get $a_p i32.const 2 i32.shl local.set $a_bytes
    local.get $q i32.const 2 i32.shl local.set $q_bytes
    local.get $q_bytes i32.const -16 i32.and local.set $wide_end
    local.get $out i32.const 0 local.get $p local.get $q_bytes i32.mul memory.fill
    ;; four rows a pass
    block $quads_done
    loop $quads
      local.get $r i32.const 4 i32.add local.get $n i32.gt_u br_if $quads_done
      local.get $a local.get $a_indexed local.get $a_idx local.get $start local.get $r i32.const 0 i32.add call $row_of local.get $a_bytes i32.mul i32.add local.set $a0
      local.get $b local.get $b_indexed local.get $b_idx local.get $start local.get $r i32.const 0 i32.add call $row_of local.get $q_bytes i32.mul i32.add local.set $b0
      local.get $a local.get $a_indexed local.get $a_idx local.get $start local.get $r i32.const 1 i32.add call $row_of local.get $a_bytes i32.mul i32.add local.set $a1
      local.get $b local.get $b_indexed local.get $b_idx local.get $start local.get $r i32.const 1 i32.add call $row_of local.get $q_bytes i32.mul i32.add local.set $b1
      local.get $a local.get $a_indexed local.get $a_idx local.get $start local.get $r i32.const 2 i32.add call $row_of local.get $a_bytes i32.mul i32.add local.set $a2
      local.get $b local.get $b_indexed local.get $b_idx local.get $start local.get $r i32.const 2 i32.add call $row_of local.get $q_bytes i32.mul i32.add local.set $b2
      local.get $a local.get $a_indexed local.get $a_idx local.get $start local.get $r i32.const 3 i32.add call $row_of local.get $a_bytes i32.mul i32.add local.set $a3
      local.get $b local.get $b_indexed local.get $b_idx local.get $start local.get $r i32.const 3 i32.add call $row_of local.get $q_bytes i32.mul i32.add local.set $b3
      local.get $out local.set $o
      i32.const 0 local.set $i
      block $out_rows_done
      loop $out_rows
        local.get $i local.get $p i32.ge_u br_if $out_rows_done
        local.get $a0 local.get $i i32.const 2 i32.shl i32.add v128.load32_splat local.set $s0
        local.get $a1 local.get $i i32.const 2 i32.shl i32.add v128.load32_splat local.set $s1
        local.get $a2 local.get $i i32.const 2 i32.shl i32.add v128.load32_splat local.set $s2
        local.get $a3 local.get $i i32.const 2 i32.shl i32.add v128.load32_splat local.set $s3
        i32.const 0 local.set $c
        block $wide_done
        loop $wide
          local.get $c local.get $wide_end i32.ge_u br_if $wide_done
          local.get $o local.get $c i32.add
          local.get $o local.get $c i32.add v128.load align=4
          local.get $s0 local.get $b0 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add
          local.get $s1 local.get $b1 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add
          local.get $s2 local.get $b2 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add
          local.get $s3 local.get $b3 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add
          v128.store align=4
          local.get $c i32.const 16 i32.add local.set $c
          br $wide
        end
        end
        block $tail_done
        loop $tail
          local.get $c local.get $q_bytes i32.ge_u br_if $tail_done
          local.get $o local.get $c i32.add
          local.get $o local.get $c i32.add f32.load
          local.get $s0 f32x4.extract_lane 0 local.get $b0 local.get $c i32.add f32.load f32.mul f32.add
          local.get $s1 f32x4.extract_lane 0 local.get $b1 local.get $c i32.add f32.load f32.mul f32.add
          local.get $s2 f32x4.extract_lane 0 local.get $b2 local.get $c i32.add f32.load f32.mul f32.add
          local.get $s3 f32x4.extract_lane 0 local.get $b3 local.get $c i32.add f32.load f32.mul f32.add
          f32.store
          local.get $c i32.const 4 i32.add local.set $c
          br $tail
        end
        end
        local.get $o local.get $q_bytes i32.add local.set $o
        local.get $i i32.const 1 i32.add local.set $i
        br $out_rows
      end
      end
      local.get $r i32.const 4 i32.add local.set $r
      br $quads
    end
    end
    ;; the rows left, one at a time
    block $rows_done
    loop $rows
      local.get $r local.get $n i32.ge_u br_if $rows_done
      local.get $a local.get $a_indexed local.get $a_idx local.get $start local.get $r call $row_of local.get $a_bytes i32.mul i32.add local.set $a0
      local.get $b local.get $b_indexed local.get $b_idx local.get $start local.get $r call $row_of local.get $q_bytes i32.mul i32.add local.set $b0
      local.get $out local.set $o
      i32.const 0 local.set $i
      block $one_done
      loop $one
        local.get $i local.get $p i32.ge_u br_if $one_done
        local.get $a0 local.get $i i32.const 2 i32.shl i32.add v128.load32_splat local.set $s0
        i32.const 0 local.set $c
        block $wide1_done
        loop $wide1
          local.get $c local.get $wide_end i32.ge_u br_if $wide1_done
          local.get $o local.get $c i32.add
          local.get $o local.get $c i32.add v128.load align=4
          local.get $s0 local.get $b0 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add
          v128.store align=4
          local.get $c i32.const 16 i32.add local.set $c
          br $wide1
        end
        end
        block $tail1_done
        loop $tail1
          local.get $c local.get $q_bytes i32.ge_u br_if $tail1_done
          local.get $o local.get $c i32.add
          local.get $o local.get $c i32.add f32.load
          local.get $s0 f32x4.extract_lane 0 local.get $b0 local.get $c i32.add f32.load f32.mul f32.add
          f32.store
          local.get $c i32.const 4 i32.add local.set $c
          br $tail1
        end
        end
        local.get $o local.get $q_bytes i32.add local.set $o
        local.get $i i32.const 1 i32.add local.set $i
        br $one
      end
      end
      local.get $r i32.const 1 i32.add local.set $r
      br $rows
    end
    end)

  ;; out[r, :m] = add[r, :m] + Σ_j (alpha·x[row_x(r), j])·w[j, :m] for r < n (add = 0 unless `added`),
  ;; w [k, m] contiguous: a product with a narrow inner dimension (LoRA's expansions u·B_eᵀ and
  ;; gr·A_e, k = r), which XNNPACK runs at 10–12 GFLOP/s at S with an operator built per call. Four
  ;; terms j a pass over the output row (four splats of x, one load and store of out per 16
  ;; products), the first pass reading the addend (or a zeroed row); then single terms; the last
  ;; m mod 4 columns one at a time. float32 sums in j order after the addend.
  (func $product_narrow_k (export "product_narrow_k")
    (param $n i32) (param $k i32) (param $m i32) (param $x i32) (param $x_indexed i32) (param $x_idx i32) (param $start i32)
    (param $w i32) (param $alpha f32) (param $added i32) (param $add i32) (param $out i32)
    (local $k_bytes i32) (local $m_bytes i32) (local $wide_end i32) (local $r i32) (local $j i32) (local $c i32)
    (local $xr i32) (local $o i32) (local $src i32) (local $w0 i32) (local $w1 i32) (local $w2 i32) (local $w3 i32)
    (local $al v128) (local $s0 v128) (local $s1 v128) (local $s2 v128) (local $s3 v128)
    local.get $k i32.const 2 i32.shl local.set $k_bytes
    local.get $m i32.const 2 i32.shl local.set $m_bytes
    local.get $m_bytes i32.const -16 i32.and local.set $wide_end
    local.get $alpha f32x4.splat local.set $al
    local.get $out local.set $o
    block $rows_done
    loop $rows
      local.get $r local.get $n i32.ge_u br_if $rows_done
      local.get $x local.get $x_indexed local.get $x_idx local.get $start local.get $r call $row_of local.get $k_bytes i32.mul i32.add local.set $xr
      ;; the first pass reads the addend's row, or this row zeroed
      local.get $added
      if
        local.get $add local.get $r local.get $m_bytes i32.mul i32.add local.set $src
      else
        local.get $o i32.const 0 local.get $m_bytes memory.fill
        local.get $o local.set $src
      end
      i32.const 0 local.set $j
      ;; four terms a pass
      block $quads_done
      loop $quads
        local.get $j i32.const 4 i32.add local.get $k i32.gt_u br_if $quads_done
        local.get $xr local.get $j i32.const 2 i32.shl i32.add v128.load32_splat local.get $al f32x4.mul local.set $s0
        local.get $xr local.get $j i32.const 2 i32.shl i32.add v128.load32_splat offset=4 local.get $al f32x4.mul local.set $s1
        local.get $xr local.get $j i32.const 2 i32.shl i32.add v128.load32_splat offset=8 local.get $al f32x4.mul local.set $s2
        local.get $xr local.get $j i32.const 2 i32.shl i32.add v128.load32_splat offset=12 local.get $al f32x4.mul local.set $s3
        local.get $w local.get $j local.get $m_bytes i32.mul i32.add local.tee $w0 local.get $m_bytes i32.add local.tee $w1
        local.get $m_bytes i32.add local.tee $w2 local.get $m_bytes i32.add local.set $w3
        i32.const 0 local.set $c
        block $wide_done
        loop $wide
          local.get $c local.get $wide_end i32.ge_u br_if $wide_done
          local.get $o local.get $c i32.add
          local.get $src local.get $c i32.add v128.load align=4
          local.get $s0 local.get $w0 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add
          local.get $s1 local.get $w1 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add
          local.get $s2 local.get $w2 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add
          local.get $s3 local.get $w3 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add
          v128.store align=4
          local.get $c i32.const 16 i32.add local.set $c
          br $wide
        end
        end
        block $tail_done
        loop $tail
          local.get $c local.get $m_bytes i32.ge_u br_if $tail_done
          local.get $o local.get $c i32.add
          local.get $src local.get $c i32.add f32.load
          local.get $s0 f32x4.extract_lane 0 local.get $w0 local.get $c i32.add f32.load f32.mul f32.add
          local.get $s1 f32x4.extract_lane 0 local.get $w1 local.get $c i32.add f32.load f32.mul f32.add
          local.get $s2 f32x4.extract_lane 0 local.get $w2 local.get $c i32.add f32.load f32.mul f32.add
          local.get $s3 f32x4.extract_lane 0 local.get $w3 local.get $c i32.add f32.load f32.mul f32.add
          f32.store
          local.get $c i32.const 4 i32.add local.set $c
          br $tail
        end
        end
        local.get $o local.set $src
        local.get $j i32.const 4 i32.add local.set $j
        br $quads
      end
      end
      ;; the terms left, one a pass
      block $ones_done
      loop $ones
        local.get $j local.get $k i32.ge_u br_if $ones_done
        local.get $xr local.get $j i32.const 2 i32.shl i32.add v128.load32_splat local.get $al f32x4.mul local.set $s0
        local.get $w local.get $j local.get $m_bytes i32.mul i32.add local.set $w0
        i32.const 0 local.set $c
        block $wide1_done
        loop $wide1
          local.get $c local.get $wide_end i32.ge_u br_if $wide1_done
          local.get $o local.get $c i32.add
          local.get $src local.get $c i32.add v128.load align=4
          local.get $s0 local.get $w0 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add
          v128.store align=4
          local.get $c i32.const 16 i32.add local.set $c
          br $wide1
        end
        end
        block $tail1_done
        loop $tail1
          local.get $c local.get $m_bytes i32.ge_u br_if $tail1_done
          local.get $o local.get $c i32.add
          local.get $src local.get $c i32.add f32.load
          local.get $s0 f32x4.extract_lane 0 local.get $w0 local.get $c i32.add f32.load f32.mul f32.add
          f32.store
          local.get $c i32.const 4 i32.add local.set $c
          br $tail1
        end
        end
        local.get $o local.set $src
        local.get $j i32.const 1 i32.add local.set $j
        br $ones
      end
      end
      local.get $o local.get $m_bytes i32.add local.set $o
      local.get $r i32.const 1 i32.add local.set $r
      br $rows
    end
    end)

  ;; out[r, j] = alpha·⟨x[row_x(r), :k], wt[j, :k]⟩ for r < n, j < m, wt [m, k] contiguous: a
  ;; product with a narrow output (LoRA's u = s·x·A_eᵀ and gr = s·dy·B_e, m = r), which XNNPACK
  ;; runs at 10–13 GFLOP/s at S with an operator built per call. Four outputs a pass, each a chain of
  ;; float32x4 partial sums over four columns a step (four independent chains); their lanes summed
  ;; by a 4×4 transpose and three adds; the last k mod 4 columns in scalars added to those lanes;
  ;; the last m mod 4 outputs alone.
  (func $product_narrow_m (export "product_narrow_m")
    (param $n i32) (param $k i32) (param $m i32) (param $x i32) (param $x_indexed i32) (param $x_idx i32) (param $start i32)
    (param $wt i32) (param $alpha f32) (param $out i32)
    (local $k_bytes i32) (local $wide_end i32) (local $r i32) (local $j i32) (local $c i32) (local $xr i32) (local $o i32)
    (local $w0 i32) (local $w1 i32) (local $w2 i32) (local $w3 i32)
    (local $e0 f32) (local $e1 f32) (local $e2 f32) (local $e3 f32) (local $xv f32)
    (local $v v128) (local $acc0 v128) (local $acc1 v128) (local $acc2 v128) (local $acc3 v128) (local $t0 v128) (local $t1 v128)
    local.get $k i32.const 2 i32.shl local.set $k_bytes
    local.get $k_bytes i32.const -16 i32.and local.set $wide_end
    local.get $out local.set $o
    block $rows_done
    loop $rows
      local.get $r local.get $n i32.ge_u br_if $rows_done
      local.get $x local.get $x_indexed local.get $x_idx local.get $start local.get $r call $row_of local.get $k_bytes i32.mul i32.add local.set $xr
      i32.const 0 local.set $j
      ;; four outputs a pass
      block $quads_done
      loop $quads
        local.get $j i32.const 4 i32.add local.get $m i32.gt_u br_if $quads_done
        local.get $wt local.get $j local.get $k_bytes i32.mul i32.add local.tee $w0 local.get $k_bytes i32.add local.tee $w1
        local.get $k_bytes i32.add local.tee $w2 local.get $k_bytes i32.add local.set $w3
        v128.const f32x4 0 0 0 0 local.tee $acc0 local.tee $acc1 local.tee $acc2 local.set $acc3
        i32.const 0 local.set $c
        block $wide_done
        loop $wide
          local.get $c local.get $wide_end i32.ge_u br_if $wide_done
          local.get $xr local.get $c i32.add v128.load align=4 local.set $v
          local.get $acc0 local.get $v local.get $w0 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add local.set $acc0
          local.get $acc1 local.get $v local.get $w1 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add local.set $acc1
          local.get $acc2 local.get $v local.get $w2 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add local.set $acc2
          local.get $acc3 local.get $v local.get $w3 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add local.set $acc3
          local.get $c i32.const 16 i32.add local.set $c
          br $wide
        end
        end
        ;; the last k mod 4 columns: e_i = Σ x[c]·w_i[c] in scalars
        f32.const 0 local.tee $e0 local.tee $e1 local.tee $e2 local.set $e3
        block $tail_done
        loop $tail
          local.get $c local.get $k_bytes i32.ge_u br_if $tail_done
          local.get $xr local.get $c i32.add f32.load local.set $xv
          local.get $e0 local.get $xv local.get $w0 local.get $c i32.add f32.load f32.mul f32.add local.set $e0
          local.get $e1 local.get $xv local.get $w1 local.get $c i32.add f32.load f32.mul f32.add local.set $e1
          local.get $e2 local.get $xv local.get $w2 local.get $c i32.add f32.load f32.mul f32.add local.set $e2
          local.get $e3 local.get $xv local.get $w3 local.get $c i32.add f32.load f32.mul f32.add local.set $e3
          local.get $c i32.const 4 i32.add local.set $c
          br $tail
        end
        end
        ;; lane sums: transpose [acc0 … acc3] (rows) and add the four rows: [Σacc0, Σacc1, Σacc2, Σacc3]
        local.get $acc0 local.get $acc1 i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 local.set $t0
        local.get $acc2 local.get $acc3 i8x16.shuffle 0 1 2 3 16 17 18 19 4 5 6 7 20 21 22 23 local.set $t1
        local.get $acc0 local.get $acc1 i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 local.set $acc0
        local.get $acc2 local.get $acc3 i8x16.shuffle 8 9 10 11 24 25 26 27 12 13 14 15 28 29 30 31 local.set $acc2
        local.get $t0 local.get $t1 i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        local.get $t0 local.get $t1 i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31
        f32x4.add
        local.get $acc0 local.get $acc2 i8x16.shuffle 0 1 2 3 4 5 6 7 16 17 18 19 20 21 22 23
        f32x4.add
        local.get $acc0 local.get $acc2 i8x16.shuffle 8 9 10 11 12 13 14 15 24 25 26 27 28 29 30 31
        f32x4.add
        local.get $e0 f32x4.splat local.get $e1 f32x4.replace_lane 1 local.get $e2 f32x4.replace_lane 2 local.get $e3 f32x4.replace_lane 3
        f32x4.add
        local.get $alpha f32x4.splat
        f32x4.mul
        local.set $v
        local.get $o local.get $j i32.const 2 i32.shl i32.add local.get $v v128.store align=4
        local.get $j i32.const 4 i32.add local.set $j
        br $quads
      end
      end
      ;; the outputs left, one a pass
      block $ones_done
      loop $ones
        local.get $j local.get $m i32.ge_u br_if $ones_done
        local.get $wt local.get $j local.get $k_bytes i32.mul i32.add local.set $w0
        v128.const f32x4 0 0 0 0 local.set $acc0
        i32.const 0 local.set $c
        block $wide1_done
        loop $wide1
          local.get $c local.get $wide_end i32.ge_u br_if $wide1_done
          local.get $acc0 local.get $xr local.get $c i32.add v128.load align=4 local.get $w0 local.get $c i32.add v128.load align=4 f32x4.mul f32x4.add local.set $acc0
          local.get $c i32.const 16 i32.add local.set $c
          br $wide1
        end
        end
        f32.const 0 local.set $e0
        block $tail1_done
        loop $tail1
          local.get $c local.get $k_bytes i32.ge_u br_if $tail1_done
          local.get $e0 local.get $xr local.get $c i32.add f32.load local.get $w0 local.get $c i32.add f32.load f32.mul f32.add local.set $e0
          local.get $c i32.const 4 i32.add local.set $c
          br $tail1
        end
        end
        local.get $o local.get $j i32.const 2 i32.shl i32.add
        local.get $acc0 f32x4.extract_lane 0 local.get $acc0 f32x4.extract_lane 1 f32.add
        local.get $acc0 f32x4.extract_lane 2 f32.add local.get $acc0 f32x4.extract_lane 3 f32.add
        local.get $e0 f32.add
        local.get $alpha f32.mul
        f32.store
        local.get $j i32.const 1 i32.add local.set $j
        br $ones
      end
      end
      local.get $o local.get $m i32.const 2 i32.shl i32.add local.set $o
      local.get $r i32.const 1 i32.add local.set $r
      br $rows
    end
    end)
)
