"""pretrain/bench/sampled.py: perf's samples sorted by the code they ran (what `liquid bench hf` reports as
`sampled`). The classes of real symbols, the parsing of `perf script` lines (C++ names with spaces and
parentheses, other threads' samples), and, where perf can sample this process, a real split: a step that
only multiplies matrices lands in gemm, one that only runs Python in python."""
import threading

import pytest
import torch

from pretrain.bench.sampled import CLASSES, _probe, classify, parse_script, perf_unavailable, sampled_split

TORCH = "/venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so"


@pytest.mark.parametrize("symbol, dso, kind", [
    ("mkl_blas_avx512_sgemm_kernel_0_b0", TORCH, "gemm"),
    ("mkl_blas_avx512_sgemm_scopy_down8_ea", TORCH, "gemm"),  # the product's packing copies
    ("gblock_by_k_omp", TORCH, "gemm"),
    ("dnnl::impl::cpu::x64::brgemm_kernel_execute", TORCH, "gemm"),
    ("void (anonymous namespace)::register_tile<8, 2, false>(long, long)", "/c/kernels/liquid_scan_1.so", "gemm"),
    ("[unknown]", "/venv/lib/python3.11/site-packages/torch/lib/libgomp.so.1", "openmp_wait"),
    ("at::native::(anonymous namespace)::cpu_flash_attention<float, float, 64l, 512l, false>(at::Tensor const&)"
     "::{lambda(long, long)#2}::operator()", TORCH, "attention"),
    ("kernel._omp_fn.0", "/tmp/torchinductor_root/6i/c6iwt4iexdabrj.main.so", "compiled"),
    ("_PyEval_EvalFrameDefault", "/usr/lib/libpython3.11.so.1.0", "python"),
    ("_PyEval_EvalFrameDefault", "/usr/local/bin/python3.11", "python"),  # a statically linked interpreter
    ("clear_page_erms", "[kernel.kallsyms]", "os"),
    ("at::native::(anonymous namespace)::adam_fused_step_impl<float>", TORCH, "other"),
    ("liquid_cross_entropy_rows._omp_fn.0", "/c/kernels/liquid_loss_99d3.so", "other"),
])
def test_symbols_fall_in_their_class(symbol, dso, kind):
    assert kind in CLASSES and classify(symbol, dso) == kind


def test_perf_script_lines_are_split_by_thread():
    lines = [
        " 7035      7f5d999987f5 mkl_blas_avx512_sgemm_kernel_0 (/t/libtorch_cpu.so)",
        " 7035      7f5d999987f6 std::function<void (long, long)>::operator()(long, long) const (/t/libtorch_cpu.so)",
        " 7035      7f5e2e96a820 _PyEval_EvalFrameDefault (/usr/lib/libpython3.11.so.1.0)",
        " 7052      7f5e2d21de62 [unknown] (/t/libgomp.so.1)",
        " 7052      7f5e2d21de66 mkl_blas_avx512_sgemm_kernel_0 (/t/libtorch_cpu.so)",
        "",  # blank and malformed lines are ignored
        "garbage",
    ]
    counts = parse_script(lines, 7035)
    assert counts["thread"] == {"gemm": 1, "other": 1, "python": 1}
    assert counts["all_threads"] == {"gemm": 2, "other": 1, "python": 1, "openmp_wait": 1}


@pytest.mark.skipif(perf_unavailable() is not None, reason=f"perf cannot sample here: {perf_unavailable()}")
def test_a_real_split_sees_what_the_step_ran():
    a, b = torch.randn(768, 768), torch.randn(768, 768)

    def products():
        for _ in range(40):
            torch.mm(a, b)

    def interpreter():
        total = 0
        for i in range(300_000):
            total += i * i
        return total

    mm = sampled_split(products, 3)
    assert mm["samples"] > 20 and abs(sum(mm["split"].values()) - 1) < 1e-3
    assert mm["gemm_frac"] > 0.7, mm
    py = sampled_split(interpreter, 3)
    assert py["split"]["python"] > 0.7 and py["gemm_frac"] < 0.05, py
    assert threading.get_native_id()  # the split is the calling thread's


def test_without_perf_the_split_says_why(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # (the probe is not reached)
    assert sampled_split(lambda: None, 1) == {"skipped": "perf is not installed"}


def test_a_perf_that_cannot_record_is_reported(monkeypatch, tmp_path):
    fake = tmp_path / "perf"  # a perf that refuses, as one in a container without perf_event_open does
    fake.write_text("#!/bin/sh\necho 'Error: No permission to enable cpu-clock event.' >&2\nexit 255\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    _probe.cache_clear()
    try:
        why = sampled_split(lambda: None, 1)["skipped"]
    finally:
        _probe.cache_clear()
    assert why.startswith("perf record failed (255)") and "No permission" in why
