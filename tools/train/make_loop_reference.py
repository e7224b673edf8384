#!/usr/bin/env python3
"""Reference values for the training loop, from transformers and torch themselves.

Writes spec/fixtures/train/loop_reference.json with:
  schedules: transformers.get_scheduler(name, optimizer, num_warmup_steps, num_training_steps)
             for constant_with_warmup / linear / cosine: the lr of every step of a 20-step run
             with 4 warm-up steps and lr 1e-3, read from optimizer.param_groups after each
             scheduler.step() (what the step after it uses);
  adam:      torch.optim.Adam (betas 0.9/0.999, eps 1e-8) on a float32 parameter, fed fixed
             gradients with a changing lr, the parameter after each step;
  clip:      torch.nn.utils.clip_grad_norm_ on fixed gradients for several max_norm values: the
             returned total norm and the clipped gradients.
A spec (spec/train/loop_reference.spec.ts, to be added with the fixture) compares
learningRateAt, Adam and clipByGlobalNorm against it.

Run where torch and transformers are installed (the GPU machine; CPU is enough):
  python3 tools/train/make_loop_reference.py --out spec/fixtures/train/loop_reference.json
"""
import argparse
import json
import os

import torch
import transformers
from transformers import get_scheduler


def schedules():
    out = {}
    for name, hf_name in [('constant', 'constant_with_warmup'), ('linear', 'linear'), ('cosine', 'cosine')]:
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=1e-3)
        sched = get_scheduler(hf_name, opt, num_warmup_steps=4, num_training_steps=20)
        lrs = []
        for _ in range(20):
            lrs.append(opt.param_groups[0]['lr'])  # the lr this step uses
            opt.step()
            sched.step()
        out[name] = {'lr': 1e-3, 'warmup_steps': 4, 'total_steps': 20, 'lrs': lrs}
    return out


def adam():
    p = torch.nn.Parameter(torch.tensor([0.5, -1.5, 2.0], dtype=torch.float32))
    opt = torch.optim.Adam([p], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    grads = [[0.1, -0.2, 0.3], [1.5, 0.5, -0.25], [-0.3, 0.01, 0.7]]
    lrs = [1e-2, 5e-3, 2e-2]
    params = []
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]['lr'] = lr
        p.grad = torch.tensor(g, dtype=torch.float32)
        opt.step()
        params.append(p.detach().tolist())
    return {'initial': [0.5, -1.5, 2.0], 'grads': grads, 'lrs': lrs, 'params': params}


def clip():
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(5, 6, generator=gen), torch.randn(7, generator=gen)]
    cases = []
    for max_norm in [0.5, 2.0, 100.0]:
        ps = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        total = torch.nn.utils.clip_grad_norm_(ps, max_norm)
        cases.append({'max_norm': max_norm, 'norm': float(total), 'clipped': [p.grad.flatten().tolist() for p in ps]})
    return {'grads': [g.flatten().tolist() for g in grads], 'shapes': [list(g.shape) for g in grads], 'cases': cases}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', required=True)
    args = ap.parse_args()
    data = {'transformers': transformers.__version__, 'torch': torch.__version__,
            'schedules': schedules(), 'adam': adam(), 'clip': clip()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(data, f, indent=1)
        f.write('\n')


if __name__ == '__main__':
    main()
