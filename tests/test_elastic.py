"""Elastic training (cluster.min_workers): the config's checks, the size choice and the driver's loop against
a scripted cluster (no Ray), then a real job on a 2-node Ray cluster on this machine (ray.cluster_utils.Cluster,
2 CPUs per node, a head with none): 4 workers, one node removed mid-run -> the job goes on at 2 workers from
the newest checkpoint; a node added back -> it returns to 4 and finishes on its own. Every loss equals an
uninterrupted 4-worker run's (1e-5 relative) and every step trains the same rows (the loaders' row records),
none skipped or repeated."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster.launch import choose_size, worker_resources, worker_slots
from pretrain.config import elastic_sizes, load_config
from pretrain.run_dir import RunDir
from tests.distributed.harness import run_distributed

# ---- the config's checks and the size choice --------------------------------------------------------------

EIGHT = ["parallel.dp=8", "parallel.ep=2", "cluster.num_workers=8", "train.global_batch_size=16",
         "train.micro_batch_size=1"]


def _error(overrides) -> str:
    with pytest.raises(ValueError) as err:
        load_config("tiny", overrides)
    return str(err.value)


def test_min_workers_must_hold_whole_expert_parallel_groups():
    msg = _error(EIGHT + ["cluster.min_workers=3"])
    assert "cluster.min_workers=3 cannot hold whole expert-parallel" in msg
    assert "multiple of parallel.ep=2 and parallel.cp=1, i.e. of 2" in msg


def test_min_workers_must_not_exceed_the_full_size():
    msg = _error(EIGHT + ["cluster.min_workers=10"])
    assert "cluster.min_workers=10 is more than cluster.num_workers=8" in msg


def test_min_workers_must_keep_the_global_batch():
    # 6 workers: dp 6 does not divide the global batch of 16 rows.
    msg = _error(EIGHT + ["cluster.min_workers=6"])
    assert "config key 'cluster.min_workers'" in msg and "train.global_batch_size=16" in msg
    assert "train.micro_batch_size x dp = 1 x 6 = 6" in msg and "that keep it: 2, 4, 8" in msg


def test_other_elastic_keys_are_checked():
    assert "cluster.launcher=ray" in _error(EIGHT + ["cluster.min_workers=2", "cluster.launcher=local"])
    assert "cluster.resize_check_s" in _error(EIGHT + ["cluster.min_workers=2", "cluster.resize_check_s=0"])
    assert "cluster.capacity_timeout_s" in _error(EIGHT + ["cluster.capacity_timeout_s=-1"])
    assert "cluster.min_workers" in _error(EIGHT + ["cluster.min_workers=0"])


def test_the_allowed_sizes_keep_whole_groups_and_the_global_batch():
    assert elastic_sizes(load_config("tiny", EIGHT)) == [8]  # not elastic
    assert elastic_sizes(load_config("tiny", EIGHT + ["cluster.min_workers=2"])) == [2, 4, 8]  # 6: 16 % 6
    # With context parallelism: dp = workers / cp; a multiple of lcm(ep, cp) = 2 holds whole groups of both.
    cp = ["parallel.dp=4", "parallel.cp=2", "parallel.ep=2", "cluster.num_workers=8", "train.global_batch_size=16",
          "train.micro_batch_size=1", "cluster.min_workers=2"]
    assert elastic_sizes(load_config("tiny", cp)) == [2, 4, 8]  # 6 workers: dp 3 does not divide 16


def test_the_size_chosen_is_the_largest_allowed_that_fits():
    assert choose_size([2, 4, 8], 7) == 4 and choose_size([2, 4, 8], 8) == 8 and choose_size([2, 4, 8], 20) == 8
    assert choose_size([2, 4, 8], 1) is None
    nodes = {"head": {"CPU": 0.0}, "a": {"CPU": 2.0, "memory": 1e9}, "b": {"CPU": 1.5}}
    assert worker_slots(nodes, {"CPU": 1.0}) == 3  # a worker's bundle fits on one node: 2 + 1
    assert worker_slots(nodes, {"CPU": 2.0}) == 1
    assert worker_slots({"g": {"CPU": 8.0, "GPU": 2.0}, "c": {"CPU": 8.0}}, {"CPU": 1.0, "GPU": 1.0}) == 2
    cfg = load_config("tiny", EIGHT + ["cluster.cpus_per_worker=2", "cluster.use_gpu=true"])
    assert worker_resources(cfg.cluster) == {"CPU": 2.0, "GPU": 1.0}


def test_the_monitor_lists_the_resizes(tmp_path):
    from cluster.monitor import load_state, render

    run = RunDir(tmp_path)
    run.metrics_file.write_text(json.dumps({"step": 1, "loss": 6.0, "tokens": 512, "time": time.time()}) + "\n")
    run.append_resize({"time": time.time(), "from_workers": 4, "to_workers": 2, "reason": "failure",
                       "checkpoint_step": 4, "last_step": 7, "steps_recomputed": 3})
    run.append_resize({"time": time.time(), "from_workers": 2, "to_workers": 4, "reason": "capacity returned",
                       "checkpoint_step": 12, "last_step": 12, "steps_recomputed": 0})
    text = render(load_state(tmp_path))
    assert "resizes (2, elastic):" in text
    assert "4 -> 2 workers (failure) after step 7: resumed from step 4, 3 steps recomputed" in text
    assert "2 -> 4 workers (capacity returned) after step 12: resumed from step 12, 0 steps recomputed" in text


class _FakeCluster:
    """The driver loop (_Elastic) against a scripted cluster: free worker slots, and one function per attempt
    standing in for TorchTrainer.fit()."""

    def __init__(self, monkeypatch, run: RunDir, slots: int, attempts):
        import cluster.launch as launch

        self.run, self.slots, self.attempts, self.sizes, self.resumes = run, slots, list(attempts), [], []
        self.checkpoint = 0
        monkeypatch.setattr(launch, "_available_per_node", lambda: {"node": {"CPU": float(self.slots)}})
        monkeypatch.setattr(launch, "_live_placement_groups", lambda: {})
        monkeypatch.setattr(launch, "resume_target", lambda *a, **k: self.checkpoint or None)
        monkeypatch.setattr(launch, "_step_of", lambda ckpt: ckpt or 0)
        monkeypatch.setattr(launch, "_trainer", self._trainer)

    def _trainer(self, cfg, run, record=None, **_):
        self.sizes.append(cfg.cluster.num_workers)
        self.resumes.append(cfg.checkpoint.resume)
        # The run directory keeps the job's config at its full size (a lost driver's `liquid resume` reads it).
        assert (record.cluster.num_workers, record.cluster.min_workers) == (4, 2)
        assert cfg.parallel.dp == cfg.cluster.num_workers  # cp = 1
        return type("T", (), {"fit": lambda _: self.attempts.pop(0)(cfg.cluster.num_workers)})()

    def log(self, first: int, last: int, world: int) -> None:
        with self.run.metrics_file.open("a") as fh:
            for step in range(first, last + 1):
                fh.write(json.dumps({"step": step, "loss": 1.0, "tokens": step, "devices": world}) + "\n")

    def running(self, world: int) -> None:
        for rank in range(world):
            self.run.write_worker_status(rank, world, "running")


def test_the_driver_shrinks_after_a_failure_and_grows_back_when_capacity_returns(monkeypatch, tmp_path):
    from cluster.launch import _Elastic

    cfg = load_config("tiny", CONFIG + [f"run.dir={tmp_path}", "cluster.resize_check_s=0.05",
                                        "cluster.capacity_timeout_s=5"])
    run = RunDir(tmp_path)

    def first(world):  # trains to step 6 (checkpoint at 4), then a node dies with two of the workers
        fake.log(1, 6, world)
        fake.checkpoint, fake.slots = 4, 2
        raise RuntimeError("a worker died")

    def second(world):  # the driver asks for a stop once 4 fit again: the workers save at step 9 and stop
        fake.running(world)
        fake.log(5, 8, world)
        fake.slots = 2  # a node came back (2 free beside the 2 in use)
        deadline = time.monotonic() + 5
        while not run.stop_requested():
            assert time.monotonic() < deadline, "no stop request"
            time.sleep(0.01)
        fake.log(9, 9, world)
        fake.checkpoint, fake.slots = 9, 4  # the workers are gone: 4 free
        run.write_summary({"steps": 9, "stopped": True, "world": world})

    def third(world):
        fake.log(10, 16, world)
        run.write_summary({"steps": 16, "stopped": False, "world": world})

    fake = _FakeCluster(monkeypatch, run, slots=4, attempts=[first, second, third])
    summary = _Elastic(cfg, run, launch_id="x", loopback=False, stop=None).run()
    assert fake.sizes == [4, 2, 4] and fake.resumes == ["none", "auto", "auto"]
    assert summary == {"steps": 16, "stopped": False, "world": 4, "resizes": 2, "failures": 1}
    assert [{k: r[k] for k in ("from_workers", "to_workers", "reason", "checkpoint_step", "last_step",
                                "steps_recomputed")} for r in run.read_resizes()] == [
        {"from_workers": 4, "to_workers": 2, "reason": "failure", "checkpoint_step": 4, "last_step": 6,
         "steps_recomputed": 2},
        {"from_workers": 2, "to_workers": 4, "reason": "capacity returned", "checkpoint_step": 9, "last_step": 9,
         "steps_recomputed": 0}]
    assert "a worker died" in run.read_resizes()[0]["error"]
    assert not run.stop_requested()


def test_the_driver_gives_up_when_min_workers_do_not_fit_or_failures_run_out(monkeypatch, tmp_path):
    from cluster.launch import _Elastic

    cfg = load_config("tiny", CONFIG + [f"run.dir={tmp_path}", "cluster.capacity_timeout_s=0.3",
                                        "cluster.max_failures=1"])
    run = RunDir(tmp_path)

    def dies(world):
        fake.slots = 1
        raise RuntimeError("a node died")

    fake = _FakeCluster(monkeypatch, run, slots=4, attempts=[dies])
    with pytest.raises(RuntimeError, match=r"only 1 workers fit .* cluster.min_workers=2 need more; waited "
                                           r"cluster.capacity_timeout_s=0.3 s"):
        _Elastic(cfg, run, launch_id="x", loopback=False, stop=None).run()

    def crashes(world):
        raise RuntimeError("a bug")

    fake = _FakeCluster(monkeypatch, run, slots=4, attempts=[crashes, crashes])
    with pytest.raises(RuntimeError, match=r"cluster.max_failures=1 failures are used up: RuntimeError: a bug"):
        _Elastic(cfg, run, launch_id="x", loopback=False, stop=None).run()
    assert fake.sizes == [4, 4]  # the same size again: a restart, not a resize


# ---- a real job on a 2-node Ray cluster -------------------------------------------------------------------

# Few steps: a layout change alters the order of floating-point sums (1e-7), and a top-k routing decision
# that such a difference flips makes the losses part by 1e-5 and more some 15 steps later (seen at steps 19-21
# of a 40-step run resized at step 4: a property of the MoE model, not of the resize).
STEPS = 16
CONFIG = ["parallel.dp=4", "parallel.ep=2", "cluster.num_workers=4", "cluster.min_workers=2",
          f"train.max_steps={STEPS}", "train.log_interval=1", "train.seq_len=64", "train.global_batch_size=8",
          "train.micro_batch_size=2", "train.threads=1", "data.corpus_max_mb=0.5", "data.tokenizer_vocab_size=512",
          "model.vocab_size=512", "data.record_rows=true", "checkpoint.interval=4", "checkpoint.keep_last=0",
          "checkpoint.export=false"]


def _uninterrupted(rank, world, overrides, cache):
    os.environ["LIQUID_CACHE"] = cache
    from pretrain.train.worker import train_main

    return train_main(load_config("tiny", overrides), progress=False)["steps"]


def _losses(run_dir: Path) -> dict[int, float]:
    """The last record of each step (a resumed attempt logs the steps after its checkpoint again)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _last_runs(path: Path) -> dict[int, list]:
    """{step: the (epoch, block, row) of the last run of consecutive records of that step} in one rank's row
    file (records are appended; an attempt that trains a step again writes a later run)."""
    runs, previous = {}, None
    for r in map(json.loads, path.read_text().splitlines()):
        if r["step"] != previous:
            runs[r["step"]] = []
            previous = r["step"]
        runs[r["step"]].extend(zip(r["epoch"], r["block"], r["row"]))
    return runs


def _rows(run_dir: Path, world_of_step) -> dict[int, list]:
    """{step: sorted rows the last attempt that trained the step read}, over the ranks of that attempt."""
    files = {int(p.stem[4:]): _last_runs(p) for p in (run_dir / "rows").glob("rank*.jsonl")}
    steps = sorted({s for runs in files.values() for s in runs})
    return {s: sorted(row for rank in range(world_of_step(s)) for row in files[rank].get(s, [])) for s in steps}


def _workers(run_dir: Path, world: int, since: float = 0.0) -> list[dict] | None:
    """The status files of ranks 0..world-1 once every one is running in a group of `world` (written after
    `since`, a time.time())."""
    found = []
    for rank in range(world):
        try:
            w = json.loads((run_dir / "workers" / f"rank{rank}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if w.get("world") != world or w.get("status") != "running" or w.get("time", 0) < since:
            return None
        found.append(w)
    return found


def _last_record(run_dir: Path) -> dict:
    """metrics.jsonl's last record (step, devices: the world that logged it), {} while there is none."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


class _Job:
    """`liquid pretrain` as a subprocess; a thread keeps its output, each line with the seconds since the start."""

    def __init__(self, args, env):
        self.start = time.monotonic()
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic() - self.start, line.rstrip("\n")))

    def now(self) -> float:
        return time.monotonic() - self.start

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def wait_for(self, predicate, what: str, timeout: float = 240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.proc.poll() is not None:
                self.reader.join(timeout=10)
                raise AssertionError(f"the job ended while waiting for {what}: {self.output()[-5000:]}")
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {self.output()[-3000:]}")

    def finish(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(timeout=10)
        return self.proc.returncode


def _close(got: float, want: float, what: str) -> None:
    assert abs(got - want) <= 1e-5 * max(abs(want), 1e-12), f"{what}: {got} != {want}"


@pytest.fixture
def two_nodes(monkeypatch):
    from ray.cluster_utils import Cluster

    # Read by Ray Train's controller (on the head, whose processes inherit this environment): it waits this
    # long for a failed worker group's process group to shut down (30 s by default), and polls its workers
    # this often (2 s by default): a lost node is noticed and the group restarted sooner, nothing else changes.
    monkeypatch.setenv("TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S", "1")
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # The driver, Ray Train's controller and its helpers run on the head and reserve no CPU: with none there,
    # every worker lands on the two 2-CPU nodes.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, nodes
    cluster.shutdown()


def test_a_job_shrinks_on_a_lost_node_and_grows_back(two_nodes, tmp_path):
    cluster, nodes = two_nodes
    cache = str(tmp_path / "cache")
    reference = tmp_path / "reference"
    started = time.monotonic()
    run_distributed(_uninterrupted, 4, CONFIG + [f"run.dir={reference}"], cache, timeout=600)
    reference_s = time.monotonic() - started

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "pretrain.cli", "pretrain", "tiny", f"run.dir={run_dir}", *CONFIG,
            f"cluster.address={cluster.address}", "cluster.resize_check_s=1", "cluster.capacity_timeout_s=120",
            "cluster.max_failures=1", "cluster.collective_timeout_s=30"]
    env = {**os.environ, "LIQUID_CACHE": cache, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    env.pop("RAY_ADDRESS", None)
    job = _Job(args, env)
    events = []
    try:
        # 1. Four workers, two per node; after the checkpoint of step 4 and a step more, a node goes.
        four = job.wait_for(lambda: _workers(run_dir, 4), "4 running workers")
        events.append((job.now(), "4 workers running"))
        job.wait_for(lambda: (run_dir / "checkpoints" / "step_00000004").exists()
                     and _last_record(run_dir).get("step", 0) >= 5, "step 5")
        lost = next(n for n in nodes if n.node_id == four[2]["node_id"])
        cluster.remove_node(lost)
        events.append((job.now(), f"node removed after step {_last_record(run_dir)['step']}"))
        # 2. The job goes on with two workers on the node left, from the checkpoint of step 4.
        two = job.wait_for(lambda: _workers(run_dir, 2), "2 running workers")
        events.append((job.now(), f"2 workers running from step {two[0]['start_step']}"))
        # 3. Capacity returns (at once: the run is short): the job checkpoints, stops and starts again at 4.
        added_at = time.time()
        cluster.add_node(num_cpus=2)
        events.append((job.now(), "node added"))
        job.wait_for(lambda: _workers(run_dir, 4, since=added_at), "4 running workers again")
        events.append((job.now(), "4 workers running again"))
        returncode = job.finish(timeout=600)
        events.append((job.now(), f"job ended ({returncode})"))
    finally:
        if job.proc.poll() is None:  # a failed wait: no job left running
            job.proc.kill()
    out = job.output()
    assert returncode == 0, out[-6000:]
    timeline = sorted(events + [(t, line) for t, line in job.lines if line.startswith(("elastic:", "done:"))])
    print(f"\nreference run {reference_s:.0f} s; elastic job:")
    print("\n".join(f"  {t:6.1f} s  {line[:160]}" for t, line in timeline))

    # The resizes: 4 -> 2 after the failure (steps after the checkpoint trained again), 2 -> 4 when capacity
    # returned (the workers saved a checkpoint at the step they stopped: nothing recomputed).
    resizes = RunDir(run_dir).read_resizes()
    assert [(r["from_workers"], r["to_workers"], r["reason"]) for r in resizes] == [
        (4, 2, "failure"), (2, 4, "capacity returned")], resizes
    shrink, grow = resizes
    assert shrink["checkpoint_step"] == two[0]["start_step"] and shrink["checkpoint_step"] % 4 == 0
    assert shrink["steps_recomputed"] == shrink["last_step"] - shrink["checkpoint_step"] >= 1, shrink
    assert grow["steps_recomputed"] == 0 and grow["checkpoint_step"] == grow["last_step"] > shrink["checkpoint_step"]
    assert sum("elastic: resize" in line for line in out.splitlines()) == 2, out[-5000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world"] == 4 and summary["resizes"] == 2 and summary["steps"] == STEPS, summary
    assert not summary["stopped"] and summary["start_step"] == grow["checkpoint_step"]

    # Every loss equals the uninterrupted run's.
    got, want = _losses(run_dir), _losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in want:
        _close(got[step], want[step], f"loss of step {step}")

    # Each step's rows, read by the last attempt that trained it, are the reference run's: none skipped, none
    # read twice, whatever the number of data-parallel ranks.
    def world_of_step(step):
        return 2 if shrink["checkpoint_step"] < step <= grow["checkpoint_step"] else 4

    rows = _rows(reference, lambda _: 4)
    assert sorted(rows) == list(range(1, STEPS + 1)) and all(len(r) == 8 for r in rows.values())
    assert _rows(run_dir, world_of_step) == rows

    # Expert-parallel groups (ranks 2k, 2k+1) stay inside a node at both sizes.
    final = [json.loads((run_dir / "workers" / f"rank{r}.json").read_text()) for r in range(4)]
    for group in (four, two, final):
        nodes_of = [w["node_id"] for w in group]
        assert all(nodes_of[k] == nodes_of[k + 1] for k in range(0, len(group), 2)), nodes_of
    assert len({w["node_id"] for w in four}) == 2 and len({w["node_id"] for w in final}) == 2
    assert two[0]["node_id"] != lost.node_id

    # `liquid monitor` shows both resizes.
    monitor = subprocess.run([sys.executable, "-m", "pretrain.cli", "monitor", str(run_dir)], capture_output=True,
                             text=True, env=env, timeout=120)
    assert monitor.returncode == 0, monitor.stderr[-3000:]
    assert "4 -> 2 workers (failure)" in monitor.stdout and "2 -> 4 workers (capacity returned)" in monitor.stdout
