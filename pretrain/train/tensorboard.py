"""TensorBoard event files for a run, beside metrics.jsonl (rank 0 only; `MetricsLogger` owns one of these).

Two writers, two TensorBoard runs under RUN_DIR/tensorboard/:

  .           x = optimizer step: train/loss, train/lr, train/grad_norm, throughput/tokens_per_s,
              throughput/tokens_per_s_per_device, throughput/mfu, throughput/data_wait_frac, throughput/tokens,
              checkpoint/stall_s, experts/load_max_over_mean, experts/moe_layer_{i}_load_max_over_mean
  by_tokens/  x = tokens seen: vs_tokens/loss, vs_tokens/lr, vs_tokens/tokens_per_s, vs_tokens/mfu,
              vs_tokens/expert_load_max_over_mean

Every event carries the record's wall time, so TensorBoard's "relative" and "wall" axes work too.

Resume: the records after the resumed step were written by an attempt whose steps are trained again.
The step writer opens with `purge_step = start_step + 1` and the token writer with `purge_step = tokens of
the last kept record + 1`; TensorBoard then drops the old events at or after those points, so no step is
shown twice. A fresh run (start_step 0) deletes the event files of an earlier run in the directory, as
metrics.jsonl is emptied. Values that are None (mfu on CPU, no checkpoint in the window) are not written.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from pretrain.run_dir import RunDir

TOKENS_SUBDIR = "by_tokens"
_EVENTS_GLOB = "events.out.tfevents.*"


def step_scalars(record: dict) -> dict[str, float]:
    """Tag -> value of one metrics record, for the step-indexed writer (None values left out)."""
    devices = record.get("devices") or 1
    tps = record.get("tokens_per_s")
    values = {
        "train/loss": record.get("loss"),
        "train/lr": record.get("lr"),
        "train/grad_norm": record.get("grad_norm"),
        "throughput/tokens_per_s": tps,
        "throughput/tokens_per_s_per_device": tps / devices if tps is not None else None,
        "throughput/mfu": record.get("mfu"),
        "throughput/data_wait_frac": record.get("data_wait_frac"),
        "throughput/tokens": record.get("tokens"),
        "checkpoint/stall_s": record.get("checkpoint_stall_s"),
        "experts/load_max_over_mean": record.get("expert_load_max_over_mean"),
    }
    for i, load in enumerate(record.get("expert_load_per_layer") or []):
        values[f"experts/moe_layer_{i}_load_max_over_mean"] = load
    values.update(val_scalars(record))  # val/<name>/loss and val/<name>/perplexity
    return {k: float(v) for k, v in values.items() if v is not None}


def val_scalars(record: dict) -> dict[str, float]:
    """The validation losses and perplexities of a record (pretrain/train/validate.py), by their keys."""
    from pretrain.train.metrics import val_losses

    out = {}
    for name, loss in val_losses(record).items():
        out[f"val/{name}/loss"] = loss
        out[f"val/{name}/perplexity"] = record.get(f"val/{name}/perplexity")
    return out


def token_scalars(record: dict) -> dict[str, float]:
    """Tag -> value for the tokens-indexed writer."""
    values = {"vs_tokens/loss": record.get("loss"), "vs_tokens/lr": record.get("lr"),
              "vs_tokens/tokens_per_s": record.get("tokens_per_s"), "vs_tokens/mfu": record.get("mfu"),
              "vs_tokens/expert_load_max_over_mean": record.get("expert_load_max_over_mean")}
    values.update({f"vs_tokens/{k}": v for k, v in val_scalars(record).items() if k.endswith("/loss")})
    return {k: float(v) for k, v in values.items() if v is not None}


def _event_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(_EVENTS_GLOB)) if directory.is_dir() else []


def _after_existing_files(directory: Path) -> None:
    """TensorBoard reads a directory's event files in name order, and names start with the creation second:
    make sure a new file sorts after the files already there (matters only for a restart within a second)."""
    newest = 0
    for path in _event_files(directory):
        try:
            newest = max(newest, int(path.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    while int(time.time()) <= newest:
        time.sleep(0.05)


class TensorBoardWriter:
    """Scalars of each metrics record into RUN_DIR/tensorboard (see the module docstring)."""

    def __init__(self, run_dir, *, start_step: int = 0, start_tokens: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package

        self.root = RunDir(run_dir).tensorboard_dir
        token_dir = self.root / TOKENS_SUBDIR
        if start_step <= 0:
            for path in _event_files(self.root) + _event_files(token_dir):
                path.unlink(missing_ok=True)
        step_purge = start_step + 1 if start_step > 0 else None
        token_purge = start_tokens + 1 if start_step > 0 else None
        for d in (self.root, token_dir):
            d.mkdir(parents=True, exist_ok=True)
            _after_existing_files(d)
        self._steps = SummaryWriter(str(self.root), purge_step=step_purge, flush_secs=30)
        self._tokens = SummaryWriter(str(token_dir), purge_step=token_purge, flush_secs=30)
        self._failed = False

    def add(self, record: dict) -> None:
        """Write one record's scalars and flush (one record per log interval: cheap next to a step)."""
        if self._failed:
            return
        walltime = record.get("time", time.time())
        try:
            for tag, value in step_scalars(record).items():
                self._steps.add_scalar(tag, value, global_step=int(record["step"]), walltime=walltime)
            for tag, value in token_scalars(record).items():
                self._tokens.add_scalar(tag, value, global_step=int(record["tokens"]), walltime=walltime)
            self._steps.flush()
            self._tokens.flush()
        except Exception as err:  # noqa: BLE001 - TensorBoard is a view; metrics.jsonl stays the record
            self._failed = True
            print(f"tensorboard: writing {self.root} failed ({type(err).__name__}: {err}); training goes on "
                  "without it (metrics.jsonl is still written)", file=sys.stderr, flush=True)

    def close(self) -> None:
        for writer in (self._steps, self._tokens):
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - see add()
                pass


def open_writer(run_dir, *, start_step: int = 0, start_tokens: int = 0) -> TensorBoardWriter | None:
    """A writer, or None (with one line saying why) when the `tensorboard` package is missing."""
    try:
        return TensorBoardWriter(run_dir, start_step=start_step, start_tokens=start_tokens)
    except ImportError as err:
        print(f"tensorboard: not writing event files ({err}); install the `tensorboard` package for them",
              file=sys.stderr, flush=True)
        return None
