"""Forward+backward throughput and peak-memory benchmark of the liquid scan against causal attention.
Run `liquid bench scan --help`; each (case, seq) is measured in a fresh child process."""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.bench.common import (MEM_FRACTION, available_bytes, device_name, gib, peak_rss_kib, print_json,
                                   sdpa_backend, time_runs)
from pretrain.model.scan import liquid_scan, liquid_scan_reference

CASES = ("chunked", "chunked_recompute", "reference", "sdpa", "docs_dense", "docs_blocks", "elementwise")
QUADRATIC = ("sdpa", "docs_dense")  # cases whose memory grows with seq^2
SEED = 0
_RESULT_PREFIX = "BENCH_RESULT "
# A child still running after this many time budgets (and at least _HARD_TIMEOUT_MIN_S) is killed.
_HARD_TIMEOUT_BUDGETS = 10.0
_HARD_TIMEOUT_MIN_S = 120.0
_REFERENCE_WARMUP_TOKENS = 128
PEAK_MEM_METHOD = {
    "cpu": "VmHWM (peak RSS of the child's own address space, /proc/self/status) of the measuring child "
    "minus that of a child that only imported torch and this module; ru_maxrss is not used because a "
    "child's ru_maxrss includes the parent's peak RSS inherited across fork/exec",
    "cuda": "torch.cuda.max_memory_allocated in the measuring child",
}


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


def _fwd_bwd(loss_fn, inputs):
    def run():
        for t in inputs:
            t.grad = None
        loss_fn(*inputs).backward()

    return run


def _measure(spec: dict) -> dict:
    case, seq, batch = spec["case"], spec["seq"], spec["batch"]
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    extra = {}
    chunk = spec["elementwise_chunk_size"] if case == "elementwise" else spec["chunk_size"]
    if case == "sdpa":
        inputs = _sdpa_inputs(batch, seq, spec["heads"], spec["key_dim"], spec["value_dim"], device)
        extra["sdpa_backend"] = sdpa_backend(*inputs)

        def loss_fn(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()

    elif case in ("docs_dense", "docs_blocks"):
        # Causal attention inside documents of doc_len tokens packed in the row: one [s, s] mask (dense) or
        # the attention mixer's DocumentMask blocks (each query block over the keys it can see).
        from pretrain.model.mixers import DocumentMask

        inputs = _sdpa_inputs(batch, seq, spec["heads"], spec["key_dim"], spec["value_dim"], device)
        starts = torch.zeros(batch, seq, dtype=torch.bool)
        starts[:, ::spec["doc_len"]] = True
        mask = DocumentMask(starts.long().cumsum(-1).to(device), 0, seq)

        def loss_fn(q, k, v):
            if case == "docs_dense":
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense()).sum()
            return mask.attend(q, k, v).sum()

    else:
        if case == "elementwise":
            heads, n, p = spec["elementwise_channels"], 1, 1
        else:
            heads, n, p = spec["heads"], spec["key_dim"], spec["value_dim"]
        inputs = _scan_inputs(batch, seq, heads, n, p, device)
        scan = liquid_scan_reference if case == "reference" else liquid_scan
        if case == "chunked_recompute":
            scan = functools.partial(liquid_scan, recompute=True)

        def loss_fn(q, k, v, log_decay):
            y, state = scan(q, k, v, log_decay, chunk_size=chunk)
            return y.sum() + state.sum()

    if case == "reference":
        # The loop is slow and its cost per token is constant: warm up on a short prefix, time one full run.
        warm = min(seq, _REFERENCE_WARMUP_TOKENS)
        time_runs(_fwd_bwd(lambda *xs: loss_fn(*(x[:, :warm] for x in xs)), inputs), device, warmup=1, repeats=0)
        runs = time_runs(_fwd_bwd(loss_fn, inputs), device, warmup=0, repeats=1)
    else:
        runs = time_runs(_fwd_bwd(loss_fn, inputs), device, warmup=1, repeats=spec["repeats"])
    wall = time.perf_counter() - start
    if device.type == "cuda":
        peak_kib = torch.cuda.max_memory_allocated(device) / 1024
    else:
        peak_kib = peak_rss_kib()
    return {"runs": runs, "wall_s": wall, "peak_kib": peak_kib, **extra}


def _child_main() -> int:
    """Entry point of a measuring child: reads a JSON spec on stdin, prints one result line on stdout."""
    spec = json.loads(sys.stdin.read())
    if spec["case"] == "baseline":
        out = {"peak_kib": peak_rss_kib()}
    else:
        out = _measure(spec)
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
    head = f"[bench scan] {d['case']:<11} seq={d['seq']:<6}"
    if "skipped" in d:
        msg = f"{head} skipped: {d['skipped']}"
    else:
        mem = "n/a" if d.get("peak_mem_mib") is None else f"{d['peak_mem_mib']:.1f} MiB"
        msg = f"{head} {d['tokens_per_s']:>12,.0f} tok/s  {d['seconds']:.4g} s  peak {mem}"
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
    repeats=3,
    time_budget_s=60.0,
    emit=print,
    threads=None,
) -> list[dict]:
    """Measures every case at every seq (ascending) and returns one dict per (case, seq).

    A measured dict has case, seq, tokens_per_s (batch*seq / median seconds), seconds (median forward+backward
    time of the timed runs after one warm-up), peak_mem_mib, runs, wall_s (warm-up plus timed runs); a skipped
    one has case, seq and skipped (the reason). Each dict is passed to `emit` as soon as it exists.
    docs_dense and docs_blocks are causal attention inside packed documents of doc_len tokens (SDPA with one
    [seq, seq] mask, and the attention mixer's DocumentMask.blocks). Skips: reference above reference_max_seq;
    sdpa and docs_dense above sdpa_max_seq (with a stated estimate); larger seqs of
    a case after one measurement of it took longer than time_budget_s; a measurement whose peak memory,
    extrapolated from the largest measured seq of the case (quadratically for sdpa, linearly otherwise), would
    exceed MEM_FRACTION of the memory available now. `threads` (default torch.get_num_threads()) is set in
    every child.
    """
    device = _device()
    threads = threads or torch.get_num_threads()
    base = dict(
        device=str(device), threads=threads, batch=batch, heads=heads, key_dim=key_dim, value_dim=value_dim,
        chunk_size=chunk_size, elementwise_channels=elementwise_channels,
        elementwise_chunk_size=elementwise_chunk_size, doc_len=doc_len, repeats=repeats,
    )
    hard_timeout = max(_HARD_TIMEOUT_BUDGETS * time_budget_s, _HARD_TIMEOUT_MIN_S)
    baseline_kib = 0.0
    if device.type == "cpu":
        got = _run_child({**base, "case": "baseline", "seq": 0}, hard_timeout)
        if "error" in got:
            raise RuntimeError(f"baseline child failed: {got['error']}")
        baseline_kib = got["peak_kib"]

    results = []
    for case in cases:
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
                got = _run_child({**base, "case": case, "seq": seq}, hard_timeout)
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
                if "sdpa_backend" in got:
                    d["sdpa_backend"] = got["sdpa_backend"]
                last = (seq, seconds, max(peak_bytes, 0.0))
                if got["wall_s"] > time_budget_s:
                    over_budget = (seq, got["wall_s"])
            results.append(d)
            emit(d)
    return results


def _summary(results: list[dict]) -> dict:
    measured = {(d["case"], d["seq"]): d for d in results if "skipped" not in d}

    def ratio(a, b):
        return round(a / b, 4) if a is not None and b else None

    chunked_4k, sdpa_4k = measured.get(("chunked", 4096)), measured.get(("sdpa", 4096))
    chunked_16k, chunked_64k = measured.get(("chunked", 16384)), measured.get(("chunked", 65536))
    return {
        # Throughput ratio: > 1 means the chunked scan processes more tokens per second than causal SDPA.
        "chunked_vs_sdpa_at_4096": ratio(
            chunked_4k and chunked_4k["tokens_per_s"], sdpa_4k and sdpa_4k["tokens_per_s"]),
        # Time ratio; 4 would be exactly linear in sequence length.
        "chunked_16384_over_4096_time": ratio(
            chunked_16k and chunked_16k["seconds"], chunked_4k and chunked_4k["seconds"]),
        "chunked_65536_peak_mem_gib": round(chunked_64k["peak_mem_mib"] / 1024, 4) if chunked_64k else None,
    }


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
    p.add_argument("--repeats", type=int, default=None, help="timed runs after one warm-up (default 3)")
    p.add_argument("--reference-max-seq", type=int, default=4096)
    p.add_argument("--sdpa-max-seq", type=int, default=16384)
    p.add_argument("--elementwise-channels", type=int, default=2048)
    p.add_argument("--elementwise-chunk-size", type=int, default=16,
                   help="chunk of the N=P=1 case: its intra-chunk matrices cost chunk x channels per token")
    p.add_argument("--doc-len", type=int, default=1024,
                   help="document length of the docs_dense / docs_blocks attention cases")
    p.add_argument("--time-budget", type=float, default=60.0, help="seconds per (case, seq) measurement")
    p.add_argument("--threads", type=int, default=None, help="torch threads in each child (default: torch's own)")
    p.add_argument("--quick", action="store_true", help="seqs 256,1024 and repeats 1 unless given explicitly")
    args = p.parse_args(argv)
    if args.seqs is None:
        args.seqs = "256,1024" if args.quick else "1024,4096,16384,65536"
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    seqs = tuple(int(s) for s in args.seqs.split(",") if s.strip())
    if (not seqs or min(seqs) < 1 or args.repeats < 1 or args.doc_len < 1
            or (args.threads is not None and args.threads < 1)):
        p.error("--seqs must list positive integers; --repeats, --doc-len and --threads must be >= 1")
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = [c for c in cases if c not in CASES]
    if not cases or unknown:
        p.error(f"--cases: unknown {unknown or 'none given'}; choose from {', '.join(CASES)}")
    threads = args.threads or torch.get_num_threads()
    config = dict(cases=list(cases), 
        seqs=list(seqs), heads=args.heads, key_dim=args.key_dim, value_dim=args.value_dim, batch=args.batch,
        chunk_size=args.chunk_size, reference_max_seq=args.reference_max_seq, sdpa_max_seq=args.sdpa_max_seq,
        elementwise_channels=args.elementwise_channels, elementwise_chunk_size=args.elementwise_chunk_size,
        doc_len=args.doc_len, repeats=args.repeats, time_budget_s=args.time_budget,
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
