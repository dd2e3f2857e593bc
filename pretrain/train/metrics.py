"""Training metrics: one JSON object per logged step in metrics.jsonl (rank 0) and a live progress line.

In a multi-worker job the driver prints the line by following metrics.jsonl; in a local run the logger
prints it directly. Both use `ProgressPrinter`, so the line looks the same.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressPrinter:
    """Formats a metrics record as one line: step, loss, tokens/s (and per device), MFU, expert load, ETA."""

    def __init__(self, *, max_steps: int, stream=None):
        self.max_steps = max_steps
        self.stream = stream or sys.stdout

    def __call__(self, r: dict) -> None:
        parts = [f"step {r['step']:>6}/{self.max_steps}", f"loss {r['loss']:.4f}", f"lr {r.get('lr', 0):.2e}",
                 f"{r['tokens_per_s']:,.0f} tok/s"]
        if r.get("devices", 1) > 1:
            parts.append(f"{r['tokens_per_s'] / r['devices']:,.0f} tok/s/device")
        if r.get("mfu") is not None:
            parts.append(f"MFU {r['mfu']:.1%}")
        parts.append(f"tokens {r['tokens']:,}")
        if r.get("expert_load_max_over_mean") is not None:
            parts.append(f"expert load max/mean {r['expert_load_max_over_mean']:.2f}")
        parts += [f"elapsed {_fmt_duration(r.get('elapsed_s', 0))}", f"eta {_fmt_duration(r.get('eta_s', 0))}"]
        self.stream.write(" | ".join(parts) + "\n")
        self.stream.flush()


class MetricsLogger:
    def __init__(self, run_dir: Path, *, max_steps: int, printer=None, enabled: bool = True, start_step: int = 0):
        """A fresh run starts an empty metrics.jsonl; a resumed one keeps the records up to `start_step`
        (those after it were logged by an attempt whose later steps are trained again)."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.max_steps, self.start_step = max_steps, start_step
        self.printer = printer
        self.start = time.perf_counter()
        self._file = None
        if enabled:
            self._keep_until(start_step)
            self._file = self.path.open("a", buffering=1)

    def _keep_until(self, step: int) -> None:
        kept = []
        if step > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= step:
                        kept.append(line + "\n")
                except (ValueError, KeyError):  # a line cut by a crash
                    continue
        tmp = self.path.with_name(self.path.name + ".partial")
        tmp.write_text("".join(kept))
        tmp.replace(self.path)  # a new file: a reader following the old one notices

    def log(self, record: dict) -> None:
        """record must hold step, loss, tokens, tokens_per_s; elapsed and eta are added here."""
        if self._file is None:
            return
        elapsed = time.perf_counter() - self.start
        step = record["step"]
        eta = elapsed / max(step - self.start_step, 1) * (self.max_steps - step)
        record = {**record, "elapsed_s": round(elapsed, 3), "eta_s": round(eta, 1), "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        if self.printer is not None:
            self.printer(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
