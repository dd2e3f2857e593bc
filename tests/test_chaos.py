"""The chaos soak (`liquid chaos`, cluster/chaos.py) and its fault points (parallel/faults.py).

Fast: the schedule (a function of the seed), the fault points' specs and how they fire, the bookkeeping of the
goodput report, the configs a soak refuses. Slow: a real soak of the tiny preset on a 2-node Ray cluster on
this machine, 10 faults covering every kind; the job finishes with the losses of an uninterrupted run, bitwise.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.chaos import (KINDS, _phases, MetricsWatch, Soak, compare_losses, flip_bytes, format_table, goodput,
                           make_schedule, min_last_step, parse_kinds, trigger_range, useful_seconds)
from parallel.faults import Spec, fired_path, parse_spec, parse_specs

ROOT = Path(__file__).resolve().parent.parent

# ---- the schedule ---------------------------------------------------------------------------------------------


def test_the_schedule_is_a_function_of_the_seed_and_covers_every_kind():
    args = dict(last_step=40, interval=4, world=2)
    first = make_schedule(10, seed=0, **args)
    assert first == make_schedule(10, seed=0, **args)
    assert first != make_schedule(10, seed=1, **args)
    assert [f.index for f in first] == list(range(1, 11))
    assert set(KINDS) <= {f.kind for f in first}  # 7 kinds, each at least once, 3 drawn at random
    lo, hi = trigger_range(40, 4)
    steps = [f.step for f in first]
    assert steps == sorted(steps) and len(set(steps)) == 10 and lo <= steps[0] and steps[-1] <= hi
    assert lo == 9  # two checkpoints (4, 8) exist before the first fault: a corrupted newest has a good one behind
    assert all(0 <= f.rank < 2 for f in first)
    # Fewer faults than kinds: distinct kinds; a subset of kinds: only those.
    few = make_schedule(3, seed=5, **args)
    assert len({f.kind for f in few}) == 3
    assert {f.kind for f in make_schedule(6, seed=2, kinds=("kill", "hang"), **args)} == {"kill", "hang"}
    assert make_schedule(0, seed=0, **args) == []


def test_the_schedule_needs_room():
    assert min_last_step(10, 4) == 23
    make_schedule(10, seed=0, last_step=23, interval=4, world=2)
    with pytest.raises(ValueError, match="train.max_steps >= 23"):
        make_schedule(10, seed=0, last_step=22, interval=4, world=2)
    with pytest.raises(ValueError, match="checkpoint.interval > 0"):
        make_schedule(2, seed=0, last_step=100, interval=0, world=2)


def test_kinds_are_checked():
    assert parse_kinds(None) == KINDS
    assert parse_kinds("hang, kill,hang") == ("hang", "kill")
    with pytest.raises(ValueError, match="unknown bogus"):
        parse_kinds("kill,bogus")


# ---- the fault points --------------------------------------------------------------------------------------


def test_fault_point_specs_parse():
    assert parse_spec("all_to_all:1:*") == Spec("all_to_all", 1, None)
    assert parse_spec(" checkpoint_write : 0 : 20 ") == Spec("checkpoint_write", 0, 20)
    assert parse_spec("all_to_all:*") == Spec("all_to_all", None, None)
    assert str(Spec("checkpoint_write", None, 7)) == "checkpoint_write:*:7"
    assert parse_specs("a:0:1, b:1:*\n# a comment\n\nc:*:3  # trailing\n") == [
        Spec("a", 0, 1), Spec("b", 1, None), Spec("c", None, 3)]
    for bad, why in (("all_to_all", "expected point:rank:step"), (":1:2", "expected"), ("a:1:2:3", "expected"),
                     ("a:x:1", "rank must be an integer"), ("a:1:-2", "step must be >= 0"),
                     ("a-b:1:1", "letters, digits")):
        with pytest.raises(ValueError, match=why):
            parse_spec(bad)
    spec = Spec("checkpoint_write", 1, 20)
    assert spec.matches("checkpoint_write", 1, 20)
    assert not spec.matches("checkpoint_write", 0, 20) and not spec.matches("checkpoint_write", 1, 24)
    assert not spec.matches("checkpoint_write", 1, None)  # a point without a step matches only `*`
    assert Spec("all_to_all", None, None).matches("all_to_all", 3, None)


def test_fault_points_cost_nothing_when_chaos_is_off():
    import parallel.faults as faults

    assert "LIQUID_CHAOS" not in os.environ and faults.ENABLED is False
    assert faults.fault_point("all_to_all") is None and faults.fault_point("checkpoint_write", 3) is None
    assert faults._source is None  # nothing parsed, no file looked at


def _point(env: dict, *calls) -> subprocess.CompletedProcess:
    code = ("import sys; from parallel.faults import fault_point\n"
            + "".join(f"fault_point(*{c!r}); print('passed', {c!r}, flush=True)\n" for c in calls))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_an_inline_spec_kills_the_matching_rank_at_its_step():
    proc = _point({"LIQUID_CHAOS": "checkpoint_write:0:4", "RANK": "0"}, ("checkpoint_write", 3),
                  ("all_to_all",), ("checkpoint_write", 4), ("checkpoint_write", 5))
    assert proc.returncode == -signal.SIGKILL
    assert proc.stdout.splitlines() == ["passed ('checkpoint_write', 3)", "passed ('all_to_all',)"]
    assert "chaos: SIGKILL of rank 0" in proc.stderr and "checkpoint_write step 4" in proc.stderr
    other = _point({"LIQUID_CHAOS": "checkpoint_write:0:4", "RANK": "1"}, ("checkpoint_write", 4))
    assert other.returncode == 0


def test_a_spec_file_fires_once_and_says_so(tmp_path):
    arm = tmp_path / "chaos" / "arm"
    arm.parent.mkdir()
    env = {"LIQUID_CHAOS": str(arm), "RANK": "1"}
    assert _point(env, ("all_to_all",)).returncode == 0  # no file yet: nothing armed
    arm.write_text("all_to_all:0:*\n")
    assert _point(env, ("all_to_all",)).returncode == 0 and arm.exists()  # armed for rank 0 only
    arm.write_text("all_to_all:1:*\n")
    before = time.time()
    proc = _point(env, ("checkpoint_write", 8), ("all_to_all",))
    assert proc.returncode == -signal.SIGKILL and proc.stdout.splitlines() == ["passed ('checkpoint_write', 8)"]
    fired = json.loads(fired_path(arm).read_text())
    assert fired["point"] == "all_to_all" and fired["rank"] == 1 and fired["step"] is None
    assert fired["time"] >= before and fired["spec"] == "all_to_all:1:*" and fired["pid"] > 0
    assert not arm.exists() and list(arm.parent.iterdir()) == [fired_path(arm)]  # claimed: nothing left armed
    assert _point(env, ("all_to_all",)).returncode == 0  # a restarted worker passes the point


# ---- the bookkeeping ---------------------------------------------------------------------------------------


def test_flip_bytes_keeps_the_size_and_breaks_the_checksum(tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from checkpoints.manifest import sha256_file

    path = tmp_path / "rank00000.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, str(path))
    size, digest = path.stat().st_size, sha256_file(path)
    flip_bytes(path)
    assert path.stat().st_size == size and sha256_file(path) != digest
    with safe_open(str(path), framework="pt") as fh:  # the header is intact: only the checksum can tell
        assert not torch.equal(fh.get_tensor("w"), torch.arange(1000, dtype=torch.float32))


def _record(step, t, loss=1.0, tokens_per_step=512, tps=1024.0):
    return {"step": step, "loss": loss, "tokens": step * tokens_per_step, "tokens_per_s": tps, "time": t}


def test_the_metrics_watch_tells_attempts_apart(tmp_path):
    path = tmp_path / "metrics.jsonl"
    watch = MetricsWatch(path)
    watch.poll()
    assert watch.last_step() == 0 and watch.attempt_at(100.0) == (None, 0)
    path.write_text("".join(json.dumps(_record(s, 100.0 + s)) + "\n" for s in range(1, 7)))
    watch.poll()
    assert watch.last_step() == 6
    # A fault at t=106.5; the restarted attempt rewrites the file (a new inode) up to its checkpoint (4) and
    # trains 5, 6, 7 again.
    tmp = tmp_path / "metrics.jsonl.partial"
    tmp.write_text("".join(json.dumps(_record(s, 100.0 + s)) + "\n" for s in range(1, 5)))
    tmp.replace(path)
    with open(path, "a") as fh:
        fh.write(json.dumps(_record(5, 120.0)) + "\n" + json.dumps(_record(6, 121.0)) + "\n")
        fh.write('{"step": 7, "lo')  # a line being written
    watch.poll()
    gen, at = watch.attempt_at(106.5)
    assert gen == 1 and at == 6 and watch.generation == 2 and watch.last_step() == 6
    first = watch.first_after(106.5, not_gen=gen)
    assert first["step"] == 5 and first["time"] == 120.0  # resumed from 4, 13.5 s after the fault


def test_records_a_new_attempt_keeps_are_not_its_first_step(tmp_path):
    """A fault at t=103.5 while the attempt goes on to step 6 (its records of 4-6 are newer than the fault);
    the next attempt resumes from the checkpoint of step 4 and keeps records 1-4 with their times. Its first
    new step is 5 at t=120, not the kept copy of step 4 at t=104."""
    path = tmp_path / "metrics.jsonl"
    watch = MetricsWatch(path)
    path.write_text("".join(json.dumps(_record(s, 100.0 + s)) + "\n" for s in range(1, 7)))
    watch.poll()
    tmp = tmp_path / "metrics.jsonl.partial"
    tmp.write_text("".join(json.dumps(_record(s, 100.0 + s)) + "\n" for s in range(1, 5)))
    tmp.replace(path)
    with open(path, "a") as fh:
        fh.write(json.dumps(_record(5, 120.0)) + "\n")
    watch.poll()
    gen, at = watch.attempt_at(103.5)
    assert (gen, at) == (1, 6)
    first = watch.first_after(103.5, not_gen=gen)
    assert (first["step"], first["time"], first["_gen"]) == (5, 120.0, 2)
    assert [r["_kept"] for r in watch.records if r["_gen"] == 2] == [True] * 4 + [False]


def test_goodput_and_losses():
    faults = [{"index": 1, "kind": "kill", "rank": 0, "at_step": 10, "resumed_from": 8, "steps_recomputed": 2,
               "recovery_s": 12.0, "recovered": True, "note": "SIGKILL of rank 0"},
              {"index": 2, "kind": "hang", "rank": 1, "at_step": 15, "resumed_from": 12, "steps_recomputed": 3,
               "recovery_s": 30.0, "recovered": True, "note": "SIGSTOP"},
              {"index": 3, "kind": "node", "rank": 1, "at_step": 20, "resumed_from": 20, "steps_recomputed": 0,
               "recovery_s": 20.0, "recovered": True, "note": ""}]
    g = goodput(faults, wall_s=200.0, useful_s=50.0)
    assert (g["steps_recomputed_median"], g["steps_recomputed_max"]) == (2, 3)
    assert (g["recovery_s_median"], g["recovery_s_max"]) == (20.0, 30.0)
    assert g["useful_fraction"] == 0.25 and g["recovered"] == 3
    table = format_table({"faults": faults, "goodput": g})
    assert "recomputed" in table.splitlines()[0] and "recovery s" in table.splitlines()[0]
    assert "steps recomputed: median 2, max 3" in table and table.count("\n") == 6
    assert _phases(100.0, 150.0, starts=[120.0, 121.0], runs=[140.0, 141.0]) == {
        "restart_s": 20.0, "setup_s": 20.0, "first_step_s": 9.0}
    assert _phases(100.0, 150.0, starts=[], runs=[]) == {"restart_s": None, "setup_s": None, "first_step_s": None}
    assert "seconds to the first new step: median 20.0, max 30.0" in table and "25.0% of it" in table
    records = [_record(s, float(s), tps=512.0) for s in (1, 2, 3)]  # one second per step
    assert useful_seconds(records) == 3.0
    assert compare_losses(records, records)["equal"]
    other = [dict(r) for r in records]
    other[1]["loss"] = 1.0 + 2 ** -40
    diff = compare_losses(other, records)
    assert not diff["equal"] and diff["differ_count"] == 1 and diff["differ"][0]["step"] == 2


# ---- the command -------------------------------------------------------------------------------------------

TINY = ["parallel.dp=2", "parallel.ep=2", "cluster.num_workers=2", "train.max_steps=40", "train.seq_len=64",
        "train.global_batch_size=8", "train.micro_batch_size=2", "train.threads=1", "data.corpus_max_mb=0.5",
        "data.tokenizer_vocab_size=512", "model.vocab_size=512", "checkpoint.interval=4",
        "checkpoint.keep_last=0", "checkpoint.export=false", "cluster.collective_timeout_s=10"]


def test_the_soak_refuses_what_it_cannot_check(tmp_path):
    run = [f"run.dir={tmp_path / 'run'}"]
    soak = Soak("tiny", TINY + run, faults=10, seed=3)  # no cluster yet: only the config and the schedule
    assert soak.schedule == make_schedule(10, seed=3, last_step=40, interval=4, world=2)
    assert soak.ref_dir == tmp_path / "run-reference"
    for extra, why in ((["checkpoint.interval=0"], "checkpoint.interval > 0"),
                       (["checkpoint.keep_last=1"], "checkpoint.keep_last"),
                       (["train.max_steps=20"], "train.max_steps >= 23"),
                       (["cluster.use_gpu=true"], "cluster.use_gpu=false"),
                       (["parallel.ep=1"], "kill_all_to_all fault needs an expert-parallel all_to_all")):
        with pytest.raises(ValueError, match=why):
            Soak("tiny", TINY + run + extra, faults=10)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="already holds a run"):
        Soak("tiny", TINY + run, faults=10)
    with pytest.raises(ValueError, match="no metrics.jsonl"):
        Soak("tiny", TINY + [f"run.dir={tmp_path / 'other'}"], reference=str(tmp_path / "nothing"))


def test_the_chaos_command_is_wired():
    from pretrain.cli import build_parser

    args = build_parser().parse_args(["chaos", "tiny", "train.max_steps=40", "--faults", "12", "--seed", "7",
                                      "--kinds", "kill,hang", "--reference", "none"])
    assert (args.faults, args.seed, args.kinds, args.reference) == (12, 7, "kill,hang", "none")
    assert args.args == ["tiny", "train.max_steps=40"]
    proc = subprocess.run([sys.executable, "-m", "pretrain.cli", "chaos", "tiny", "checkpoint.interval=0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "checkpoint.interval > 0" in proc.stderr


# ---- the soak ----------------------------------------------------------------------------------------------


# The soak's run: 28 steps (the fewest that hold 10 faults at distinct steps with checkpoint.interval=4 are 23).
SOAK_STEPS = 28
SOAK = [o for o in TINY if not o.startswith("train.max_steps=")] + [f"train.max_steps={SOAK_STEPS}"]
# Seed 4 draws the three faults beyond the seven kinds among the cheap in-process kills (kill, a kill inside
# the checkpoint write, a kill inside the all_to_all): each kind once, 10 faults, every recovery a restart.
SOAK_SEED = 4


def test_the_soaks_schedule_covers_every_kind_with_cheap_extras():
    schedule = make_schedule(10, seed=SOAK_SEED, last_step=SOAK_STEPS, interval=4, world=2)
    kinds = [f.kind for f in schedule]
    assert len(schedule) == 10 and set(KINDS) <= set(kinds)
    assert sorted(kinds.count(k) for k in ("hang", "driver", "node", "corrupt")) == [1, 1, 1, 1]


@pytest.mark.slow
@pytest.mark.timeout(5400)
def test_a_chaos_soak_of_ten_faults_recovers_exactly(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "LIQUID_CACHE": str(tmp_path / "cache"),
           # Ray Train waits this long for a hung worker's process group to shut down before restarting (30 s
           # by default): the soak's hang recovers sooner, nothing else changes (a group whose worker died
           # shuts down at once, a stopped one never answers).
           "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S": "1",
           # Ray Train's controller polls its workers this often (2 s by default): a dead or stopped worker is
           # noticed sooner.
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pretrain.cli", "chaos", "tiny", f"run.dir={run_dir}", *SOAK,
                           "--faults", "10", "--seed", str(SOAK_SEED)], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=5000)
    wall = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, out[-6000:] + proc.stderr[-6000:]
    result = json.loads((run_dir / "chaos.json").read_text())
    print(f"\nsoak wall time {wall:.0f} s (cluster start, reference run and the soak)")
    print(out[out.index("goodput of"):])

    # The job finished on its own after every fault (the killed driver after `liquid resume`).
    assert result["finished"] and result["completed"] and result["ok"], result.get("error")
    assert result["summary"]["steps"] == SOAK_STEPS and not result["summary"]["stopped"]
    faults = result["faults"]
    assert len(faults) == 10 and set(KINDS) <= {f["kind"] for f in faults}
    for f in faults:
        assert f["recovered"] and not f.get("problems"), f
        assert 0 <= f["steps_recomputed"] == f["at_step"] - f["resumed_from"] and f["recovery_s"] > 0, f
        assert f["resumed_from"] % 4 == 0, f  # a checkpoint's step
    corrupt = next(f for f in faults if f["kind"] == "corrupt")
    assert corrupt["resumed_from"] == corrupt["expected_resume"] < corrupt["corrupted_step"], corrupt
    written = next(f for f in faults if f["kind"] == "kill_checkpoint_write")
    assert written["resumed_from"] < written["hook_step"], written
    driver = next(f for f in faults if f["kind"] == "driver")
    assert driver["human_step"] == f"liquid resume {run_dir}"
    commands = [d["command"] for d in result["drivers"]]
    assert commands[0].startswith("liquid pretrain tiny") and commands[1] == f"liquid resume {run_dir}", commands
    assert [d["rc"] for d in result["drivers"]] == [-signal.SIGKILL, 0] or len(commands) > 2, result["drivers"]

    # Its losses are the uninterrupted run's, bitwise (metrics.jsonl, the last record of each step).
    assert result["losses"]["equal"] and result["losses"]["steps"] == SOAK_STEPS, result["losses"]
    want = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "run-reference" / "metrics.jsonl")
                                              .read_text().splitlines())}
    got = {}
    for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        got[r["step"]] = r["loss"]
    assert sorted(got) == list(range(1, SOAK_STEPS + 1)) and got == want

    # The goodput table was printed, one row per fault, then the medians, maxima and the time spent.
    table = out[out.index("goodput of"):].splitlines()
    assert "kind" in table[1] and "recomputed" in table[1] and "recovery s" in table[1]
    assert all(any(line.split()[:2] == [str(f["index"]), f["kind"]] for line in table) for f in faults)
    assert any(line.startswith("steps recomputed: median") for line in table)
    assert any(line.startswith("seconds to the first new step: median") for line in table)
    assert any(line.startswith("wall time") and "useful steps" in line for line in table)
    assert "chaos soak: PASSED" in out
    g = result["goodput"]
    assert g["recovered"] == 10 and 0 < g["useful_fraction"] < 1
