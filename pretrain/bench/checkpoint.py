"""`liquid bench checkpoint`: save and load rates of a run's checkpoint, and the training stall of an async save.

One process, one rank (world 1, LocalEngine), CPU. For each model (the `tiny` preset, and `large`: tiny with a
wider model and more layers and experts, about 1.4 GB of checkpoint = fp32 weights + two Adam moments):
build the model and engine with the project's functions, take one real optimizer step on random tokens (so
the Adam state exists), then, `--repeat` times (medians reported):

  * sync save:  `CheckpointManager.save` with checkpoint.async_save=false, the whole call: gather to host
                memory + safetensors write + fsync + sha256 + rank marker + manifest + rename + `latest`.
                This is also the training stall of a synchronous save;
  * load:       the checkpoint's files are dropped from the page cache (posix_fadvise DONTNEED, after their
                fsync), then `find_checkpoint` (manifest + sha256 of every file: `verify_s`, reads the files
                cold) and `CheckpointManager.load` into a freshly built engine (`restore_s`, reads them again,
                now warm). load_gb_per_s counts both; the restored weights, Adam moments and steps are
                compared with the saved engine's (`load_restores`);
  * async save: `CheckpointManager.save` with async_save=true: `async_stall_s` is the time until the call
                returns and training can go on (the gather to host memory); `async_write_s` until the
                background writer has finished too;
  * training:   `--steps` training steps without a save vs the same number with an async save started
                after the first of them (as train_loop does). The difference is the stall as training
                feels it: the call's own stall plus whatever the background writer (safetensors, fsync,
                sha256 on a Python thread) takes from the steps in CPU cores, memory bandwidth and the GIL.
                The writer may still be busy after the last step: that remainder is `writer_wait_after_s`
                and is not in the difference.

For scale: a plain file of the large checkpoint's size written in 64 MiB chunks and fsynced (disk write
GB/s), a host copy into freshly allocated memory (what the gather does per tensor) and into an existing
buffer, and sha256 of in-memory data. `--threads` sets torch's intra-op threads (default: one per core, so
the background writer has no core of its own). GB = 1e9 bytes. A temp directory under --dir holds
everything and is deleted at the end.
Progress goes to stderr; exactly one JSON line goes to stdout.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pretrain.bench.common import log, machine_name, print_json

PRESET = "tiny"
SINGLE_RANK = ["parallel.dp=1", "parallel.ep=1", "parallel.cp=1", "cluster.num_workers=1", "cluster.launcher=local"]
# Keep every checkpoint (the benchmark deletes them itself, outside the timings) and export nothing.
CHECKPOINT = ["checkpoint.keep_last=0", "checkpoint.keep_every=0", "checkpoint.export=false"]
STEPS_DEFAULT = ["train.seq_len=256", "train.global_batch_size=2", "train.micro_batch_size=2"]
QUICK_STEPS = ["train.seq_len=64", "train.global_batch_size=2", "train.micro_batch_size=2"]
QUICK_TINY = ["model.vocab_size=512"]
LARGE = {"d_model": 640, "layers": 8, "experts": 16, "expert_dim": 512}
QUICK_LARGE = {"d_model": 192, "layers": 4, "experts": 8, "expert_dim": 192}
GB = 1e9
_CHUNK = 64 << 20


def _log(msg: str) -> None:
    log("checkpoint", msg)


def large_overrides(d_model: int, layers: int, experts: int, expert_dim: int) -> list[str]:
    """The `large` model as overrides of tiny: attention every 4th layer (tiny's layer 2 of 4), the first FFN
    dense (3 x d_model wide, as tiny), the rest MoE; tiny's mixer heads and top-k."""
    attention = [i for i in range(layers) if i % 4 == 2] or [layers - 1]
    return [f"model.d_model={d_model}", f"model.num_layers={layers}",
            f"model.attention_layers=[{','.join(map(str, attention))}]", f"model.dense_dim={3 * d_model}",
            f"model.moe.num_experts={experts}", f"model.moe.expert_dim={expert_dim}"]


def _median(values) -> float:
    return float(statistics.median(values))


def _r(x: float, nd: int = 4) -> float:
    return round(float(x), nd)


# ---- the model under test -------------------------------------------------------------------------------


class Case:
    """A model, its LocalEngine after one real optimizer step, and a training step on random tokens."""

    def __init__(self, cfg, *, seed: int):
        from parallel.engine import build_engine
        from parallel.parallelize import parallelize
        from parallel.topology import single_process_topology
        from pretrain.model.model import build_model
        from pretrain.train.step import Placement

        self.cfg, self.device = cfg, torch.device("cpu")
        self.topology = single_process_topology()
        self.place = Placement(self.topology, self.device)
        t = cfg.train
        torch.manual_seed(seed)
        self.model = parallelize(build_model(cfg.model, device=self.device), self.topology)
        self.engine = build_engine(self.model, cfg.optim, cfg.parallel, self.topology, max_steps=100_000,
                                   grad_accum=t.global_batch_size // t.micro_batch_size,
                                   micro_batch_size=t.micro_batch_size)
        self.model.train()
        self.gen = torch.Generator().manual_seed(seed + 1)

    def step(self) -> None:
        """One training step (the training loop's train_step) on random tokens."""
        from pretrain.train.step import train_step

        train_step(self.engine, (self._random_batch() for _ in range(self.engine.grad_accum)), self.place)

    def _random_batch(self) -> dict:
        t = self.cfg.train
        ids = torch.randint(0, self.cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=self.gen)
        doc_start = torch.zeros(t.micro_batch_size, t.seq_len, dtype=torch.bool)
        doc_start[:, 0] = True
        return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "doc_start": doc_start}

    def params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def manager(self, run_dir: Path, *, async_save: bool):
        from checkpoints.manager import CheckpointManager

        ckpt_cfg = dataclasses.replace(self.cfg.checkpoint, async_save=async_save)
        return CheckpointManager(run_dir, ckpt_cfg, topology=self.topology, cfg=self.cfg, log=_log)


def same_state(a: Case, b: Case) -> tuple[bool, str]:
    """Weights, buffers, Adam moments and steps and the LR schedule of b equal a's (bit for bit)."""
    state_a, state_b = a.engine.optimizer.state, b.engine.optimizer.state
    named_b = dict(b.model.named_parameters())
    for name, p in a.model.named_parameters():
        q = named_b[name]
        if not torch.equal(p.detach(), q.detach()):
            return False, f"weight {name}"
        sa, sb = state_a.get(p, {}), state_b.get(q, {})
        for kind in ("exp_avg", "exp_avg_sq"):
            if (kind in sa) != (kind in sb) or (kind in sa and not torch.equal(sa[kind], sb[kind])):
                return False, f"{kind} of {name}"
        if ("step" in sa) != ("step" in sb) or ("step" in sa and float(sa["step"]) != float(sb["step"])):
            return False, f"Adam step of {name}"
    buffers_b = dict(b.model.named_buffers())
    for name, t in a.model.named_buffers():
        if name in buffers_b and not torch.equal(t, buffers_b[name]):
            return False, f"buffer {name}"
    if a.engine.scheduler.last_epoch != b.engine.scheduler.last_epoch:
        return False, "scheduler.last_epoch"
    return True, ""


def evict_from_page_cache(path: Path) -> bool:
    """Drop the (fsynced, clean) pages of every file under `path` from the page cache; False when the
    platform has no posix_fadvise."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for f in sorted(path.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    return True


def _checkpoint_bytes(ckpt: Path) -> tuple[int, int]:
    from checkpoints.manifest import read_manifest

    files = read_manifest(ckpt)["files"]
    return sum(f["bytes"] for f in files.values()) + (ckpt / "manifest.json").stat().st_size, len(files) + 1


def _check_saved(manager, step: int) -> None:
    if manager.failures:
        raise RuntimeError(f"the checkpoint save failed: {manager.failures[-1]}")
    if step not in manager.saved:
        raise RuntimeError(f"step {step} was not saved")


# ---- one model ------------------------------------------------------------------------------------------


def bench_model(name: str, overrides: list[str], *, workdir: Path, repeat: int, steps: int) -> dict:
    from checkpoints.manager import find_checkpoint, step_dir_name
    from pretrain.config import load_config

    cfg = load_config(PRESET, overrides)
    started = time.perf_counter()
    case = Case(cfg, seed=cfg.train.seed)
    case.step()  # one real optimizer step: the Adam moments exist
    params = case.params()
    _log(f"{name}: {params / 1e6:.1f} M parameters, checkpoint ~{12 * params / GB:.2f} GB "
         f"(built in {time.perf_counter() - started:.1f} s)")
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    sync_dir, async_dir = workdir / name / "sync", workdir / name / "async"
    sync_mgr, async_mgr = case.manager(sync_dir, async_save=False), case.manager(async_dir, async_save=True)
    samples: dict[str, list[float]] = {k: [] for k in (
        "save_s", "verify_s", "restore_s", "async_stall_s", "async_write_s", "steps_baseline_s",
        "steps_with_async_save_s", "call_stall_in_steps_s", "writer_wait_after_s")}
    nbytes = nfiles = 0
    restores, evicted, mismatch = True, True, ""
    step_no = 1000
    for r in range(-1, repeat):  # round -1 warms up (imports, allocator, first-call costs) and is dropped
        # -- synchronous save: the whole call is the stall --------------------------------------------------
        step_no += 1
        t0 = time.perf_counter()
        sync_mgr.save(step_no, step_no * tokens_per_step, case.engine, None)
        samples["save_s"].append(time.perf_counter() - t0)
        _check_saved(sync_mgr, step_no)
        ckpt = sync_dir / "checkpoints" / step_dir_name(step_no)
        nbytes, nfiles = _checkpoint_bytes(ckpt)

        # -- load into a fresh engine: verify (cold), then restore -----------------------------------------
        fresh = Case(cfg, seed=cfg.train.seed + 100 + r)  # other initial weights, no Adam state yet
        evicted = evict_from_page_cache(ckpt) and evicted
        t0 = time.perf_counter()
        found = find_checkpoint(sync_dir, log=_log)
        t1 = time.perf_counter()
        with warnings.catch_warnings():  # a fresh engine's scheduler steps before its optimizer: expected here
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            step_loaded, _ = sync_mgr.load(found, fresh.engine, None)
        t2 = time.perf_counter()
        samples["verify_s"].append(t1 - t0)
        samples["restore_s"].append(t2 - t1)
        ok, why = same_state(case, fresh)
        ok = ok and found == ckpt and step_loaded == step_no
        if not ok and restores:
            mismatch = why or f"loaded {found.name} (step {step_loaded}), expected {ckpt.name}"
        restores = restores and ok
        del fresh
        shutil.rmtree(ckpt)

        # -- asynchronous save: stall until the call returns, then until written ---------------------------
        step_no += 1
        t0 = time.perf_counter()
        async_mgr.save(step_no, step_no * tokens_per_step, case.engine, None)
        t1 = time.perf_counter()
        async_mgr.wait()
        t2 = time.perf_counter()
        _check_saved(async_mgr, step_no)
        samples["async_stall_s"].append(t1 - t0)
        samples["async_write_s"].append(t2 - t0)
        shutil.rmtree(async_dir / "checkpoints" / step_dir_name(step_no))

        if r < 0:
            samples = {k: [] for k in samples}  # a failed restore in the warm-up still counts
            _log(f"{name}: warm-up round done")
            continue

        # -- the stall as training feels it: N steps with an async save after the first vs N without ------
        case.step()  # warm-up after the saves
        order = ("baseline", "save") if r % 2 == 0 else ("save", "baseline")
        for which in order:
            if which == "baseline":
                t0 = time.perf_counter()
                for _ in range(steps):
                    case.step()
                samples["steps_baseline_s"].append(time.perf_counter() - t0)
                continue
            step_no += 1
            t0 = time.perf_counter()
            case.step()
            c0 = time.perf_counter()
            async_mgr.save(step_no, step_no * tokens_per_step, case.engine, None)
            samples["call_stall_in_steps_s"].append(time.perf_counter() - c0)
            for _ in range(steps - 1):
                case.step()
            t1 = time.perf_counter()
            async_mgr.wait()
            samples["steps_with_async_save_s"].append(t1 - t0)
            samples["writer_wait_after_s"].append(time.perf_counter() - t1)
            _check_saved(async_mgr, step_no)
            shutil.rmtree(async_dir / "checkpoints" / step_dir_name(step_no))
        _log(f"{name} [{r + 1}/{repeat}]: sync save {samples['save_s'][-1]:.3f} s, verify "
             f"{samples['verify_s'][-1]:.3f} s + restore {samples['restore_s'][-1]:.3f} s, async stall "
             f"{samples['async_stall_s'][-1]:.3f} s (written after {samples['async_write_s'][-1]:.3f} s); "
             f"{steps} steps {samples['steps_baseline_s'][-1]:.3f} s, with an async save "
             f"{samples['steps_with_async_save_s'][-1]:.3f} s (+{samples['writer_wait_after_s'][-1]:.3f} s "
             "writer after)")
    sync_mgr.close()
    async_mgr.close()
    shutil.rmtree(workdir / name, ignore_errors=True)

    m = {k: _median(v) for k, v in samples.items()}
    load_s = m["verify_s"] + m["restore_s"]
    slowdown = _median([w - b for w, b in zip(samples["steps_with_async_save_s"], samples["steps_baseline_s"])])
    ratio = m["async_stall_s"] / m["save_s"]
    return {
        "model": name, "overrides": [o for o in overrides if o.startswith("model.")],
        "params": params, "checkpoint_bytes": nbytes, "checkpoint_files": nfiles,
        "save_s": _r(m["save_s"]), "save_gb_per_s": _r(nbytes / GB / m["save_s"], 3),
        "load_s": _r(load_s), "load_gb_per_s": _r(nbytes / GB / load_s, 3),
        "verify_s": _r(m["verify_s"]), "verify_gb_per_s": _r(nbytes / GB / m["verify_s"], 3),
        "restore_s": _r(m["restore_s"]), "restore_gb_per_s": _r(nbytes / GB / m["restore_s"], 3),
        "load_cold": evicted, "load_restores": restores, **({"load_mismatch": mismatch} if mismatch else {}),
        "sync_stall_s": _r(m["save_s"]), "async_stall_s": _r(m["async_stall_s"]),
        "async_write_s": _r(m["async_write_s"]),
        "gather_gb_per_s": _r(nbytes / GB / m["async_stall_s"], 3),
        "async_over_sync_stall": _r(ratio), "async_stall_under_tenth": ratio < 0.1,
        "training": {
            "steps": steps, "tokens_per_step": tokens_per_step,
            "step_s_baseline": _r(m["steps_baseline_s"] / steps),
            "baseline_s": _r(m["steps_baseline_s"]), "with_async_save_s": _r(m["steps_with_async_save_s"]),
            "slowdown_s": _r(slowdown), "slowdown_over_sync_stall": _r(slowdown / m["save_s"]),
            "save_call_stall_s": _r(m["call_stall_in_steps_s"]),
            "writer_wait_after_s": _r(m["writer_wait_after_s"]),
            "writer_done_within_steps": m["writer_wait_after_s"] < 0.01,
        },
        "repeats": repeat, "samples_s": {k: [_r(x) for x in v] for k, v in samples.items()},
        "wall_s": _r(time.perf_counter() - started, 1),
    }


# ---- references for scale ---------------------------------------------------------------------------------


def disk_write(path: Path, nbytes: int) -> float:
    """Seconds to write `nbytes` of random data to a new file in 64 MiB chunks and fsync it."""
    chunk = memoryview(os.urandom(min(_CHUNK, max(nbytes, 1))))
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        left = nbytes
        while left > 0:
            n = min(left, len(chunk))
            fh.write(chunk[:n])
            left -= n
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    path.unlink()
    return seconds


def host_copy_gb_per_s(nbytes: int, repeat: int) -> tuple[float, float]:
    """(fresh, reused): a tensor copied into freshly allocated memory, as the gather does per tensor
    (`.to("cpu", copy=True)`: page faults on first touch), and into a buffer that already exists (`copy_`)."""
    src = torch.rand(max(nbytes // 4, 1))
    fresh, reused = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst = src.to("cpu", copy=True)
        t1 = time.perf_counter()
        dst.copy_(src)
        t2 = time.perf_counter()
        fresh.append(t1 - t0)
        reused.append(t2 - t1)
        del dst
    size = src.numel() * 4 / GB
    return size / _median(fresh), size / _median(reused)


def sha256_gb_per_s(nbytes: int) -> float:
    data = os.urandom(max(nbytes, 1))
    t0 = time.perf_counter()
    hashlib.sha256(data).digest()
    return len(data) / GB / (time.perf_counter() - t0)


# ---- CLI --------------------------------------------------------------------------------------------------


def main_checkpoint(argv=None) -> dict:
    """CLI: progress lines on stderr, exactly one JSON line on stdout. Returns the printed object."""
    p = argparse.ArgumentParser(prog="liquid bench checkpoint", description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,large", help="comma list of tiny and large (default both)")
    p.add_argument("--d-model", type=int, default=None, help=f"large: model.d_model (default {LARGE['d_model']})")
    p.add_argument("--layers", type=int, default=None, help=f"large: model.num_layers (default {LARGE['layers']})")
    p.add_argument("--experts", type=int, default=None,
                   help=f"large: model.moe.num_experts (default {LARGE['experts']})")
    p.add_argument("--expert-dim", type=int, default=None,
                   help=f"large: model.moe.expert_dim (default {LARGE['expert_dim']})")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps timed with and without an async save (default 4; --quick 2)")
    p.add_argument("--repeat", type=int, default=None, help="repetitions, medians reported (default 3; --quick 1)")
    p.add_argument("--dir", default=None, help="a temp directory is made (and deleted) under this one "
                                               "(default: the system temp directory)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (default 0: torch's default, one per core); the background "
                        "writer is one more thread")
    p.add_argument("--quick", action="store_true",
                   help=f"small sizes for tests: large = {QUICK_LARGE}, seq_len 64, vocab 512 for tiny")
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in ("tiny", "large") for m in models):
        p.error("--models takes tiny, large or both (comma-separated)")
    sizes = dict(QUICK_LARGE if args.quick else LARGE)
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    steps = args.steps if args.steps is not None else (2 if args.quick else 4)
    repeat = args.repeat if args.repeat is not None else (1 if args.quick else 3)
    if steps < 1 or repeat < 1 or min(sizes.values()) < 1 or args.threads < 0:
        p.error("--steps, --repeat and the model sizes must be >= 1, --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    base = SINGLE_RANK + CHECKPOINT + (QUICK_STEPS if args.quick else STEPS_DEFAULT)
    plans = {"tiny": base + (QUICK_TINY if args.quick else []), "large": base + large_overrides(**sizes)}
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="liquid-bench-checkpoint-", dir=args.dir))
    started = time.perf_counter()
    _log(f"working in {workdir}; {repeat} repeat(s), {steps} training steps per timing; "
         f"{torch.get_num_threads()} torch threads on {os.cpu_count()} cores")
    try:
        results = [bench_model(name, plans[name], workdir=workdir, repeat=repeat, steps=steps) for name in models]
        biggest = max(r["checkpoint_bytes"] for r in results)
        _log(f"disk: writing {biggest / GB:.2f} GB with fsync, {repeat} time(s)")
        disk_s = _median([disk_write(workdir / "disk_write.bin", biggest) for _ in range(repeat)])
        ref_bytes = min(biggest, 1 << 30)
        fresh, reused = host_copy_gb_per_s(ref_bytes, repeat)
        reference = {"disk_write_bytes": biggest, "disk_write_s": _r(disk_s),
                     "disk_write_gb_per_s": _r(biggest / GB / disk_s, 3),
                     "host_copy_fresh_gb_per_s": _r(fresh, 3), "host_copy_reused_gb_per_s": _r(reused, 3),
                     "sha256_gb_per_s": _r(sha256_gb_per_s(min(ref_bytes, 256 << 20)), 3),
                     "reference_bytes": ref_bytes}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    from importlib.metadata import version

    note = ("One process, world 1, LocalEngine, fp32 on CPU; GB = 1e9 bytes; medians of `repeats`. "
            "save = CheckpointManager.save with async_save=false (gather to host + write + fsync + sha256 + "
            "manifest + rename), which is also the synchronous stall. load = find_checkpoint (sha256 of every "
            "file, read cold: the files were dropped from the page cache first when load_cold) + "
            "CheckpointManager.load into a freshly built engine (restore, warm reads). async_stall_s = time "
            "until CheckpointManager.save(async_save=true) returns, i.e. the copy of every tensor to newly "
            "allocated host memory: bound by memory bandwidth and page faults on first touch (compare "
            "gather_gb_per_s with reference.host_copy_fresh_gb_per_s and host_copy_reused_gb_per_s; whether the "
            "allocator hands back recycled memory varies between saves). "
            "training.slowdown_s = (steps with an async save started after the first step) - (the same number "
            "of steps without), both on random tokens; the steps and the background writer share the cores, "
            "memory bandwidth and the GIL, so it includes the writer's interference with the steps, but not "
            "writer_wait_after_s, the writing left when the steps ended. async_stall_under_tenth: "
            "async_stall_s < sync_stall_s / 10 for every model measured.")
    out = {
        "bench": "checkpoint", "machine": machine_name(), "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "safetensors": version("safetensors"),
        "preset": PRESET, "quick": args.quick, "repeats": repeat, "steps": steps, "large": sizes,
        "results": results, "reference": reference,
        "async_stall_under_tenth": all(r["async_stall_under_tenth"] for r in results),
        "load_restores": all(r["load_restores"] for r in results),
        "wall_s": _r(time.perf_counter() - started, 1), "note": note,
    }
    print_json(out)
    return out


__all__ = ["main_checkpoint", "large_overrides", "evict_from_page_cache", "same_state"]
