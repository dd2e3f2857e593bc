"""Feed-forward layers: dense SwiGLU and a dropless top-k MoE with sigmoid router and aux-loss-free balancing.

The experts module is plain (tokens sorted by expert + counts in, outputs out); expert parallelism in
`parallel/` wraps it without the experts knowing about ranks.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x)), x.new_zeros(())


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights [E, ...]; processes tokens already grouped by expert."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts
        # Index of the first expert held here in the whole layer: a shard's offset (parallel/expert_parallel.py).
        # Each expert's initial weights are seeded by its index in the layer, so a shard initialises alone.
        self.expert_offset = 0
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        for w in (self.w1, self.w3, self.w2):  # the model re-initialises with its own scheme
            nn.init.normal_(w, std=0.02)

    def forward(self, x_sorted, counts):
        """x_sorted [tokens, d] grouped by expert; counts [E] (python ints or a tensor) -> [tokens, d].

        Where `torch._grouped_mm` runs (CUDA bf16 compute, CPU fp32; see `_grouped_mm_dtype`) the
        experts run as three grouped GEMMs over per-expert offsets (no host sync on `counts`); otherwise
        as a Python loop over experts. Both give the same results (under torch.compile the CPU's grouped
        path runs eagerly: its fp32 kernel has no meta implementation).
        """
        compute_dtype = _grouped_mm_dtype(x_sorted, self.w1)
        if compute_dtype is not None and x_sorted.shape[0]:  # no tokens: the loop's empty result
            grouped = _grouped_experts_cpu if x_sorted.device.type == "cpu" else _grouped_experts
            return grouped(x_sorted, counts, self.w1, self.w3, self.w2, compute_dtype)
        counts = counts.tolist() if torch.is_tensor(counts) else list(counts)
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n:
                xe = x_sorted[start:start + n]
                outs.append(F.linear(F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e]), self.w2[e]))
            start += n
        return torch.cat(outs) if outs else x_sorted.new_zeros(0, self.w2.shape[1])


def _grouped_mm_dtype(x, w):
    """The dtype the grouped-GEMM path computes in for these inputs, or None to use the loop.

    `torch._grouped_mm` is documented for bf16 on CUDA with SM >= 80 (its meta/compile checks accept
    only bf16, and fp16 on a few cuBLASLt builds). On the CPU its fallback (a C++ loop of mm per group)
    is used for fp32: the loop's outputs bit for bit, without the per-expert Python, slicing and the
    zero-filled gradients of weight slices (CUDA fp32 keeps the loop). Under CUDA autocast the loop's F.linear computes in the autocast
    dtype, so that dtype is what counts. Operand rows must be 16-byte aligned (d and hidden % 8 in bf16).
    """
    if not hasattr(torch, "_grouped_mm") or w.device != x.device:
        return None
    if x.device.type == "cpu":
        # The CPU's grouped_mm is a C++ loop of mm over the groups: the loop's numbers without its
        # per-expert Python and host read of the counts. fp32 only (no CPU autocast), rows 16-byte aligned.
        if (not _CPU_GROUPED_MM or torch.is_autocast_enabled("cpu") or x.dtype != torch.float32 or w.dtype != x.dtype
                or (not torch.compiler.is_compiling() and (is_fake(x) or is_fake(w)))):
            # A dry run (FakeTensorMode, FLOPs counted per aten op) takes the loop; under torch.compile the
            # tensors are fake too, and expert_mm's own shape function serves.
            return None
        return x.dtype if all(n % 4 == 0 for n in w.shape[-2:]) else None
    if x.device.type != "cuda":
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    if dtype != torch.bfloat16 or (not torch.is_autocast_enabled("cuda") and w.dtype != dtype):
        return None
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return None
    hidden, d = w.shape[-2:]
    align = 16 // dtype.itemsize
    return dtype if d % align == 0 and hidden % align == 0 else None


def _cpu_grouped_mm_works() -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        torch._grouped_mm(torch.ones(2, 8), torch.ones(1, 8, 8).transpose(-2, -1), offs=torch.tensor([2], dtype=torch.int32))
    except (RuntimeError, NotImplementedError):
        return False
    return True


_CPU_GROUPED_MM = _cpu_grouped_mm_works()


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward rejects
    expanded or strided gradients such as the one from `.sum()`)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _group_offsets(counts, device) -> torch.Tensor:
    """grouped_mm's `offs`: the end row of each expert's group (int32), from per-expert counts (a list or a
    tensor; no host read)."""
    if not torch.is_tensor(counts):
        counts = torch.tensor(list(counts), dtype=torch.int64)
    return counts.to(device=device).cumsum(0).to(torch.int32)


def _grouped_experts(x_sorted, counts, w1, w3, w2, dtype):
    """SwiGLU experts as grouped GEMMs: rows offs[e-1]:offs[e] of x_sorted go to expert e.

    Weights are cast to `dtype` the way autocast would (a differentiable cast). Zero-token experts are
    empty groups. Works on any device where `torch._grouped_mm` runs (the CPU has a fallback), which
    is how the tests check it against the loop.
    """
    if x_sorted.shape[0] == 0:  # grouped_mm's backward rejects the zero-size gradients this would get
        return x_sorted.new_zeros(0, w2.shape[1], dtype=dtype)
    offs = _group_offsets(counts, x_sorted.device)
    x = x_sorted.to(dtype).contiguous()
    w1, w3, w2 = (w.to(dtype) for w in (w1, w3, w2))
    # nn.Linear layout [E, out, in]: the grouped product wants [E, in, out], i.e. the transpose.
    with torch.autocast(x.device.type, enabled=False):
        h = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offs)) * torch._grouped_mm(
            x, w3.transpose(-2, -1), offs=offs)
        out = torch._grouped_mm(h, w2.transpose(-2, -1), offs=offs)
    return _ContiguousGrad.apply(out)


@torch.library.custom_op("liquid::expert_mm", mutates_args=())
def expert_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows offs[g-1]:offs[g] of x [tokens, in] times w[g].T, w [groups, out, in] (nn.Linear layout) ->
    [tokens, out]: torch._grouped_mm as an op torch.compile can trace on the CPU. aten's fp32 grouped_mm
    runs on the CPU (a C++ loop of mm per group) but its meta kernel accepts bf16 only, so a compiled block
    broke its graph at every MoE layer; this op brings its own shape function (below) and backward, and
    inductor fuses the element-wise work around it (the SwiGLU's silu and product, the combine)."""
    return torch._grouped_mm(x.contiguous(), w.transpose(-2, -1), offs=offs)


@expert_mm.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("liquid::expert_mm_weight_grad", mutates_args=())
def expert_mm_weight_grad(grad: torch.Tensor, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """expert_mm's gradient into w: per group grad[rows].T @ x[rows] -> [groups, out, in]."""
    return torch._grouped_mm(grad.contiguous().t(), x.contiguous(), offs=offs)


@expert_mm_weight_grad.register_fake
def _(grad, x, offs):
    return grad.new_empty(offs.shape[0], grad.shape[1], x.shape[1])


def _expert_mm_setup(ctx, inputs, output):
    x, w, offs = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None, offs)


def _expert_mm_backward(ctx, grad):
    x, w, offs = ctx.saved_tensors
    grad_x = expert_mm(grad, w.transpose(-2, -1), offs) if ctx.needs_input_grad[0] else None
    grad_w = expert_mm_weight_grad(grad, x, offs) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


expert_mm.register_autograd(_expert_mm_backward, setup_context=_expert_mm_setup)


def _grouped_experts_cpu(x_sorted, counts, w1, w3, w2, dtype):
    """_grouped_experts through expert_mm (fp32 on the CPU): the same products and sums, traceable."""
    offs = _group_offsets(counts, x_sorted.device)
    x = x_sorted.to(dtype)
    h = F.silu(expert_mm(x, w1.to(dtype), offs)) * expert_mm(x, w3.to(dtype), offs)
    return expert_mm(h, w2.to(dtype), offs)


class Router(nn.Module):
    """Sigmoid scores; experts chosen by scores + expert_bias; weights = chosen scores renormalised."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, routed_scaling: float = 1.0):
        super().__init__()
        self.top_k, self.routed_scaling = top_k, routed_scaling
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        # Not a parameter: moved by the balancing rule, never by the optimizer.
        self.register_buffer("expert_bias", torch.zeros(num_experts), persistent=True)

    @torch.no_grad()
    def reset_fixed(self):
        self.expert_bias.zero_()

    def forward(self, x):
        # fp32 scores: top-k over bf16-rounded scores would ignore the expert bias's 1e-3 steps.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.gate.weight.float())  # [tokens, E]
        scores = logits.sigmoid()
        idx = (scores + self.expert_bias).topk(self.top_k, dim=-1).indices  # [tokens, k]
        chosen = scores.gather(-1, idx)
        # The +1e-6 is LFM2-MoE's (transformers' Lfm2MoeTopKRouter), so `lfm2_moe` exports compute the same weights.
        weights = chosen / (chosen.sum(-1, keepdim=True) + 1e-6) * self.routed_scaling
        return idx, weights, logits, scores


class _GatherRows(torch.autograd.Function):
    """rows = x[index] where `index` repeats each row of x `copies` times in all, and `inverse` lists, for
    each of x's rows in turn, the positions of its copies in `rows` (copies of row r at
    inverse[r * copies:(r + 1) * copies]). The backward is a gather by `inverse` and a sum over the copies in
    a fixed order, where autograd's backward of x[index] is an accumulating index_put: serial on the CPU
    (3.4 ms a call at 4096 x 256 on the development machine, 5% of a step) and ordered by atomics on CUDA.
    With copies 1 it is a permutation and its inverse."""

    @staticmethod
    def forward(ctx, x, index, inverse, copies: int):
        ctx.save_for_backward(inverse)
        ctx.copies = copies
        return x[index]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        grad = grad[inverse]
        if ctx.copies > 1:
            grad = grad.view(-1, ctx.copies, grad.shape[-1]).sum(1)
        return grad, None, None, None


def slots_of(order):
    """The inverse of the permutation `order`: the sorted row of each (token, k) slot."""
    slots = torch.empty_like(order)
    slots[order] = torch.arange(order.numel(), device=order.device)
    return slots


def combine_top_k(out_sorted, order, weights, *, dtype, slots=None):
    """Each token's weighted sum of its top-k expert outputs: out_sorted [tokens * k, d] holds the slots
    sorted by expert (slot `order[i]` at row i), weights [tokens, k] -> [tokens, d] in `dtype`.

    A gather back to (token, k) and a sum over k in a fixed order: deterministic on every device, where
    a scatter-add (index_add_) on CUDA adds in whatever order its atomics land; its backward is a gather
    too (_GatherRows). Under autocast the experts compute in bf16 while fp32 weights keep the stream in
    fp32: the result is the stream's dtype. `slots`: slots_of(order), when the caller has it.
    """
    tokens, k = weights.shape
    slots = slots_of(order) if slots is None else slots
    per_token = _GatherRows.apply(out_sorted, slots, order, 1).view(tokens, k, out_sorted.shape[-1])  # [tokens, k, d]
    return (per_token * weights[..., None].to(per_token.dtype)).to(dtype).sum(1)


class MoE(nn.Module):
    def __init__(self, d_model: int, cfg):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.router = Router(d_model, cfg.num_experts, cfg.top_k, cfg.routed_scaling)
        self.experts = Experts(cfg.num_experts, d_model, cfg.expert_dim)
        # Tokens routed to each expert since the last bias update (training forward passes only).
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.num_experts), persistent=False)
        # Off while activation checkpointing recomputes a forward in backward (model.tokens_not_counted):
        # those tokens were counted once already.
        self.count_tokens = True

    @torch.no_grad()
    def reset_fixed(self):
        self.tokens_per_expert.zero_()

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        idx, weights, logits, scores = self.router(flat)
        # A scatter of ones, not bincount: on CUDA bincount reads the largest index back to the host.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=idx.device).scatter_add_(
            0, idx.flatten(), torch.ones_like(idx.flatten()))
        if self.training and self.count_tokens:
            self.tokens_per_expert += counts.to(self.tokens_per_expert.dtype)
        order = idx.flatten().argsort(stable=True)  # slot (token * k + j) at each sorted row
        slots = slots_of(order)  # sorted row of each slot: the copies of token t at slots[t * k:(t + 1) * k]
        # A token's k copies by one gather by token id, whose backward gathers them back by slot and sums
        # each token's k in a fixed order (_GatherRows): no scatter-add, so deterministic on CUDA too.
        x_sorted = _GatherRows.apply(flat, order // idx.shape[1], slots, idx.shape[1])
        out_sorted = self.experts(x_sorted, counts)
        y = combine_top_k(out_sorted, order, weights, dtype=flat.dtype, slots=slots)
        return y.view(shape), self._aux_loss(logits, scores, counts)

    def _aux_loss(self, logits, scores, counts):
        aux = logits.new_zeros(())
        if self.cfg.aux_loss_coeff:
            # Switch-style: E * sum_e (fraction of routed slots to e) * (mean normalised score of e).
            frac = counts.float() / counts.sum().clamp_min(1)
            prob = (scores / scores.sum(-1, keepdim=True)).mean(0)
            aux = aux + self.cfg.aux_loss_coeff * self.num_experts * (frac * prob).sum()
        if self.cfg.z_loss_coeff:
            aux = aux + self.cfg.z_loss_coeff * torch.logsumexp(logits, -1).pow(2).mean()
        return aux

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert=None):
        """Aux-loss-free balancing: nudge under-loaded experts up and over-loaded ones down.

        `tokens_per_expert` defaults to this layer's own counts; the parallel engine passes counts
        summed over data-parallel ranks so every rank applies the same update.
        """
        counts = self.tokens_per_expert if tokens_per_expert is None else tokens_per_expert
        if self.cfg.bias_update_rate:  # no tokens: mean - counts is 0 and the bias stays (no host read to ask)
            self.router.expert_bias += self.cfg.bias_update_rate * torch.sign(counts.mean() - counts)
        self.tokens_per_expert.zero_()


def build_ffn(kind: str, d_model: int, model_cfg):
    builders = {
        "dense": lambda: DenseFFN(d_model, model_cfg.dense_dim),
        "moe": lambda: MoE(d_model, model_cfg.moe),
    }
    if kind not in builders:
        raise ValueError(f"unknown ffn kind '{kind}'; choose one of {sorted(builders)}")
    return builders[kind]()
