"""Our adapter in PEFT: the round trip of issue 15 item 3d.

  python3 bench/e2e/peft_compare.py --model DIR --ours OURS_OUT --out RESULT.json [--dtypes bf16,f32]

Loads the checkpoint with transformers, our saved adapter (OURS_OUT/adapter) with PeftModel.from_pretrained,
runs the fixed prompt ours.ts ran (OURS_OUT/prompt/logits.safetensors: input_ids and our logits) and compares:
  rel          max|peft - ours| / max|ours| over the logits                       (target <= 1e-2 in bf16)
  effect       max|peft - peft without adapter| / max|ours|: how much the trained adapter moves the logits
  delta_rel    max|(ours - base) - (peft - base)| / max|peft - base|, base = the model without the adapter:
               the adapter's own contribution compared, meaningful where `effect` is small (f32 only: in bf16
               the base's rounding is larger than the adapter's change)
  bf16_vs_f32  max|peft in bf16 - peft in f32| / max|ours| (both dtypes run): the bf16 reference's own distance
               from f32 on this prompt. Ours computes in f32, so where this is near `rel` in bf16, the bf16 miss is
               PyTorch's bf16 rounding, not the adapter
  perToken     per prompt position, max over the vocabulary of |a - b| / max|ours|: bf16 against f32 (PEFT's) and
               ours against PEFT f32; where the bf16 reference is far from f32, whether a few positions make it
  routing      PEFT bf16 against PEFT f32: the (layer, position) pairs whose router chose another set of top-k
               experts (a near-tie that bf16 rounding flips sends the token through other experts from there on),
               of all pairs, and the first layer where a position's choice differs
per dtype: bf16 (what a user runs) and f32 (the same bf16-stored weights widened: ours computes in f32).
Experts eager here (the plainest reference; grouped_mm is timed in torch_peft.py).
"""
import argparse
import json
import os
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ours", required=True, help="ours.ts's --out folder (adapter/, prompt/logits.safetensors)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()

    import peft
    import torch
    import transformers
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    prompt = load_file(os.path.join(a.ours, "prompt", "logits.safetensors"))
    ids = prompt["input_ids"].long().to(a.device)
    ours = prompt["logits"].double().to(a.device)
    scale = float(ours.abs().max())
    result = dict(model=a.model, adapter=os.path.join(a.ours, "adapter"), promptTokens=ids.shape[1], target=1e-2,
                  versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__))
    with open(os.path.join(a.ours, "result.json")) as f:
        result["oursName"] = json.load(f).get("name")
    logits = {}
    choices = {}
    for name in a.dtypes.split(","):
        dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[name]
        t0 = time.perf_counter()
        base = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, device_map=a.device,
                                                    experts_implementation="eager", attn_implementation="eager")
        model = PeftModel.from_pretrained(base, result["adapter"]).eval()
        routed = router_choices(model, base.config)
        with torch.no_grad():
            peft_logits = model(input_ids=ids).logits.double()
            choices[name] = routed.done()
            with model.disable_adapter():
                base_logits = model(input_ids=ids).logits.double()
        ours_delta, peft_delta = ours - base_logits, peft_logits - base_logits
        r = dict(rel=float((peft_logits - ours).abs().max()) / scale,
                 effect=float(peft_delta.abs().max()) / scale,
                 delta_rel=float((ours_delta - peft_delta).abs().max() / peft_delta.abs().max()),
                 seconds=time.perf_counter() - t0)
        r["withinTarget"] = r["rel"] <= result["target"]
        result[name] = r
        print(f"[compare] {name}: {r}", flush=True)
        logits[name] = peft_logits
        del model, base, peft_logits, base_logits
        if a.device == "cuda":
            torch.cuda.empty_cache()
    if "bf16" in logits and "f32" in logits:
        result["bf16_vs_f32"] = float((logits["bf16"] - logits["f32"]).abs().max()) / scale
        print(f"[compare] PEFT bf16 against PEFT f32: {result['bf16_vs_f32']:.3e}", flush=True)
        per_position = lambda x, y: [round(float(v) / scale, 6) for v in (x - y).abs().amax(dim=-1)[0]]
        result["perToken"] = dict(bf16_vs_f32=per_position(logits["bf16"], logits["f32"]),
                                  ours_vs_f32=per_position(ours, logits["f32"]))
        if choices["bf16"] and len(choices["bf16"]) == len(choices["f32"]):
            differ = [[int(p) for p in torch.nonzero((b != f).any(dim=-1)).flatten()]
                      for b, f in zip(choices["bf16"], choices["f32"])]
            first = {}
            for layer, positions in enumerate(differ):
                for p in positions:
                    first.setdefault(p, layer)
            result["routing"] = dict(layers=len(differ), positions=ids.shape[1], pairsDiffering=sum(map(len, differ)),
                                     firstLayerByPosition={str(p): l for p, l in sorted(first.items())})
        print(f"[compare] per position and routing: {json.dumps({k: result.get(k) for k in ('perToken', 'routing')})}", flush=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result), flush=True)


class router_choices:
    """Each MoE layer's router top-k expert sets (sorted) in the next forward pass, from forward hooks on the
    routers: modules named `...mlp.gate` (OLMoE, Qwen3-MoE), whose first float output with the experts' count as its
    last dimension is taken as the router logits."""

    def __init__(self, model, config):
        import torch
        self.k = getattr(config, "num_experts_per_tok", None)
        experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
        self.sets, self.handles = [], []

        def hook(_module, _inputs, output):
            outs = output if isinstance(output, (tuple, list)) else (output,)
            for o in outs:
                if torch.is_tensor(o) and o.is_floating_point() and o.shape[-1] == experts:
                    self.sets.append(torch.topk(o.float().reshape(-1, experts), self.k, dim=-1).indices.sort(dim=-1).values.cpu())
                    return

        if self.k and experts:
            for name, module in model.named_modules():
                if name.endswith("mlp.gate"):
                    self.handles.append(module.register_forward_hook(hook))

    def done(self):
        for h in self.handles:
            h.remove()
        return self.sets


if __name__ == "__main__":
    main()
