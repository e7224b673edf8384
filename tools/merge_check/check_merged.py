"""Checks what make_merge_check.ts wrote with transformers and PEFT (float32 on the CPU, exact).

    python check_merged.py DIR FIXTURES OUT_JSON

For each arch in DIR: the merged checkpoints load with AutoModelForCausalLM and give our logits of
model + adapter; PEFT's base + adapter gives the merged folder's logits; save_pretrained's index at
100KB equals ours; bf16/f16 saves equal torch's .to(); and the default max_shard_size is printed.
"""
import inspect
import json
import os
import sys
import tempfile
import traceback

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel
import transformers
import peft

work, fixtures, out_json = sys.argv[1], sys.argv[2], sys.argv[3]
torch.manual_seed(0)


def rel(a, e):
    a, e = a.double(), e.double()
    return float((a - e).abs().max() / e.abs().max())


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


results = {
    "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    "save_pretrained_max_shard_size": str(inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default),
}
for arch in sorted(os.listdir(work)):
    d = os.path.join(work, arch)
    fixture = os.path.join(fixtures, arch)
    r = {}
    try:
        ours = load_file(os.path.join(d, "ours.safetensors"))
        ids = ours["input_ids"].long()
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(d, "merged_f32"), dtype=torch.float32).eval()
        merged_logits = logits(merged, ids)
        r["merged_f32_vs_ours"] = rel(merged_logits, ours["logits"])
        merged_bf16 = AutoModelForCausalLM.from_pretrained(os.path.join(d, "merged_bf16"), dtype=torch.float32).eval()
        r["merged_bf16_vs_ours"] = rel(logits(merged_bf16, ids), ours["logits"])
        base = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32).eval()
        with_adapter = PeftModel.from_pretrained(base, os.path.join(fixture, "adapter")).eval()
        peft_logits = logits(with_adapter, ids)
        r["peft_vs_merged_f32"] = rel(merged_logits, peft_logits)
        r["peft_vs_ours"] = rel(ours["logits"], peft_logits)
        peft_merged = with_adapter.merge_and_unload()
        r["peft_merge_and_unload_vs_merged_f32"] = rel(merged_logits, logits(peft_merged, ids))

        # the index save_pretrained writes at the same max_shard_size, next to ours
        base = AutoModelForCausalLM.from_pretrained(fixture, dtype=torch.float32)
        with tempfile.TemporaryDirectory() as tmp:
            base.save_pretrained(tmp, max_shard_size="100KB")
            theirs = json.load(open(os.path.join(tmp, "model.safetensors.index.json")))
            r["hf_index_text"] = open(os.path.join(tmp, "model.safetensors.index.json")).read()
            r["hf_files"] = sorted(f for f in os.listdir(tmp))
        mine = json.load(open(os.path.join(d, "base_sharded", "model.safetensors.index.json")))
        r["index_equal"] = theirs == mine
        r["index_metadata_hf"] = theirs["metadata"]
        r["index_metadata_ours"] = mine["metadata"]
        r["weight_map_diff"] = {k: [theirs["weight_map"].get(k), mine["weight_map"].get(k)]
                                for k in set(theirs["weight_map"]) | set(mine["weight_map"])
                                if theirs["weight_map"].get(k) != mine["weight_map"].get(k)}
        r["index_text_equal"] = r["hf_index_text"] == open(os.path.join(d, "base_sharded", "model.safetensors.index.json")).read()
        r["sharded_loads_equal"] = all(torch.equal(a, b) for a, b in zip(
            AutoModelForCausalLM.from_pretrained(os.path.join(d, "base_sharded"), dtype=torch.float32).state_dict().values(),
            base.state_dict().values()))

        # our bf16 / f16 rounding against torch's .to()
        src = load_file(os.path.join(fixture, "model.safetensors"))
        for dtype, name in [(torch.bfloat16, "base_bf16"), (torch.float16, "base_f16")]:
            saved = load_file(os.path.join(d, name, "model.safetensors"))
            r[f"{name}_all_dtype"] = sorted({str(t.dtype) for t in saved.values()})
            r[f"{name}_bit_equal_torch_to"] = all(torch.equal(saved[k], src[k].to(dtype)) for k in src)
            r[f"{name}_config_dtype"] = json.load(open(os.path.join(d, name, "config.json"))).get("dtype")
            auto = AutoModelForCausalLM.from_pretrained(os.path.join(d, name))
            r[f"{name}_auto_loaded_dtype"] = str(next(auto.parameters()).dtype)
    except Exception:
        r["error"] = traceback.format_exc()
    results[arch] = r
    print(arch, json.dumps({k: v for k, v in r.items() if k != "hf_index_text"}, indent=1), flush=True)

# torch's float32 -> bfloat16 / float16 rounding on values of every kind, as a spec fixture:
# random bit patterns (all exponents, subnormals, inf, NaN) and exact ties of both formats
bits = torch.randint(-2**31, 2**31, (12000,), dtype=torch.int64).to(torch.int32)
values = bits.view(torch.float32)
bf16_ties = ((torch.randint(0, 2**15, (4000,), dtype=torch.int32) << 16) | 0x8000).view(torch.float32)
f16_grid = torch.randint(0, 0x7c00, (4000,), dtype=torch.int32).to(torch.int16).view(torch.float16).float()
f16_next = (torch.randint(0, 0x7c00, (4000,), dtype=torch.int32) + 1).to(torch.int16).view(torch.float16).float()
f16_ties = (f16_grid.double() + (f16_next.double() - f16_grid.double()) / 2).float()
specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 65504.0, 65519.99, 65520.0,
                         2.0**-24, 2.0**-25, 2.0**-25 * 1.5, 2.0**-14, 3.3895313892515355e38, 1.0 + 2.0**-8])
f32 = torch.cat([values, bf16_ties, f16_ties, specials]).contiguous()
from safetensors.torch import save_file
save_file({"f32": f32, "bf16": f32.to(torch.bfloat16), "f16": f32.to(torch.float16)},
          os.path.join(os.path.dirname(out_json), "torch_rounding.safetensors"), metadata={"torch": torch.__version__})

json.dump(results, open(out_json, "w"), indent=1)
print(json.dumps({k: v for k, v in results.items() if not isinstance(v, dict) or k == "versions"}))
