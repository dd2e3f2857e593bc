"""Training metrics: one JSON object per logged step in metrics.jsonl (rank 0), TensorBoard event files in
RUN_DIR/tensorboard/ (rank 0), and a live progress line.

In a multi-worker job the driver prints the line by following metrics.jsonl; in a local run the logger
prints it directly. Both use `ProgressPrinter`, so the line looks the same; `liquid monitor` prints it too.
One line per log interval, no carriage returns (the stream is often a log file):

  step    120/500 [#####...............]  24% 492k/2.05M tok | loss 4.1234 | val heldout 4.2011 | lr 3.00e-04 | 9,212 tok/s |
  4,606 tok/s/device | MFU 41.2% | data wait 0.1% | ckpt stall 0.42s | expert load max/mean 1.24 |
  elapsed 1m02s | eta 3m10s

(one line in the output). The bar goes toward `train.max_tokens` when it is set (capped by what max_steps
allows), else toward max_steps' tokens. MFU reads "n/a" where the device's peak is unknown (CPU);
"ckpt stall" appears only when a checkpoint was saved in the window; "val NAME" (the held-out loss of
each eval stream) only at a validation step; "phase NAME" with data.phases.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from pretrain.run_dir import RunDir

BAR_WIDTH = 20


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(max(seconds, 0))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h"
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


_fmt_duration = fmt_duration  # the old private name


def human(n: float | None) -> str:
    """1234 -> '1.23k', 2048000 -> '2.05M', 38e12 -> '38.0T' (three significant digits)."""
    if n is None:
        return "?"
    n = float(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            v = n / scale
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return f"{n:.0f}"


def run_target(record: dict, *, max_steps: int, max_tokens: int | None = None) -> tuple[int, int]:
    """(last step, target tokens) of the run, as the training loop decides them: it stops at whichever of
    max_steps / max_tokens comes first (tokens per step taken from the record)."""
    step, tokens = record["step"], record["tokens"]
    per_step = tokens / step if step > 0 else 0
    last_step, target = max_steps, max_steps * per_step
    if max_tokens and per_step > 0:
        last_step = min(max_steps, math.ceil(max_tokens / per_step))
        target = min(max_tokens, target)
    return max(last_step, step), int(round(target))


def progress_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = min(max(fraction, 0.0), 1.0)
    done = int(fraction * width + 1e-9)
    return "[" + "#" * done + "." * (width - done) + "]"


def val_losses(record: dict) -> dict[str, float]:
    """name -> held-out loss of each eval stream validated at this record's step (its `val/<name>/loss`
    keys, pretrain/train/validate.py); {} at a step without validation."""
    return {k[4:-5]: v for k, v in record.items() if k.startswith("val/") and k.endswith("/loss")}


def format_line(r: dict, *, max_steps: int, max_tokens: int | None = None) -> str:
    """The live line of one metrics record (see the module docstring)."""
    last_step, target = run_target(r, max_steps=max_steps, max_tokens=max_tokens)
    fraction = min(r["tokens"] / target, 1.0) if target else 0.0
    parts = [f"step {r['step']:>6}/{last_step} {progress_bar(fraction)} {fraction:4.0%} "
             f"{human(r['tokens'])}/{human(target)} tok",
             f"loss {r['loss']:.4f}"]
    parts += [f"val {name} {loss:.4f}" for name, loss in val_losses(r).items()]
    if r.get("phase") is not None:
        parts.append(f"phase {r['phase']}")
    parts.append(f"lr {r.get('lr') or 0:.2e}")
    tps, devices = r.get("tokens_per_s"), r.get("devices") or 1
    if tps is not None:
        parts += [f"{tps:,.0f} tok/s", f"{tps / devices:,.0f} tok/s/device"]
    parts.append(f"MFU {r['mfu']:.1%}" if r.get("mfu") is not None else "MFU n/a")
    if r.get("data_wait_frac") is not None:
        parts.append(f"data wait {r['data_wait_frac']:.1%}")
    if r.get("checkpoint_stall_s") is not None:
        parts.append(f"ckpt stall {r['checkpoint_stall_s']:.2f}s")
    if r.get("expert_load_max_over_mean") is not None:
        parts.append(f"expert load max/mean {r['expert_load_max_over_mean']:.2f}")
    parts += [f"elapsed {fmt_duration(r.get('elapsed_s', 0))}", f"eta {fmt_duration(r.get('eta_s'))}"]
    return " | ".join(parts)


class ProgressPrinter:
    """Writes each metrics record as one line (format_line) to `stream` (default stdout)."""

    def __init__(self, *, max_steps: int, stream=None, max_tokens: int | None = None):
        self.max_steps, self.max_tokens = max_steps, max_tokens
        self.stream = stream or sys.stdout

    def format(self, r: dict) -> str:
        return format_line(r, max_steps=self.max_steps, max_tokens=self.max_tokens)

    def __call__(self, r: dict) -> None:
        self.stream.write(self.format(r) + "\n")
        self.stream.flush()


class MetricsLogger:
    def __init__(self, run_dir: Path, *, max_steps: int, printer=None, enabled: bool = True, start_step: int = 0,
                 max_tokens: int | None = None, tensorboard: bool = True, devices: int = 1,
                 flops_per_token: float | None = None, peak_flops: float | None = None, tracker=None):
        """A fresh run starts an empty metrics.jsonl (and removes old TensorBoard events); a resumed one keeps
        the records up to `start_step` (those after it were logged by an attempt whose later steps are
        trained again), and TensorBoard purges the events after it. Only an enabled logger (rank 0) writes.
        `max_tokens` (train.max_tokens) makes the ETA count toward the step where the token budget ends.
        Records without them get `devices` and, with FLOPs per token and a peak per device known, their MFU.
        `tracker` (pretrain/train/tracking.py, rank 0's) gets every record as written to metrics.jsonl."""
        self.path = RunDir(run_dir).metrics_file
        self.max_steps, self.max_tokens, self.start_step = max_steps, max_tokens, start_step
        self.devices, self.flops_per_token, self.peak_flops = devices, flops_per_token, peak_flops
        self.printer, self.tracker = printer, tracker
        self.start = time.perf_counter()
        self._file = None
        self._tb = None
        if enabled:
            kept_tokens = self._keep_until(start_step)
            self._file = self.path.open("a", buffering=1)
            if tensorboard:
                from pretrain.train.tensorboard import open_writer

                self._tb = open_writer(run_dir, start_step=start_step, start_tokens=kept_tokens)

    def _keep_until(self, step: int) -> int:
        """Rewrite metrics.jsonl with the records up to `step`; returns the tokens of the last one kept."""
        kept, tokens = [], 0
        if step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    if record["step"] <= step:
                        kept.append(line + "\n")
                        tokens = max(tokens, int(record.get("tokens") or 0))
                except (ValueError, KeyError, TypeError):  # a line cut by a crash
                    continue
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)  # a new file: a reader following the old one notices
        return tokens

    def log(self, record: dict) -> None:
        """record must hold step, loss, tokens, tokens_per_s; elapsed, eta and time are added here."""
        if self._file is None:
            return
        elapsed = time.perf_counter() - self.start
        step = record["step"]
        last_step, _ = run_target(record, max_steps=self.max_steps, max_tokens=self.max_tokens)
        eta = elapsed / max(step - self.start_step, 1) * (last_step - step)
        record = {"devices": self.devices, "mfu": self._mfu(record["tokens_per_s"]), **record,
                  "elapsed_s": round(elapsed, 3), "eta_s": round(eta, 1), "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            self._tb.add(record)
        if self.tracker is not None:
            self.tracker.log(record)
        if self.printer is not None:
            self.printer(record)

    def _mfu(self, tokens_per_s: float) -> float | None:
        if not (self.peak_flops and self.flops_per_token):
            return None
        return tokens_per_s * self.flops_per_token / (self.peak_flops * self.devices)

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
