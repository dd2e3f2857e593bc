"""Forward+backward throughput and peak-memory benchmark of the liquid scan against causal attention and a
Blelloch parallel scan, with the FLOP/s each achieves against this machine's large fp32 matmul.
Run `liquid bench scan --help`; each (case, seq) is measured in a fresh child process."""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.bench.blelloch import blelloch_scan
from pretrain.bench.common import (MEM_FRACTION, available_bytes, device_name, gib, peak_rss_kib, print_json,
                                   reset_peak_rss, sdpa_backend, time_runs)
from pretrain.model.scan import liquid_scan, liquid_scan_reference
from pretrain.train.host_memory import keep_freed_host_memory

CASES = ("matmul", "chunked", "chunked_recompute", "reference", "sdpa", "sdpa_math", "docs_dense", "docs_blocks",
         "elementwise", "blelloch", "elementwise_wide", "blelloch_wide")
# Cases whose time (and, for the MATH backend, memory) grows with seq^2: limited to seq <= sdpa_max_seq, and their
# peak memory is extrapolated quadratically (conservative for a fused attention kernel, whose memory is linear).
QUADRATIC = ("sdpa", "sdpa_math", "docs_dense")
# Cases on the N = 1 recurrence: (element-wise liquid scan, Blelloch anchor) at each of the two shapes.
ELEMENTWISE_PAIRS = (("elementwise", "blelloch"), ("elementwise_wide", "blelloch_wide"))
# SDPA backends tried by the `sdpa` case (each forced with torch.nn.attention.sdpa_kernel); the fastest is timed.
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
SDPA_PROBE_SEQ = 1024  # the backends are compared on the first min(seq, SDPA_PROBE_SEQ) tokens
SEED = 0
PAIRED_MIN_ROUNDS = 7  # alternating rounds of the element-wise cases' in-process pairing with Blelloch
# Untimed runs before the timed ones: the first grows the process's heap (with host memory kept, the page
# faults of a first run are not paid again), the second is the first in the steady state. On the CPU more
# follow, up to SETTLE_MAX_RUNS, while the last one still took page faults (SETTLE_FAULTS or more): at large
# sizes the heap kept growing for up to four runs (each of them 1.3-4x slower than the steady state).
WARMUP_RUNS = 2
SETTLE_MAX_RUNS = 6
SETTLE_FAULTS = 256  # minor page faults (4 KiB each) in a run: 1 MiB of freshly mapped memory
_RESULT_PREFIX = "BENCH_RESULT "
# A child still running after this many time budgets (and at least _HARD_TIMEOUT_MIN_S) is killed.
_HARD_TIMEOUT_BUDGETS = 10.0
_HARD_TIMEOUT_MIN_S = 120.0
_REFERENCE_WARMUP_TOKENS = 128
_MATMUL_MIN_REPEATS = 5
PEAK_MEM_METHOD = {
    "cpu": "VmHWM (peak RSS of the child's own address space, /proc/self/status) of the measuring child "
    "minus that of a child that only imported torch and this module; ru_maxrss is not used because a "
    "child's ru_maxrss includes the parent's peak RSS inherited across fork/exec. The sdpa case resets "
    "VmHWM (/proc/self/clear_refs) after comparing the backends, so its peak is that of the timed backend",
    "cuda": "torch.cuda.max_memory_allocated in the measuring child (the sdpa case resets it after comparing "
    "the backends)",
}


# ----------------------------------------------------------------------------------------------------------
# FLOP counts (parent side; from the case's shapes, not measured).
# ----------------------------------------------------------------------------------------------------------


def chunked_scan_flops(batch, seq, heads, n, p, chunk_size) -> int:
    """Forward+backward FLOPs of pretrain.model.scan.liquid_scan's chunked algorithm: its useful matmul work.

    The sequence is cut into chunks of c = chunk_size tokens (the last one as long as it is). Per chunk of L
    tokens and head the forward's four matmuls, 2 FLOPs per multiply-add, over what the chunk's causal
    structure needs:
      intra-chunk scores  q @ k^T            the L (L + 1) / 2 causal (t, s) pairs    2 N per pair
      intra-chunk output  (scores*decay) @ v the same pairs                          2 P per pair
      local state         (k*decay)^T @ v    [N x L] @ [L x P]                        2 L N P
      carried-state term  (q*decay) @ S_in   [L x N] @ [N x P]                        2 L N P
    so forward = batch * heads * sum over chunks of (L (L + 1) (N + P) + 4 L N P), as causal_attention_flops
    counts attention's pairs. Not counted: the products above the diagonal (the PyTorch form computes the
    full L x L, masked; the CPU kernel's AVX-512 tiles skip all but the tiles the diagonal crosses), a padded
    last chunk, the element-wise work (decay masks, exp, the state passing S = d S + local, N P per chunk).
    Backward counts as 2x the forward's matmul FLOPs (each matmul's two input gradients), so forward+backward
    = 3x forward. chunked_recompute is given the same count: its extra forward in backward is recomputation,
    not useful work.
    """
    lengths = [min(chunk_size, seq - start) for start in range(0, seq, chunk_size)]
    forward = batch * heads * sum(L * (L + 1) * (n + p) + 4 * L * n * p for L in lengths)
    return 3 * forward


def recurrence_flops(batch, seq, heads, n, p) -> int:
    """Forward+backward FLOPs of the recurrence itself, token by token: S_t = a_t S_{t-1} + k_t v_t^T is 3 N P
    (a S, k v^T, the sum) and y_t = S_t^T q_t is (2 N - 1) P per token and head (for N = 1: 4 P in all); exp of
    the decay is not counted. Backward counts as 2x forward. The same count is given to every algorithm of the
    recurrence (the element-wise scan, the Blelloch scan, the reference loop), whatever extra work it does
    (Blelloch's scan applies the operator about twice as often as the loop)."""
    return 3 * batch * seq * heads * (3 * n * p + (2 * n - 1) * p)


def causal_attention_flops(batch, seq, heads, n, p, doc_len=None) -> int:
    """Forward+backward FLOPs of causal attention (useful work): per head, q @ k^T and probs @ v over the
    L (L + 1) / 2 causal (query, key) pairs of each document of L tokens (one document of seq tokens unless
    doc_len is given), 2 FLOPs per multiply-add: forward 2 * (N + P) * L (L + 1) / 2; softmax not counted.
    Backward counts as 2x forward. The MATH backend and the dense-mask case compute all seq^2 pairs, twice
    this (and more with the document mask); the count is the same so FLOP/s compare useful work."""
    lengths = [seq] if doc_len is None else [min(doc_len, seq - s) for s in range(0, seq, doc_len)]
    forward = sum(batch * heads * (n + p) * length * (length + 1) for length in lengths)
    return 3 * forward


def case_flops(case: str, seq: int, cfg: dict) -> tuple[int, str] | None:
    """(forward+backward FLOPs per run, formula name) of a case at seq; None where none is defined."""
    b, h, n, p = cfg["batch"], cfg["heads"], cfg["key_dim"], cfg["value_dim"]
    if case in ("chunked", "chunked_recompute"):
        return chunked_scan_flops(b, seq, h, n, p, cfg["chunk_size"]), "chunked_scan"
    if case == "reference":
        return recurrence_flops(b, seq, h, n, p), "recurrence"
    if case in ("elementwise", "blelloch"):
        return recurrence_flops(b, seq, cfg["elementwise_channels"], 1, 1), "recurrence"
    if case in ("elementwise_wide", "blelloch_wide"):
        return recurrence_flops(b, seq, h, 1, p), "recurrence"
    if case == "sdpa":
        return causal_attention_flops(b, seq, h, p, p), "causal_attention"
    if case == "sdpa_math":
        return causal_attention_flops(b, seq, h, n, p), "causal_attention"
    if case in ("docs_dense", "docs_blocks"):
        return causal_attention_flops(b, seq, h, n, p, cfg["doc_len"]), "causal_attention_in_documents"
    return None


# ----------------------------------------------------------------------------------------------------------
# Child side: one (case, seq) measurement per process.
# ----------------------------------------------------------------------------------------------------------


def _scan_inputs(batch, seq, heads, n, p, device):
    g = torch.Generator().manual_seed(SEED)
    q = F.normalize(torch.randn(batch, seq, heads, n, generator=g), dim=-1)
    k = F.normalize(torch.randn(batch, seq, heads, n, generator=g), dim=-1)
    v = torch.randn(batch, seq, heads, p, generator=g)
    log_decay = -F.softplus(torch.randn(batch, seq, heads, generator=g))  # decays exp(.) in (0, 1)
    return [t.to(device).requires_grad_() for t in (q, k, v, log_decay)]


def _sdpa_inputs(batch, seq, heads, n, p, device):
    # Same distributions as the scan inputs, created directly in the [batch, heads, seq, dim] layout SDPA uses.
    g = torch.Generator().manual_seed(SEED)
    q = F.normalize(torch.randn(batch, heads, seq, n, generator=g), dim=-1)
    k = F.normalize(torch.randn(batch, heads, seq, n, generator=g), dim=-1)
    v = torch.randn(batch, heads, seq, p, generator=g)
    return [t.to(device).requires_grad_() for t in (q, k, v)]


def _fwd_bwd(outputs_fn, inputs):
    """One forward + backward: outputs_fn(*inputs) (a tensor or a tuple), then backward from fixed random
    upstream gradients of the outputs' shapes (made by the first call, a warm-up run, and kept), as a layer
    inside a model gets them. (A summed loss instead would add its own passes: the sum, and the broadcast
    scalar gradient made contiguous by the backward kernels.)"""
    upstream: dict[tuple, tuple] = {}

    def run():
        for t in inputs:
            t.grad = None
        outs = outputs_fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        key = tuple((tuple(o.shape), o.dtype, o.device) for o in outs)
        if key not in upstream:
            g = torch.Generator().manual_seed(SEED + 1)
            upstream[key] = tuple(torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs)
        torch.autograd.backward(outs, upstream[key])

    return run


def _sdpa_outputs(backend):
    """Causal SDPA forward forced to one backend: sdpa_kernel raises where it is not eligible, so a run that
    returns ran exactly that backend (its backward is the one of the forward's kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def outputs_fn(q, k, v):
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return outputs_fn


def _sdpa_kernel_ops(outputs_fn, inputs) -> list[str]:
    """Names of the aten attention ops one forward of outputs_fn runs (seen by the profiler): the evidence of
    which kernel ran."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        outputs_fn(*inputs)
    return sorted({e.key for e in prof.key_averages() if "attention" in e.key and e.key.startswith("aten::")})


def _fastest_sdpa_backend(inputs, device, probe_seq) -> tuple[str, dict]:
    """Runs forward+backward once (after one warm-up) with each SDPA backend on the first probe_seq tokens;
    returns (the fastest backend that ran, {backend: seconds or why it could not run})."""
    from torch.nn.attention import SDPBackend

    probe = [x.detach()[:, :, :probe_seq].clone().requires_grad_() for x in inputs]
    tried = {}
    for name in SDPA_BACKENDS:
        if not hasattr(SDPBackend, name):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch warns why each ineligible kernel was not used
                tried[name] = round(time_runs(_fwd_bwd(_sdpa_outputs(name), probe), device, warmup=1, repeats=1)[0], 6)
        except RuntimeError as err:
            tried[name] = "not available: " + (str(err).strip().splitlines() or ["RuntimeError"])[0][:200]
    timed = {name: t for name, t in tried.items() if isinstance(t, float)}
    if not timed:
        raise RuntimeError(f"no SDPA backend ran: {tried}")
    return min(timed, key=timed.get), tried


def _reset_peak(device) -> bool:
    """Forget the peak memory so far (after a probe); False where it cannot be reset."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return reset_peak_rss()


def _measure(spec: dict) -> dict:
    case, seq, batch = spec["case"], spec["seq"], spec["batch"]
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    if spec.get("host_malloc") == "keep":
        keep_freed_host_memory()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    extra = {}
    chunk = spec["elementwise_chunk_size"] if case.startswith(("elementwise", "blelloch")) else spec["chunk_size"]
    repeats = spec["repeats"]
    if case == "matmul":
        inputs = []
        run = _matmul(spec["matmul_size"], device)
        repeats = max(repeats, _MATMUL_MIN_REPEATS)
        extra["matmul_size"] = spec["matmul_size"]

    elif case in ("sdpa", "sdpa_math"):
        if case == "sdpa":
            # The fastest causal attention torch offers at this model width: q, k, v all of head dim value_dim
            # (heads x value_dim), so the fused kernels are eligible; every backend is tried, the fastest timed.
            dim = spec["value_dim"]
            inputs = _sdpa_inputs(batch, seq, spec["heads"], dim, dim, device)
            probe_seq = min(seq, SDPA_PROBE_SEQ)
            backend, tried = _fastest_sdpa_backend(inputs, device, probe_seq)
            extra.update(sdpa_probe_seq=probe_seq, sdpa_probe_s=tried,
                         sdpa_peak_reset_after_probe=_reset_peak(device))
        else:
            # The MATH backend at q/k head dim key_dim and v head dim value_dim (torch's choice for these
            # unequal dims), forced.
            inputs = _sdpa_inputs(batch, seq, spec["heads"], spec["key_dim"], spec["value_dim"], device)
            backend = "MATH"
        outputs_fn = _sdpa_outputs(backend)
        extra["sdpa_backend"] = backend
        extra["sdpa_default_backend"] = sdpa_backend(*inputs)  # torch's own choice without sdpa_kernel
        small = [x.detach()[:, :, :min(seq, 64)] for x in inputs]
        extra["sdpa_kernel_ops"] = _sdpa_kernel_ops(outputs_fn, small)
        run = _fwd_bwd(outputs_fn, inputs)

    elif case in ("docs_dense", "docs_blocks"):
        # Causal attention inside documents of doc_len tokens packed in the row: one [s, s] mask (dense) or
        # the attention mixer's DocumentMask blocks (each query block over the keys it can see).
        from pretrain.model.mixers import DocumentMask

        inputs = _sdpa_inputs(batch, seq, spec["heads"], spec["key_dim"], spec["value_dim"], device)
        starts = torch.zeros(batch, seq, dtype=torch.bool)
        starts[:, ::spec["doc_len"]] = True
        mask = DocumentMask(starts.long().cumsum(-1).to(device), 0, seq)

        def outputs_fn(q, k, v):
            if case == "docs_dense":
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense())
            return mask.attend(q, k, v)

        run = _fwd_bwd(outputs_fn, inputs)

    else:
        if case in ("elementwise", "blelloch"):
            heads, n, p = spec["elementwise_channels"], 1, 1
        elif case in ("elementwise_wide", "blelloch_wide"):
            heads, n, p = spec["heads"], 1, spec["value_dim"]
        else:
            heads, n, p = spec["heads"], spec["key_dim"], spec["value_dim"]
        inputs = _scan_inputs(batch, seq, heads, n, p, device)
        if case.startswith("blelloch"):
            scan = blelloch_scan
        else:
            scan = liquid_scan_reference if case == "reference" else liquid_scan
            if case == "chunked_recompute":
                scan = functools.partial(liquid_scan, recompute=True)
            scan = functools.partial(scan, chunk_size=chunk)

        outputs_fn = _scan_outputs(scan)
        run = _fwd_bwd(outputs_fn, inputs)

    if case == "reference":
        # The loop is slow and its cost per token is constant: warm up on a short prefix, time one full run.
        warm = min(seq, _REFERENCE_WARMUP_TOKENS)
        time_runs(_fwd_bwd(lambda *xs: outputs_fn(*(x[:, :warm] for x in xs)), inputs), device, warmup=1, repeats=0)
        runs = time_runs(run, device, warmup=0, repeats=1)
    else:
        extra["warmup_runs"] = _warm_up(run, device)
        runs = time_runs(run, device, warmup=0, repeats=repeats)
    wall = time.perf_counter() - start
    if device.type == "cuda":
        peak_kib = torch.cuda.max_memory_allocated(device) / 1024
    else:
        peak_kib = peak_rss_kib()
    if case in dict(ELEMENTWISE_PAIRS):  # after the peak is read: the pairing's anchor is not this case's memory
        extra["paired"] = _paired_with_blelloch(run, inputs, device, rounds=max(repeats, PAIRED_MIN_ROUNDS))
    if case in ("chunked", "chunked_recompute") and spec.get("pair_matmul"):
        extra["paired_matmul"] = _paired_with_matmul(run, case_flops(case, seq, spec)[0], device,
                                                     size=spec["matmul_size"],
                                                     rounds=max(repeats, PAIRED_MIN_ROUNDS))
    return {"runs": runs, "wall_s": wall, "peak_kib": peak_kib, **extra}


def _scan_outputs(scan):
    """What every scan case differentiates: the outputs and the final state."""
    def outputs_fn(q, k, v, log_decay):
        return tuple(scan(q, k, v, log_decay))

    return outputs_fn


def _warm_up(run, device) -> int:
    """Untimed runs: WARMUP_RUNS, and on the CPU more (at most SETTLE_MAX_RUNS) while the last one took
    SETTLE_FAULTS page faults or more (the heap was still growing); returns how many ran."""
    done = 0
    while True:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run()
        done += 1
        settled = device.type != "cpu" or resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < SETTLE_FAULTS
        if done >= WARMUP_RUNS and (settled or done >= WARMUP_RUNS + SETTLE_MAX_RUNS):
            return done


def _matmul(size: int, device):
    """The machine's large fp32 matmul: one [size x size] @ [size x size] per call."""
    g = torch.Generator().manual_seed(SEED)
    a, b = (torch.randn(size, size, generator=g).to(device) for _ in range(2))

    def run():
        torch.mm(a, b)

    return run


def _alternating(run, anchor, device, *, rounds: int) -> tuple[float, float]:
    """Median seconds of run() and of anchor() in this one process, alternating run by run (after
    WARMUP_RUNS of the anchor), so that load from elsewhere and the process's heap hit both alike."""
    time_runs(anchor, device, warmup=WARMUP_RUNS, repeats=0)
    ours, theirs = [], []
    for _ in range(rounds):
        ours += time_runs(run, device, warmup=0, repeats=1)
        theirs += time_runs(anchor, device, warmup=0, repeats=1)
    return statistics.median(ours), statistics.median(theirs)


def _paired_with_blelloch(run, inputs, device, *, rounds: int) -> dict:
    """The element-wise scan and the Blelloch scan on the same inputs, alternating (_alternating): the
    medians and ratio (Blelloch's time over ours; > 1: ours is faster)."""
    a, b = _alternating(run, _fwd_bwd(_scan_outputs(blelloch_scan), inputs), device, rounds=rounds)
    return {"rounds": rounds, "seconds": round(a, 9), "anchor_seconds": round(b, 9), "ratio": round(b / a, 4)}


def _paired_with_matmul(run, flops: int, device, *, size: int, rounds: int) -> dict:
    """The chunked scan and the matmul case's [size]^2 matmul, alternating (_alternating): the FLOP/s of
    each from its median and the scan's fraction of the matmul's. The unpaired fraction divides two
    children's medians taken minutes apart, and this machine's matmul rate moved between 307.6 and 394.8
    GFLOP/s from one run of the benchmark to the next."""
    a, b = _alternating(run, _matmul(size, device), device, rounds=rounds)
    scan_rate, matmul_rate = flops / a, 2 * size**3 / b
    return {"rounds": rounds, "flops_per_s": round(scan_rate, 1), "matmul_flops_per_s": round(matmul_rate, 1),
            "flops_fraction_of_matmul": round(scan_rate / matmul_rate, 4)}


def _child_result(spec: dict) -> dict:
    """What a measuring child reports for one spec (the baseline: its peak RSS after the imports)."""
    if spec["case"] == "baseline":
        return {"peak_kib": peak_rss_kib()}
    return _measure(spec)


def _child_main() -> int:
    """Entry point of a measuring child: reads a JSON spec on stdin, prints one result line on stdout."""
    out = _child_result(json.loads(sys.stdin.read()))
    sys.stdout.write(_RESULT_PREFIX + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0


# ----------------------------------------------------------------------------------------------------------
# Parent side.
# ----------------------------------------------------------------------------------------------------------


def _run_child(spec: dict, timeout_s: float) -> dict:
    """Runs one measurement in a fresh interpreter; returns its result or {"error": reason}."""
    repo_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = repo_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-c", "import sys; from pretrain.bench.scan import _child_main; sys.exit(_child_main())"]
    try:
        proc = subprocess.run(cmd, input=json.dumps(spec), capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"child killed after the hard timeout of {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
    why = " (killed by a signal; likely out of memory)" if proc.returncode < 0 else ""
    return {"error": f"child exited with code {proc.returncode}{why}: {tail[0][:300]}"}


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sdpa_estimates(seq, heads, batch, last) -> str:
    """Stated estimates for an unmeasured sdpa seq: quadratic time extrapolation and score-matrix size."""
    scores = batch * heads * seq * seq * 4
    if last is not None:
        m_seq, m_seconds = last
        est = m_seconds * (seq / m_seq) ** 2
        reason = (
            f"estimated ~{est:.3g} s per forward+backward by quadratic extrapolation from the measured "
            f"{m_seconds:.3g} s at seq {m_seq} (an estimate, not measured); "
        )
    else:
        reason = "no measured time of this case to extrapolate from; "
    return reason + f"an explicit float32 score matrix [batch*heads, seq, seq] would need {gib(scores)} (estimate)"


def _progress(d: dict) -> None:
    where = f"size={d['matmul_size']:<6}" if d["seq"] is None else f"seq={d['seq']:<6}"
    head = f"[bench scan] {d['case']:<17} {where}"
    if "skipped" in d:
        msg = f"{head} skipped: {d['skipped']}"
    elif d["case"] == "matmul":
        msg = f"{head} {d['flops_per_s'] / 1e9:,.1f} GFLOP/s  {d['seconds']:.4g} s"
    else:
        mem = "n/a" if d.get("peak_mem_mib") is None else f"{d['peak_mem_mib']:.1f} MiB"
        msg = f"{head} {d['tokens_per_s']:>12,.0f} tok/s  {d['seconds']:.4g} s  peak {mem}"
        if "flops_per_s" in d:
            msg += f"  {d['flops']:.4g} FLOP/run  {d['flops_per_s'] / 1e9:,.2f} GFLOP/s"
            if "flops_fraction_of_matmul" in d:
                msg += f" ({d['flops_fraction_of_matmul']:.3f} of matmul)"
        if "sdpa_backend" in d:
            msg += f"  backend {d['sdpa_backend']}"
    print(msg, file=sys.stderr, flush=True)


def bench_scan(
    *,
    seqs=(1024, 4096, 16384, 65536),
    cases=CASES,
    heads=16,
    key_dim=64,
    value_dim=128,
    batch=1,
    chunk_size=64,
    reference_max_seq=4096,
    sdpa_max_seq=16384,
    elementwise_channels=2048,
    elementwise_chunk_size=16,
    doc_len=1024,
    matmul_size=4096,
    repeats=3,
    time_budget_s=60.0,
    emit=print,
    threads=None,
    host_malloc="keep",
) -> list[dict]:
    """Measures every case at every seq (ascending) and returns one dict per (case, seq).

    A measured dict has case, seq, tokens_per_s (batch*seq / median seconds), seconds (median forward+backward
    time of the timed runs after the warm-ups: see _warm_up; warmup_runs says how many), peak_mem_mib, runs, wall_s
    (warm-up plus timed runs), flops
    (forward+backward FLOPs per run by the case's formula, flops_formula: see chunked_scan_flops,
    recurrence_flops, causal_attention_flops), flops_per_s (flops / seconds) and, when matmul is among the
    cases (it is always measured first), flops_fraction_of_matmul; a skipped one has case, seq and skipped
    (the reason). Each dict is passed to `emit` as soon as it exists.

    matmul is measured once, not per seq (its dict has seq None): a [matmul_size]^2 fp32 matmul, the median
    of at least 5 runs, flops 2 * matmul_size^3. sdpa is causal SDPA with q, k, v all of head dim value_dim,
    run with the fastest backend (each one in SDPA_BACKENDS is tried on the first min(seq, SDPA_PROBE_SEQ)
    tokens; its dict names sdpa_backend, the probe times sdpa_probe_s, torch's unforced choice
    sdpa_default_backend and the aten ops the profiler saw, sdpa_kernel_ops); sdpa_math is q/k head dim
    key_dim, v value_dim, forced to the MATH backend. elementwise and blelloch are the N = P = 1 recurrence over
    elementwise_channels heads, elementwise_wide and blelloch_wide the N = 1, P = value_dim one over `heads`
    heads: liquid_scan (chunk elementwise_chunk_size) and pretrain.bench.blelloch.blelloch_scan; each
    element-wise case's child also times Blelloch on the same inputs, alternating run by run, and its dict's
    `paired` holds both medians and their ratio (side by side in one process, after its peak is read).
    With matmul among the cases, the chunked and chunked_recompute children also time the matmul alternating
    run by run with the scan: `paired_matmul` holds both FLOP/s and the fraction (_paired_with_matmul).
    docs_dense and docs_blocks are causal attention inside packed documents of doc_len tokens (SDPA with one
    [seq, seq] mask, and the attention mixer's DocumentMask.blocks). Skips: reference above reference_max_seq;
    sdpa, sdpa_math and docs_dense above sdpa_max_seq (with a stated estimate); larger seqs of
    a case after one measurement of it took longer than time_budget_s; a measurement whose peak memory,
    extrapolated from the largest measured seq of the case (quadratically for the QUADRATIC cases, linearly
    otherwise), would exceed MEM_FRACTION of the memory available now. `threads` (default
    torch.get_num_threads()) is set in every child. host_malloc "keep": every child (every case alike) keeps
    freed host memory for reuse, as a CPU training process does (pretrain/train/host_memory.py); "system":
    glibc's defaults.
    """
    device = _device()
    threads = threads or torch.get_num_threads()
    base = dict(
        device=str(device), threads=threads, batch=batch, heads=heads, key_dim=key_dim, value_dim=value_dim,
        chunk_size=chunk_size, elementwise_channels=elementwise_channels,
        elementwise_chunk_size=elementwise_chunk_size, doc_len=doc_len, matmul_size=matmul_size, repeats=repeats,
        host_malloc=host_malloc,
    )
    hard_timeout = max(_HARD_TIMEOUT_BUDGETS * time_budget_s, _HARD_TIMEOUT_MIN_S)
    baseline_kib = 0.0
    if device.type == "cpu":
        got = _run_child({**base, "case": "baseline", "seq": 0}, hard_timeout)
        if "error" in got:
            raise RuntimeError(f"baseline child failed: {got['error']}")
        baseline_kib = got["peak_kib"]

    results = []
    matmul_flops_per_s = None
    for case in sorted(cases, key=lambda c: c != "matmul"):  # matmul first: the other cases' fraction of it
        if case == "matmul":
            got = _run_child({**base, "case": case, "seq": 0}, hard_timeout)
            d = {"case": case, "seq": None, "matmul_size": matmul_size}
            if "error" in got:
                d["skipped"] = got["error"]
            else:
                seconds = statistics.median(got["runs"])
                flops = 2 * matmul_size**3
                matmul_flops_per_s = flops / seconds
                d.update(seconds=round(seconds, 9), flops=flops, flops_per_s=round(matmul_flops_per_s, 1),
                         runs=[round(r, 6) for r in got["runs"]], wall_s=round(got["wall_s"], 3))
            results.append(d)
            emit(d)
            continue
        over_budget = None  # (seq, wall seconds) of the measurement that went over the budget
        last = None  # (seq, median seconds, peak bytes or None) of the largest measured seq
        for seq in sorted(seqs):
            reason = None
            if case == "reference" and seq > reference_max_seq:
                reason = f"seq > reference_max_seq={reference_max_seq} (token-by-token loop)"
            elif case in QUADRATIC and seq > sdpa_max_seq:
                reason = f"seq > sdpa_max_seq={sdpa_max_seq}; " + _sdpa_estimates(seq, heads, batch, last and last[:2])
            elif over_budget is not None:
                reason = (
                    f"over time budget: the measurement at seq {over_budget[0]} took {over_budget[1]:.3g} s "
                    f"> time_budget_s={time_budget_s:g}"
                )
            elif last is not None and last[2] is not None:
                power = 2 if case in QUADRATIC else 1
                est = last[2] * (seq / last[0]) ** power
                avail = available_bytes(device)
                if avail is not None and est > MEM_FRACTION * avail:
                    reason = (
                        f"estimated peak memory {gib(est)} ({'quadratic' if power == 2 else 'linear'} "
                        f"extrapolation from the measured {gib(last[2])} at seq {last[0]}; an estimate, "
                        f"not measured) exceeds {MEM_FRACTION:g} of the {gib(avail)} available"
                    )
                    if case in QUADRATIC:
                        reason += "; " + _sdpa_estimates(seq, heads, batch, last[:2])
            if reason is None:
                got = _run_child({**base, "case": case, "seq": seq, "pair_matmul": "matmul" in cases}, hard_timeout)
                if "error" in got:
                    reason = got["error"]
            if reason is not None:
                d = {"case": case, "seq": seq, "skipped": reason}
            else:
                seconds = statistics.median(got["runs"])
                peak_bytes = got["peak_kib"] * 1024 - baseline_kib * 1024
                d = {
                    "case": case,
                    "seq": seq,
                    "tokens_per_s": round(batch * seq / seconds, 1),
                    "seconds": round(seconds, 9),
                    "peak_mem_mib": round(peak_bytes / 2**20, 1),
                    "runs": [round(r, 6) for r in got["runs"]],
                    "wall_s": round(got["wall_s"], 3),
                }
                counted = case_flops(case, seq, base)
                if counted is not None:
                    d.update(flops=counted[0], flops_formula=counted[1], flops_per_s=round(counted[0] / seconds, 1))
                    if matmul_flops_per_s:
                        d["flops_fraction_of_matmul"] = round(counted[0] / seconds / matmul_flops_per_s, 4)
                for key in ("warmup_runs", "sdpa_backend", "sdpa_default_backend", "sdpa_kernel_ops",
                            "sdpa_probe_seq", "sdpa_probe_s", "sdpa_peak_reset_after_probe", "paired",
                            "paired_matmul"):
                    if key in got:
                        d[key] = got[key]
                last = (seq, seconds, max(peak_bytes, 0.0))
                if got["wall_s"] > time_budget_s:
                    over_budget = (seq, got["wall_s"])
            results.append(d)
            emit(d)
    return results


def _summary(results: list[dict]) -> dict:
    measured = {(d["case"], d["seq"]): d for d in results if "skipped" not in d}
    matmul = next((d for d in results if d["case"] == "matmul" and "skipped" not in d), None)

    def ratio(a, b):
        return round(a / b, 4) if a is not None and b else None

    def field(case, seq, key):
        d = measured.get((case, seq))
        return d.get(key) if d else None

    def anchor(seq):
        """The faster measured attention anchor at seq: (case, backend, tokens/s) or None."""
        got = [(c, field(c, seq, "sdpa_backend"), field(c, seq, "tokens_per_s")) for c in ("sdpa", "sdpa_math")]
        got = [g for g in got if g[2] is not None]
        return max(got, key=lambda g: g[2]) if got else None

    out = {}
    for seq in (4096, 16384):
        best = anchor(seq)
        chunked = field("chunked", seq, "tokens_per_s")
        # Throughput ratios: > 1 means the chunked scan processes more tokens per second than the anchor. The
        # first is against the fastest causal attention measured (sdpa, or sdpa_math if that were faster).
        out[f"chunked_vs_sdpa_at_{seq}"] = ratio(chunked, best and best[2])
        out[f"sdpa_anchor_at_{seq}"] = f"{best[0]} ({best[1]})" if best else None
        out[f"chunked_vs_sdpa_math_at_{seq}"] = ratio(chunked, field("sdpa_math", seq, "tokens_per_s"))
    out["matmul_flops_per_s"] = matmul and matmul["flops_per_s"]
    for seq in (4096, 16384):
        # Achieved FLOP/s of the chunked scan (chunked_scan_flops) over the matmul's; the target is >= 0.5.
        out[f"chunked_flops_fraction_of_matmul_at_{seq}"] = ratio(
            field("chunked", seq, "flops_per_s"), matmul and matmul["flops_per_s"])
        # The same, from the chunked case's child timing the matmul run by run beside it (_paired_with_matmul).
        paired = field("chunked", seq, "paired_matmul")
        out[f"chunked_flops_fraction_of_matmul_paired_at_{seq}"] = paired and paired["flops_fraction_of_matmul"]
    for fast, anchor_case in ELEMENTWISE_PAIRS:
        # Tokens/s of the element-wise liquid scan over the Blelloch scan's; the target is >= 3. The first from
        # the two cases' own children, the second from the pairing inside the element-wise case's child.
        out[f"{fast}_vs_{anchor_case}_at_4096"] = ratio(
            field(fast, 4096, "tokens_per_s"), field(anchor_case, 4096, "tokens_per_s"))
        paired = field(fast, 4096, "paired")
        out[f"{fast}_vs_{anchor_case}_paired_at_4096"] = paired and paired["ratio"]
    chunked_4k, chunked_16k = field("chunked", 4096, "seconds"), field("chunked", 16384, "seconds")
    # Time ratio; 4 would be exactly linear in sequence length.
    out["chunked_16384_over_4096_time"] = ratio(chunked_16k, chunked_4k)
    peak_64k = field("chunked", 65536, "peak_mem_mib")
    out["chunked_65536_peak_mem_gib"] = round(peak_64k / 1024, 4) if peak_64k is not None else None
    return out


def main_scan(argv=None) -> dict:
    """CLI: progress lines on stderr, exactly one JSON line on stdout. Returns the printed object."""
    p = argparse.ArgumentParser(prog="liquid bench scan", description=__doc__.splitlines()[0])
    p.add_argument("--seqs", type=str, default=None, help="comma list (default 1024,4096,16384,65536)")
    p.add_argument("--cases", type=str, default=",".join(CASES), help=f"comma list of {', '.join(CASES)} (default all)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--key-dim", type=int, default=64)
    p.add_argument("--value-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=None, help="timed runs after two warm-ups (default 3)")
    p.add_argument("--reference-max-seq", type=int, default=4096)
    p.add_argument("--sdpa-max-seq", type=int, default=16384)
    p.add_argument("--elementwise-channels", type=int, default=2048)
    p.add_argument("--elementwise-chunk-size", type=int, default=16,
                   help="chunk of the N=P=1 case: its intra-chunk matrices cost chunk x channels per token")
    p.add_argument("--doc-len", type=int, default=1024,
                   help="document length of the docs_dense / docs_blocks attention cases")
    p.add_argument("--matmul-size", type=int, default=None,
                   help="side of the square fp32 matmul of the matmul case, the FLOP/s roofline (default 4096)")
    p.add_argument("--time-budget", type=float, default=60.0, help="seconds per (case, seq) measurement")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's own)")
    p.add_argument("--host-malloc", choices=("keep", "system"), default="keep",
                   help="keep: every child keeps freed host memory for reuse, as a CPU training process does "
                        "(train.keep_host_memory); system: glibc's defaults (default keep)")
    p.add_argument("--quick", action="store_true",
                   help="seqs 256,1024, repeats 1 and matmul size 1024 unless given explicitly")
    args = p.parse_args(argv)
    if args.seqs is None:
        args.seqs = "256,1024" if args.quick else "1024,4096,16384,65536"
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    seqs = tuple(int(s) for s in args.seqs.split(",") if s.strip())
    if args.matmul_size is None:
        args.matmul_size = 1024 if args.quick else 4096
    if (not seqs or min(seqs) < 1 or args.repeats < 1 or args.doc_len < 1 or args.matmul_size < 1
            or (args.threads is not None and args.threads < 1)):
        p.error("--seqs must list positive integers; --repeats, --doc-len, --matmul-size and --threads must be >= 1")
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = [c for c in cases if c not in CASES]
    if not cases or unknown:
        p.error(f"--cases: unknown {unknown or 'none given'}; choose from {', '.join(CASES)}")
    threads = args.threads or torch.get_num_threads()
    config = dict(cases=list(cases),
        seqs=list(seqs), heads=args.heads, key_dim=args.key_dim, value_dim=args.value_dim, batch=args.batch,
        chunk_size=args.chunk_size, reference_max_seq=args.reference_max_seq, sdpa_max_seq=args.sdpa_max_seq,
        elementwise_channels=args.elementwise_channels, elementwise_chunk_size=args.elementwise_chunk_size,
        doc_len=args.doc_len, matmul_size=args.matmul_size, repeats=args.repeats, time_budget_s=args.time_budget,
        host_malloc=args.host_malloc,
    )
    device = _device()
    results = bench_scan(**{**config, "seqs": seqs, "cases": cases}, emit=_progress, threads=threads)
    out = {
        "bench": "scan",
        "device": device_name(device),
        "threads": threads,
        "torch": torch.__version__,
        "config": {**config, "dtype": "float32", "seed": SEED, "device_type": device.type},
        "peak_mem_method": PEAK_MEM_METHOD[device.type],
        "results": results,
        "summary": _summary(results),
    }
    print_json(out)
    return out


__all__ = ["bench_scan", "main_scan", "CASES"]
