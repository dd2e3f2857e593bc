"""Fault-injection points for the chaos soak (`liquid chaos`, cluster/chaos.py).

`fault_point(name, step=None)` marks a place where a crash is hardest to survive: inside a rank's asynchronous
checkpoint write (`checkpoint_write`, with the step being saved) and right before the expert-parallel
all_to_all (`all_to_all`, no step). Outside a soak it costs one test of a module-level bool: the environment
variable LIQUID_CHAOS is read once, at import.

LIQUID_CHAOS holds either specs, `point:rank:step` separated by commas, or (a value containing a `/`) the path
of a file holding specs, one per line (`#` starts a comment). `rank` is the global rank, `step` an integer;
either may be `*` (any). A point called without a step matches `*` only. The process that reaches a matching
point SIGKILLs itself (after one line on stderr).

With specs inline, every process that matches dies (each worker of a restarted group again): for one-shot use.
With a file, a match first claims the file by renaming it (only one process of the cluster can), then writes
what fired to `<file>.fired` (JSON: point, rank, step, pid, time) and dies; a restarted worker group reaching
the point again finds no file. The soak writes the next file when it wants the next fault. The file is looked
at (one stat) on every call, and parsed again only when it changed.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ENV = "LIQUID_CHAOS"
POINTS = ("checkpoint_write", "all_to_all")  # the points the code calls (others may be added by name)

_VALUE = os.environ.get(ENV, "").strip()
ENABLED = bool(_VALUE)  # the only thing a call looks at outside a soak


@dataclass(frozen=True)
class Spec:
    point: str
    rank: int | None  # None: any rank
    step: int | None  # None: any step (and points called without one)

    def matches(self, point: str, rank: int, step: int | None) -> bool:
        return (point == self.point and (self.rank is None or rank == self.rank)
                and (self.step is None or (step is not None and step == self.step)))

    def __str__(self) -> str:
        return f"{self.point}:{'*' if self.rank is None else self.rank}:{'*' if self.step is None else self.step}"


def _field(text: str, what: str, spec: str) -> int | None:
    text = text.strip()
    if text == "*":
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{ENV} spec {spec!r}: {what} must be an integer or '*', got {text!r}") from None
    if value < 0:
        raise ValueError(f"{ENV} spec {spec!r}: {what} must be >= 0, got {value}")
    return value


def parse_spec(text: str) -> Spec:
    """`point:rank:step` (rank and step integers or `*`; `point:rank` means any step)."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not parts[0].strip():
        raise ValueError(f"{ENV} spec {text.strip()!r}: expected point:rank:step, e.g. all_to_all:1:* or "
                         "checkpoint_write:0:20")
    point = parts[0].strip()
    if not point.replace("_", "").isalnum():
        raise ValueError(f"{ENV} spec {text.strip()!r}: the point name must be letters, digits and _")
    return Spec(point, _field(parts[1], "rank", text.strip()),
                _field(parts[2], "step", text.strip()) if len(parts) == 3 else None)


def parse_specs(text: str) -> list[Spec]:
    """Specs separated by commas or newlines; blank lines and `#` comments are skipped."""
    specs = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        specs += [parse_spec(item) for item in line.split(",") if item.strip()]
    return specs


def is_file_value(value: str) -> bool:
    return "/" in value


def format_specs(specs) -> str:
    return "".join(f"{s}\n" for s in specs)


class _Source:
    """Where this process's specs come from: the inline value (parsed once) or the file (parsed on change)."""

    def __init__(self, value: str):
        self.path = Path(value) if is_file_value(value) else None
        self.inline = [] if self.path is not None else parse_specs(value)
        self._key, self._specs = None, []

    def specs(self) -> list[Spec]:
        if self.path is None:
            return self.inline
        try:
            st = os.stat(self.path)
        except OSError:
            return []
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self._key:
            try:
                self._specs = parse_specs(self.path.read_text())
            except (OSError, ValueError) as err:
                print(f"chaos: ignoring {self.path}: {err}", file=sys.stderr, flush=True)
                self._specs = []
            self._key = key
        return self._specs


_source: _Source | None = None


def _rank() -> int:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def fault_point(name: str, step: int | None = None) -> None:
    """SIGKILL this process when LIQUID_CHAOS names this point on this rank (and step). Free when it is unset."""
    if not ENABLED:
        return
    _check(name, step)


def _check(name: str, step: int | None) -> None:
    global _source
    if _source is None:
        _source = _Source(_VALUE)
    rank = _rank()
    hit = next((s for s in _source.specs() if s.matches(name, rank, step)), None)
    if hit is None:
        return
    if _source.path is not None and not _claim(_source.path, hit, name, rank, step):
        return
    print(f"chaos: SIGKILL of rank {rank} (pid {os.getpid()}) at {name}"
          f"{'' if step is None else f' step {step}'} ({hit})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def fired_path(path: Path) -> Path:
    return path.with_name(path.name + ".fired")


def _claim(path: Path, spec: Spec, name: str, rank: int, step: int | None) -> bool:
    """Take the spec file (a rename: one process wins) and write what fires; False when another took it or it
    changed meanwhile."""
    claimed = path.with_name(f"{path.name}.claimed.{os.getpid()}")
    try:
        os.rename(path, claimed)
    except OSError:
        return False
    try:
        if spec not in parse_specs(claimed.read_text()):  # replaced between the stat and the rename
            os.rename(claimed, path)
            return False
    except (OSError, ValueError):
        return False
    record = {"point": name, "rank": rank, "step": step, "pid": os.getpid(), "time": time.time(),
              "spec": str(spec)}
    tmp = path.with_name(path.name + ".fired.partial")
    with open(tmp, "w") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, fired_path(path))
    claimed.unlink(missing_ok=True)
    return True
