"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule (warmup + cosine)."""
from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; norms, biases, per-head rates and conv taps do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.dim() >= 2 and "conv" not in name
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(optim_cfg, max_steps: int):
    """Multiplier of optim.lr at a step: linear warmup, then cosine down to min_lr_ratio (or constant)."""
    warmup = max(optim_cfg.warmup_steps, 0)

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim_cfg.schedule == "constant":
            return 1.0
        progress = min((step - warmup) / max(max_steps - warmup, 1), 1.0)
        return optim_cfg.min_lr_ratio + (1 - optim_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_optimizer(model, optim_cfg, max_steps: int, *, master: dict | None = None):
    """AdamW over the model's groups and its schedule; `master` maps a parameter to the tensor the
    optimizer updates in its place (an fp32 master copy of a bf16 weight)."""
    master = master or {}
    groups = [{**g, "params": [master.get(p, p) for p in g["params"]]}
              for g in param_groups(model, optim_cfg.weight_decay)]
    opt = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim_cfg, max_steps))
    return opt, sched
