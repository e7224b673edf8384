#!/usr/bin/env bash
# The tensor-core batch for the GPU machine (issue 13), within 300 s:
#   here:  ../shared/gpu/prepare.sh tools/webgpu_tc/variants.ts tools/webgpu_tc/check.ts
#   there: bash tools/webgpu_tc/on_device.sh       (run with carry [".gpu"])
# 1. variants.js (v5, <= 155 s): every case in its own process (a crash is recorded with its signal and
#    phase, the next case runs), every element against float64 with where the wrong ones fall. First the
#    programs outside tfjs on the small grouped problem with every edge, each staging path (vec4 quads of
#    f32 / bf16 weights along k and n, a K tail per element, the per-element path): rel 0 expected; then
#    Q's up shape, timed (pkg-matmul-q, pkg-weightgrad-q, pkg-matmul-q-bf16: goal >= 40 TFLOP/s), the
#    exact GEMM and the per-element MatMul as controls; then the bisection's two ends.
# 2. check.js (<= 135 s, stops itself at 115): the package's programs inside tfjs against the f32 kernels, per product
#    (tcVsF32 in tc.json, one line each below), the fixture block, M1/Q block timings as time allows.
# Leaves variants.json and tc.tgz (check's tc.json and logs) in $OUT.
set -u
source .gpu/on-device.sh
OUT=$OUT timeout 155 node .gpu/bundle/variants.js > "$OUT/variants.stdout.json" 2> "$OUT/variants.stderr.txt"; echo "variants rc $?"
grep -E "^\[variants.*: \{" "$OUT/variants.stderr.txt" | cut -c1-260
mkdir -p /tmp/tc; OUT=/tmp/tc timeout 135 node .gpu/bundle/check.js > /tmp/tc/stdout.json 2> /tmp/tc/stderr.txt; echo "check rc $?"
grep -E "max rel. error|done|fatal" /tmp/tc/stderr.txt | cut -c1-200 | tail -30
tar czf "$OUT/tc.tgz" -C /tmp tc
