"""The output head's cross-entropy, a slice of tokens at a time: the [tokens, vocab] logits never exist whole.

`linear_cross_entropy_sum(x, weight, labels, chunk_tokens=C)` equals
`F.cross_entropy(F.linear(x, weight).float(), labels, ignore_index=..., reduction="sum")` (the plain head of
pretrain/model/model.py, under the same autocast) but holds at most C x vocab logits at a time.

Design: the gradients are computed in the forward, chunk by chunk (as Liger-Kernel's fused linear
cross-entropy does), and backward only scales them by the incoming (scalar) gradient:
- FLOPs: the same as the plain path, 6 x tokens x d x vocab (logits; their gradient into x; into the
  weight). Recomputing the logits in backward instead would add a third matmul (8 x tokens x d x vocab,
  +33% on the head, a few % of a step for the 8B preset) to save what is kept below.
- Memory kept from forward to backward: x's gradient ([tokens, d] in the matmul dtype: what the plain
  linear saves of its input, which this path does not need) and one fp32 [vocab, d] accumulator of the
  weight's gradient (the embedding's gradient, which backward would allocate anyway), instead of the plain
  path's fp32 log-softmax [tokens, vocab]. Per chunk the temporaries are C x vocab: the logits, their fp32
  log-softmax (turned into the gradient in place), and under bf16 that gradient's bf16 copy for the matmuls.
Without grad mode (or when neither x nor the weight needs a gradient) only the loss is computed, by chunk.

Numerics: each chunk runs F.linear in the autocast dtype (as autocast runs the plain head), then the
softmax cross-entropy in fp32. On the CPU that is one C++ pass per row (pretrain/model/loss_cpu.py: the
loss and softmax - one-hot in place of the logits, within a few ulp of torch's kernels); elsewhere, or
without that kernel, log-softmax and nll_loss - the kernels of F.cross_entropy - so a single chunk's loss is
the plain path's bit for bit. The softmax - one-hot gradient is formed for a unit upstream gradient and scaled in
backward (in fp32); the weight's gradient is summed over chunks in fp32.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

DEFAULT_IGNORE_INDEX = -100


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear(x, weight) computes in here: autocast's lower-precision dtype where autocast is on
    for x's device and would cast (floating inputs other than fp64), else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype not in (torch.float64,) and weight.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return x.dtype


_CPU_KERNEL: list = []  # [pretrain.model.loss_cpu, or None where it is absent], once looked up


def _cpu_kernel():
    """pretrain/model/loss_cpu.py, the CPU kernel of a chunk's softmax cross-entropy; None where that module is
    absent (exported models ship this file without it, and take torch's ops)."""
    if not _CPU_KERNEL:
        try:
            _CPU_KERNEL.append(importlib.import_module("pretrain.model.loss_cpu"))
        except ImportError:
            _CPU_KERNEL.append(None)
    return _CPU_KERNEL[0]


def _chunked(x, w, labels, chunk: int, ignore_index: int, need_x: bool, need_w: bool):
    """x [n, d], w [vocab, d] (both in the compute dtype), labels [n] -> (fp32 loss sum, dL/dx in x's
    dtype or None, dL/dw fp32 or None), for a unit upstream gradient."""
    n = x.shape[0]
    kernel = _cpu_kernel() if x.device.type == "cpu" else None
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if need_x else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
    for start in range(0, n, chunk):
        xc, yc = x[start:start + chunk], labels[start:start + chunk]
        logits = F.linear(xc, w).float()  # (the plain head: F.linear in the compute dtype, then .float())
        if kernel is not None and kernel.applies(logits, yc):  # one pass per row: the loss, the gradient in place
            total = total + kernel.cross_entropy_rows_(logits, yc, ignore_index, grad=need_x or need_w).sum()
            if need_x or need_w:
                _grad_matmuls(logits.to(x.dtype), xc, w, grad_x, grad_w, start, chunk)
            continue
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        total = total + F.nll_loss(logp, yc, ignore_index=ignore_index, reduction="sum")
        if not (need_x or need_w):
            continue
        # d(sum of -logp[label]) / d logits = softmax - onehot on rows with a label, 0 on ignored rows.
        valid = yc != ignore_index
        grad = logp.exp_()
        grad.scatter_add_(1, torch.where(valid, yc, 0).unsqueeze(1), valid.to(grad.dtype).neg().unsqueeze(1))
        grad.mul_(valid.unsqueeze(1))
        del logp
        _grad_matmuls(grad.to(x.dtype), xc, w, grad_x, grad_w, start, chunk)
        del grad
    return total, grad_x, grad_w


def _grad_matmuls(grad, xc, w, grad_x, grad_w, start: int, chunk: int) -> None:
    """A chunk's dL/dlogits (in the compute dtype: the matmuls run in it, as the plain head's backward) into
    dL/dx (its rows of grad_x) and dL/dw (summed into grad_w, fp32); either may be None."""
    if grad_x is not None:
        torch.mm(grad, w, out=grad_x[start:start + chunk])
    if grad_w is not None:
        if grad.dtype == torch.float32:  # (addmm with out=, not addmm_: torch's FLOP counter sees it)
            torch.addmm(grad_w, grad.t(), xc, out=grad_w)
        else:
            grad_w.add_(grad.t() @ xc)


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, labels, chunk, ignore_index, dtype):
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, grad_x, grad_w = _chunked(x.to(dtype), weight.to(dtype), labels, chunk, ignore_index, need_x, need_w)
        ctx.save_for_backward(grad_x, grad_w)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        grad_x, grad_w = ctx.saved_tensors
        if grad_x is not None:  # scaled in fp32 (at least): one rounding to x's dtype
            grad_x = (grad_x.to(torch.promote_types(grad_x.dtype, torch.float32)) * grad_total).to(ctx.x_dtype)
        if grad_w is not None:
            grad_w = (grad_w * grad_total).to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None, None


def linear_cross_entropy_sum(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk_tokens: int,
                             ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """Sum over tokens of cross_entropy(x @ weight.T, labels), fp32 scalar, `chunk_tokens` tokens at a time.

    x [..., d] (the head's input: the final norm's output), weight [vocab, d], labels [...] (x's leading
    shape; `ignore_index` marks tokens without a label: they add 0, and a batch without any label sums to
    0). Under autocast the matmuls run in autocast's dtype, as F.linear does; the softmax and the sum in
    fp32. Differentiable in x and weight (the gradients are computed in the forward; see the module doc)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if labels.shape != x.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must have x's leading shape {tuple(x.shape[:-1])}")
    dtype = _compute_dtype(x, weight)
    x2, y = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
    with torch.autocast(x.device.type, enabled=False):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _LinearCrossEntropySum.apply(x2, weight, y, chunk_tokens, ignore_index, dtype)
        return _chunked(x2.to(dtype), weight.to(dtype), y, chunk_tokens, ignore_index, False, False)[0]


__all__ = ["linear_cross_entropy_sum"]
