#!/usr/bin/env bash
# Times the fused block at config S on wasm with 0 (tfjs's single-threaded build), 1, 2, 4 and 8
# XNNPACK threads (THREADS, e.g. THREADS="0 8 16" on the GPU machine's 16 cores), rotating the order each
# round (ROUNDS, default 3); one JSON line per run into $OUT/wasm_threads.jsonl, the runs' stderr into
# $OUT/wasm_threads.stderr.txt.
set -uo pipefail
source .gpu/on-device.sh
out=${OUT:-.}/wasm_threads.jsonl
: > "$out"; : > "${OUT:-.}/wasm_threads.stderr.txt"
read -r -a threads <<< "${THREADS:-0 1 2 4 8}"
for round in $(seq 1 "${ROUNDS:-3}"); do
  for i in "${!threads[@]}"; do
    t=${threads[$(( (i + round) % ${#threads[@]} ))]}
    flag=(); [ "$t" -gt 0 ] && flag=(--wasm-threads "$t")
    for storage in float32 bf16; do
      lora=none,split; [ "$storage" = bf16 ] && lora=split
      json=$(node .gpu/bundle/run.js --config S --backend wasm --iters 15 --warmup 2 --json --no-reference \
          --lora "$lora" --expert-storage "$storage" "${flag[@]}" 2>>"${OUT:-.}/wasm_threads.stderr.txt" | tail -1)
      echo "{\"round\":$round,\"threads\":$t,\"storage\":\"$storage\",\"cases\":${json:-null}}" >> "$out"
    done
  done
done
echo "wrote $out"
