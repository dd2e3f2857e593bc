"""Building the liquid scan's CPU kernels, element-wise and chunked (pretrain/model/scan_cpu.py): cached per
machine, and where they cannot be built (no compiler) or are switched off, liquid_scan keeps its PyTorch
forms, with one warning that says why (none when switched off). Each case in a fresh interpreter: the build
is decided once per process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import warnings, torch
from pretrain.model import scan as S, scan_cpu
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    q, k = torch.rand(1, 20, 3, 1), torch.rand(1, 20, 3, 1)
    y, state = S.liquid_scan(q, k, torch.randn(1, 20, 3, 4), -torch.rand(1, 20, 3))
    y2, state2 = S.liquid_scan(torch.rand(1, 20, 3, 2), torch.rand(1, 20, 3, 2), torch.randn(1, 20, 3, 4),
                               -torch.rand(1, 20, 3))
print("available", scan_cpu.available(), "kernel", S._cpu_kernel() is not None, "shape", tuple(y.shape))
print("chunked", S._cpu_kernel(chunked=True) is not None, "shape", tuple(y2.shape), tuple(state2.shape))
print("warnings", len([w for w in caught if "PyTorch form" in str(w.message)]))
for w in caught:
    print("message", w.message)
"""


def _probe(tmp_path, **env) -> str:
    full = {**os.environ, "LIQUID_CACHE": str(tmp_path), **env}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env=full, capture_output=True, text=True,
                          check=True).stdout


def test_built_once_into_the_cache_and_used(tmp_path):
    out = _probe(tmp_path)
    assert "available True kernel True shape (1, 20, 3, 4)" in out and "warnings 0" in out
    assert "chunked True shape (1, 20, 3, 4) (1, 3, 2, 4)" in out
    built = list((tmp_path / "kernels").glob("liquid_scan_*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    _probe(tmp_path)  # a second process loads the cached library
    assert built[0].stat().st_mtime_ns == stamp


def test_no_compiler_falls_back_to_the_pytorch_form_with_one_warning(tmp_path):
    out = _probe(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert "available False kernel False shape (1, 20, 3, 4)" in out
    assert "chunked False shape (1, 20, 3, 4) (1, 3, 2, 4)" in out
    assert "warnings 1" in out and "could not build the CPU scan kernel" in out


def test_switched_off_takes_the_pytorch_form_silently(tmp_path):
    out = _probe(tmp_path, LIQUID_SCAN_CPU_KERNEL="0")
    assert "available False kernel False" in out and "chunked False" in out and "warnings 0" in out
    assert not (tmp_path / "kernels").exists()
