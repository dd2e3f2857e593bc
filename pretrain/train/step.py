"""One global training step, the only code that trains: the loop, the equivalence tests and the benchmarks
all call `train_step`.

micro-batches (fetched, context-parallel sliced, their labels counted over dp x cp) -> forward under
autocast, backward through the engine -> expert-bias update from the counts summed over dp x cp ->
engine.step (reduce, clip, update) -> the loss over the global batch. What differs between one process and
many ranks sits behind `engine` (gradient reduction, ZeRO, bf16 masters) and `topology` (context-parallel
slicing, global expert load, metric reductions).

The language-model loss of a step is token-weighted over the whole global batch:
    loss = (sum of the token cross-entropies of every label of the global batch) / (labels in the global batch)
so its gradients are those of one process taking the whole global batch at once, whatever dp, cp,
micro_batch_size and grad_accum (and however many padding rows, labels all -100, a micro-batch holds).
The step's label count N is summed over dp x cp in ONE all_reduce, before the first forward (after
context-parallel slicing; left on the device). The engines divide each micro-batch's loss by grad_accum,
average gradients over dp and sum them over cp, so a micro-batch's backward loss carries
    ce_sum_local * dp * grad_accum / N
(the CP slices' shares add up to their rows'; summed over the step's micro-batches and averaged over dp
this is the global mean). The multi-token-prediction loss is weighted the same way, per depth with its own
count in the same all_reduce: it is a mean over label tokens too, and a per-micro-batch mean would be NaN
for a micro-batch of padding rows. The MoE aux loss (balance and z-loss, a statistic of each micro-batch's
routing) stays per micro-batch as before: mean over micro-batches and dp ranks, / cp on each CP slice.
A micro-batch or slice without labels adds 0; a global batch without labels has loss 0 (N clamped to 1).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch.autograd.profiler import record_function

from parallel.collectives import sum_and_count, sum_over
from parallel.context_parallel import split_for_context_parallel
from parallel.expert_parallel import global_expert_counts, load_stats
from pretrain.model.model import label_counts

DATA_EVENT = "liquid::data"  # profiler label of fetching and moving a micro-batch (bench step reads it)


@dataclass(frozen=True)
class Placement:
    """Where a step runs: this rank's place in the layout, its device, and the autocast dtype (None: fp32)."""
    topology: object  # parallel.topology.Topology
    device: torch.device
    autocast_dtype: torch.dtype | None = None


@dataclass(frozen=True)
class StepResult:
    loss: float  # language-model loss: token-weighted mean over every label of the global batch (0 without labels)
    grad_norm: float  # global gradient norm before clipping
    expert_load: list[float]  # per MoE layer that routed tokens: max / mean tokens per expert (1.0 = even)
    expert_counts: list[list[float]]  # per MoE layer: tokens per expert, summed over dp x cp
    data_wait_s: float  # seconds spent fetching and moving micro-batches
    stop: bool  # some rank asked to stop at this step


def train_step(engine, micro_batches: Iterable[dict], place: Placement, *, stop: bool = False,
               before_update: Callable[[], None] | None = None) -> StepResult:
    """One optimizer step of `engine.model` over `engine.grad_accum` micro-batches of this rank's rows
    (dicts of input_ids, labels, doc_start; whole rows: context parallelism slices them here). All of the
    step's micro-batches are drawn before the first forward (their labels are counted first).
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
    """What `run_step` leaves on the device: [global token-weighted loss, stop requests] (fp32), the
    gradient norm (fp32 scalar) and the expert counts [MoE layers, E] ([0, 0] without MoE layers)."""
    loss_and_stops: torch.Tensor
    grad_norm: torch.Tensor
    counts: torch.Tensor
    data_wait_s: float


def run_step(engine, micro_batches: Iterable[dict], place: Placement, *, stop: bool = False,
             before_update: Callable[[], None] | None = None) -> DeviceStep:
    """The device work of `train_step`, with no host read: micro-batches -> label count over dp x cp ->
    backward -> expert-bias update -> engine step -> the loss reduction. (`liquid dryrun` runs it on fake
    tensors.)"""
    model, topology, device = engine.model, place.topology, place.device
    batches, data_wait = _fetch(micro_batches, engine.grad_accum, place)
    depth = len(getattr(model, "mtp", ()))
    # [1 + mtp depth] labels of the global batch: one all_reduce for the whole step, kept on the device.
    num_global = sum_over(sum(label_counts(b["labels"], depth) for b in batches), topology.dp_cp_group)
    denominator = num_global.clamp_min(1)
    scale = (topology.dp * engine.grad_accum) / denominator  # fp32 [1 + depth]
    ce_sum = torch.zeros((), device=device)
    for batch in batches:
        ce_sum += _micro_step(model, engine, batch, place, scale)
    if before_update is not None:
        before_update()
    counts = update_router_biases(model, topology)
    grad_norm = engine.step()
    sums = sum_and_count(ce_sum, stop, topology.dp_cp_group)  # [global sum of token losses, stop requests]
    loss_and_stops = torch.stack([sums[0] / denominator[0], sums[1]])
    counts = counts.to(device) if counts is not None else torch.zeros(0, 0, device=device)
    return DeviceStep(loss_and_stops=loss_and_stops,
                      grad_norm=torch.as_tensor(grad_norm, dtype=torch.float32, device=device),
                      counts=counts, data_wait_s=data_wait)


def _fetch(micro_batches: Iterable[dict], grad_accum: int, place: Placement) -> tuple[list[dict], float]:
    """The step's `grad_accum` micro-batches on the device, each this rank's context-parallel slice; and
    the seconds spent fetching and moving them."""
    topology, batches, data_wait = place.topology, [], 0.0
    source = iter(micro_batches)
    for i in range(grad_accum):
        start = time.perf_counter()
        with record_function(DATA_EVENT):
            batch = next(source, None)
            if batch is None:
                raise ValueError(f"train_step got {i} micro-batches; the engine accumulates {grad_accum}")
            batch = {k: v.to(place.device, non_blocking=True) for k, v in batch.items() if v is not None}
        data_wait += time.perf_counter() - start
        if topology.cp > 1:
            batch = split_for_context_parallel(batch, topology.cp_rank, topology.cp)
        batches.append(batch)
    return batches, data_wait


def _micro_step(model, engine, batch: dict, place: Placement, scale: torch.Tensor) -> torch.Tensor:
    """Forward and backward of one micro-batch (this rank's slice of it under CP); `scale` [1 + mtp depth]
    turns its sums of token losses into its share of the global means (see the module docstring).
    Returns its sum of language-model token losses (no gradient)."""
    dtype, cp = place.autocast_dtype, place.topology.cp
    with torch.autocast(place.device.type, dtype=dtype, enabled=dtype is not None):
        out = model(batch["input_ids"], labels=batch["labels"], doc_start=batch.get("doc_start"))
    loss = out.lm_loss_sum * scale[0] + out.aux_loss / cp
    if out.mtp_loss_sums is not None:  # (never under CP: apply_context_parallel refuses mtp_depth > 0)
        loss = loss + model.cfg.mtp_loss_weight * (out.mtp_loss_sums * scale[1:]).mean()
    engine.backward(loss)
    return out.lm_loss_sum.detach()


def update_router_biases(model, topology) -> torch.Tensor | None:
    """Balance experts with the counts of the whole global batch (the same update on every rank, on the
    device); returns those counts [MoE layers, E], or None without MoE layers."""
    counts = global_expert_counts(model, topology.dp_cp_group)
    for moe, row in zip(model.moe_layers(), counts if counts is not None else []):
        moe.update_expert_bias(row.to(moe.tokens_per_expert.dtype))
    return counts
