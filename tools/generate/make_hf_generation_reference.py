#!/usr/bin/env python3
"""Reference generations from Hugging Face transformers (and PEFT), for a generation parity spec.

Not run yet: this machine has no torch. Run once on the GPU machine (transformers 5.17, peft 0.21,
torch 2.11, float32, TF32 off), from the repository root:

  python3 tools/generate/make_hf_generation_reference.py --out spec/fixtures/generate/hf_generation.json

It writes one JSON file:

  models[arch]  for each whole-model fixture spec/fixtures/hf/<arch> (mixtral, qwen2_moe, qwen3_moe,
                olmoe) and 'mixtral_window' (the mixtral fixture with sliding_window 4, so a
                12-token prompt reaches past it):
      prompt: the 12 prompt ids; greedy: the 12 new ids of model.generate(do_sample=False,
      use_cache=True) with no EOS; greedy_no_cache: the same with use_cache=False (transformers'
      own cache check); step_logits: the raw logits [12, vocab] of each step (output_logits);
      adapter_greedy: the new ids with spec/fixtures/hf/<arch>/adapter applied (PeftModel), where
      the fixture has one.
  warpers: fixed float32 logits rows and, for each (temperature, top_k, top_p) case, the scores
      after TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper in transformers' order
      (computed in float64; -inf as null).

The spec to add with it (spec/generate/hf_parity.spec.ts): for each model, generate(model, prompt,
{maxNewTokens: 12, eosTokenIds: []}) gives `greedy` token by token, the cached step logits match
`step_logits` within 1e-4 relative, loadPeftAdapter + generate gives `adapter_greedy`, and
processLogits gives the `warpers` scores within 1e-12.
"""
import argparse
import json
import os

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
)

FIXTURES = 'spec/fixtures/hf'
ARCHS = ['mixtral', 'qwen2_moe', 'qwen3_moe', 'olmoe', 'deepseek_v3', 'glm4_moe', 'gpt_oss']
NEW_TOKENS = 12
PROMPT = [5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 14, 50]  # ids < 97, the fixtures' vocabulary
WARPER_LOGITS = [[0.31, -1.7, 2.24, 0.05, 1.12, -0.43, 3.01, -2.6, 0.88, 1.57, -0.09, 2.63],
                 [1.0, 2.0, 2.0, 3.0, 0.0, -1.0, 2.0, 0.5, 0.5, -4.0, 1.5, 2.5]]
WARPER_CASES = [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.8), (0.5, 4, 0.9), (1.3, 7, 0.6),
                (2.0, 50, 0.3), (1.0, 1, 1.0), (0.9, 12, 0.999), (3.0, 3, 0.05), (0.25, 0, 0.95)]


def load(folder, config_changes=None):
    config = AutoConfig.from_pretrained(folder)
    for k, v in (config_changes or {}).items():
        setattr(config, k, v)
    model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                 attn_implementation='eager').eval()
    return model


def greedy(model, use_cache):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             use_cache=use_cache, eos_token_id=None, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, len(PROMPT):].tolist()
    logits = [step[0].double().tolist() for step in out.logits]
    return new, logits


def model_reference(arch, folder, config_changes=None):
    model = load(folder, config_changes)
    new, logits = greedy(model, True)
    new_no_cache, _ = greedy(model, False)
    ref = {'prompt': PROMPT, 'greedy': new, 'greedy_no_cache': new_no_cache, 'step_logits': logits,
           'config_changes': config_changes or {}}
    adapter = os.path.join(folder, 'adapter')
    if os.path.isdir(adapter):
        from peft import PeftModel
        peft_model = PeftModel.from_pretrained(load(folder, config_changes), adapter).eval()
        ref['adapter_greedy'], _ = greedy(peft_model, True)
    return ref


def warper_reference():
    cases = []
    for row in WARPER_LOGITS:
        logits = torch.tensor([row], dtype=torch.float32).double()
        for t, k, p in WARPER_CASES:
            scores = logits.clone()
            ids = torch.zeros((1, 1), dtype=torch.long)
            if t != 1.0:
                scores = TemperatureLogitsWarper(t)(ids, scores)
            if k != 0:
                scores = TopKLogitsWarper(k)(ids, scores)
            if p < 1.0:
                scores = TopPLogitsWarper(p)(ids, scores)
            cases.append({'logits': row, 'temperature': t, 'top_k': k, 'top_p': p,
                          'scores': [None if v == float('-inf') else v for v in scores[0].tolist()]})
    return cases


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', required=True)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    models = {arch: model_reference(arch, os.path.join(FIXTURES, arch)) for arch in ARCHS
              if os.path.isdir(os.path.join(FIXTURES, arch))}
    models['mixtral_window'] = model_reference('mixtral', os.path.join(FIXTURES, 'mixtral'), {'sliding_window': 4})
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w', encoding='utf-8') as f:
        json.dump({'versions': {'transformers': transformers.__version__, 'torch': torch.__version__},
                   'new_tokens': NEW_TOKENS, 'models': models, 'warpers': warper_reference()}, f)
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
