"""The training loop: forward -> loss -> backward -> step -> expert-bias update -> metrics.

It is the only loop. What differs between one process and many ranks sits behind `engine` (gradient
reduction, ZeRO) and `topology` (context-parallel slicing, global expert load, metric reductions).
"""
from __future__ import annotations

import time

import torch

from parallel.collectives import mean_and_any
from parallel.context_parallel import context_parallel_loss, split_for_context_parallel
from parallel.expert_parallel import expert_load_stats


def _move(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def update_router_biases(model, topology) -> list[float]:
    """Balance experts with the counts of the whole global batch (the same update on every rank);
    returns each MoE layer's max/mean tokens-per-expert ratio this step (1.0 = perfect balance)."""
    stats = expert_load_stats(model, topology.dp_cp_group)
    for moe, s in zip(model.moe_layers(), stats):
        moe.update_expert_bias(torch.as_tensor(s["tokens_per_expert"], dtype=moe.tokens_per_expert.dtype,
                                               device=moe.tokens_per_expert.device))
    return [round(s["max_over_mean"], 4) for s in stats if s["mean"] > 0]


def _micro_step(model, engine, batch, topology, autocast_dtype, device):
    if topology.cp > 1:
        batch = split_for_context_parallel(batch, topology.cp_rank, topology.cp)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        out = model(batch["input_ids"], labels=batch["labels"], doc_start=batch["doc_start"])
    loss = out.loss
    if topology.cp > 1:
        # The CP shares add up to the row loss; the engine sums gradients over CP and averages over DP.
        loss = context_parallel_loss(out, batch["labels"], topology.cp_group)
    engine.backward(loss)
    return out.lm_loss.detach()


def last_step(train_cfg) -> int:
    """The step a run ends at: train.max_steps, or earlier when train.max_tokens is reached."""
    if train_cfg.max_tokens:
        tokens_per_step = train_cfg.global_batch_size * train_cfg.seq_len
        return min(train_cfg.max_steps, -(-train_cfg.max_tokens // tokens_per_step))
    return train_cfg.max_steps


def train_loop(*, model, engine, data, train_cfg, logger, device, topology, autocast_dtype=None,
               flops_per_token=None, peak_flops=None, start_step: int = 0, tokens_seen: int = 0,
               checkpoint=None, stop=None) -> dict:
    """Train from `start_step` (0, or the step a checkpoint restored) to the last step; `checkpoint`
    (a CheckpointManager) saves when due, and its training stall is logged with the step. `stop()` (rank 0)
    says a stop was requested: every rank then saves a checkpoint at this step and returns."""
    grad_accum = engine.grad_accum
    tokens_per_step = train_cfg.global_batch_size * train_cfg.seq_len
    max_steps = last_step(train_cfg)
    model.train()
    losses, window_tokens, window_start, data_wait, stall = [], 0, time.perf_counter(), 0.0, None
    history = []
    for step in range(start_step + 1, max_steps + 1):
        step_loss = torch.zeros((), device=device)
        for _ in range(grad_accum):
            t0 = time.perf_counter()
            batch = _move(data.next_batch(train_cfg.micro_batch_size), device)
            data_wait += time.perf_counter() - t0
            step_loss += _micro_step(model, engine, batch, topology, autocast_dtype, device) / grad_accum
        load_per_layer = update_router_biases(model, topology)
        grad_norm = engine.step()
        tokens_seen += tokens_per_step
        window_tokens += tokens_per_step
        stop_here = stop is not None and stop()  # rank 0 reads the request; every rank learns it below
        mean_loss, stop_here = mean_and_any(step_loss, stop_here, topology.dp_cp_group)
        loss = float(mean_loss)
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise FloatingPointError(f"loss is {loss} at step {step}; stopping before the weights are ruined")
        losses.append(loss)
        if checkpoint is not None and (checkpoint.due(step, max_steps) or stop_here):
            stall = (stall or 0.0) + checkpoint.save(step, tokens_seen, engine, data)
        if step % train_cfg.log_interval == 0 or step == max_steps or stop_here:
            now = time.perf_counter()
            tps = window_tokens / (now - window_start)
            record = {"step": step, "loss": sum(losses) / len(losses), "tokens": tokens_seen,
                      "tokens_per_s": tps, "devices": topology.world, "lr": engine.lr, "grad_norm": grad_norm,
                      "expert_load_max_over_mean": max(load_per_layer, default=None),
                      "expert_load_per_layer": load_per_layer, "data_wait_frac": data_wait / (now - window_start),
                      "mfu": tps * flops_per_token / (peak_flops * topology.world) if peak_flops else None,
                      "checkpoint_stall_s": round(stall, 4) if stall is not None else None}
            logger.log(record)
            history.append(record)
            losses, window_tokens, window_start, data_wait, stall = [], 0, now, 0.0, None
        if stop_here:
            return {"steps": step, "tokens": tokens_seen, "history": history, "stopped": True}
    return {"steps": max_steps, "tokens": tokens_seen, "history": history, "stopped": False}
