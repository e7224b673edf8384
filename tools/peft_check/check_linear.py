"""PEFT side of the linear-LoRA check (see make_linear_check.ts).   python check_linear.py OUT

For each arch in OUT: (1) PEFT loads our_adapter/ onto base/ and gives ours.safetensors' logits;
(2) PEFT's own all-linear adapter (random A and B, seeded; q_proj rank 2 by rank_pattern; lora_dropout 0,
because PEFT refuses dropout on the ParamWrapper it uses for fused expert parameters) is saved to
peft_adapter/ with its logits in peft.safetensors and the module names PEFT chose in peft_modules.json,
for verify_linear_check.ts; peft_wrappers.json says what each wrapped module is (its class, and for a
ParamWrapper the parameter it adapts). Prints JSON; float32 on the CPU."""
import json, os, sys, traceback
import torch, transformers, peft
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

root = sys.argv[1]
def rel(a, e):
    a, e = a.double(), e.double(); return float((a - e).abs().max() / e.abs().max())
res = {"versions": [torch.__version__, transformers.__version__, peft.__version__]}
for arch in sorted(os.listdir(root)):
    d = os.path.join(root, arch); r = {}
    try:
        # (1) only where ours could build an adapter (make_linear_check.ts says which failed)
        if os.path.exists(os.path.join(d, "ours.safetensors")):
            ours = load_file(os.path.join(d, "ours.safetensors")); ids = ours["input_ids"].long()
            base = AutoModelForCausalLM.from_pretrained(os.path.join(d, "base"), dtype=torch.float32).eval()
            pm = PeftModel.from_pretrained(base, os.path.join(d, "our_adapter")).eval()
            with torch.no_grad(): pl = pm(input_ids=ids).logits.float()
            r["peft_loads_ours_rel"] = rel(pl, ours["logits"])
            r["peft_modules_of_our_adapter"] = sorted(n for n, m in pm.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
        else:
            ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
        base2 = AutoModelForCausalLM.from_pretrained(os.path.join(d, "base"), dtype=torch.float32).eval()
        torch.manual_seed(0)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"q_proj": 2},
                         lora_dropout=0.0, init_lora_weights=False)
        pm2 = get_peft_model(base2, cfg).eval()
        modules = sorted(n.removeprefix("base_model.model.") for n, m in pm2.named_modules()
                         if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}))
        with open(os.path.join(d, "peft_modules.json"), "w") as f: json.dump(modules, f)
        wrappers = {n.removeprefix("base_model.model."): {"class": type(m).__name__,
                    "parameter": getattr(m, "parameter_name", None),
                    "base": type(m.get_base_layer()).__name__}
                    for n, m in pm2.named_modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
        with open(os.path.join(d, "peft_wrappers.json"), "w") as f: json.dump(wrappers, f, indent=1)
        r["peft_all_linear_wrappers"] = wrappers
        with torch.no_grad(): l2 = pm2(input_ids=ids).logits.float()
        save_file({"input_ids": ids.to(torch.int32), "logits": l2.contiguous()}, os.path.join(d, "peft.safetensors"))
        pm2.save_pretrained(os.path.join(d, "peft_adapter"))
        r["peft_all_linear_modules"] = modules
    except Exception:
        r["error"] = traceback.format_exc()[-1500:]
    res[arch] = r
print(json.dumps(res, indent=1))
