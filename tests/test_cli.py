import json
import subprocess
import sys
from pathlib import Path

import pytest

LIQUID = [sys.executable, "-m", "pretrain.cli"]


def run_cli(*args, cwd=None):
    return subprocess.run([*LIQUID, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_pretrain_smoke_through_the_real_entry_point(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("pretrain", "tiny", f"run.dir={run_dir}", "train.max_steps=6", "train.log_interval=2",
                   "train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2",
                   "data.corpus_max_mb=0.5")
    assert proc.returncode == 0, proc.stderr
    assert "step      6/6" in proc.stdout and "tok/s" in proc.stdout and "eta" in proc.stdout
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    for r in records:
        assert {"step", "loss", "tokens", "tokens_per_s"} <= set(r)
    assert records[-1]["tokens"] == 6 * 4 * 64
    assert (run_dir / "config.yaml").exists() and "max_steps: 6" in (run_dir / "config.yaml").read_text()


def test_cli_errors_are_clear_and_exit_2():
    proc = run_cli("pretrain", "train.max_step=5")
    assert proc.returncode == 2
    assert "did you mean 'train.max_steps'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_plan_json():
    proc = run_cli("plan", "liquid-8b-a1b", "--json")
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert 8.2e9 < plan["params_total"] < 8.45e9 and 1.45e9 < plan["params_active"] < 1.6e9
    text = run_cli("plan", "liquid-8b-a1b").stdout
    assert "active" in text and "days" in text
