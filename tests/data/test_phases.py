"""Data-mixture phases (data.phases): each phase's rows come from its own mixture, the order stays
layout-free and deterministic, later phases go on with each stream's walk instead of reading its blocks
again, a resume may change only the phases still to come, `liquid plan` shows the phases, and through
`liquid pretrain` / `liquid resume` a run stopped in a phase or at a boundary continues with the losses
and rows of the uninterrupted run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.order import BlockOrder, PhasedOrder, RowOrder
from tests.data.test_loader import BT, global_steps, loader, steps, write_dataset
from tests.test_cli import SINGLE, run_cli

# ------------------------------------------------------------------------------------------------- the order


@pytest.mark.parametrize("lanes", [1, 2, 4])
def test_each_phase_reads_only_its_own_mixture(lanes):
    """Streams of 20 and 30 blocks; proportions [1, 0] for steps 1-3, then [0, 1]: every row of the first
    3 steps (8 rows each) is from stream 0, every later row from stream 1, over several epochs."""
    order = PhasedOrder([20, 30], [(1, [1, 0]), (4, [0, 1])], rows_per_block=4, window=3, global_batch=8,
                        lanes=lanes, seed=11)
    epoch, block, row = order(np.arange(3 * 8 + 60 * 8))
    assert (block[:24] < 20).all() and (block[24:] >= 20).all()
    assert order.phase_of([0, 23, 24, 10_000]).tolist() == [0, 0, 1, 1]
    assert epoch[24] == 0 and epoch.max() >= 2  # epochs count within the phase
    # Phase 1's first epoch: 50 blocks' rows, all from stream 1 (30 blocks): each of its blocks at least once.
    first = epoch[24:] == 0
    counts = np.bincount(block[24:][first] - 20, minlength=30)
    assert counts.sum() == 50 * 4 and counts.min() >= 4


def test_one_phase_is_the_order_without_phases_and_later_phases_leave_earlier_rows_alone():
    kw = dict(rows_per_block=4, window=3, global_batch=8, lanes=2, seed=5)
    plain = RowOrder(BlockOrder([20, 30], seed=5, proportions=[0.6, 0.4]), **kw)
    rows = np.arange(2000)
    one = PhasedOrder([20, 30], [(1, [0.6, 0.4])], **kw)
    for a, b in zip(plain(rows), one(rows)):
        assert np.array_equal(a, b)
    two = PhasedOrder([20, 30], [(1, [0.6, 0.4]), (40, [0.1, 0.9])], **kw)
    three = PhasedOrder([20, 30], [(1, [0.6, 0.4]), (40, [0.1, 0.9]), (60, [1, 1])], **kw)
    before = rows[rows < 39 * 8]
    for a, b in zip(plain(before), two(before)):
        assert np.array_equal(a, b)
    # Adding a later phase changes nothing before it starts (a resume may add or move phases to come).
    until = rows[rows < 59 * 8]
    for a, b in zip(two(until), three(until)):
        assert np.array_equal(a, b)
    assert not np.array_equal(two(rows[rows >= 39 * 8])[1], plain(rows[rows >= 39 * 8])[1])


def test_a_later_phase_goes_on_with_each_streams_walk():
    """Stream 1 (400 blocks) gets 220 blocks an epoch in phase 0 and 110 in phase 1: phase 0 (30 steps,
    part of one epoch) reserves its whole epoch's 220, phase 1 walks the next 110 of the same pass, so no
    block of stream 1 read in phase 0 comes back in phase 1's first epoch."""
    order = PhasedOrder([40, 400], [(1, [1, 1]), (31, [3, 1])], rows_per_block=2, window=4, global_batch=8,
                        lanes=2, seed=3)
    assert order.walk_offsets == [[0, 0], [220, 220]]
    _, early, _ = order(np.arange(30 * 8))
    _, late, _ = order(30 * 8 + np.arange(order.rows_per_epoch))
    early, late = set(early[early >= 40].tolist()), late[late >= 40]
    assert len(early) > 50 and len(late) == 2 * 110 and len(set(late.tolist())) == 110
    assert not early & set(late.tolist())
    # Without the walk's offset (each phase from the start of the pass) they would overlap.
    alone = RowOrder(BlockOrder([40, 400], seed=3, proportions=[3, 1], phase=1), rows_per_block=2, window=4,
                     global_batch=8, lanes=2, seed=3, phase=1)
    _, again, _ = alone(np.arange(alone.rows_per_epoch))
    assert early & set(again[again >= 40].tolist())


def test_the_order_is_deterministic_and_keyed_by_the_seed():
    rows = np.arange(500)
    make = lambda seed: PhasedOrder([20, 30], [(1, [1, 1]), (10, [1, 3])], rows_per_block=4, window=3,  # noqa: E731
                                    global_batch=8, lanes=2, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(make(1)(rows), make(1)(rows)))
    assert not np.array_equal(make(1)(rows)[1], make(2)(rows)[1])
    with pytest.raises(ValueError, match="start at step 1"):
        PhasedOrder([20, 30], [(2, [1, 1])], rows_per_block=4, window=3, global_batch=8, lanes=2, seed=1)


# ------------------------------------------------------------------------------------------------- the loader

PHASES = [(1, [1, 0]), (4, [0, 1])]
BASE_B = 30_000  # stream 1's tokens: base + block * BT + offset


@pytest.fixture
def two(tmp_path):
    return [write_dataset(tmp_path / "a", num_blocks=24), write_dataset(tmp_path / "b", num_blocks=16, base=BASE_B)]


def _stream_of(batch):
    return (batch["input_ids"][:, 0] >= BASE_B).long().tolist()


@pytest.mark.parametrize("world", [2, 4])
def test_the_rows_of_each_step_do_not_depend_on_the_layout(two, tmp_path, world):
    kw = dict(global_batch=8, phases=PHASES, phase_names=["web", "anneal"])
    with loader(two, tmp_path, **kw) as one:
        alone = steps(one, 8, micro=2)
    ranks = [loader(two, tmp_path, rank=r, world=world, **kw) for r in range(world)]
    together = global_steps(ranks, 8, micro=1)
    for r in ranks:
        r.close()
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert [set(_stream_of(s)) for s in alone] == [{0}] * 3 + [{1}] * 5


def test_the_active_phase_and_the_recorded_rows(two, tmp_path):
    record = tmp_path / "rows.jsonl"
    with loader(two, tmp_path, global_batch=4, phases=PHASES, phase_names=["web", "anneal"], record=record) as rows:
        assert rows.phase == "web" and rows.phase_at(3) == "web" and rows.phase_at(4) == "anneal"
        steps(rows, 3)
        assert rows.phase == "web"  # after step 3: the phase of the step just read
        rows.next_batch(1)
        assert rows.phase == "anneal" and rows.epoch == 0
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert [line["phase"] for line in lines] == [[0] * 4] * 3 + [[1]]
    with loader(two[:1], tmp_path) as plain:
        assert plain.phase is None and plain.phase_at(5) is None


def test_resume_may_change_only_the_phases_to_come(two, tmp_path):
    """A state after step 3 (the last of phase 0): phase 1 may move, change or be added to; phase 0 may not,
    nor may a phase be moved to start at or before step 3."""
    kw = dict(global_batch=4)
    with loader(two, tmp_path, phases=PHASES, **kw) as rows:
        steps(rows, 3)
        state = rows.state_dict()
        rest = steps(rows, 3)
    with loader(two, tmp_path, phases=PHASES, **kw) as rows:
        rows.load_state_dict(state)
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rest, steps(rows, 3)))
    with loader(two, tmp_path, phases=[(1, [2, 0]), (4, [0, 1])], **kw) as rows:
        rows.load_state_dict(state)  # the same shares: the same mixture
    moved = [(1, [1, 0]), (6, [0, 1])]
    with loader(two, tmp_path, phases=moved, **kw) as rows, loader(two, tmp_path, phases=moved, **kw) as fresh:
        rows.load_state_dict(state)
        assert rows.state_dict()["config"]["phases"] == [[1, [1.0, 0.0]], [6, [0.0, 1.0]]]
        steps(fresh, 3)
        got, want = steps(rows, 4), steps(fresh, 4)  # exactly the run planned with the moved phase
        assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, want))
        assert [set(_stream_of(s)) for s in got] == [{0}, {0}, {1}, {1}]
    for bad, why in (([(1, [1, 1]), (4, [0, 1])], "phase 0's proportions"),
                     ([(1, [1, 0]), (3, [0, 1])], "moved into the past"), (None, "phases dropped")):
        with loader(two, tmp_path, phases=bad, **kw) as rows, \
                pytest.raises(ValueError, match="data.phases changed") as err:
            rows.load_state_dict(state)
        assert "only phases starting after step 3" in str(err.value), why
    with loader(two, tmp_path, phases=PHASES, **kw) as rows:  # in phase 1, its proportions are settled
        steps(rows, 4)
        inside = rows.state_dict()
    with loader(two, tmp_path, phases=[(1, [1, 0]), (4, [1, 1])], **kw) as rows, \
            pytest.raises(ValueError, match="data.phases"):
        rows.load_state_dict(inside)
    with loader(two, tmp_path, phases=[*PHASES, (9, [1, 1])], **kw) as rows:
        rows.load_state_dict(inside)  # a phase added after the position


def test_a_run_without_phases_may_resume_with_phases_that_start_with_its_mixture(tmp_path):
    a = write_dataset(tmp_path / "a", num_blocks=24)
    b = write_dataset(tmp_path / "b", num_blocks=16, base=BASE_B)
    from data_pipeline.loader import StreamSpec

    streams = [StreamSpec(a, 0.5), StreamSpec(b, 0.5)]
    with loader(streams, tmp_path, global_batch=4) as rows:
        steps(rows, 2)
        state = rows.state_dict()
        rest = steps(rows, 2)
    with loader(streams, tmp_path, global_batch=4, phases=[(1, [0.5, 0.5]), (5, [0, 1])]) as rows:
        rows.load_state_dict(state)
        got = steps(rows, 3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(rest, got[:2]))
    assert set(_stream_of(got[2])) == {1}
    with loader(streams, tmp_path, global_batch=4, phases=[(1, [1, 0]), (5, [0, 1])]) as rows, \
            pytest.raises(ValueError, match="data.phases changed"):
        rows.load_state_dict(state)


# ------------------------------------------------------------------------------------------------- liquid plan


def test_plan_shows_each_phases_steps_and_tokens_per_stream():
    from pretrain.config import load_config
    from pretrain.train.plan import build_plan, format_plan

    cfg = load_config("tiny", ["data.streams=[{path: /d/web}, {path: /d/code}]", "train.max_steps=1000",
                               "data.phases=[{name: main, proportions: [7, 3]}, "
                               "{name: anneal, start_tokens: 3686400, proportions: [0.2, 0.8]}, "
                               "{start_step: 2000, proportions: [1, 1]}]"])
    plan = build_plan(cfg, gpus=1)
    per_step = 16 * 256
    main, anneal, late = plan["phases"]
    assert (main["start_step"], main["end_step"], main["tokens"]) == (1, 900, 900 * per_step)
    assert (anneal["start_step"], anneal["end_step"], anneal["tokens"]) == (901, 1000, 100 * per_step)
    assert [s["tokens"] for s in anneal["streams"]] == pytest.approx([0.2 * 100 * per_step, 0.8 * 100 * per_step])
    assert [s["proportion"] for s in main["streams"]] == pytest.approx([0.7, 0.3])
    assert (late["name"], late["steps"], late["reached"]) == ("phase2", 0, False)
    text = format_plan(plan)
    assert "anneal  steps 901-1,000  409.60K tokens:  /d/web 81.92K (20%)  /d/code 327.68K (80%)" in text
    assert "phase2  from step 2,000: after the run's last step, not reached" in text
    assert build_plan(load_config("tiny"), gpus=1)["phases"] == []
    assert "phases" not in format_plan(build_plan(load_config("tiny"), gpus=1))


# ------------------------------------------------------------------------------------------------- end to end

MODEL = ("model.vocab_size=512", "model.d_model=32", "model.num_layers=2", "model.mixer=conv",
         "model.attention_layers=[1]", "model.dense_layers=1", "model.dense_dim=32", "model.moe.expert_dim=16",
         "model.attention.heads=2", "model.attention.kv_heads=2", "model.attention.head_dim=16")


def _write_stream(root: Path, low: int, high: int, seed: int) -> str:
    """24 blocks of 257 random tokens in [low, high) (two streams of distinct tokens: distinct losses)."""
    from streaming import MDSWriter

    from data_pipeline import format as fmt

    rng = np.random.default_rng(seed)
    dtype = fmt.token_dtype(512)
    with MDSWriter(out=str(root), columns=fmt.mds_columns(512), hashes=["sha1"], size_limit=3000) as writer:
        for _ in range(24):
            writer.write({"tokens": rng.integers(low, high, BT).astype(dtype), "doc_starts": np.array([0], np.int32),
                          "num_tokens": BT})
    fmt.write_meta(root, {"block_tokens": BT, "dtype": dtype, "tokenizer_sha256": "t", "vocab_size": 512,
                          "eos_id": 1, "pad_id": 0})
    return str(root)


def _records(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


def _rows(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (run_dir / "rows" / "rank0.jsonl").read_text().splitlines())}


def test_a_run_resumed_in_a_phase_and_at_its_boundary_matches_the_uninterrupted_one(tmp_path):
    """Phase "web" (stream a only) for steps 1-4 (start_tokens=500 with 128 tokens a step: step 5 starts
    "anneal"), then a quarter a, three quarters b. Uninterrupted: 8 steps. Interrupted: stopped at step 2
    (inside web), 4 (the boundary), 6 (inside anneal), each time resumed: the same losses and rows."""
    a, b = _write_stream(tmp_path / "a", 2, 100, 1), _write_stream(tmp_path / "b", 300, 500, 2)
    common = ("tiny", *MODEL, "train.log_interval=1", "train.seq_len=32", "train.global_batch_size=4",
              "train.micro_batch_size=2", "optim.schedule=constant", "optim.warmup_steps=2", "checkpoint.export=false",
              f"data.cache_dir={tmp_path / 'cache'}", "data.record_rows=true",
              f"data.streams=[{{path: {a}}}, {{path: {b}}}]",
              "data.phases=[{name: web, proportions: [1, 0]}, {name: anneal, start_tokens: 500, proportions: [1, 3]}]",
              *SINGLE)
    env = {"LIQUID_CACHE": str(tmp_path / "cache")}
    whole, part = tmp_path / "whole", tmp_path / "part"
    proc = run_cli("pretrain", *common, f"run.dir={whole}", "train.max_steps=8", env=env)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("pretrain", *common, f"run.dir={part}", "train.max_steps=2", env=env)
    assert proc.returncode == 0, proc.stderr
    for stop in (4, 6, 8):
        proc = run_cli("resume", str(part), f"train.max_steps={stop}", env=env)
        assert proc.returncode == 0, proc.stderr
    want, got = _records(whole), _records(part)
    assert sorted(want) == sorted(got) == list(range(1, 9))
    assert [got[s]["loss"] for s in want] == [want[s]["loss"] for s in want]
    assert [want[s].get("phase") for s in sorted(want)] == ["web"] * 4 + ["anneal"] * 4
    assert [got[s].get("phase") for s in sorted(got)] == [want[s].get("phase") for s in sorted(want)]
    rows_want, rows_got = _rows(whole), _rows(part)
    assert rows_want == rows_got
    blocks = {s: np.asarray(r["block"]) for s, r in rows_want.items()}
    assert all((blocks[s] < 24).all() for s in range(1, 5))  # web: stream a's blocks only
    later = np.concatenate([blocks[s] for s in range(5, 9)])
    assert (later >= 24).sum() > (later < 24).sum() > 0  # anneal: mostly b
