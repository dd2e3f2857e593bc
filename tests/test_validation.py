"""Validation during training (eval.interval / eval.streams / eval.tokens): the held-out loss the run logs
equals `liquid eval RUN --held-out` of the checkpoint at the same step (one process, the checkpoint's
layout-free weights) to 1e-5, on one process, at dp=2 x ep=2 and at cp=2 x ep=2 (real gloo ranks, real DeepSpeed)."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import pytest

from pretrain.config import load_config
from tests.distributed.harness import run_distributed

SMALL = ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1", "train.seq_len=64", "train.global_batch_size=8",
         "train.micro_batch_size=2", "train.threads=1", "train.log_interval=3", "data.corpus_max_mb=0.5",
         "data.tokenizer_vocab_size=512", "model.vocab_size=512", "checkpoint.interval=2", "checkpoint.keep_last=0",
         "checkpoint.export=false", "train.max_steps=4", "eval.interval=2", "eval.tokens=1000",
         "eval.micro_batch_size=3"]
LAYOUTS = {"dp2_ep2": ["parallel.dp=2", "parallel.ep=2", "cluster.num_workers=2"],
           "cp2_ep2": ["parallel.dp=1", "parallel.cp=2", "parallel.ep=2", "cluster.num_workers=2"]}


def _run(rank, world, overrides, cache):
    os.environ["LIQUID_CACHE"] = cache
    from pretrain.train.worker import train_main

    return train_main(load_config("tiny", overrides), progress=rank == 0)


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _check_against_eval(run_dir, cache, monkeypatch) -> list[dict]:
    from pretrain.train.validate import evaluate_held_out

    monkeypatch.setenv("LIQUID_CACHE", cache)
    records = _records(run_dir)
    validated = [r for r in records if "val/heldout/loss" in r]
    assert [r["step"] for r in validated] == [2, 4]  # every eval.interval steps and the last (log_interval is 3)
    assert [r["step"] for r in records] == [2, 3, 4]
    for r in validated:
        # 1000 tokens -> 16 rows of 64; each row has 64 targets unless the stream's padding cuts it
        assert 0 < r["val/heldout/tokens"] <= 16 * 64
        assert r["val/heldout/perplexity"] == pytest.approx(math.exp(r["val/heldout/loss"]))
        ref = evaluate_held_out(run_dir, step=r["step"], device="cpu")
        assert ref["step"] == r["step"] and ref["val/heldout/tokens"] == r["val/heldout/tokens"]
        assert ref["val/heldout/loss"] == pytest.approx(r["val/heldout/loss"], rel=1e-5), r["step"]
    assert validated[0]["val/heldout/loss"] != validated[1]["val/heldout/loss"]  # the weights moved
    return validated


def test_validation_equals_liquid_eval_on_one_process(tmp_path, monkeypatch, capsys):
    cache = str(tmp_path / "cache")
    run_dir = tmp_path / "one"
    summary = _run(0, 1, SMALL + [f"run.dir={run_dir}"], cache)
    out = capsys.readouterr().out
    assert summary["val_loss"] == {"heldout": _records(run_dir)[-1]["val/heldout/loss"]}
    from pretrain.cli import _done_line

    assert f"held-out loss heldout {summary['val_loss']['heldout']:.4f}" in _done_line(summary)
    assert "validation every 2 steps on heldout: 16 rows (1,024 tokens)" in out
    assert "| val heldout " in out  # the progress line
    _check_against_eval(run_dir, cache, monkeypatch)

    # TensorBoard has the held-out loss by step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val/heldout/loss")] == [2, 4]

    # liquid monitor: the table's val column, the latest validation, and the plot
    from cluster.monitor import load_state, plot, render

    text = render(load_state(run_dir))
    assert " val " in text.splitlines()[[i for i, line in enumerate(text.splitlines()) if "tok/s/dev" in line][0]]
    assert "val loss     heldout:" in text
    assert plot(load_state(run_dir), tmp_path / "plot.png").stat().st_size > 0


@pytest.mark.parametrize("layout", ["dp2_ep2", "cp2_ep2"])
def test_validation_on_two_ranks_equals_liquid_eval(tmp_path, monkeypatch, layout):
    """dp=2 x ep=2 (each rank scores half the rows), and cp=2 x ep=2 (both ranks score every row, each its
    half of the sequence, the scan's state passed between them)."""
    cache = str(tmp_path / "cache")
    run_dir = tmp_path / layout
    run_distributed(_run, 2, SMALL + LAYOUTS[layout] + [f"run.dir={run_dir}"], cache)
    _check_against_eval(run_dir, cache, monkeypatch)


def test_the_held_out_rows_do_not_depend_on_the_layout(tmp_path, monkeypatch):
    """The rows each data-parallel rank scores, put together, are the first rows of the stream in stored
    order at any dp (and the padding rows are never scored)."""
    import torch

    from parallel.topology import Topology
    from pretrain.train.step import Placement
    from pretrain.train.validate import Validator

    monkeypatch.setenv("LIQUID_CACHE", str(tmp_path / "cache"))
    cfg = load_config("tiny", SMALL + ["eval.tokens=600"])  # 10 rows: dp=4 pads the last rank's run
    seen = {}
    for dp in (1, 2, 4):
        rows = []
        for rank in range(dp):
            # one data-parallel rank of dp, as the layout sees it (no process group: the rows are what count)
            topo = dataclasses.replace(Topology.single(), world=dp, rank=rank, dp=dp, dp_rank=rank)
            v = Validator(cfg, topo, Placement(topo, torch.device("cpu")), log=lambda *a, **k: None)
            try:
                (stream,) = v.streams
                assert stream.rows == 10 and stream.per_rank == -(-10 // dp)
                got = stream.loader.next_batch(stream.per_rank)["input_ids"]
                first = rank * stream.per_rank
                rows += [got[i] for i in range(stream.per_rank) if first + i < stream.rows]
            finally:
                v.close()
        seen[dp] = torch.stack(rows)
    assert torch.equal(seen[1], seen[2]) and torch.equal(seen[1], seen[4])


def test_the_embedded_held_out_part_is_never_trained_on(tmp_path, monkeypatch):
    from data_pipeline.builtin import builtin_heldout, cache_root

    monkeypatch.setenv("LIQUID_CACHE", str(tmp_path / "cache"))
    cfg = load_config("tiny", SMALL)
    shards = builtin_heldout(cfg.data, log=lambda *_: None)
    root = cache_root()
    (d,) = [p for p in root.iterdir() if p.name.startswith("builtin-")]
    trained = {json.loads(line)["source"] for line in (d / "corpus.jsonl").open()}
    held = {json.loads(line)["source"] for line in (d / "heldout.jsonl").open()}
    assert held and trained and not held & trained
    assert os.path.isdir(shards)


def test_no_held_out_data_means_no_validation_and_says_so():
    from parallel.topology import Topology
    from pretrain.train.validate import open_validator

    said = []
    cfg = load_config("tiny", ["eval.interval=5", "data.path=/somewhere"])
    assert open_validator(cfg, Topology.single(), None, log=said.append) is None
    assert said == ["validation: off (eval.interval=5, but eval.streams names no held-out data for this data; "
                    "list eval.streams to validate)"]
    assert open_validator(load_config("tiny", ["eval.interval=0"]), Topology.single(), None) is None


def test_bad_eval_config_names_the_key():
    with pytest.raises(ValueError, match=r"eval.streams\[0\].name"):
        load_config("tiny", ["eval.interval=5", "eval.streams=[{name: 'a b', path: /x}]"])
    with pytest.raises(ValueError, match=r"eval.tokens"):
        load_config("tiny", ["eval.tokens=0"])


def test_liquid_eval_held_out_cli_errors(tmp_path, capsys):
    from pretrain.cli import main

    assert main(["eval", str(tmp_path), "--held-out", "--input", "x.txt"]) == 2
    assert "--held-out scores the run's eval streams" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "--held-out" in capsys.readouterr().err
