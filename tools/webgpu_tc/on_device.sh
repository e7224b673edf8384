#!/usr/bin/env bash
# The tensor-core batch for the GPU machine (issue 13), about 3 minutes on an H200:
#   here:  ../shared/gpu/prepare.sh tools/webgpu_tc/variants.ts && ../shared/gpu/prepare.sh tools/webgpu_tc/check.ts
#   there: bash tools/webgpu_tc/on_device.sh       (run with carry [".gpu"])
# 1. variants.js (v2, <= ~70 s): the package's SubgroupMatrixMatMulProgram outside tfjs (as now, and with its
#    K loop inside if (e >= 0) as on the wrong run of 2026-12-05), then GEMM variants built from the package's
#    index math (src/backends/webgpu/programs/subgroup_matrix_core.ts) at 2048^3 and Q's up shape
#    (16 x 1024x1536x2048), each checked against float64, timed with timestamp queries;
# 2. check.js: the package's subgroup-matrix programs against the f32 kernels (kernels, fixture block, M1/Q steps).
# Leaves variants.json and tc.tgz (check's tc.json and logs) in $OUT.
set -u
source .gpu/on-device.sh
OUT=$OUT timeout 120 node .gpu/bundle/variants.js > "$OUT/variants.stdout.json" 2> "$OUT/variants.stderr.txt"; echo "variants rc $?"
grep -E "^\[variants" "$OUT/variants.stderr.txt" | tail -12
mkdir -p /tmp/tc; OUT=/tmp/tc timeout 160 node .gpu/bundle/check.js > /tmp/tc/stdout.json 2> /tmp/tc/stderr.txt; echo "check rc $?"
tail -5 /tmp/tc/stderr.txt
tar czf "$OUT/tc.tgz" -C /tmp tc
