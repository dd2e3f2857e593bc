"""A work-efficient Blelloch parallel scan of the first-order linear recurrence, in plain PyTorch.

The anchor `liquid bench scan` measures the element-wise liquid scan against: what a competent user would
write for the recurrence without a custom kernel. `blelloch_scan` has the contract of
pretrain.model.scan.liquid_scan restricted to key_dim N == 1:

    h_t = a_t h_{t-1} + b_t,  a_t = exp(log_decay_t),  b_t = k_t v_t,  y_t = q_t h_t

with h_0 the initial state (zero by default) and log_decay = -inf an exact reset (a_t = 0).

The recurrence is the inclusive scan of the pairs x_t = (a_t, b_t) under the associative operator
(a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2) ("apply step 1, then step 2"), and h_t is the b of
h_0-prefix o x_1 o ... o x_t. The scan is Blelloch's two-pass tree algorithm (O(T) operator
applications, 2 log2(T) vectorized steps), written out of place so autograd differentiates it:

- up-sweep: level 0 is the T pairs (T padded to a power of two with the identity (1, 0)); level l+1
  combines the adjacent pairs of level l, (even o odd), down to one pair: the reduction tree.
- down-sweep: the exclusive prefix of the single top node is the initial state; going down, a node's
  left child inherits its parent's exclusive prefix and its right child gets parent-prefix o left-child.
  Only the b half of a prefix is ever needed (the b of p o x is x.a p.b + x.b), so the down-sweep carries
  states only.
- finally h_t = a_t * exclusive_t + b_t (the inclusive scan) and y_t = q_t h_t.

Everything is vectorized over batch, heads and channels, with time as the leading dimension so each
even/odd half of a level is a strided view of contiguous rows.
"""
from __future__ import annotations

import torch


def blelloch_scan(q, k, v, log_decay, *, initial_state=None):
    """q, k [B, T, H, 1]; v [B, T, H, P]; log_decay [B, T, H] (<= 0, -inf resets); initial_state [B, H, 1, P].

    Returns (y [B, T, H, P] in v's dtype, final_state [B, H, 1, P] float32), computed in float32.
    """
    if q.dim() != 4 or k.shape != q.shape or q.shape[-1] != 1:
        raise ValueError(f"q and k must both be [batch, seq, heads, 1]; got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, seq, heads, _ = q.shape
    if v.dim() != 4 or tuple(v.shape[:3]) != (batch, seq, heads):
        raise ValueError(f"v must be [batch, seq, heads, P] matching q {tuple(q.shape)}; got {tuple(v.shape)}")
    p = v.shape[-1]
    if tuple(log_decay.shape) != (batch, seq, heads):
        raise ValueError(f"log_decay must be [batch, seq, heads] = {(batch, seq, heads)}; got {tuple(log_decay.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, heads, 1, p):
        raise ValueError(f"initial_state must be [batch, heads, 1, P] = {(batch, heads, 1, p)}; "
                         f"got {tuple(initial_state.shape)}")
    rows = batch * heads
    if initial_state is None:
        h0 = v.new_zeros(rows, p, dtype=torch.float32)
    else:
        h0 = initial_state.float().reshape(rows, p)
    if seq == 0:
        return v.new_zeros(batch, 0, heads, p), h0.reshape(batch, heads, 1, p)

    def time_major(x):  # [B, T, H, ...] -> [T, B*H, ...] float32
        return x.float().transpose(0, 1).reshape(seq, rows, *x.shape[3:])

    a = time_major(log_decay).exp().unsqueeze(-1)  # [T, rows, 1]; exp(-inf) = 0 is the reset
    b = time_major(k) * time_major(v)  # [T, rows, P]
    size = 1 << (seq - 1).bit_length()  # T padded to a power of two with the identity (1, 0)
    if size > seq:
        a = torch.cat([a, a.new_ones(size - seq, rows, 1)])
        b = torch.cat([b, b.new_zeros(size - seq, rows, p)])

    leaves_a, leaves_b = a, b
    # Up-sweep: combine adjacent pairs, level by level, up to the root. Each level's left children (the even
    # positions) are kept for the down-sweep; unbind, whose backward is one stack, splits even from odd.
    left = []
    while b.shape[0] > 1:
        a_even, a_odd = a.unflatten(0, (-1, 2)).unbind(1)
        b_even, b_odd = b.unflatten(0, (-1, 2)).unbind(1)
        left.append((a_even, b_even))
        # (a_even, b_even) o (a_odd, b_odd) = (a_even a_odd, a_odd b_even + b_odd); the root's a is not needed.
        a = a_even * a_odd if b.shape[0] > 2 else None
        b = torch.addcmul(b_odd, a_odd, b_even)

    # Down-sweep: exclusive prefix states, from the root (the initial state) down to the leaves.
    prefix = h0.unsqueeze(0)  # [1, rows, P]
    for a_even, b_even in reversed(left):
        right = torch.addcmul(b_even, a_even, prefix)  # parent prefix o left child
        prefix = torch.stack([prefix, right], dim=1).flatten(0, 1)

    if size > seq:  # (a slice, even a whole one, costs a zero-filled gradient in backward: only when padded)
        leaves_a, leaves_b, prefix = leaves_a[:seq], leaves_b[:seq], prefix[:seq]
    h = torch.addcmul(leaves_b, leaves_a, prefix)  # inclusive scan: the states h_1..h_T
    y = time_major(q) * h  # [T, rows, P]
    y = y.reshape(seq, batch, heads, p).transpose(0, 1)
    return y.to(v.dtype), h[seq - 1].reshape(batch, heads, 1, p)


__all__ = ["blelloch_scan"]
