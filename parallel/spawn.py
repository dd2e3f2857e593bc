"""Run a function on N fresh local processes joined in one process group on 127.0.0.1 and a free port.

The distributed tests (tests/distributed/harness.py) and `liquid bench step` both start their ranks here.
"""
from __future__ import annotations

import os
import queue as queue_mod
import socket
import sys
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, world: int, *args, timeout: float = 300.0, backend: str = "gloo", threads: int = 1,
              stdout_to_stderr: bool = False) -> list:
    """fn(rank, world, *args) on `world` spawned processes after init_process_group(backend); returns every
    rank's return value (which must pickle), by rank. A rank that raises fails the call with its traceback;
    ranks that have not answered within `timeout` seconds fail it with their numbers. Each process runs
    `threads` torch threads; `stdout_to_stderr` sends the ranks' stdout (file descriptor 1 included) to
    stderr, for callers whose own stdout carries a result. fn and args must be importable/picklable."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results_queue = ctx.Queue()
    port = free_port()
    options = {"port": port, "backend": backend, "threads": threads, "stdout_to_stderr": stdout_to_stderr}
    procs = [ctx.Process(target=_entry, args=(rank, world, options, fn, args, results_queue))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    results, error = {}, None
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world and error is None:
            try:
                rank, status, value = results_queue.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue_mod.Empty:
                error = f"no result from ranks {sorted(set(range(world)) - set(results))} after {timeout:g} s"
                break
            if status == "ok":
                results[rank] = value
            else:
                error = f"rank {rank} failed:\n{value}"
    finally:
        for proc in procs:
            proc.join(timeout=5 if error else 30)  # after a failure the others may wait in a collective
            if proc.is_alive():
                proc.kill()
                proc.join()
    if error:
        raise RuntimeError(error)
    return [results[r] for r in range(world)]


def _entry(rank: int, world: int, options: dict, fn, args, results_queue) -> None:
    import torch
    import torch.distributed as dist

    if options["stdout_to_stderr"]:
        os.dup2(2, 1)  # libraries that print (DeepSpeed) write to fd 1 directly
        sys.stdout = sys.stderr
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(options["port"]), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    torch.set_num_threads(options["threads"])
    try:
        if options["backend"] == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(options["backend"], rank=rank, world_size=world)
        results_queue.put((rank, "ok", fn(rank, world, *args)))
    except BaseException:  # every failure goes to the parent, which raises it
        results_queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
