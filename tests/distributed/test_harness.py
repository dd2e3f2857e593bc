import pytest
import torch
import torch.distributed as dist

from parallel.spawn import run_ranks
from tests.distributed.harness import run_distributed


def _all_reduce(rank, world):
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _fail_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


def _hang_on_rank_1(rank, world):
    if rank == 1:
        import time

        time.sleep(600)
    return rank


def _print_and_count_threads(rank, world):
    print("printed by a rank")
    return torch.get_num_threads()


def test_two_real_processes_all_reduce():
    assert run_distributed(_all_reduce, 2) == [3.0, 3.0]


def test_a_failing_rank_raises_its_traceback():
    with pytest.raises(RuntimeError, match="(?s)rank 1 failed:.*ValueError: rank one is broken"):
        run_distributed(_fail_on_rank_1, 2)


def test_a_silent_rank_is_named_after_the_timeout():
    with pytest.raises(RuntimeError, match=r"no result from ranks \[(0, )?1\] after 20 s"):
        run_ranks(_hang_on_rank_1, 2, timeout=20)


def test_threads_per_rank_and_stdout_sent_to_stderr(capfd):
    assert run_ranks(_print_and_count_threads, 2, threads=2, stdout_to_stderr=True) == [2, 2]
    captured = capfd.readouterr()
    assert "printed by a rank" not in captured.out
    assert captured.err.count("printed by a rank") == 2
