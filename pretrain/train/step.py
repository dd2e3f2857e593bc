"""One global training step, the only code that trains: the loop, the equivalence tests and the benchmarks
all call `train_step`.

micro-batches (forward under autocast, backward through the engine) -> expert-bias update from the counts
summed over dp x cp -> engine.step (reduce, clip, update) -> the loss averaged over ranks. What differs
between one process and many ranks sits behind `engine` (gradient reduction, ZeRO, bf16 masters) and
`topology` (context-parallel slicing, global expert load, metric reductions).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.autograd.profiler import record_function

from parallel.collectives import mean_and_count
from parallel.context_parallel import context_parallel_losses, split_for_context_parallel
from parallel.expert_parallel import global_expert_counts, load_stats

DATA_EVENT = "liquid::data"  # profiler label of fetching and moving a micro-batch (bench step reads it)


@dataclass(frozen=True)
class Placement:
    """Where a step runs: this rank's place in the layout, its device, and the autocast dtype (None: fp32)."""
    topology: object  # parallel.topology.Topology
    device: torch.device
    autocast_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class StepResult:
    loss: float  # language-model loss: mean over the micro-batches and the dp x cp ranks
    grad_norm: float  # global gradient norm before clipping
    expert_load: list[float]  # per MoE layer that routed tokens: max / mean tokens per expert (1.0 = even)
    expert_counts: list[list[float]]  # per MoE layer: tokens per expert, summed over dp x cp
    data_wait_s: float  # seconds spent fetching and moving micro-batches
    stop: bool  # some rank asked to stop at this step


def train_step(engine, micro_batches: Iterable[dict], place: Placement, *, stop: bool = False,
               before_update: Callable[[], None] | None = None) -> StepResult:
    """One optimizer step of `engine.model` over `engine.grad_accum` micro-batches of this rank's rows
    (dicts of input_ids, labels, doc_start; whole rows: context parallelism slices them here).
    `before_update` runs after the last backward and before the engine steps (tests read gradients
    there). `stop` (this rank's request) rides on the loss reduction, so every rank learns it without
    another collective. The device work is `run_step`; this adds the step's one host read."""
    done = run_step(engine, micro_batches, place, stop=stop, before_update=before_update)
    counts = done.counts
    # The step's one host read: loss, stop requests, gradient norm and expert counts together.
    values = torch.cat([done.loss_and_stops, done.grad_norm.reshape(1), counts.flatten()]).tolist()
    layers, experts = counts.shape
    rows = [values[3 + i * experts:3 + (i + 1) * experts] for i in range(layers)]
    stats = load_stats(rows)
    return StepResult(loss=values[0], grad_norm=values[2],
                      expert_load=[round(s["max_over_mean"], 4) for s in stats if s["mean"] > 0],
                      expert_counts=rows, data_wait_s=done.data_wait_s, stop=values[1] > 0)


@dataclass(frozen=True)
class DeviceStep:
    """What `run_step` leaves on the device: [mean loss, stop requests, ranks], the gradient norm (fp32
    scalar) and the expert counts [MoE layers, E] ([0, 0] without MoE layers)."""
    loss_and_stops: torch.Tensor
    grad_norm: torch.Tensor
    counts: torch.Tensor
    data_wait_s: float


def run_step(engine, micro_batches: Iterable[dict], place: Placement, *, stop: bool = False,
             before_update: Callable[[], None] | None = None) -> DeviceStep:
    """The device work of `train_step`, with no host read: micro-batches -> backward -> expert-bias
    update -> engine step -> the loss reduction. (`liquid dryrun` runs it on fake tensors.)"""
    model, topology, device = engine.model, place.topology, place.device
    batches = iter(micro_batches)
    step_loss = torch.zeros((), device=device)
    data_wait = 0.0
    for i in range(engine.grad_accum):
        start = time.perf_counter()
        with record_function(DATA_EVENT):
            batch = next(batches, None)
            if batch is None:
                raise ValueError(f"train_step got {i} micro-batches; the engine accumulates {engine.grad_accum}")
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if v is not None}
        data_wait += time.perf_counter() - start
        step_loss += _micro_step(model, engine, batch, place) / engine.grad_accum
    if before_update is not None:
        before_update()
    counts = update_router_biases(model, topology)
    grad_norm = engine.step()
    loss_and_stops = mean_and_count(step_loss, stop, topology.dp_cp_group)
    counts = counts.to(device) if counts is not None else torch.zeros(0, 0, device=device)
    return DeviceStep(loss_and_stops=loss_and_stops,
                      grad_norm=torch.as_tensor(grad_norm, dtype=torch.float32, device=device),
                      counts=counts, data_wait_s=data_wait)


def _micro_step(model, engine, batch: dict, place: Placement) -> torch.Tensor:
    topology, dtype = place.topology, place.autocast_dtype
    if topology.cp > 1:
        batch = split_for_context_parallel(batch, topology.cp_rank, topology.cp)
    with torch.autocast(place.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(batch["input_ids"], labels=batch["labels"], doc_start=batch.get("doc_start"))
    loss, reported = out.loss, out.lm_loss.detach()
    if topology.cp > 1:
        # The CP shares add up to the row loss; the engine sums gradients over CP and averages over DP.
        loss, reported = context_parallel_losses(out, batch["labels"], topology.cp_group)
    engine.backward(loss)
    return reported


def update_router_biases(model, topology) -> torch.Tensor | None:
    """Balance experts with the counts of the whole global batch (the same update on every rank, on the
    device); returns those counts [MoE layers, E], or None without MoE layers."""
    counts = global_expert_counts(model, topology.dp_cp_group)
    for moe, row in zip(model.moe_layers(), counts if counts is not None else []):
        moe.update_expert_bias(row.to(moe.tokens_per_expert.dtype))
    return counts
