"""The driver of `liquid pretrain`: run the per-rank entry point in this process, or as a Ray Train worker group.

Ray starts a local cluster on demand (`ray.init()` with no address; the dashboard stays on 127.0.0.1)
or joins `cluster.address`. One worker per rank; rank 0 writes metrics.jsonl, which the driver follows
to print one progress line for the whole job.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from pretrain.config import config_from_yaml, to_yaml


def use_ray(cfg) -> bool:
    c = cfg.cluster
    return c.launcher == "ray" or (c.launcher == "auto" and (c.num_workers > 1 or c.address is not None))


def _ray_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker; the process group is already initialised by TorchTrainer."""
    from pretrain.train.worker import train_main

    train_main(config_from_yaml(loop_config["config_yaml"]), progress=False)


class _MetricsFollower(threading.Thread):
    """Prints each new line of rank 0's metrics.jsonl as a progress line, while the workers run."""

    def __init__(self, path: Path, printer):
        super().__init__(daemon=True)
        self.path, self.printer = path, printer
        self.stop = threading.Event()

    def run(self):
        offset = 0
        while not self.stop.is_set():
            offset = self._drain(offset)
            self.stop.wait(0.5)
        self._drain(offset)

    def _drain(self, offset: int) -> int:
        if not self.path.exists():
            return offset
        with self.path.open() as fh:
            fh.seek(offset)
            for line in fh:
                if line.endswith("\n"):
                    self.printer(json.loads(line))
                    offset += len(line)
        return offset


def launch_ray(cfg, printer) -> dict:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.cluster
    if not ray.is_initialized():
        ray.init(address=c.address, dashboard_host="127.0.0.1", log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONUNBUFFERED": "1"}})
    run_dir = Path(cfg.run.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = run_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    follower = _MetricsFollower(metrics, printer)
    follower.start()
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config_yaml": to_yaml(_absolute_run_dir(cfg, run_dir))},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker}),
        run_config=RunConfig(name=f"{cfg.run.name}-{int(time.time())}", storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=c.max_failures)),
    )
    try:
        trainer.fit()
    finally:
        follower.stop.set()
        follower.join()
    return json.loads((run_dir / "summary.json").read_text())


def _absolute_run_dir(cfg, run_dir: Path):
    """Workers may start in another directory: give them the absolute run directory."""
    import dataclasses

    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)))


def launch(cfg, printer=None) -> dict:
    """Train with `cfg`; returns the run summary written by rank 0."""
    from pretrain.train.metrics import ProgressPrinter
    from pretrain.train.worker import train_main

    printer = printer or ProgressPrinter(max_steps=cfg.train.max_steps, stream=sys.stdout)
    if use_ray(cfg):
        return launch_ray(cfg, printer)
    return train_main(cfg, progress=True)
