"""The driver of `liquid pretrain`: run the per-rank entry point in this process, or as a Ray Train worker group.

Ray starts a new local cluster on demand, listening on 127.0.0.1 only (cluster/safety.py), joins
`cluster.address` (`auto`: the cluster `ray start` made on this machine), or, inside a Ray job, the job's
cluster. One worker per rank; rank 0 writes metrics.jsonl, which the driver follows
to print one progress line for the whole job.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

from checkpoints.manager import resume_target
from checkpoints.manifest import read_manifest
from pretrain.config import ENV_SWITCHES, config_from_yaml, to_yaml
from pretrain.run_dir import RunDir


def use_ray(cfg) -> bool:
    c = cfg.cluster
    return c.launcher == "ray" or (c.launcher == "auto" and (c.num_workers > 1 or c.address is not None))


def _ray_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker; the process group is already initialised by TorchTrainer.
    After a worker failure Ray runs it again on a new worker group, which resumes from the newest
    checkpoint of this launch."""
    from pretrain.train.worker import train_main

    train_main(config_from_yaml(loop_config["config_yaml"]), progress=False, launch_id=loop_config["launch_id"],
               node=_node_facts())


def _node_facts() -> dict:
    """The Ray node this worker runs on, for its status file and the expert-group placement check (the
    training code below this layer does not import Ray)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


class _MetricsFollower(threading.Thread):
    """Prints each new record of rank 0's metrics.jsonl as a progress line, while the workers run.

    A restarted worker group rewrites the file (keeping the records up to its checkpoint): the follower
    notices the new file and goes on from the last step it printed."""

    def __init__(self, path: Path, printer, *, after_step: int = 0):
        super().__init__(daemon=True)
        self.path, self.printer = path, printer
        self.stop = threading.Event()
        self.last_step, self._inode, self._offset = after_step, None, 0

    def run(self):
        while not self.stop.is_set():
            self._drain()
            self.stop.wait(0.5)
        self._drain()

    def _drain(self) -> None:
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return
        with fh:
            inode = os.fstat(fh.fileno()).st_ino
            if inode != self._inode:
                self._inode, self._offset = inode, 0
            fh.seek(self._offset)
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                self._offset += len(line)
                record = json.loads(line)
                if record["step"] > self.last_step:
                    self.last_step = record["step"]
                    self.printer(record)


# The environment of every Ray worker process. RAY_TRAIN_ENABLE_PRINT_PATCH=0: Ray Train's workers otherwise
# send every print() both to the stream and to the root logger, and the driver shows each line twice.
WORKER_ENV = {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
HEALTH_CHECK_ENV = "RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S"  # = cluster.collective_timeout_s


def init_ray(cfg) -> None:
    """Start or join Ray (once). Called before the driver installs its SIGTERM handler: ray.init() installs
    its own, which would replace ours."""
    import ray

    c = cfg.cluster
    if ray.is_initialized():
        return
    # A hung worker fails the job's attempt within collective_timeout_s two ways: its peers' collectives
    # time out (the process group's timeout), and Ray Train's controller stops waiting for its status.
    hang = {HEALTH_CHECK_ENV: str(c.collective_timeout_s)}
    os.environ.update(hang)  # read by the train controller of a local cluster started here
    from cluster.safety import ray_init_kwargs

    # cluster.address: join it; inside a Ray job: its cluster (RAY_ADDRESS); else a new local cluster
    # whose every process listens on 127.0.0.1 only.
    ray.init(**ray_init_kwargs(c.address), log_to_driver=True,
             runtime_env={"env_vars": {**WORKER_ENV, **hang, **forwarded_switches()}})


def forwarded_switches(environ=None) -> dict:
    """The ENV_SWITCHES set in this driver's environment: every worker, on any node, must see them (a node
    on another scan or attention path would train differently or hang in a collective). Inside a Ray job
    those the job's runtime env sets already reach every worker, and Ray refuses a key set twice."""
    environ = os.environ if environ is None else environ
    job = json.loads(environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    given = job.get("env_vars") or {}
    return {k: environ[k] for k in ENV_SWITCHES if k in environ and k not in given}


def launch_ray(cfg, printer) -> dict:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.safety import is_loopback
    from cluster.torch_backend import torch_config

    c = cfg.cluster
    init_ray(cfg)
    # The local cluster started here (no cluster.address, no RAY_ADDRESS) listens on 127.0.0.1 only: so does
    # the process group's rendezvous store (rank 0's TCPStore). Any other cluster: Ray's TorchConfig.
    loopback = (not c.address and not os.environ.get("RAY_ADDRESS")
                and is_loopback(ray.util.get_node_ip_address()))
    run = RunDir(Path(cfg.run.dir).resolve())
    run_dir = run.path
    run_dir.mkdir(parents=True, exist_ok=True)
    # Fail fast, before any worker starts, on the structure only: the workers hash the files, each a share.
    start = resume_target(run_dir, cfg.checkpoint.resume, checksums=False)
    follower = _MetricsFollower(run.metrics_file, printer, after_step=_step_of(start))
    follower.start()
    launch_id = uuid.uuid4().hex
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config_yaml": to_yaml(_absolute_run_dir(cfg, run_dir)), "launch_id": launch_id},
        torch_config=torch_config("nccl" if c.use_gpu else "gloo", int(c.collective_timeout_s), loopback=loopback),
        # One bundle per worker in a placement group; PACK fills a node before the next, and Ray Train gives
        # the workers of a node consecutive ranks, so expert-parallel groups (consecutive ranks) stay
        # inside a node when each node holds a multiple of parallel.ep workers. Rank 0's node hosts the
        # process-group rendezvous (MASTER_ADDR).
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker},
                                     placement_strategy=c.placement_strategy),
        run_config=RunConfig(name=f"{cfg.run.name}-{int(time.time())}", storage_path=str(run.ray_dir),
                             failure_config=FailureConfig(max_failures=c.max_failures)),
    )
    try:
        trainer.fit()
    finally:
        follower.stop.set()
        follower.join()
    summary = run.read_summary()
    if summary is None:
        raise RuntimeError(f"the workers finished without writing {run.summary_file}")
    return summary


def _step_of(ckpt: Path | None) -> int:
    return read_manifest(ckpt)["step"] if ckpt is not None else 0


def _absolute_run_dir(cfg, run_dir: Path):
    """Workers may start in another directory: give them the absolute run directory."""
    import dataclasses

    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=str(run_dir)))


class _StopOnSignal:
    """SIGTERM (a `ray job stop`, a scheduler's preemption notice) or a first Ctrl-C asks the workers to save
    a checkpoint and exit at their next step; a second Ctrl-C interrupts at once."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.previous, self.requested = run_dir, {}, False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        RunDir(self.run_dir).request_stop(signal.Signals(signum).name)
        print(f"{signal.Signals(signum).name}: stopping at the next step after a checkpoint "
              "(Ctrl-C again to interrupt at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def launch(cfg, printer=None) -> dict:
    """Train with `cfg`; returns the run summary written by rank 0."""
    from pretrain.train.metrics import ProgressPrinter
    from pretrain.train.worker import train_main

    printer = printer or ProgressPrinter(max_steps=cfg.train.max_steps, max_tokens=cfg.train.max_tokens,
                                         stream=sys.stdout)
    if use_ray(cfg):
        init_ray(cfg)  # first: its SIGTERM handler must not replace the one below
    with _StopOnSignal(Path(cfg.run.dir)):
        if use_ray(cfg):
            return launch_ray(cfg, printer)
        return train_main(cfg, progress=True, launch_id=uuid.uuid4().hex)
