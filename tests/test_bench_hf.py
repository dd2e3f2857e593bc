"""`liquid bench hf` on the tiny --quick configuration: one JSON line, both sides' numbers, and the HF side
reported as skipped (with the reason) where transformers 5's .venv-hf5 is absent."""
import json

import pytest

from pretrain.bench import hf
from pretrain.bench.sampled import CLASSES, perf_unavailable
from pretrain.cli import main

ARGS = ["--quick", "--steps", "1", "--repeats", "1", "--warmup", "0", "--profile-steps", "1", "--sides", "ours,hf"]


def test_bench_hf_quick(capsys):
    assert main(["bench", "hf", *ARGS]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours = out["results"]["ours"]
    assert out["bench"] == "hf" and out["quick"] and ours["tokens_per_s"] > 0 and ours["params"] > 0
    prof = out["ours_profile"]
    assert 0 < prof["matmul_frac"] <= prof["matmul_frac_with_attention"] <= 1
    # profiled after the heap settled under the profiler; its page faults are reported
    assert 1 <= prof["profiled_warmup_steps"] <= hf.SETTLE_MAX_STEPS and prof["page_faults_per_step"] >= 0
    assert prof["top_non_matmul"] and all(op["op"] not in hf.MATMUL_OPS for op in prof["top_non_matmul"])
    # perf's split by code, of every side that ran (or why perf could not run)
    for side, sampled in out["sampled"].items():
        if perf_unavailable() is None:
            assert sampled["samples"] > 0 and sampled["steps"] == 1, sampled
            assert set(sampled["split"]) == set(CLASSES) and abs(sum(sampled["split"].values()) - 1) < 1e-3
        else:
            assert sampled == {"skipped": perf_unavailable()}
    if hf.hf_available() is None:
        assert out["results"]["hf"]["params"] == ours["params"]  # the same model size on both sides
        assert out["ratios"]["ours_vs_hf"] > 0
    else:
        assert "hf" in out["skipped"] and "ours_vs_hf" not in out["ratios"]


def test_bench_hf_skips_hf_without_its_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(hf, "HF5_DIR", tmp_path / "absent")
    out = hf.main_hf([*ARGS[:-1], "hf"])
    assert out["results"] == {} and "make venv-hf5" in out["skipped"]["hf"]


def test_bench_hf_rejects_unknown_sides():
    with pytest.raises(SystemExit):
        hf.main_hf(["--quick", "--sides", "ours,nope"])
