"""Smoke test of the scan benchmark CLI at tiny sizes: one JSON line on stdout with the documented schema."""
import json

import pytest

from pretrain.bench.scan import CASES, main_scan


def test_main_scan_quick_schema(capsys):
    argv = [
        "--quick", "--seqs", "64,128", "--heads", "2", "--key-dim", "8", "--value-dim", "8",
        "--elementwise-channels", "16", "--chunk-size", "16", "--repeats", "1",
        "--reference-max-seq", "64", "--sdpa-max-seq", "64", "--doc-len", "16",
    ]
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

    by_key = {(r["case"], r["seq"]): r for r in out["results"]}
    assert len(by_key) == len(out["results"]) == len(CASES) * 2
    for case in CASES:
        for seq in (64, 128):
            r = by_key[(case, seq)]
            if "skipped" in r:
                assert isinstance(r["skipped"], str) and r["skipped"]
                continue
            assert r["tokens_per_s"] > 0 and r["seconds"] > 0
            # seconds is rounded to 1e-9 s and tokens_per_s to 0.1: allow for both roundings.
            assert abs(r["tokens_per_s"] - seq / r["seconds"]) <= r["tokens_per_s"] * (1e-3 + 1e-9 / r["seconds"]) + 0.1
            assert isinstance(r["peak_mem_mib"], (int, float))
    # Everything at seq 64 is measured; at 128 the reference is over its limit and sdpa is skipped with estimates.
    assert all("tokens_per_s" in by_key[(case, 64)] for case in CASES)
    assert "tokens_per_s" in by_key[("chunked", 128)] and "tokens_per_s" in by_key[("elementwise", 128)]
    assert "reference_max_seq" in by_key[("reference", 128)]["skipped"]
    sdpa_skip = by_key[("sdpa", 128)]["skipped"]
    assert "estimate" in sdpa_skip and "quadratic" in sdpa_skip and "GiB" in sdpa_skip
    # Attention in packed documents: the dense [seq, seq] mask is quadratic like sdpa; the blocks are not.
    assert "sdpa_max_seq" in by_key[("docs_dense", 128)]["skipped"]
    assert "tokens_per_s" in by_key[("docs_blocks", 128)]
    assert out["config"]["doc_len"] == 16 and out["config"]["cases"] == list(CASES)

    assert set(out["summary"]) == {
        "chunked_vs_sdpa_at_4096", "chunked_16384_over_4096_time", "chunked_65536_peak_mem_gib",
    }
    assert all(v is None for v in out["summary"].values())  # none of those seqs was run
    # Progress goes to stderr, one line per (case, seq).
    assert sum("[bench scan]" in line for line in captured.err.splitlines()) == len(CASES) * 2


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
