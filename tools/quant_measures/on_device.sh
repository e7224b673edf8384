#!/usr/bin/env bash
# Issue 14's per-format block timings on a real GPU (webgpu through Dawn on NVIDIA's Vulkan
# driver): the fused block fwd+bwd with the experts held as each format vs float32, interleaved
# rounds, medians and paired ratios (tools/quant_measures/block_timings.ts). Mesa's numbers are in
# docs/benchmarks.md ("Quantized experts: block time per format").
#
# Here, from the project root: ../shared/gpu/prepare.sh tools/quant_measures/block_timings.ts
# There, from the project root:  source .gpu/on-device.sh && OUT=$OUT bash tools/quant_measures/on_device.sh
# Writes one JSON per config into $OUT (default: the current folder); progress on stderr.
set -euo pipefail
out=${OUT:-.}
for config in M1 Q; do
  echo "== $config" >&2
  node .gpu/bundle/block_timings.js --backend webgpu --config "$config" --rounds 5 --iters 5 --json \
    > "$out/quant_block_$config.json" 2> "$out/quant_block_$config.stderr" || {
      echo "$config failed (see $out/quant_block_$config.stderr)" >&2; continue; }
  cat "$out/quant_block_$config.json" >&2
done
