"""`liquid bench gpu` at its quick sizes on the CPU: the JSON lines' schema per section, the FLOP count of the
step against flops.py, the summary's targets (null where not measured), plus the lookup tables and errors."""
import contextlib
import io
import json

import pytest
import torch

from pretrain.bench.gpu import (PRESET, QUICK_OVERRIDES, SLICE_LAYERS, SLICE_START, main_gpu, parse_args,
                                peak_bandwidth, scan_bytes, slice_overrides)
from pretrain.cli import main as cli_main
from pretrain.config import load_config
from pretrain.train.flops import flops_per_token

QUICK_SEQS, QUICK_MEMORY_SEQS, QUICK_STEP_SEQ = (256, 512), (256, 512, 1024), 256
SINGLE = ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick CPU run shared by the tests below: (returned lines, stdout, stderr, the --out file)."""
    out_file = tmp_path_factory.mktemp("bench_gpu") / "lines.jsonl"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        returned = main_gpu(["--quick", "--device", "cpu", "--out", str(out_file)])
    return returned, stdout.getvalue(), stderr.getvalue(), out_file.read_text()


def _lines(quick_run):
    return quick_run[0]


def test_stdout_is_one_json_line_per_measurement_then_the_summary(quick_run):
    returned, out, err, written = quick_run
    printed = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert printed == json.loads(json.dumps(returned))
    assert [json.loads(line) for line in written.splitlines()] == printed  # --out appends the same lines
    assert [d["section"] for d in printed][-1] == "summary"
    assert sum(d["section"] == "summary" for d in printed) == 1
    assert not [d for d in printed if "error" in d], "no measurement may fail at the quick sizes"
    # Progress on stderr: a header, then one line per measurement.
    assert sum(line.startswith("[bench gpu]") for line in err.splitlines()) == len(printed)


def test_scan_section(quick_run):
    scan = [d for d in _lines(quick_run) if d["section"] == "scan"]
    by = {(d["case"], d.get("impl") or d.get("liquid_impl"), d["seq"]): d for d in scan}
    assert len(by) == len(scan) == len(QUICK_SEQS) * 9  # liquid_scan x4 impls, sdpa, mixers x4 impls
    for seq in QUICK_SEQS:
        d = by[("liquid_scan", "pytorch", seq)]
        assert d["seconds"] > 0 and all(r > 0 for r in d["runs"]) and d["tokens_per_s"] > 0
        assert d["bytes"] == scan_bytes(1, seq, d["heads"], d["key_dim"], d["value_dim"])
        assert d["bytes_per_s"] == pytest.approx(d["bytes"] / d["seconds"], rel=1e-3)
        assert d["flops_per_s"] == pytest.approx(d["flops"] / d["seconds"], rel=1e-3)
        assert d["peak_bandwidth"] is None and d["bandwidth_fraction"] is None  # CPU: unknown peak
        assert (d["heads"], d["key_dim"], d["value_dim"], d["chunk_size"]) == (2, 16, 32, 32)  # --quick widths
        assert d["forward_seconds"] > 0 and d["backward_seconds"] == pytest.approx(d["seconds"] - d["forward_seconds"])
        for impl in ("triton", "triton_recompute", "triton_parallel"):
            assert "CUDA" in by[("liquid_scan", impl, seq)]["skipped"]
            assert "CUDA" in by[("mixers", impl, seq)]["skipped"]
        s = by[("sdpa", None, seq)]
        assert s["seconds"] > 0 and s["flops"] == 6 * seq * s["heads"] * s["head_dim"] * seq
        assert isinstance(s["backend"], (str, type(None)))
        mx = by[("mixers", "pytorch", seq)]
        assert mx["liquid_seconds"] > 0 and mx["attention_seconds"] > 0
        assert mx["liquid_faster_than_attention"] == (mx["liquid_seconds"] < mx["attention_seconds"])


def test_step_section_counts_flops_as_flops_py(quick_run):
    steps = [d for d in _lines(quick_run) if d["section"] == "step"]
    # CPU: no Triton, so one step on whole rows and one on packed documents of 64 tokens, with the scan the
    # model takes here (the C++ kernel where it builds).
    from pretrain.model import scan_cpu

    assert [d["doc_len"] for d in steps] == [None, 64]
    expected = "cpu_kernel" if scan_cpu.chunked_available() else "pytorch"
    assert [d["liquid_scan_impl"] for d in steps] == [expected, expected]
    assert steps[0]["attention_backend"].startswith("sdpa ")
    assert steps[1]["attention_backend"] == "document mask: blocks"
    assert all(d["host_syncs_per_step"] is None for d in steps)  # counted on CUDA only
    step = steps[0]
    preset = load_config(PRESET, SINGLE).model
    assert step["layer_types"] == preset.layer_types()[SLICE_START:SLICE_START + SLICE_LAYERS]
    assert step["ffn_types"] == ["moe"] * SLICE_LAYERS
    # The slice rebuilt independently: the quick widths plus the layer selection.
    sliced = load_config(PRESET, QUICK_OVERRIDES + SINGLE + [
        f"model.num_layers={SLICE_LAYERS}", "model.attention_layers=[2]", "model.dense_layers=0"]).model
    assert step["flops_per_token"] == flops_per_token(sliced, QUICK_STEP_SEQ)
    assert step["seq"] == QUICK_STEP_SEQ and step["batch"] == 1 and step["grad_accum"] == 1
    assert step["tokens_per_step"] == QUICK_STEP_SEQ
    assert step["step_seconds"] > 0 and step["fwd_bwd_seconds"] > 0 and step["optimizer_seconds"] >= 0
    assert step["tokens_per_s"] == pytest.approx(QUICK_STEP_SEQ / step["step_seconds"], rel=1e-3)
    assert step["mfu"] is None and step["mfu_fwd_bwd"] is None and step["peak_flops"] is None  # CPU
    assert step["last_loss"] > 0 and len(step["runs"]) == 2
    assert step["precision"] == "bf16 weights and gradients, bf16 autocast, fp32 master weights and AdamW state"


def test_profile_lines(quick_run):
    profiles = [d for d in _lines(quick_run) if d["section"] == "profile"]
    # The scan at the last quick seq (32768 is not among them), and one per step line.
    assert [(d["what"], d.get("impl"), d["seq"]) for d in profiles] == [
        ("liquid_scan", "pytorch", QUICK_SEQS[-1]), ("step", None, QUICK_STEP_SEQ), ("step", None, QUICK_STEP_SEQ)]
    for d in profiles:
        assert d["timer"] == "self CPU time of aten ops" and d["total_ms"] > 0 and d["top"]
        assert sum(d["share"].values()) == pytest.approx(1.0, abs=1e-3)
        assert d["share"].get("matmul", 0) > 0  # bmm/mm are there on every path
        assert [t["ms"] for t in d["top"]] == sorted((t["ms"] for t in d["top"]), reverse=True)


@pytest.mark.parametrize("name, cls", [
    ("_liquid_scan_fwd_kernel", "scan"), ("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "matmul"), ("flash_fwd_kernel", "attention"),
    ("triton_tem_fused_flex_attention_0", "attention"), ("aten::bmm", "matmul"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_kernel_classes(name, cls):
    from pretrain.bench.gpu import kernel_class

    assert kernel_class(name) == cls


def test_memory_section(quick_run):
    memory = [d for d in _lines(quick_run) if d["section"] == "memory"]
    assert [(d["seq"], d["doc_len"]) for d in memory] == [(s, d) for s in QUICK_MEMORY_SEQS for d in (None, 128)]
    states = {d["liquid_state_bytes_per_layer"] for d in memory}
    assert len(states) == 1 and states.pop() > 0  # constant in seq
    kv = [d["attention_kv_bytes_per_layer"] for d in memory if d["doc_len"] is None]
    assert kv == sorted(kv) and kv[-1] == 4 * kv[0]  # linear in seq
    for d in memory:
        assert d["liquid_layers"] == 3 and d["attention_layers"] == 1 and d["estimated_bytes"] > 0
        assert d["attention_backend"] == ("sdpa causal" if d["doc_len"] is None else "document mask: blocks")
        assert ("peak_bytes" in d) != ("skipped" in d)
        if "peak_bytes" in d and d["peak_bytes"] is not None:
            assert d["peak_bytes"] > 0


def test_summary(quick_run):
    summary = _lines(quick_run)[-1]
    assert summary["device_type"] == "cpu" and summary["torch"] == torch.__version__ and summary["device"]
    assert summary["quick"] is True and summary["mfu"] is None and summary["peak_bandwidth"] is None
    assert summary["step_tokens_per_s"] > 0
    assert summary["targets"] == {"mfu_at_least_0_40": None, "scan_bandwidth_at_least_0_60_of_peak": None,
                                  "liquid_faster_than_flash_at_32768": None}


def test_cli_dispatches_bench_gpu(capsys):
    with pytest.raises(SystemExit) as err:
        cli_main(["bench", "gpu", "--help"])
    assert err.value.code == 0
    assert "liquid bench gpu" in capsys.readouterr().out


@pytest.mark.parametrize("name, value", [
    ("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H100 PCIe", 2.0e12), ("NVIDIA H100 NVL", 3.9e12),
    ("NVIDIA H200", 4.8e12), ("NVIDIA A100-SXM4-80GB", 2.039e12), ("NVIDIA A100 80GB PCIe", 1.935e12),
    ("NVIDIA A100-SXM4-40GB", 1.555e12), ("NVIDIA GeForce RTX 4090", None), ("AMD EPYC 7B13", None),
])
def test_peak_bandwidth_lookup(name, value):
    assert peak_bandwidth(name) == value


def test_scan_byte_model():
    # per token and head: 3 x (q, k, v in bf16 + fp32 log decay) + 2 x y; plus 2 x the fp32 state
    assert scan_bytes(1, 1, 1, 64, 128) == 3 * ((64 + 64 + 128) * 2 + 4) + 2 * 128 * 2 + 2 * 64 * 128 * 4
    assert scan_bytes(2, 10, 3, 4, 5) == 2 * 10 * 3 * (3 * (13 * 2 + 4) + 2 * 5 * 2) + 2 * 2 * 3 * 4 * 5 * 4


def test_step_defaults_to_one_rank_of_the_preset():
    """Full size: the preset's micro-batch (4 rows) and one rank's accumulation (1024 rows / (4 x dp 64)),
    so the optimizer's cost is spread over as many tokens as in training; --quick: 1 and 1."""
    from pretrain.bench.gpu import preset_accumulation

    assert preset_accumulation() == (4, 4)
    full = parse_args(["--device", "cpu"])
    assert (full.batch, full.grad_accum) == (4, 4)
    quick = parse_args(["--device", "cpu", "--quick", "--grad-accum", "2"])
    assert (quick.batch, quick.grad_accum) == (1, 2)


def test_slice_is_one_period_of_the_preset():
    preset = load_config(PRESET, SINGLE).model
    sliced = load_config(PRESET, SINGLE + slice_overrides(preset)).model
    assert sliced.layer_types() == ["liquid", "liquid", "attention", "liquid"] == preset.layer_types()[4:8]
    assert sliced.ffn_types() == preset.ffn_types()[4:8] == ["moe"] * 4
    assert (sliced.d_model, sliced.vocab_size, sliced.moe) == (preset.d_model, preset.vocab_size, preset.moe)
    with pytest.raises(ValueError, match="not all in"):
        slice_overrides(preset, start=22, count=4)


@pytest.mark.parametrize("argv, match", [
    (["--sections", "scan,bogus"], "--sections"),
    (["--seqs", "256,x"], "--seqs"),
    (["--memory-seqs", "0"], "--memory-seqs"),
    (["--steps", "0"], "--steps"),
    (["--grad-accum", "0"], "--grad-accum"),
])
def test_bad_input_is_refused_clearly(argv, match, capsys):
    with pytest.raises(SystemExit) as err:
        parse_args(["--device", "cpu", *argv])
    assert err.value.code == 2 and match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without a CUDA device")
def test_cuda_requested_without_a_device(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quick_run_on_cuda_measures_every_case():
    from pretrain.model import scan_triton

    with contextlib.redirect_stdout(io.StringIO()):
        lines = main_gpu(["--quick", "--device", "cuda"])
    triton_ok = scan_triton.triton_available()
    assert not [d for d in lines if "error" in d]
    # At the quick sizes nothing is skipped, except the Triton cases where triton is not importable.
    assert not [d for d in lines if "skipped" in d and (triton_ok or "triton" not in d["skipped"])]
    summary = lines[-1]
    steps = [d for d in lines if d["section"] == "step"]
    assert [(d["liquid_scan_impl"], d["doc_len"]) for d in steps] == (
        [("triton", None), ("triton_parallel", None), ("pytorch", None), ("triton", 64)] if triton_ok
        else [("pytorch", None), ("pytorch", 64)])
    for step in steps:
        assert (step["mfu"] is None) == (summary["peak_flops"] is None)
        assert step["host_syncs_per_step"] is not None and step["host_syncs_per_step"] >= 0
    assert steps[-1]["attention_backend"].startswith("document mask: ")
    assert all(d["peak_bytes"] > 0 for d in lines if d["section"] == "memory")

