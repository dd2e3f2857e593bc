"""The liquid recurrence S_t = exp(log_decay_t) S_{t-1} + k_t v_t^T, y_t = S_t^T q_t.

`liquid_scan` is the parallel form used for training; `liquid_scan_reference` is the token-by-token
ground truth it is tested against. Both share one signature. With matrix states (key_dim N > 1)
liquid_scan is the chunked matmul form below (on the CPU, the same algorithm as one C++ pass per direction,
pretrain/model/scan_cpu.py, where it builds). With N = 1 (one decay per head, a scalar state per value
channel: the element-wise liquid recurrence) it takes `_ElementwiseScan`, a first-order linear
recurrence forward and its adjoint backward, O(T) work without the chunk form's [chunk x chunk] decay
matrices, which cost chunk x channels per token there.

Shapes: q, k [batch, seq, heads, N]; v [batch, seq, heads, P]; log_decay [batch, seq, heads] with
values <= 0 where -inf is an exact reset (the state before that token is dropped);
initial_state [batch, heads, N, P]. Returns (y [batch, seq, heads, P], final_state [batch, heads, N, P]).
Decays are accumulated in float32 and log space; the final state is float32.

Resets are handled as segment boundaries: -inf never enters a cumulative sum (it would turn every later
sum into -inf and their differences into NaN). Instead a per-chunk segment id counts resets, pairs of
tokens in different segments are masked out, and the carried state is dropped after a reset.
"""
from __future__ import annotations

import contextlib
import importlib
import math

import torch
import torch.utils.checkpoint

DEFAULT_CHUNK_SIZE = 64
GROUP_TOKENS = 1024  # tokens per group of chunks processed together (see liquid_scan)


def _check_shapes(q, k, v, log_decay, initial_state):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [batch, seq, heads, N]; got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, seq, heads, _ = q.shape
    if v.dim() != 4 or tuple(v.shape[:3]) != (batch, seq, heads):
        raise ValueError(f"v must be [batch, seq, heads, P] matching q {tuple(q.shape)}; got {tuple(v.shape)}")
    if tuple(log_decay.shape) != (batch, seq, heads):
        raise ValueError(f"log_decay must be [batch, seq, heads] = {(batch, seq, heads)}; got {tuple(log_decay.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, heads, q.shape[-1], v.shape[-1]):
        raise ValueError(
            f"initial_state must be [batch, heads, N, P] = {(batch, heads, q.shape[-1], v.shape[-1])}; "
            f"got {tuple(initial_state.shape)}"
        )


def liquid_scan_reference(q, k, v, log_decay, *, initial_state=None, chunk_size=None):
    """Token-by-token recurrence; slow, obviously correct. `chunk_size` is accepted and ignored."""
    _check_shapes(q, k, v, log_decay, initial_state)
    batch, seq, heads, n = q.shape
    p = v.shape[-1]
    state = q.new_zeros(batch, heads, n, p, dtype=torch.float32)
    if initial_state is not None:
        state = initial_state.float()
    ys = []
    # unbind once: indexing [:, t] in the loop would make backward quadratic in seq.
    for q_t, k_t, v_t, ld_t in zip(q.float().unbind(1), k.float().unbind(1), v.float().unbind(1),
                                   log_decay.float().unbind(1)):
        state = ld_t.exp()[..., None, None] * state + k_t[..., :, None] * v_t[..., None, :]
        ys.append(torch.einsum("bhn,bhnp->bhp", q_t, state))
    y = torch.stack(ys, dim=1) if ys else v.new_zeros(batch, 0, heads, p, dtype=torch.float32)
    return y.to(v.dtype), state


def _triton_scan():
    """The Triton kernel's module, imported on first CUDA use (it imports this module). Exported models ship
    without it (their copy of this file then always takes the PyTorch path)."""
    try:
        return importlib.import_module("pretrain.model.scan_triton")
    except ImportError:
        return None



def _chunk_len(seq: int) -> int:
    """Chunk length of the element-wise scan: about sqrt(seq) (a power of two in [8, 256]), so that its
    two sequential loops (over the positions of a chunk, over the chunks) both stay short."""
    return int(min(256, max(8, 2 ** round(math.log2(max(seq, 1)) / 2))))


def _recurrence_(a, h, h0):
    """In place: h_t <- a_t h_{t-1} + h_t along dim 1, from h_{-1} = h0 (None: zero).
    a [B, T, H, 1], h [B, T, H, P] contiguous fp32, T a multiple of the chunk length.

    Work O(T), as short Python loops of whole-tensor steps (each step covers one position of every chunk
    at once): (1) each chunk's end value from a zero start and its total decay, read-only over h;
    (2) a loop over the chunks carrying the true value into each; (3) the recurrence in place, every
    chunk starting from its carried value. No temporary the size of h: on a CPU a fresh allocation that
    size costs as much as several passes over it (page faults)."""
    batch, seq, heads, p = h.shape
    c = _chunk_len(seq)
    nc = seq // c
    # The views each step uses, made once by unbind (one call) rather than by indexing in every step.
    a_at, h_at = a.view(batch, nc, c, heads, 1).unbind(2), h.view(batch, nc, c, heads, p).unbind(2)
    # end accumulates in place (out= its own memory): a fresh tensor per step costs page faults here.
    end, decay = h_at[0].clone(), a_at[0].clone()
    for t in range(1, c):
        torch.addcmul(h_at[t], a_at[t], end, out=end)
        decay.mul_(a_at[t])
    carried = h.new_empty(batch, nc, heads, p)  # the state entering each chunk
    carried_at, end_at, decay_at = carried.unbind(1), end.unbind(1), decay.unbind(1)
    if h0 is None:
        carried_at[0].zero_()
    else:
        carried_at[0].copy_(h0)
    for i in range(nc - 1):
        torch.addcmul(end_at[i], decay_at[i], carried_at[i], out=carried_at[i + 1])
    h_at[0].addcmul_(a_at[0], carried)
    for t in range(1, c):
        h_at[t].addcmul_(a_at[t], h_at[t - 1])


def _reverse_recurrence_(a, g):
    """In place: g_t <- g_t + a_{t+1} g_{t+1} along dim 1 (the adjoint of _recurrence_; g_T = 0), in the
    same three steps. a [B, T, H, 1], g [B, T, H, P]."""
    batch, seq, heads, p = g.shape
    c = _chunk_len(seq)
    nc = seq // c
    a_at, g_at = a.view(batch, nc, c, heads, 1).unbind(2), g.view(batch, nc, c, heads, p).unbind(2)
    start, decay = g_at[-1].clone(), torch.ones_like(a_at[0])  # decay: product of a over (first, last]
    for t in range(c - 2, -1, -1):
        torch.addcmul(g_at[t], a_at[t + 1], start, out=start)
        decay.mul_(a_at[t + 1])
    carried = g.new_empty(batch, nc, heads, p)  # a_{t+1} g_{t+1} entering each chunk's last position
    carried_at, start_at, decay_at, first_a = carried.unbind(1), start.unbind(1), decay.unbind(1), a_at[0].unbind(1)
    carried_at[-1].zero_()
    for i in range(nc - 1, 0, -1):
        torch.mul(first_a[i], torch.addcmul(start_at[i], decay_at[i], carried_at[i]), out=carried_at[i - 1])
    g_at[-1].add_(carried)
    for t in range(c - 2, -1, -1):
        g_at[t].addcmul_(a_at[t + 1], g_at[t + 1])


BLOCK_ELEMENTS = 2**18  # elements of x [B, T, H, P] per time block of the backward's products (1 MiB fp32)


def _block_len(x) -> int:
    """Positions per time block of _channel_sums_ / _products_p1_: about BLOCK_ELEMENTS of x, in cache."""
    return max(1, BLOCK_ELEMENTS // max(1, x[:, :1].numel()))


def _products_p1_(gh, h, gy, v, k, a, *, grad_a):
    """The backward's products when P = 1, in one pass over time, a block of positions at a time (every
    product of a block made while its rows are in cache), each into memory the call owns:
    grad_a_t = gh_t h_{t-1} a_t for t >= 1 (row 0, set by the caller, is multiplied by a_0; this is
    d L / d log_decay), then a <- gh v (grad_k), gh <- gh k (grad_v) and h <- h gy (grad_q). Five separate
    passes would each read two tensors from memory and write one."""
    seq, block = gh.shape[1], _block_len(gh)
    prev = h.new_empty(h[:, 0].shape)  # h's last row of the block before, as it was before it became grad_q
    for start in range(0, seq, block):
        end = min(start + block, seq)
        if start:
            torch.mul(gh[:, start], prev, out=grad_a[:, start])
        torch.mul(gh[:, start + 1:end], h[:, start:end - 1], out=grad_a[:, start + 1:end])
        grad_a[:, start:end].mul_(a[:, start:end])
        g = gh[:, start:end]
        torch.mul(g, v[:, start:end], out=a[:, start:end])
        g.mul_(k[:, start:end])
        prev.copy_(h[:, end - 1])
        h[:, start:end].mul_(gy[:, start:end])


def _channel_sums_(gh, h, gy, v, k, *, grad_a, grad_q, grad_k):
    """The backward's channel sums when P > 1, for x [B, T, H, P]: grad_k_t = sum_p gh_t v_t, grad_q_t =
    sum_p h_t gy_t and, for t >= 1, grad_a_t = sum_p gh_t h_{t-1}; then gh becomes grad_v = gh k in place.

    One pass over time, a block of positions at a time (_block_len), with every product of a block made while
    its rows are in cache, through one small scratch: three separate passes would read gh and h twice each
    from memory, and a product the size of x, fresh, costs more than the arithmetic on a CPU."""
    seq, block = gh.shape[1], _block_len(gh)
    scratch = gh.new_empty(gh.shape[0], min(block, seq), *gh.shape[2:])
    for start in range(0, seq, block):
        end = min(start + block, seq)
        part, g = scratch[:, :end - start], gh[:, start:end]
        torch.sum(torch.mul(g, v[:, start:end], out=part), -1, keepdim=True, out=grad_k[:, start:end])
        torch.sum(torch.mul(h[:, start:end], gy[:, start:end], out=part), -1, keepdim=True, out=grad_q[:, start:end])
        lo = max(start, 1)
        torch.sum(torch.mul(gh[:, lo:end], h[:, lo - 1:end - 1], out=part[:, :end - lo]), -1, keepdim=True,
                  out=grad_a[:, lo:end])
        g.mul_(k[:, start:end])


class _ElementwiseScan(torch.autograd.Function):
    """The recurrence when key_dim is 1: S_t = a_t S_{t-1} + k_t v_t per channel (a scalar state per
    head and value channel), y_t = q_t S_t, a_t = exp(log_decay_t). Forward and backward are each one
    first-order linear recurrence (backward runs its adjoint in reverse), so no [chunk x chunk] decay
    matrix is built and the work is a few passes over [B, T, H, P].

    Inputs fp32 with seq a multiple of the chunk length; h0 [B, H, P] or None. Keeps the states
    [B, T, H, P] for backward, or with `recompute` only the inputs (backward runs the forward again)."""

    @staticmethod
    def forward(ctx, q, k, v, log_decay, h0, recompute: bool):
        a = log_decay.exp()[..., None]
        h = k * v
        _recurrence_(a, h, h0)
        y = q * h
        ctx.recompute = recompute
        ctx.save_for_backward(q, k, v, a, h0, None if recompute else h)
        return y, h[:, -1].clone()  # a copy: backward reuses h's memory

    @staticmethod
    def backward(ctx, gy, g_final):
        q, k, v, a, h0, h = ctx.saved_tensors
        if h is None:
            h = k * v
            _recurrence_(a, h, h0)
        gh = q * gy
        gh[:, -1] += g_final
        _reverse_recurrence_(a, gh)  # gh_t: dL/dS_t through y_t and every later state
        grad_h0 = a[:, 0] * gh[:, 0] if h0 is not None and ctx.needs_input_grad[4] else None
        grad_a = torch.empty_like(a)  # dL/da_t = sum over channels of gh_t S_{t-1}
        if h0 is not None:
            torch.sum(gh[:, 0] * h0, -1, keepdim=True, out=grad_a[:, 0])
        else:
            grad_a[:, 0] = 0
        # On a CPU a fresh tensor the size of h costs page faults worth several passes over it, so the
        # products below go into memory this call already owns where they can (h and a are its own, saved or
        # recomputed, never seen by the caller; gh's last use is grad_v), and with P > 1 the sums over the
        # channels run a block of positions at a time, all in one pass (_channel_sums_, _products_p1_).
        if h.shape[-1] == 1:  # a is this call's own (exp of log_decay): grad_k goes there once grad_a used it
            _products_p1_(gh, h, gy, v, k, a, grad_a=grad_a)
            grad_q, grad_k, grad_ld = h, a, grad_a[..., 0]
        else:
            grad_q, grad_k = torch.empty_like(a), torch.empty_like(a)
            _channel_sums_(gh, h, gy, v, k, grad_a=grad_a, grad_q=grad_q, grad_k=grad_k)
            grad_ld = grad_a.mul_(a)[..., 0]  # d a / d log_decay = a
        return grad_q, grad_k, gh, grad_ld, grad_h0, None  # gh is grad_v now


_CPU_KERNELS: dict[bool, object] = {}  # chunked -> the kernel or None, decided once per process


@contextlib.contextmanager
def pytorch_forms():
    """Inside, liquid_scan takes its PyTorch forms on the CPU (no C++ kernel): for measuring those forms
    (`liquid bench gpu`'s "pytorch" impl). Not thread-safe; backward needs no context (it is autograd's)."""
    saved = dict(_CPU_KERNELS)
    _CPU_KERNELS.update({True: None, False: None})
    try:
        yield
    finally:
        _CPU_KERNELS.clear()
        _CPU_KERNELS.update(saved)


def _cpu_kernel(chunked: bool = False):
    """The fused C++ form (pretrain/model/scan_cpu.py) of the element-wise recurrence, or with `chunked` of the
    chunked scan, when it is built here, else None. Exported models ship without that module: their copy of
    this file takes the PyTorch form. Once decided, torch.compile reads the answer as a constant."""
    if chunked not in _CPU_KERNELS:
        _CPU_KERNELS[chunked] = _find_cpu_kernel(chunked)
    return _CPU_KERNELS[chunked]


@torch.compiler.disable  # files and ctypes: for torch.compile to step over (once), not to trace
def _find_cpu_kernel(chunked: bool):
    try:
        scan_cpu = importlib.import_module("pretrain.model.scan_cpu")
    except ImportError:
        return None
    if chunked:
        return scan_cpu.ChunkedScanCPU if scan_cpu.chunked_available() else None
    return scan_cpu.ElementwiseScanCPU if scan_cpu.available() else None


def _liquid_scan_elementwise(q, k, v, log_decay, *, initial_state, recompute: bool):
    """liquid_scan for key_dim 1: same contract, resets included (a reset's decay exp(-inf) = 0 drops the
    state exactly). On the CPU the fused C++ loop (scan_cpu.ElementwiseScanCPU) where it builds, else (and on
    other devices) _ElementwiseScan, its PyTorch form."""
    _check_shapes(q, k, v, log_decay, initial_state)
    batch, seq, heads, _ = q.shape
    p = v.shape[-1]
    if seq == 0:
        state = q.new_zeros(batch, heads, 1, p, dtype=torch.float32) if initial_state is None else initial_state.float()
        return v.new_zeros(batch, 0, heads, p), state
    h0 = initial_state.float()[:, :, 0].contiguous() if initial_state is not None else None
    kernel = _cpu_kernel() if q.device.type == "cpu" else None
    if kernel is not None:  # any length, no padding; q and k as [B, T, H] (a view: a select's backward would
        # fill a zero tensor and copy the gradient in)
        y, final = kernel.apply(q.float().reshape(batch, seq, heads).contiguous(),
                                k.float().reshape(batch, seq, heads).contiguous(), v.float().contiguous(),
                                log_decay.float().contiguous(), h0, recompute)
        return y.to(v.dtype), final[:, :, None]
    pad = -seq % _chunk_len(seq)
    xs = [x.float() for x in (q, k, v, log_decay)]
    if pad:  # log_decay 0 (a = 1) and k = 0 after the end carry the last state unchanged
        xs = [torch.cat([x, x.new_zeros((batch, pad, *x.shape[2:]))], dim=1) for x in xs]
    y, final = _ElementwiseScan.apply(*xs, h0, recompute)
    # No slice without padding: autograd's backward of a slice writes the gradient into a zero-filled
    # tensor of the whole shape, a fill and a copy the size of y, even when the slice is the whole.
    return (y[:, :seq] if pad else y).to(v.dtype), final[:, :, None]


def liquid_scan(q, k, v, log_decay, *, initial_state=None, chunk_size=DEFAULT_CHUNK_SIZE, recompute=False):
    """Chunked parallel scan: masked matmuls inside a chunk, state passing between chunks.

    recompute=True keeps only each group's inputs for backward and recomputes its chunk matrices there
    (about a third more compute; the memory left is the inputs, outputs and one group's temporaries).
    On the CPU the chunked form is scan_cpu.ChunkedScanCPU where it builds: it always keeps just the inputs
    and the state entering each chunk (N P / chunk floats per token and head) and recomputes each chunk's
    scores in backward, so `recompute` changes nothing there.
    """
    if q.is_cuda:
        scan_triton = _triton_scan()
        if scan_triton is not None and scan_triton.use_triton(q):
            return scan_triton.liquid_scan_triton(q, k, v, log_decay, initial_state=initial_state,
                                                  chunk_size=chunk_size, recompute=recompute)
    # The contract is fp32 accumulation: autocast would run the chunk matmuls in bf16 (on CUDA and CPU).
    with torch.autocast(q.device.type, enabled=False):
        if q.shape[-1] == 1:  # one decay per channel: an element-wise recurrence, no chunk matrices
            return _liquid_scan_elementwise(q, k, v, log_decay, initial_state=initial_state, recompute=recompute)
        return _liquid_scan_chunked(q, k, v, log_decay, initial_state=initial_state, chunk_size=chunk_size,
                                    recompute=recompute)


def _liquid_scan_chunked(q, k, v, log_decay, *, initial_state, chunk_size: int, recompute: bool):
    _check_shapes(q, k, v, log_decay, initial_state)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, seq, heads, n = q.shape
    p = v.shape[-1]
    out_dtype = v.dtype
    if seq == 0:
        state = q.new_zeros(batch, heads, n, p, dtype=torch.float32) if initial_state is None else initial_state.float()
        return v.new_zeros(batch, 0, heads, p), state
    chunk = min(chunk_size, seq)
    kernel = _cpu_kernel(chunked=True) if q.device.type == "cpu" and batch * heads > 0 else None
    if kernel is not None:  # one C++ pass per direction, any length (no padding), views read in place
        y, state = kernel.apply(q, k, v, log_decay, initial_state, chunk)
        return y.to(out_dtype), state
    num_chunks = -(-seq // chunk)
    pad = num_chunks * chunk - seq

    def to_chunks(x, fill=0.0):  # [batch, seq, heads, ...] -> [batch, heads, chunks, chunk, ...]
        x = x.float().movedim(2, 1)
        if pad:
            shape = list(x.shape)
            shape[2] = pad
            x = torch.cat([x, x.new_full(shape, fill)], dim=2)
        return x.reshape(batch, heads, num_chunks, chunk, *x.shape[3:])

    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    # Padding uses log_decay 0 and k = 0, so the final state is unaffected by it.
    ld = to_chunks(log_decay)  # [batch, heads, chunks, chunk]
    state = q.new_zeros(batch, heads, n, p, dtype=torch.float32)
    if initial_state is not None:
        state = initial_state.float()
    # Groups of chunks run one after another so each group's temporaries stay cache-sized in forward
    # and backward; the work per token does not depend on the sequence length.
    group = max(1, GROUP_TOKENS // chunk)
    ys = []
    for parts in zip(*(x.split(group, dim=2) for x in (qc, kc, vc, ld))):
        if recompute and torch.is_grad_enabled():
            y, state = torch.utils.checkpoint.checkpoint(_chunk_group, *parts, state, use_reentrant=False)
        else:
            y, state = _chunk_group(*parts, state)
        ys.append(y)
    y = torch.cat(ys, dim=2) if len(ys) > 1 else ys[0]
    y = y.reshape(batch, heads, num_chunks * chunk, p)
    y = (y[:, :, :seq] if pad else y).movedim(1, 2)  # no slice without padding (see _liquid_scan_elementwise)
    return y.to(out_dtype), state


def _chunk_group(qc, kc, vc, ld, state):
    """Chunks [batch, heads, chunks, chunk, ...] of one group, entering with `state`; returns (y, state)."""
    chunk = ld.shape[-1]
    # The reset masks are applied whether or not a reset occurs: asking first (`reset.any()`) would read
    # the answer back to the host, a GPU stall in every group of every layer. Without resets they change
    # nothing (seg is 0 everywhere).
    reset = torch.isneginf(ld)
    ld = ld.masked_fill(reset, 0.0)
    cum = ld.cumsum(-1)  # log-decay from chunk start to t, inclusive; finite
    seg = reset.int().cumsum(-1)  # segment id: number of resets up to and including t

    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=ld.device).tril()
    pair_ok = causal & (seg[..., :, None] == seg[..., None, :])  # s <= t with no reset in (s, t]
    diff = cum[..., :, None] - cum[..., None, :]
    decay = diff.masked_fill(~pair_ok, float("-inf")).exp()  # [batch, heads, chunks, chunk, chunk]
    y = ((qc @ kc.transpose(-1, -2)) * decay) @ vc  # intra-chunk part

    # Each chunk's own contribution to the state at its end, starting from zero.
    last_cum, last_seg = cum[..., -1:], seg[..., -1:]
    to_end = (last_cum - cum).masked_fill(seg != last_seg, float("-inf"))
    local_state = (kc * to_end.exp()[..., None]).transpose(-1, -2) @ vc  # [batch, heads, chunks, N, P]
    # Total decay of a chunk; zero when a reset inside it drops the carried state.
    chunk_decay = last_cum[..., 0].exp() * (last_seg[..., 0] == 0)  # [batch, heads, chunks]

    # Slices are taken once with unbind: indexing inside the loop would give every chunk a backward
    # that writes a gradient as large as the whole tensor (quadratic in sequence length).
    states_in = []
    for decay_c, local_c in zip(chunk_decay[..., None, None].unbind(2), local_state.unbind(2)):
        states_in.append(state)
        state = decay_c * state + local_c
    carried = torch.stack(states_in, dim=2)  # state entering each chunk

    from_start = cum.masked_fill(seg != 0, float("-inf"))
    y = y + (qc * from_start.exp()[..., None]) @ carried  # decay of the carried state up to t
    return y, state


__all__ = ["liquid_scan", "liquid_scan_reference", "DEFAULT_CHUNK_SIZE"]
