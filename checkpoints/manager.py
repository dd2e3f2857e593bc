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
name and skipped. The ranks verify together, each hashing a 1/world share of the files, and each reads
back only the rows of its ZeRO fragments and its own rank file, so neither grows with the number of ranks.
Tensors are read with safetensors and the rest is JSON: nothing is unpickled. Finding checkpoints and
verifying them alone (find_checkpoint, resume_target, ...) lives in checkpoints/manifest.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from checkpoints.manifest import (FORMAT, MANIFEST, CorruptCheckpoint, check_file, checkpoint_root, first_good,
                                  hash_share, library_versions, list_checkpoints, newest_checkpoint, read_manifest,
                                  remember_verified, resume_candidates, sha256_file, step_dir_name, verify,
                                  was_verified)
from checkpoints.manifest import find_checkpoint, resume_target  # noqa: F401 - callers import them from here
from parallel.faults import fault_point
from pretrain.run_dir import RunDir, fsync_dir, write_json_atomic


class CheckpointError(RuntimeError):
    """A save that could not complete (earlier checkpoints are untouched)."""


class TensorReader:
    """Reads tensors (or row slices of them) of a verified checkpoint by kind and single-process name,
    counting the files it opens and the bytes it reads (`files`, `bytes_read`)."""

    def __init__(self, ckpt: Path, manifest: dict):
        self.ckpt, self.index = Path(ckpt), manifest["tensors"]
        self._files = {}
        self.bytes_read = 0

    @property
    def files(self) -> set[str]:
        return set(self._files)

    def _open(self, name: str):
        from safetensors import safe_open

        if name not in self._files:
            self._files[name] = safe_open(str(self.ckpt / name), framework="pt")
        return self._files[name]

    def _counted(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes_read += t.numel() * t.element_size()
        return t

    def tensor(self, file: str, key: str) -> torch.Tensor:
        return self._counted(self._open(file).get_tensor(key))

    def read(self, kind: str, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        entry = self.index.get(f"{kind}/{name}")
        if entry is None:
            return None
        shape = tuple(entry["shape"])
        start, stop = rows if rows is not None else (0, shape[0] if shape else 0)
        if not shape:  # a scalar
            piece = entry["pieces"][0]
            return self.tensor(piece["file"], piece["key"])
        parts, covered = [], start
        for piece in sorted(entry["pieces"], key=lambda p: (p["rows"] or [0])[0]):
            lo, hi = piece["rows"] or (0, shape[0])
            a, b = max(lo, covered), min(hi, stop)
            if a >= b or a != covered:
                continue
            parts.append(self._counted(self._open(piece["file"]).get_slice(piece["key"])[a - lo:b - lo]))
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


def _set_rng_state(reader: TensorReader, file: str, plain: dict) -> None:
    torch.set_rng_state(reader.tensor(file, "rng/torch"))
    if "rng/cuda" in reader._open(file).keys() and torch.cuda.is_available():
        torch.cuda.set_rng_state(reader.tensor(file, "rng/cuda"))
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _model_dict(model_cfg) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(model_cfg)))


@dataclasses.dataclass
class ReadStats:
    """What this rank read of a checkpoint: the files it opened (or hashed) and the bytes it read of them."""
    files: set = dataclasses.field(default_factory=set)
    bytes: int = 0

    def add(self, name: str, nbytes: int) -> None:
        self.files.add(name)
        self.bytes += nbytes


class CheckpointManager:
    """Saves and loads the checkpoints of one run, on every rank (collective calls are marked).

    `verify_stats` and `load_stats` say what this rank hashed in the last resume_target / verify and read
    in the last load: neither grows with the number of ranks."""

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
        self.verify_stats, self.load_stats = ReadStats(), ReadStats()
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
        fault_point("checkpoint_write", step)  # the chaos soak's kill in the middle of a write (parallel/faults.py)
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
        remember_verified(final)  # every file was hashed as it was written: exporting it needs no second pass
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

    def resume_target(self, resume: str) -> Path | None:
        """resume_target() on every rank (collective): rank 0 lists the checkpoints `checkpoint.resume`
        allows and every rank learns them (or the error); the ranks then verify them together, newest first,
        and all return the same one."""
        plan: list = [None]
        if self.topology.rank == 0:
            try:
                plan = [resume_candidates(self.run_dir, resume, launch_id=self.launch_id)]
            except ValueError as err:  # raised on every rank, not only here while the others wait
                plan = [err]
        if self._collective():
            dist.broadcast_object_list(plan, src=0)
        if isinstance(plan[0], ValueError):
            raise plan[0]
        candidates, strict = plan[0]
        self.verify_stats = ReadStats()
        if strict:
            self.verify(candidates[0])
            return candidates[0]
        log = self.log if self.topology.rank == 0 else (lambda _: None)
        return first_good(candidates, self.verify, root=self.root, log=log) if candidates else None

    def verify(self, ckpt: Path) -> dict:
        """manifest.verify shared by the ranks (collective): each checks its hash_share of the files (none when
        this process verified or wrote the checkpoint already) and one all_gather tells every rank the first
        bad file of all. Returns the manifest; raises CorruptCheckpoint naming that file on every rank."""
        ckpt, t = Path(ckpt), self.topology
        bad = None
        try:
            manifest = read_manifest(ckpt)
            for name in ([] if was_verified(ckpt) else hash_share(manifest, t.rank, t.world)):
                self.verify_stats.add(name, manifest["files"][name]["bytes"])
                check_file(ckpt, name, manifest["files"][name])
        except CorruptCheckpoint as err:
            bad = (err.file or "", str(err))
        except Exception as err:  # noqa: BLE001 - unreadable here: the checkpoint is skipped on every rank
            bad = ("", f"{ckpt.name}: {type(err).__name__}: {err}")
        everyone = [bad]
        if self._collective():
            everyone = [None] * t.world
            dist.all_gather_object(everyone, bad)
        errors = sorted(e for e in everyone if e is not None)
        if errors:
            raise CorruptCheckpoint(errors[0][1], errors[0][0] or None)
        remember_verified(ckpt)
        return manifest

    def _collective(self) -> bool:
        return self.topology.world > 1 and dist.is_initialized()

    def load(self, ckpt: Path, engine, data) -> tuple[int, int]:
        """Restore a verified checkpoint into this rank's engine and loader (collective: each rank reads only
        the rows of each tensor that it keeps, and the ranks share the weights). Returns (step, tokens seen).
        Another DP / EP / CP layout or ZeRO stage is resharded; a different model architecture is refused."""
        from parallel.state import restore, state_shapes

        ckpt = Path(ckpt)
        manifest = read_manifest(ckpt)
        reader = TensorReader(ckpt, manifest)
        self.load_stats = ReadStats()
        self._check_model(ckpt, manifest, state_shapes(engine, self.topology))
        restore(engine, self.topology, reader.read)
        _restore_schedule(engine.scheduler, manifest["scheduler_last_epoch"])
        saved, now = manifest["topology"], self.topology
        same_layout = saved["world"] == now.world and saved["dp"] == now.dp and saved["cp"] == now.cp
        ranks = {r["rank"]: r for r in manifest["ranks"]}
        mine = self._rank_state(ckpt, ranks[now.rank]) if same_layout else None
        if data is not None:
            self._load_data(ckpt, manifest, data, mine)
        if same_layout:
            _set_rng_state(reader, mine["file"], mine["rng"])
        self.load_stats.files |= reader.files
        self.load_stats.bytes += reader.bytes_read
        if now.rank == 0:
            how = "" if same_layout else (f"; resharded from dp={saved['dp']} ep={saved['ep']} cp={saved['cp']} "
                                          f"to dp={now.dp} ep={now.ep} cp={now.cp}")
            self.log(f"checkpoint: resumed from {ckpt.name} (step {manifest['step']}, "
                     f"{manifest['tokens']:,} tokens){how}")
        return int(manifest["step"]), int(manifest["tokens"])

    def _rank_state(self, ckpt: Path, entry: dict) -> dict:
        """A saved rank's rank*.json (its loader position and RNG), counted in load_stats."""
        text = (ckpt / entry["state"]).read_text()
        self.load_stats.add(entry["state"], len(text))
        return json.loads(text)

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

    def _load_data(self, ckpt: Path, manifest: dict, data, mine: dict | None) -> None:
        """The loader's position. Same layout (`mine`: this rank's saved state): the saved position of this DP
        rank, from this rank's own file (or its DP rank's first CP rank's). Another layout: the loader merges
        every saved DP rank's position; rank 0 reads them and broadcasts, so the files are read once, not
        once per rank (a metadata storm on a shared file system at hundreds of ranks)."""
        t = self.topology
        if mine is not None:
            if mine["cp_rank"] != 0:
                first = next(r for r in manifest["ranks"] if r["dp_rank"] == t.dp_rank and r["cp_rank"] == 0)
                mine = self._rank_state(ckpt, first)
            data.load_state_dict(mine["data"])
            return
        states: list = [None]
        if t.rank == 0:
            firsts = sorted((r for r in manifest["ranks"] if r["cp_rank"] == 0), key=lambda r: r["dp_rank"])
            states = [[self._rank_state(ckpt, r)["data"] for r in firsts]]
        if self._collective():
            dist.broadcast_object_list(states, src=0)
        data.load_rank_states(states[0])  # merging positions is the loader's business


def _restore_schedule(scheduler, last_epoch: int) -> None:
    """Put the LR schedule at `last_epoch` by the scheduler's own step (the same arithmetic as training)."""
    scheduler.last_epoch = last_epoch - 1
    scheduler._step_count = max(last_epoch, 1)
    scheduler.step()
