"""The learning-rate schedules, warmup-stable-decay above all: its shapes, a stable phase extended on
resume without a jump, a decay started from a checkpoint; and through `liquid pretrain` / `liquid resume`,
a resumed run's learning rates and losses equal to an uninterrupted run's."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from pretrain.config import OptimConfig, load_config
from pretrain.optim import lr_lambda, wsd_decay_start
from tests.test_cli import SINGLE, run_cli

WSD = OptimConfig(schedule="wsd", warmup_steps=4, min_lr_ratio=0.0, decay_fraction=0.25)


@pytest.mark.parametrize("shape, mid", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_warms_up_holds_then_decays_in_its_shape(shape, mid):
    f = lr_lambda(dataclasses.replace(WSD, decay_shape=shape), 40)  # decay over steps 30..40
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert all(f(s) == 1.0 for s in range(4, 31))
    assert f(35) == pytest.approx(mid)
    assert f(39) < f(38) < f(31) < 1.0
    assert f(40) == f(100) == 0.0


def test_wsd_decays_to_min_lr_ratio_from_decay_start_step():
    cfg = dataclasses.replace(WSD, decay_start_step=10, min_lr_ratio=0.1, decay_shape="linear")
    f = lr_lambda(cfg, 20)
    assert wsd_decay_start(cfg, 20) == 10
    assert f(9) == 1.0 and f(15) == pytest.approx(0.55) and f(20) == pytest.approx(0.1)
    # A decay start at or after max_steps: stable to the end.
    g = lr_lambda(dataclasses.replace(cfg, decay_start_step=20), 20)
    assert all(g(s) == 1.0 for s in range(4, 20))
    # Never inside the warmup.
    assert wsd_decay_start(dataclasses.replace(cfg, decay_start_step=2), 20) == 4


def test_extending_max_steps_during_the_stable_phase_keeps_every_past_rate():
    short, long = lr_lambda(WSD, 40), lr_lambda(WSD, 400)  # decay from 30, or from 300
    assert [short(s) for s in range(30)] == [long(s) for s in range(30)]
    # Starting the decay from a checkpoint at step 25 (resume with decay_start_step=25, max_steps=35).
    now = lr_lambda(dataclasses.replace(WSD, decay_start_step=25), 35)
    assert [now(s) for s in range(26)] == [long(s) for s in range(26)]
    assert now(26) < 1.0 and now(35) == 0.0


def test_cosine_and_constant_are_unchanged():
    cos = lr_lambda(OptimConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1), 12)
    assert cos(1) == 1.0 and cos(2) == 1.0 and cos(7) == pytest.approx(0.55) and cos(12) == pytest.approx(0.1)
    const = lr_lambda(OptimConfig(schedule="constant", warmup_steps=2), 12)
    assert [const(s) for s in range(5)] == [0.5, 1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("override, key", [("optim.schedule=wsdd", "optim.schedule"),
                                           ("optim.decay_fraction=1.5", "optim.decay_fraction"),
                                           ("optim.decay_shape=sqrt", "optim.decay_shape"),
                                           ("optim.decay_start_step=-1", "optim.decay_start_step"),
                                           ("parallel.zero_stage=3", "parallel.zero_stage")])
def test_bad_schedule_and_zero_keys_are_refused_naming_the_key(override, key):
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        load_config("tiny", [override])


def test_plan_refuses_zero_3_with_exit_2():
    proc = run_cli("plan", "tiny", "parallel.zero_stage=3")
    assert proc.returncode == 2
    assert "parallel.zero_stage" in proc.stderr and "Traceback" not in proc.stderr


def _records(run_dir):
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def test_resumed_wsd_run_matches_the_uninterrupted_one(tmp_path):
    """Uninterrupted: 8 steps, decay from step 5. Interrupted: 4 steps planned as an open-ended stable run
    (decay start 100), then `liquid resume RUN train.max_steps=8 optim.decay_start_step=5`."""
    env = {"LIQUID_CACHE": str(tmp_path / "cache")}
    common = ("tiny", "train.log_interval=1", "train.seq_len=64", "train.global_batch_size=4",
              "train.micro_batch_size=2", "data.corpus_max_mb=0.5", "data.tokenizer_vocab_size=512",
              "model.vocab_size=512", "optim.warmup_steps=2", "optim.schedule=wsd", "optim.decay_shape=linear",
              "checkpoint.export=false", *SINGLE)
    whole, part = tmp_path / "whole", tmp_path / "part"
    proc = run_cli("pretrain", *common, f"run.dir={whole}", "train.max_steps=8", "optim.decay_start_step=5", env=env)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("pretrain", *common, f"run.dir={part}", "train.max_steps=4", "optim.decay_start_step=100", env=env)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("resume", str(part), "train.max_steps=8", "optim.decay_start_step=5", env=env)
    assert proc.returncode == 0, proc.stderr
    a, b = _records(whole), _records(part)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [b[s]["lr"] for s in a] == [a[s]["lr"] for s in a]
    assert [b[s]["loss"] for s in a] == [a[s]["loss"] for s in a]
    lrs = [a[s]["lr"] for s in sorted(a)]
    assert lrs[1] == lrs[4] > lrs[5] > lrs[6] > lrs[7]  # stable through step 5, then the decay
