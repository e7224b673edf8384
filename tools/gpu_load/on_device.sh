#!/usr/bin/env bash
# Issue 15 item 2 on a real GPU: the load bench (src/bench/load_bench.ts) on webgpu through Dawn on
# NVIDIA's Vulkan driver, where the device's memory is not in the process's RSS, so the load's peak
# RSS is the host's own figure. See tools/gpu_load/README.md for the bound and how to read it.
#
# Here, from the project root: ../shared/gpu/prepare.sh bench/run.ts src/bench/load_bench_child.ts
# There, from the project root:  source .gpu/on-device.sh && OUT=$OUT bash tools/gpu_load/on_device.sh
# Writes one JSON array per run into $OUT (default: the current folder); progress on stderr.
set -euo pipefail
out=${OUT:-.}
run() {  # name, then the bench's flags
  local name=$1; shift
  echo "== $name: $*" >&2
  node .gpu/bundle/run.js --config load --json "$@" > "$out/$name.json" 2> "$out/$name.stderr" || {
    echo "$name failed (see $out/$name.stderr)" >&2; return 0; }
  cat "$out/$name.json" >&2
}
# OLMoE-1B-7B, all 16 layers (13.8 GB of bf16 in 3 shards), experts kept packed: the case
run webgpu_stored_16 --backend webgpu --layers 16 --expert-dtype stored
# float32 experts: each fused stack (1 GiB) written expert by expert into its device buffer
run webgpu_float32_4 --backend webgpu --layers 4 --expert-dtype float32
# the same loads on cpu, where the weights are host memory (bound: model + largest + margin)
run cpu_both_4 --backend cpu --layers 4
