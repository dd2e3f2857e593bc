"""The training loop: forward -> loss -> backward -> step -> expert-bias update -> metrics.

It is the only loop; engines (single process now, DeepSpeed across ranks later) sit behind `engine`.
"""
from __future__ import annotations

import time

import torch


def _move(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def expert_load(model) -> float | None:
    """max / mean tokens per expert over all MoE layers since the last bias update (1.0 = perfect)."""
    ratios = []
    for moe in model.moe_layers():
        counts = moe.tokens_per_expert
        if counts.sum() > 0:
            ratios.append(float(counts.max() / counts.mean()))
    return max(ratios) if ratios else None


def train_loop(*, model, engine, data, train_cfg, logger, device, autocast_dtype=None, start_step: int = 0,
               tokens_seen: int = 0) -> dict:
    grad_accum = engine.grad_accum
    tokens_per_step = train_cfg.global_batch_size * train_cfg.seq_len
    max_steps = train_cfg.max_steps
    if train_cfg.max_tokens:
        max_steps = min(max_steps, -(-train_cfg.max_tokens // tokens_per_step))
    model.train()
    losses, window_tokens, window_start = [], 0, time.perf_counter()
    history = []
    for step in range(start_step + 1, max_steps + 1):
        step_loss = torch.zeros((), device=device)
        for _ in range(grad_accum):
            batch = _move(data.next_batch(train_cfg.micro_batch_size), device)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = model(batch["input_ids"], labels=batch["labels"], doc_start=batch["doc_start"])
            engine.backward(out.loss)
            step_loss += out.lm_loss.detach() / grad_accum
        load = expert_load(model)
        grad_norm = engine.step()
        model.update_expert_bias()
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        loss = float(step_loss)
        if not torch.isfinite(step_loss):
            raise FloatingPointError(f"loss is {loss} at step {step}; stopping before the weights are ruined")
        losses.append(loss)
        if step % train_cfg.log_interval == 0 or step == max_steps:
            now = time.perf_counter()
            record = {"step": step, "loss": sum(losses) / len(losses), "tokens": tokens_seen,
                      "tokens_per_s": window_tokens / (now - window_start), "lr": engine.lr,
                      "grad_norm": grad_norm, "expert_load_max_over_mean": load}
            logger.log(record)
            history.append(record)
            losses, window_tokens, window_start = [], 0, now
    return {"steps": max_steps, "tokens": tokens_seen, "history": history}
