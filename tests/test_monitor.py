"""Throughput monitoring on a real (short, single-process) training run: the live line, metrics.jsonl,
TensorBoard events, `liquid monitor` (view, --follow, --plot) and its errors."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cluster import monitor

REPO = Path(__file__).resolve().parents[1]
SMALL = ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1", "train.max_steps=6", "train.log_interval=1",
         "train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2", "data.corpus_max_mb=0.5",
         "data.tokenizer_vocab_size=512", "model.vocab_size=512", "checkpoint.export=false"]


def train(run_dir: Path, *overrides: str) -> tuple[dict, str]:
    """Train in this process; returns the summary and what it printed (the live lines among it)."""
    from pretrain.config import load_config
    from pretrain.train.worker import train_main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = train_main(load_config("tiny", [*SMALL, f"run.dir={run_dir}", *overrides]), progress=True)
    return summary, out.getvalue()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    old = os.environ.get("LIQUID_CACHE")
    os.environ["LIQUID_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield os.environ["LIQUID_CACHE"]
    if old is None:
        os.environ.pop("LIQUID_CACHE")
    else:
        os.environ["LIQUID_CACHE"] = old


@pytest.fixture(scope="module")
def run(tmp_path_factory, cache):
    """6 steps, one record per step, a checkpoint every 3 steps."""
    run_dir = tmp_path_factory.mktemp("monitor") / "run"
    summary, printed = train(run_dir, "checkpoint.interval=3")
    return run_dir, summary, printed


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tb_scalars(directory: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def liquid(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def test_metrics_records_and_live_lines(run):
    run_dir, summary, printed = run
    records = records_of(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["tokens"] for r in records] == [s * 4 * 64 for s in range(1, 7)]
    for r in records:
        assert {"loss", "tokens_per_s", "devices", "lr", "grad_norm", "expert_load_max_over_mean",
                "expert_load_per_layer", "data_wait_frac", "mfu", "checkpoint_stall_s", "elapsed_s", "eta_s",
                "time"} <= set(r)
        assert r["mfu"] is None and r["tokens_per_s"] > 0  # CPU: no peak FLOP/s, no MFU
    # The checkpoint stall is there only in the windows where a save happened.
    assert [r["step"] for r in records if r["checkpoint_stall_s"] is not None] == [3, 6]
    assert summary["last_loss"] == records[-1]["loss"]
    lines = [line for line in printed.splitlines() if line.startswith("step ")]
    assert len(lines) == 6 and "\r" not in printed
    assert lines[-1].startswith("step      6/6 [####################] 100% 1.54k/1.54k tok")
    assert f"loss {records[-1]['loss']:.4f}" in lines[-1]
    for part in ("tok/s", "tok/s/device", "MFU n/a", "data wait", "expert load max/mean", "eta"):
        assert all(part in line for line in lines), part
    assert ["ckpt stall" in line for line in lines] == [False, False, True, False, False, True]


def test_tensorboard_events_read_back_with_the_same_values(run):
    run_dir, _, _ = run
    records = records_of(run_dir)
    tb = run_dir / "tensorboard"
    loss = tb_scalars(tb, "train/loss")
    assert sorted(loss) == [1, 2, 3, 4, 5, 6]
    for r in records:  # TensorBoard stores float32
        assert loss[r["step"]] == pytest.approx(r["loss"], rel=1e-6)
        assert tb_scalars(tb, "throughput/tokens_per_s")[r["step"]] == pytest.approx(r["tokens_per_s"], rel=1e-6)
    assert tb_scalars(tb, "throughput/tokens") == {r["step"]: r["tokens"] for r in records}
    assert set(tb_scalars(tb, "checkpoint/stall_s")) == {3, 6}
    assert len(records[-1]["expert_load_per_layer"]) == 3  # the tiny preset's MoE layers, one tag each
    for i in range(3):
        assert sorted(tb_scalars(tb, f"experts/moe_layer_{i}_load_max_over_mean")) == [1, 2, 3, 4, 5, 6]
    by_tokens = tb_scalars(tb / "by_tokens", "vs_tokens/loss")
    assert sorted(by_tokens) == [r["tokens"] for r in records]
    with pytest.raises(KeyError):  # no MFU on CPU: nothing written rather than zeros
        tb_scalars(tb, "throughput/mfu")


def test_monitor_prints_the_runs_numbers(run):
    run_dir, summary, _ = run
    records = records_of(run_dir)
    last = records[-1]
    proc = liquid("monitor", str(run_dir), "--last", "3")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"run {run_dir}: finished at step 6, 1,536 tokens" in out
    assert "latest record: step 6/6" in out and f"loss         {last['loss']:.4f}" in out
    assert f"tokens/s     {last['tokens_per_s']:,.0f} ({last['tokens_per_s']:,.0f} per device, 1 device)" in out
    assert "MFU          n/a" in out and "[####################] 100.0% of 1,536 tokens" in out
    assert "expert load  max/mean " + f"{last['expert_load_max_over_mean']:.3f}" in out
    assert "last 3 records:" in out
    table = out.split("last 3 records:\n")[1].splitlines()
    assert table[0].split() == ["step", "loss", "val", "tok/s", "tok/s/dev", "MFU", "wait", "stall", "s", "load",
                                "tokens", "elapsed"]
    assert [row.split()[0] for row in table[1:4]] == ["4", "5", "6"]
    assert table[3].split()[1] == f"{last['loss']:.4f}"
    # the preset validates after the last step (eval.interval): the held-out loss in its column and below
    assert table[2].split()[2] == "-" and table[3].split()[2] == f"{last['val/heldout/loss']:.4f}"
    assert f"val loss     heldout: {last['val/heldout/loss']:.4f}" in out
    best = min(records, key=lambda r: r["loss"])
    assert "totals: 1,536 tokens, elapsed " in out
    assert f"best loss {best['loss']:.4f} (step {best['step']}), last loss {last['loss']:.4f} (step 6)" in out
    assert "checkpoints: step_00000003, step_00000006 (latest step_00000006)" in out
    worker = json.loads((run_dir / "workers" / "rank0.json").read_text())
    assert f"rank 0    pid {worker['pid']}" in out and "finished" in out


def test_monitor_plot_writes_a_png(run, tmp_path):
    run_dir, _, _ = run
    out_png = tmp_path / "plots" / "run.png"
    proc = liquid("monitor", str(run_dir), "--plot", str(out_png))
    assert proc.returncode == 0, proc.stderr
    assert f"plot: {out_png}" in proc.stdout
    data = out_png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    import matplotlib.image

    assert matplotlib.image.imread(str(out_png)).shape == (800, 1200, 4)


def test_follow_ends_at_once_on_a_finished_run(run):
    run_dir, _, _ = run
    proc = liquid("monitor", str(run_dir), "--follow", "--interval", "0.2", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "latest record: step 6/6" in proc.stdout and "totals: 1,536 tokens" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith(f"run {run_dir}: finished at step 6")


def test_follow_prints_new_records_once_until_the_summary_appears(run, tmp_path):
    """A run in progress (replayed from the real run's files): the view, then each new record once as a live
    line, the new checkpoint and the worker's change, and the end when summary.json is written."""
    src, _, _ = run
    run_dir = tmp_path / "live"
    run_dir.mkdir()
    shutil.copy(src / "config.yaml", run_dir / "config.yaml")
    lines = (src / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "metrics.jsonl").write_text("".join(lines[:2]))
    (run_dir / "workers").mkdir()
    worker = json.loads((src / "workers" / "rank0.json").read_text())
    (run_dir / "workers" / "rank0.json").write_text(json.dumps({**worker, "status": "running"}))

    def replay():
        for line in lines[2:]:
            time.sleep(0.15)
            with (run_dir / "metrics.jsonl").open("a") as fh:
                fh.write(line[:10])  # a half-written line is not read
                fh.flush()
                time.sleep(0.05)
                fh.write(line[10:])
            if json.loads(line)["step"] == 3:
                shutil.copytree(src / "checkpoints" / "step_00000003", run_dir / "checkpoints" / "step_00000003")
        time.sleep(0.15)
        (run_dir / "workers" / "rank0.json").write_text(json.dumps(worker))
        time.sleep(0.05)
        (run_dir / "summary.json").write_text((src / "summary.json").read_text())

    thread = threading.Thread(target=replay)
    thread.start()
    out = io.StringIO()
    rc = monitor.follow(run_dir, interval=0.05, stream=out, max_wait_s=30)
    thread.join()
    assert rc == 0
    text = out.getvalue()
    live = [line for line in text.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in live] == ["3/6", "4/6", "5/6", "6/6"]  # after the first view: new only
    assert "latest record: step 2/6" in text and "checkpoint: step_00000003 complete" in text
    assert "finished" in text.splitlines()[-1] and "totals: 1,536 tokens" in text


def test_monitor_errors_are_clear(tmp_path):
    proc = liquid("monitor", str(tmp_path / "missing"))
    assert proc.returncode == 2 and f"run directory {tmp_path / 'missing'} does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train:\n  max_steps: 10\n")
    proc = liquid("monitor", str(run_dir))
    assert proc.returncode == 2 and "no metrics yet" in proc.stderr and "Traceback" not in proc.stderr
    proc = liquid("monitor", str(run_dir), "--plot", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and "no metrics yet" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = liquid("monitor", str(tmp_path / "empty"))
    assert proc.returncode == 2 and "is not a run directory" in proc.stderr
    # --follow waits for the first record instead.
    out = io.StringIO()
    assert monitor.follow(run_dir, interval=0.05, stream=out, max_wait_s=0.2) == 1
    assert "waiting for the first record" in out.getvalue()


def test_resume_purges_tensorboard_steps_of_the_abandoned_attempt(run, tmp_path):
    """Resume a copy of the run from step 3: steps 4-6 are trained again; metrics.jsonl and TensorBoard
    hold each step once, and the resumed losses equal the first attempt's (exact resume)."""
    src, _, _ = run
    run_dir = tmp_path / "resumed"
    shutil.copytree(src, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000006")
    (run_dir / "checkpoints" / "latest").write_text("step_00000003\n")
    train(run_dir, "checkpoint.resume=auto", "checkpoint.interval=3")
    records = records_of(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    loss = tb_scalars(run_dir / "tensorboard", "train/loss")
    assert sorted(loss) == [1, 2, 3, 4, 5, 6]
    assert [loss[s] for s in range(1, 7)] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    assert sorted(tb_scalars(run_dir / "tensorboard" / "by_tokens", "vs_tokens/loss")) == [r["tokens"] for r in records]
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 2
    proc = liquid("monitor", str(run_dir))
    assert proc.returncode == 0 and "over 2 attempts" in proc.stdout
