"""One markdown table from the end-to-end run's results (issue 15 item 3e).

  python3 bench/e2e/table.py OUT_FOLDER_OR_TARBALLS...

Takes go.sh's e2e-*.tar.gz files (or folders holding what they hold: MODEL/ours-DTYPE/result.json,
MODEL/torch-peft.json, MODEL/peft-compare.json, MODEL/e2e_checkpoint.json, MODEL/gpu.txt) and prints, per model,
a row for PyTorch + PEFT and one per expert storage of ours: load seconds, tokens/s after warm-up, the ratio to
PyTorch + PEFT's tokens/s, peak GPU memory, the first step's loss (the same ids and base weights on both sides,
LoRA B = 0 at the start: the losses should agree), and the PEFT round trip of our bf16-stored adapter.
Peak memory: ours, the webgpu backend's pool at its largest over the training steps (the last step's
memoryStages peakAllocatedBytes; memory.peakAllocatedBytes, the whole run's, where there are no stages; seen at every buffer
creation; older results: tf.memory().numBytesAllocatedInGPU, the same while the pool is unbounded); with qwen3-full
the GPU's own memory.used peak (nvidia-smi.json) in the notes; PyTorch, torch.cuda.max_memory_allocated. Both include the weights.
"""
import json
import os
import sys
import tarfile

STORAGE = {"stored": "bf16 (stored)", "float32": "f32", "nf4": "4-bit nf4", "int4": "4-bit int4", "int8": "8-bit int8"}
ORDER = ["float32", "stored", "int8", "int4", "nf4"]


def collect(paths):
    """{model: {"ours": {dtype: result}, "torch": ..., "compare": ..., "checkpoint": ..., "gpu": ...}}. Paths of the same
    checkpoint merge (olmoe's tarball and olmoe-more's); the same model with another checkpoint (qwen3-full at 24, then
    at 48 layers) keeps its own entry, named "MODEL (PATH)", so that each row says its own layers. A later path's run of
    the same expert storage replaces an earlier one's."""
    models = {}
    for path in paths:
        for model, m in collect_one(path).items():
            key = model
            if key in models and m.get("checkpoint") and models[key].get("checkpoint") not in (None, m["checkpoint"]):
                key = f"{model} ({os.path.basename(path)})"
            into = models.setdefault(key, {"ours": {}})
            into["ours"].update(m.pop("ours"))
            into.setdefault("smi", {}).update(m.pop("smi", {}))
            into.update(m)
    return models


def collect_one(path):
    """collect() of one tarball or folder"""
    files = {}
    if os.path.isdir(path):
        for root, _, names in os.walk(path):
            for n in names:
                full = os.path.join(root, n)
                if n.endswith(".tar.gz"):
                    files.update(read_tar(full))
                elif n.endswith((".json", ".txt")):
                    with open(full) as f:
                        files[os.path.relpath(full, path)] = f.read()
    else:
        files.update(read_tar(path))
    models = {}
    for name, text in sorted(files.items()):
        parts = name.split("/")
        if len(parts) < 2:
            continue
        m = models.setdefault(parts[-2] if parts[-1] in ("torch-peft.json", "peft-compare.json", "e2e_checkpoint.json", "gpu.txt")
                              else parts[-3] if parts[-1] in ("result.json", "nvidia-smi.json") else "?", {"ours": {}})
        if parts[-1] == "result.json" and parts[-2].startswith("ours-"):
            m["ours"][parts[-2][len("ours-"):]] = json.loads(text)
        elif parts[-1] == "nvidia-smi.json" and parts[-2].startswith("ours-"):
            m.setdefault("smi", {})[parts[-2][len("ours-"):]] = json.loads(text)
        elif parts[-1] == "torch-peft.json":
            m["torch"] = json.loads(text)
        elif parts[-1] == "peft-compare.json":
            m["compare"] = json.loads(text)
        elif parts[-1] == "e2e_checkpoint.json":
            m["checkpoint"] = json.loads(text)
        elif parts[-1] == "gpu.txt":
            m["gpu"] = text.splitlines()[0] if text else ""
    models.pop("?", None)
    return models


def read_tar(path):
    out = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith((".json", ".txt")):
                out[member.name] = tar.extractfile(member).read().decode()
    return out


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def table(models):
    lines = ["| model | side | experts | load s | tokens/s | × PyTorch | peak GPU GiB | first loss | PEFT round trip (rel bf16 / f32; adapter Δ f32) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    notes = []
    for model, m in models.items():
        ck = m.get("checkpoint", {})
        label = model if not ck else f"{model} ({ck.get('layers')}/{ck.get('full_layers')} layers, {ck.get('params', 0) / 1e9:.2f} B)"
        if ck.get("zeroExperts"):
            label += ", ZERO experts"
            notes.append(f"{model}: {ck.get('note')} ({ck.get('zero_bytes', 0) / 1e9:.1f} GB of holes): losses are not a real model's")
        torch_run = m.get("torch")
        base_tps = torch_run.get("tokensPerSecond") if torch_run else None
        base_median = None
        if torch_run:
            lines.append(f"| {label} | PyTorch + PEFT | bf16 ({torch_run.get('expertsImplementation')}) | {fmt(torch_run.get('loadSeconds'), '.1f')} | "
                         f"{fmt(base_tps, '.0f')} | 1.00 | {fmt((torch_run.get('peakBytes') or 0) / 2**30 or None, '.2f')} | "
                         f"{fmt((torch_run.get('losses') or [None])[0], '.4f')} | |")
        for dtype in sorted(m["ours"], key=lambda d: ORDER.index(d) if d in ORDER else len(ORDER)):
            r = m["ours"][dtype]
            tps = r.get("tokensPerSecond")
            mem = r.get("memory", {})
            # training's peak, as torch_peft.py's: the last step's running peak (memoryStages), not the whole run's,
            # which includes what runs after training: --profile's recording-only step (no submit, so tfjs-webgpu
            # reuses no buffer: 32.2 GiB against 19.5 in run G) and the prompt's logits
            steps = [st for st in r.get("memoryStages") or [] if str(st.get("stage", "")).startswith("step")]
            if steps:
                peak = max(steps[-1].get("peakAllocatedBytes") or 0, steps[-1].get("numBytesAllocatedInGPU") or 0)
                whole = mem.get("peakAllocatedBytes") or 0
                if whole > peak * 1.05:
                    notes.append(f"{model} ours {dtype}: peak GPU over the training steps; the whole run's, with what ran after them (the profile, the prompt's logits), "
                                 f"{whole / 2**30:.2f} GiB")
            else:
                peak = max(mem.get("peakAllocatedBytes") or 0, mem.get("numBytesAllocatedInGPU") or 0) or mem.get("numBytes")
            smi = m.get("smi", {}).get(dtype, {})
            if smi.get("peakMiB") is not None:
                notes.append(f"{model} ours {dtype}: nvidia-smi memory.used peak {smi['peakMiB'] / 1024:.2f} GiB (before the load {smi['firstMiB'] / 1024:.2f} GiB, {smi['samples']} samples every 200 ms); "
                             f"tfjs peak in use {fmt((mem.get('peakUsedBytes') or 0) / 2**30 or None, '.2f')} GiB, pool bound {r.get('poolLimitBytes')}")
            trip = ""
            c = m.get("compare")
            if dtype == "stored" and c:
                parts = [fmt(c.get(d, {}).get("rel"), ".2e") for d in ("bf16", "f32")]
                trip = f"{parts[0]} / {parts[1]}; {fmt(c.get('f32', {}).get('delta_rel'), '.2e')} (effect {fmt(c.get('f32', {}).get('effect'), '.1e')})"
                if c.get("bf16_vs_f32") is not None:
                    notes.append(f"{model}: PEFT bf16 against PEFT f32 on the round trip's prompt {c['bf16_vs_f32']:.2e} "
                                 "(the bf16 reference's own distance from f32; ours computes in f32)")
            lines.append(f"| {label} | ours ({r.get('backend')}) | {STORAGE.get(dtype, dtype)} | {fmt(r.get('loadSeconds'), '.1f')} | "
                         f"{fmt(tps, '.0f')} | {fmt(tps / base_tps if tps and base_tps else None, '.2f')} | "
                         f"{fmt(peak / 2**30 if peak else None, '.2f')} | {fmt((r.get('losses') or [None])[0], '.4f')} | {trip} |")
            if r.get("errors"):
                notes.append(f"{model} ours {dtype}: " + "; ".join(f"{k}: {v[:160]}" for k, v in r["errors"].items()))
            if r.get("stage") != "done":
                notes.append(f"{model} ours {dtype}: stopped at '{r.get('stage')}'")
            if r.get("tokenizer", {}).get("idsTakenModulo"):
                notes.append(f"{model}: Qwen3 token ids taken modulo the model's vocabulary {r['tokenizer']['modelVocab']}")
        # the median timed step beside the mean (tokens/s above): our first steps of a process run slower than
        # the later ones, PyTorch's from its second on (run Y3: 0.215, 0.179, 0.202, ... then 0.174-0.178 s)
        medians = []
        for side, run in [("PyTorch + PEFT", torch_run)] + [(f"ours {d}", r) for d, r in m["ours"].items()]:
            timed = sorted((run or {}).get("stepSeconds", [])[(run or {}).get("warmup", 0):])
            if timed:
                step = timed[len(timed) // 2]
                tokens = (run.get("batch") or 0) * (run.get("seq") or 0)
                ratio = f", {base_median / step:.2f}× PyTorch's" if side != "PyTorch + PEFT" and base_median else ""
                medians.append(f"{side} {step:.3f} s ({tokens / step:.0f} tokens/s{ratio})")
                if side == "PyTorch + PEFT":
                    base_median = step
        if medians:
            notes.append(f"{model}: the median timed step: " + "; ".join(medians))
        # the A/B rounds after the timed steps (E2E_AB_FLAGS), the defaults' round: the same process later on, past
        # the first steps' V8 warm-up (run Z14: timed steps 0.182 falling to 0.161 s, then the rounds at 0.153-0.160)
        for dtype, r in m["ours"].items():
            ab = next((a for a in r.get("abSteps") or [] if not a.get("flags")), None)
            if ab and ab.get("medianTokensPerSecond"):
                tokens = (r.get("batch") or 0) * (r.get("seq") or 0)
                ratio = f", {ab['medianTokensPerSecond'] * base_median / tokens:.2f}× PyTorch's median timed step" if base_median and tokens else ""
                notes.append(f"{model} ours {dtype}: after the timed steps, {len(ab.get('stepSeconds') or [])} A/B rounds of the defaults: "
                             f"median {ab['medianTokensPerSecond']:.0f} tokens/s{ratio}")
        # trainLoop's blocks (E2E_TRAIN_LOOP_ROUNDS): what `tfjs-moe-lora train` runs, clipping and the norm's read included
        for dtype, r in m["ours"].items():
            for block in r.get("trainLoopSteps") or []:
                if not block.get("medianTokensPerSecond"):
                    continue
                tokens = (r.get("batch") or 0) * (r.get("seq") or 0)
                ratio = f", {block['medianTokensPerSecond'] * base_median / tokens:.2f}× PyTorch's median timed step" if base_median and tokens else ""
                flags = ",".join(f"{k}={v}" for k, v in (block.get("flags") or {}).items()) or "the defaults"
                mean = block.get("meanTokensPerSecond")
                mean_text = (f"; mean {mean:.0f} tokens/s, {mean * base_median / tokens:.2f}× PyTorch's median timed step"
                             if mean and base_median and tokens else "")
                notes.append(f"{model} ours {dtype}: trainLoop (clipping at 1, the loss and norm read each step), {flags}: "
                             f"{len(block.get('stepSeconds') or [])} steps, median after each block's first "
                             f"{block['medianTokensPerSecond']:.0f} tokens/s{ratio}{mean_text}")
        any_run = torch_run or next(iter(m["ours"].values()), None)
        if any_run:
            notes.append(f"{model}: batch {any_run.get('batch')} × {any_run.get('seq')} tokens, {any_run.get('warmup')} warm-up + "
                         f"{any_run.get('steps')} timed steps, LoRA r {any_run.get('lora', {}).get('r')}, GPU {m.get('gpu', '?')}")
    return "\n".join(lines + [""] + [f"- {n}" for n in dict.fromkeys(notes)])


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(table(collect(sys.argv[1:])))
