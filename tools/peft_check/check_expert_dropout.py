"""PEFT side of the expert LoRA dropout check (see make_expert_dropout_check.ts).

    python check_expert_dropout.py OUT

Builds the routed experts as per-expert nn.Linear modules (gate_up_proj [2I, H], down_proj [H, I];
the older per-expert layout), wraps them with PEFT's LoRA (lora_dropout = p), loads our factors
into each expert's lora_A / lora_B (A_e = A[e·r:(e+1)·r], B_e[:, j] = B[:, j·E + e]), and replaces
each lora_dropout module by one that multiplies the rows it gets by our masks for exactly those
(token, slot) pairs. Then out = Σ_k w·expert(x), loss = Σ out·G, backward; prints the max relative
error of out, loss, dx, dA1, dB1, dA2, dB2 against ours as JSON (float64 on the CPU)."""
import json, sys
import torch, peft
from torch import nn
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file

root = sys.argv[1]
c = {k: v.double() if v.is_floating_point() else v.long() for k, v in load_file(f"{root}/case.safetensors").items()}
with safe_open(f"{root}/case.safetensors", "pt") as f:
    meta = f.metadata()
p, s = float(meta["p"]), float(meta["scaling"])
T, H = c["x"].shape; K = c["experts"].shape[1]; E, twoI, _ = c["gate_up"].shape; I = twoI // 2
r = c["A1"].shape[0] // E


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up_proj = nn.Linear(H, 2 * I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(Expert() for _ in range(E))


class FixedMask(nn.Module):
    """PEFT's lora_dropout[adapter] for one call: x ⊙ (our mask rows of the pairs in this call)."""
    def __init__(self):
        super().__init__(); self.rows = None

    def forward(self, x):
        return x * self.rows


model = Experts().double()
with torch.no_grad():
    for e, ex in enumerate(model.experts):
        ex.gate_up_proj.weight.copy_(c["gate_up"][e]); ex.down_proj.weight.copy_(c["down"][e])
pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=s * r, lora_dropout=p, target_modules=["gate_up_proj", "down_proj"]))
lora = {}
for e in range(E):
    ex = pm.base_model.model.experts[e]
    for name, A, B in (("gate_up_proj", "A1", "B1"), ("down_proj", "A2", "B2")):
        layer = getattr(ex, name)
        assert abs(layer.scaling["default"] - s) < 1e-12
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(c[A][e * r:(e + 1) * r])
            layer.lora_B["default"].weight.copy_(c[B][:, [j * E + e for j in range(r)]])
        layer.lora_dropout["default"] = FixedMask()
        lora[(e, name)] = layer

x = c["x"].clone().requires_grad_(True)
out = torch.zeros(T, H, dtype=torch.float64)
for e in range(E):
    pairs = [t * K + k for t in range(T) for k in range(K) if c["experts"][t, k] == e]
    if not pairs:
        continue
    tokens = torch.tensor([q // K for q in pairs]); idx = torch.tensor(pairs)
    lora[(e, "gate_up_proj")].lora_dropout["default"].rows = c["mask1"][idx]
    lora[(e, "down_proj")].lora_dropout["default"].rows = c["mask2"][idx]
    y = pm.base_model.model.experts[e](x[tokens])
    out = out.index_add(0, tokens, y * c["weights"].reshape(-1)[idx].unsqueeze(1))
loss = (out * c["G"]).sum()
loss.backward()


def fused(kind):
    """Our fused-layout gradient from the per-expert ones: A [r·E, in] expert-major, B [out, r·E] rank-major."""
    A = torch.cat([lora[(e, kind)].lora_A["default"].weight.grad for e in range(E)])
    Bs = [lora[(e, kind)].lora_B["default"].weight.grad for e in range(E)]
    B = torch.stack([Bs[e][:, j] for j in range(r) for e in range(E)], dim=1)
    return A, B


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


dA1, dB1 = fused("gate_up_proj"); dA2, dB2 = fused("down_proj")
print(json.dumps({
    "versions": [torch.__version__, peft.__version__],
    "out": rel(c["out"], out.detach()), "loss": rel(c["loss"].reshape(()), loss.detach()), "dx": rel(c["dx"], x.grad),
    "dA1": rel(c["dA1"], dA1), "dB1": rel(c["dB1"], dB1), "dA2": rel(c["dA2"], dA2), "dB2": rel(c["dB2"], dB2),
}, indent=1))
