"""Checks what make_saved_adapter_check.ts wrote: PEFT loads our adapter and gives our logits;\ntransformers loads the merged folder and gives them too.   python check_saved_adapter.py OUT"""
import json, os, sys, traceback, torch, transformers, peft
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
root = sys.argv[1]
def rel(a, e):
    a, e = a.double(), e.double(); return float((a - e).abs().max() / e.abs().max())
res = {"versions": [torch.__version__, transformers.__version__, peft.__version__]}
for arch in sorted(os.listdir(root)):
    d = os.path.join(root, arch); r = {}
    try:
        ours = load_file(os.path.join(d, "ours.safetensors")); ids = ours["input_ids"].long()
        base = AutoModelForCausalLM.from_pretrained(os.path.join(d, "base"), dtype=torch.float32).eval()
        pm = PeftModel.from_pretrained(base, os.path.join(d, "our_adapter")).eval()
        with torch.no_grad(): pl = pm(input_ids=ids).logits.float()
        r["peft_our_adapter_vs_ours"] = rel(pl, ours["logits"])
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(d, "merged"), dtype=torch.float32).eval()
        with torch.no_grad(): ml = merged(input_ids=ids).logits.float()
        r["transformers_merged_vs_ours"] = rel(ml, ours["logits"])
        r["merged_param_dtype"] = str(next(merged.parameters()).dtype)
    except Exception:
        r["error"] = traceback.format_exc()[-1500:]
    res[arch] = r
print(json.dumps(res, indent=1))
