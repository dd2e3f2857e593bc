"""`liquid dryrun`: one rank of a layout on fake tensors through the real code, checked against the plan's
arithmetic and against the allocator's peak of real CPU runs (real gloo ranks, the real DeepSpeed engine)."""
from __future__ import annotations

import json

import pytest

from pretrain.config import load_config
from pretrain.train.dryrun import advice, dry_run, format_report, planned_counts, real_step_peak, report
from tests.distributed.harness import run_distributed
from tests.test_cli import run_cli

ONE_RANK = ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1"]
# Two sizes that fit this machine, at the tiny preset's layout (dp=2, ep=2, ZeRO-1, fp32 on the CPU).
REAL_SIZES = {
    "tiny": [],
    "wider-longer": ["model.d_model=256", "train.seq_len=512", "train.micro_batch_size=4", "train.global_batch_size=8"],
}


def _real_peak(rank, world, overrides):
    return real_step_peak(load_config("tiny", overrides))


@pytest.mark.parametrize("size", list(REAL_SIZES))
def test_dry_run_total_is_the_real_runs_peak(size):
    """The dry run's peak per rank is within 10% of what the CPU allocator held at the peak of real steps
    on real gloo ranks with DeepSpeed ZeRO-1 (same layout, same sizes)."""
    overrides = REAL_SIZES[size]
    dry = dry_run(load_config("tiny", overrides))["bytes"]["total"]
    real = run_distributed(_real_peak, 2, overrides, timeout=600)
    for rank, peak in enumerate(real):
        assert abs(dry / peak - 1) < 0.10, f"{size} rank {rank}: dry run {dry:,} vs real {peak:,} bytes"


def test_dry_run_one_process_matches_the_allocator():
    """One process, the real LocalEngine: the fake-tensor peak is the allocator's, within 5%."""
    cfg = load_config("tiny", ONE_RANK)
    dry = dry_run(cfg)["bytes"]["total"]
    real = real_step_peak(cfg)
    assert abs(dry / real - 1) < 0.05, (dry, real)


@pytest.mark.parametrize("checkpointing", ["none", "selective", "full"])
def test_plan_agrees_with_the_dry_run(checkpointing):
    """tiny at its preset layout (dp=2, ep=2, ZeRO-1, fp32 on the CPU): every memory line of the plan within
    10% of the dry run (the state lines exactly: the ZeRO partitions of the real optimizer groups), FLOPs
    per token within 2% (what backward recomputes included)."""
    cfg = load_config("tiny", [f"train.activation_checkpointing={checkpointing}"])
    rep = report(cfg, dry_run(cfg))
    for line in ("parameters", "gradients", "optimizer", "communication"):
        assert rep["lines"][line]["ratio"] == pytest.approx(1.0, abs=0.01), (line, rep["lines"][line])
    for line in ("activations", "total"):
        assert rep["lines"][line]["ratio"] == pytest.approx(1.0, abs=0.10), (line, rep["lines"][line])
    assert rep["lines"]["flops_per_token"]["ratio"] == pytest.approx(1.0, abs=0.02)


def test_plan_for_the_128k_preset_fits_an_h100():
    from pretrain.train.plan import build_plan

    plan = build_plan(load_config("liquid-8b-a1b-128k"))
    assert plan["layout"]["cp"] == 8 and plan["layout"]["seq_len"] == 131072
    assert plan["memory_gib_per_rank"]["total"] < 80e9 / 2**30


def test_zero_stage_two_partitions_gradients():
    stage1 = dry_run(load_config("tiny"))["bytes"]
    stage2 = dry_run(load_config("tiny", ["parallel.zero_stage=2"]))["bytes"]
    assert stage2["gradients"] < 0.95 * stage1["gradients"]  # dense partitions halve; experts (expert dp 1) do not
    assert stage2["optimizer"] == stage1["optimizer"]


def test_activation_checkpointing_saves_in_the_dry_run_and_in_a_real_run():
    """One process, tiny at 8 x 1024 tokens: full recompute lowers the dry run's peak and the allocator's
    peak of a real run alike (the saving agrees within 10% of the real one)."""
    dry, real = {}, {}
    for mode in ("none", "full"):
        cfg = load_config("tiny", ONE_RANK + ["train.seq_len=1024", f"train.activation_checkpointing={mode}"])
        dry[mode] = dry_run(cfg)["bytes"]["total"]
        real[mode] = real_step_peak(cfg)
    saved_dry, saved_real = dry["none"] - dry["full"], real["none"] - real["full"]
    print("peak bytes none / full: dry run", dry, "real", real)
    assert saved_real > 0.3 * real["none"]
    assert abs(saved_dry / saved_real - 1) < 0.10, (saved_dry, saved_real)


def test_planned_counts():
    assert planned_counts(64, 8, 1.0) == [8] * 8
    hot = planned_counts(64, 8, 2.0, hot=3)
    assert sum(hot) == 64 and hot[3] == 16 and max(hot[:3] + hot[4:]) <= 7
    with pytest.raises(ValueError, match="imbalance"):
        planned_counts(64, 8, 0.5)


def test_an_imbalanced_expert_costs_memory_on_its_rank():
    """dp=2, ep=2: with this rank's first expert at 3x the mean, the rank receives more rows (the
    all_to_all's receive buffers and its experts' activations grow)."""
    from pretrain.train.dryrun import DryRunOptions

    balanced = dry_run(load_config("tiny"))["bytes"]["activations"]
    skewed = dry_run(load_config("tiny"), DryRunOptions(imbalance=3.0))["bytes"]["activations"]
    assert skewed > balanced


def test_cli_json_and_a_layout_that_does_not_fit():
    """A CUDA layout over the H100's memory: exit 1, the overflowing line named with the fix to try."""
    # The plain head's loss peaks at 12 bytes x vocab per token: 103 GB at 131,072 tokens of a 65,536
    # vocabulary (model.loss_chunk_tokens=0; the chunked loss holds one chunk's logits).
    big = ["train.device=cuda", "train.dtype=bf16", "model.vocab_size=65536", "train.seq_len=16384",
           "train.micro_batch_size=8", "train.global_batch_size=16", "model.loss_chunk_tokens=0"]
    out = run_cli("dryrun", "tiny", *big, "--json")
    assert out.returncode == 1, out.stderr[-2000:]
    rep = json.loads(out.stdout)
    assert rep["fits"]["fits"] is False and "activations" in rep["fits"]["advice"]
    assert "activation_checkpointing" in rep["fits"]["advice"]
    assert set(rep["lines"]) >= {"parameters", "gradients", "optimizer", "activations", "communication", "total",
                                 "flops_per_token"}
    text = format_report(rep)
    assert "NO:" in text and "GiB over the budget" in text


def test_cli_impossible_layout_names_the_key():
    out = run_cli("dryrun", "tiny", "parallel.ep=3")
    assert out.returncode == 2 and "parallel.ep" in out.stderr


def test_advice_names_the_line():
    layout = {"activation_checkpointing": "none", "micro_batch": 4, "cp": 1, "ep": 8, "zero_stage": 1, "world": 64}
    lines = {"parameters": 1, "gradients": 1, "optimizer": 50 * 2**30, "activations": 1, "communication": 1,
             "total": 90 * 2**30}
    text = advice(lines, 80e9, layout)
    assert "optimizer" in text and "parallel.ep" in text
