"""The chaos soak: `liquid chaos [CONFIG] [key=value ...] --faults 10 --seed 0 [--kinds ...]`.

One training job on a 2-node Ray cluster that the soak starts on this machine (`ray.cluster_utils.Cluster`,
loopback only: a head without CPUs for the drivers and Ray Train's controller, and two worker nodes holding
half of the workers each), hit by random faults, one at a time, each injected once the job has recovered
from the one before and logged the step the schedule chose for it:

  kill                    SIGKILL of a rank's process
  kill_checkpoint_write   a rank SIGKILLs itself in the middle of writing its share of the next checkpoint
  kill_all_to_all         a rank SIGKILLs itself right before the expert-parallel all_to_all (its peers wait
                          inside it)
  hang                    SIGSTOP of a rank's process: its peers' collectives time out and Ray Train's health
                          check gives up on it (both after cluster.collective_timeout_s)
  driver                  SIGKILL of the `liquid pretrain` driver; the soak then does the human step,
                          `liquid resume RUN_DIR`, once the orphaned workers are gone
  corrupt                 the ranks are frozen (SIGSTOP), bytes in the middle of one tensor file of the newest
                          complete checkpoint are flipped, a rank is SIGKILLed and the others continue: the
                          restart must skip that checkpoint (sha256) and resume from the one before
  node                    the worker node hosting a rank is removed (its processes killed) and a replacement
                          node is added, so the fixed-size job can start its workers again

Every fault but the driver's is recovered by Ray Train alone (restart of the worker group from the newest good
checkpoint). The two in-process kills use the fault points of parallel/faults.py: the soak arms one by writing
RUN_DIR/chaos/arm (every Ray process of the soak's cluster inherits LIQUID_CHAOS naming that file).

The schedule is a function of (--faults, --seed, --kinds, the run's last step, checkpoint.interval, world):
every kind appears once when there are at least as many faults as kinds, the rest are drawn at random, and
fault i fires in the i-th of equal slices of the steps between the second checkpoint and one interval before
the end. Overrides the soak adds: train.log_interval=1 (per-step records to measure with),
cluster.launcher=ray, cluster.address (its own cluster), cluster.max_failures (at least two per fault, plus two).

At the end: the losses (metrics.jsonl, the last record of each step) are compared bitwise with an
uninterrupted run of the same config on the same cluster (`--reference auto`, in RUN_DIR-reference), and a
goodput table is printed and written to RUN_DIR/chaos.json: per fault the kind, the last step trained before it,
the step resumed from, the steps recomputed (their difference) and the seconds from the fault to the first new
step logged; their median and max; the wall time and the fraction of it spent on the steps that were kept.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from parallel.faults import ENV as CHAOS_ENV, Spec, fired_path, format_specs
from pretrain.run_dir import JsonlTail

KINDS = ("kill", "kill_checkpoint_write", "kill_all_to_all", "hang", "driver", "corrupt", "node")
HOOK_POINTS = {"kill_checkpoint_write": "checkpoint_write", "kill_all_to_all": "all_to_all"}
CHAOS_DIR = "chaos"  # RUN_DIR/chaos/: the arm file, the drivers' logs
REPORT = "chaos.json"  # RUN_DIR/chaos.json
POLL_S = 0.05


def _say(msg: str) -> None:
    print(f"chaos: {msg}", flush=True)


# ---- the schedule -------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Fault:
    index: int  # 1-based
    kind: str
    step: int  # injected (or armed) once the job, recovered from the fault before, has logged this step
    rank: int  # the rank hit (kill, hang, the hook's rank, the corrupted file's and killed rank, the node's)


def trigger_range(last_step: int, interval: int) -> tuple[int, int]:
    """The steps faults fire at: after two checkpoints exist (a corrupted newest one has a good one before it),
    and at least one interval before the end (an armed checkpoint write has a save left to hit)."""
    return 2 * interval + 1, last_step - interval - 1


def min_last_step(faults: int, interval: int) -> int:
    """The shortest run that holds `faults` faults at distinct steps."""
    return 3 * interval + 1 + max(faults, 1)


def parse_kinds(text: str | None) -> tuple[str, ...]:
    if not text:
        return KINDS
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise ValueError(f"--kinds: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(KINDS)}")
    return kinds


def make_schedule(faults: int, *, seed: int, last_step: int, interval: int, world: int,
                  kinds=KINDS) -> list[Fault]:
    """`faults` faults, deterministic in all arguments: each kind once (when faults >= kinds; else a random
    subset), the rest drawn at random, in random order, fault i at a random step of the i-th of `faults` equal
    slices of trigger_range, each on a random rank."""
    kinds = tuple(kinds)
    if faults < 0:
        raise ValueError("--faults must be >= 0")
    if interval <= 0:
        raise ValueError("the chaos soak needs checkpoint.interval > 0 (recovery resumes from checkpoints)")
    lo, hi = trigger_range(last_step, interval)
    if faults and hi - lo + 1 < faults:
        raise ValueError(f"{faults} faults need train.max_steps >= {min_last_step(faults, interval)} with "
                         f"checkpoint.interval={interval} (the run ends at step {last_step})")
    rng = random.Random(seed)
    chosen = list(kinds) if faults >= len(kinds) else rng.sample(list(kinds), faults)
    chosen += [rng.choice(kinds) for _ in range(faults - len(chosen))]
    rng.shuffle(chosen)
    schedule = []
    for i, kind in enumerate(chosen):
        a = lo + (hi - lo + 1) * i // faults
        b = lo + (hi - lo + 1) * (i + 1) // faults - 1
        schedule.append(Fault(i + 1, kind, rng.randint(a, b), rng.randrange(world)))
    return schedule


# ---- what the job logged ------------------------------------------------------------------------------------


class MetricsWatch:
    """Follows RUN_DIR/metrics.jsonl across attempts. Every attempt rewrites the file (a new inode) with the
    records up to its checkpoint, then appends: each inode seen is a generation, and each record keeps its
    generation (`_gen`). Records have the worker's wall-clock `time`."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict] = []
        self.generation = 0
        self._tail = JsonlTail(path)

    def poll(self) -> None:
        replaced, records = self._tail.read()
        self.generation += replaced
        # A new attempt's file starts with the records it kept from the one before, times unchanged: those
        # are marked `_kept` and are not new steps. Found by a soak whose fault came while the attempt went on
        # training for 2 s: the kept records of those steps were newer than the fault and read as the
        # recovery's first step.
        seen = {(r["step"], r.get("time")) for r in self.records} if replaced else set()
        self.records += [{**record, "_gen": self.generation, "_kept": (record.get("step"), record.get("time")) in seen}
                         for record in records]

    def last_step(self) -> int:
        """The last step of the current generation (0 before any)."""
        current = [r["step"] for r in self.records if r["_gen"] == self.generation]
        return max(current, default=0)

    def first_after(self, t: float, *, not_gen: int | None = None) -> dict | None:
        """The first record (by time) logged after `t`, outside generation `not_gen` (kept copies aside)."""
        found = [r for r in self.records if r.get("time", 0) > t and r["_gen"] != not_gen and not r["_kept"]]
        return min(found, key=lambda r: r["time"]) if found else None

    def attempt_at(self, t: float) -> tuple[int | None, int]:
        """(generation, last step it logged) of the attempt that was training at `t`: the one that logged the
        last record before `t` (records an attempt keeps from the one before have older times)."""
        before = [r for r in self.records if r.get("time", 0) <= t and not r["_kept"]]
        if not before:
            return None, 0
        gen = max(before, key=lambda r: r["time"])["_gen"]
        return gen, max(r["step"] for r in self.records if r["_gen"] == gen)


def final_records(run_dir: Path) -> list[dict]:
    """The last record of each step in metrics.jsonl, by step."""
    last = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        last[r["step"]] = r
    return [last[s] for s in sorted(last)]


def useful_seconds(records: list[dict]) -> float:
    """The time spent on the steps of `records` (one per step): each record's tokens since the previous one
    over its tokens/s."""
    total, tokens = 0.0, 0
    for r in records:
        if r.get("tokens_per_s"):
            total += (r["tokens"] - tokens) / r["tokens_per_s"]
        tokens = r["tokens"]
    return total


def compare_losses(got: list[dict], want: list[dict]) -> dict:
    """Bitwise comparison of the losses of two runs (last record of each step)."""
    g, w = {r["step"]: r["loss"] for r in got}, {r["step"]: r["loss"] for r in want}
    differ = [s for s in sorted(set(g) & set(w)) if g[s] != w[s]]
    return {"equal": g == w, "steps": len(g), "reference_steps": len(w),
            "missing": sorted(set(w) - set(g))[:20], "extra": sorted(set(g) - set(w))[:20],
            "differ": [{"step": s, "loss": g[s], "reference": w[s]} for s in differ[:10]],
            "differ_count": len(differ)}


# ---- the goodput report -------------------------------------------------------------------------------------


def _phases(fault_t: float, first_t: float, starts: list[float], runs: list[float]) -> dict:
    """Where a recovery's seconds went, from the worker status records seen after the fault: `restart_s` until
    the first new worker began (failure detected, worker group stopped and started, processes spawned and
    imported), `setup_s` from the last start to the last rank running (topology, data, model, engine, checkpoint
    verified and loaded), `first_step_s` from there to the first new step logged. None when not seen."""
    runs = [x for x in runs if x <= first_t]
    ready = max(runs, default=None)
    begun = max((x for x in starts if ready is None or x <= ready), default=None)
    r = lambda x: None if x is None else round(x, 3)  # noqa: E731
    return {"restart_s": r(min(starts) - fault_t if starts else None),
            "setup_s": r(ready - begun if ready is not None and begun is not None else None),
            "first_step_s": r(first_t - ready if ready is not None else None)}


def _median(xs):
    return statistics.median(xs) if xs else None


def goodput(faults: list[dict], *, wall_s: float, useful_s: float) -> dict:
    """Median and max of steps recomputed and recovery seconds over the recovered faults, wall time and the
    fraction of it spent on useful steps."""
    done = [f for f in faults if f.get("recovered")]
    rec = [f["steps_recomputed"] for f in done]
    sec = [f["recovery_s"] for f in done]
    return {"faults": len(faults), "recovered": len(done),
            "steps_recomputed_median": _median(rec), "steps_recomputed_max": max(rec, default=None),
            "recovery_s_median": _median(sec), "recovery_s_max": max(sec, default=None),
            "wall_s": wall_s, "useful_s": useful_s, "useful_fraction": useful_s / wall_s if wall_s else None}


def _num(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def format_table(result: dict) -> str:
    """The goodput table of a soak's result (what `liquid chaos` prints)."""
    lines = [f"{'#':>3}  {'kind':<21} {'rank':>4} {'at step':>7} {'resumed':>7} {'recomputed':>10} "
             f"{'recovery s':>10} {'= restart + setup + step':>24}  note"]
    for f in result["faults"]:
        parts = "" if f.get("restart_s") is None else " + ".join(
            _num(f.get(k)) for k in ("restart_s", "setup_s", "first_step_s"))
        lines.append(f"{f['index']:>3}  {f['kind']:<21} {f['rank']:>4} {_num(f.get('at_step'), '{}'):>7} "
                     f"{_num(f.get('resumed_from'), '{}'):>7} {_num(f.get('steps_recomputed'), '{}'):>10} "
                     f"{_num(f.get('recovery_s')):>10} {parts:>24}  {f.get('note', '')}")
    g = result["goodput"]
    lines.append(f"steps recomputed: median {_num(g['steps_recomputed_median'], '{:g}')}, "
                 f"max {_num(g['steps_recomputed_max'], '{}')}")
    lines.append(f"seconds to the first new step: median {_num(g['recovery_s_median'])}, "
                 f"max {_num(g['recovery_s_max'])}")
    lines.append(f"wall time {g['wall_s']:.1f} s; useful steps {g['useful_s']:.1f} s = "
                 f"{_num(g['useful_fraction'] and 100 * g['useful_fraction'])}% of it"
                 + (f"; the uninterrupted reference took {result['reference']['wall_s']:.1f} s "
                    f"({_num(result['reference'].get('useful_fraction') and 100 * result['reference']['useful_fraction'])}% useful)"
                    if result.get("reference", {}).get("wall_s") else ""))
    return "\n".join(lines)


# ---- processes ----------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not reaped) is gone for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _signal(pid: int, sig) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False


class Driver:
    """A `liquid pretrain` / `liquid resume` process; its output goes to a log file."""

    def __init__(self, args: list[str], log: Path, env: dict):
        self.args, self.log = args, log
        self.started = time.time()
        self._fh = open(log, "w")
        self.proc = subprocess.Popen(args, stdout=self._fh, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        rc = self.proc.poll()
        if rc is not None and not self._fh.closed:
            self._fh.close()
        return rc

    def tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.poll()


def flip_bytes(path: Path, *, count: int = 16) -> int:
    """Flip `count` bytes in the middle of a safetensors file's tensor data (size unchanged, header intact).
    Returns the offset."""
    import struct

    size = path.stat().st_size
    with open(path, "r+b") as fh:
        header = struct.unpack("<Q", fh.read(8))[0]
        start = 8 + header
        offset = start + max((size - start - count) // 2, 0)
        fh.seek(offset)
        data = bytearray(fh.read(count))
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))
        fh.flush()
        os.fsync(fh.fileno())
    return offset


# ---- the cluster --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _keep_ray_address_file():
    """Ray's test cluster records its address in /tmp/ray/ray_current_cluster, where a later `ray.init()`
    without an address (someone else's) would find it and join the soak's cluster: put back what was there."""
    try:
        from ray._private.utils import get_ray_address_file

        path = Path(get_ray_address_file(None))
        before = path.read_text() if path.exists() else None
    except Exception:  # noqa: BLE001 - a Ray without that file: nothing to keep
        yield
        return
    try:
        yield
    finally:
        try:
            if before is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(before)
        except OSError:
            pass


class SoakCluster:
    """A loopback-only Ray cluster on this machine: a head without CPUs and two worker nodes of `node_cpus`."""

    def __init__(self, node_cpus: int):
        from cluster.safety import LOOPBACK, pin_ray_to_loopback

        pin_ray_to_loopback()  # every process below binds to 127.0.0.1
        from ray.cluster_utils import Cluster

        self.node_args = {"num_cpus": node_cpus, "node_ip_address": LOOPBACK}
        with _keep_ray_address_file():
            self.cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 0, "include_dashboard": False, "node_ip_address": LOOPBACK})
        self.nodes = [self.cluster.add_node(**self.node_args) for _ in range(2)]
        self.cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return self.cluster.address

    def replace(self, node_id: str) -> str:
        """Remove the worker node `node_id` (its processes killed at once) and add a fresh one; returns the new
        node's id."""
        node = next((n for n in self.nodes if n.node_id == node_id), None)
        if node is None:
            raise RuntimeError(f"node {node_id} is not a worker node of the soak's cluster")
        self.cluster.remove_node(node, allow_graceful=False)
        self.nodes.remove(node)
        fresh = self.cluster.add_node(**self.node_args)
        self.nodes.append(fresh)
        return fresh.node_id

    def shutdown(self) -> None:
        self.cluster.shutdown()


# ---- the soak -----------------------------------------------------------------------------------------------


class Soak:
    """One chaos soak (see the module docstring). `run()` returns the result written to RUN_DIR/chaos.json."""

    def __init__(self, config: str | None, overrides: list[str], *, faults: int = 10, seed: int = 0,
                 kinds=KINDS, reference: str = "auto", timeout_s: float = 600.0):
        from pretrain.config import load_config
        from pretrain.train.loop import last_step

        self.config, self.user_overrides = config, list(overrides)
        self.faults_n, self.seed, self.kinds = faults, seed, tuple(kinds)
        self.reference, self.timeout_s = reference, timeout_s
        cfg = load_config(config, self.user_overrides)
        c = cfg.cluster
        if c.use_gpu:
            raise ValueError("liquid chaos runs the job on CPU workers of a 2-node cluster on this machine: "
                             "override cluster.use_gpu=false")
        if getattr(c, "min_workers", None) is not None:
            raise ValueError("liquid chaos compares the losses bitwise with a fixed-size run: leave cluster.min_workers "
                             "unset")
        if "corrupt" in self.kinds and 0 < cfg.checkpoint.keep_last < 2:
            raise ValueError("the corrupt fault needs a good checkpoint before the newest: checkpoint.keep_last "
                             "must be 0 (all) or >= 2")
        if "kill_all_to_all" in self.kinds and cfg.parallel.ep < 2:
            raise ValueError("the kill_all_to_all fault needs an expert-parallel all_to_all (parallel.ep >= 2); "
                             f"leave it out: --kinds {','.join(k for k in self.kinds if k != 'kill_all_to_all')}")
        self.world, self.interval, self.last = c.num_workers, cfg.checkpoint.interval, last_step(cfg.train)
        self.schedule = make_schedule(faults, seed=seed, last_step=self.last, interval=self.interval,
                                      world=self.world, kinds=self.kinds)
        self.run_dir = Path(cfg.run.dir).resolve()
        from pretrain.run_dir import RunDir

        if RunDir(self.run_dir).looks_like_run() or (self.run_dir / REPORT).exists():
            raise ValueError(f"{self.run_dir} already holds a run: the soak starts a fresh one (pick another run.dir)")
        self.ref_dir = None
        if reference == "auto":
            self.ref_dir = self.run_dir.with_name(self.run_dir.name + "-reference")
            if self.ref_dir.exists():
                raise ValueError(f"{self.ref_dir} exists: remove it, or compare with it: --reference {self.ref_dir}")
        elif reference != "none":
            self.ref_dir = Path(reference).resolve()
            if not (self.ref_dir / "metrics.jsonl").is_file():
                raise ValueError(f"--reference {reference}: no metrics.jsonl there")
        self.max_failures = max(c.max_failures, 2 * faults + 2)  # per launch; a restart may fail once more
        self.node_cpus = c.cpus_per_worker * math.ceil(self.world / 2)
        self.chaos_dir = self.run_dir / CHAOS_DIR
        self.arm = self.chaos_dir / "arm"
        self.drivers: list[Driver] = []  # the job's: `liquid pretrain`, then one `liquid resume` per killed driver
        self.others: list[Driver] = []
        self.cluster: SoakCluster | None = None
        self.results: list[dict] = []
        self.stopped: set[int] = set()  # processes this soak SIGSTOPped (killed at the end if still there)

    # -- helpers --------------------------------------------------------------------------------------------

    def overrides(self, run_dir: Path) -> list[str]:
        return [*self.user_overrides, f"run.dir={run_dir}", f"cluster.address={self.cluster.address}",
                "cluster.launcher=ray", "train.log_interval=1", f"cluster.max_failures={self.max_failures}"]

    def env(self) -> dict:
        env = {**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
        env.pop("RAY_ADDRESS", None)
        return env

    def start_driver(self, args: list[str], name: str) -> Driver:
        driver = Driver([sys.executable, "-m", "pretrain.cli", *args], self.chaos_dir / f"{name}.log", self.env())
        self.drivers.append(driver)
        return driver

    @property
    def driver(self) -> Driver:
        return self.drivers[-1]

    def wait(self, predicate, what: str, *, timeout: float | None = None, driver: Driver | None = None):
        """Poll `predicate` (metrics followed meanwhile) until truthy; fail when the driver exits first."""
        deadline = time.monotonic() + (timeout or self.timeout_s)
        while True:
            self.metrics.poll()
            value = predicate()
            if value:
                return value
            d = driver or self.driver
            if d.poll() is not None:
                self.metrics.poll()
                value = predicate()
                if value:
                    return value
                raise RuntimeError(f"the job's driver exited ({d.poll()}) while waiting for {what}; "
                                   f"its log ({d.log}) ends:\n{d.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout or self.timeout_s:.0f} s waiting for {what}")
            time.sleep(POLL_S)

    def workers(self, since: float) -> dict[int, dict] | None:
        """Every rank's status file once each shows a running worker that started after `since`."""
        from pretrain.run_dir import RunDir

        found = {w["rank"]: w for _, w in RunDir(self.run_dir).read_workers()}
        if all((w := found.get(r)) and w.get("status") == "running" and w.get("time", 0) > since
               for r in range(self.world)):
            return {r: found[r] for r in range(self.world)}
        return None

    def complete_checkpoints(self) -> list[tuple[int, Path]]:
        from checkpoints.manifest import MANIFEST, list_checkpoints

        return [(s, p) for s, p in list_checkpoints(self.run_dir) if (p / MANIFEST).exists()]

    # -- the faults -----------------------------------------------------------------------------------------

    def inject(self, fault: Fault, since: float) -> dict:
        """Inject `fault`; returns its record with `time` (the moment of the fault) and a note."""
        kind, rank = fault.kind, fault.rank
        if kind in HOOK_POINTS:
            point = HOOK_POINTS[kind]
            fired = fired_path(self.arm)
            fired.unlink(missing_ok=True)
            tmp = self.arm.with_name("arm.partial")
            tmp.write_text(format_specs([Spec(point, rank, None)]))
            os.replace(tmp, self.arm)
            armed = time.time()
            record = self.wait(lambda: fired.exists() and json.loads(fired.read_text()),
                               f"the armed {point} fault to fire on rank {rank}")
            where = f"checkpoint write of step {record['step']}" if point == "checkpoint_write" else "all_to_all"
            return {"time": record["time"], "pid": record["pid"], "armed_s": record["time"] - armed,
                    "hook_step": record["step"],
                    "note": f"rank {rank} SIGKILLed itself in the {where}"}
        workers = self.wait(lambda: self.workers(since), "the running workers")
        pid = workers[rank]["pid"]
        if kind == "kill":
            t = time.time()
            _signal(pid, signal.SIGKILL)
            return {"time": t, "pid": pid, "note": f"SIGKILL of rank {rank} (pid {pid})"}
        if kind == "hang":
            t = time.time()
            self.stopped.add(pid)
            _signal(pid, signal.SIGSTOP)
            return {"time": t, "pid": pid, "stopped_pid": pid, "note": f"SIGSTOP of rank {rank} (pid {pid})"}
        if kind == "driver":
            t = time.time()
            _signal(self.driver.pid, signal.SIGKILL)
            self.driver.proc.wait()
            self.driver.poll()
            pids = [w["pid"] for w in workers.values()]
            gone = self.wait_gone(pids, timeout=120)
            waited = time.time() - t
            self.start_driver(["resume", str(self.run_dir)], f"driver-{len(self.drivers) + 1}")
            return {"time": t, "pid": self.drivers[-2].pid, "human_step": f"liquid resume {self.run_dir}",
                    "orphans_s": round(waited, 2),
                    "note": f"driver SIGKILLed; `liquid resume` after {waited:.1f} s (workers "
                            f"{'exited' if gone else 'killed by the soak'})"}
        if kind == "corrupt":
            return self.corrupt(fault, workers, since)
        if kind == "node":
            node_id = workers[rank].get("node_id")
            if not node_id:
                raise RuntimeError(f"rank {rank}'s status file names no Ray node")
            t = time.time()
            fresh = self.cluster.replace(node_id)
            return {"time": t, "pid": pid, "removed_node": node_id, "added_node": fresh,
                    "note": f"node {node_id[:8]} (rank {rank}) removed, {fresh[:8]} added "
                            f"after {time.time() - t:.1f} s"}
        raise ValueError(f"unknown fault kind {kind}")

    def corrupt(self, fault: Fault, workers: dict, since: float) -> dict:
        """Freeze the ranks, flip bytes in a tensor file of the newest complete checkpoint, SIGKILL one rank,
        let the others go on: the restart must skip that checkpoint."""
        pids = [w["pid"] for w in workers.values()]
        while True:
            self.stopped.update(pids)
            for pid in pids:
                _signal(pid, signal.SIGSTOP)
            complete = self.complete_checkpoints()
            if len(complete) >= 2:
                break
            for pid in pids:
                _signal(pid, signal.SIGCONT)
            self.stopped.difference_update(pids)
            newest = complete[0][0] if complete else 0
            self.wait(lambda: (c := self.complete_checkpoints()) and c[0][0] > newest, "a second checkpoint")
            workers = self.wait(lambda: self.workers(since), "the running workers")
            pids = [w["pid"] for w in workers.values()]
        victim = workers[fault.rank]["pid"]
        try:
            (step, path), (previous, _) = complete[0], complete[1]
            files = sorted(path.glob("rank*.safetensors"))
            target = next((f for f in files if f.name == f"rank{fault.rank:05d}.safetensors"), files[0])
            flip_bytes(target)
            t = time.time()
            _signal(victim, signal.SIGKILL)
        finally:
            for pid in pids:
                if pid != victim:
                    _signal(pid, signal.SIGCONT)
            self.stopped.difference_update(pids)
        return {"time": t, "pid": victim, "corrupted": f"{path.name}/{target.name}", "corrupted_step": step,
                "expected_resume": previous,
                "note": f"{path.name}/{target.name} corrupted, rank {fault.rank} SIGKILLed"}

    def wait_gone(self, pids: list[int], *, timeout: float) -> bool:
        """Wait for the processes to exit; SIGKILL what is left after `timeout`. True when they exited alone."""
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids):
            if time.monotonic() > deadline:
                for p in pids:
                    _signal(p, signal.SIGKILL)
                return False
            time.sleep(POLL_S)
        return True

    def recover(self, fault: Fault, record: dict) -> dict:
        """Wait for the first new step after the fault; fill in at_step, resumed_from, steps_recomputed and
        recovery_s, and check what the kind promises."""
        from pretrain.run_dir import RunDir

        t = record["time"]
        self.metrics.poll()
        gen, at_step = self.metrics.attempt_at(t)
        seen = {"starting": set(), "running": set()}  # (rank, time) of the status records written after the fault

        def first_new_step():
            for _, w in RunDir(self.run_dir).read_workers():
                if w.get("time", 0) > t and w.get("status") in seen:
                    seen[w["status"]].add((w["rank"], w["time"]))
            return self.metrics.first_after(t, not_gen=gen)

        first = self.wait(first_new_step, f"recovery from fault {fault.index}")
        record.update(_phases(t, first["time"], [x for _, x in seen["starting"]], [x for _, x in seen["running"]]))
        # The attempt that was hit may log a step it was finishing as the fault came (a killed driver's workers
        # go on until Ray stops them): those steps are trained again too.
        if gen is not None:
            at_step = max(r["step"] for r in self.metrics.records if r["_gen"] == gen)
        resumed = first["step"] - 1
        record.update({"at_step": at_step, "resumed_from": resumed, "steps_recomputed": at_step - resumed,
                       "recovery_s": round(first["time"] - t, 3), "first_new_step": first["step"],
                       "recovered": True})
        problems = []
        if resumed > at_step:
            problems.append(f"resumed from step {resumed}, after the last step trained ({at_step})")
        if resumed % self.interval and resumed != 0:
            problems.append(f"resumed from step {resumed}, not a checkpoint step")
        if fault.kind == "corrupt" and resumed != record["expected_resume"]:
            problems.append(f"resumed from step {resumed}, not from step {record['expected_resume']} (the "
                            f"checkpoint before the corrupted {record['corrupted']})")
        if fault.kind == "kill_checkpoint_write" and record.get("hook_step") is not None \
                and resumed >= record["hook_step"]:
            problems.append(f"resumed from step {resumed}: the checkpoint of step {record['hook_step']} was "
                            "being written when the rank died")
        if fault.kind == "corrupt":  # what rank 0 said about the corrupt file (its output reaches the driver)
            name = record["corrupted"]
            record["skip_reported"] = any(f"checkpoint: skipping {name}" in d.tail(10**7) for d in self.drivers)
        if problems:
            record["problems"] = problems
        # A process left over from the attempt that was hit (a stopped rank Ray did not kill) goes now.
        leftover = [p for p in {record.get("pid"), record.get("stopped_pid")} if p and _alive(p)]
        if leftover and fault.kind != "driver":
            for p in leftover:
                _signal(p, signal.SIGKILL)
            record["leftover_killed"] = leftover
        return record

    # -- the run --------------------------------------------------------------------------------------------

    def run_reference(self) -> dict:
        _say(f"reference: an uninterrupted run in {self.ref_dir}")
        args = ["pretrain", *([self.config] if self.config else []), *self.overrides(self.ref_dir)]
        driver = Driver([sys.executable, "-m", "pretrain.cli", *args], self.chaos_dir / "reference.log", self.env())
        self.others.append(driver)  # not the job's: killed at the end only if still running
        t0 = time.time()
        try:
            rc = driver.proc.wait(timeout=max(self.timeout_s, 60) * 3)
        except subprocess.TimeoutExpired:
            driver.kill()
            raise RuntimeError(f"the reference run did not finish; its log ({driver.log}) ends:\n{driver.tail()}")
        driver.poll()
        wall = time.time() - t0
        if rc != 0:
            raise RuntimeError(f"the reference run failed ({rc}); its log ({driver.log}) ends:\n{driver.tail()}")
        records = final_records(self.ref_dir)
        useful = useful_seconds(records)
        _say(f"reference: {len(records)} steps in {wall:.1f} s")
        return {"dir": str(self.ref_dir), "wall_s": round(wall, 3), "useful_s": round(useful, 3),
                "useful_fraction": useful / wall if wall else None}

    def run(self) -> dict:
        self.chaos_dir.mkdir(parents=True, exist_ok=True)
        result = {"config": self.config, "overrides": self.user_overrides, "run_dir": str(self.run_dir),
                  "seed": self.seed, "kinds": list(self.kinds), "world": self.world,
                  "checkpoint_interval": self.interval, "last_step": self.last,
                  "schedule": [dataclasses.asdict(f) for f in self.schedule], "faults": self.results,
                  "finished": False}
        previous_env = os.environ.get(CHAOS_ENV)
        os.environ[CHAOS_ENV] = str(self.arm)  # inherited by every process of the cluster started next
        try:
            _say(f"{len(self.schedule)} faults (seed {self.seed}): " +
                 ", ".join(f"{f.kind}@{f.step}/r{f.rank}" for f in self.schedule))
            t0 = time.monotonic()
            self.cluster = SoakCluster(self.node_cpus)
            _say(f"cluster at {self.cluster.address}: a head and 2 worker nodes of {self.node_cpus} CPUs "
                 f"({time.monotonic() - t0:.1f} s)")
            if self.reference == "auto":
                result["reference"] = self.run_reference()
            self.soak(result)
        except BaseException as err:
            result["error"] = f"{type(err).__name__}: {err}"
            raise
        finally:
            for d in self.drivers + self.others:
                if d.poll() is None:
                    d.kill()
            for pid in self.stopped:  # a stopped process exits on no signal but SIGKILL
                if _alive(pid):
                    _signal(pid, signal.SIGKILL)
            if self.cluster is not None:
                self.cluster.shutdown()
            if previous_env is None:
                os.environ.pop(CHAOS_ENV, None)
            else:
                os.environ[CHAOS_ENV] = previous_env
            self.finish(result)
        return result

    def soak(self, result: dict) -> None:
        self.metrics = MetricsWatch(self.run_dir / "metrics.jsonl")
        args = ["pretrain", *([self.config] if self.config else []), *self.overrides(self.run_dir)]
        started = time.time()
        result["started"] = started
        self.start_driver(args, "driver-1")
        since = started
        for fault in self.schedule:
            self.wait(lambda: self.metrics.first_after(since) and self.metrics.last_step() >= fault.step,
                      f"step {fault.step} (fault {fault.index}, {fault.kind})")
            _say(f"fault {fault.index}/{len(self.schedule)}: {fault.kind} on rank {fault.rank} at step "
                 f"{self.metrics.last_step()}")
            record = {"index": fault.index, "kind": fault.kind, "rank": fault.rank, "scheduled_step": fault.step,
                      "recovered": False}
            self.results.append(record)
            record.update(self.inject(fault, since))
            self.recover(fault, record)
            since = record["time"]
            _say(f"  recovered: resumed from step {record['resumed_from']} ({record['steps_recomputed']} steps "
                 f"recomputed), first new step {record['recovery_s']:.1f} s after the fault"
                 + (f"; PROBLEMS: {'; '.join(record['problems'])}" if record.get("problems") else ""))
        try:
            rc = self.driver.proc.wait(timeout=max(self.timeout_s, 60) * 3)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the job did not finish; its driver's log ({self.driver.log}) ends:\n"
                               f"{self.driver.tail()}") from None
        self.driver.poll()
        result["wall_s"] = round(time.time() - started, 3)
        if rc != 0:
            raise RuntimeError(f"the job's driver exited with {rc}; its log ({self.driver.log}) ends:\n"
                               f"{self.driver.tail()}")
        result["finished"] = True

    def finish(self, result: dict) -> None:
        from pretrain.run_dir import RunDir

        summary = RunDir(self.run_dir).read_summary() if self.run_dir.exists() else None
        result["summary"] = summary
        result["drivers"] = [{"command": "liquid " + " ".join(d.args[3:]), "log": str(d.log), "rc": d.poll()}
                             for d in self.drivers]
        records = final_records(self.run_dir) if (self.run_dir / "metrics.jsonl").exists() else []
        wall = result.get("wall_s") or (time.time() - result["started"] if result.get("started") else 0.0)
        result["goodput"] = goodput(self.results, wall_s=round(wall, 3), useful_s=round(useful_seconds(records), 3))
        if self.ref_dir is not None and (self.ref_dir / "metrics.jsonl").exists() and records:
            result["losses"] = compare_losses(records, final_records(self.ref_dir))
        result["completed"] = bool(summary and summary.get("steps") == self.last and not summary.get("stopped"))
        result["ok"] = bool(result["finished"] and result["completed"]
                            and all(f.get("recovered") and not f.get("problems") for f in self.results)
                            and len(self.results) == len(self.schedule)
                            and (self.ref_dir is None or result.get("losses", {}).get("equal")))
        result["table"] = format_table(result)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / REPORT).write_text(json.dumps(result, indent=1, default=str))


def run_soak(config: str | None, overrides: list[str], **options) -> dict:
    """The Python API of `liquid chaos`: run the soak and return its result (also in RUN_DIR/chaos.json)."""
    return Soak(config, overrides, **options).run()


def report_lines(result: dict) -> str:
    """The end of `liquid chaos`'s output: the goodput table and the verdicts."""
    out = ["", f"goodput of {len(result['faults'])} faults ({result['run_dir']}, seed {result['seed']}):",
           result["table"]]
    losses = result.get("losses")
    if losses is not None:
        out.append(f"final losses: {'bitwise equal to' if losses['equal'] else 'DIFFERENT from'} the uninterrupted "
                   f"run ({losses['steps']} steps, reference {losses['reference_steps']})"
                   + ("" if losses["equal"] else f": {losses['differ'][:3]} missing {losses['missing']}"))
    s = result.get("summary") or {}
    out.append(f"job {'finished' if result.get('completed') else 'did NOT finish'}: step {s.get('steps')} of "
               f"{result['last_step']}; every fault recovered: "
               f"{all(f.get('recovered') and not f.get('problems') for f in result['faults'])}; "
               f"report {Path(result['run_dir']) / REPORT}")
    out.append("chaos soak: " + ("PASSED" if result.get("ok") else "FAILED"))
    return "\n".join(out)


# ---- the command --------------------------------------------------------------------------------------------


def _cmd_chaos(args) -> int:
    soak = Soak(args.config, args.overrides, faults=args.faults, seed=args.seed, kinds=parse_kinds(args.kinds),
                reference=args.reference, timeout_s=args.timeout_s)
    try:
        result = soak.run()
    except RuntimeError as err:
        print(f"liquid chaos: {err}", file=sys.stderr)
        report = soak.run_dir / REPORT
        if report.exists():
            print(report_lines(json.loads(report.read_text())))
        return 1
    print(report_lines(result))
    return 0 if result["ok"] else 1


def add_chaos_parser(sub) -> None:
    p = sub.add_parser("chaos", help="a chaos soak: one training job hit by random faults (killed and hung "
                                     "ranks, a killed driver, a corrupt checkpoint, a lost node); checks exact "
                                     "recovery and prints goodput")
    p.add_argument("args", nargs="*", metavar="[CONFIG] key=value", help="preset name or YAML, then overrides")
    p.add_argument("--faults", type=int, default=10, help="how many faults (default 10; every kind once when "
                                                          "there are at least as many as kinds)")
    p.add_argument("--seed", type=int, default=0, help="seed of the schedule (kinds, steps, ranks)")
    p.add_argument("--kinds", default=None, help=f"comma-separated subset of {','.join(KINDS)} (default all)")
    p.add_argument("--reference", default="auto",
                   help="auto (default: an uninterrupted run first, in RUN_DIR-reference), none, or the run "
                        "directory of an uninterrupted run of the same config to compare the losses with")
    p.add_argument("--timeout-s", type=float, default=600.0,
                   help="longest wait for one fault to fire or recover (default 600)")
    p.set_defaults(func=_cmd_chaos)
