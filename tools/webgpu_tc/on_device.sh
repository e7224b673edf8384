#!/usr/bin/env bash
# The tensor-core batch for the GPU machine (issue 13), about 110 s on an H200:
#   here:  ../shared/gpu/prepare.sh tools/webgpu_tc/variants.ts && ../shared/gpu/prepare.sh tools/webgpu_tc/check.ts
#   there: bash tools/webgpu_tc/on_device.sh       (run with carry [".gpu"])
# 1. variants.js: which subgroup-matrix staging pattern computes the right GEMM on raw Dawn, and how fast
#    (storage loads as the probe, workgroup staging from f32/f16 with 1, 4 and 8 subgroups);
# 2. check.js: the package's subgroup-matrix programs against the f32 kernels (kernels, fixture block, M1/Q steps).
# Leaves variants.json and tc.tgz (check's tc.json and logs) in $OUT.
set -u
source .gpu/on-device.sh
OUT=$OUT timeout 120 node .gpu/bundle/variants.js > "$OUT/variants.stdout.json" 2> "$OUT/variants.stderr.txt"; echo "variants rc $?"
grep -E "^\[variants" "$OUT/variants.stderr.txt" | tail -12
mkdir -p /tmp/tc; OUT=/tmp/tc timeout 160 node .gpu/bundle/check.js > /tmp/tc/stdout.json 2> /tmp/tc/stderr.txt; echo "check rc $?"
tail -5 /tmp/tc/stderr.txt
tar czf "$OUT/tc.tgz" -C /tmp tc
