"""Host memory for a CPU training process: glibc's malloc told to keep freed memory for the next step.

By default glibc serves every allocation above its mmap threshold (at most 32 MiB on 64-bit) with a fresh
mmap and gives it back to the kernel on free, so a tensor of that size costs a page fault per 4 KiB page
every time it is made: on the development machine a fresh 32 MiB product costs 3-5 times a product into
memory already owned. A training step makes the same large tensors every step (activations, gradients,
logits), so on the CPU that cost comes back every step. `keep_freed_host_memory` turns mmap off for
malloc (`M_MMAP_MAX` 0) and raises the trim threshold (`M_TRIM_THRESHOLD`), so freed blocks stay in the
heap and the next step reuses them without faulting: what the CUDA caching allocator does for device
memory, and what PyTorch's CPU launcher (`torch.backends.xeon.run_cpu`) gets by preloading jemalloc or
tcmalloc. The process's resident memory then stays near its peak instead of falling between steps.

Only glibc is changed (elsewhere the call does nothing and says so); it acts on allocations made after it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): keep up to 2 GiB free at the heap's top


@functools.cache
def keep_freed_host_memory() -> bool:
    """Keep freed host memory in this process's heap (see the module). True when glibc took both settings."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
