#!/usr/bin/env bash
# The tensor-core batch for the GPU machine (issue 13), within 240 s:
#   here:  ../shared/gpu/prepare.sh tools/webgpu_tc/variants.ts tools/webgpu_tc/check.ts
#   there: bash tools/webgpu_tc/on_device.sh       (run with carry [".gpu"])
# 1. variants.js (v6, <= 150 s): every case in its own process (a crash is recorded with its signal and
#    phase, the next case runs). First the v6 programs (kernels.ts's choice) outside tfjs on the small
#    grouped problems, every element against float64 (rel 0 expected); then Q's up shape timed, v6 against
#    v5 (pkg-matmul-q / -v5, pkg-weightgrad-q / -v5, pkg-matmul-q-bf16), the exact GEMM at 2048^3 as the
#    control; then the speed bisection (v6-*): the exact GEMM on Q's grouped shape, one construct of the
#    package's MatMul per case, then all of them (v6-z-package-like). One JSON line per case below.
# 2. check.js (<= 80 s, stops itself at 70): the package's programs inside tfjs against the f32 kernels
#    on the small products (tcVsF32), the dense projections (q/k/v/o 2048² and the LM head, "dense ..." lines;
#    rc 3 when one fails), then the M1/Q block timings both paths, then the fixture and M1 products.
# Leaves variants.json and tc.tgz (check's tc.json and logs) in $OUT.
#
# `bash tools/webgpu_tc/on_device.sh v7` (only variants.ts needs bundling): the v7 batch alone, <= 150 s:
# the v6 baselines at Q's up shape, then every v7 variant exact on its small problem and timed at Q's
# up shape, then the conversion pass. Leaves variants-v7.json in $OUT.
#
# `bash tools/webgpu_tc/on_device.sh port` (only variants.ts needs bundling): the package's programs with
# v7's staging ported (issue 13), <= 150 s: exact on the small problems (rel 0), then Q's up shape timed
# beside the same operands with v6's staging (-v6) and the raw v7-b / v7-c / v7-k. Leaves variants-port.json.
set -u
source .gpu/on-device.sh
if [ "${1:-}" = port ]; then
  OUT=$OUT timeout 150 node .gpu/bundle/variants.js port > "$OUT/variants-port.stdout.json" 2> "$OUT/variants-port.stderr.txt"; echo "variants port rc $?"
  [ -f "$OUT/variants.json" ] && mv "$OUT/variants.json" "$OUT/variants-port.json"
  grep -E "^\[variants.*(: \{|no subgroup)" "$OUT/variants-port.stderr.txt" | cut -c1-400
  exit 0
fi
if [ "${1:-}" = v7 ]; then
  OUT=$OUT timeout 150 node .gpu/bundle/variants.js v7 > "$OUT/variants-v7.stdout.json" 2> "$OUT/variants-v7.stderr.txt"; echo "variants v7 rc $?"
  [ -f "$OUT/variants.json" ] && mv "$OUT/variants.json" "$OUT/variants-v7.json"
  grep -E "^\[variants.*(: \{|no subgroup)" "$OUT/variants-v7.stderr.txt" | cut -c1-400
  exit 0
fi
OUT=$OUT timeout 150 node .gpu/bundle/variants.js > "$OUT/variants.stdout.json" 2> "$OUT/variants.stderr.txt"; echo "variants rc $?"
grep -E "^\[variants.*: \{" "$OUT/variants.stderr.txt" | cut -c1-260
mkdir -p /tmp/tc; OUT=/tmp/tc timeout 80 node .gpu/bundle/check.js > /tmp/tc/stdout.json 2> /tmp/tc/stderr.txt; echo "check rc $?"
grep -E "max rel. error|block|done|fatal|FAIL" /tmp/tc/stderr.txt | cut -c1-260 | tail -40
tar czf "$OUT/tc.tgz" -C /tmp tc
