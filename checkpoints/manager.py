"""Checkpoints of a run: atomic, asynchronous, verified saves; resume from the newest good one; retention.

Layout under the run directory:

    checkpoints/step_00000100/      a complete checkpoint (renamed from step_00000100.tmp/ when done)
        rank00000.safetensors       this rank's share of the state (parallel/state.py): weights, Adam
                                    moments and steps, and the rank's RNG states
        rank00000.json              the rank's loader position, Python/NumPy RNG, the tensor index
        manifest.json               written last: sha256 and size of every file, step, tokens, topology,
                                    config hash, versions, where each tensor lives
    checkpoints/latest              the name of the newest complete checkpoint (replaced atomically)

Save: every rank gathers its share to host memory (the training stall), then a background thread writes
and fsyncs its files and a `rank*.json` marker; rank 0 waits for every marker, writes the manifest,
renames the directory and replaces `latest`, then applies retention. One save in flight at a time.
A failed save (disk full, permissions, a rank killed) never touches an earlier checkpoint.

Load: the newest checkpoint whose manifest and checksums verify; a torn or corrupt one is reported by
name and skipped. Tensors are read with safetensors and the rest is JSON: nothing is unpickled.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from checkpoints.manifest import (FORMAT, MANIFEST, CorruptCheckpoint, fsync_dir, library_versions,
                                  read_manifest, sha256_file, verify, write_json_atomic)
from pretrain.run_dir import RunDir

_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A save that could not complete (earlier checkpoints are untouched)."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir) -> Path:
    return RunDir(run_dir).checkpoints_dir


def list_checkpoints(run_dir) -> list[tuple[int, Path]]:
    """(step, directory) of every finished-looking checkpoint directory, newest first (not yet verified)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def find_checkpoint(run_dir, step: int | None = None, *, checksums: bool = True, log=None) -> Path:
    """The newest complete checkpoint of a run whose files verify (or the one at `step`).

    Torn or corrupt checkpoints are reported through `log` and skipped; ValueError when none is usable.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    candidates = list_checkpoints(run_dir)
    if step is not None:
        candidates = [(s, p) for s, p in candidates if s == step]
        if not candidates:
            steps = ", ".join(str(s) for s, _ in list_checkpoints(run_dir)) or "none"
            raise ValueError(f"{run_dir} has no checkpoint at step {step} (steps saved: {steps})")
    skipped = []
    for _, path in candidates:
        try:
            verify(path, checksums=checksums)
            return path
        except CorruptCheckpoint as err:
            log(f"checkpoint: skipping {err}")
            skipped.append(str(err))
    detail = f"; skipped: {'; '.join(skipped)}" if skipped else ""
    raise ValueError(f"no complete checkpoint in {checkpoint_root(run_dir)}{detail}")


def newest_checkpoint(run_dir, *, log=None) -> Path | None:
    """find_checkpoint, or None when the run has no usable checkpoint."""
    if not list_checkpoints(run_dir):
        return None
    try:
        return find_checkpoint(run_dir, log=log)
    except ValueError:
        return None


class TensorReader:
    """Reads tensors (or row slices of them) of a verified checkpoint by kind and single-process name."""

    def __init__(self, ckpt: Path, manifest: dict):
        self.ckpt, self.index = Path(ckpt), manifest["tensors"]
        self._files = {}

    def _open(self, name: str):
        from safetensors import safe_open

        if name not in self._files:
            self._files[name] = safe_open(str(self.ckpt / name), framework="pt")
        return self._files[name]

    def read(self, kind: str, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        entry = self.index.get(f"{kind}/{name}")
        if entry is None:
            return None
        shape = tuple(entry["shape"])
        start, stop = rows if rows is not None else (0, shape[0] if shape else 0)
        if not shape:  # a scalar
            piece = entry["pieces"][0]
            return self._open(piece["file"]).get_tensor(piece["key"])
        parts, covered = [], start
        for piece in sorted(entry["pieces"], key=lambda p: (p["rows"] or [0])[0]):
            lo, hi = piece["rows"] or (0, shape[0])
            a, b = max(lo, covered), min(hi, stop)
            if a >= b or a != covered:
                continue
            parts.append(self._open(piece["file"]).get_slice(piece["key"])[a - lo:b - lo])
            covered = b
        if covered != stop:
            raise CorruptCheckpoint(f"{self.ckpt.name}: rows [{start}, {stop}) of {kind}/{name} are not all saved")
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def read_model_state(ckpt) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict (single-process names, all experts) of a checkpoint directory."""
    ckpt = Path(ckpt)
    manifest = verify(ckpt, checksums=False)
    reader = TensorReader(ckpt, manifest)
    names = [key.split("/", 1)[1] for key in manifest["tensors"] if key.startswith("model/")]
    return {name: reader.read("model", name) for name in sorted(names)}


def _rng_state() -> tuple[dict, dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [version, list(state), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, plain


def _set_rng_state(reader_file, plain: dict) -> None:
    torch.set_rng_state(reader_file.get_tensor("rng/torch"))
    if "rng/cuda" in reader_file.keys() and torch.cuda.is_available():
        torch.cuda.set_rng_state(reader_file.get_tensor("rng/cuda"))
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _model_dict(model_cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(model_cfg)))


class CheckpointManager:
    """Saves and loads the checkpoints of one run, on every rank (collective calls are marked)."""

    def __init__(self, run_dir, ckpt_cfg, *, topology, cfg, launch_id: str | None = None, log=None):
        self.run_dir, self.cfg, self.topology, self.run_cfg = Path(run_dir), ckpt_cfg, topology, cfg
        self.launch_id = launch_id
        self.root = checkpoint_root(run_dir)
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self._thread: threading.Thread | None = None
        self._buffers: dict = {}  # host copies of the last save, reused by the next
        self._error: BaseException | None = None
        self.failures: list[str] = []
        self.saved: list[int] = []
        self.last_stall_s = 0.0
        if topology.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale()

    # ---- save ---------------------------------------------------------------------------------------

    def due(self, step: int, max_steps: int) -> bool:
        if self.cfg.interval > 0 and step % self.cfg.interval == 0:
            return True
        return step == max_steps and self.cfg.save_final

    def save(self, step: int, tokens: int, engine, data) -> float:
        """Checkpoint the state after `step` (collective). Returns the training stall in seconds: the wait
        for a save still in flight plus the copy to host memory; the writing happens in the background."""
        from parallel.collectives import barrier
        from parallel.state import collect

        t0 = time.perf_counter()
        self.wait()
        tmp = self.root / (step_dir_name(step) + ".tmp")
        if self.topology.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover of an attempt that died
        barrier()
        pieces = collect(engine, self.topology, self._buffers)  # the previous save is written: reuse its memory
        rng_tensors, rng_plain = _rng_state()
        rank_state = {"rank": self.topology.rank, "dp_rank": self.topology.dp_rank,
                      "cp_rank": self.topology.cp_rank, "ep_rank": self.topology.ep_rank,
                      "data": data.state_dict() if data is not None else None, "rng": rng_plain,
                      "scheduler_last_epoch": int(engine.scheduler.last_epoch)}
        job = dict(step=step, tokens=tokens, pieces=pieces, rng=rng_tensors, rank_state=rank_state, tmp=tmp)
        if self.cfg.async_save:
            self._thread = threading.Thread(target=self._write_guarded, kwargs=job, daemon=True,
                                            name=f"checkpoint-{step}")
            self._thread.start()
        else:
            self._write_guarded(**job)
        self.last_stall_s = time.perf_counter() - t0
        return self.last_stall_s

    def wait(self) -> None:
        """Block until the save in flight (if any) is written (and, on rank 0, finalized)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        self.wait()

    def _write_guarded(self, *, step, tmp, **job) -> None:
        try:
            t0 = time.perf_counter()
            self._write_rank(step=step, tmp=tmp, **job)
            if self.topology.rank == 0:
                total = self._finalize(step, job["tokens"], tmp)
                self.saved.append(step)
                self.log(f"checkpoint: saved {step_dir_name(step)} ({total / 2**20:.1f} MiB in "
                         f"{time.perf_counter() - t0:.2f} s; training stalled {self.last_stall_s:.3f} s)")
        except BaseException as err:  # reported, never raised into training: earlier checkpoints stand
            self._error = err
            self._fail(step, tmp, err)

    def _fail(self, step: int, tmp: Path, err: BaseException) -> None:
        rank = self.topology.rank
        try:
            (tmp / f"rank{rank:05d}.failed").write_text(f"{type(err).__name__}: {err}")
        except OSError:
            pass
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            newest = newest_checkpoint(self.run_dir, log=lambda _: None)
            usable = f"the newest usable checkpoint is {newest.name}" if newest else "no earlier checkpoint exists"
            message = (f"checkpoint: saving {step_dir_name(step)} FAILED ({type(err).__name__}: {err}); "
                       f"earlier checkpoints are untouched and {usable}; training continues")
        else:
            message = f"checkpoint: rank {rank} could not write its share of {step_dir_name(step)}: {err}"
        self.failures.append(message)
        self.log(message)

    def _write_rank(self, *, step, tokens, pieces, rng, rank_state, tmp) -> None:
        from safetensors.torch import save_file

        rank = self.topology.rank
        tmp.mkdir(parents=True, exist_ok=True)
        name = f"rank{rank:05d}.safetensors"
        tensors = {p.key: p.tensor for p in pieces}
        tensors.update(rng)
        partial = tmp / (name + ".partial")
        save_file(tensors, str(partial), metadata={"format": FORMAT, "step": str(step)})
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(partial, tmp / name)
        index = [{"kind": p.kind, "name": p.name, "key": p.key, "rows": list(p.rows) if p.rows else None,
                  "shape": list(p.shape)} for p in pieces]
        marker = {**rank_state, "file": name, "bytes": (tmp / name).stat().st_size,
                  "sha256": sha256_file(tmp / name), "tensors": index}
        write_json_atomic(tmp / f"rank{rank:05d}.json", marker)

    def _finalize(self, step: int, tokens: int, tmp: Path) -> int:
        """Rank 0: wait for every rank's marker, write the manifest, rename, point `latest`, retain."""
        world = self.topology.world
        deadline = time.monotonic() + self.cfg.finalize_timeout_s
        markers = [tmp / f"rank{r:05d}.json" for r in range(world)]
        while not all(m.exists() for m in markers):
            failed = sorted(tmp.glob("rank*.failed"))
            if failed:
                raise CheckpointError(f"{failed[0].stem} could not write: {failed[0].read_text()}")
            if time.monotonic() > deadline:
                missing = [m.stem for m in markers if not m.exists()]
                raise CheckpointError(f"ranks {', '.join(missing)} did not finish writing within "
                                      f"checkpoint.finalize_timeout_s={self.cfg.finalize_timeout_s}")
            time.sleep(0.02)
        ranks = [json.loads(m.read_text()) for m in markers]
        files, tensors = {}, {}
        for r in ranks:
            files[r["file"]] = {"bytes": r["bytes"], "sha256": r["sha256"]}
            for t in r["tensors"]:
                entry = tensors.setdefault(f"{t['kind']}/{t['name']}", {"shape": t["shape"], "pieces": []})
                entry["pieces"].append({"file": r["file"], "key": t["key"], "rows": t["rows"]})
        for m in markers:
            files[m.name] = {"bytes": m.stat().st_size, "sha256": sha256_file(m)}
        t, run = self.topology, self.run_cfg
        from pretrain.config import config_hash

        manifest = {
            "format": FORMAT, "step": step, "tokens": tokens, "created": time.time(), "launch_id": self.launch_id,
            "topology": {"world": world, "dp": t.dp, "ep": t.ep, "cp": t.cp,
                         "zero_stage": run.parallel.zero_stage if world > 1 else 0},
            "config_hash": config_hash(run), "model": _model_dict(run.model),
            "scheduler_last_epoch": ranks[0]["scheduler_last_epoch"],
            "ranks": [{k: r[k] for k in ("rank", "dp_rank", "cp_rank", "ep_rank", "file")} |
                      {"state": f"rank{r['rank']:05d}.json"} for r in ranks],
            "versions": library_versions(), "host": socket.gethostname(),
            "files": files, "tensors": tensors,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        final = self.root / step_dir_name(step)
        if final.exists():  # the same step saved again after a resume from an older checkpoint
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(self.root)
        pointer = RunDir(self.run_dir).latest_file
        latest = pointer.with_name(pointer.name + ".partial")
        latest.write_text(final.name + "\n")
        with open(latest, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(latest, pointer)
        fsync_dir(self.root)
        self._retain()
        return sum(f["bytes"] for f in files.values())

    def _retain(self) -> None:
        """Keep the newest `keep_last` (0 = all) plus every `keep_every`-th step; never the newest one."""
        complete = [(s, p) for s, p in list_checkpoints(self.run_dir) if (p / MANIFEST).exists()]
        if not complete or self.cfg.keep_last <= 0:
            return
        keep = {s for s, _ in complete[:self.cfg.keep_last]} | {complete[0][0]}
        if self.cfg.keep_every > 0:
            keep |= {s for s, _ in complete if s % self.cfg.keep_every == 0}
        for step, path in complete:
            if step not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _remove_stale(self) -> None:
        for path in sorted(self.root.glob("step_*.tmp")) + sorted(self.root.glob("step_*.old")):
            self.log(f"checkpoint: removing {path.name}, left by a save that did not finish")
            shutil.rmtree(path, ignore_errors=True)

    # ---- load ---------------------------------------------------------------------------------------

    def load(self, ckpt: Path, engine, data) -> tuple[int, int]:
        """Restore a verified checkpoint into this rank's engine and loader (collective-free; every rank
        reads what it holds). Returns (step, tokens seen). Another DP / EP / CP layout or ZeRO stage is
        resharded; a different model architecture is refused."""
        from parallel.state import restore, state_shapes

        ckpt = Path(ckpt)
        manifest = read_manifest(ckpt)
        reader = TensorReader(ckpt, manifest)
        self._check_model(ckpt, manifest, state_shapes(engine, self.topology))
        restore(engine, self.topology, reader.read)
        _restore_schedule(engine.scheduler, manifest["scheduler_last_epoch"])
        saved, now = manifest["topology"], self.topology
        same_layout = saved["world"] == now.world and saved["dp"] == now.dp and saved["cp"] == now.cp
        if data is not None:
            self._load_data(ckpt, manifest, data, same_layout)
        if same_layout:
            state = json.loads((ckpt / f"rank{now.rank:05d}.json").read_text())
            _set_rng_state(reader._open(state["file"]), state["rng"])
        if now.rank == 0:
            how = "" if same_layout else (f"; resharded from dp={saved['dp']} ep={saved['ep']} cp={saved['cp']} "
                                          f"to dp={now.dp} ep={now.ep} cp={now.cp}")
            self.log(f"checkpoint: resumed from {ckpt.name} (step {manifest['step']}, "
                     f"{manifest['tokens']:,} tokens){how}")
        return int(manifest["step"]), int(manifest["tokens"])

    def _check_model(self, ckpt: Path, manifest: dict, expected: dict) -> None:
        problems = []
        saved = {key.split("/", 1)[1]: tuple(v["shape"]) for key, v in manifest["tensors"].items()
                 if key.startswith("model/")}
        for name, shape in expected.items():
            if name not in saved:
                problems.append(f"{name} is missing")
            elif saved[name] != tuple(shape):
                problems.append(f"{name} has shape {list(saved[name])}, the model needs {list(shape)}")
        problems += [f"{name} is not in the model" for name in saved if name not in expected]
        if problems:
            changed = [k for k, v in _model_dict(self.run_cfg.model).items() if manifest["model"].get(k) != v]
            hint = f" (model settings changed: {', '.join(changed)})" if changed else ""
            raise ValueError(f"cannot load {ckpt.name} into this model{hint}: " + "; ".join(problems[:5]) +
                             (f"; and {len(problems) - 5} more" if len(problems) > 5 else "") +
                             ". Only the parallel layout (parallel.dp, ep, cp, zero_stage) and cluster.num_workers "
                             "may change when resuming.")

    def _load_data(self, ckpt: Path, manifest: dict, data, same_layout: bool) -> None:
        states = {}
        for r in manifest["ranks"]:
            if r["cp_rank"] == 0:
                states[r["dp_rank"]] = json.loads((ckpt / r["state"]).read_text())["data"]
        if same_layout:
            data.load_state_dict(states[self.topology.dp_rank])
        else:
            data.load_rank_states([states[k] for k in sorted(states)])  # merging positions is the loader's business


def _restore_schedule(scheduler, last_epoch: int) -> None:
    """Put the LR schedule at `last_epoch` by the scheduler's own step (the same arithmetic as training)."""
    scheduler.last_epoch = last_epoch - 1
    scheduler._step_count = max(last_epoch, 1)
    scheduler.step()


def resume_target(run_dir, resume: str, *, launch_id: str | None = None, log=None) -> Path | None:
    """What to resume from: None (a fresh run), the newest good checkpoint (`auto`), or a given directory.

    A fresh run (`none`) in a run directory that already has checkpoints is refused: it would mix two runs.
    When this launch (`launch_id`) has saved checkpoints already, the worker group was restarted after a
    failure: it resumes from the newest of them, whatever `resume` says.
    """
    if launch_id is not None:
        for _, path in list_checkpoints(run_dir):
            try:
                if read_manifest(path).get("launch_id") == launch_id:
                    return find_checkpoint(run_dir, log=log)
            except CorruptCheckpoint:
                continue
    if resume == "none":
        existing = list_checkpoints(run_dir)
        if existing:
            raise ValueError(f"{run_dir} already has checkpoints (newest {existing[0][1].name}); resume it with "
                             f"checkpoint.resume=auto (or `liquid resume {run_dir}`), or pick another run.dir")
        return None
    if resume == "auto":
        if not list_checkpoints(run_dir):
            return None
        return find_checkpoint(run_dir, log=log)
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"checkpoint.resume={resume!r}: not none, auto or a checkpoint directory")
    verify(path)
    return path
