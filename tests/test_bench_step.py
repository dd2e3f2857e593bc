"""`liquid bench step` at --quick sizes: real gloo ranks, one JSON line on stdout with both layouts."""
import json

import pytest

from pretrain.bench.step import comm_time_us, is_comm_event, main_step, parse_layouts


def test_main_step_quick(capsys, tmp_path):
    returned = main_step(["--quick", "--cache", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1, captured.out
    out = json.loads(lines[0])
    assert out == json.loads(json.dumps(returned))

    assert out["bench"] == "step" and out["preset"] == "tiny" and out["quick"] is True
    assert isinstance(out["machine"], str) and out["machine"] and out["cores"] >= 1 and out["torch"]
    assert out["seq_len"] == 64 and out["global_batch_size"] == 4 and isinstance(out["note"], str)
    by_layout = {r["layout"]: r for r in out["results"]}
    assert set(by_layout) == {"dp=1 ep=1", "dp=2 ep=2"}
    for r in out["results"]:
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(out["tokens_per_step"] / (r["step_ms"] / 1e3), rel=1e-3)
        assert r["tokens_per_s_per_rank"] == pytest.approx(r["tokens_per_s"] / r["ranks"], rel=1e-3)
        assert abs(r["compute_frac"] + r["comm_frac"] + r["data_frac"] - 1) < 0.05
        assert r["compute_ms"] > 0 and r["data_ms"] > 0 and r["comm_ms"] >= 0
        assert len(r["per_rank"]) == r["ranks"]
    assert by_layout["dp=1 ep=1"]["ranks"] == 1 and by_layout["dp=1 ep=1"]["comm_ms"] == 0
    assert by_layout["dp=2 ep=2"]["ranks"] == 2 and by_layout["dp=2 ep=2"]["comm_ms"] > 0
    assert "[bench step]" in captured.err


def test_parse_layouts():
    assert parse_layouts("1,2") == [(1, 1), (2, 2)]
    assert parse_layouts("1, dp2ep1,2,dp2ep2") == [(1, 1), (2, 1), (2, 2)]
    with pytest.raises(ValueError):
        parse_layouts("dp2ep3")
    with pytest.raises(ValueError):
        parse_layouts("two")


def test_comm_time_is_a_union_inside_steps_minus_data():
    # Two overlapping collectives (main thread enqueue, worker thread exchange) count once; time outside
    # the steps and inside data wait does not count.
    comm = [(10, 30), (15, 40), (90, 120), (200, 210)]
    steps = [(0, 100), (150, 250)]
    data = [(0, 12), (205, 208)]
    assert comm_time_us(comm, steps, data) == pytest.approx((40 - 12) + (100 - 90) + (210 - 200 - 3))
    assert comm_time_us([], steps, data) == 0


def test_comm_event_names():
    assert is_comm_event("gloo:all_reduce") and is_comm_event("c10d::alltoall_base_")
    assert not is_comm_event("aten::broadcast_tensors") and not is_comm_event("_AllToAll")
