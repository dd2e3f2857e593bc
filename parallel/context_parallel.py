"""Context parallelism: the sequence is split into contiguous slices, one per rank of the CP group.

`apply_context_parallel(model, cp_group)` replaces the mixers' single-device hooks with exchanges over the
group; `split_for_context_parallel` gives each rank its slice of a batch; `context_parallel_loss` gives
each rank its share of the full-sequence loss. Loss and gradients equal the single-process run.

What each mixer exchanges per layer and forward pass (fp32 = 4 bytes; `dtype` = activation bytes;
b = micro-batch rows, cp = CP group size, s = sequence length per rank):

- liquid: ONE all-gather of (final state S_j [b, heads, N, P], total decay A_j [b, heads]) in fp32.
  Each rank sends 4 * b * heads * (N * P + 1) bytes and receives (cp - 1) times that:
      bytes_per_layer = 4 * b * heads * (N * P + 1) * cp        (the gathered buffer on every rank)
  independent of the sequence length. Backward: one reduce-scatter of the same size.
  (liquid-8b-a1b, b = 4, heads 16, N 64, P 128: 2.0 MiB sent per rank and liquid layer, 2.0 * cp MiB gathered.)
  Rank r's true initial state is S0_r = sum_{j<r} (prod_{j<i<r} A_i) S_j (A_i = 0 when slice i holds a
  reset); its outputs gain exp(cum_t) q_t^T S0_r up to its first reset and its final state gains A_r S0_r.
  The liquid layer's value conv adds the conv halo below.
- conv halo (the `conv` mixer, and the liquid value conv): an all-gather of each rank's last K-1 inputs
  plus their document-start flags: dtype * b * (K-1) * (channels + 1) * cp bytes; rank r keeps rank r-1's.
- attention: an all-gather of K and V, dtype * b * s * kv_heads * 2 * head_dim * cp bytes (grows with the
  sequence; ring attention is the later optimisation), plus b * s * cp bytes of document starts (no grad).
  Rank r attends to the keys of ranks 0..r under the causal same-document mask built from the global
  document ids, with RoPE positions counted in the global row.

Every gather is differentiable: its backward reduce-scatters (sums) the gradients of the gathered
pieces back to the ranks that own them, so the CP ranks' losses must add up to the full-sequence loss
and their parameter gradients must be summed over the group (see `context_parallel_loss`; the training
step weighs tokens over the whole global batch the same way, pretrain/train/step.py). Every CP
rank runs forward and backward of every micro-batch: the collectives pair up in graph order.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from pretrain.model.layers import doc_ids, positions_in_doc
from pretrain.model.mixers import AttentionMixer, ConvMixer, DocumentMask, LiquidMixer, shared_layout
from pretrain.model.model import IGNORE_INDEX
from pretrain.model.scan import DEFAULT_CHUNK_SIZE, liquid_scan

SEQUENCE_KEYS = ("input_ids", "labels", "doc_start", "dt")  # [batch, seq] tensors split along seq


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    size = dist.get_world_size(group)
    out = x.new_empty(size * x.numel())
    dist.all_gather_into_tensor(out, x.contiguous().view(-1), group=group)
    return out.view(size, *x.shape)


class _AllGather(torch.autograd.Function):
    """x -> [group size, *x.shape] on every rank; backward sums each piece's gradients onto its owner
    (a reduce-scatter): piece j feeds the losses of every rank, and the CP losses add up."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(grad.shape[1:])
        dist.reduce_scatter_tensor(out.view(-1), grad.contiguous().view(-1), group=ctx.group)
        return out, None


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Differentiable all-gather over `group`: [*shape] -> [group size, *shape]."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _AllGather.apply(x, group)
    return _gather(x, group)


# ---- liquid recurrence ------------------------------------------------------------------------------

def carry_gains(log_decay: torch.Tensor):
    """Decay of a state entering the slice: gain [b, s, h] = exp(sum of log a over [0, t]) up to the first
    reset and 0 from it on; total [b, h] = the gain after the last token (A_j, 0 if the slice resets).

    Resets (-inf) are segment boundaries: they are zeroed before the cumsum, never differenced.
    """
    reset = torch.isneginf(log_decay)
    cum = log_decay.float().masked_fill(reset, 0.0).cumsum(1)
    gain = cum.exp() * (reset.cumsum(1) == 0)
    return gain, gain[:, -1]


def carried_states(states: torch.Tensor, totals: torch.Tensor) -> torch.Tensor:
    """states [cp, b, h, N, P], totals [cp, b, h] -> the true state entering each slice [cp, b, h, N, P]:
    S0_0 = 0, S0_{j+1} = A_j S0_j + S_j (= sum_{i<=j} (prod_{i<m<=j} A_m) S_i)."""
    carried = [torch.zeros_like(states[0])]
    for state, total in zip(states[:-1].unbind(0), totals[:-1].unbind(0)):
        carried.append(total[..., None, None] * carried[-1] + state)
    return torch.stack(carried)


def context_parallel_scan(q, k, v, log_decay, *, group, initial_state=None, chunk_size=DEFAULT_CHUNK_SIZE,
                          recompute=False):
    """liquid_scan over the slice held by this rank of `group`, as if the whole sequence were scanned.

    Same shapes as liquid_scan (seq = this rank's slice); the returned final state is the true state after
    this slice. One all-gather of (S_j, A_j) per call, whatever the slice length.
    """
    if initial_state is not None:
        raise ValueError("context_parallel_scan starts the sequence from a zero state; initial_state is not supported")
    rank = dist.get_rank(group)
    n, p = q.shape[-1], v.shape[-1]
    y, state = liquid_scan(q, k, v, log_decay, chunk_size=chunk_size, recompute=recompute)
    with torch.autocast(q.device.type, enabled=False):  # the correction accumulates in fp32, as the scan does
        gain, total = carry_gains(log_decay)
        payload = torch.cat([state.flatten(2), total[..., None]], dim=-1)  # [b, h, N*P + 1] fp32
        gathered = all_gather(payload, group)  # [cp, b, h, N*P + 1]
        states, totals = gathered[..., :-1].unflatten(-1, (n, p)), gathered[..., -1]
        # Every rank keeps the whole stack in its graph so its backward joins the collective (rank 0 included).
        carried = carried_states(states, totals)[rank]  # [b, h, N, P]
        y_carried = torch.einsum("bshn,bhnp->bshp", q.float(), carried) * gain[..., None]
        return (y.float() + y_carried).to(y.dtype), state + total[..., None, None] * carried


# ---- short causal convs ------------------------------------------------------------------------------

def context_parallel_halo(x: torch.Tensor, doc_start, width: int, *, group):
    """The `width` inputs before this rank's slice [b, width, channels] (zeros on rank 0).

    Inputs that precede a document start inside the halo are zeroed: they belong to an earlier document
    (causal_depthwise_conv itself masks the halo when a document starts inside this rank's slice).
    """
    if width == 0:
        return None
    rank = dist.get_rank(group)
    batch, seq, channels = x.shape
    w = min(width, seq)  # slices shorter than the kernel send everything they have
    flags = x.new_zeros(batch, w) if doc_start is None else doc_start[:, seq - w:].to(x.dtype)
    payload = torch.cat([x[:, seq - w:], flags[..., None]], dim=-1)  # [b, w, channels + 1]
    gathered = all_gather(payload, group)  # [cp, b, w, channels + 1]
    # The gathered tails in rank order, after `width` zeros, hold (at least) the `width` inputs before
    # each rank's slice contiguously: rank r's window ends where rank r's slice starts.
    prior = torch.cat([payload.new_zeros(batch, width, channels + 1), *gathered.unbind(0)], dim=1)
    window = prior[:, rank * w: rank * w + width]
    tail, starts = window[..., :channels], window[..., channels]
    later_starts = starts.flip(1).cumsum(1).flip(1) - starts  # document starts after each position
    return tail * (later_starts == 0)[..., None].to(tail.dtype)


# ---- attention ---------------------------------------------------------------------------------------

def context_parallel_layout(doc_start, batch: int, seq: int, device, *, group):
    """RoPE positions of this rank's queries in the global row [b, s], and the DocumentMask of those queries
    (global positions rank * s .. (rank+1) * s - 1) over the keys of ranks 0..rank. Shared by the attention
    layers of a forward: one all-gather and one block mask (every rank passes the same doc_start object to
    all its layers, so the ranks hit or miss the cache together)."""
    return shared_layout(doc_start, ("cp", group, batch, seq, torch.device(device)),
                         lambda: _context_parallel_layout(doc_start, batch, seq, device, group=group))


def _context_parallel_layout(doc_start, batch: int, seq: int, device, *, group):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    first, end = rank * seq, (rank + 1) * seq
    global_start = None
    if doc_start is not None:
        gathered = all_gather(doc_start.to(device=device, dtype=torch.uint8), group)  # [cp, b, s]
        global_start = gathered.movedim(0, 1).reshape(batch, size * seq).bool()
    positions = positions_in_doc(global_start, batch, size * seq, device)[:, first:end]
    docs = doc_ids(global_start, batch, size * seq, device)
    return positions, DocumentMask(None if docs is None else docs[:, :end], first, seq, device)


def context_parallel_kv(k, v, *, group):
    """k, v [b, s, kv_heads, head_dim] of this slice -> those of ranks 0..rank, [b, (rank+1) * s, ...]."""
    rank = dist.get_rank(group)
    gathered = all_gather(torch.cat([k, v], dim=-1), group)[: rank + 1]  # [rank+1, b, s, kv, 2 hd]
    kv = gathered.movedim(0, 1).flatten(1, 2)
    return kv.split([k.shape[-1], v.shape[-1]], dim=-1)


# ---- applying it -------------------------------------------------------------------------------------

class _GroupHook:
    """fn with group=... bound; shared, not copied, by deepcopy (a ProcessGroup does not pickle)."""

    def __init__(self, fn, group):
        self.fn, self.group = fn, group

    def __call__(self, *args, **kwargs):
        return self.fn(*args, group=self.group, **kwargs)

    def __deepcopy__(self, memo):
        return self

    def __repr__(self):
        return f"{self.fn.__name__}(group of {dist.get_world_size(self.group)})"


def _resolve_group(cp_group):
    return getattr(cp_group, "cp_group", cp_group)


def apply_context_parallel(model, cp_group):
    """Make every mixer of `model` exchange its context over `cp_group` (a ProcessGroup, or an object
    with `.cp_group`; None or a group of one: nothing to do). Returns the model."""
    group = _resolve_group(cp_group)
    if group is None or dist.get_world_size(group) == 1:
        return model
    if len(getattr(model, "mtp", ())):
        raise ValueError("model.mtp_depth > 0 is not supported with parallel.cp > 1: multi-token targets "
                         "cross the slice borders; set model.mtp_depth=0 or parallel.cp=1")
    for module in model.modules():
        if isinstance(module, (LiquidMixer, ConvMixer)):
            module.halo = _GroupHook(context_parallel_halo, group)
        if isinstance(module, LiquidMixer):
            module.scan = _GroupHook(context_parallel_scan, group)
        if isinstance(module, AttentionMixer):
            module.layout = _GroupHook(context_parallel_layout, group)
            module.gather_kv = _GroupHook(context_parallel_kv, group)
    return model


def split_for_context_parallel(batch: dict, cp_rank: int, cp_size: int) -> dict:
    """This rank's contiguous slice of every [batch, seq] tensor (input_ids, labels, doc_start, dt);
    other entries pass through. Every CP rank of a data-parallel rank receives the same full rows."""
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be in [0, {cp_size}); got {cp_rank}")
    seq = batch["input_ids"].shape[1]
    if seq % cp_size:
        raise ValueError(f"train.seq_len ({seq}) must be divisible by parallel.cp ({cp_size})")
    part = seq // cp_size
    return {key: value[:, cp_rank * part:(cp_rank + 1) * part].contiguous()
            if key in SEQUENCE_KEYS and value is not None else value
            for key, value in batch.items()}


def context_parallel_loss(output, labels: torch.Tensor, cp_group) -> torch.Tensor:
    """This rank's share of one micro-batch's full-sequence loss: (sum of its token losses) / (tokens with
    a label over the CP group) + aux / cp (one all_reduce of the label count). The shares add up to the
    single-process loss over the whole rows, so the parameter gradients must be SUMMED over the CP group.
    `labels` is this rank's slice. A slice without labels adds 0 to the sum, never NaN.

    Training does not call this: `pretrain.train.step` weighs the tokens over the whole global batch with
    one label-count all_reduce per step (the same shares, with the step's count in the denominator)."""
    group = _resolve_group(cp_group)
    if group is None or dist.get_world_size(group) == 1:
        return output.loss
    if output.mtp_loss is not None:
        raise ValueError("multi-token prediction is not supported with context parallelism")
    num_global = (labels != IGNORE_INDEX).sum()
    dist.all_reduce(num_global, group=group)
    return output.lm_loss_sum / num_global.clamp_min(1) + output.aux_loss / dist.get_world_size(group)


__all__ = ["apply_context_parallel", "split_for_context_parallel", "context_parallel_loss",
           "context_parallel_scan", "context_parallel_halo", "context_parallel_layout", "context_parallel_kv",
           "all_gather", "carry_gains", "carried_states"]
