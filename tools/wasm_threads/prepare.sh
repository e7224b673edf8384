#!/usr/bin/env bash
# Copies what useThreadedWasm (src/backends/wasm/threads_node.ts) reads from disk next to the
# esbuild bundle made by ../shared/gpu/prepare.sh: the bundle holds the JS, not these files.
set -euo pipefail
src=node_modules/@tensorflow/tfjs-backend-wasm
dst=.gpu/node_modules/@tensorflow/tfjs-backend-wasm
[ -d .gpu/bundle ] || { echo "run ../shared/gpu/prepare.sh bench/run.ts first" >&2; exit 1; }
mkdir -p "$dst/dist" "$dst/wasm-out"
cp "$src/package.json" "$dst/"
cp "$src"/wasm-out/tfjs-backend-wasm-threaded-simd.js "$src"/wasm-out/tfjs-backend-wasm-threaded-simd.worker.js "$dst/wasm-out/"
cp "$src"/dist/tfjs-backend-wasm-threaded-simd.wasm "$dst/dist/"
echo "copied the threaded build into $dst"
