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
from pretrain.run_dir import JsonlTail, RunDir


def use_ray(cfg) -> bool:
    c = cfg.cluster
    return c.launcher == "ray" or (c.launcher == "auto" and (c.num_workers > 1 or c.address is not None))


def _ray_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker; the process group is already initialised by TorchTrainer.
    After a worker failure Ray runs it again on a new worker group, which resumes from the newest
    checkpoint of this launch."""
    from pretrain.train.worker import train_main

    record = loop_config.get("record_yaml")
    train_main(config_from_yaml(loop_config["config_yaml"]), progress=False, launch_id=loop_config["launch_id"],
               record_cfg=config_from_yaml(record) if record else None,
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
        self.last_step, self._tail = after_step, JsonlTail(path)

    def run(self):
        while not self.stop.is_set():
            self._drain()
            self.stop.wait(0.5)
        self._drain()

    def _drain(self) -> None:
        for record in self._tail.read()[1]:
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


def launch_ray(cfg, printer, stop: "_StopOnSignal | None" = None) -> dict:
    import ray

    from cluster.safety import is_loopback

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
    try:
        if c.min_workers is not None:
            return _Elastic(cfg, run, launch_id=launch_id, loopback=loopback, stop=stop).run()
        _trainer(cfg, run, launch_id=launch_id, loopback=loopback).fit()
    finally:
        follower.stop.set()
        follower.join()
    summary = run.read_summary()
    if summary is None:
        raise RuntimeError(f"the workers finished without writing {run.summary_file}")
    return summary


def _trainer(cfg, run: RunDir, *, launch_id: str, loopback: bool, elastic: bool = False, record=None):
    """One TorchTrainer: cluster.num_workers workers running `_ray_worker`. Ray Train restarts the group at most
    cluster.max_failures times; an elastic attempt (`elastic`) is never restarted by Ray Train: any failure
    ends fit() and the elastic driver (_Elastic) decides the size of what follows. `record`: the config the
    run directory keeps (an elastic attempt's is the job's, at its full size, so `liquid resume` after a
    lost driver starts elastic at the full size again)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.torch_backend import torch_config

    c = cfg.cluster
    failure = (FailureConfig(max_failures=c.max_failures) if not elastic else
               # every kind of failure ends the attempt: a worker's, a worker group that cannot start
               # (resources gone since the size was chosen), a preempted node
               FailureConfig(max_failures=0, controller_failure_limit=0, max_preemption_failures=0))
    return TorchTrainer(
        _ray_worker,
        train_loop_config={"config_yaml": to_yaml(_absolute_run_dir(cfg, run.path)), "launch_id": launch_id,
                           "record_yaml": to_yaml(_absolute_run_dir(record, run.path)) if record else None},
        torch_config=torch_config("nccl" if c.use_gpu else "gloo", int(c.collective_timeout_s), loopback=loopback),
        # One bundle per worker in a placement group; PACK fills a node before the next, and Ray Train gives
        # the workers of a node consecutive ranks, so expert-parallel groups (consecutive ranks) stay
        # inside a node when each node holds a multiple of parallel.ep workers. Rank 0's node hosts the
        # process-group rendezvous (MASTER_ADDR).
        scaling_config=ScalingConfig(num_workers=c.num_workers, use_gpu=c.use_gpu,
                                     resources_per_worker={"CPU": c.cpus_per_worker},
                                     placement_strategy=c.placement_strategy),
        run_config=RunConfig(name=f"{cfg.run.name}-{int(time.time())}", storage_path=str(run.ray_dir),
                             failure_config=failure),
    )


# ---- elastic training (cluster.min_workers) ----------------------------------------------------------------


def worker_resources(cluster_cfg) -> dict:
    """What one worker reserves on a node (its placement-group bundle)."""
    need = {"CPU": float(cluster_cfg.cpus_per_worker)}
    if cluster_cfg.use_gpu:
        need["GPU"] = 1.0
    return need


def worker_slots(available_per_node: dict, need: dict) -> int:
    """How many workers the nodes' available resources hold (a worker's bundle must fit on one node)."""
    need = {k: v for k, v in need.items() if v > 0}
    if not need:
        return 0
    return sum(min(int(avail.get(k, 0.0) / v + 1e-9) for k, v in need.items())
               for avail in available_per_node.values())


def choose_size(sizes: list[int], capacity: int) -> int | None:
    """The largest allowed size (`pretrain.config.elastic_sizes`) that `capacity` workers hold; None if none."""
    return max((n for n in sizes if n <= capacity), default=None)


def _available_per_node() -> dict:
    """{node id: available resources} of the cluster's live nodes (Ray's developer API; the total view as a
    fallback: then a worker is assumed to fit wherever resources are free)."""
    import ray

    try:
        from ray._private.state import available_resources_per_node

        return available_resources_per_node()
    except Exception:  # noqa: BLE001 - an older or newer Ray without it
        return {"cluster": ray.available_resources()}


def _live_placement_groups() -> dict:
    """{id: info} of the cluster's placement groups that still hold or wait for resources."""
    from ray.util import placement_group_table

    return {pg_id: info for pg_id, info in placement_group_table().items() if info.get("state") != "REMOVED"}


def _say(text: str) -> None:
    print(f"elastic: {text}", flush=True)


class _GrowWatch(threading.Thread):
    """While an attempt runs below the full size: every cluster.resize_check_s, once all its workers are in
    the training loop, count the workers the cluster holds (the free slots plus this attempt's own); when a
    larger allowed size fits, ask the workers to save a checkpoint and stop (RunDir.request_stop) so the
    driver can start the next attempt at that size."""

    def __init__(self, run: RunDir, *, size: int, sizes: list[int], need: dict, every_s: float, since: float):
        super().__init__(daemon=True, name="liquid-elastic-grow")
        self.rundir, self.size, self.sizes, self.need, self.every_s, self.since = run, size, sizes, need, every_s, since
        self.done = threading.Event()
        self.target: int | None = None  # the size that fits, once a stop was requested for it

    def running(self) -> bool:
        """Every worker of this attempt reported `running` (so its resources are reserved: they are not free)."""
        found = {w["rank"]: w for _, w in self.rundir.read_workers()}
        return all((w := found.get(r)) is not None and w.get("status") == "running" and w.get("world") == self.size
                   and w.get("time", 0) >= self.since for r in range(self.size))

    def run_once(self) -> bool:
        if not self.running() or self.rundir.stop_requested():  # starting, or a stop (the user's) is pending
            return False
        fits = choose_size(self.sizes, worker_slots(_available_per_node(), self.need) + self.size)
        if fits is None or fits <= self.size:
            return False
        self.target = fits
        self.rundir.request_stop(f"elastic: {fits} workers fit again")
        _say(f"{fits} workers fit again (running {self.size}): the workers save a checkpoint and stop, "
             f"then the job restarts at {fits}")
        return True

    def run(self):  # noqa: D401 - threading.Thread's
        while not self.done.wait(self.every_s):
            try:
                if self.run_once():
                    return
            except Exception as err:  # noqa: BLE001 - a failed look at the cluster: try again next time
                _say(f"checking the cluster's capacity failed ({type(err).__name__}: {err}); trying again")


class _Elastic:
    """The driver loop of an elastic job: TorchTrainer attempts, each at one size (parallel.dp and
    cluster.num_workers of its config set to it) with Ray Train's own restarts off, so this loop chooses the
    size of the next attempt: the largest allowed size that the cluster's live nodes hold, waiting up to
    cluster.capacity_timeout_s while fewer than cluster.min_workers fit. A failed attempt counts against
    cluster.max_failures; an attempt below the full size is stopped (after a checkpoint) when a larger size
    fits again. Every attempt shares one launch id, so each resumes from the newest checkpoint of the launch."""

    def __init__(self, cfg, run: RunDir, *, launch_id: str, loopback: bool, stop: "_StopOnSignal | None"):
        from pretrain.config import elastic_sizes

        self.cfg, self.rundir, self.launch_id, self.loopback, self.stop = cfg, run, launch_id, loopback, stop
        self.sizes = elastic_sizes(cfg)
        self.full = cfg.cluster.num_workers
        self.need = worker_resources(cfg.cluster)
        self.resizes = self.failures = 0

    # -- one attempt's config and its outcome ---------------------------------------------------------------

    def attempt_config(self, size: int, resume: str):
        import dataclasses

        cfg = self.cfg
        return dataclasses.replace(
            cfg, parallel=dataclasses.replace(cfg.parallel, dp=size // cfg.parallel.cp),
            cluster=dataclasses.replace(cfg.cluster, num_workers=size),
            checkpoint=dataclasses.replace(cfg.checkpoint, resume=resume))

    def user_stopped(self) -> bool:
        return self.stop is not None and self.stop.requested

    def wait_for_size(self) -> int:
        """The largest allowed size the cluster holds now; waits while fewer than min_workers fit."""
        c = self.cfg.cluster
        deadline, said = time.monotonic() + c.capacity_timeout_s, False
        while True:
            slots = worker_slots(_available_per_node(), self.need)
            size = choose_size(self.sizes, slots)
            if size is not None:
                return size
            if self.user_stopped():
                raise RuntimeError("stopped on request while waiting for workers")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"elastic: only {slots} workers fit in the cluster ({self.need} each) and cluster.min_workers="
                    f"{c.min_workers} need more; waited cluster.capacity_timeout_s={c.capacity_timeout_s:g} s. "
                    f"The newest checkpoint is kept: `liquid resume {self.rundir.path}` continues once nodes return")
            if not said:
                _say(f"waiting up to {c.capacity_timeout_s:g} s for capacity: {slots} workers fit, "
                     f"cluster.min_workers={c.min_workers} ({self.need} each)")
                said = True
            time.sleep(min(1.0, c.resize_check_s))

    def wait_for_release(self, before: set, size: int, timeout_s: float = 30.0) -> None:
        """Placement groups an attempt made are removed with its controller; one still there afterwards (a
        bundle rescheduled after its node died, say) would hold resources the next attempt needs: wait for
        them to go, then remove any left."""
        from ray.util.placement_group import PlacementGroup, remove_placement_group
        import ray

        def ours():  # made since the attempt started, with its shape: `size` bundles of one worker's resources
            return {pg_id: info for pg_id, info in _live_placement_groups().items()
                    if pg_id not in before and len(info.get("bundles") or {}) == size
                    and all(_same_resources(b, self.need) for b in info["bundles"].values())}

        deadline = time.monotonic() + timeout_s
        while (left := ours()) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pg_id in left:
            _say(f"removing the placement group {pg_id} the last attempt left behind")
            try:
                remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            except Exception as err:  # noqa: BLE001 - gone meanwhile
                _say(f"removing placement group {pg_id} failed: {type(err).__name__}: {err}")

    def fresh_summary(self, since: float) -> dict | None:
        """summary.json when an attempt started at `since` wrote it."""
        try:
            if self.rundir.summary_file.stat().st_mtime < since:
                return None
        except OSError:
            return None
        return self.rundir.read_summary()

    def last_logged_step(self) -> int:
        from cluster.monitor import read_records

        records = read_records(self.rundir.path)
        return records[-1]["step"] if records else 0

    # -- the loop -------------------------------------------------------------------------------------------

    def run(self) -> dict:
        from pretrain.train.loop import last_step

        c = self.cfg.cluster
        target = last_step(self.cfg.train)
        _say(f"sizes {', '.join(map(str, self.sizes))} workers (cluster.min_workers={c.min_workers} to "
             f"cluster.num_workers={self.full}); global batch {self.cfg.train.global_batch_size} kept at each")
        resume, previous, reason, error = self.cfg.checkpoint.resume, None, None, None
        startup_failures_since = None
        while True:
            if self.user_stopped() and previous is not None:
                raise RuntimeError("stopped on request between attempts; `liquid resume` continues the run")
            size = self.wait_for_size()
            if previous is not None:
                self.announce(previous, size, reason, resume, error)
            elif size < self.full:
                _say(f"starting at {size} of {self.full} workers (only {size} fit now)")
            since = time.time()
            before = set(_live_placement_groups())
            grow = None
            if size < self.full:
                grow = _GrowWatch(self.rundir, size=size, sizes=self.sizes, need=self.need, every_s=c.resize_check_s,
                                  since=since)
                grow.start()
            outcome = None
            try:
                _trainer(self.attempt_config(size, resume), self.rundir, launch_id=self.launch_id,
                         loopback=self.loopback, elastic=True, record=self.cfg).fit()
            except Exception as err:  # noqa: BLE001 - classified below
                outcome = err
            finally:
                if grow is not None:
                    grow.done.set()
                    grow.join()
            self.wait_for_release(before, size)
            if grow is not None and grow.target is not None and not self.user_stopped():
                self.rundir.clear_stop()  # ours: the attempt may have ended before reading it
            if outcome is not None and _is_startup_failure(outcome):
                # The size chosen did not fit after all (a node was lost since, the view was stale): not the
                # workers' failure, and nothing ran; choose again.
                startup_failures_since = startup_failures_since or time.monotonic()
                if time.monotonic() - startup_failures_since > c.capacity_timeout_s:
                    raise RuntimeError(f"elastic: no worker group could start for cluster.capacity_timeout_s="
                                       f"{c.capacity_timeout_s:g} s") from outcome
                _say(f"the worker group of {size} could not start ({_describe(outcome)}); choosing the size again")
                continue
            startup_failures_since = None
            self.last_step = self.last_logged_step()
            summary = self.fresh_summary(since) if outcome is None else None
            previous = size
            if self.cfg.checkpoint.resume == "none":
                resume = "auto"  # later attempts continue this launch's checkpoints
            if outcome is None:
                if summary is None:
                    raise RuntimeError(f"the workers finished without writing {self.rundir.summary_file}")
                grown = grow is not None and grow.target is not None
                if not (summary.get("stopped") and grown and not self.user_stopped()):
                    return self.finish(summary, size)
                if summary["steps"] >= target:
                    _say(f"the run reached its last step ({target}) as it stopped to resize; not restarting "
                         f"(export with `liquid export {self.rundir.path} --out DIR`)")
                    return self.finish(summary, size)
                reason, error = "capacity returned", None
                continue
            self.failures += 1
            if self.failures > c.max_failures:
                raise RuntimeError(f"elastic: attempt failed and cluster.max_failures={c.max_failures} failures "
                                   f"are used up: {_describe(outcome)}") from outcome
            reason, error = "failure", _describe(outcome)

    def announce(self, previous: int, size: int, reason: str, resume: str, error: str | None) -> None:
        """Say what the next attempt does; a change of size is a resize, recorded in resizes.jsonl."""
        ckpt = resume_target(self.rundir.path, resume, launch_id=self.launch_id, checksums=False)
        checkpoint_step = _step_of(ckpt)
        recomputed = max(self.last_step - checkpoint_step, 0)
        why = reason if reason != "failure" or not error else f"failure: {error}"
        if size == previous:
            what = (f"after a {why} ({self.failures} of cluster.max_failures={self.cfg.cluster.max_failures})"
                    if reason == "failure" else "(the larger size no longer fits)")
            _say(f"restarting at {size} workers {what}; resuming from step {checkpoint_step}, "
                 f"{recomputed} steps recomputed")
            return
        self.resizes += 1
        record = {"time": time.time(), "from_workers": previous, "to_workers": size, "reason": reason,
                  "checkpoint_step": checkpoint_step, "last_step": self.last_step, "steps_recomputed": recomputed}
        if reason == "failure" and error:
            record["error"] = error
        self.rundir.append_resize(record)
        _say(f"resize {previous} -> {size} workers ({why}); resuming from step {checkpoint_step} "
             f"(last step {self.last_step}, {recomputed} steps recomputed)")

    def finish(self, summary: dict, size: int) -> dict:
        """The last attempt's summary (its `world` is the job's final size), with the job's resizes and failed
        attempts."""
        summary = {**summary, "resizes": self.resizes, "failures": self.failures}  # `world`: the final size
        self.rundir.write_summary(summary)
        return summary


def _same_resources(bundle: dict, need: dict) -> bool:
    return {k: float(v) for k, v in bundle.items() if v} == {k: float(v) for k, v in need.items() if v}


def _describe(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _is_startup_failure(err: BaseException) -> bool:
    """A worker group that could not start (placement group not ready in time): the size chosen no longer fits."""
    inner = getattr(err, "controller_failure", None)
    return type(inner).__name__ in ("WorkerGroupStartupTimeoutError", "WorkerGroupStartupFailedError")


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
    from pretrain.train.tracking import check_available
    from pretrain.train.worker import train_main

    check_available(cfg)  # an enabled tracker's package is missing: say so before Ray or a model starts
    printer = printer or ProgressPrinter(max_steps=cfg.train.max_steps, max_tokens=cfg.train.max_tokens,
                                         stream=sys.stdout)
    if use_ray(cfg):
        init_ray(cfg)  # first: its SIGTERM handler must not replace the one below
    with _StopOnSignal(Path(cfg.run.dir)) as stop:
        if use_ray(cfg):
            return launch_ray(cfg, printer, stop=stop)
        return train_main(cfg, progress=True, launch_id=uuid.uuid4().hex)
