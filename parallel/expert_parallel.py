"""Expert parallelism: each rank of an EP group keeps a contiguous slice of every MoE layer's experts.

Tokens travel to their expert's rank and back with two uneven all_to_alls; the experts stay a plain module.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.faults import fault_point
from pretrain.model.ffn import MoE, Experts

EXPERT_WEIGHTS = ("w1", "w3", "w2")


class _AllToAll(torch.autograd.Function):
    """Rows of x go out in `in_splits` chunks (one per rank) and come back as `out_splits` chunks.

    The backward is the same exchange with the splits swapped: the gradient of a row returns to the
    rank that sent it.
    """

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _exchange(grad, in_splits, out_splits, ctx.group), None, None, None


def _exchange(x, out_splits: list[int], in_splits: list[int], group):
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def all_to_all_rows(x, *, out_splits: list[int], in_splits: list[int], group):
    """Differentiable uneven all_to_all over the rows of x [rows, ...]."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallelExperts(nn.Module):
    """Same interface as `Experts` (tokens sorted by global expert + counts [E]) over sharded experts.

    `self.experts` is a plain `Experts` holding this rank's experts [rank * E_local, (rank + 1) * E_local).
    """

    def __init__(self, local: Experts, *, group, num_experts: int):
        super().__init__()
        self.experts = local  # named so that parameter names still end in "experts.w1" etc.
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.num_experts = num_experts
        self.num_local_experts = local.num_experts

    def forward(self, x_sorted, counts):
        """x_sorted [tokens, d] grouped by global expert; counts [E] -> [tokens, d] aligned with x_sorted."""
        counts = torch.as_tensor(counts, device=x_sorted.device).long()
        send, recv, recv_counts = self.routing(counts, rows=x_sorted.shape[0])
        fault_point("all_to_all")  # the chaos soak's kill while the peers wait in the exchange (parallel/faults.py)
        x_recv = all_to_all_rows(x_sorted, out_splits=recv, in_splits=send, group=self.group)
        # Rows arrive grouped by (source rank, local expert); the experts want them grouped by local expert.
        order = _order_by_local_expert(recv_counts, total=sum(recv))
        # Every rank sends back the stream's dtype: under autocast the experts return bf16 and a rank with
        # no tokens returns its input's dtype, and the reverse all_to_all must not mix element sizes.
        y = self._run_local(x_recv[order], recv_counts.sum(0)).to(x_sorted.dtype)
        y = y[_inverse(order)]
        return all_to_all_rows(y, out_splits=send, in_splits=recv, group=self.group)

    def routing(self, counts, *, rows: int):
        """counts [E] (this rank's `rows` rows per global expert) -> (rows sent to each EP rank, rows received
        from each, on the host; recv_counts [ep, E_local]: rows from source rank s for local expert e).
        The one data-dependent point of the exchange (`liquid dryrun` replaces it with planned counts)."""
        recv_counts = self._exchange_counts(counts)
        # One host sync for both split lists (they are needed on the host by all_to_all_single).
        splits = torch.cat([counts.view(self.ep_size, -1).sum(1), recv_counts.sum(1)]).tolist()
        return splits[:self.ep_size], splits[self.ep_size:], recv_counts

    def _exchange_counts(self, counts):
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)  # chunk r of counts = rank r's experts
        return recv.view(self.ep_size, self.num_local_experts)

    def _run_local(self, x, local_counts):
        if x.shape[0]:
            return self.experts(x, local_counts)
        # No tokens here: still return a result that depends on the input and the weights, so that this
        # rank's backward runs both reverse all_to_alls (the other ranks wait on them) and its expert
        # gradients are zeros rather than None, as in the single-process run.
        return x + sum(getattr(self.experts, n).sum() for n in EXPERT_WEIGHTS) * 0

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, num_local_experts={self.num_local_experts}, ep_size={self.ep_size}"


def _order_by_local_expert(recv_counts, *, total: int):
    """Permutation that stably sorts rows laid out as (source rank, local expert) by local expert; `total`
    rows (known on the host from the split sizes: without it repeat_interleave reads the sum back)."""
    ep, num_local = recv_counts.shape
    expert_of_row = torch.arange(num_local, device=recv_counts.device).repeat(ep)
    expert_of_row = expert_of_row.repeat_interleave(recv_counts.flatten(), output_size=total)
    return expert_of_row.argsort(stable=True)


def _inverse(order):
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


def shard_experts(experts: Experts, *, rank: int, ep_size: int) -> Experts:
    """A plain `Experts` holding a copy of experts [rank * E_local, (rank + 1) * E_local)."""
    if experts.num_experts % ep_size:
        raise ValueError(f"moe.num_experts ({experts.num_experts}) must be divisible by the expert-parallel "
                         f"size ({ep_size})")
    num_local = experts.num_experts // ep_size
    _, hidden, d_model = experts.w1.shape
    with torch.device("meta"):  # allocates nothing and draws no random numbers
        local = Experts(num_local, d_model, hidden)
    lo = rank * num_local
    local.init_key, local.expert_offset = getattr(experts, "init_key", None), experts.expert_offset + lo
    for name in EXPERT_WEIGHTS:
        full = getattr(experts, name)
        setattr(local, name, nn.Parameter(full.detach()[lo:lo + num_local].clone(), requires_grad=full.requires_grad))
    return local


def _moe_layers(model) -> list[MoE]:
    # Same as LiquidLM.moe_layers(), and also accepts a bare MoE.
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model, ep_group):
    """Shard every MoE layer's experts over `ep_group` (a ProcessGroup, an object with `.ep_group`, or None).

    Every rank must have built the same seeded model: each keeps its own slice of the full weights.
    None or a group of one rank leaves the model unchanged. Returns the model.
    """
    group = getattr(ep_group, "ep_group", ep_group)
    if group is None or dist.get_world_size(group) == 1:
        return model
    ep_size, rank = dist.get_world_size(group), dist.get_rank(group)
    for moe in _moe_layers(model):
        local = shard_experts(moe.experts, rank=rank, ep_size=ep_size)
        for p in local.parameters():
            # DeepSpeed's marks for expert params: reduced over the expert-data-parallel group only.
            p.allreduce = False
            p.group_name = f"ep_size_{ep_size}"
        moe.experts = ExpertParallelExperts(local, group=group, num_experts=moe.num_experts)
    return model


def global_expert_counts(model, group=None) -> torch.Tensor | None:
    """Tokens routed to each expert since the last bias update [MoE layers, E] (fp32, on the device),
    summed over `group` if given; None without MoE layers. One all_reduce for all layers, no host read."""
    layers = _moe_layers(model)
    if not layers:
        return None
    counts = torch.stack([m.tokens_per_expert.float() for m in layers])  # a copy
    if group is not None:
        dist.all_reduce(counts, group=group)
    return counts


def load_stats(rows: list[list[float]]) -> list[dict]:
    """Per MoE layer, from its tokens per expert: the counts, max, mean and max/mean (0 without tokens)."""
    stats = []
    for row in rows:
        mean = sum(row) / len(row)
        stats.append({"tokens_per_expert": row, "max": max(row), "mean": mean,
                      "max_over_mean": max(row) / mean if mean else 0.0})
    return stats


def expert_load_stats(model, group=None) -> list[dict]:
    """Per MoE layer: tokens routed to each expert since the last bias update, summed over `group` if given.

    Reads each layer's `tokens_per_expert` (this rank's routing decisions, by global expert) without
    changing it.
    """
    counts = global_expert_counts(model, group)
    return [] if counts is None else load_stats(counts.tolist())


