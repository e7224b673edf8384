"""Random-weight bf16 checkpoints with real MoE architectures, written by transformers itself (issue 15 item 3a).

  python3 bench/e2e/make_checkpoints.py --model olmoe --out DIR [--layers N] [--max-shard-size 2GB]
  python3 bench/e2e/make_checkpoints.py --model qwen3 --out DIR [--layers 12]

The configs are the Hub's config.json values, written here by hand (the GPU machine has no network):
  olmoe  allenai/OLMoE-1B-7B-0924 config.json (16 layers, 6.9B parameters, ~14 GB bf16)
  qwen3  Qwen/Qwen3-30B-A3B config.json (48 layers, 30.5B parameters, ~61 GB bf16: more than the GPU
         machine's 64 GB disk holds beside anything else, so 12 layers by default; --layers 48 for all)
--layers N keeps the first N decoder layers (every layer of both is the same MoE layer) and says so.
The model is built on cuda in bf16 with transformers' own init (seed 0) and saved with save_pretrained in
bf16 shards; prints the parameter counts and the seconds, and writes e2e_checkpoint.json beside config.json.
"""
import argparse
import json
import os
import time

# allenai/OLMoE-1B-7B-0924, config.json (transformers' OlmoeConfig keys)
OLMOE_1B_7B_0924 = dict(
    model_type="olmoe", architectures=["OlmoeForCausalLM"],
    vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
    num_attention_heads=16, num_key_value_heads=16, hidden_act="silu", max_position_embeddings=4096,
    initializer_range=0.02, rms_norm_eps=1e-05, use_cache=True, pad_token_id=1, bos_token_id=None,
    eos_token_id=50279, tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=None,
    attention_bias=False, attention_dropout=0.0, clip_qkv=None, num_experts_per_tok=8, num_experts=64,
    output_router_logits=False, router_aux_loss_coef=0.01, norm_topk_prob=False,
)

# Qwen/Qwen3-30B-A3B, config.json (transformers' Qwen3MoeConfig keys)
QWEN3_30B_A3B = dict(
    model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"],
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, hidden_act="silu",
    max_position_embeddings=40960, initializer_range=0.02, rms_norm_eps=1e-06, use_cache=True,
    tie_word_embeddings=False, rope_theta=1000000.0, rope_scaling=None, attention_bias=False,
    use_sliding_window=False, sliding_window=None, max_window_layers=48, attention_dropout=0.0,
    decoder_sparse_step=1, moe_intermediate_size=768, num_experts_per_tok=8, num_experts=128,
    norm_topk_prob=True, output_router_logits=False, router_aux_loss_coef=0.001, mlp_only_layers=[],
    bos_token_id=151643, eos_token_id=151645,
)

MODELS = {"olmoe": (OLMOE_1B_7B_0924, 16), "qwen3": (QWEN3_30B_A3B, 12)}


def config_values(name, layers):
    """The Hub config with `layers` decoder layers; rope_theta as transformers 5's rope_parameters."""
    values = dict(MODELS[name][0])
    full = values["num_hidden_layers"]
    if not 1 <= layers <= full:
        raise SystemExit(f"--layers must be in [1, {full}] for {name} but got {layers}")
    values["num_hidden_layers"] = layers
    if "max_window_layers" in values:
        values["max_window_layers"] = layers
    theta = values.pop("rope_theta")
    values.pop("rope_scaling")
    values["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
    return values, full


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), required=True)
    ap.add_argument("--out", required=True, help="folder to write (created; must be empty or missing)")
    ap.add_argument("--layers", type=int, help="decoder layers to keep (default: olmoe all 16, qwen3 12 of 48)")
    ap.add_argument("--max-shard-size", default="2GB")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run with a small --layers")
    a = ap.parse_args()
    if os.path.isdir(a.out) and os.listdir(a.out):
        raise SystemExit(f"--out {a.out} is not empty")

    values, full = config_values(a.model, a.layers or MODELS[a.model][1])
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    layers = values["num_hidden_layers"]
    if layers < full:
        print(f"{a.model}: {layers} of the real model's {full} decoder layers (--layers {layers})", flush=True)
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    config.dtype = torch.bfloat16
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(a.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if a.device == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    expert_params = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    print(f"{type(model).__name__}: {params / 1e9:.3f} B parameters ({expert_params / 1e9:.3f} B in routed experts), "
          f"built on {a.device} in {build_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    model.save_pretrained(a.out, max_shard_size=a.max_shard_size)
    save_s = time.perf_counter() - t0
    size = sum(os.path.getsize(os.path.join(a.out, f)) for f in os.listdir(a.out))
    info = dict(model=a.model, model_type=model_type, source=("allenai/OLMoE-1B-7B-0924" if a.model == "olmoe" else "Qwen/Qwen3-30B-A3B"),
                layers=layers, full_layers=full, params=params, expert_params=expert_params, bytes=size,
                build_seconds=build_s, save_seconds=save_s, versions=[torch.__version__, transformers.__version__],
                class_name=type(model).__name__)
    with open(os.path.join(a.out, "e2e_checkpoint.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(f"saved {size / 1e9:.2f} GB to {a.out} in {save_s:.1f} s", flush=True)
    print(json.dumps(info), flush=True)


if __name__ == "__main__":
    main()
