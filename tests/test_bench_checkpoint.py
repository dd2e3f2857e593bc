"""`liquid bench checkpoint --quick` through the CLI: one JSON line on stdout, sane numbers, the load restores
the state, the temp directory is gone afterwards. Timing targets are not asserted (they depend on the machine)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.bench.checkpoint import large_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_bench_checkpoint_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pretrain.cli", "bench", "checkpoint", "--quick",
                           "--dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert "[bench checkpoint]" in proc.stderr

    assert out["bench"] == "checkpoint" and out["preset"] == "tiny" and out["quick"] is True
    assert isinstance(out["machine"], str) and out["machine"] and out["torch"] and out["cores"] >= 1
    assert out["repeats"] >= 1 and out["steps"] >= 1 and isinstance(out["note"], str)
    assert isinstance(out["async_stall_under_tenth"], bool)
    assert out["load_restores"] is True
    assert [r["model"] for r in out["results"]] == ["tiny", "large"]
    tiny, large = out["results"]
    assert large["params"] > tiny["params"] > 0
    for r in out["results"]:
        # fp32 weights + two Adam moments, plus headers, buffers, RNG state and JSON: a bit over 12 bytes/param
        assert 12 * r["params"] <= r["checkpoint_bytes"] < 13 * r["params"] + 2_000_000
        assert r["load_restores"] is True and "load_mismatch" not in r
        for key in ("save_gb_per_s", "load_gb_per_s", "verify_gb_per_s", "restore_gb_per_s", "gather_gb_per_s"):
            assert r[key] > 0, key
        for key in ("save_s", "load_s", "verify_s", "restore_s", "sync_stall_s", "async_stall_s", "async_write_s"):
            assert r[key] > 0, key
        assert r["sync_stall_s"] == r["save_s"]
        assert r["load_s"] == pytest.approx(r["verify_s"] + r["restore_s"], abs=2e-4)
        assert r["async_write_s"] >= r["async_stall_s"]
        assert r["async_over_sync_stall"] == pytest.approx(r["async_stall_s"] / r["sync_stall_s"], rel=0.01, abs=1e-3)
        assert isinstance(r["async_stall_under_tenth"], bool)
        t = r["training"]
        assert t["steps"] == out["steps"] and t["tokens_per_step"] > 0
        assert t["baseline_s"] > 0 and t["with_async_save_s"] > 0 and t["step_s_baseline"] > 0
        assert t["save_call_stall_s"] > 0 and t["writer_wait_after_s"] >= 0
        assert isinstance(t["slowdown_s"], float) and isinstance(t["writer_done_within_steps"], bool)
        assert all(len(v) == out["repeats"] for v in r["samples_s"].values())
    ref = out["reference"]
    assert ref["disk_write_bytes"] == large["checkpoint_bytes"]
    assert ref["disk_write_gb_per_s"] > 0 and ref["sha256_gb_per_s"] > 0
    assert ref["host_copy_fresh_gb_per_s"] > 0 and ref["host_copy_reused_gb_per_s"] > 0
    assert list(tmp_path.iterdir()) == []  # the benchmark's temp directory was deleted


def test_large_overrides_are_a_valid_config():
    from pretrain.config import load_config

    cfg = load_config("tiny", ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1"] +
                      large_overrides(d_model=640, layers=8, experts=16, expert_dim=512))
    assert cfg.model.d_model == 640 and cfg.model.num_layers == 8 and cfg.model.moe.num_experts == 16
    assert cfg.model.attention_layers == [2, 6] and cfg.model.dense_dim == 1920
