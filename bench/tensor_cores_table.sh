#!/usr/bin/env bash
# Issue 13's table in one call on one GPU machine: the fused block on tensor cores (M1 and Q, split LoRA and
# full fine-tuning), Q's per-dispatch GPU profile, PyTorch's grouped_mm on the same card (fp32 and bf16, full
# FT and PEFT LoRA r 8, and the card's dense bf16 peak), then the f32 path beside. Here, in the project root:
#   ../shared/gpu/prepare.sh bench/webgpu_moe.ts && cp ../shared/gpu/torch_moe_bench.py .gpu/
#   xz -9 .gpu/bundle/webgpu_moe.js   # only when the tree and .gpu/ pass the device run's 64 MiB
# There (carry [".gpu"]): bash bench/tensor_cores_table.sh
# Prints the lines docs/webgpu.md's tables are made from; the JSON of each block run goes to $OUT/table/.
# A warm-up process first: a process's first block runs on a cold clock (run Z18). Each M1 process runs the
# block twice (M1,M1) and the second is the one to read. About 7 minutes on an H100 (run Z33: 400 s before the
# f32 tail's A/B was added).
set -uo pipefail
[ -f package.json ] || { echo "run from the project root" >&2; exit 2; }
for f in .gpu/bundle/*.js.xz; do [ -f "${f%.xz}" ] || xz -dk "$f"; done
# shellcheck disable=SC1091
source .gpu/on-device.sh
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
out=${OUT:-/tmp/tensor-cores-table}/table
mkdir -p "$out"
start=$(date +%s)
elapsed() { echo "[$(( $(date +%s) - start )) s] $*"; }
block="node .gpu/bundle/webgpu_moe.js"
# the bench's own lines: the adapter, a block's median / chained ms and TFLOP/s, its check against f32, its profile
show() { grep -Ev '^Warning|^ +at |^$' | cut -c1-240; }

timeout 60 $block --config M1 --lora none --tensor-cores on --iters 3 --warmup 1 > /dev/null 2>&1
elapsed "warm-up process done"
for round in 1 2; do
  for lora in split none; do
    timeout 120 $block --config M1,M1,Q --lora "$lora" --tensor-cores on --iters 8 --warmup 3 \
      --json "$out/tc-$lora-$round.json" 2>&1 | show | grep -E 'median|tensor cores:|^# adapter'
    elapsed "tensor cores, $lora, round $round"
  done
done
timeout 90 $block --config Q --lora none --tensor-cores on --iters 3 --warmup 2 --profile \
  --json "$out/tc-none-profile.json" 2>&1 | show | grep -E 'median|^# '
elapsed "Q profile"
timeout 180 python3 .gpu/torch_moe_bench.py --quick 2>&1 | tail -12
elapsed "PyTorch"
# the f32 path: split LoRA with its first expansion apart (the default) and folded into the base product's
# epilogue (WEBGPU_MOE_F32_LORA_TAIL, off until this A/B says it is faster: docs/webgpu.md, run Z33), full FT
for run in "split false" "split true" "none false"; do
  set -- $run
  timeout 120 $block --config M1,M1,Q --lora "$1" --tensor-cores off --iters 4 --warmup 2 --tf-flags "WEBGPU_MOE_F32_LORA_TAIL=$2" \
    --json "$out/f32-$1-tail-$2.json" 2>&1 | show | grep -E 'median'
  elapsed "f32 path, $1, folded tail $2"
done
