"""Experiment tracking (tracking.wandb, tracking.mlflow): rank 0 logs every metrics record and the
resolved config. Placeholder: the trackers are not built yet."""
from __future__ import annotations


def open_tracker(cfg, run_dir, *, start_step: int = 0):
    """The run's tracker (an object with log(record) and close()), or None when tracking is off."""
    if cfg.tracking.wandb.enabled or cfg.tracking.mlflow.enabled:
        raise NotImplementedError("experiment tracking is not built yet")
    return None
