"""`liquid bench step`: training tokens/s of a preset on this CPU at 1 and 2 ranks, with the time of a step
split into compute, communication and data wait.

Every case runs in fresh spawned processes joined in a gloo group on 127.0.0.1 and a free port
(`parallel.spawn.run_ranks`), built by the real pieces in the order of `pretrain.train.worker.train_main`:
topology -> data -> model -> parallelize -> engine; a step is `pretrain.train.step.train_step`, the one the
training loop runs.

Per case: `--warmup` steps, then `--steps` timed steps without the profiler (tokens/s, step_ms), then the
same number of steps under torch.profiler (CPU activities) for the split:
  * comm:    the union of the time intervals of collective events (`c10d::*` ops on the training thread,
             `gloo:*` on gloo's worker threads; names listed with --debug) inside the steps, minus data wait.
             The collectives are blocking, so this is time the step spends in or waiting on a collective,
             including waiting for the slower rank;
  * data:    time in `data.next_batch` + moving the batch to the device: train_step's `data_wait_s`
             (perf_counter around both; the profiler sees the same span as `pretrain.train.step.DATA_EVENT`);
  * compute: the rest of the step (forward, backward, optimizer, router-bias update, Python).
The three add up to `profiled_step_ms`; the profiler's own overhead is `profiler_overhead_frac`.
Progress goes to stderr; exactly one JSON line goes to stdout.
"""
from __future__ import annotations

import argparse
import os
import re
import time

import torch

from parallel.spawn import run_ranks
from pretrain.bench.common import log, machine_name, print_json
from pretrain.train.step import DATA_EVENT

PRESET = "tiny"
QUICK_OVERRIDES = ["train.seq_len=64", "train.global_batch_size=4", "train.micro_batch_size=2",
                   "data.corpus_max_mb=0.5", "data.tokenizer_vocab_size=512", "model.vocab_size=512"]
# Profiler events that are collectives: the c10d ops on the training thread (enqueue; the blocking wait
# is not an op) and the backends' own events on their worker threads (the exchange itself). Wrappers
# around them (e.g. the expert all_to_all's autograd function, which also allocates and copies) are not
# counted; --debug lists such look-alikes separately.
COMM_PREFIXES = ("c10d::", "gloo:", "nccl:")
_COMM_WORDS = ("all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter", "reducescatter",
               "all_to_all", "alltoall", "broadcast", "barrier")
STEP_EVENT = "liquid_bench::step"


def _log(msg: str) -> None:
    log("step", msg)


def is_comm_event(name: str) -> bool:
    return name.lower().startswith(COMM_PREFIXES)


def _looks_like_comm(name: str) -> bool:
    low = name.lower()
    return not is_comm_event(name) and not low.startswith("aten::") and any(w in low for w in _COMM_WORDS)


# ---- interval arithmetic (microseconds) ---------------------------------------------------------------


def _union(intervals) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted((a, b) for a, b in intervals if b > a):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _intersect(xs, ys) -> list[tuple[float, float]]:
    """Intersection of two unions (sorted, disjoint)."""
    out, i, j = [], 0, 0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if b > a:
            out.append((a, b))
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return out


def _length(xs) -> float:
    return sum(b - a for a, b in xs)


def comm_time_us(comm, steps, data) -> float:
    """Time inside `steps` covered by at least one `comm` interval and by no `data` interval."""
    c = _intersect(_union(comm), _union(steps))
    return _length(c) - _length(_intersect(c, _union(data)))


# ---- profiler events ----------------------------------------------------------------------------------


def _profiler_events(prof) -> list[tuple[str, float, float, int]]:
    """(name, start_us, end_us, thread) of every CPU event, through kineto's raw results when available."""
    try:
        raw = prof.profiler.kineto_results.events()
        return [(e.name(), e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3, e.start_thread_id())
                for e in raw]
    except Exception:  # older or changed internals: the public (slower) FunctionEvent list
        return [(e.name, e.time_range.start, e.time_range.end, e.thread) for e in prof.events()]


def _debug_events(rank: int, events) -> None:
    stats: dict[str, list] = {}
    for name, a, b, thread in events:
        s = stats.setdefault(name, [0, 0.0, set()])
        s[0] += 1
        s[1] += (b - a) / 1e3
        s[2].add(thread)
    comm = sorted(((n, s) for n, s in stats.items() if is_comm_event(n)), key=lambda kv: -kv[1][1])
    alike = sorted(((n, s) for n, s in stats.items() if _looks_like_comm(n)), key=lambda kv: -kv[1][1])
    top = sorted(stats.items(), key=lambda kv: -kv[1][1])[:25]
    lines = [f"rank {rank}: {len(events)} profiler events; counted as collectives (count, total ms, threads):"]
    lines += [f"    {n:<40} {s[0]:>6} {s[1]:>10.2f}  {sorted(s[2])}" for n, s in comm]
    lines.append(f"rank {rank}: collective-like names not counted (wrappers; count, total ms, threads):")
    lines += [f"    {n:<40} {s[0]:>6} {s[1]:>10.2f}  {sorted(s[2])}" for n, s in alike]
    lines.append(f"rank {rank}: top events by total time (inclusive, ms):")
    lines += [f"    {'*' if is_comm_event(n) else ' '} {n:<60} {s[0]:>6} {s[1]:>10.2f}" for n, s in top]
    _log("\n".join(lines))


def _comm_seconds(events, *, steps: int) -> tuple[float, int]:
    """(seconds of collectives inside the STEP_EVENT windows and outside data wait (train_step's DATA_EVENT),
    number of collective events)."""
    windows = {STEP_EVENT: [], DATA_EVENT: []}
    comm = []
    for name, a, b, _ in events:
        if name in windows:
            windows[name].append((a, b))
        elif is_comm_event(name):
            comm.append((a, b))
    assert len(windows[STEP_EVENT]) == steps, (len(windows[STEP_EVENT]), steps)
    return comm_time_us(comm, windows[STEP_EVENT], windows[DATA_EVENT]) / 1e6, len(comm)


# ---- one rank -----------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, spec: dict) -> dict:
    """Runs in each spawned process (after init_process_group): build, warm up, time, profile."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from data_pipeline.dataset import build_dataset
    from parallel.collectives import barrier
    from parallel.engine import build_engine
    from parallel.parallelize import parallelize
    from parallel.topology import build_topology
    from pretrain.config import load_config
    from pretrain.model.model import build_model
    from pretrain.train.step import Placement, train_step

    cfg = load_config(spec["preset"], spec["overrides"])
    t = cfg.train
    topology = build_topology(cfg.parallel, seq_len=t.seq_len, num_experts=cfg.model.moe.num_experts)
    torch.manual_seed(t.seed)
    place = Placement(topology, torch.device("cpu"))
    grad_accum = t.global_batch_size // (t.micro_batch_size * topology.dp)
    data = build_dataset(cfg.data, seq_len=t.seq_len, vocab_size=cfg.model.vocab_size, seed=t.seed,
                         rank=topology.dp_rank, world=topology.dp, global_batch=t.global_batch_size, log=_log)
    model = parallelize(build_model(cfg.model, device=place.device), topology)
    model.set_activation_checkpointing(cfg.train.activation_checkpointing)  # as the worker does
    total = spec["warmup"] + 2 * spec["steps"] + 1
    engine = build_engine(model, cfg.optim, cfg.parallel, topology, max_steps=total, grad_accum=grad_accum,
                          micro_batch_size=t.micro_batch_size)
    model.train()

    def step() -> tuple[float, float, float]:
        """One training step: (wall seconds, data seconds, loss)."""
        start = time.perf_counter()
        result = train_step(engine, (data.next_batch(t.micro_batch_size) for _ in range(grad_accum)), place)
        return time.perf_counter() - start, result.data_wait_s, result.loss

    try:
        for _ in range(spec["warmup"]):
            step()
        barrier()
        start = time.perf_counter()
        plain = [step() for _ in range(spec["steps"])]
        plain_s = time.perf_counter() - start

        barrier()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()  # the profiler's first step is slower; outside the step windows below
            profiled = []
            for _ in range(spec["steps"]):
                with record_function(STEP_EVENT):
                    profiled.append(step())
    finally:
        data.close()
    events = _profiler_events(prof)
    if spec["debug"]:
        _debug_events(rank, events)
    n = spec["steps"]
    comm_s, comm_events = _comm_seconds(events, steps=n)
    prof_step_s = sum(w for w, _, _ in profiled)
    prof_data_s = sum(d for _, d, _ in profiled)
    return {
        "rank": rank, "grad_accum": grad_accum, "threads": torch.get_num_threads(),
        "step_ms": 1e3 * plain_s / n, "data_ms_unprofiled": 1e3 * sum(d for _, d, _ in plain) / n,
        "profiled_step_ms": 1e3 * prof_step_s / n, "comm_ms": 1e3 * comm_s / n, "data_ms": 1e3 * prof_data_s / n,
        "compute_ms": 1e3 * (prof_step_s - comm_s - prof_data_s) / n, "comm_events": comm_events,
        "last_loss": profiled[-1][2], "world": world,
    }


# ---- parent -------------------------------------------------------------------------------------------


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """"1,2" -> [(1, 1), (2, 2)]; "dp2ep1" -> [(2, 1)]: (dp, ep) pairs; a plain N is dp=N ep=N."""
    out = []
    for item in (s.strip().lower().replace(" ", "") for s in text.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"dp=?(\d+),?ep=?(\d+)", item)
        if m:
            dp, ep = int(m.group(1)), int(m.group(2))
        elif item.isdigit():
            dp = ep = int(item)
        else:
            raise ValueError(f"layout '{item}': use N (dp=N ep=N) or dpNepM, e.g. 1,2,dp2ep1")
        if dp < 1 or ep < 1 or dp % ep:
            raise ValueError(f"layout '{item}': dp and ep must be >= 1 and ep must divide dp")
        if (dp, ep) not in out:
            out.append((dp, ep))
    if not out:
        raise ValueError("--layouts names no layout")
    return out


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def run_case(dp: int, ep: int, *, base_overrides: list[str], steps: int, warmup: int, cores: int,
             debug: bool, timeout: float) -> dict:
    from pretrain.config import load_config

    overrides = list(base_overrides) + [f"parallel.dp={dp}", f"parallel.ep={ep}", f"cluster.num_workers={dp}"]
    cfg = load_config(PRESET, overrides)  # validates the layout before anything is spawned
    threads = max(1, cores // dp)
    spec = {"preset": PRESET, "overrides": overrides, "steps": steps, "warmup": warmup, "debug": debug}
    _log(f"dp={dp} ep={ep}: {dp} process(es) x {threads} thread(s), {warmup} warm-up + {steps} timed + "
         f"{steps} profiled steps")
    started = time.perf_counter()
    # stdout to stderr: DeepSpeed and friends print, and the parent's stdout carries the one JSON line.
    ranks = run_ranks(_rank_main, dp, spec, timeout=timeout, threads=threads, stdout_to_stderr=True)
    t = cfg.train
    tokens = t.global_batch_size * t.seq_len
    step_ms = max(r["step_ms"] for r in ranks)  # the step ends with a collective: the slowest rank sets the pace
    prof_ms = _mean(ranks, "profiled_step_ms")
    comm, data = _mean(ranks, "comm_ms"), _mean(ranks, "data_ms")
    compute = prof_ms - comm - data
    tps = tokens / (step_ms / 1e3)
    out = {
        "ranks": dp, "layout": f"dp={dp} ep={ep}", "threads_per_rank": threads, "grad_accum": ranks[0]["grad_accum"],
        "steps": steps, "warmup": warmup,
        "tokens_per_s": round(tps, 1), "tokens_per_s_per_rank": round(tps / dp, 1), "step_ms": round(step_ms, 3),
        "profiled_step_ms": round(prof_ms, 3), "compute_ms": round(compute, 3), "comm_ms": round(comm, 3),
        "data_ms": round(data, 3), "compute_frac": round(compute / prof_ms, 4), "comm_frac": round(comm / prof_ms, 4),
        "data_frac": round(data / prof_ms, 4), "profiler_overhead_frac": round(prof_ms / step_ms - 1, 4),
        "last_loss": round(ranks[0]["last_loss"], 4),
        "per_rank": [{k: round(r[k], 3) for k in ("step_ms", "profiled_step_ms", "compute_ms", "comm_ms", "data_ms")}
                     | {"rank": r["rank"]} for r in ranks],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    _log(f"dp={dp} ep={ep}: {out['tokens_per_s']:,.0f} tok/s ({out['tokens_per_s_per_rank']:,.0f}/rank), "
         f"step {step_ms:.1f} ms; profiled {prof_ms:.1f} ms = compute {compute:.1f} + comm {comm:.1f} + "
         f"data {data:.1f} ms ({out['wall_s']:.0f} s)")
    return out


def main_step(argv=None) -> dict:
    """CLI: progress lines on stderr, exactly one JSON line on stdout. Returns the printed object."""
    p = argparse.ArgumentParser(prog="liquid bench step", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 20; --quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per case (default 3; --quick 1)")
    p.add_argument("--layouts", default="1,2",
                   help="comma list of N (dp=N ep=N) or dpNepM; default 1,2 (dp=1 ep=1 and dp=2 ep=2)")
    p.add_argument("--dp2ep1", action="store_true", help="also run dp=2 ep=1 (dense-only data parallelism)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes for tests: seq_len 64, global batch 4, micro 2, 0.5 MB corpus, vocab 512")
    p.add_argument("--cache", default=None, help="data cache directory (sets LIQUID_CACHE)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case before it is abandoned")
    p.add_argument("--debug", action="store_true", help="print the profiler's event names per rank (stderr)")
    args = p.parse_args(argv)
    steps = args.steps if args.steps is not None else (2 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    if steps < 1 or warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    try:
        layouts = parse_layouts(args.layouts + (",dp2ep1" if args.dp2ep1 else ""))
    except ValueError as err:
        p.error(str(err))
    if args.cache:
        os.environ["LIQUID_CACHE"] = os.path.abspath(os.path.expanduser(args.cache))  # inherited by the ranks

    from data_pipeline.dataset import stream_specs
    from pretrain.config import load_config

    base = list(QUICK_OVERRIDES) if args.quick else []
    cfg = load_config(PRESET, base)
    cores = os.cpu_count() or 1
    _log("data: preparing (or finding) the embedded corpus once, before the ranks start")
    stream_specs(cfg.data, log=_log)  # cached: the ranks only open the shards
    started = time.perf_counter()
    results = [run_case(dp, ep, base_overrides=base, steps=steps, warmup=warmup, cores=cores, debug=args.debug,
                        timeout=args.timeout) for dp, ep in layouts]
    shared = max(dp for dp, _ in layouts) > 1 and any(dp * max(1, cores // dp) >= cores for dp, _ in layouts)
    note = (f"{cores} cores: a case of N ranks runs N processes with max(1, {cores} // N) torch threads each, so "
            f"all cases use the same {cores} cores; multi-rank cases share them (plus gloo's worker threads), "
            "so they measure parallel overhead on one machine, not scaling. " if shared else "")
    note += ("tokens_per_s = global batch tokens / step_ms (mean of the timed steps without the profiler, slowest "
             "rank); compute/comm/data are per-step means over ranks from a second, profiled pass of the same "
             "length and add up to profiled_step_ms: comm = union of collective events (c10d/gloo) within the "
             "steps, so it includes waiting for the other rank; data = data.next_batch + move; compute = the rest.")
    out = {
        "bench": "step", "machine": machine_name(), "cores": cores, "torch": torch.__version__, "preset": PRESET,
        "quick": args.quick, "seq_len": cfg.train.seq_len, "global_batch_size": cfg.train.global_batch_size,
        "micro_batch_size": cfg.train.micro_batch_size, "tokens_per_step": cfg.train.seq_len * cfg.train.global_batch_size,
        "dtype": "float32", "results": results, "wall_s": round(time.perf_counter() - started, 1), "note": note,
    }
    print_json(out)
    return out


__all__ = ["main_step", "parse_layouts", "comm_time_us", "is_comm_event"]
