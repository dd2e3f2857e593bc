"""The training loop: the one training step (pretrain/train/step.py) until the run's last step, with
metrics windows, checkpoints when due, and stop requests.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from pretrain.train.step import Placement, train_step


@dataclass(frozen=True)
class Position:
    """Where training stands: the last finished global step and the tokens seen up to it."""
    step: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class LoopResult:
    steps: int  # the last step trained
    tokens: int
    stopped: bool  # ended by a stop request (a checkpoint was saved at `steps`)
    first_record: dict | None  # the first and last metrics windows of this attempt (the summary's losses)
    last_record: dict | None


def last_step(train_cfg) -> int:
    """The step a run ends at: train.max_steps, or earlier when train.max_tokens is reached."""
    if train_cfg.max_tokens:
        tokens_per_step = train_cfg.global_batch_size * train_cfg.seq_len
        return min(train_cfg.max_steps, -(-train_cfg.max_tokens // tokens_per_step))
    return train_cfg.max_steps


class _Window:
    """The steps since the last metrics record: their mean loss, tokens, time and data wait."""

    def __init__(self):
        self.losses, self.tokens, self.data_wait, self.stall = [], 0, 0.0, None
        self.start = time.perf_counter()

    def add(self, result, tokens: int, stall: float | None) -> None:
        self.losses.append(result.loss)
        self.tokens += tokens
        self.data_wait += result.data_wait_s
        if stall is not None:
            self.stall = (self.stall or 0.0) + stall

    def record(self, step: int, tokens_seen: int, result, engine) -> dict:
        seconds = time.perf_counter() - self.start
        return {"step": step, "loss": sum(self.losses) / len(self.losses), "tokens": tokens_seen,
                "tokens_per_s": self.tokens / seconds, "lr": engine.lr, "grad_norm": result.grad_norm,
                "expert_load_max_over_mean": max(result.expert_load, default=None),
                "expert_load_per_layer": result.expert_load, "data_wait_frac": self.data_wait / seconds,
                "checkpoint_stall_s": round(self.stall, 4) if self.stall is not None else None}


def train_loop(engine, data, place: Placement, *, train_cfg, logger, start: Position = Position(),
               checkpoint=None, should_stop: Callable[[], bool] | None = None, validator=None) -> LoopResult:
    """Train from `start` to the last step. `logger.log(record)` gets a record every train.log_interval
    steps; `checkpoint` (a CheckpointManager) saves when due; `should_stop()` (rank 0's) asks for a stop:
    every rank then saves a checkpoint at this step and returns. `validator` (pretrain/train/validate.py)
    scores the held-out data when due; its losses join that step's record (a validation step is always a
    logged step) and its time is left out of the window's tokens/s."""
    tokens_per_step = train_cfg.global_batch_size * train_cfg.seq_len
    max_steps, tokens_seen = last_step(train_cfg), start.tokens
    engine.model.train()
    window, first, last = _Window(), None, None
    for step in range(start.step + 1, max_steps + 1):
        micro_batches = (data.next_batch(train_cfg.micro_batch_size) for _ in range(engine.grad_accum))
        result = train_step(engine, micro_batches, place, stop=should_stop is not None and should_stop())
        if not math.isfinite(result.loss):
            raise FloatingPointError(f"loss is {result.loss} at step {step}; stopping before the weights are ruined")
        tokens_seen += tokens_per_step
        stall = None
        if checkpoint is not None and (checkpoint.due(step, max_steps) or result.stop):
            stall = checkpoint.save(step, tokens_seen, engine, data)
        window.add(result, tokens_per_step, stall)
        scores = validator.run(engine.model) if validator is not None and validator.due(step, max_steps) else None
        if scores is not None:
            window.start += scores["val_s"]  # evaluation is not training throughput
        if step % train_cfg.log_interval == 0 or step == max_steps or result.stop or scores is not None:
            last = window.record(step, tokens_seen, result, engine)
            phase = getattr(data, "phase", None)  # data.phases: the step's mixture
            if phase is not None:
                last["phase"] = phase
            if scores is not None:
                last.update(scores)
            first = first or last
            logger.log(last)
            window = _Window()
        if result.stop:
            return LoopResult(step, tokens_seen, True, first, last)
    return LoopResult(max_steps, tokens_seen, False, first, last)
