"""The embedded default corpus: the running interpreter's own standard library (source and text files).

It exists on every machine with Python, so `liquid pretrain` needs no download. Files are read in a
fixed order, so the corpus is the same on every run of the same interpreter.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path

SUFFIXES = (".py", ".txt", ".rst")
SKIP_PARTS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_documents(max_bytes: int):
    """Yield (name, bytes) for stdlib text files in sorted order until `max_bytes` have been read."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the interpreter's standard library was not found at {root}")
    seen = 0
    for path in sorted(root.rglob("*")):
        if seen >= max_bytes:
            return
        rel = path.relative_to(root)
        if path.suffix not in SUFFIXES or SKIP_PARTS & set(rel.parts) or not path.is_file():
            continue
        data = path.read_bytes()
        if not data.strip():
            continue
        data = data[: max_bytes - seen]
        seen += len(data)
        yield str(rel), data
