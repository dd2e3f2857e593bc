"""Triton kernels for the chunked liquid scan: forward and backward.

`liquid_scan_triton` has `liquid_scan`'s signature and semantics (see scan.py: shapes, -inf log decays as
exact resets, float32 final state). Inside a chunk every kernel does what `scan._chunk_group` does: resets
become segment ids, pairs in different segments are masked out, and the carried state is dropped after a
reset. No per-chunk matrix or per-chunk state ever reaches memory.

Forward: one program per (batch, head) and block of the value dimension P walks the chunks in order,
keeping the [N, BLOCK_P] state in registers.

Backward (backward="triton", the default): two kernels and a few PyTorch element-wise ops.
  * dq: one program per (batch, head) and block of N walks the chunks forward, recomputing the carried
    state as the forward does (states are not stored): dq = (dy v^T * D) k + from_start * (dy S^T).
  * dk, dv, d initial_state: one program per (batch, head) walks the chunks in reverse carrying dS (the
    gradient w.r.t. the state at the chunk's end, from the final state's gradient):
    dk = (dy v^T * D)^T q + to_end * (v dS^T), dv = (q k^T * D)^T dy + to_end * (k dS),
    then dS <- chunk_decay dS + (q * from_start)^T dy; after the first chunk dS is d initial_state.
  * d log_decay from the identity dL/db_t = q_t.dq_t - k_t.dk_t (+ <dS_T, S_T> at the last position), b the
    cumulative log decay with resets zeroed; d log_decay = reverse cumsum of that, zero at resets.
backward="recompute" instead recomputes the forward with the PyTorch chunked path (`scan.liquid_scan`,
forced onto the PyTorch implementation while recomputing) and differentiates it; kept for side-by-side
comparison (one extra PyTorch forward and that path's memory for the layer being differentiated).

Checked against the token-by-token reference under TRITON_INTERPRET=1 on the CPU (the tests) and on an
H200 (Triton 3.6): the CUDA test passed for fp32 within 1e-5 and bf16 within one bf16 rounding, both
backwards, with every dot in exact float32. Since then the dots run in TF32 for 16-bit inputs
(`_precision`), because in exact float32 this path was slower than the PyTorch one on the H200 (8.6 ms
against 5.9 ms at batch 8, seq 2048, 8 heads). The benchmark ran the TF32 form at the preset's shapes
(README, "GPU results"); the CUDA test has not yet run against it.

Form: the kernels above are the "sequential" form, the default. `form="parallel"` (or env
LIQUID_SCAN_TRITON_FORM=parallel) runs scan_triton_parallel.py instead: chunks in parallel, only the
state hand-over between chunks in order (written for the H200's finding that 16-32 programs leave most of
its 132 SMs idle; not yet run on a GPU).

Dispatch: `use_triton(q)` says whether `scan.liquid_scan` should route here: CUDA tensors, triton
importable, not inside this module's own recomputation, and env LIQUID_SCAN_TRITON not "0" (the default
is on; LIQUID_SCAN_TRITON=0 opts out). On the CPU the kernels run only under TRITON_INTERPRET=1 (the tests
call `liquid_scan_triton` directly that way).
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
    """Whether `liquid_scan` should run the Triton kernels for these inputs: on CUDA with triton
    importable, unless LIQUID_SCAN_TRITON=0 opts out, and never from inside backward="recompute"'s own
    PyTorch recomputation."""
    return (q.is_cuda and triton is not None and os.environ.get("LIQUID_SCAN_TRITON", "1") != "0"
            and not getattr(_local, "recomputing", False))


if triton is not None:

    @triton.jit
    def _load_rows(base, t, offs, stride_t, stride_d, mask_t, mask_d):
        """A [len(t), len(offs)] tile of a [seq, dim] slice (row strides stride_t, column stride_d) as float32,
        zero outside mask_t x mask_d."""
        return tl.load(base + t[:, None] * stride_t + offs[None, :] * stride_d,
                       mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _chunk_decays(ld, causal):
        """A chunk's decays from its log decays `ld` [CHUNK] (-inf = reset), as `scan._chunk_group` makes
        them: resets become segment ids, pairs in different segments are masked out and the carried state is
        dropped after a reset. Returns the pair decays D [CHUNK, CHUNK] (exp(cum_t - cum_s) for s <= t in
        one segment, else 0; the where keeps exp's overflowing upper triangle out), from_start [CHUNK]
        (decay from the chunk start to t, 0 after a reset), to_end [CHUNK] (decay from t to the chunk end,
        0 before the last reset) and chunk_decay (the whole chunk's, 0 if it holds a reset)."""
        reset = ld == float("-inf")
        ld = tl.where(reset, 0.0, ld)
        cum = tl.cumsum(ld, axis=0)  # log decay from the chunk start to t, inclusive; finite
        seg = tl.cumsum(reset.to(tl.int32), axis=0)  # resets up to and including t
        total = tl.sum(ld, axis=0)
        last_seg = tl.sum(reset.to(tl.int32), axis=0)
        pair_ok = causal & (seg[:, None] == seg[None, :])
        decay = tl.where(pair_ok, tl.exp(cum[:, None] - cum[None, :]), 0.0)
        from_start = tl.where(seg == 0, tl.exp(cum), 0.0)
        to_end = tl.where(seg == last_seg, tl.exp(total - cum), 0.0)
        chunk_decay = tl.where(last_seg == 0, tl.exp(total), 0.0)
        return decay, from_start, to_end, chunk_decay


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
            qc = _load_rows(q_base, t, offs_n, sq_t, sq_n, mask_t, mask_n)
            kc = _load_rows(k_base, t, offs_n, sk_t, sk_n, mask_t, mask_n)
            vc = _load_rows(v_base, t, offs_p, sv_t, sv_p, mask_t, mask_p)
            # Padding: log decay 0 and k = 0, so the state is unaffected by it.
            ld = tl.load(l_base + t * sl_t, mask=mask_t, other=0.0).to(tl.float32)

            decay, from_start, to_end, chunk_decay = _chunk_decays(ld, causal)

            # Intra-chunk: (q k^T * decay) v, decay masked to s <= t in the same segment.
            scores = tl.dot(qc, tl.trans(kc), input_precision=PRECISION) * decay
            y = tl.dot(scores, vc, input_precision=PRECISION)

            # Carried state, decayed from the chunk start up to t (dropped after a reset in the chunk).
            y += tl.dot(qc * from_start[:, None], state, input_precision=PRECISION)
            tl.store(y_base + t[:, None] * sy_t + offs_p[None, :] * sy_p, y.to(Y.dtype.element_ty),
                     mask=mask_t[:, None] & mask_p[None, :])

            # State at the chunk end: decayed carried state plus this chunk's own contribution.
            state = chunk_decay * state + tl.dot(tl.trans(kc * to_end[:, None]), vc, input_precision=PRECISION)

        tl.store(SF + s_ptrs, state, mask=s_mask)

    @triton.jit
    def _liquid_scan_bwd_dq_kernel(
        K, V, LD, S0, DY, DQ,
        seq, heads, n_dim, p_dim,
        sk_b, sk_t, sk_h, sk_n,
        sv_b, sv_t, sv_h, sv_p,
        sl_b, sl_t, sl_h,
        sd_b, sd_t, sd_h, sd_p,
        so_b, so_t, so_h, so_n,
        HAS_S0: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """dQ (float32), walking the chunks forward and recomputing the carried state as the forward kernel
        does: dq = (dy v^T * decay) k + from_start * (dy S^T). One program per (batch, head) and block of N
        (state rows are independent); the whole P in one block (dq sums over it)."""
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        b = pid_bh // heads
        h = pid_bh % heads

        offs_t = tl.arange(0, CHUNK)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_p = tl.arange(0, BLOCK_P)
        mask_n = offs_n < n_dim
        mask_p = offs_p < p_dim

        s_ptrs = (b * heads + h) * n_dim * p_dim + offs_n[:, None] * p_dim + offs_p[None, :]
        if HAS_S0:
            state = tl.load(S0 + s_ptrs, mask=mask_n[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
        else:
            state = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)

        causal = offs_t[:, None] >= offs_t[None, :]
        k_base = K + b * sk_b + h * sk_h
        v_base = V + b * sv_b + h * sv_h
        l_base = LD + b * sl_b + h * sl_h
        d_base = DY + b * sd_b + h * sd_h
        o_base = DQ + b * so_b + h * so_h

        for start in range(0, seq, CHUNK):
            t = start + offs_t
            mask_t = t < seq
            kc = _load_rows(k_base, t, offs_n, sk_t, sk_n, mask_t, mask_n)
            vc = _load_rows(v_base, t, offs_p, sv_t, sv_p, mask_t, mask_p)
            dyc = _load_rows(d_base, t, offs_p, sd_t, sd_p, mask_t, mask_p)
            ld = tl.load(l_base + t * sl_t, mask=mask_t, other=0.0).to(tl.float32)

            decay, from_start, to_end, chunk_decay = _chunk_decays(ld, causal)

            # dY V^T * decay: [t, s]
            a = tl.dot(dyc, tl.trans(vc), input_precision=PRECISION) * decay
            dq = tl.dot(a, kc, input_precision=PRECISION)
            dq += from_start[:, None] * tl.dot(dyc, tl.trans(state), input_precision=PRECISION)
            tl.store(o_base + t[:, None] * so_t + offs_n[None, :] * so_n, dq,
                     mask=mask_t[:, None] & mask_n[None, :])

            state = chunk_decay * state + tl.dot(tl.trans(kc * to_end[:, None]), vc, input_precision=PRECISION)

    @triton.jit
    def _liquid_scan_bwd_dkv_kernel(
        Q, K, V, LD, DY, DSF, DK, DV, DS0,
        seq, heads, n_dim, p_dim,
        sq_b, sq_t, sq_h, sq_n,
        sk_b, sk_t, sk_h, sk_n,
        sv_b, sv_t, sv_h, sv_p,
        sl_b, sl_t, sl_h,
        sd_b, sd_t, sd_h, sd_p,
        sdk_b, sdk_t, sdk_h, sdk_n,
        sdv_b, sdv_t, sdv_h, sdv_p,
        STORE_DK: tl.constexpr, STORE_DV: tl.constexpr, STORE_DS0: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """dK (float32), dV (in DV's dtype) and d(initial state), walking the chunks in reverse and carrying
        dS, the gradient w.r.t. the state at the current chunk's end (starting from the final state's
        gradient). Per chunk: dk = (dy v^T * decay)^T q + to_end * (v dS^T);
        dv = (q k^T * decay)^T dy + to_end * (k dS); then dS <- chunk_decay dS + (q * from_start)^T dy.
        One program per (batch, head), whole N and P."""
        pid_bh = tl.program_id(0)
        b = pid_bh // heads
        h = pid_bh % heads

        offs_t = tl.arange(0, CHUNK)
        offs_n = tl.arange(0, BLOCK_N)
        offs_p = tl.arange(0, BLOCK_P)
        mask_n = offs_n < n_dim
        mask_p = offs_p < p_dim

        s_ptrs = (b * heads + h) * n_dim * p_dim + offs_n[:, None] * p_dim + offs_p[None, :]
        s_mask = mask_n[:, None] & mask_p[None, :]
        ds = tl.load(DSF + s_ptrs, mask=s_mask, other=0.0).to(tl.float32)

        causal = offs_t[:, None] >= offs_t[None, :]
        q_base = Q + b * sq_b + h * sq_h
        k_base = K + b * sk_b + h * sk_h
        v_base = V + b * sv_b + h * sv_h
        l_base = LD + b * sl_b + h * sl_h
        d_base = DY + b * sd_b + h * sd_h
        dk_base = DK + b * sdk_b + h * sdk_h
        dv_base = DV + b * sdv_b + h * sdv_h

        n_chunks = tl.cdiv(seq, CHUNK)
        for i in range(0, n_chunks):
            t = (n_chunks - 1 - i) * CHUNK + offs_t
            mask_t = t < seq
            mask_tn = mask_t[:, None] & mask_n[None, :]
            mask_tp = mask_t[:, None] & mask_p[None, :]
            qc = _load_rows(q_base, t, offs_n, sq_t, sq_n, mask_t, mask_n)
            dyc = _load_rows(d_base, t, offs_p, sd_t, sd_p, mask_t, mask_p)
            ld = tl.load(l_base + t * sl_t, mask=mask_t, other=0.0).to(tl.float32)

            decay, from_start, to_end, chunk_decay = _chunk_decays(ld, causal)

            if STORE_DK or STORE_DV:
                kc = _load_rows(k_base, t, offs_n, sk_t, sk_n, mask_t, mask_n)
                vc = _load_rows(v_base, t, offs_p, sv_t, sv_p, mask_t, mask_p)
                if STORE_DK:
                    a = tl.dot(dyc, tl.trans(vc), input_precision=PRECISION) * decay  # [t, s]
                    dk = tl.dot(tl.trans(a), qc, input_precision=PRECISION)
                    dk += to_end[:, None] * tl.dot(vc, tl.trans(ds), input_precision=PRECISION)
                    tl.store(dk_base + t[:, None] * sdk_t + offs_n[None, :] * sdk_n, dk, mask=mask_tn)
                if STORE_DV:
                    s = tl.dot(qc, tl.trans(kc), input_precision=PRECISION) * decay  # [t, s]
                    dv = tl.dot(tl.trans(s), dyc, input_precision=PRECISION)
                    dv += to_end[:, None] * tl.dot(kc, ds, input_precision=PRECISION)
                    tl.store(dv_base + t[:, None] * sdv_t + offs_p[None, :] * sdv_p, dv.to(DV.dtype.element_ty),
                             mask=mask_tp)

            ds = chunk_decay * ds + tl.dot(tl.trans(qc * from_start[:, None]), dyc, input_precision=PRECISION)

        if STORE_DS0:
            tl.store(DS0 + s_ptrs, ds, mask=s_mask)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _chunk_len(chunk_size: int, seq: int) -> int:
    # tl.dot wants every dimension >= 16 and a power of two; the chunk length is an implementation
    # detail (results do not depend on it beyond rounding), so it is rounded into [16, 64].
    return min(64, max(16, _next_pow2(min(chunk_size, seq))))


def _precision(q) -> str:
    """The kernels' dot precision: TF32 on CUDA when q is 16-bit (what training feeds under bf16 autocast:
    the inputs' 8-bit mantissas are exact in TF32's 10 bits, only the float32 intermediates, decayed scores
    and the state, are rounded to TF32, finer than the bf16 the PyTorch path's autocast matmuls round them
    to) or when torch allows TF32 matmuls; exact float32 ("ieee") otherwise, which on an H200 is several
    times slower (module docstring)."""
    if q.is_cuda and (q.dtype in (torch.bfloat16, torch.float16) or torch.backends.cuda.matmul.allow_tf32):
        return "tf32"
    return "ieee"


def _forward(q, k, v, log_decay, initial_state, chunk_size):
    batch, seq, heads, n = q.shape
    p = v.shape[-1]
    final = torch.empty(batch, heads, n, p, device=q.device, dtype=torch.float32)
    y = torch.empty(batch, seq, heads, p, device=q.device, dtype=v.dtype)
    if seq == 0:
        final.copy_(initial_state.float() if initial_state is not None else torch.zeros_like(final))
        return y, final
    chunk = _chunk_len(chunk_size, seq)
    block_n = max(16, _next_pow2(n))
    block_p = min(64, max(16, _next_pow2(p)))
    s0 = initial_state.float().contiguous() if initial_state is not None else final  # unused if absent
    grid = (batch * heads, triton.cdiv(p, block_p))
    _liquid_scan_fwd_kernel[grid](
        q, k, v, log_decay, s0, y, final,
        seq, heads, n, p,
        *q.stride(), *k.stride(), *v.stride(), *log_decay.stride(), *y.stride(),
        HAS_S0=initial_state is not None, CHUNK=chunk, BLOCK_N=block_n, BLOCK_P=block_p,
        PRECISION=_precision(q),
        num_warps=4,
    )
    return y, final


# Backward launch settings. Its programs hold an [N, P] float32 state (or its gradient) and [chunk, P] tiles;
# at N 64, P 128, chunk 64 the default 3 pipeline stages need more shared memory than an H100/H200 has
# (float32 dot operands), so the loads are not pipelined. The backward's chunk length is capped separately
# (results do not depend on it beyond rounding). Chosen from one H200 measurement (B 8, T 2048, H 8, N 64,
# P 128, bf16 inputs, forward + backward): with TF32 all of chunk 32/64 x 4/8 warps were within 8% (8 warps,
# chunk 32 best); with "ieee" float32 dots (TF32 off) chunk 32 with 4 warps took 8.7 ms against 22-59 ms for
# the others (register spills).
BWD_NUM_WARPS = {"tf32": 8, "ieee": 4}
BWD_NUM_STAGES = 1
BWD_CHUNK_MAX = 32


def _backward(q, k, v, log_decay, initial_state, final, grad_y, grad_state, chunk_size, needs):
    """Gradients of (y, final state) w.r.t. (q, k, v, log_decay, initial_state) with the Triton kernels;
    None for inputs `needs` does not ask for. grad_y / grad_state None count as zeros."""
    need_q, need_k, need_v, need_ld, need_s0 = needs
    need_s0 = need_s0 and initial_state is not None
    batch, seq, heads, n = q.shape
    p = v.shape[-1]
    dev = q.device
    g_state = (grad_state.float().contiguous() if grad_state is not None
               else torch.zeros(batch, heads, n, p, device=dev, dtype=torch.float32))
    if seq == 0:
        empty = [torch.zeros_like(x) for x in (q, k, v, log_decay)]
        d_s0 = g_state.to(initial_state.dtype) if need_s0 else None
        return [e if need else None for e, need in zip(empty, needs[:4])] + [d_s0]
    if grad_y is None:  # zeros without memory: stride 0 everywhere
        grad_y = torch.zeros((), device=dev, dtype=torch.float32).expand(batch, seq, heads, p)

    chunk = max(16, min(BWD_CHUNK_MAX, _chunk_len(chunk_size, seq)))
    block_n = max(16, _next_pow2(n))
    block_p = max(16, _next_pow2(p))
    precision = _precision(q)
    dq32 = dk32 = dv = d_s0 = None

    if need_q or need_ld:
        dq32 = torch.empty(batch, seq, heads, n, device=dev, dtype=torch.float32)
        s0 = initial_state.float().contiguous() if initial_state is not None else g_state  # unused if absent
        _liquid_scan_bwd_dq_kernel[(batch * heads, triton.cdiv(n, block_n))](
            k, v, log_decay, s0, grad_y, dq32,
            seq, heads, n, p,
            *k.stride(), *v.stride(), *log_decay.stride(), *grad_y.stride(), *dq32.stride(),
            HAS_S0=initial_state is not None, CHUNK=chunk, BLOCK_N=block_n, BLOCK_P=block_p,
            PRECISION=precision,
            num_warps=BWD_NUM_WARPS[precision], num_stages=BWD_NUM_STAGES,
        )
    store_dk = need_k or need_ld
    if store_dk or need_v or need_s0:
        dk32 = torch.empty(batch, seq, heads, n, device=dev, dtype=torch.float32) if store_dk else None
        dv = torch.empty(batch, seq, heads, p, device=dev, dtype=v.dtype) if need_v else None
        d_s0 = torch.empty(batch, heads, n, p, device=dev, dtype=torch.float32) if need_s0 else None
        dk_arg = dk32 if dk32 is not None else g_state  # placeholders are never written
        dv_arg = dv if dv is not None else g_state
        _liquid_scan_bwd_dkv_kernel[(batch * heads,)](
            q, k, v, log_decay, grad_y, g_state, dk_arg, dv_arg, d_s0 if d_s0 is not None else g_state,
            seq, heads, n, p,
            *q.stride(), *k.stride(), *v.stride(), *log_decay.stride(), *grad_y.stride(),
            *(dk32.stride() if dk32 is not None else (0, 0, 0, 0)),
            *(dv.stride() if dv is not None else (0, 0, 0, 0)),
            STORE_DK=store_dk, STORE_DV=need_v, STORE_DS0=need_s0,
            CHUNK=chunk, BLOCK_N=block_n, BLOCK_P=block_p, PRECISION=precision,
            num_warps=BWD_NUM_WARPS[precision], num_stages=BWD_NUM_STAGES,
        )

    d_ld = _dlog_decay(q, k, dq32, dk32, g_state, final, log_decay) if need_ld else None
    return [dq32.to(q.dtype) if need_q else None, dk32.to(k.dtype) if need_k else None, dv, d_ld,
            d_s0.to(initial_state.dtype) if need_s0 else None]


def _dlog_decay(q, k, dq32, dk32, g_state, final, log_decay):
    """d log_decay from the float32 dq and dk. The loss depends on log_decay only through b_t = cumsum of
    log_decay with resets zeroed: via exp(b_t - b_s) within a segment, exp(b_t) on the initial state in the
    first segment and exp(b_T) in the final state. So dL/db_t = q_t.dq_t - k_t.dk_t (+ <dS_T, S_T> at the
    last position) and d log_decay_j = sum over t >= j of dL/db_t; a reset has zero gradient (its decay
    exp(-inf) is 0)."""
    g = (q.float() * dq32).sum(-1) - (k.float() * dk32).sum(-1)  # [batch, seq, heads]
    g[:, -1] += (g_state * final).sum((-2, -1))
    # The reverse cumsum runs along the last dimension: along dim 1 of [batch, seq, heads] torch's CUDA scan
    # took 5.6 ms of the 21 ms forward + backward at seq 32768, 16 heads on an H200 (few, long, strided
    # columns).
    g = g.transpose(1, 2).contiguous()  # [batch, heads, seq]
    d_ld = g.flip(-1).cumsum(-1).flip(-1).transpose(1, 2)
    return d_ld.masked_fill(torch.isneginf(log_decay), 0.0).to(log_decay.dtype)


BACKWARDS = ("triton", "recompute")
# The kernels' form: "sequential" (one program per (batch, head) walks the chunks; this module) or
# "parallel" (chunks in parallel, only the state hand-over in order; scan_triton_parallel.py).
FORMS = ("sequential", "parallel")
FORM_ENV = "LIQUID_SCAN_TRITON_FORM"


def _form_module(form: str):
    if form == "parallel":
        from pretrain.model import scan_triton_parallel

        return scan_triton_parallel
    return None


class _LiquidScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, initial_state, chunk_size, recompute, backward, form):
        parallel = _form_module(form)
        y, final = (parallel.forward if parallel else _forward)(q, k, v, log_decay, initial_state, chunk_size)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not a zero tensor
        keep_final = backward == "triton" and ctx.needs_input_grad[3]  # for the log-decay gradient
        ctx.save_for_backward(q, k, v, log_decay, initial_state, final if keep_final else None)
        ctx.chunk_size, ctx.recompute, ctx.backward_impl, ctx.form = chunk_size, recompute, backward, form
        return y, final

    @staticmethod
    def backward(ctx, grad_y, grad_state):
        q, k, v, log_decay, initial_state, final = ctx.saved_tensors
        wanted = ctx.needs_input_grad[:5]
        if ctx.backward_impl == "triton":
            parallel = _form_module(ctx.form)
            grads = (parallel.backward if parallel else _backward)(q, k, v, log_decay, initial_state, final, grad_y,
                                                                  grad_state, ctx.chunk_size, wanted)
            return (*grads, None, None, None, None)
        return (*_recompute_backward(ctx, q, k, v, log_decay, initial_state, grad_y, grad_state, wanted),
                None, None, None, None)


def _recompute_backward(ctx, q, k, v, log_decay, initial_state, grad_y, grad_state, wanted):
    """Gradients by recomputing the forward with the PyTorch path (`scan.liquid_scan`, kept off this
    module while recomputing) and differentiating it."""
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
    grads = torch.autograd.grad(outs, diff, grads_out, allow_unused=True) if outs and diff else [None] * len(diff)
    it = iter(grads)
    result = [next(it) if (t is not None and need) else None for t, need in zip(inputs, wanted)]
    return [torch.zeros_like(t) if g is None and t is not None and need else g
            for g, t, need in zip(result, inputs, wanted)]


def liquid_scan_triton(q, k, v, log_decay, *, initial_state=None, chunk_size=_scan.DEFAULT_CHUNK_SIZE,
                       recompute=False, backward="triton", form=None):
    """`liquid_scan` in Triton (see the module docstring); same shapes and results. backward="triton" (the
    default) differentiates with the Triton backward kernels; backward="recompute" by recomputing the
    forward with the PyTorch path (kept for side-by-side comparison). `recompute` only matters to the
    latter (it is passed on to the PyTorch recomputation); the Triton backward stores nothing per chunk.
    form: "sequential" or "parallel" (FORMS; None: env LIQUID_SCAN_TRITON_FORM, else "sequential")."""
    if triton is None:
        raise RuntimeError("liquid_scan_triton needs triton, which is not importable here")
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    form = form if form is not None else os.environ.get(FORM_ENV, "sequential")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS} (or env {FORM_ENV}), got {form!r}")
    _scan._check_shapes(q, k, v, log_decay, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _LiquidScanTriton.apply(q, k, v, log_decay, initial_state, chunk_size, recompute, backward, form)


__all__ = ["liquid_scan_triton", "use_triton", "triton_available"]
