"""Smoke tests of the scan benchmark CLI at tiny sizes: one JSON line on stdout with the documented schema.

Starting a child interpreter costs seconds on a loaded machine, so the schema test measures every case in this
process (the child's own function, `_child_result`, replaces the subprocess); one test runs the real child."""
import json

import pytest

import pretrain.bench.scan as bench
from pretrain.bench.scan import CASES, ELEMENTWISE_PAIRS, SDPA_BACKENDS, main_scan

TINY = [
    "--heads", "2", "--key-dim", "4", "--value-dim", "8", "--elementwise-channels", "16", "--chunk-size", "16",
    "--repeats", "1", "--matmul-size", "32",
]
SUMMARY_KEYS = {
    "chunked_vs_sdpa_at_4096", "sdpa_anchor_at_4096", "chunked_vs_sdpa_math_at_4096",
    "chunked_vs_sdpa_at_16384", "sdpa_anchor_at_16384", "chunked_vs_sdpa_math_at_16384",
    "matmul_flops_per_s", "chunked_flops_fraction_of_matmul_at_4096", "chunked_flops_fraction_of_matmul_at_16384",
    "chunked_flops_fraction_of_matmul_paired_at_4096", "chunked_flops_fraction_of_matmul_paired_at_16384",
    "elementwise_vs_blelloch_at_4096", "elementwise_wide_vs_blelloch_wide_at_4096",
    "elementwise_vs_blelloch_paired_at_4096", "elementwise_wide_vs_blelloch_wide_paired_at_4096",
    "chunked_16384_over_4096_time", "chunked_65536_peak_mem_gib",
}


@pytest.fixture
def in_process(monkeypatch):
    def run_child(spec, timeout_s):
        return json.loads(json.dumps(bench._child_result(spec)))

    monkeypatch.setattr(bench, "_run_child", run_child)


def _check_sdpa(r, *, forced=None):
    assert r["sdpa_kernel_ops"] and all(op.startswith("aten::") for op in r["sdpa_kernel_ops"])
    if forced is not None:
        assert r["sdpa_backend"] == forced
        assert "sdpa_probe_s" not in r
        return
    probes = r["sdpa_probe_s"]
    assert set(probes) <= set(SDPA_BACKENDS) and r["sdpa_probe_seq"] == min(r["seq"], bench.SDPA_PROBE_SEQ)
    timed = {name: t for name, t in probes.items() if isinstance(t, float)}
    untimed = [t for t in probes.values() if not isinstance(t, float)]
    assert all(isinstance(t, str) and t.startswith("not available") for t in untimed)
    assert "MATH" in timed
    # The timed backend is the fastest of those that ran, and the profiler saw its kernel.
    assert r["sdpa_backend"] == min(timed, key=timed.get)
    assert isinstance(r["sdpa_peak_reset_after_probe"], bool)


def test_main_scan_quick_schema(capsys, in_process):
    argv = ["--quick", "--seqs", "64,128", *TINY, "--reference-max-seq", "64", "--sdpa-max-seq", "64",
            "--doc-len", "16"]
    returned = main_scan(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.strip()]
    assert len(lines) == 1, captured.out
    out = json.loads(lines[0])
    assert out == json.loads(json.dumps(returned))

    assert out["bench"] == "scan"
    assert isinstance(out["device"], str) and out["device"]
    assert isinstance(out["threads"], int) and out["threads"] >= 1
    assert isinstance(out["torch"], str)
    assert out["config"]["seqs"] == [64, 128] and out["config"]["heads"] == 2 and out["config"]["repeats"] == 1
    assert out["config"]["matmul_size"] == 32

    # matmul is measured once (seq None); every other case at each seq.
    by_key = {(r["case"], r["seq"]): r for r in out["results"]}
    per_seq = [c for c in CASES if c != "matmul"]
    assert len(by_key) == len(out["results"]) == len(per_seq) * 2 + 1
    matmul = by_key[("matmul", None)]
    assert matmul["matmul_size"] == 32 and matmul["flops"] == 2 * 32**3 and matmul["flops_per_s"] > 0
    assert len(matmul["runs"]) >= 5
    for case in per_seq:
        for seq in (64, 128):
            r = by_key[(case, seq)]
            if "skipped" in r:
                assert isinstance(r["skipped"], str) and r["skipped"]
                continue
            assert r["tokens_per_s"] > 0 and r["seconds"] > 0
            # seconds is rounded to 1e-9 s and tokens_per_s to 0.1: allow for both roundings.
            assert abs(r["tokens_per_s"] - seq / r["seconds"]) <= r["tokens_per_s"] * (1e-3 + 1e-9 / r["seconds"]) + 0.1
            assert isinstance(r["peak_mem_mib"], (int, float))
            assert isinstance(r["flops"], int) and r["flops"] > 0 and isinstance(r["flops_formula"], str)
            assert r["flops_per_s"] == pytest.approx(r["flops"] / r["seconds"], rel=1e-3)
            assert r["flops_fraction_of_matmul"] == pytest.approx(r["flops_per_s"] / matmul["flops_per_s"],
                                                                  rel=1e-3, abs=1e-4)
    # Everything at seq 64 is measured; at 128 the reference is over its limit and the attention anchors are
    # skipped with estimates.
    assert all("tokens_per_s" in by_key[(case, 64)] for case in per_seq)
    for case in ("chunked", "elementwise", "blelloch", "elementwise_wide", "blelloch_wide", "docs_blocks"):
        assert "tokens_per_s" in by_key[(case, 128)], case
    assert by_key[("chunked", 64)]["flops_formula"] == "chunked_scan"
    assert by_key[("blelloch_wide", 64)]["flops"] == by_key[("elementwise_wide", 64)]["flops"]
    for fast, _ in ELEMENTWISE_PAIRS:  # the in-process pairing with Blelloch, alternating run by run
        paired = by_key[(fast, 64)]["paired"]
        assert paired["rounds"] >= bench.PAIRED_MIN_ROUNDS and paired["seconds"] > 0 and paired["anchor_seconds"] > 0
        assert paired["ratio"] == pytest.approx(paired["anchor_seconds"] / paired["seconds"], rel=1e-3)
    assert "paired" not in by_key[("blelloch", 64)] and "paired" not in by_key[("chunked", 64)]
    for case in ("chunked", "chunked_recompute"):  # the in-process pairing with the matmul, run by run
        paired = by_key[(case, 64)]["paired_matmul"]
        assert paired["rounds"] >= bench.PAIRED_MIN_ROUNDS and paired["matmul_flops_per_s"] > 0
        assert paired["flops_per_s"] > 0
        assert paired["flops_fraction_of_matmul"] == pytest.approx(
            paired["flops_per_s"] / paired["matmul_flops_per_s"], rel=1e-3, abs=1e-4)
    assert all("paired_matmul" not in r for r in out["results"] if r["case"] not in ("chunked", "chunked_recompute"))
    assert "reference_max_seq" in by_key[("reference", 128)]["skipped"]
    for case in ("sdpa", "sdpa_math"):
        skip = by_key[(case, 128)]["skipped"]
        assert "estimate" in skip and "quadratic" in skip and "GiB" in skip
    # The anchors: sdpa ran the fastest backend at equal head dims, sdpa_math the forced MATH backend.
    _check_sdpa(by_key[("sdpa", 64)])
    _check_sdpa(by_key[("sdpa_math", 64)], forced="MATH")
    assert any("math" in op for op in by_key[("sdpa_math", 64)]["sdpa_kernel_ops"])
    # sdpa has q/k head dim value_dim (8), sdpa_math key_dim (4).
    assert by_key[("sdpa", 64)]["flops"] == bench.causal_attention_flops(1, 64, 2, 8, 8)
    assert by_key[("sdpa_math", 64)]["flops"] == bench.causal_attention_flops(1, 64, 2, 4, 8)
    # Attention in packed documents: the dense [seq, seq] mask is quadratic like sdpa; the blocks are not.
    assert "sdpa_max_seq" in by_key[("docs_dense", 128)]["skipped"]
    assert out["config"]["doc_len"] == 16 and out["config"]["cases"] == list(CASES)

    assert set(out["summary"]) == SUMMARY_KEYS
    assert out["summary"]["matmul_flops_per_s"] == matmul["flops_per_s"]
    assert all(v is None for k, v in out["summary"].items() if k != "matmul_flops_per_s")  # no seq 4096 run
    # Progress goes to stderr, one line per result.
    assert sum("[bench scan]" in line for line in captured.err.splitlines()) == len(out["results"])


def test_sdpa_in_a_real_child_at_equal_head_dims():
    """The subprocess path, once: a child process measures sdpa; on the CPU the flash kernel is eligible at
    q, k, v of one head dim and was tried."""
    got = []
    results = bench.bench_scan(seqs=(32,), cases=("sdpa",), heads=2, key_dim=8, value_dim=16, repeats=1,
                               emit=got.append)
    assert got == results and len(results) == 1
    r = results[0]
    assert "skipped" not in r, r
    _check_sdpa(r)
    assert r["flops"] == bench.causal_attention_flops(1, 32, 2, 16, 16)
    if bench._device().type == "cpu":
        assert isinstance(r["sdpa_probe_s"]["FLASH_ATTENTION"], float)
        assert r["sdpa_default_backend"] == "FLASH_ATTENTION"


def test_summary_ratios_against_the_fastest_anchor():
    def m(case, seq, tokens_per_s, **more):
        return {"case": case, "seq": seq, "tokens_per_s": tokens_per_s, "seconds": seq / tokens_per_s, **more}

    results = [
        {"case": "matmul", "seq": None, "matmul_size": 64, "flops_per_s": 100.0},
        m("sdpa", 4096, 1000.0, sdpa_backend="FLASH_ATTENTION"),
        m("sdpa_math", 4096, 250.0, sdpa_backend="MATH"),
        m("sdpa", 16384, 100.0, sdpa_backend="FLASH_ATTENTION"),
        m("sdpa_math", 16384, 400.0, sdpa_backend="MATH"),  # if MATH were faster, it is the anchor
        m("chunked", 4096, 2000.0, flops_per_s=60.0),
        m("chunked", 16384, 1600.0, flops_per_s=40.0),
        m("elementwise", 4096, 900.0, paired={"rounds": 7, "seconds": 1.0, "anchor_seconds": 3.5, "ratio": 3.5}),
        m("blelloch", 4096, 300.0),
        m("elementwise_wide", 4096, 500.0), {"case": "blelloch_wide", "seq": 4096, "skipped": "why"},
    ]
    s = bench._summary(results)
    assert set(s) == SUMMARY_KEYS
    assert s["chunked_vs_sdpa_at_4096"] == 2.0 and s["sdpa_anchor_at_4096"] == "sdpa (FLASH_ATTENTION)"
    assert s["chunked_vs_sdpa_math_at_4096"] == 8.0
    assert s["chunked_vs_sdpa_at_16384"] == 4.0 and s["sdpa_anchor_at_16384"] == "sdpa_math (MATH)"
    assert s["chunked_vs_sdpa_math_at_16384"] == 4.0
    assert s["matmul_flops_per_s"] == 100.0
    assert s["chunked_flops_fraction_of_matmul_at_4096"] == 0.6
    assert s["chunked_flops_fraction_of_matmul_at_16384"] == 0.4
    assert s["elementwise_vs_blelloch_at_4096"] == 3.0 and s["elementwise_wide_vs_blelloch_wide_at_4096"] is None
    assert s["elementwise_vs_blelloch_paired_at_4096"] == 3.5 and s["elementwise_wide_vs_blelloch_wide_paired_at_4096"] is None
    assert s["chunked_16384_over_4096_time"] == 5.0 and s["chunked_65536_peak_mem_gib"] is None
    assert [f"{a}_vs_{b}_at_4096" for a, b in ELEMENTWISE_PAIRS] == [
        "elementwise_vs_blelloch_at_4096", "elementwise_wide_vs_blelloch_wide_at_4096"]


def test_flop_formulas():
    # One chunk of 4 tokens, N = 2, P = 3: forward over the 10 causal pairs 2*10*(2+3) + 4*4*2*3 = 196, times 3
    # for forward+backward.
    assert bench.chunked_scan_flops(1, 4, 1, 2, 3, 64) == 3 * 196
    # 5 tokens in chunks of 4: a chunk of 4 and one of 1 (2*1*5 + 4*1*6 = 34, no padding); batch and heads
    # multiply.
    assert bench.chunked_scan_flops(2, 5, 3, 2, 3, 4) == 3 * 2 * 3 * (196 + 34)
    # Recurrence: N = 1 is 4 P per token and head forward.
    assert bench.recurrence_flops(1, 10, 2, 1, 8) == 3 * 10 * 2 * 4 * 8
    # Causal attention: L (L + 1) / 2 pairs, 2 (N + P) each; documents add up.
    assert bench.causal_attention_flops(1, 4, 1, 2, 2) == 3 * 2 * 4 * 10
    assert bench.causal_attention_flops(1, 6, 1, 2, 2, doc_len=4) == 3 * 4 * (4 * 5 + 2 * 3)


def test_cases_are_chosen_and_unknown_ones_refused(capsys):
    with pytest.raises(SystemExit):
        main_scan(["--cases", "chunked,bogus"])
    assert "--cases: unknown ['bogus']" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["scan", "step", "data", "checkpoint", "gpu"])
def test_cli_dispatches_every_benchmark(name, capsys):
    from pretrain.cli import main as cli_main

    with pytest.raises(SystemExit) as err:
        cli_main(["bench", name, "--help"])
    assert err.value.code == 0
    assert f"liquid bench {name}" in capsys.readouterr().out


def test_warm_up_runs_until_the_heap_stops_growing():
    """The untimed runs go on past WARMUP_RUNS while the last one still took page faults (fresh memory each
    of the first four runs here), up to a cap; on other devices the faults are not counted."""
    import mmap

    import numpy as np
    import torch

    held = []

    def fresh_pages():  # 8 MiB mapped anonymously and written, one byte a page: faults whatever malloc holds
        m = mmap.mmap(-1, 8 << 20)
        np.frombuffer(m, dtype=np.uint8)[::4096] = 1
        held.append(m)

    def grows_four_times():
        if len(held) < 4:
            fresh_pages()

    assert bench._warm_up(grows_four_times, torch.device("cpu")) == 5
    assert bench._warm_up(lambda: None, torch.device("cpu")) == bench.WARMUP_RUNS
    assert bench._warm_up(fresh_pages, torch.device("cpu")) == bench.WARMUP_RUNS + bench.SETTLE_MAX_RUNS
    assert bench._warm_up(fresh_pages, torch.device("meta")) == bench.WARMUP_RUNS
