"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedule (linear warmup, then
cosine, constant or warmup-stable-decay)."""
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


DECAY_SHAPES = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "1-sqrt": lambda p: 1.0 - math.sqrt(p),
}


def wsd_decay_start(optim_cfg, max_steps: int) -> int:
    """The step where a wsd schedule's decay begins: optim.decay_start_step, or the last
    optim.decay_fraction of max_steps (never inside the warmup)."""
    if optim_cfg.decay_start_step is not None:
        return max(optim_cfg.decay_start_step, optim_cfg.warmup_steps)
    return max(max_steps - round(optim_cfg.decay_fraction * max_steps), optim_cfg.warmup_steps)


def lr_lambda(optim_cfg, max_steps: int):
    """Multiplier of optim.lr at a step (0-based: the step about to be taken): linear warmup, then
    - cosine: down to min_lr_ratio at max_steps;
    - constant: 1;
    - wsd (warmup-stable-decay): 1 until the decay start (`wsd_decay_start`), then down to min_lr_ratio at
      max_steps in optim.decay_shape. Only the decay start and max_steps shape it, so a resume that raises
      max_steps before the decay has begun extends the stable phase without a jump, and a resume with
      optim.decay_start_step = its step starts the decay there."""
    warmup = max(optim_cfg.warmup_steps, 0)
    low = optim_cfg.min_lr_ratio
    decay_start = wsd_decay_start(optim_cfg, max_steps) if optim_cfg.schedule == "wsd" else warmup
    shape = DECAY_SHAPES[optim_cfg.decay_shape if optim_cfg.schedule == "wsd" else "cosine"]

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if optim_cfg.schedule == "constant" or step < decay_start:
            return 1.0
        progress = min((step - decay_start) / max(max_steps - decay_start, 1), 1.0)
        return low + (1 - low) * shape(progress)

    return fn


def _fused_ok(groups) -> bool:
    """torch's fused AdamW (one kernel over all tensors instead of ~8 ops per parameter; the same update
    up to the last bits) where it has one: floating parameters, all on the CPU or all on one CUDA device."""
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    return bool(params) and len(devices) == 1 and devices <= {"cpu", "cuda"} and all(p.is_floating_point() for p in params)


def build_optimizer(model, optim_cfg, max_steps: int, *, master: dict | None = None):
    """AdamW over the model's groups and its schedule; `master` maps a parameter to the tensor the
    optimizer updates in its place (an fp32 master copy of a bf16 weight)."""
    master = master or {}
    groups = [{**g, "params": [master.get(p, p) for p in g["params"]]}
              for g in param_groups(model, optim_cfg.weight_decay)]
    opt = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps,
                            fused=_fused_ok(groups))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim_cfg, max_steps))
    return opt, sched
