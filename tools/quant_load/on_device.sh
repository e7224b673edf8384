#!/usr/bin/env bash
# Issue 14/15's load time on the GPU machine: OLMoE-1B-7B's shapes (16 layers, bf16, 13.9 GB),
# 'stored' vs 'nf4' and 'int4' loads on webgpu, 2 rounds (tools/quant_load/gpu_load.ts). The
# worker threads need their own file beside the bundle, so bundle it as a second entry:
# Here, from the project root: ../shared/gpu/prepare.sh tools/quant_load/gpu_load.ts src/io/quantize_worker.ts
# There, from the project root:  source .gpu/on-device.sh && OUT=$OUT bash tools/quant_load/on_device.sh
# Writes quant_load.jsonl (and .stderr) into $OUT (default: the current folder). About 4 minutes
# (writing the checkpoint, 6 loads); the checkpoint goes to /tmp and is removed.
set -euo pipefail
out=${OUT:-.}
[ -f .gpu/bundle/quantize_worker.js ] || echo "warning: .gpu/bundle/quantize_worker.js missing: quantizing on one thread" >&2
node .gpu/bundle/gpu_load.js --backend webgpu --layers 16 --kinds nf4,int4 --repeat 2 \
  > "$out/quant_load.jsonl" 2> "$out/quant_load.stderr"
cat "$out/quant_load.jsonl" >&2
