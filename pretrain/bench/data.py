"""`liquid bench data`: prepare throughput, loader throughput and a raw numpy.memmap read of the same tokens.

`liquid bench data --scale 1e12,1e13,3.8e13`: the loader's start-up at the scale of the data instead, for
one rank of a world of --world: a simulated prepared dataset of each size (liquid_data.json, index.json
and the shard table, written by `data_pipeline.shard_table.generate_index`; the shard files do not exist,
none is read), then, in a fresh process each, the time and peak memory (RSS) to open the loader at a
position deep in the run and work out which shards its next step reads. Side by side, the anchor:
mosaicml-streaming's `StreamingDataset` constructor over the same index (--anchor-max: the largest size it
is run at; it holds every shard's entry).

Prints one JSON line; progress goes to stderr. Everything runs on the local disk under --workdir.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pretrain.bench.common import log, machine_name, print_json


def _log(msg: str) -> None:
    log("data", msg)


def _corpus(workdir: Path, mb: float) -> Path:
    """The embedded corpus as jsonl, repeated until it holds `mb` megabytes."""
    from data_pipeline.corpus import iter_stdlib_documents

    path = workdir / "corpus.jsonl"
    docs = [data.decode("utf-8", "replace") for _, data in iter_stdlib_documents(int(min(mb, 16) * 2**20))]
    written, target = 0, int(mb * 2**20)
    with path.open("w", encoding="utf-8") as fh:
        while written < target:
            for text in docs:
                fh.write(json.dumps({"text": text}) + "\n")
                written += len(text)
                if written >= target:
                    break
    return path


def _time_loader(shards: str, workdir: Path, *, seq_len: int, batch: int, max_tokens: int) -> dict:
    from data_pipeline.loader import StreamingRows

    loader = StreamingRows([shards], seq_len=seq_len, seed=0, cache_dir=workdir / "cache")
    tokens, start = 0, time.perf_counter()
    while tokens < max_tokens:
        tokens += loader.next_batch(batch)["input_ids"].numel()
    seconds = time.perf_counter() - start
    loader.close()
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def _raw_file(shards: str, workdir: Path) -> tuple[Path, int]:
    """Every real token of the dataset in one flat uint16 file on the same disk."""
    from streaming import StreamingDataset

    ds = StreamingDataset(local=shards, shuffle=False, batch_size=1)
    path = workdir / "tokens.bin"
    with path.open("wb") as fh:
        for i in range(ds.num_samples):
            sample = ds[i]
            fh.write(np.asarray(sample["tokens"][: sample["num_tokens"]]).tobytes())
    return path, path.stat().st_size // 2


def _time_memmap(path: Path, *, seq_len: int, batch: int, max_tokens: int) -> dict:
    """Shuffled rows of seq_len + 1 read from a memmap and turned into the same int64 tensors."""
    data = np.memmap(path, dtype=np.uint16, mode="r")
    order = np.random.default_rng(0).permutation((len(data) - 1) // seq_len)
    tokens, start, pos = 0, time.perf_counter(), 0
    while tokens < max_tokens:
        picks = order[pos: pos + batch] if pos + batch <= len(order) else order[:batch]
        pos = pos + batch if pos + batch <= len(order) else batch
        rows = np.stack([data[r * seq_len: r * seq_len + seq_len + 1] for r in picks]).astype(np.int64)
        ids = torch.from_numpy(rows)
        tokens += ids[:, :-1].numel()
    seconds = time.perf_counter() - start
    return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def _time_tiny_training(steps: int) -> float:
    """tokens/s of the tiny preset's training step (train_step, one micro-batch of the whole global batch)
    on random tokens: the rate the loader must outrun."""
    from parallel.engine import build_engine
    from parallel.topology import Topology
    from pretrain.config import load_config
    from pretrain.model.model import build_model
    from pretrain.train.step import Placement, train_step

    cfg = load_config("tiny", ["parallel.dp=1", "parallel.ep=1", "cluster.num_workers=1"])
    t = cfg.train
    model = build_model(cfg.model)
    engine = build_engine(model, cfg.optim, cfg.parallel, max_steps=steps + 1, grad_accum=1)
    place = Placement(Topology.single(), torch.device("cpu"))
    ids = torch.randint(0, cfg.model.vocab_size, (t.global_batch_size, t.seq_len + 1))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        train_step(engine, [batch], place)
        times.append(time.perf_counter() - start)
    return t.global_batch_size * t.seq_len / (sum(times[1:]) / steps)


def bench_data(*, mb: float, seq_len: int, batch: int, loader_tokens: int, workdir: Path, train_steps: int) -> dict:
    from data_pipeline.prepare import prepare
    from data_pipeline.tokenizer import train_tokenizer

    corpus = _corpus(workdir, mb)
    _log(f"corpus {corpus.stat().st_size / 2**20:.1f} MiB; training a tokenizer")
    texts = (json.loads(line)["text"] for line in corpus.open(encoding="utf-8"))
    tokenizer = train_tokenizer(texts, vocab_size=2048, out_dir=workdir / "tokenizer")
    import streaming  # noqa: F401  (imported once here so the prepare timing excludes it)

    _log("prepare (one process)")
    summary = prepare([str(corpus)], str(workdir / "shards"), str(tokenizer), use_ray=False, progress=False)
    shards = str(workdir / "shards")
    _log(f"loader: {loader_tokens:,} tokens, seq_len {seq_len}, batch {batch}")
    loader = _time_loader(shards, workdir, seq_len=seq_len, batch=batch, max_tokens=loader_tokens)
    raw_path, raw_tokens = _raw_file(shards, workdir)
    _log(f"raw memmap read of {raw_tokens:,} tokens")
    raw = _time_memmap(raw_path, seq_len=seq_len, batch=batch, max_tokens=loader_tokens)
    _log(f"tiny training step x {train_steps}")
    train_tps = _time_tiny_training(train_steps) if train_steps else None
    return {
        "bench": "data",
        "machine": machine_name(),
        "cpus": torch.get_num_threads(),
        "prepare": {"tokens": summary["tokens"], "seconds": summary["seconds"],
                    "tokens_per_s_per_process": summary["tokens"] / summary["seconds"],
                    "mb_per_s": corpus.stat().st_size / 2**20 / summary["seconds"]},
        "loader": loader,
        "raw_memmap": raw,
        "tiny_training_tokens_per_s": train_tps,
        "summary": {
            "loader_over_raw": loader["tokens_per_s"] / raw["tokens_per_s"],
            "loader_over_tiny_training": loader["tokens_per_s"] / train_tps if train_tps else None,
        },
    }


_OPEN_LOADER = """
import json, resource, sys, time
start = time.perf_counter()
from data_pipeline.loader import StreamingRows
import_s = time.perf_counter() - start
root, cache, world, rank, batch, seq, step = sys.argv[1:8]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
rows = StreamingRows([root], seq_len=int(seq), seed=0, cache_dir=cache, rank=int(rank), world=int(world),
                     global_batch=int(batch))
state = rows.state_dict()
rows.load_state_dict({**state, "rows": int(step) * int(batch)})  # a resume deep into the run
opened = time.perf_counter() - start
shards = rows.upcoming_shards(rows.per_rank)
seconds = time.perf_counter() - start
print(json.dumps({"import_s": round(import_s, 3), "open_s": round(opened, 3), "startup_s": round(seconds, 3),
                  "next_step_shards": len(shards), "epoch": rows.epoch,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "rss_after_imports_mib": round(before / 1024, 1)}))
"""

_OPEN_STREAMING = """
import json, resource, sys, time
from streaming import StreamingDataset
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
ds = StreamingDataset(local=sys.argv[1], shuffle=True, batch_size=1)
seconds = time.perf_counter() - start
print(json.dumps({"startup_s": round(seconds, 3), "num_samples": ds.num_samples,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "rss_after_imports_mib": round(before / 1024, 1)}))
"""


def _measure(script: str, *args) -> dict:
    """Run a measuring script in a fresh interpreter (its peak RSS is its own) and parse its JSON line."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"measuring failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_scale(scales: list[float], *, workdir: Path, world: int, batch: int, seq_len: int, step: int,
                anchor_max: float) -> dict:
    from data_pipeline.shard_table import generate_index

    results = []
    for tokens in scales:
        root = workdir / f"data-{tokens:g}"
        _log(f"{tokens:.3g} tokens: generating the index (no shard files)")
        made = generate_index(str(root), tokens=tokens)
        _log(f"{made['shards']:,} shards, {made['blocks']:,} blocks ({made['seconds']:.1f}s); opening rank "
             f"{world - 1} of {world} at step {step:,}")
        loader = _measure(_OPEN_LOADER, root, workdir / "cache", world, world - 1, batch, seq_len, step)
        row = {"tokens": tokens, "shards": made["shards"], "blocks": made["blocks"],
               "index_json_mib": round((root / "index.json").stat().st_size / 2**20, 1), "loader": loader}
        if tokens <= anchor_max:
            _log("anchor: StreamingDataset over the same index")
            row["streaming_dataset"] = _measure(_OPEN_STREAMING, root)
        results.append(row)
        shutil.rmtree(root, ignore_errors=True)
    return {"bench": "data-scale", "machine": machine_name(), "world": world, "rank": world - 1,
            "global_batch": batch, "seq_len": seq_len, "resume_step": step, "scales": results,
            "targets": {"startup_s": 60, "peak_rss_mib": 1024}}


def main_data(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="liquid bench data", description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=16.0, help="corpus size in MiB of text")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--loader-tokens", type=int, default=4_000_000, help="tokens read by each reader")
    p.add_argument("--train-steps", type=int, default=5, help="tiny training steps timed (0 = skip)")
    p.add_argument("--workdir", default=None, help="where shards are written (default: a temp dir)")
    p.add_argument("--scale", default=None, help="comma-separated dataset sizes in tokens (e.g. 1e12,1e13,3.8e13): "
                   "measure the loader's start-up on simulated indexes instead")
    p.add_argument("--world", type=int, default=64, help="--scale: data-parallel ranks (the last one is measured)")
    p.add_argument("--global-batch", type=int, default=1024, help="--scale: rows per global step")
    p.add_argument("--resume-step", type=int, default=1_000_000, help="--scale: the step the loader resumes at")
    p.add_argument("--anchor-max", type=float, default=1e13, help="--scale: largest size StreamingDataset is opened at")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="liquid-bench-data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.scale:
            scales = [float(x) for x in args.scale.split(",")]
            out = bench_scale(scales, workdir=workdir, world=args.world, batch=args.global_batch,
                              seq_len=args.seq_len if args.seq_len != 256 else 4096, step=args.resume_step,
                              anchor_max=args.anchor_max)
        else:
            out = bench_data(mb=args.mb, seq_len=args.seq_len, batch=args.batch, loader_tokens=args.loader_tokens,
                             workdir=workdir, train_steps=args.train_steps)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print_json(out)
    return out
