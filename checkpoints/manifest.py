"""The checkpoint manifest: the last file written into a checkpoint, and the proof that it is complete.

`manifest.json` lists every file with its size and sha256, the step, tokens seen, topology, config hash,
library versions and an index of where each tensor (or row slice of one) lives. A directory without
one, or whose files do not match it, is not a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT = "liquid-checkpoint/1"
MANIFEST = "manifest.json"
_CHUNK = 8 << 20


class CorruptCheckpoint(ValueError):
    """A checkpoint directory that is torn (no manifest) or whose files do not verify."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write, fsync, rename: readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


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


def verify(ckpt: Path, *, checksums: bool = True) -> dict:
    """The manifest of a complete checkpoint whose every file has the recorded size (and sha256);
    raises CorruptCheckpoint naming the first bad file."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    for name, info in sorted(manifest["files"].items()):
        path = ckpt / name
        if not path.exists():
            raise CorruptCheckpoint(f"{ckpt.name}/{name}: missing")
        size = path.stat().st_size
        if size != info["bytes"]:
            raise CorruptCheckpoint(f"{ckpt.name}/{name}: {size} bytes, the manifest says {info['bytes']}")
        if checksums and sha256_file(path) != info["sha256"]:
            raise CorruptCheckpoint(f"{ckpt.name}/{name}: sha256 does not match the manifest")
    return manifest
