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


def mean_and_count(value: torch.Tensor, flag: bool, group) -> torch.Tensor:
    """[mean of a scalar over `group`, number of ranks that raised `flag`] in one all_reduce, left on the
    device (the caller reads it back with whatever else it needs in the same host read)."""
    both = torch.stack([value.detach().to(torch.float32).reshape(()),
                        torch.tensor(float(flag), device=value.device)])
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return both
    dist.all_reduce(both, group=group)
    return both / torch.tensor([dist.get_world_size(group), 1.0], device=both.device)
