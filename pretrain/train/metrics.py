"""Training metrics: a live progress line on the terminal and one JSON object per logged step in metrics.jsonl."""
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


class MetricsLogger:
    def __init__(self, run_dir: Path, *, max_steps: int, stream=None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.max_steps = max_steps
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()
        self._file = self.path.open("a", buffering=1)

    def log(self, record: dict) -> None:
        """record must hold step, loss, tokens, tokens_per_s; elapsed and eta are added here."""
        elapsed = time.perf_counter() - self.start
        step = record["step"]
        eta = elapsed / max(step, 1) * (self.max_steps - step)
        record = {**record, "elapsed_s": round(elapsed, 3), "eta_s": round(eta, 1), "time": time.time()}
        self._file.write(json.dumps(record) + "\n")
        extra = ""
        if record.get("expert_load_max_over_mean") is not None:
            extra = f" | expert load max/mean {record['expert_load_max_over_mean']:.2f}"
        self.stream.write(
            f"step {step:>6}/{self.max_steps} | loss {record['loss']:.4f} | lr {record.get('lr', 0):.2e}"
            f" | {record['tokens_per_s']:,.0f} tok/s | tokens {record['tokens']:,}{extra}"
            f" | elapsed {_fmt_duration(elapsed)} | eta {_fmt_duration(eta)}\n"
        )
        self.stream.flush()

    def close(self) -> None:
        self._file.close()
