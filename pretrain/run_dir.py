"""The run directory (`run.dir`): the one module that names the files a training run writes there, and
their small reads and writes (config, summary, worker status, stop requests). Standard library only."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

# The layout (README "The run directory" documents it for users; tests and tools rely on these names).
CONFIG = "config.yaml"            # the resolved config, rewritten by rank 0 at every start
METRICS = "metrics.jsonl"         # one record per logged step (rank 0)
SUMMARY = "summary.json"          # written by rank 0 when the run ends
TOKENIZER_DIR = "tokenizer"       # tokenizer/tokenizer.json: export and eval read it here
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # the end-of-document token, when given (data.eos_token)
WORKERS = "workers"               # workers/rank{R}.json: each rank's status
CHECKPOINTS = "checkpoints"       # step directories (checkpoints/manager.py owns what is inside) and...
LATEST = "latest"                 # ...checkpoints/latest, the name of the newest complete one
EXPORT = "export"                 # Hugging Face weights of the final checkpoint
TENSORBOARD = "tensorboard"       # TensorBoard event files (rank 0)
RAY = "ray"                       # Ray Train's storage_path
STOP = "STOP"                     # present while a stop is requested
RESIZES = "resizes.jsonl"         # one record per resize of an elastic job (the driver)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj) -> None:
    """Write, fsync, rename: readers (the monitor, another rank) see the old file or the whole new one."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or cut by a crash: the caller treats it as not there
        return None


class RunDir:
    """Paths and small files of one run directory (nothing is created until something is written)."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def looks_like_run(self) -> bool:
        """Whether a training run has written here (any of config, metrics, workers/, summary)."""
        return any(p.exists() for p in (self.config_file, self.metrics_file, self.workers_dir, self.summary_file))

    # ---- config, metrics, summary ---------------------------------------------------------------------

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG

    def has_config(self) -> bool:
        return self.config_file.is_file()

    def write_config(self, yaml_text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(yaml_text)

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS

    @property
    def summary_file(self) -> Path:
        return self.path / SUMMARY

    def write_summary(self, summary: dict) -> None:
        self.summary_file.write_text(json.dumps(summary, indent=2))

    def read_summary(self) -> dict | None:
        """The summary, or None when there is none yet (or it is being written)."""
        return _read_json(self.summary_file)

    # ---- tokenizer, export, tensorboard, ray ---------------------------------------------------------

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def tokenizer_file(self) -> Path:
        return self.tokenizer_dir / TOKENIZER_FILE

    def copy_tokenizer(self, source, eos_token: str | None = None) -> Path:
        """Keep a copy of the run's tokenizer here: export and eval read it even after the data is gone.
        `eos_token` (the end-of-document token, when the tokenizer does not use a usual name) goes with it
        in tokenizer_config.json, where data_pipeline.tokenizer.TextTokenizer looks for it."""
        self.tokenizer_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, self.tokenizer_file)
        config = self.tokenizer_dir / TOKENIZER_CONFIG_FILE
        if eos_token:
            write_json_atomic(config, {"eos_token": eos_token})
        else:
            config.unlink(missing_ok=True)
        return self.tokenizer_file

    @property
    def export_dir(self) -> Path:
        return self.path / EXPORT

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def ray_dir(self) -> Path:
        return self.path / RAY

    # ---- checkpoints (the step directories inside are checkpoints/manager.py's) -----------------------

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS

    @property
    def latest_file(self) -> Path:
        return self.checkpoints_dir / LATEST

    # ---- worker status ---------------------------------------------------------------------------------

    @property
    def workers_dir(self) -> Path:
        return self.path / WORKERS

    def worker_file(self, rank: int) -> Path:
        return self.workers_dir / f"rank{rank}.json"

    def write_worker_status(self, rank: int, world: int, status: str, *, node: dict | None = None,
                            **extra) -> None:
        """workers/rank{R}.json: who this rank is and where it runs, for operators and tests. `node` holds
        the launcher's facts about the Ray node (`node_id`, `node_ip`); its id is recorded when known."""
        record = {"rank": rank, "world": world, "pid": os.getpid(), "host": socket.gethostname(),
                  "local_rank": int(os.environ.get("LOCAL_RANK", "0")), "status": status, "time": time.time(),
                  **extra}
        if node and node.get("node_id"):
            record["node_id"] = node["node_id"]
        self.workers_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.worker_file(rank), record)

    def read_workers(self) -> list[tuple[Path, dict]]:
        """(file, record) of every readable worker file, by rank; a record without a rank gets its file's."""
        found = []
        for path in self.workers_dir.glob("rank*.json"):
            record = _read_json(path)
            if record is not None:
                record.setdefault("rank", int(re.sub(r"\D", "", path.stem) or -1))
                found.append((path, record))
        return sorted(found, key=lambda item: item[1]["rank"])

    # ---- stop requests ---------------------------------------------------------------------------------

    @property
    def stop_file(self) -> Path:
        return self.path / STOP

    def request_stop(self, reason: str) -> None:
        """Ask a running job to save a checkpoint and exit at its next step (the driver does this on SIGTERM)."""
        write_json_atomic(self.stop_file, {"reason": reason, "time": time.time(), "pid": os.getpid()})

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def stop_reason(self) -> str:
        """The reason of the pending stop request ("" when there is none or it cannot be read)."""
        try:
            return str(json.loads(self.stop_file.read_text()).get("reason", ""))
        except (OSError, ValueError, AttributeError):
            return ""

    def clear_stop(self) -> None:
        self.stop_file.unlink(missing_ok=True)

    # ---- elastic resizes ---------------------------------------------------------------------------------

    @property
    def resizes_file(self) -> Path:
        return self.path / RESIZES

    def append_resize(self, record: dict) -> None:
        """One line of resizes.jsonl: time, from_workers, to_workers, reason, checkpoint_step, last_step,
        steps_recomputed (the driver of an elastic job writes it before the resized attempt starts)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.resizes_file, "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_resizes(self) -> list[dict]:
        """Every complete line of resizes.jsonl, oldest first (none when the job never resized)."""
        try:
            text = self.resizes_file.read_text()
        except OSError:
            return []
        found = []
        for line in text.splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:  # a line cut by a crash
                continue
        return found


class JsonlTail:
    """New complete lines of a JSON-lines file that may be replaced (a restarted worker group rewrites
    metrics.jsonl: a new inode); `read()` returns (whether the file was replaced since the last read, the
    records added since). Lines that do not parse are skipped."""

    def __init__(self, path: Path):
        self.path, self._inode, self._offset = Path(path), None, 0

    def read(self) -> tuple[bool, list[dict]]:
        try:
            fh = self.path.open("rb")
        except FileNotFoundError:
            return False, []
        records, replaced = [], False
        with fh:
            inode = os.fstat(fh.fileno()).st_ino
            if inode != self._inode:
                self._inode, self._offset, replaced = inode, 0, True
            fh.seek(self._offset)
            for line in fh:
                if not line.endswith(b"\n"):
                    break
                self._offset += len(line)
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return replaced, records

