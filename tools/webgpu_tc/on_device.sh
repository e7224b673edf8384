#!/usr/bin/env bash
# The tensor-core batch for the GPU machine (issue 13), about 5 minutes:
#   here:  ../shared/gpu/prepare.sh tools/webgpu_tc/variants.ts tools/webgpu_tc/check.ts
#   there: bash tools/webgpu_tc/on_device.sh       (run with carry [".gpu"])
# 1. variants.js (v3, <= ~150 s): every case in its own process (a crash is recorded with its signal and
#    phase, the next case runs). First the package's programs with uniform control flow outside tfjs: the
#    MatMul and the weight gradient on a small grouped problem with every edge, each element against
#    float64 (a right kernel gives 0), the MatMul at Q's up shape (timed) and with main as the entry point;
#    then db64af4's programs (wrong on the H100), the fixed MatMul at v2's shape, the same with the Dawn
#    instance dropped and collected (v2's crash?), then v1's fastest standalone GEMMs and v2's patterns.
# 2. check.js: the package's programs inside tfjs against the f32 kernels, per product (tcVsF32 in
#    tc.json, one line each below), the fixture block, M1/Q block timings.
# Leaves variants.json and tc.tgz (check's tc.json and logs) in $OUT.
set -u
source .gpu/on-device.sh
OUT=$OUT timeout 170 node .gpu/bundle/variants.js > "$OUT/variants.stdout.json" 2> "$OUT/variants.stderr.txt"; echo "variants rc $?"
grep -E "^\[variants.*: \{" "$OUT/variants.stderr.txt" | cut -c1-220
mkdir -p /tmp/tc; OUT=/tmp/tc timeout 160 node .gpu/bundle/check.js > /tmp/tc/stdout.json 2> /tmp/tc/stderr.txt; echo "check rc $?"
grep -E "max rel. error|done|fatal" /tmp/tc/stderr.txt | cut -c1-200 | tail -30
tar czf "$OUT/tc.tgz" -C /tmp tc
