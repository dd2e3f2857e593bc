import torch
import torch.distributed as dist

from tests.distributed.harness import run_distributed


def _all_reduce(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_two_real_processes_all_reduce():
    assert run_distributed(_all_reduce, 2) == [3.0, 3.0]
