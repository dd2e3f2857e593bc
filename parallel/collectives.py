"""Small reductions the training loop needs for metrics and balancing, no-ops without a process group."""
from __future__ import annotations

import torch
import torch.distributed as dist


def mean_over(value: torch.Tensor, group) -> torch.Tensor:
    """The mean of a scalar tensor over `group` (the value itself when group is None)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return value / dist.get_world_size(group)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def mean_and_any(value: torch.Tensor, flag: bool, group) -> tuple[torch.Tensor, bool]:
    """The mean of a scalar over `group` and whether any rank raised `flag`, in one all_reduce (the loop
    already reduces the loss every step; a stop request rides along)."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return value, flag
    both = torch.stack([value.detach().to(torch.float32).reshape(()),
                        torch.tensor(float(flag), device=value.device)])
    dist.all_reduce(both, group=group)
    return both[0] / dist.get_world_size(group), bool(both[1] > 0)
