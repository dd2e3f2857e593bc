"""Triton kernel for the chunked liquid scan (forward); backward by recomputation with the PyTorch path.

`liquid_scan_triton` has `liquid_scan`'s signature and semantics (see scan.py: shapes, -inf log decays as
exact resets, float32 final state). One program handles one (batch, head) and a block of the value
dimension P; it walks the chunks in order, keeping the [N, BLOCK_P] state in registers, so the per-chunk
matrices of the PyTorch path never reach memory. Inside a chunk it does what `scan._chunk_group` does:
resets become segment ids, pairs in different segments are masked out, and the carried state is dropped
after a reset.

Backward: NOT a Triton kernel. `backward` recomputes the forward with the PyTorch chunked path
(`scan.liquid_scan`, forced onto the PyTorch implementation while recomputing) and differentiates that,
so gradients equal the PyTorch path's; it costs one extra PyTorch forward and that path's memory for the
layer being differentiated.

Dispatch: `use_triton(q)` says whether `scan.liquid_scan` should route here (CUDA tensors, triton
importable, env LIQUID_SCAN_TRITON not "0", and not inside this module's own recomputation). On the CPU
the kernel runs only under TRITON_INTERPRET=1 (the tests call `liquid_scan_triton` directly that way).
"""
from __future__ import annotations

import os
import threading

import torch

from pretrain.model import scan as _scan

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing or broken: the PyTorch path is used
    triton = None
    tl = None

_local = threading.local()  # .recomputing: inside backward's PyTorch recomputation (per thread)


def triton_available() -> bool:
    return triton is not None


def use_triton(q: torch.Tensor) -> bool:
    """Whether `liquid_scan` should run the Triton kernel for these inputs: on CUDA, opted in with
    LIQUID_SCAN_TRITON=1 until the kernel has been checked and measured on a GPU (it has only run under
    TRITON_INTERPRET=1 on a CPU so far)."""
    return (q.is_cuda and triton is not None and os.environ.get("LIQUID_SCAN_TRITON", "0") == "1"
            and not getattr(_local, "recomputing", False))


if triton is not None:

    @triton.jit
    def _liquid_scan_fwd_kernel(
        Q, K, V, LD, S0, Y, SF,
        seq, heads, n_dim, p_dim,
        sq_b, sq_t, sq_h, sq_n,
        sk_b, sk_t, sk_h, sk_n,
        sv_b, sv_t, sv_h, sv_p,
        sl_b, sl_t, sl_h,
        sy_b, sy_t, sy_h, sy_p,
        HAS_S0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        pid_bh = tl.program_id(0)
        pid_p = tl.program_id(1)
        b = pid_bh // heads
        h = pid_bh % heads

        offs_t = tl.arange(0, CHUNK)
        offs_n = tl.arange(0, BLOCK_N)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_n = offs_n < n_dim
        mask_p = offs_p < p_dim

        # State [BLOCK_N, BLOCK_P] in float32; initial_state and final state are contiguous [B, H, N, P].
        s_ptrs = (b * heads + h) * n_dim * p_dim + offs_n[:, None] * p_dim + offs_p[None, :]
        s_mask = mask_n[:, None] & mask_p[None, :]
        if HAS_S0:
            state = tl.load(S0 + s_ptrs, mask=s_mask, other=0.0).to(tl.float32)
        else:
            state = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)

        causal = offs_t[:, None] >= offs_t[None, :]
        q_base = Q + b * sq_b + h * sq_h
        k_base = K + b * sk_b + h * sk_h
        v_base = V + b * sv_b + h * sv_h
        l_base = LD + b * sl_b + h * sl_h
        y_base = Y + b * sy_b + h * sy_h

        for start in range(0, seq, CHUNK):
            t = start + offs_t
            mask_t = t < seq
            qc = tl.load(q_base + t[:, None] * sq_t + offs_n[None, :] * sq_n,
                         mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            kc = tl.load(k_base + t[:, None] * sk_t + offs_n[None, :] * sk_n,
                         mask=mask_t[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            vc = tl.load(v_base + t[:, None] * sv_t + offs_p[None, :] * sv_p,
                         mask=mask_t[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
            # Padding: log decay 0 and k = 0, so the state is unaffected by it.
            ld = tl.load(l_base + t * sl_t, mask=mask_t, other=0.0).to(tl.float32)

            reset = ld == float("-inf")
            ld = tl.where(reset, 0.0, ld)
            cum = tl.cumsum(ld, axis=0)  # log decay from chunk start to t, inclusive; finite
            seg = tl.cumsum(reset.to(tl.int32), axis=0)  # resets up to and including t
            total = tl.sum(ld, axis=0)
            last_seg = tl.sum(reset.to(tl.int32), axis=0)

            # Intra-chunk: (q k^T * decay) v, decay masked to s <= t in the same segment. The where keeps
            # exp's overflowing upper triangle out of the result.
            pair_ok = causal & (seg[:, None] == seg[None, :])
            decay = tl.where(pair_ok, tl.exp(cum[:, None] - cum[None, :]), 0.0)
            scores = tl.dot(qc, tl.trans(kc), input_precision=PRECISION) * decay
            y = tl.dot(scores, vc, input_precision=PRECISION)

            # Carried state, decayed from the chunk start up to t (dropped after a reset in the chunk).
            from_start = tl.where(seg == 0, tl.exp(cum), 0.0)
            y += tl.dot(qc * from_start[:, None], state, input_precision=PRECISION)
            tl.store(y_base + t[:, None] * sy_t + offs_p[None, :] * sy_p, y.to(Y.dtype.element_ty),
                     mask=mask_t[:, None] & mask_p[None, :])

            # State at the chunk end: decayed carried state plus this chunk's own contribution.
            to_end = tl.where(seg == last_seg, tl.exp(total - cum), 0.0)
            chunk_decay = tl.where(last_seg == 0, tl.exp(total), 0.0)
            state = chunk_decay * state + tl.dot(tl.trans(kc * to_end[:, None]), vc, input_precision=PRECISION)

        tl.store(SF + s_ptrs, state, mask=s_mask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _forward(q, k, v, log_decay, initial_state, chunk_size):
    batch, seq, heads, n = q.shape
    p = v.shape[-1]
    final = torch.empty(batch, heads, n, p, device=q.device, dtype=torch.float32)
    y = torch.empty(batch, seq, heads, p, device=q.device, dtype=v.dtype)
    if seq == 0:
        final.copy_(initial_state.float() if initial_state is not None else torch.zeros_like(final))
        return y, final
    # tl.dot wants every dimension >= 16 and a power of two; the chunk length is an implementation
    # detail (results do not depend on it beyond rounding), so it is rounded into [16, 64].
    chunk = min(64, max(16, _next_pow2(min(chunk_size, seq))))
    block_n = max(16, _next_pow2(n))
    block_p = min(64, max(16, _next_pow2(p)))
    s0 = initial_state.float().contiguous() if initial_state is not None else final  # unused if absent
    precision = "tf32" if (q.is_cuda and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    grid = (batch * heads, triton.cdiv(p, block_p))
    _liquid_scan_fwd_kernel[grid](
        q, k, v, log_decay, s0, y, final,
        seq, heads, n, p,
        *q.stride(), *k.stride(), *v.stride(), *log_decay.stride(), *y.stride(),
        HAS_S0=initial_state is not None, CHUNK=chunk, BLOCK_N=block_n, BLOCK_P=block_p,
        PRECISION=precision,
        num_warps=4,
    )
    return y, final


class _LiquidScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, chunk_size, recompute):
        y, final = _forward(q, k, v, log_decay, initial_state, chunk_size)
        ctx.save_for_backward(q, k, v, log_decay, initial_state)
        ctx.chunk_size, ctx.recompute = chunk_size, recompute
        return y, final

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        q, k, v, log_decay, initial_state = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:5]
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip((q, k, v, log_decay, initial_state), wanted)]
        _local.recomputing = True
        try:
            with torch.enable_grad():
                y, final = _scan.liquid_scan(*inputs[:4], initial_state=inputs[4], chunk_size=ctx.chunk_size,
                                             recompute=ctx.recompute)
        finally:
            _local.recomputing = False
        outs, grads_out = [], []
        for out, g in ((y, grad_y), (final, grad_state)):
            if g is not None and out.requires_grad:
                outs.append(out)
                grads_out.append(g)
        diff = [t for t, need in zip(inputs, wanted) if t is not None and need]
        grads = torch.autograd.grad(outs, diff, grads_out, allow_unused=True) if outs and diff else []
        it = iter(grads)
        result = [next(it) if (t is not None and need) else None for t, need in zip(inputs, wanted)]
        return (*result, None, None)


def liquid_scan_triton(q, k, v, log_decay, *, initial_state=None, chunk_size=_scan.DEFAULT_CHUNK_SIZE,
                       recompute=False):
    """`liquid_scan` with the forward in Triton (see the module docstring); same shapes and results."""
    if triton is None:
        raise RuntimeError("liquid_scan_triton needs triton, which is not importable here")
    _scan._check_shapes(q, k, v, log_decay, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _LiquidScanTriton.apply(q, k, v, log_decay, initial_state, chunk_size, recompute)


__all__ = ["liquid_scan_triton", "use_triton", "triton_available"]
