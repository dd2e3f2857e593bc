"""The per-rank entry point: one line per stage of the data flow (config -> data -> model -> engine -> loop).

Today it runs a single process; the Ray worker group calls the same function on every rank.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from data_pipeline.dataset import build_dataset
from parallel.engine import build_engine
from pretrain.config import config_hash, to_yaml
from pretrain.model.model import build_model
from pretrain.train.metrics import MetricsLogger


def resolve_device(train_cfg) -> tuple[torch.device, torch.dtype | None]:
    want = train_cfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    device = torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")
    use_bf16 = train_cfg.dtype == "bf16" or (train_cfg.dtype == "auto" and device.type == "cuda")
    return device, torch.bfloat16 if use_bf16 else None


def prepare_run_dir(cfg) -> Path:
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def train_main(cfg) -> dict:
    from pretrain.train.loop import train_loop

    t = cfg.train
    torch.manual_seed(t.seed)
    if t.threads:
        torch.set_num_threads(t.threads)
    device, autocast_dtype = resolve_device(t)
    run_dir = prepare_run_dir(cfg)
    grad_accum = t.global_batch_size // (t.micro_batch_size * cfg.parallel.dp)
    data = build_dataset(cfg.data, seq_len=t.seq_len, vocab_size=cfg.model.vocab_size, seed=t.seed)
    model = build_model(cfg.model, device=device)
    engine = build_engine(model, cfg.optim, cfg.parallel, max_steps=t.max_steps, grad_accum=grad_accum)
    logger = MetricsLogger(run_dir, max_steps=t.max_steps)
    try:
        result = train_loop(model=model, engine=engine, data=data, train_cfg=t, logger=logger, device=device,
                            autocast_dtype=autocast_dtype)
    finally:
        logger.close()
        data.close()
    summary = {"run_dir": str(run_dir), "config_hash": config_hash(cfg), "steps": result["steps"],
               "tokens": result["tokens"], "first_loss": result["history"][0]["loss"] if result["history"] else None,
               "last_loss": result["history"][-1]["loss"] if result["history"] else None}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
