"""What the benchmarks share: their output (one JSON line on stdout, progress on stderr), device
synchronisation and timing, memory measurement, and the name of the machine."""
from __future__ import annotations

import json
import platform
import sys
import time

import torch

# Never start a measurement whose estimated peak memory exceeds this share of the memory available.
MEM_FRACTION = 0.75


# ---- output ---------------------------------------------------------------------------------------------


def print_json(obj) -> None:
    """One JSON line on stdout (a benchmark's result)."""
    print(json.dumps(obj), flush=True)


def log(bench: str, msg: str) -> None:
    """A progress line `[bench NAME] msg` on stderr."""
    print(f"[bench {bench}] {msg}", file=sys.stderr, flush=True)


# ---- timing ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(run, device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """`warmup` untimed calls of run(), then the seconds of `repeats` timed ones (device synchronised
    around each)."""
    for _ in range(warmup):
        run()
    runs = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        run()
        sync(device)
        runs.append(time.perf_counter() - start)
    return runs


# ---- the machine ----------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The CUDA device's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def machine_name() -> str:
    return device_name(torch.device("cpu"))


def sdpa_backend(q, k, v, *, enable_gqa: bool = False) -> str | None:
    """The backend causal F.scaled_dot_product_attention picks for these inputs (a label), or None."""
    try:  # private API; only used to label the result
        from torch.nn.attention import SDPBackend

        return SDPBackend(int(torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=enable_gqa))).name
    except Exception:
        return None


# ---- memory ---------------------------------------------------------------------------------------------


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.3g} GiB"


def available_bytes(device: torch.device) -> int | None:
    """Free device memory (CUDA) or MemAvailable (CPU); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def proc_status_kib(field: str) -> int | None:
    """A KiB field of /proc/self/status (VmRSS, VmHWM), or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_kib() -> int:
    """Peak RSS of this process's address space in KiB (VmHWM); ru_maxrss where /proc is missing."""
    hwm = proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory inside a `with` block, in bytes or None: .peak (CUDA: max_memory_allocated; CPU: VmHWM,
    reset at entry) and .added (.peak minus what was allocated, or resident, at entry)."""

    def __init__(self, device: torch.device):
        self.device, self.base, self.peak, self.added = device, None, None, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        elif reset_peak_rss():
            rss = proc_status_kib("VmRSS")
            self.base = rss * 1024 if rss is not None else None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self.base is not None:
            hwm = proc_status_kib("VmHWM")
            self.peak = hwm * 1024 if hwm is not None else None
        if self.peak is not None and self.base is not None:
            self.added = self.peak - self.base
        return False
