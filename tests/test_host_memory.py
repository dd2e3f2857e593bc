"""train.keep_host_memory: a CPU rank's freed tensors are reused without page faults (glibc's malloc told to
keep freed memory; pretrain/train/host_memory.py), set by the worker's placement stage. Measured in fresh
interpreters by the minor page faults (getrusage) of making a 64 MiB tensor a second time."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = 64 * 2**20 // 4096  # pages of the 64 MiB tensor

PROBE = """
import resource, sys, torch
from pretrain.config import load_config
from parallel.topology import single_process_topology
from pretrain.train.worker import placement
keep = sys.argv[1] == "true"
placement(load_config("tiny", ["train.device=cpu", f"train.keep_host_memory={sys.argv[1]}"]).train,
          single_process_topology())
def faults_of_a_fresh_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(16 * 2**20).fill_(1.0)
    del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_tensor()
print(min(faults_of_a_fresh_tensor() for _ in range(3)))
"""


def _faults(keep: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, keep], cwd=REPO, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_a_cpu_rank_reuses_freed_host_memory_without_page_faults():
    kept, system = _faults("true"), _faults("false")
    assert system > PAGES // 2, f"glibc's defaults: a fresh 64 MiB tensor faulted only {system} pages"
    assert kept < PAGES // 20, f"train.keep_host_memory=true: a fresh 64 MiB tensor still faulted {kept} pages"
