#!/usr/bin/env bash
# The end-to-end run of issue 15 item 3 on the GPU machine, one phase a call (each well inside 600 s):
#   bash bench/e2e/go.sh olmoe        OLMoE-1B-7B checkpoint (if missing), ours bf16-stored, PyTorch + PEFT, PEFT round trip
#   bash bench/e2e/go.sh olmoe-more   ours with 4-bit (nf4) and float32 experts on the same checkpoint
#   bash bench/e2e/go.sh qwen3        Qwen3-30B-A3B shape (12 of 48 layers; removes the OLMoE checkpoint), the same three
#   bash bench/e2e/go.sh qwen3-more   ours nf4 and float32 on that checkpoint
#   bash bench/e2e/go.sh qwen3-full   Qwen3-30B-A3B at full depth (48 layers) with its routed experts all zeros
#                                     (sparse holes: 61 GB of files, 3.1 GB on the disk; write_checkpoint.ts), ours
#                                     only with nf4 experts, once per pool bound (E2E_POOL_LIMITS), sampling the GPU's
#                                     memory.used (nvidia-smi, every 200 ms) into ours-*/nvidia-smi.json: issue 15's
#                                     24 GB target. Memory and speed only: zero experts learn nothing real.
# Checkpoints and results stay in $E2E_WORK (default /tmp/e2e-work) while the machine is warm, so the -more
# phases reuse them; a phase whose checkpoint is gone writes it again. Each phase writes two files to $OUT:
# e2e-PHASE.tar.gz (result JSONs, logs, adapter_config.json, the GPU's name and driver) and e2e-PHASE.log.
# Steps run in order of importance under one deadline (E2E_BUDGET_S, default 560 s): a step that would not
# fit is skipped and logged, a step that overruns is stopped by `timeout` (ours.ts writes result.partial.json
# after every stage). Needs .gpu/ from bench/e2e/prepare.sh (source .gpu/on-device.sh is done here).
#
# Knobs (environment): E2E_WARMUP=2 E2E_STEPS=5 E2E_BATCH=1 E2E_SEQ=512 E2E_RANK=8 E2E_ALPHA=16 E2E_LR=1e-3
#   E2E_QWEN3_LAYERS=12  E2E_MORE="nf4 float32"  E2E_TENSOR_CORES=off
#   E2E_PROFILE=off (on: after the timed steps ours profiles 2-3 more, writing ours-DTYPE/profile.json: kernels,
#   dispatches, reads and host ms per phase, recording-only ms, GPU ms per program with timestamp-query)
#   E2E_CPU_PROFILE=off (on: the timed steps under V8's sampling profiler: ours-DTYPE/steps.cpuprofile and
#   cpu-profile.json, ms per function; the sampling slows the steps a little)
#   E2E_NATIVE_TIMING=off (on: the timed steps with each native WebGPU call timed, native_timing.ts: result.json's
#   nativeCalls, calls and host ms a step per method)
#   E2E_LOAD_PROFILE=off (on: the load under V8's sampling profiler: ours-DTYPE/load-cpu-profile.json, ms per function)
#   E2E_GRAD_CKPT=off (on: ours recomputes each decoder layer in backward, setGradientCheckpointing; the
#   qwen3-full peak per layer, issue 15)
#   E2E_TF_FLAGS="" (tf.env() flags for ours, e.g. WEBGPU_DEFERRED_SUBMIT_BATCH_SIZE=60,WEBGPU_MOE_SUBMIT_FLOPS=1e9)
#   E2E_AB_FLAGS="" (flag sets, ';' between sets, ',' within: after the timed steps ours runs E2E_AB_ROUNDS=4 rounds of one
#     step with its own flags and one with each set, interleaved: result.json's abSteps)
#   E2E_PIPELINE_ROUNDS="" (after those, rounds of 4 steps each waiting on its loss and 4 reading it one step late:
#     result.json's pipelineSteps)
#   E2E_TRAIN_LOOP_ROUNDS="" (after those, rounds of E2E_TRAIN_LOOP_BLOCK=5 steps through trainLoop, what `tfjs-moe-lora train` runs: clipping
#     at 1, the loss and the norm read each step; one block per flag set of E2E_AB_FLAGS too: result.json's trainLoopSteps)
#   E2E_MODEL_DIR=DIR (use this checkpoint, write none)  OURS="node .gpu/bundle/ours.js" (the command of our side)
#   E2E_OURS_FLAGS="" (more flags for ours, e.g. "--backend cpu" for a dry run here)
#   qwen3-full: E2E_QWEN3_FULL_LAYERS=48 E2E_STEPS=2 E2E_WARMUP=1 (its defaults)  E2E_POOL_LIMITS="0 none" (ours --pool-limit-mb: the most MiB of free buffers
#   tfjs-webgpu's pool keeps; none: no bound)  E2E_FULL_DTYPE=nf4  WRITER="node .gpu/bundle/write_checkpoint.js"
set -uo pipefail
phase=${1:?usage: go.sh olmoe|olmoe-more|qwen3|qwen3-more|qwen3-full}
case "$phase" in olmoe|olmoe-more) model=olmoe ;; qwen3|qwen3-more) model=qwen3 ;; qwen3-full) model=qwen3-full ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;; esac
# qwen3-full loads 48 layers twice (one run per pool bound) in one call: fewer steps, enough for the step's peak
if [ "$phase" = qwen3-full ]; then : "${E2E_STEPS:=2}" "${E2E_WARMUP:=1}"; fi
[ -f package.json ] || { echo "run from the project root" >&2; exit 2; }
start=$(date +%s)
deadline=$((start + ${E2E_BUDGET_S:-560}))
work=${E2E_WORK:-/tmp/e2e-work}
out=${OUT:-$work/out}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work/$model" "$out"
log="$work/$model/go-$phase.log"
say() { echo "[go.sh $phase $(( $(date +%s) - start ))s] $*" | tee -a "$log" >&2; }

if [ -z "${OURS:-}" ]; then
  [ -f .gpu/on-device.sh ] || { say ".gpu/ missing: run bench/e2e/prepare.sh where Node is, bring .gpu/ along"; exit 2; }
  # shellcheck disable=SC1091
  source .gpu/on-device.sh >>"$log" 2>&1
  OURS="node .gpu/bundle/ours.js"
  WRITER=${WRITER:-node .gpu/bundle/write_checkpoint.js}
fi
# the bundle's tokenizer, for a bundle named in OURS too (ours.js looks beside itself first)
if [ -f .gpu/bundle/qwen3-tokenizer.json.xz ] && [ ! -f .gpu/bundle/qwen3-tokenizer.json ]; then
  xz -dk .gpu/bundle/qwen3-tokenizer.json.xz
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"; } > "$work/$model/gpu.txt" 2>&1
df -h "$work" >> "$work/$model/gpu.txt" 2>&1

# step NAME SECONDS_NEEDED CMD...: runs CMD under the time left, unless less than SECONDS_NEEDED is left
step() {
  local name=$1 need=$2; shift 2
  local left=$((deadline - $(date +%s) - 15))
  if [ "$left" -lt "$need" ]; then say "skip $name: ${left}s left, needs ~${need}s"; return 1; fi
  say "start $name (limit ${left}s): $*"
  local t0; t0=$(date +%s)
  timeout --kill-after=5 "$left" "$@" > "$work/$model/$name.log" 2>&1
  local rc=$?
  say "end $name rc=$rc in $(( $(date +%s) - t0 ))s"; tail -n 3 "$work/$model/$name.log" | sed 's/^/    /' | tee -a "$log" >&2
  return $rc
}

# training text: the project's own documentation, one paragraph a line (no network on the GPU machine)
data="$work/data.jsonl"
[ -s "$data" ] || python3 - "$data" <<'EOF'
import glob, json, sys
paras = [p.strip() for f in sorted(glob.glob("docs/*.md")) + ["README.md"] for p in open(f).read().split("\n\n")]
with open(sys.argv[1], "w") as out:
    for p in paras:
        if len(p) > 40: out.write(json.dumps({"text": p}) + "\n")
EOF

ckpt=${E2E_MODEL_DIR:-$work/ckpt-$model}
if [ "$model" = qwen3-full ] && [ -z "${E2E_MODEL_DIR:-}" ] && [ ! -s "$ckpt/e2e_checkpoint.json" ]; then
  # sparse: 3.1 GB on the disk at 48 layers, beside whichever other checkpoint is there
  # the results of the previous checkpoint (another layer count) would be packed with this one's
  rm -rf "$ckpt" "$work/$model"/ours-*
  # shellcheck disable=SC2086
  step write_checkpoint 60 ${WRITER:-npx tsx bench/e2e/write_checkpoint.ts} --model qwen3 --layers "${E2E_QWEN3_FULL_LAYERS:-48}" --zero-experts on --out "$ckpt"
elif [ -z "${E2E_MODEL_DIR:-}" ] && [ ! -s "$ckpt/e2e_checkpoint.json" ]; then
  other=$([ "$model" = olmoe ] && echo qwen3 || echo olmoe)
  rm -rf "$ckpt" "$work/ckpt-$other"   # the disk (64 GB) holds one of them
  rm -rf "$work/$model"/ours-* "$work/$model"/torch-peft.json "$work/$model"/peft-compare.json   # the previous checkpoint's
  layers=$([ "$model" = qwen3 ] && echo "--layers ${E2E_QWEN3_LAYERS:-12}" || echo "")
  # shellcheck disable=SC2086
  step make_checkpoint 60 python3 "$here/make_checkpoints.py" --model "$model" --out "$ckpt" $layers
fi

common=(--model "$ckpt" --data "$data" --warmup "${E2E_WARMUP:-2}" --steps "${E2E_STEPS:-5}" --batch "${E2E_BATCH:-1}"
        --seq "${E2E_SEQ:-512}" --rank "${E2E_RANK:-8}" --alpha "${E2E_ALPHA:-16}" --lr "${E2E_LR:-1e-3}"
        --tensor-cores "${E2E_TENSOR_CORES:-off}" --profile "${E2E_PROFILE:-off}" --cpu-profile "${E2E_CPU_PROFILE:-off}"
        --gradient-checkpointing "${E2E_GRAD_CKPT:-off}" --native-timing "${E2E_NATIVE_TIMING:-off}"
        --load-profile "${E2E_LOAD_PROFILE:-off}")
[ -n "${E2E_TF_FLAGS:-}" ] && common+=(--tf-flags "$E2E_TF_FLAGS")
[ -n "${E2E_AB_FLAGS:-}" ] && common+=(--ab-flags "$E2E_AB_FLAGS" --ab-rounds "${E2E_AB_ROUNDS:-4}")
[ -n "${E2E_PIPELINE_ROUNDS:-}" ] && common+=(--pipeline-rounds "$E2E_PIPELINE_ROUNDS")
[ -n "${E2E_TRAIN_LOOP_ROUNDS:-}" ] && common+=(--train-loop-rounds "$E2E_TRAIN_LOOP_ROUNDS" --train-loop-block "${E2E_TRAIN_LOOP_BLOCK:-5}")
ours() {  # ours EXPERT_DTYPE [flags]
  local dtype=$1; shift
  # shellcheck disable=SC2086
  step "ours-$dtype" 60 $OURS "${common[@]}" --expert-dtype "$dtype" --name "$dtype" --out "$work/$model/ours-$dtype" ${E2E_OURS_FLAGS:-} "$@"
}

# ours_sampled NAME FLAGS...: ours with the GPU's memory.used sampled every 200 ms; the peak, the first sample (before
# the load: what the device held already) and the count go to ours-NAME/nvidia-smi.json
ours_sampled() {
  local name=$1; shift
  local dir="$work/$model/ours-$name"
  mkdir -p "$dir"
  local smi_pid=""
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$dir/nvidia-smi.csv" 2>/dev/null &
    smi_pid=$!
  fi
  # shellcheck disable=SC2086
  step "ours-$name" 60 $OURS "${common[@]}" --name "$name" --out "$dir" ${E2E_OURS_FLAGS:-} "$@"
  local rc=$?
  if [ -n "$smi_pid" ]; then kill "$smi_pid" 2>/dev/null; wait "$smi_pid" 2>/dev/null; fi
  python3 - "$dir/nvidia-smi.csv" "$dir/nvidia-smi.json" <<'EOF'
import json, sys
try:
    mib = [int(l.split(",")[0]) for l in open(sys.argv[1]) if l.split(",")[0].strip().isdigit()]
except OSError:
    mib = []
json.dump({"peakMiB": max(mib) if mib else None, "firstMiB": mib[0] if mib else None, "samples": len(mib),
           "every": "200 ms", "query": "nvidia-smi --query-gpu=memory.used" if mib else "no nvidia-smi (or no samples)"},
          open(sys.argv[2], "w"), indent=1)
EOF
  say "ours-$name: GPU memory.used $(python3 -c 'import json,sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$dir/nvidia-smi.json")"
  return $rc
}

if [ -s "$ckpt/config.json" ]; then
  case "$phase" in
    qwen3-full)
      # the adapter (r·E rows per expert weight) is not wanted here
      for bound in ${E2E_POOL_LIMITS:-0 none}; do
        dtype=${E2E_FULL_DTYPE:-nf4}
        if [ "$bound" = none ]; then
          ours_sampled "$dtype-pool-none" --expert-dtype "$dtype" --save-adapter off
        else
          ours_sampled "$dtype-pool-$bound" --expert-dtype "$dtype" --save-adapter off --pool-limit-mb "$bound"
        fi
      done
      ;;
    olmoe|qwen3)
      ours stored
      ids="$work/$model/ours-stored/train_ids/input_ids.safetensors"
      if [ -s "$ids" ]; then
        step torch-peft 60 python3 "$here/torch_peft.py" --model "$ckpt" --ids "$ids" --out "$work/$model/torch-peft.json" \
          --rank "${E2E_RANK:-8}" --alpha "${E2E_ALPHA:-16}" --warmup "${E2E_WARMUP:-2}" --steps "${E2E_STEPS:-5}" --lr "${E2E_LR:-1e-3}"
      fi
      if [ -s "$work/$model/ours-stored/adapter/adapter_config.json" ] && [ -s "$work/$model/ours-stored/prompt/logits.safetensors" ]; then
        step peft-compare 60 python3 "$here/peft_compare.py" --model "$ckpt" --ours "$work/$model/ours-stored" --out "$work/$model/peft-compare.json"
      else
        say "no adapter or prompt logits from ours-stored: no PEFT round trip (see ours-stored/result*.json errors)"
      fi
      ;;
    *-more)
      # the adapters of these runs are not compared: no need to write them (hundreds of MB)
      for dtype in ${E2E_MORE:-nf4 float32}; do ours "$dtype" --save-adapter off; done
      ;;
  esac
else
  say "no checkpoint in $ckpt"
fi

say "packing"
cp "$ckpt/e2e_checkpoint.json" "$work/$model/" 2>/dev/null
(cd "$work" && find "$model" \( -name '*.json' -o -name '*.log' -o -name 'gpu.txt' -o -name 'nvidia-smi.csv' -o -name '*.cpuprofile' \) -not -path '*/adapter_model*' -print0 |
  tar czf "$out/e2e-$phase.tar.gz" --null -T -)
say "done: $out/e2e-$phase.tar.gz"
cp "$log" "$out/e2e-$phase.log"
