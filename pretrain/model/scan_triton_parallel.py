"""The Triton liquid scan in its chunk-parallel form: `liquid_scan_triton(..., form="parallel")`.

The sequential form (scan_triton.py) runs one program per (batch, head) that walks every chunk in order.
On an H200 at batch 1 with 16 heads that is 16-32 programs on 132 SMs, each taking 512 dependent chunk
steps at 32768 tokens, and the scan reached 1% of the memory bandwidth (README, "GPU results"). Here
only the [N, P] state hand-over between chunks is sequential:

  forward   1. per chunk, in parallel: its own contribution to the state at its end,
               U_c = (k * to_end)^T v, and its total decay;
            2. per (batch, head, state tile), in order over the chunks: S_c (the state entering chunk c)
               = decay_{c-1} S_{c-1} + U_{c-1}, written over U in place; the last one is the final state;
            3. per chunk, in parallel: y = (q k^T * D) v + (q * from_start) S_c.
  backward  steps 1-2 again for S_c, then
            4. per chunk, in parallel: W_c = (q * from_start)^T dy;
            5. in reverse order over the chunks: dS_c (the gradient at chunk c's end) = decay_{c+1} dS_{c+1}
               + W_{c+1}, from the final state's gradient; past the first chunk it is d(initial state);
            6. per chunk, in parallel: dq = (dy v^T * D) k + from_start * (dy S_c^T),
               dk = (dy v^T * D)^T q + to_end * (v dS_c^T), dv = (q k^T * D)^T dy + to_end * (k dS_c);
            d log_decay from dq and dk by scan_triton's identity.
The chunk matrices D, from_start, to_end and the decays are scan_triton's `_chunk_decays`. The states of
step 2 and 5 live in two float32 buffers of [batch * heads, chunks, N, P] for the call (each 16 MiB per
(batch, head) per 32768 tokens at N 64, P 128, chunk 64).

Checked against the token-by-token reference under TRITON_INTERPRET=1 and compiled for sm_90 on the CPU;
not yet run or timed on a GPU, so the sequential form stays the default (LIQUID_SCAN_TRITON_FORM=parallel
selects this one; `liquid bench gpu` measures both).
"""
from __future__ import annotations

import torch

from pretrain.model import scan_triton as _st

triton, tl = _st.triton, _st.tl

CHUNK_MAX = 64  # chunk length of this form (forward and backward)
NUM_WARPS, GRAD_NUM_WARPS, GRAD_NUM_STAGES = 4, 8, 1  # the gradient kernel holds [N, P] float32 tiles
PASS_BLOCK = 32  # state tile of the sequential passes: more, smaller tiles keep more of them in flight

if triton is not None:
    _chunk_decays = _st._chunk_decays
    _load_rows = _st._load_rows

    @triton.jit
    def _chunk_contribution_kernel(
        A, B, LD, OUT, DEC,
        seq, heads, a_dim, b_dim, n_chunks,
        sa_b, sa_t, sa_h, sa_d,
        sb_b, sb_t, sb_h, sb_d,
        sl_b, sl_t, sl_h,
        AT_END: tl.constexpr, CHUNK: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """OUT[bh, c] = (a * w)^T b over chunk c ([a_dim, b_dim] float32), w = to_end (AT_END: the chunk's
        own contribution to the state at its end, a = k, b = v) or from_start (a = q, b = dy: the
        chunk's contribution to the gradient of the state entering it); DEC[bh, c] = the chunk's decay.
        Grid (batch * heads, chunks, b_dim blocks); the whole a_dim in one block."""
        pid_bh = tl.program_id(0)
        c = tl.program_id(1)
        pid_b = tl.program_id(2)
        b = pid_bh // heads
        h = pid_bh % heads
        offs_t = tl.arange(0, CHUNK)
        offs_a = tl.arange(0, BLOCK_A)
        offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        mask_a = offs_a < a_dim
        mask_b = offs_b < b_dim
        t = c * CHUNK + offs_t
        mask_t = t < seq
        ac = _load_rows(A + b * sa_b + h * sa_h, t, offs_a, sa_t, sa_d, mask_t, mask_a)
        bc = _load_rows(B + b * sb_b + h * sb_h, t, offs_b, sb_t, sb_d, mask_t, mask_b)
        ld = tl.load(LD + b * sl_b + h * sl_h + t * sl_t, mask=mask_t, other=0.0).to(tl.float32)
        causal = offs_t[:, None] >= offs_t[None, :]
        decay, from_start, to_end, chunk_decay = _chunk_decays(ld, causal)
        if AT_END:
            w = to_end
        else:
            w = from_start
        out = tl.dot(tl.trans(ac * w[:, None]), bc, input_precision=PRECISION)
        row = (pid_bh * n_chunks + c).to(tl.int64) * a_dim * b_dim
        tl.store(OUT + row + offs_a[:, None] * b_dim + offs_b[None, :], out,
                 mask=mask_a[:, None] & mask_b[None, :])
        if pid_b == 0:
            tl.store(DEC + pid_bh * n_chunks + c, chunk_decay)

    @triton.jit
    def _state_pass_kernel(
        U, DEC, S_IN, S_OUT,
        n_chunks, n_dim, p_dim,
        HAS_IN: tl.constexpr, REVERSE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """In place over U [batch * heads, chunks, N, P]: walks the chunks (last first with REVERSE),
        replacing each entry u_c by the carry entering it, then carry <- DEC[c] * carry + u_c; the carry
        starts at S_IN (zeros without HAS_IN) and ends in S_OUT. Grid (batch * heads, N tiles, P tiles)."""
        pid_bh = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = (offs_n < n_dim)[:, None] & (offs_p < p_dim)[None, :]
        tile = offs_n[:, None] * p_dim + offs_p[None, :]
        one = pid_bh.to(tl.int64) * n_dim * p_dim
        if HAS_IN:
            carry = tl.load(S_IN + one + tile, mask=mask, other=0.0).to(tl.float32)
        else:
            carry = tl.zeros([BLOCK_N, BLOCK_P], dtype=tl.float32)
        base = U + one * n_chunks
        for i in range(0, n_chunks):
            if REVERSE:
                c = n_chunks - 1 - i
            else:
                c = i
            ptrs = base + c * n_dim * p_dim + tile
            u = tl.load(ptrs, mask=mask, other=0.0)
            tl.store(ptrs, carry, mask=mask)
            carry = tl.load(DEC + pid_bh * n_chunks + c) * carry + u
        tl.store(S_OUT + one + tile, carry, mask=mask)

    @triton.jit
    def _chunk_output_kernel(
        Q, K, V, LD, SC, Y,
        seq, heads, n_dim, p_dim, n_chunks,
        sq_b, sq_t, sq_h, sq_n,
        sk_b, sk_t, sk_h, sk_n,
        sv_b, sv_t, sv_h, sv_p,
        sl_b, sl_t, sl_h,
        sy_b, sy_t, sy_h, sy_p,
        CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """y over chunk c = (q k^T * D) v + (q * from_start) S_c. Grid (batch * heads, chunks, P blocks)."""
        pid_bh = tl.program_id(0)
        c = tl.program_id(1)
        pid_p = tl.program_id(2)
        b = pid_bh // heads
        h = pid_bh % heads
        offs_t = tl.arange(0, CHUNK)
        offs_n = tl.arange(0, BLOCK_N)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_n = offs_n < n_dim
        mask_p = offs_p < p_dim
        t = c * CHUNK + offs_t
        mask_t = t < seq
        mask_tn = mask_t[:, None] & mask_n[None, :]
        mask_tp = mask_t[:, None] & mask_p[None, :]
        qc = _load_rows(Q + b * sq_b + h * sq_h, t, offs_n, sq_t, sq_n, mask_t, mask_n)
        kc = _load_rows(K + b * sk_b + h * sk_h, t, offs_n, sk_t, sk_n, mask_t, mask_n)
        vc = _load_rows(V + b * sv_b + h * sv_h, t, offs_p, sv_t, sv_p, mask_t, mask_p)
        ld = tl.load(LD + b * sl_b + h * sl_h + t * sl_t, mask=mask_t, other=0.0).to(tl.float32)
        row = (pid_bh * n_chunks + c).to(tl.int64) * n_dim * p_dim
        s_c = tl.load(SC + row + offs_n[:, None] * p_dim + offs_p[None, :], mask=mask_n[:, None] & mask_p[None, :],
                      other=0.0)
        causal = offs_t[:, None] >= offs_t[None, :]
        decay, from_start, to_end, chunk_decay = _chunk_decays(ld, causal)
        scores = tl.dot(qc, tl.trans(kc), input_precision=PRECISION) * decay
        y = tl.dot(scores, vc, input_precision=PRECISION)
        y += tl.dot(qc * from_start[:, None], s_c, input_precision=PRECISION)
        tl.store(Y + b * sy_b + h * sy_h + t[:, None] * sy_t + offs_p[None, :] * sy_p, y.to(Y.dtype.element_ty),
                 mask=mask_tp)

    @triton.jit
    def _chunk_grad_kernel(
        Q, K, V, LD, DY, SC, DSE, DQ, DK, DV,
        seq, heads, n_dim, p_dim, n_chunks,
        sq_b, sq_t, sq_h, sq_n,
        sk_b, sk_t, sk_h, sk_n,
        sv_b, sv_t, sv_h, sv_p,
        sl_b, sl_t, sl_h,
        sd_b, sd_t, sd_h, sd_p,
        sdq_b, sdq_t, sdq_h, sdq_n,
        sdk_b, sdk_t, sdk_h, sdk_n,
        sdv_b, sdv_t, sdv_h, sdv_p,
        STORE_DQ: tl.constexpr, STORE_DK: tl.constexpr, STORE_DV: tl.constexpr,
        CHUNK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """dq, dk (float32) and dv (DV's dtype) over chunk c from S_c (SC) and dS_c, the gradient at the
        chunk's end (DSE): dq = (dy v^T * D) k + from_start * (dy S_c^T), dk = (dy v^T * D)^T q +
        to_end * (v dS_c^T), dv = (q k^T * D)^T dy + to_end * (k dS_c). Grid (batch * heads, chunks);
        the whole N and P in one program (dq and dk sum over P, dv over N)."""
        pid_bh = tl.program_id(0)
        c = tl.program_id(1)
        b = pid_bh // heads
        h = pid_bh % heads
        offs_t = tl.arange(0, CHUNK)
        offs_n = tl.arange(0, BLOCK_N)
        offs_p = tl.arange(0, BLOCK_P)
        mask_n = offs_n < n_dim
        mask_p = offs_p < p_dim
        t = c * CHUNK + offs_t
        mask_t = t < seq
        mask_tn = mask_t[:, None] & mask_n[None, :]
        mask_tp = mask_t[:, None] & mask_p[None, :]
        qc = _load_rows(Q + b * sq_b + h * sq_h, t, offs_n, sq_t, sq_n, mask_t, mask_n)
        kc = _load_rows(K + b * sk_b + h * sk_h, t, offs_n, sk_t, sk_n, mask_t, mask_n)
        vc = _load_rows(V + b * sv_b + h * sv_h, t, offs_p, sv_t, sv_p, mask_t, mask_p)
        dyc = _load_rows(DY + b * sd_b + h * sd_h, t, offs_p, sd_t, sd_p, mask_t, mask_p)
        ld = tl.load(LD + b * sl_b + h * sl_h + t * sl_t, mask=mask_t, other=0.0).to(tl.float32)
        causal = offs_t[:, None] >= offs_t[None, :]
        decay, from_start, to_end, chunk_decay = _chunk_decays(ld, causal)
        row = (pid_bh * n_chunks + c).to(tl.int64) * n_dim * p_dim
        tile = offs_n[:, None] * p_dim + offs_p[None, :]
        s_mask = mask_n[:, None] & mask_p[None, :]
        a = tl.dot(dyc, tl.trans(vc), input_precision=PRECISION) * decay  # [t, s]
        if STORE_DQ:
            s_c = tl.load(SC + row + tile, mask=s_mask, other=0.0)
            dq = tl.dot(a, kc, input_precision=PRECISION)
            dq += from_start[:, None] * tl.dot(dyc, tl.trans(s_c), input_precision=PRECISION)
            tl.store(DQ + b * sdq_b + h * sdq_h + t[:, None] * sdq_t + offs_n[None, :] * sdq_n, dq, mask=mask_tn)
        if STORE_DK or STORE_DV:
            ds = tl.load(DSE + row + tile, mask=s_mask, other=0.0)
            if STORE_DK:
                dk = tl.dot(tl.trans(a), qc, input_precision=PRECISION)
                dk += to_end[:, None] * tl.dot(vc, tl.trans(ds), input_precision=PRECISION)
                tl.store(DK + b * sdk_b + h * sdk_h + t[:, None] * sdk_t + offs_n[None, :] * sdk_n, dk,
                         mask=mask_tn)
            if STORE_DV:
                s = tl.dot(qc, tl.trans(kc), input_precision=PRECISION) * decay  # [t, s]
                dv = tl.dot(tl.trans(s), dyc, input_precision=PRECISION)
                dv += to_end[:, None] * tl.dot(kc, ds, input_precision=PRECISION)
                tl.store(DV + b * sdv_b + h * sdv_h + t[:, None] * sdv_t + offs_p[None, :] * sdv_p,
                         dv.to(DV.dtype.element_ty), mask=mask_tp)


def _shape(q, v, chunk_size):
    batch, seq, heads, n = q.shape
    p = v.shape[-1]
    chunk = min(CHUNK_MAX, _st._chunk_len(chunk_size, seq))
    return batch, seq, heads, n, p, chunk, triton.cdiv(seq, chunk)


def _pass(u, dec, s_in, s_out, *, reverse: bool):
    """The sequential hand-over over the chunks of u (in place; _state_pass_kernel)."""
    bh, n_chunks, n, p = u.shape
    block_n = min(PASS_BLOCK, max(16, _st._next_pow2(n)))
    block_p = min(PASS_BLOCK, max(16, _st._next_pow2(p)))
    _state_pass_kernel[(bh, triton.cdiv(n, block_n), triton.cdiv(p, block_p))](
        u, dec, s_in if s_in is not None else s_out, s_out, n_chunks, n, p,
        HAS_IN=s_in is not None, REVERSE=reverse, BLOCK_N=block_n, BLOCK_P=block_p, num_warps=NUM_WARPS,
    )


def _contributions(a, b, log_decay, *, at_end: bool, chunk: int, n_chunks: int, precision: str):
    """(out [batch * heads, chunks, a_dim, b_dim] float32, decays [batch * heads, chunks]): each chunk's
    (a * w)^T b (_chunk_contribution_kernel)."""
    batch, seq, heads, a_dim = a.shape
    b_dim = b.shape[-1]
    out = torch.empty(batch * heads, n_chunks, a_dim, b_dim, device=a.device, dtype=torch.float32)
    dec = torch.empty(batch * heads, n_chunks, device=a.device, dtype=torch.float32)
    block_b = min(64, max(16, _st._next_pow2(b_dim)))
    _chunk_contribution_kernel[(batch * heads, n_chunks, triton.cdiv(b_dim, block_b))](
        a, b, log_decay, out, dec,
        seq, heads, a_dim, b_dim, n_chunks,
        *a.stride(), *b.stride(), *log_decay.stride(),
        AT_END=at_end, CHUNK=chunk, BLOCK_A=max(16, _st._next_pow2(a_dim)), BLOCK_B=block_b,
        PRECISION=precision, num_warps=NUM_WARPS,
    )
    return out, dec


def _chunk_states(k, v, log_decay, initial_state, final, *, chunk: int, n_chunks: int, precision: str):
    """[batch * heads, chunks, N, P] float32: the state entering each chunk; writes the final state."""
    states, dec = _contributions(k, v, log_decay, at_end=True, chunk=chunk, n_chunks=n_chunks, precision=precision)
    s0 = initial_state.float().contiguous() if initial_state is not None else None
    _pass(states, dec, s0, final, reverse=False)
    return states


def forward(q, k, v, log_decay, initial_state, chunk_size):
    """(y, final state) of the chunk-parallel form; scan_triton._forward's contract."""
    batch, seq, heads, n, p, chunk, n_chunks = _shape(q, v, chunk_size)
    final = torch.empty(batch, heads, n, p, device=q.device, dtype=torch.float32)
    y = torch.empty(batch, seq, heads, p, device=q.device, dtype=v.dtype)
    if seq == 0:
        final.copy_(initial_state.float() if initial_state is not None else torch.zeros_like(final))
        return y, final
    precision = _st._precision(q)
    states = _chunk_states(k, v, log_decay, initial_state, final, chunk=chunk, n_chunks=n_chunks,
                           precision=precision)
    block_p = min(64, max(16, _st._next_pow2(p)))
    _chunk_output_kernel[(batch * heads, n_chunks, triton.cdiv(p, block_p))](
        q, k, v, log_decay, states, y,
        seq, heads, n, p, n_chunks,
        *q.stride(), *k.stride(), *v.stride(), *log_decay.stride(), *y.stride(),
        CHUNK=chunk, BLOCK_N=max(16, _st._next_pow2(n)), BLOCK_P=block_p, PRECISION=precision,
        num_warps=NUM_WARPS,
    )
    return y, final


def backward(q, k, v, log_decay, initial_state, final, grad_y, grad_state, chunk_size, needs):
    """Gradients of (y, final state) w.r.t. (q, k, v, log_decay, initial_state); scan_triton._backward's
    contract (None where `needs` does not ask; grad_y / grad_state None count as zeros)."""
    need_q, need_k, need_v, need_ld, need_s0 = needs
    need_s0 = need_s0 and initial_state is not None
    batch, seq, heads, n, p, chunk, n_chunks = _shape(q, v, chunk_size)
    dev = q.device
    g_state = (grad_state.float().contiguous() if grad_state is not None
               else torch.zeros(batch, heads, n, p, device=dev, dtype=torch.float32))
    if seq == 0:
        empty = [torch.zeros_like(x) for x in (q, k, v, log_decay)]
        d_s0 = g_state.to(initial_state.dtype) if need_s0 else None
        return [e if need else None for e, need in zip(empty, needs[:4])] + [d_s0]
    if grad_y is None:  # zeros without memory: stride 0 everywhere
        grad_y = torch.zeros((), device=dev, dtype=torch.float32).expand(batch, seq, heads, p)
    precision = _st._precision(q)
    store_dq, store_dk = need_q or need_ld, need_k or need_ld
    states = d_states = d_s0 = None
    if store_dq:
        scratch_final = torch.empty_like(g_state)  # the recomputed final state; `final` is the forward's
        states = _chunk_states(k, v, log_decay, initial_state, scratch_final, chunk=chunk, n_chunks=n_chunks,
                               precision=precision)
    if store_dk or need_v or need_s0:
        d_states, dec = _contributions(q, grad_y, log_decay, at_end=False, chunk=chunk, n_chunks=n_chunks,
                                       precision=precision)
        d_s0 = torch.empty_like(g_state)
        _pass(d_states, dec, g_state, d_s0, reverse=True)
    dq32 = torch.empty(batch, seq, heads, n, device=dev, dtype=torch.float32) if store_dq else None
    dk32 = torch.empty(batch, seq, heads, n, device=dev, dtype=torch.float32) if store_dk else None
    dv = torch.empty(batch, seq, heads, p, device=dev, dtype=v.dtype) if need_v else None
    if store_dq or store_dk or need_v:
        placeholder = g_state  # never read or written where its flag is off
        _chunk_grad_kernel[(batch * heads, n_chunks)](
            q, k, v, log_decay, grad_y,
            states if states is not None else placeholder, d_states if d_states is not None else placeholder,
            dq32 if dq32 is not None else placeholder, dk32 if dk32 is not None else placeholder,
            dv if dv is not None else placeholder,
            seq, heads, n, p, n_chunks,
            *q.stride(), *k.stride(), *v.stride(), *log_decay.stride(), *grad_y.stride(),
            *(dq32.stride() if dq32 is not None else (0, 0, 0, 0)),
            *(dk32.stride() if dk32 is not None else (0, 0, 0, 0)),
            *(dv.stride() if dv is not None else (0, 0, 0, 0)),
            STORE_DQ=store_dq, STORE_DK=store_dk, STORE_DV=need_v,
            CHUNK=chunk, BLOCK_N=max(16, _st._next_pow2(n)), BLOCK_P=max(16, _st._next_pow2(p)),
            PRECISION=precision, num_warps=GRAD_NUM_WARPS, num_stages=GRAD_NUM_STAGES,
        )
    d_ld = _st._dlog_decay(q, k, dq32, dk32, g_state, final, log_decay) if need_ld else None
    return [dq32.to(q.dtype) if need_q else None, dk32.to(k.dtype) if need_k else None, dv, d_ld,
            d_s0.to(initial_state.dtype) if need_s0 else None]


__all__ = ["forward", "backward"]
