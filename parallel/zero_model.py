"""ZeRO-1/2 memory as DeepSpeed lays it out on one rank, behind the engine interface (backward, step,
grad_accum, model), on whatever tensors the model holds: `liquid dryrun` runs it on fake tensors, where
DeepSpeed's own engine (real flat buffers, real collectives at initialize) cannot run.

What it allocates, per optimizer group of the real engine (`parallel.engine._optimizer_groups`: decay /
no-decay, dense / expert), as DeepSpeed's stage_1_and_2 optimizer does:
- the group's weights in the training dtype (bf16 in DeepSpeed's bf16 mode: the model's own tensors);
- one partition of the flat group, padded to a multiple of the group's data-parallel size (dp x cp for
  dense groups, the expert-data-parallel size for expert groups), as fp32 master weights, and Adam's
  exp_avg and exp_avg_sq of the same size (created by the first step);
- gradients: stage 1 keeps every parameter's gradient (training dtype) until the step; stage 2 keeps
  only this rank's partition of them (a flat buffer per group), each parameter's gradient freed once it
  is reduced; at the step, the partition's fp32 gradient;
- one reduction bucket in the gradient dtype, of the size the real engine configures
  (`parallel.engine.reduce_bucket_elements`); DeepSpeed allocates all of it.
The numbers the optimizer computes are not DeepSpeed's (no collective runs): only the memory is modeled.
"""
from __future__ import annotations

import math

import torch

from parallel.engine import _optimizer_groups, expert_group_name, expert_parameters, reduce_bucket_elements


class ModeledZeroEngine:
    def __init__(self, model, optim_cfg, topology, *, zero_stage: int, dtype=None, grad_accum: int = 1):
        if zero_stage not in (1, 2):
            raise ValueError(f"config key 'parallel.zero_stage': the modeled engine covers ZeRO 1 and 2, got {zero_stage}")
        self.model, self.grad_accum, self.zero_stage = model, grad_accum, zero_stage
        self.grad_clip = optim_cfg.grad_clip
        if dtype is not None:
            for p in model.parameters():
                p.data = p.data.to(dtype)
        groups = _optimizer_groups(model, optim_cfg, expert_parameters(model), expert_group_name(topology.ep))
        device = next(model.parameters()).device
        grad_dtype = next(model.parameters()).dtype
        self.partition_elements, self.masters = [], []
        for group in groups:
            ranks = topology.expert_dp if group.get("moe") else topology.world
            numel = sum(p.numel() for p in group["params"])
            part = math.ceil(numel / ranks)
            self.partition_elements.append(part)
            self.masters.append(torch.zeros(part, dtype=torch.float32, device=device))
        self.optimizer = torch.optim.AdamW(
            [{"params": [m], "weight_decay": g["weight_decay"]} for m, g in zip(self.masters, groups)],
            lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)
        bucket = reduce_bucket_elements(sum(p.numel() for p in model.parameters()))
        self.bucket = torch.empty(bucket, dtype=grad_dtype, device=device)
        self.grad_partitions = []
        if zero_stage == 2:
            self.grad_partitions = [torch.zeros(part, dtype=grad_dtype, device=device)
                                    for part in self.partition_elements]
            for p in model.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(_free_grad)

    def persistent(self) -> dict[str, list[torch.Tensor]]:
        """The tensors the engine keeps between steps, by memory line (the dry run registers them)."""
        return {"optimizer": list(self.masters), "gradients": list(self.grad_partitions),
                "communication": [self.bucket]}

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> torch.Tensor:
        for master in self.masters:  # the partition's fp32 gradient, built for the step
            master.grad = torch.zeros_like(master)
        norm = torch.nn.utils.clip_grad_norm_(self.masters, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for p in self.model.parameters():
            p.grad = None
        return norm.detach()


def _free_grad(p) -> None:
    """Stage 2: the gradient went into the bucket and this rank's partition; the full one is freed."""
    p.grad = None
