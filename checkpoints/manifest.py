"""The checkpoint manifest: the last file written into a checkpoint, the proof that it is complete, and
the choice of a run's newest good checkpoint (or the one to resume from) by that proof.

`manifest.json` lists every file with its size and sha256, the step, tokens seen, topology, config hash,
library versions and an index of where each tensor (or row slice of one) lives. A directory without
one, or whose files do not match it, is not a checkpoint. Hashing reads every byte (about 100 GB for an
8B model with its Adam state), so it is done once per checkpoint and process: the ranks of a resume share
it (`hash_share`, CheckpointManager.verify), the driver's fail-fast check looks at the structure only
(`checksums=False`), and a checkpoint this process wrote or verified is not hashed again (`reverify=False`).
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

from pretrain.run_dir import RunDir

FORMAT = "liquid-checkpoint/1"
MANIFEST = "manifest.json"
_CHUNK = 8 << 20
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CorruptCheckpoint(ValueError):
    """A checkpoint directory that is torn (no manifest) or whose files do not verify; `file` names the bad
    file (None: the manifest itself)."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file


# Checkpoints this process verified or wrote, as (directory, sha256 of its manifest.json): a verification
# asked not to repeat itself (`reverify=False`) checks only their structure. A rewritten manifest (the
# same step saved again) has other contents and is verified afresh.
_VERIFIED: set[tuple[str, str]] = set()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def library_versions() -> dict:
    """Installed versions of the libraries a checkpoint depends on (package metadata: no imports)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "numpy", "deepspeed", "megatron-core", "mosaicml-streaming", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def read_manifest(ckpt: Path) -> dict:
    path = Path(ckpt) / MANIFEST
    if not path.exists():
        raise CorruptCheckpoint(f"{ckpt.name}: no {MANIFEST} (torn: the save did not finish)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CorruptCheckpoint(f"{ckpt.name}: {MANIFEST} is not valid JSON ({err})") from None
    if manifest.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{ckpt.name}: format {manifest.get('format')!r}, this version reads {FORMAT!r}")
    return manifest


def _record_key(ckpt: Path) -> tuple[str, str]:
    digest = hashlib.sha256((Path(ckpt) / MANIFEST).read_bytes()).hexdigest()
    return str(Path(ckpt).resolve()), digest


def remember_verified(ckpt: Path) -> None:
    """Record that this process verified (or wrote) the checkpoint as its manifest now stands."""
    _VERIFIED.add(_record_key(ckpt))


def was_verified(ckpt: Path) -> bool:
    try:
        return _record_key(ckpt) in _VERIFIED
    except OSError:
        return False


def check_file(ckpt: Path, name: str, info: dict, *, checksum: bool = True) -> None:
    """One listed file is present with its recorded size (and sha256); CorruptCheckpoint naming it if not."""
    path = Path(ckpt) / name
    where = f"{Path(ckpt).name}/{name}"
    if not path.exists():
        raise CorruptCheckpoint(f"{where}: missing", name)
    size = path.stat().st_size
    if size != info["bytes"]:
        raise CorruptCheckpoint(f"{where}: {size} bytes, the manifest says {info['bytes']}", name)
    if checksum and sha256_file(path) != info["sha256"]:
        raise CorruptCheckpoint(f"{where}: sha256 does not match the manifest", name)


def verify(ckpt: Path, *, checksums: bool = True, reverify: bool = True) -> dict:
    """The manifest of a complete checkpoint whose every file has the recorded size (and sha256);
    raises CorruptCheckpoint naming the first bad file. reverify=False: a checkpoint this process already
    verified or wrote, with the same manifest, is not hashed again (its structure still is checked)."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    hash_files = checksums and (reverify or not was_verified(ckpt))
    for name, info in sorted(manifest["files"].items()):
        check_file(ckpt, name, info, checksum=hash_files)
    if checksums:
        remember_verified(ckpt)
    return manifest


def hash_share(manifest: dict, rank: int, world: int) -> list[str]:
    """The files rank `rank` of `world` checks when the ranks verify a checkpoint together (sorted): each
    rank's own files when it existed in the saved layout (the ones it mostly reads back, so hashing warms
    the page cache for them), the rest spread greedily, largest first, onto the least-loaded rank. Every
    file goes to exactly one rank; all ranks compute the same split from the same manifest."""
    files = manifest["files"]
    owner, load = {}, [0] * world
    for r in manifest.get("ranks", []):
        for name in (r["file"], r["state"]):
            if r["rank"] < world and name in files:
                owner[name] = r["rank"]
                load[r["rank"]] += files[name]["bytes"]
    for name in sorted((n for n in files if n not in owner), key=lambda n: (-files[n]["bytes"], n)):
        owner[name] = min(range(world), key=lambda r: (load[r], r))
        load[owner[name]] += files[name]["bytes"]
    return sorted(n for n, r in owner.items() if r == rank)


# ---- finding checkpoints -----------------------------------------------------------------------------


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


def find_checkpoint(run_dir, step: int | None = None, *, checksums: bool = True, reverify: bool = True,
                    log=None) -> Path:
    """The newest complete checkpoint of a run whose files verify (or the one at `step`).

    Torn or corrupt checkpoints are reported through `log` and skipped; ValueError when none is usable.
    reverify=False: a checkpoint this process already verified or wrote is not hashed again.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} does not exist")
    found = list_checkpoints(run_dir)
    candidates = [p for s, p in found if step is None or s == step]
    if step is not None and not candidates:
        steps = ", ".join(str(s) for s, _ in found) or "none"
        raise ValueError(f"{run_dir} has no checkpoint at step {step} (steps saved: {steps})")
    return first_good(candidates, lambda p: verify(p, checksums=checksums, reverify=reverify),
                      root=checkpoint_root(run_dir), log=log)


def first_good(candidates: list[Path], check, *, root: Path, log=None) -> Path:
    """The first of `candidates` that `check` accepts; the rejected ones are reported through `log`.
    ValueError naming every rejected one when none is accepted."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    skipped = []
    for path in candidates:
        try:
            check(path)
            return path
        except CorruptCheckpoint as err:
            log(f"checkpoint: skipping {err}")
            skipped.append(str(err))
    detail = f"; skipped: {'; '.join(skipped)}" if skipped else ""
    raise ValueError(f"no complete checkpoint in {root}{detail}")


def newest_checkpoint(run_dir, *, log=None) -> Path | None:
    """find_checkpoint (not hashing again what this process wrote or verified), or None when the run has no
    usable checkpoint."""
    if not list_checkpoints(run_dir):
        return None
    try:
        return find_checkpoint(run_dir, reverify=False, log=log)
    except ValueError:
        return None


def resume_candidates(run_dir, resume: str, *, launch_id: str | None = None) -> tuple[list[Path], bool]:
    """The checkpoints `checkpoint.resume` allows, newest first (none: a fresh run), and whether only the
    first may be used (a directory given by name) rather than the newest of them that verifies.

    A fresh run (`none`) in a run directory that already has checkpoints is refused: it would mix two runs.
    When this launch (`launch_id`) has saved checkpoints already, the worker group was restarted after a
    failure: it resumes from the newest good one, whatever `resume` says.
    """
    existing = [p for _, p in list_checkpoints(run_dir)]
    if launch_id is not None:
        for path in existing:
            try:
                if read_manifest(path).get("launch_id") == launch_id:
                    return existing, False
            except CorruptCheckpoint:
                continue
    if resume == "none":
        if existing:
            raise ValueError(f"{run_dir} already has checkpoints (newest {existing[0].name}); resume it with "
                             f"checkpoint.resume=auto (or `liquid resume {run_dir}`), or pick another run.dir")
        return [], False
    if resume == "auto":
        return existing, False
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"checkpoint.resume={resume!r}: not none, auto or a checkpoint directory")
    return [path], True


def resume_target(run_dir, resume: str, *, launch_id: str | None = None, checksums: bool = True,
                  log=None) -> Path | None:
    """What to resume from: None (a fresh run), the newest good checkpoint (`auto`), or a given directory
    (see resume_candidates). checksums=False checks the structure only (manifest complete, every file
    present with its size): the driver's fail-fast check, which leaves the hashing to the ranks
    (CheckpointManager.resume_target)."""
    candidates, strict = resume_candidates(run_dir, resume, launch_id=launch_id)
    check = lambda path: verify(path, checksums=checksums)  # noqa: E731
    if strict:
        check(candidates[0])
        return candidates[0]
    return first_good(candidates, check, root=checkpoint_root(run_dir), log=log) if candidates else None
