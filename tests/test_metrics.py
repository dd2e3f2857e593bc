"""The live progress line, metrics.jsonl and TensorBoard events of MetricsLogger (no training here; a real
run's metrics are checked in tests/test_monitor.py)."""
import io
import json

import pytest

from pretrain.train.metrics import MetricsLogger, ProgressPrinter, fmt_duration, human, run_target


def record(step, loss=2.5, *, tokens_per_step=1000, **extra):
    r = {"step": step, "loss": loss, "tokens": step * tokens_per_step, "tokens_per_s": 8000.0, "devices": 4,
         "lr": 3e-4, "grad_norm": 1.5, "expert_load_max_over_mean": 1.25, "expert_load_per_layer": [1.1, 1.25],
         "data_wait_frac": 0.02, "mfu": 0.41, "checkpoint_stall_s": None}
    return {**r, **extra}


def scalars(directory, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_progress_line_has_every_field_on_one_line():
    out = io.StringIO()
    ProgressPrinter(max_steps=100, stream=out)(record(25, checkpoint_stall_s=0.5, elapsed_s=62, eta_s=190))
    text = out.getvalue()
    assert text.count("\n") == 1 and "\r" not in text
    line = text.rstrip("\n")
    assert line.startswith("step     25/100 [#####...............]  25% 25k/100k tok | loss 2.5000 | ")
    for part in ("lr 3.00e-04", "8,000 tok/s", "2,000 tok/s/device", "MFU 41.0%", "data wait 2.0%",
                 "ckpt stall 0.50s", "expert load max/mean 1.25", "elapsed 1m02s", "eta 3m10s"):
        assert f"| {part}" in line, (part, line)


def test_progress_line_without_mfu_or_save_and_toward_max_tokens():
    out = io.StringIO()
    # max_tokens ends the run at step 50 (50k tokens), before max_steps=100.
    ProgressPrinter(max_steps=100, max_tokens=50_000, stream=out)(record(10, mfu=None, elapsed_s=5, eta_s=20))
    line = out.getvalue()
    assert "step     10/50 [####................]  20% 10k/50k tok" in line
    assert "MFU n/a" in line and "ckpt stall" not in line


def test_run_target_and_formatting_helpers():
    assert run_target(record(10), max_steps=100) == (100, 100_000)
    assert run_target(record(10), max_steps=100, max_tokens=20_500) == (21, 20_500)  # ceil, as the loop does
    assert run_target(record(10), max_steps=100, max_tokens=10**9) == (100, 100_000)
    assert human(2_048_000) == "2.05M" and human(38e12) == "38T" and human(512) == "512"
    assert fmt_duration(62) == "1m02s" and fmt_duration(7300) == "2h01m" and fmt_duration(3 * 86400 + 7200) == "3d02h"


def test_logger_writes_jsonl_and_tensorboard_and_eta_counts_toward_max_tokens(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(tmp_path, max_steps=100, max_tokens=10_000, printer=ProgressPrinter(
        max_steps=100, max_tokens=10_000, stream=out))
    for step in (1, 2):
        logger.log(record(step, loss=5.0 - step))
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all({"elapsed_s", "eta_s", "time"} <= set(r) for r in rows)
    # 10 steps in all (10k tokens at 1k per step): the ETA is 8 steps away, not 98.
    assert rows[1]["eta_s"] == pytest.approx(rows[1]["elapsed_s"] / 2 * 8, abs=0.2)
    assert len(out.getvalue().splitlines()) == 2 and "/10 " in out.getvalue()
    tb = tmp_path / "tensorboard"
    assert scalars(tb, "train/loss") == {1: 4.0, 2: 3.0}
    assert scalars(tb, "throughput/tokens_per_s_per_device") == {1: 2000.0, 2: 2000.0}
    assert scalars(tb, "experts/moe_layer_1_load_max_over_mean") == {1: 1.25, 2: 1.25}
    assert scalars(tb, "throughput/mfu")[2] == pytest.approx(0.41)
    assert scalars(tb / "by_tokens", "vs_tokens/loss") == {1000: 4.0, 2000: 3.0}


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(tmp_path, max_steps=10, enabled=False)
    logger.log(record(1))
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_resume_purges_the_steps_of_the_crashed_attempt(tmp_path):
    """Attempt 1 logs steps 1-6 and dies; attempt 2 resumes from step 3 and logs 4-6 again (other losses):
    metrics.jsonl and TensorBoard show each step once, with attempt 2's values."""
    first = MetricsLogger(tmp_path, max_steps=6)
    for step in range(1, 7):
        first.log(record(step, loss=float(step)))
    first.close()
    second = MetricsLogger(tmp_path, max_steps=6, start_step=3)
    for step in range(4, 7):
        second.log(record(step, loss=10.0 * step))
    second.close()
    expected = {1: 1.0, 2: 2.0, 3: 3.0, 4: 40.0, 5: 50.0, 6: 60.0}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in rows} == expected and len(rows) == 6
    tb = tmp_path / "tensorboard"
    assert scalars(tb, "train/loss") == expected
    assert scalars(tb, "train/grad_norm") == {s: 1.5 for s in expected}  # every tag purged, not only the first
    assert scalars(tb / "by_tokens", "vs_tokens/loss") == {s * 1000: v for s, v in expected.items()}
    # A fresh run in the same directory starts over: old events are removed like the old records.
    fresh = MetricsLogger(tmp_path, max_steps=6)
    fresh.log(record(1, loss=7.0))
    fresh.close()
    assert scalars(tb, "train/loss") == {1: 7.0}
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1
