"""Automatic recovery on a real Ray cluster: a worker is SIGKILLed, later another one hangs (SIGSTOP); each
time Ray Train restarts the worker group, which resumes from the newest checkpoint without a human, and
the job's loss curve equals an uninterrupted run's (same topology: bitwise on the CPU)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.distributed.harness import run_distributed

CONFIG = ["parallel.dp=2", "parallel.ep=2", "cluster.num_workers=2", "train.max_steps=30", "train.log_interval=1",
          "train.seq_len=64", "train.global_batch_size=8", "train.micro_batch_size=2", "train.threads=1",
          "data.corpus_max_mb=0.5", "data.tokenizer_vocab_size=512", "model.vocab_size=512",
          "checkpoint.interval=5", "checkpoint.keep_last=0", "checkpoint.export=false"]


def _uninterrupted(rank, world, overrides, cache):
    os.environ["LIQUID_CACHE"] = cache
    from pretrain.config import load_config
    from pretrain.train.worker import train_main

    return train_main(load_config("tiny", overrides), progress=False)["steps"]


def _losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _worker(run_dir: Path, rank: int) -> dict | None:
    try:
        return json.loads((run_dir / "workers" / f"rank{rank}.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _wait_for(predicate, what: str, proc, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"the job ended while waiting for {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_and_hung_workers_recover_from_the_newest_checkpoint(tmp_path):
    cache = str(tmp_path / "cache")
    reference = tmp_path / "reference"
    run_distributed(_uninterrupted, 2, CONFIG + [f"run.dir={reference}"], cache, timeout=600)

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pretrain.cli", "pretrain", "tiny", f"run.dir={run_dir}", *CONFIG,
            "cluster.launcher=ray", "cluster.max_failures=2", "cluster.collective_timeout_s=10"]
    env = {**os.environ, "LIQUID_CACHE": cache, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
           # Ray Train waits this long for the process group of a group with a hung (stopped) worker to shut
           # down before restarting it (30 s by default; the stopped worker never answers), and polls its
           # workers this often (2 s by default): the restarts come sooner, nothing else changes.
           "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        ckpts = run_dir / "checkpoints"
        # 1. A worker dies: SIGKILL rank 1 once the first checkpoint exists.
        _wait_for(lambda: (ckpts / "step_00000005").exists(), "the first checkpoint", proc)
        first = _wait_for(lambda: _worker(run_dir, 1), "rank 1's status file", proc)
        os.kill(first["pid"], signal.SIGKILL)
        # 2. The restarted group resumes; then rank 1 hangs: its peer's collective times out.
        restarted = _wait_for(lambda: (w := _worker(run_dir, 1)) and w["pid"] != first["pid"]
                              and w["status"] == "running" and w, "the restarted rank 1", proc)
        assert restarted["start_step"] >= 5
        _wait_for(lambda: (ckpts / "step_00000015").exists(), "a checkpoint after the restart", proc)
        os.kill(restarted["pid"], signal.SIGSTOP)
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-5000:]
    final = _worker(run_dir, 1)
    assert final["status"] == "finished" and final["pid"] not in (first["pid"], restarted["pid"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed_from"] is not None and summary["start_step"] >= 15, summary
    # Every step was trained, and each loss equals the uninterrupted run's.
    got, want = _losses(run_dir), _losses(reference)
    assert sorted(got) == list(range(1, 31))
    assert got == want
