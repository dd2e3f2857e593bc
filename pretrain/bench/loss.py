"""`liquid bench loss`: peak memory and time of the output head's forward + backward (F.linear with the tied
weight, then the summed cross-entropy), plain (all logits at once, F.cross_entropy) vs chunked
(pretrain/model/loss.py, `--chunk` tokens at a time).

Each variant runs in a fresh child process (`python -m pretrain.bench.loss --child ...`), so one variant's
freed memory never hides the other's peak. In the child: inputs h [tokens, d] and weight [vocab, d] (both
needing gradients), random labels (1 in 16 ignored); then `--repeats` timed forward + backward passes. The
first pass is the measured one:
  * CPU: `peak_added_bytes` = the process's peak RSS (VmHWM, reset just before) minus its RSS before the pass;
    `allocator_peak_bytes` = the peak of the tensor bytes the CPU allocator held during a second, profiled pass
    (torch.profiler memory events, as `liquid dryrun` checks itself against);
  * CUDA: max_memory_allocated minus the memory allocated before the pass (both keys).
Progress goes to stderr; exactly one JSON line goes to stdout. The defaults run in about a minute on two
CPU cores; the realistic sizes (e.g. --d-model 2048 --tokens 16384 --chunk 4096 --dtype bf16) want a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from pretrain.bench.common import PeakMemory, gib, log, machine_name, print_json, sync

VARIANTS = ("plain", "chunked")


def _log(msg: str) -> None:
    log("loss", msg)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _inputs(spec: dict, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(spec["tokens"], spec["d_model"], generator=g).to(device).requires_grad_()
    w = (0.02 * torch.randn(spec["vocab"], spec["d_model"], generator=g)).to(device).requires_grad_()
    labels = torch.randint(0, spec["vocab"], (spec["tokens"],), generator=g)
    labels[::16] = -100
    return h, w, labels.to(device)


def _pass(variant: str, h, w, labels, chunk: int, dtype) -> float:
    """One forward + backward of the head and its loss; returns the loss."""
    import torch.nn.functional as F

    from pretrain.model.loss import linear_cross_entropy_sum

    ctx = torch.autocast(h.device.type, dtype=dtype) if dtype is not None else torch.autocast(h.device.type, enabled=False)
    with ctx:
        if variant == "plain":
            loss = F.cross_entropy(F.linear(h, w).float(), labels, ignore_index=-100, reduction="sum")
        else:
            loss = linear_cross_entropy_sum(h, w, labels, chunk_tokens=chunk)
    (loss / labels.numel()).backward()
    value = float(loss.detach())
    h.grad = w.grad = None
    return value


def _child(spec: dict) -> dict:
    """One variant in this (fresh) process: the measured pass, the timed ones, the allocator's peak."""
    device = _device(spec["device"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    dtype = torch.bfloat16 if spec["dtype"] == "bf16" else None
    h, w, labels = _inputs(spec, device)
    variant, chunk = spec["variant"], spec["chunk"]
    times = []
    with PeakMemory(device) as mem:
        sync(device)
        start = time.perf_counter()
        loss = _pass(variant, h, w, labels, chunk, dtype)
        sync(device)
        times.append(time.perf_counter() - start)
    for _ in range(spec["repeats"] - 1):
        sync(device)
        start = time.perf_counter()
        _pass(variant, h, w, labels, chunk, dtype)
        sync(device)
        times.append(time.perf_counter() - start)
    out = {"variant": variant, "loss": loss, "times_s": [round(t, 4) for t in times], "peak_added_bytes": mem.added,
           "threads": torch.get_num_threads()}
    if device.type == "cpu" and spec["allocator"]:
        from pretrain.train.dryrun import allocator_peak

        out["allocator_peak_bytes"] = allocator_peak(lambda: _pass(variant, h, w, labels, chunk, dtype))[1]
    else:
        out["allocator_peak_bytes"] = mem.added
    return out


def _run_child(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pretrain.bench.loss", "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=sys.stderr, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"bench loss: the {spec['variant']} child failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main_loss(argv=None) -> dict:
    """CLI: progress lines on stderr, exactly one JSON line on stdout. Returns the printed object."""
    p = argparse.ArgumentParser(prog="liquid bench loss", description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=65536, help="vocabulary size (default 65536)")
    p.add_argument("--d-model", type=int, default=128, help="the head's input width (default 128; the presets: 2048)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per forward, micro-batch x seq (default 2048)")
    p.add_argument("--chunk", type=int, default=512, help="tokens per chunk of the chunked loss (default 512)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="fp32, or bf16 autocast (default fp32)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per variant, the first also measured (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch's default)")
    p.add_argument("--no-allocator", action="store_true", help="skip the profiled pass (CPU allocator peak)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per variant before it is abandoned")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        out = _child(json.loads(args.child))
        print(json.dumps(out), flush=True)
        return out
    if min(args.vocab, args.d_model, args.tokens, args.chunk, args.repeats) < 1:
        p.error("--vocab, --d-model, --tokens, --chunk and --repeats must be >= 1")
    device = _device(args.device)
    spec = {"vocab": args.vocab, "d_model": args.d_model, "tokens": args.tokens, "chunk": args.chunk,
            "dtype": args.dtype, "device": device.type, "repeats": args.repeats, "threads": args.threads,
            "allocator": not args.no_allocator}
    logits_bytes = args.tokens * args.vocab * 4
    _log(f"{device.type} {args.dtype}: {args.tokens} tokens x vocab {args.vocab} x d {args.d_model} "
         f"(fp32 logits {gib(logits_bytes)}), chunk {args.chunk}, {args.repeats} pass(es) per variant")
    started = time.perf_counter()
    results = {}
    for variant in VARIANTS:
        results[variant] = r = _run_child({**spec, "variant": variant}, args.timeout)
        _log(f"{variant}: peak +{gib(r['peak_added_bytes'] or 0)} (allocator {gib(r['allocator_peak_bytes'] or 0)}), "
             f"{min(r['times_s']):.3f} s per forward + backward")
    plain, chunked = results["plain"], results["chunked"]

    def saved(key):
        a, b = plain.get(key), chunked.get(key)
        return None if a is None or b is None else a - b

    t_plain, t_chunked = min(plain["times_s"]), min(chunked["times_s"])
    out = {
        "bench": "loss", "machine": machine_name() if device.type == "cpu" else torch.cuda.get_device_name(device),
        "device": device.type, "torch": torch.__version__, "dtype": args.dtype, "vocab": args.vocab,
        "d_model": args.d_model, "tokens": args.tokens, "chunk_tokens": args.chunk, "repeats": args.repeats,
        "threads": plain["threads"], "fp32_logits_bytes": logits_bytes,
        "plain": plain, "chunked": chunked,
        "memory_saved_bytes": saved("peak_added_bytes"),
        "memory_saved_gib": None if saved("peak_added_bytes") is None else round(saved("peak_added_bytes") / 2**30, 3),
        "allocator_saved_bytes": saved("allocator_peak_bytes"),
        "allocator_saved_gib": (None if saved("allocator_peak_bytes") is None
                                else round(saved("allocator_peak_bytes") / 2**30, 3)),
        "peak_ratio": (round(chunked["peak_added_bytes"] / plain["peak_added_bytes"], 4)
                       if plain["peak_added_bytes"] and chunked["peak_added_bytes"] is not None else None),
        "time_plain_s": t_plain, "time_chunked_s": t_chunked, "time_ratio": round(t_chunked / t_plain, 4),
        "loss_rel_diff": abs(chunked["loss"] - plain["loss"]) / abs(plain["loss"]),
        "wall_s": round(time.perf_counter() - started, 1),
        "note": ("forward + backward of F.linear(h, weight) and the summed cross-entropy; one fresh process per "
                 "variant; peak_added_bytes: the first pass's peak over what the process held before it (CPU: "
                 "peak RSS, CUDA: max_memory_allocated); allocator_peak_bytes (CPU): the peak of the tensor bytes "
                 "held during a profiled pass; time_ratio = chunked / plain, the fastest of the timed passes"),
    }
    print_json(out)
    return out


if __name__ == "__main__":
    main_loss()


__all__ = ["main_loss"]
