"""Where a CPU step's time goes by the code it runs, from Linux `perf`'s timer samples: what torch.profiler
cannot see, the inside of an op.

torch.profiler times ops: flash attention's op is one event, whatever it computes inside, and a matmul op's
self time includes its dispatch and its OpenMP threads' waits. `sampled_split(step, steps)` attaches
`perf record` (a software timer, every thread of this process) to a few calls of step() and sorts the
training thread's samples by the function they landed in:

  gemm          BLAS matrix products, from any op: MKL's sgemm kernels and their packing copies (aten's mm, and
                the products inside the CPU flash attention kernel), oneDNN's, the scan kernel's register tiles
  openmp_wait   libgomp / libiomp: the training thread waiting for its OpenMP team (barriers, spinning)
  attention     the flash attention kernel's own code (its softmax, masks, copies; not its products)
  compiled      torch.compile's kernels (inductor's generated .so files)
  python        the interpreter
  os            the kernel (page faults, scheduling, system calls)
  other         everything else: aten's element-wise and reduction kernels, the optimizer, the allocator,
                the dispatcher, our loss kernel

The training thread is the one that calls step() (the other threads only run OpenMP work it hands them), so
its samples split the step's wall time. Where perf cannot run (absent, kernel.perf_event_paranoid, a
container without perf_event_open) the result says why and nothing else.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

CLASSES = ("gemm", "openmp_wait", "attention", "compiled", "python", "os", "other")
DEFAULT_HZ = 1999  # samples a second per thread (an odd rate: it does not beat with periodic work)
_ATTACH_WAIT_S = 0.5  # perf prints nothing once attached; it attaches well within this here


def classify(symbol: str, dso: str) -> str:
    """One sample's class (CLASSES) from its function and its shared object's path."""
    name = os.path.basename(dso)
    low = symbol.lower()
    if symbol.startswith("mkl_blas") or "gemm" in low or "gblock_by_k" in symbol or "register_tile" in symbol:
        return "gemm"
    if name.startswith(("libgomp", "libiomp")):
        return "openmp_wait"
    if "flash_attention" in symbol:
        return "attention"
    if name.endswith(".main.so") or "torchinductor" in dso:
        return "compiled"
    if name.startswith(("libpython", "python")):  # the shared library, or a statically linked interpreter
        return "python"
    if "kernel.kallsyms" in dso:
        return "os"
    return "other"


def parse_script(lines, tid: int) -> dict:
    """`perf script -F tid,ip,sym,dso` lines -> per-class sample counts of thread `tid` and of all threads."""
    mine, every = Counter(), Counter()
    for line in lines:
        parts = line.split(None, 2)
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        rest = parts[2].rstrip()
        symbol, _, dso = rest.rpartition(" (") if rest.endswith(")") else (rest, "", "")
        kind = classify(symbol.strip(), dso[:-1] if dso else "")
        every[kind] += 1
        if int(parts[0]) == tid:
            mine[kind] += 1
    return {"thread": dict(mine), "all_threads": dict(every)}


def perf_unavailable() -> str | None:
    """None when `perf record` can sample a process of this user here, else why not (perf absent, or its probe
    of a short command failed: kernel.perf_event_paranoid above 2, a container without perf_event_open)."""
    if shutil.which("perf") is None:
        return "perf is not installed"
    return _probe()


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    with tempfile.TemporaryDirectory(prefix="liquid-perf-") as tmp:
        try:
            proc = subprocess.run(["perf", "record", "-F", "99", "-o", str(Path(tmp) / "probe.data"), "--", "true"],
                                  capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"perf record could not run: {err}"
    if proc.returncode != 0:
        detail = " ".join(proc.stderr.split())[-300:]
        return f"perf record failed ({proc.returncode}): {detail}"
    return None


def sampled_split(step, steps: int, *, hz: int = DEFAULT_HZ) -> dict:
    """Call step() `steps` times under `perf record -p <this process>` and split the calling thread's samples
    by class (fractions of its samples), with the same split over all threads and the sample counts."""
    why = perf_unavailable()
    if why:
        return {"skipped": why}
    with tempfile.TemporaryDirectory(prefix="liquid-perf-") as tmp:
        data = Path(tmp) / "perf.data"
        rec = subprocess.Popen(["perf", "record", "-F", str(hz), "-p", str(os.getpid()), "-o", str(data)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(_ATTACH_WAIT_S)
        if rec.poll() is not None:
            return {"skipped": f"perf record exited ({rec.returncode}): {rec.stderr.read().strip()[-300:]}"}
        started = time.perf_counter()
        try:
            for _ in range(steps):
                step()
        finally:
            seconds = time.perf_counter() - started
            rec.send_signal(signal.SIGINT)
            try:
                rec.wait(timeout=60)
            except subprocess.TimeoutExpired:
                rec.kill()
        script = subprocess.run(["perf", "script", "-i", str(data), "-F", "tid,ip,sym,dso"], capture_output=True,
                                text=True, timeout=600)
        if script.returncode != 0:
            return {"skipped": f"perf script failed ({script.returncode}): {script.stderr.strip()[-300:]}"}
    counts = parse_script(script.stdout.splitlines(), threading.get_native_id())
    mine, every = counts["thread"], counts["all_threads"]
    n, n_all = sum(mine.values()), sum(every.values())
    if not n:
        return {"skipped": "perf recorded no samples of the training thread"}
    frac = {k: round(mine.get(k, 0) / n, 4) for k in CLASSES}
    return {
        "hz": hz, "steps": steps, "seconds": round(seconds, 3), "samples": n, "samples_all_threads": n_all,
        "split": frac, "split_all_threads": {k: round(every.get(k, 0) / n_all, 4) for k in CLASSES},
        "gemm_frac": frac["gemm"],
    }
