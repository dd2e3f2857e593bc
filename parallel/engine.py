"""The training engine behind one small interface: backward, step, state_dict.

This single-process engine is plain PyTorch; the DeepSpeed ZeRO engine for many ranks implements the
same interface, so the training loop does not change when ranks appear.
"""
from __future__ import annotations

import torch

from pretrain.train.optim import build_optimizer


class LocalEngine:
    def __init__(self, model, optim_cfg, *, max_steps: int, grad_accum: int):
        self.model = model
        self.grad_accum = grad_accum
        self.grad_clip = optim_cfg.grad_clip
        self.optimizer, self.scheduler = build_optimizer(model, optim_cfg, max_steps)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> float:
        """Clip, step, zero the gradients; returns the gradient norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def build_engine(model, optim_cfg, parallel_cfg, *, max_steps: int, grad_accum: int) -> LocalEngine:
    world = parallel_cfg.dp * parallel_cfg.cp
    if world != 1:
        raise ValueError(f"parallel.dp x parallel.cp = {world}: multi-rank training is not available yet; "
                         "run with parallel.dp=1 parallel.cp=1")
    return LocalEngine(model, optim_cfg, max_steps=max_steps, grad_accum=grad_accum)
