"""Run a test body on N real processes joined in a gloo (CPU) or NCCL (CUDA) process group.

`run_distributed(fn, world_size, *args)` calls fn(rank, world_size, *args) in each process through
`parallel.spawn.run_ranks` and returns every rank's return value (which must pickle). An exception on any
rank fails the call with that rank's traceback.
"""
from __future__ import annotations

import os

import torch

from parallel.spawn import free_port, run_ranks

__all__ = ["backend", "free_port", "run_distributed"]


def backend(world_size: int | None = None) -> str:
    """NCCL when LIQUID_TEST_NCCL=1 and there is a GPU per rank (world_size; inside a rank, its WORLD_SIZE),
    else gloo."""
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("LIQUID_TEST_NCCL") == "1" and torch.cuda.is_available() and torch.cuda.device_count() >= world:
        return "nccl"
    return "gloo"


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0):
    return run_ranks(fn, world_size, *args, timeout=timeout, backend=backend(world_size))
