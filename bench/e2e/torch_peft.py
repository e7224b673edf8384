"""The same LoRA training in PyTorch + PEFT, what a user would pick instead (issue 15 item 3c).

  python3 bench/e2e/torch_peft.py --model DIR --ids OURS_OUT/train_ids/input_ids.safetensors --out RESULT.json \
      [--rank 8 --alpha 16 --warmup 2 --steps 5 --lr 1e-3 --experts grouped_mm --dtype bf16]

The model folder is the one ours.ts trained (make_checkpoints.py's); the token windows are the ones ours.ts
wrote ([steps, batch, seq + 1] int32), so both sides train on the same ids with the same batch and sequence
length. LoRA with the same rank and alpha on the same weights: the fused experts and the router through PEFT's
target_parameters (experts.gate_up_proj, experts.down_proj, gate.weight), the attention projections through
target_modules (q_proj, k_proj, v_proj, o_proj); dropout 0. bf16 weights, transformers' grouped_mm experts
(config._experts_implementation), sdpa attention, Adam. The loss is the mean next-token cross-entropy over
batch x seq, as ours. Reports tokens/s over the timed steps (each ends with loss.item(), a GPU sync), peak
torch.cuda.max_memory_allocated (weights included), load seconds, losses; writes one JSON (--out) and prints it.

--read-late: step n's loss is read after step n + 1 is launched (forward, backward, Adam), so the GPU runs on while
the host waits, as HF's Trainer (which reads the loss only when it logs) and as ours' trainLoop on webgpu (its
read-ahead); a step's seconds are then from one read's return to the next (the first from its launch). The
computation is the same; only when the host reads changes.
"""
import argparse
import json
import time

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGET_PARAMETERS = ["experts.gate_up_proj", "experts.down_proj", "gate.weight"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="ours.ts's train_ids/input_ids.safetensors")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--experts", default="grouped_mm", help="transformers' experts implementation (grouped_mm, eager, ...)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--read-late", action="store_true", help="read step n's loss after launching step n + 1")
    a = ap.parse_args()

    import peft
    import torch
    import torch.nn.functional as F
    import transformers
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cuda = a.device == "cuda"
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    ids = load_file(a.ids)["input_ids"].long()
    total, batch, window = ids.shape
    if total < a.warmup + a.steps:
        raise SystemExit(f"--ids holds {total} steps but --warmup {a.warmup} + --steps {a.steps} are asked for")
    result = dict(side="torch", name=f"peft-{a.dtype}-{a.experts}", model=a.model, batch=batch, seq=window - 1,
                  warmup=a.warmup, steps=a.steps, learningRate=a.lr,
                  lora=dict(r=a.rank, alpha=a.alpha, target_modules=TARGET_MODULES, target_parameters=TARGET_PARAMETERS),
                  versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__),
                  device=torch.cuda.get_device_name() if cuda else "cpu", errors={})

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, device_map=a.device,
                                                 experts_implementation=a.experts, attn_implementation="sdpa")
    if cuda:
        torch.cuda.synchronize()
    result["loadSeconds"] = time.perf_counter() - t0
    result["expertsImplementation"] = getattr(model.config, "_experts_implementation", None)
    result["modelType"] = model.config.model_type
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=a.alpha, lora_dropout=0.0,
                                             target_modules=TARGET_MODULES, target_parameters=TARGET_PARAMETERS))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    result["params"] = dict(total=sum(p.numel() for p in model.parameters()), trainable=sum(p.numel() for p in params))
    result["loraDtype"] = str(params[0].dtype)
    opt = torch.optim.Adam(params, lr=a.lr)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result["stepSeconds"], result["losses"] = [], []
    result["readLate"] = a.read_late

    def record(step, value, since):
        result["stepSeconds"].append(time.perf_counter() - since)
        result["losses"].append(value)
        print(f"[torch] step {step + 1}: loss {value:.4f}, {result['stepSeconds'][-1]:.3f} s", flush=True)
        return time.perf_counter()

    # --read-late: the step launched but not read yet, and where its seconds start (its launch for the first step,
    # else the previous read's return)
    unread, read_from = None, None
    for step in range(a.warmup + a.steps):
        w = ids[step].to(a.device)
        s0 = time.perf_counter()
        logits = model(input_ids=w[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del logits
        if not a.read_late:
            record(step, loss.item(), s0)
        else:
            read_from = s0 if unread is None else record(step - 1, unread.item(), read_from)
            unread = loss.detach()
        del loss
    if unread is not None:
        record(a.warmup + a.steps - 1, unread.item(), read_from)
    timed = sum(result["stepSeconds"][a.warmup:])
    result["tokensPerSecond"] = batch * (window - 1) * a.steps / timed
    if cuda:
        result["peakBytes"] = torch.cuda.max_memory_allocated()
        result["peakReservedBytes"] = torch.cuda.max_memory_reserved()
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
